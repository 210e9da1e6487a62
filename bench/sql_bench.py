"""
Benchmark for the sql check: lookups per second through the adbapi pool
against SQLite, a private PostgreSQL and a private MariaDB (started like
the tests start them), without a cache and with one, with several lookups in flight as
Postfix's many connections would have.

    PYTHONPATH=. python3 bench/sql_bench.py [--lookups 5000] [--concurrency 20] [--repeat 5]

Every figure is the median of C{--repeat} runs (each run is printed too).
It prints figures; it asserts nothing (the machine may be busy).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import react

from pfxpold.checks.sql import SQLCheck
from pfxpold.testing import make_options, make_request

QUERY = """
    SELECT 1 FROM relay_acl
     WHERE origin IN (:client_ip, lower(:client_name))
       AND address IN (lower(:sender), :sender_at_domain)
     LIMIT 1
"""
ROWS = 10000
SCHEMA = "CREATE TABLE relay_acl (origin TEXT NOT NULL, address TEXT NOT NULL, PRIMARY KEY (origin, address))"


def rows() -> list[tuple[str, str]]:
    return [(f"10.0.{i // 256}.{i % 256}", f"user{i}@example.com") for i in range(ROWS)]


def requests(count: int, distinct: int) -> list:
    """
    C{count} requests over C{distinct} different pairs, half of them found.
    """
    made = []
    for i in range(count):
        n = (i * 7919) % distinct
        sender = f"user{n}@example.com" if n % 2 == 0 else f"other{n}@example.com"
        made.append(
            make_request(
                client_address=f"10.0.{n // 256}.{n % 256}", client_name="unknown", sender=sender
            )
        )
    return made


async def measure(reactor, check: SQLCheck, batch: list, concurrency: int) -> float:
    async def worker(share: list) -> None:
        for request in share:
            await maybeDeferred(check.check, request)

    shares = [batch[i::concurrency] for i in range(concurrency)]
    started = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(worker(share)) for share in shares])
    return len(batch) / (time.perf_counter() - started)


async def bench(reactor, name: str, settings: dict, arguments) -> None:
    for label, cache in (
        ("no cache", {}),
        ("cache hits", {"cache_positive_ttl": 60, "cache_negative_ttl": 60}),
    ):
        check = SQLCheck(
            make_options(reactor=reactor, query=QUERY, found="OK", **settings, **cache)
        )
        check.startService()
        try:
            # Cached: 500 distinct pairs, all looked up once to warm the
            # cache, so the measured lookups are all hits.
            batch = requests(arguments.lookups, 500 if cache else arguments.lookups)
            await measure(reactor, check, batch[:500], arguments.concurrency)
            rates = [
                await measure(reactor, check, batch, arguments.concurrency)
                for _ in range(arguments.repeat)
            ]
        finally:
            check.stopService()
        runs = " ".join(f"{rate:,.0f}" for rate in rates)
        print(
            f"  {name:10s} {label:10s} {statistics.median(rates):>10,.0f} lookups/s"
            f" (median of {len(rates)}: {runs})"
        )


async def main(reactor, arguments) -> None:
    directory = tempfile.mkdtemp(prefix="pfxpold-sqlbench-")
    path = os.path.join(directory, "acl.sqlite")
    connection = sqlite3.connect(path)
    connection.execute(SCHEMA)
    connection.executemany("INSERT INTO relay_acl VALUES (?, ?)", rows())
    connection.commit()
    connection.close()
    print(
        f"{time.strftime('%Y-%m-%d', time.gmtime())}: {arguments.lookups} lookups,"
        f" {arguments.concurrency} in flight, {ROWS} rows, median of {arguments.repeat} runs:"
    )
    await bench(reactor, "SQLite", {"database": path}, arguments)
    if not arguments.no_postgresql:
        await bench_postgresql(reactor, arguments)
    if not arguments.no_mysql:
        await bench_mysql(reactor, arguments)


async def bench_mysql(reactor, arguments) -> None:
    from tests.integration.lookup_mariadb import MariaDBServer

    server = MariaDBServer()
    try:
        server.start()
        server.execute("CREATE DATABASE pfxpold", None)
        server.execute(SCHEMA.replace("TEXT", "VARCHAR(255)"))
        connection = server.connect()
        with connection.cursor() as cursor:
            cursor.executemany("INSERT INTO relay_acl VALUES (%s, %s)", rows())
        connection.close()
        settings = {
            "driver": "mysql",
            "url": server.url(),
            "password_file": server.password_file,
            "pool_size": 4,
        }
        await bench(reactor, "MySQL", settings, arguments)
    finally:
        server.cleanup()


async def bench_postgresql(reactor, arguments) -> None:
    from tests.integration.lookup_postgresql import PostgreSQLServer

    server = PostgreSQLServer()
    try:
        server.start()
        server.execute("CREATE DATABASE pfxpold", "postgres")
        server.execute(SCHEMA)
        import psycopg

        with psycopg.connect(server.conninfo(), autocommit=True) as c:
            with c.cursor() as cursor:
                cursor.executemany("INSERT INTO relay_acl VALUES (%s, %s)", rows())
        settings = {"driver": "postgresql", "conninfo": server.conninfo(), "pool_size": 4}
        await bench(reactor, "PostgreSQL", settings, arguments)
    finally:
        server.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument(
        "--repeat", type=int, default=5, help="runs per figure; the median is shown"
    )
    parser.add_argument("--no-postgresql", action="store_true")
    parser.add_argument("--no-mysql", action="store_true")
    parsed = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, parsed)))
