"""
Quota-check throughput on each state store: memory, SQLite, Redis.

Runs the real QuotaCheck (two limits: an hour window and a 600 s sliding
window, so each check reads 12 keys and writes 2) on the real reactor
against each store, keeping C{--concurrency} checks in flight, each
followed by the chain's decided() call, and prints checks per second.
Redis is a private redis-server started on a free loopback port (stopped
by PID at the end) unless C{--redis-endpoint} names one.

    python3 bench/quota_bench.py [--count 20000] [--concurrency 100] [--daemon] [--topologies]

With C{--daemon}, it also measures whole requests through a real pfxpold
daemon (twistd subprocess) on each store: 20 connections, each pipelining
its share of END-OF-MESSAGE requests, as Postfix's smtpd processes would.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from pfxpold.action import Action  # noqa: E402
from pfxpold.checks.quota import QuotaCheck  # noqa: E402
from pfxpold.config import CheckOptions  # noqa: E402
from pfxpold.testing import make_request  # noqa: E402

OK = Action("OK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            "/usr/bin/redis-server",
            "--save",
            "",
            "--appendonly",
            "no",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--dir",
            directory,
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, f"tcp:host=127.0.0.1:port={port}"


async def measure(reactor: Any, store: dict[str, Any], count: int, concurrency: int) -> float:
    options = CheckOptions(
        {
            "key": ["sasl_username"],
            "limits": [
                {"period": "hour", "max": 10**9},
                {"period": "sliding", "seconds": 600, "max": 10**9, "precision": 60},
            ],
        },
        name="bench",
        reactor=reactor,
        document={"stores": {"default": store}},
        shared={},
    )
    check = QuotaCheck(options)
    service = check.store
    service.startService()
    # Let a connecting store (Redis) connect.
    for _ in range(100):
        if getattr(getattr(service, "client", None), "connected", True):
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    requests = [
        make_request("eod", sasl_username=f"user{i % 50}", instance=f"bench.{i}")
        for i in range(count)
    ]
    position = 0

    async def worker() -> None:
        nonlocal position
        while position < count:
            request = requests[position]
            position += 1
            # An Action at once when the store answered at once (memory).
            action = await defer.maybeDeferred(check.check, request)
            assert action.verb == "DUNNO", action
            check.decided(request, OK)

    started = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    await service.stopService()
    return count / elapsed


DAEMON_CONFIG = """
[server]
default_action = "DUNNO"
log_requests = false

[stores.default]
{store}

[[check]]
name = "quota"
type = "quota"
key = ["sasl_username"]
limits = [{{ period = "hour", max = 1000000000 }},
          {{ period = "sliding", seconds = 600, max = 1000000000, precision = 60 }}]
"""


def measure_daemon(directory: str, store: str, count: int, connections: int = 20) -> float:
    """
    Requests per second through a pfxpold daemon using C{store}.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tests.integration.support import encode_request, read_reply, running_daemon

    base = dict(make_request("eod"))
    per_connection = count // connections

    def one_connection(number: int) -> int:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=120) as sock:
            payload = b"".join(
                encode_request(
                    dict(base, sasl_username=f"user{number}", instance=f"d.{number}.{index}")
                )
                for index in range(per_connection)
            )
            sock.sendall(payload)
            answers = [read_reply(sock) for _ in range(per_connection)]
        assert all(answer == b"action=DUNNO\n\n" for answer in answers), answers[:3]
        return len(answers)

    with running_daemon(directory, DAEMON_CONFIG.format(store=store)) as daemon:
        started = time.perf_counter()
        with ThreadPoolExecutor(connections) as pool:
            done = sum(pool.map(one_connection, range(connections)))
        return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--redis-endpoint", default=None)
    parser.add_argument("--daemon", action="store_true", help="also measure through a daemon")
    parser.add_argument(
        "--topologies",
        action="store_true",
        help="also Redis through Sentinel (master + replica + 3 sentinels) and a 3-master Cluster",
    )
    arguments = parser.parse_args()

    from twisted.internet import reactor

    directory = tempfile.mkdtemp(prefix="pfxpold-bench-")
    redis_process = None
    endpoint = arguments.redis_endpoint
    if endpoint is None:
        redis_process, endpoint = start_redis(directory)
    stores = [
        ("memory", {"type": "memory"}),
        ("sqlite", {"type": "sqlite", "path": os.path.join(directory, "bench.sqlite3")}),
        ("redis", {"type": "redis", "endpoint": endpoint}),
    ]
    groups = contextlib.ExitStack()
    if arguments.topologies:
        from tests.integration.redis_groups import (
            MASTER_NAME,
            running_cluster,
            running_sentinel_group,
        )

        sentinel_directory = os.path.join(directory, "sentinel")
        cluster_directory = os.path.join(directory, "cluster")
        os.mkdir(sentinel_directory)
        os.mkdir(cluster_directory)
        group = groups.enter_context(running_sentinel_group(sentinel_directory))
        cluster = groups.enter_context(running_cluster(cluster_directory))
        stores += [
            (
                "sentinel",
                {
                    "type": "redis",
                    "sentinels": group.sentinel_addresses,
                    "master_name": MASTER_NAME,
                },
            ),
            ("cluster", {"type": "redis", "cluster_nodes": cluster.addresses}),
        ]

    async def run() -> None:
        try:
            print(
                f"quota check throughput: {arguments.count} checks, "
                f"{arguments.concurrency} in flight, 2 limits (hour + sliding 600 s)"
            )
            for name, store in stores:
                rate = await measure(reactor, store, arguments.count, arguments.concurrency)
                print(f"  {name:8} {rate:10.0f} checks/s")
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(run()))
    try:
        reactor.run()
        if arguments.daemon:
            print(f"through a pfxpold daemon: {arguments.count} requests on 20 connections")
            for name, store in stores:
                table = "\n".join(
                    f"{key} = {value!r}".replace("'", '"') for key, value in store.items()
                )
                rate = measure_daemon(directory, table, arguments.count)
                print(f"  {name:8} {rate:10.0f} requests/s")
    finally:
        groups.close()
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait()


if __name__ == "__main__":
    main()
