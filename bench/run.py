#!/usr/bin/env python3
"""
pfxpold's benchmark: one command that runs every scenario side by side.

It builds the C load generator (bench/loadgen.c) with the machine's C
compiler, writes request records from the real Postfix 3.7 requests in
pfxpold/fixtures/ with varying senders, clients and recipients, starts each
scenario's server as a subprocess on a free loopback port, and then, for
each concurrency, runs the load generator against every scenario in turn, so
that the ratios between scenarios hold on a noisy machine. Every reply is
checked against the action the scenario expects for that request.

Results go to a Markdown table (printed, and saved with the raw JSON and a
PNG plot in --output). C{--soak SECONDS} holds 1,000 connections instead
and samples the daemon's memory over time.

Run from the repository: C{python3 bench/run.py --help}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import ipaddress
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

BENCH = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCH)
FIXTURES = os.path.join(REPOSITORY, "pfxpold", "fixtures")
BUILD = os.path.join(BENCH, "build")
# Scenarios are skipped when this checkout lacks their check types.
sys.path.insert(0, REPOSITORY)

DEMO_ANSWERS = ["OK (you win!)", "DUNNO (you lose!)"]

#: Replaced by the load generator with a number unique to each request sent
#: (see bench/loadgen.c).
STAMP = "~STAMP~~~~~~"


# Building the C helpers


def build(name: str, compiler: str = "cc") -> str:
    """
    Compile C{bench/NAME.c} into C{bench/build/NAME} when the source is newer.

    @return: the path of the program.
    """
    source = os.path.join(BENCH, f"{name}.c")
    target = os.path.join(BUILD, name)
    if not os.path.exists(target) or os.path.getmtime(target) < os.path.getmtime(source):
        os.makedirs(BUILD, exist_ok=True)
        subprocess.run(
            [compiler, "-O2", "-Wall", "-o", target, source, "-lpthread"],
            check=True,
        )
    return target


# Request records


def read_fixture(name: str) -> dict[str, str]:
    """
    The attributes of one real Postfix request from pfxpold/fixtures/.
    """
    attributes = {}
    with open(os.path.join(FIXTURES, f"{name}.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                name_, _, value = line.partition("=")
                attributes[name_] = value
    return attributes


@dataclass
class Population:
    """
    The deterministic set of senders, clients and recipients requests are
    drawn from. Sizes are large enough that per-key caches see misses and
    small enough that a warm cache holds them, as on a real relay.
    """

    senders: int = 5000
    sender_domains: int = 1000
    clients: int = 2000
    recipients: int = 3000
    recipient_domains: int = 200


def sender_of(index: int, population: Population) -> str:
    return f"user{index}@s{index % population.sender_domains}.example.com"


def client_of(index: int) -> tuple[str, str]:
    """
    A client address in 10.0.0.0/8 and its host name, for client C{index}.
    """
    address = str(ipaddress.IPv4Address(0x0A000000 + 1 + index * 37))
    return address, f"mx{index}.client{index % 97}.example.net"


def recipient_of(index: int, population: Population) -> str:
    return f"rcpt{index}@d{index % population.recipient_domains}.example.org"


def make_requests(count: int, seed: int = 6, population: Population = Population()) -> list[dict]:
    """
    C{count} requests built from the real Postfix 3.7 fixtures (29
    attributes), mostly RCPT with some DATA and END-OF-MESSAGE, each with a
    sender, client and recipient drawn from C{population}.
    """
    rng = random.Random(seed)
    fixtures = {name: read_fixture(name) for name in ("rcpt", "data", "eod")}
    requests = []
    for number in range(count):
        roll = rng.random()
        stage = "rcpt" if roll < 0.8 else ("data" if roll < 0.9 else "eod")
        attributes = dict(fixtures[stage])
        client = rng.randrange(population.clients)
        address, name = client_of(client)
        attributes.update(
            client_address=address,
            client_name=name,
            reverse_client_name=name,
            client_port=str(1024 + rng.randrange(60000)),
            helo_name=name,
            sender=sender_of(rng.randrange(population.senders), population),
            recipient=recipient_of(rng.randrange(population.recipients), population),
            # The load generator makes every request a new message. The
            # shape is Postfix's, pid.seconds.microseconds.sequence, its
            # stamp standing for the arrival time: it grows from request to
            # request, as Postfix's arrival times do (the SQLite store keeps
            # quota marks in that order).
            instance=f"{rng.getrandbits(16):x}.{STAMP}.{rng.randrange(1000000):x}.{number:x}",
        )
        if stage != "rcpt":
            attributes["queue_id"] = f"4Q{rng.getrandbits(40):010X}"
            attributes["size"] = str(rng.randrange(1000, 200000))
        requests.append(attributes)
    return requests


def write_records(path: str, requests: list[dict], expect: Callable[[dict], list[str]]) -> None:
    """
    Write requests and their expected actions in the load generator's
    record format (see bench/loadgen.c).
    """
    with open(path, "w", encoding="utf-8") as f:
        for attributes in requests:
            answers = expect(attributes)
            f.write("#expect " + ("\t".join(answers) if answers else "*") + "\n")
            for name, value in attributes.items():
                f.write(f"{name}={value}\n")
            f.write("\n")


# Scenarios


@dataclass
class Scenario:
    """
    One server to measure.

    @ivar needs: check types that must exist (modules in pfxpold.checks).
    @ivar setup: writes the configuration and data files in a directory and
        returns the command line to run (C{PORT} is replaced) and the
        function giving a request's expected actions.
    @ivar python: whether the server is a Python process (py-spy can
        profile it: C{--profile}).
    """

    name: str
    description: str
    setup: Callable[[str, list[dict]], tuple[list[str], Callable[[dict], list[str]]]]
    needs: tuple[str, ...] = ()
    workers: int = 1
    optional: bool = False
    runs_pfxpold: bool = True
    python: bool = True
    repository: str = REPOSITORY


#: Makes C{import OpenSSL} fail, as on a machine where pfxpold was
#: installed without the C{http} extra (nothing else pulls pyOpenSSL in):
#: Twisted then loads no TLS stack, about 13 MB of RSS.
WITHOUT_TLS = "import sys; sys.modules['OpenSSL'] = None; "


#: Installs uvloop's event loop policy before twistd runs, so that Twisted's
#: asyncio reactor (C{--reactor=asyncio}), which makes its loop with
#: C{asyncio.new_event_loop()}, runs on uvloop's loop.
WITH_UVLOOP = "import asyncio, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "


def pfxpold_command(
    config: str, tls: bool = True, destination: str = "file", reactor: str = ""
) -> list[str]:
    """
    twistd running pfxpold in the foreground, as in production, with its
    log in a file (C{--logfile}), on standard output (C{-n} under a
    supervisor, which the benchmark sends to C{output.txt}), or in syslog's
    mail facility (C{--logger pfxpold.logger.mail_syslog}, to a private
    socket: L{start_syslog_sink}).

    @param tls: whether pyOpenSSL may be imported (see L{WITHOUT_TLS}).
    @param destination: C{"file"}, C{"stdout"} or C{"syslog"}.
    @param reactor: C{""} for Twisted's default reactor (epoll),
        C{"asyncio"} for its asyncio reactor on asyncio's own event loop,
        C{"uvloop"} for the asyncio reactor on uvloop's (L{WITH_UVLOOP}).
    """
    directory = os.path.dirname(config)
    if destination == "file":
        log = ["--logfile", os.path.join(directory, "pfxpold.log")]
    elif destination == "stdout":
        log = []
    else:
        log = ["--logger", "pfxpold.logger.mail_syslog"]
    command = [
        sys.executable,
        "-c",
        ("" if tls else WITHOUT_TLS)
        + (WITH_UVLOOP if reactor == "uvloop" else "")
        + "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        *(["--reactor=asyncio"] if reactor else []),
        *log,
        "pfxpold",
        "--config",
        config,
    ]
    if destination == "syslog":
        # env executes twistd in its place: the PID measured is the daemon's.
        command = ["env", f"PFXPOLD_SYSLOG_SOCKET={start_syslog_sink(directory)}", *command]
    return command


def start_syslog_sink(directory: str) -> str:
    """
    Start a private syslog socket for a scenario (bench/syslog_sink.py),
    writing what it receives to C{syslog.txt}.

    @return: the socket's path.
    """
    path = os.path.join(directory, "syslog.sock")
    sink = subprocess.Popen(
        [
            sys.executable,
            os.path.join(BENCH, "syslog_sink.py"),
            path,
            os.path.join(directory, "syslog.txt"),
        ]
    )
    HELPERS.append(sink)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if sink.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the syslog sink did not start")
        time.sleep(0.02)
    return path


#: How a scenario logs its requests: to a file of their own (the README's
#: advice for busy relays), in twistd's log (the default), or not at all.
LOG_SETTINGS = {
    "file": {"request_log": "requests.log"},
    "twistd": {},
    "stdout": {},
    "syslog": {},
    "off": {"log_requests": False},
}

#: Where twistd's own log goes (L{pfxpold_command}) for each of
#: L{LOG_SETTINGS}: the default-logging scenarios differ only there.
DESTINATIONS = {"stdout": "stdout", "syslog": "syslog"}


def server_table(port_placeholder: str = "PORT", **settings: Any) -> str:
    lines = [
        "[server]",
        f'listen = ["tcp:{port_placeholder}:interface=127.0.0.1:backlog=1024"]',
    ]
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def setup_trivial(directory: str, requests: list[dict]):
    return [build("trivial_server"), "PORT"], lambda request: ["DUNNO"]


def setup_reference(directory: str, requests: list[dict], reactor: str = "", served: str = ""):
    """
    @param reactor: C{""} (Twisted's default, epoll), C{"asyncio"} or
        C{"uvloop"} (its asyncio reactor, on uvloop's loop for the latter).
    @param served: C{"--count"}: a bare Protocol finding the requests'
        ends with one C{bytes.count} per read (as C{reference-asyncio}),
        not the LineReceiver; C{"--direct"}: the same, sending each answer
        with the socket's C{send} at once (bench/reference_server.py).
    """
    command = [sys.executable, os.path.join(BENCH, "reference_server.py"), "PORT"]
    command += [reactor] if reactor else []
    command += [served] if served else []
    return command, lambda request: ["DUNNO"]


def setup_reference_asyncio(directory: str, requests: list[dict], uvloop: bool = False):
    command = [sys.executable, os.path.join(BENCH, "reference_asyncio.py"), "PORT"]
    return command + (["--uvloop"] if uvloop else []), lambda request: ["DUNNO"]


def _demo(log: str):
    def setup(directory: str, requests: list[dict]):
        config = os.path.join(directory, "pfxpold.toml")
        with open(config, "w") as f:
            f.write(server_table(**LOG_SETTINGS[log]))
            f.write('\n[[check]]\nname = "demo"\ntype = "demo"\n')
        command = pfxpold_command(config, destination=DESTINATIONS.get(log, "file"))
        return command, lambda request: DEMO_ANSWERS

    return setup


def _noop(log: str, check_type: str = "NoopCheck"):
    def setup(directory: str, requests: list[dict]):
        config = os.path.join(directory, "pfxpold.toml")
        with open(config, "w") as f:
            f.write(server_table(**LOG_SETTINGS[log]))
            f.write(f'\n[[check]]\nname = "noop"\ntype = "noop_check:{check_type}"\n')
        return pfxpold_command(config), lambda request: ["DUNNO"]

    return setup


MAP_ENTRIES = 100_000


def write_access_map(path: str, population: Population, entries: int = MAP_ENTRIES) -> dict:
    """
    An access map of C{entries} sender keys: every sender of the population
    (the rest are addresses and domains that no request uses, as in a real
    map), with actions that depend on the key, so that a wrong lookup gives
    a wrong answer.

    @return: the map as a dict from key to action.
    """
    table = {}
    for index in range(population.senders):
        sender = sender_of(index, population)
        if index % 10 == 0:
            table[sender] = "OK"
        elif index % 10 == 1:
            table[sender] = f"REJECT sender {index} blocked"
    for index in range(population.sender_domains):
        table[f"s{index}.example.com"] = "DUNNO"
    filler = 0
    while len(table) < entries:
        table[f"nobody{filler}@unused{filler % 5000}.example.com"] = "REJECT unused"
        filler += 1
    with open(path, "w") as f:
        f.write("# generated by bench/run.py\n")
        for key, action in table.items():
            f.write(f"{key}\t{action}\n")
    return table


MAP_CHECK = """
[[check]]
name = "senders"
type = "file"
map = "senders.map"
lookup = ["sender"]
"""


def map_expectation(table: dict) -> Callable[[dict], list[str]]:
    def expect(request: dict) -> list[str]:
        action = table.get(request["sender"].lower(), "DUNNO")
        return [action]

    return expect


def setup_map(
    directory: str,
    requests: list[dict],
    log: str = "file",
    tls: bool = True,
    metrics: bool = False,
    capture: bool = False,
    reactor: str = "",
):
    """
    @param metrics: with a C{[metrics]} table (counted, served on a free
        port, never scraped: the cost is the counting).
    @param capture: with C{[server] capture} on (every request captured
        for pfxpold-replay, rotated at the default size).
    @param reactor: the reactor (L{pfxpold_command}).
    """
    table = write_access_map(os.path.join(directory, "senders.map"), Population())
    config = os.path.join(directory, "pfxpold.toml")
    settings = dict(LOG_SETTINGS[log])
    if capture:
        settings["capture"] = "capture.jsonl"
    with open(config, "w") as f:
        f.write(server_table(**settings))
        f.write(MAP_CHECK)
        if metrics:
            f.write(f'\n[metrics]\nlisten = "tcp:{free_port()}:interface=127.0.0.1"\n')
    command = pfxpold_command(config, tls, DESTINATIONS.get(log, "file"), reactor)
    return command, map_expectation(table)


#: Auxiliary servers (the DNS list) started by scenario set-ups, stopped at the end.
HELPERS: list[subprocess.Popen] = []


def _index(value: str, prefix: str) -> int:
    """
    The number in C{prefix<number>...}: which sender or client a request has.
    """
    digits = value[len(prefix) :].split("@")[0].split(".")[0]
    return int(digits)


def start_redis(directory: str) -> int:
    """
    Start a private redis-server on a free loopback port for a scenario.

    @return: its port.
    """
    port = free_port()
    redis = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
        ],
        stdout=subprocess.DEVNULL,
    )
    HELPERS.append(redis)
    wait_for_port(port, redis)
    return port


def setup_chain(
    directory: str,
    requests: list[dict],
    quota: bool = True,
    log: str = "file",
    store: str = "sqlite",
):
    """
    The realistic chain: the 100k access map on the sender, then an SQL
    table of client addresses (SQLite, cached), a DNS list of clients
    (cached; a DNS server this set-up starts), and a recipient quota in the
    SQLite store that no sender reaches (so every request writes it).

    Every check's on_error answer names it, so that a check failing under
    load (which would fail open or closed in production) shows as a wrong
    answer saying which.
    """
    import sqlite3

    population = Population()
    table = write_access_map(os.path.join(directory, "senders.map"), population)
    database = sqlite3.connect(os.path.join(directory, "clients.sqlite"))
    database.execute("CREATE TABLE client_acl (client TEXT PRIMARY KEY, action TEXT)")
    database.executemany(
        "INSERT INTO client_acl VALUES (?, ?)",
        [
            (client_of(index)[0], f"REJECT client {index} blocked")
            for index in range(0, population.clients, 5)
        ],
    )
    database.commit()
    database.close()
    listed = os.path.join(directory, "listed.txt")
    with open(listed, "w") as f:
        for index in range(0, population.clients, 7):
            f.write(client_of(index)[0] + "\n")
    dns_port = free_port()
    dns = subprocess.Popen(
        [sys.executable, os.path.join(BENCH, "dns_server.py"), str(dns_port), listed],
        stdout=subprocess.DEVNULL,
    )
    HELPERS.append(dns)
    wait_for_port(dns_port, dns)
    config = os.path.join(directory, "pfxpold.toml")
    with open(config, "w") as f:
        f.write(server_table(default_action="DUNNO", **LOG_SETTINGS[log]))
        f.write(MAP_CHECK)
        f.write(
            f"""
[[check]]
name = "clients"
type = "sql"
driver = "sqlite"
database = "clients.sqlite"
query = "SELECT action FROM client_acl WHERE client = :client_address"
cache_size = 10000
cache_positive_ttl = 3600.0
cache_negative_ttl = 3600.0
on_error = "DEFER_IF_PERMIT clients check failed"

[[check]]
name = "dnsbl"
type = "dnsbl"
resolvers = ["127.0.0.1:{dns_port}"]
action = "554 5.7.1 Client listed"
on_error = "DEFER_IF_PERMIT dnsbl check failed"

[[check.lists]]
zone = "bl.bench.test"
"""
        )
        if quota:
            if store == "memory":
                f.write('\n[stores.default]\ntype = "memory"\n')
            elif store == "redis":
                redis_port = start_redis(directory)
                f.write(
                    f'\n[stores.default]\ntype = "redis"\n'
                    f'endpoint = "tcp:host=127.0.0.1:port={redis_port}"\n'
                )
            f.write(
                """
[[check]]
name = "quota"
type = "quota"
key = ["sender"]
unit = "recipients"
stage = "RCPT"
limits = [{ period = "day", max = 1000000000 }]
on_error = "DEFER_IF_PERMIT quota check failed"
"""
            )

    def expect(request: dict) -> list[str]:
        action = table.get(request["sender"].lower(), "DUNNO")
        if action != "DUNNO":
            return [action]
        client = _index(request["client_name"], "mx")
        if client % 5 == 0:
            return [f"REJECT client {client} blocked"]
        if client % 7 == 0:
            return ["554 5.7.1 Client listed"]
        return ["DUNNO"]

    return pfxpold_command(config), expect


#: The delay of each of the C{slow3} scenarios' three lookups.
SLOW_LOOKUP_MS = 5.0


def setup_slow3(directory: str, requests: list[dict], parallel: bool = False):
    """
    Three C{http} lookups in a chain, each answering DUNNO after
    L{SLOW_LOOKUP_MS} from a slow web service this set-up starts
    (bench/slow_http_server.py): a request takes the sum of the three
    without C{[server] parallel}, about the slowest one with it.
    """
    port = free_port()
    web = subprocess.Popen(
        [
            sys.executable,
            os.path.join(BENCH, "slow_http_server.py"),
            str(port),
            str(SLOW_LOOKUP_MS),
        ],
        stdout=subprocess.DEVNULL,
    )
    HELPERS.append(web)
    wait_for_port(port, web)
    config = os.path.join(directory, "pfxpold.toml")
    with open(config, "w") as f:
        f.write(server_table(default_action="DUNNO", parallel=parallel, **LOG_SETTINGS["file"]))
        for number in range(1, 4):
            f.write(
                f"""
[[check]]
name = "lookup{number}"
type = "http"
url = "http://127.0.0.1:{port}/lookup{number}"
mode = "form"
attributes = ["client_address", "sender"]
action_field = ""
max_requests = 256
on_error = "DEFER_IF_PERMIT lookup{number} failed"
"""
            )
    return pfxpold_command(config), lambda request: ["DUNNO"]


def setup_rules(directory: str, requests: list[dict], log: str = "file"):
    """
    A C{rules} check of 1,000 rules (bench/rules_bench.py), most filed in
    its index, some regular expressions that every request runs.
    """
    import rules_bench

    population = Population()
    rules = rules_bench.build_rules(
        population.senders, population.sender_domains, population.clients, population.recipients
    )
    config = os.path.join(directory, "pfxpold.toml")
    with open(config, "w") as f:
        f.write(server_table(default_action="DUNNO", **LOG_SETTINGS[log]))
    rules_bench.write_rules(config, rules)
    return pfxpold_command(config), rules_bench.expectation(rules)


SCENARIOS = [
    Scenario(
        "trivial-c",
        "C epoll server answering DUNNO: the load generator's ceiling",
        setup_trivial,
        runs_pfxpold=False,
        python=False,
    ),
    Scenario(
        "reference",
        "bare Twisted LineReceiver answering DUNNO",
        setup_reference,
        runs_pfxpold=False,
    ),
    Scenario("demo", "pfxpold, demo check", _demo("file")),
    Scenario("map-100k", "pfxpold, access map of 100,000 entries", setup_map, needs=("file",)),
    Scenario(
        "map-100k-twistdlog",
        "the same, request log in twistd's log (the default) instead of its own file",
        lambda directory, requests: setup_map(directory, requests, log="twistd"),
        needs=("file",),
    ),
    Scenario(
        "map-100k-stdout",
        "the same, request log in twistd's log on standard output (-n under a supervisor)",
        lambda directory, requests: setup_map(directory, requests, log="stdout"),
        needs=("file",),
    ),
    Scenario(
        "map-100k-syslog",
        "the same, request log in syslog's mail facility (--logger pfxpold.logger.mail_syslog)",
        lambda directory, requests: setup_map(directory, requests, log="syslog"),
        needs=("file",),
    ),
    Scenario(
        "chain",
        "pfxpold, map + SQL (cache) + DNSBL (cache) + quota (SQLite)",
        setup_chain,
        needs=("file", "sql", "dnsbl", "quota"),
    ),
    Scenario(
        "rules-1000",
        "pfxpold, a rules check of 1,000 rules (index, 10 regexes)",
        setup_rules,
        needs=("rules",),
    ),
    # Optional scenarios: name them with --scenarios.
    Scenario(
        "slow3",
        f"pfxpold, three http lookups of {SLOW_LOOKUP_MS:g} ms each, one after another",
        setup_slow3,
        needs=("http",),
        optional=True,
    ),
    Scenario(
        "slow3-parallel",
        "the same three lookups with [server] parallel = true",
        lambda directory, requests: setup_slow3(directory, requests, parallel=True),
        needs=("http",),
        optional=True,
    ),
    Scenario(
        "rules-1000-nolog",
        "pfxpold, a rules check of 1,000 rules, log_requests = false",
        lambda directory, requests: setup_rules(directory, requests, log="off"),
        needs=("rules",),
        optional=True,
    ),
    Scenario(
        "map-100k-nolog",
        "pfxpold, access map of 100,000 entries, log_requests = false",
        lambda directory, requests: setup_map(directory, requests, log="off"),
        needs=("file",),
        optional=True,
    ),
    Scenario(
        "map-100k-metrics",
        "map-100k with [metrics] on (Prometheus counters; needs prometheus_client)",
        lambda directory, requests: setup_map(directory, requests, metrics=True),
        needs=("file",),
        optional=True,
    ),
    Scenario(
        "map-100k-capture",
        "map-100k with [server] capture on (every request written for pfxpold-replay)",
        lambda directory, requests: setup_map(directory, requests, capture=True),
        needs=("file",),
        optional=True,
    ),
    Scenario(
        "map-100k-notls",
        "map-100k as installed without the http extra: no pyOpenSSL, so no TLS stack in Twisted",
        lambda directory, requests: setup_map(directory, requests, tls=False),
        needs=("file",),
        optional=True,
    ),
    Scenario(
        "map-100k-asyncio",
        "map-100k-twistdlog on Twisted's asyncio reactor (twistd --reactor=asyncio)",
        lambda directory, requests: setup_map(directory, requests, log="twistd", reactor="asyncio"),
        needs=("file",),
        optional=True,
    ),
    Scenario(
        "map-100k-uvloop",
        "map-100k-twistdlog on Twisted's asyncio reactor over uvloop's event loop",
        lambda directory, requests: setup_map(directory, requests, log="twistd", reactor="uvloop"),
        needs=("file",),
        optional=True,
    ),
    Scenario(
        "map-100k-nolog-uvloop",
        "map-100k-nolog on Twisted's asyncio reactor over uvloop's event loop",
        lambda directory, requests: setup_map(directory, requests, log="off", reactor="uvloop"),
        needs=("file",),
        optional=True,
    ),
    Scenario(
        "reference-asyncio",
        "bare asyncio server (asyncio.Protocol) answering DUNNO",
        setup_reference_asyncio,
        runs_pfxpold=False,
        optional=True,
    ),
    Scenario(
        "reference-asyncio-uvloop",
        "the same bare asyncio server on uvloop's event loop",
        lambda directory, requests: setup_reference_asyncio(directory, requests, uvloop=True),
        runs_pfxpold=False,
        optional=True,
    ),
    Scenario(
        "reference-protocol",
        "bare Twisted Protocol answering DUNNO, parsing as reference-asyncio does",
        lambda directory, requests: setup_reference(directory, requests, served="--count"),
        runs_pfxpold=False,
        optional=True,
    ),
    Scenario(
        "reference-protocol-direct",
        "reference-protocol sending each answer at once with the socket's send, as asyncio does",
        lambda directory, requests: setup_reference(directory, requests, served="--direct"),
        runs_pfxpold=False,
        optional=True,
    ),
    Scenario(
        "reference-twisted-asyncio",
        "the bare LineReceiver on Twisted's asyncio reactor",
        lambda directory, requests: setup_reference(directory, requests, reactor="asyncio"),
        runs_pfxpold=False,
        optional=True,
    ),
    Scenario(
        "reference-twisted-uvloop",
        "the bare LineReceiver on Twisted's asyncio reactor over uvloop's event loop",
        lambda directory, requests: setup_reference(directory, requests, reactor="uvloop"),
        runs_pfxpold=False,
        optional=True,
    ),
    Scenario(
        "chain-twistdlog",
        "the realistic chain, request log in twistd's log",
        lambda directory, requests: setup_chain(directory, requests, log="twistd"),
        needs=("file", "sql", "dnsbl", "quota"),
        optional=True,
    ),
    Scenario(
        "chain-nolog",
        "the realistic chain, log_requests = false",
        lambda directory, requests: setup_chain(directory, requests, log="off"),
        needs=("file", "sql", "dnsbl", "quota"),
        optional=True,
    ),
    Scenario(
        "chain-redis",
        "the realistic chain, its quota in Redis (a redis-server this set-up starts)",
        lambda directory, requests: setup_chain(directory, requests, store="redis"),
        needs=("file", "sql", "dnsbl", "quota"),
        optional=True,
    ),
    Scenario(
        "chain-memory",
        "the realistic chain, its quota in memory",
        lambda directory, requests: setup_chain(directory, requests, store="memory"),
        needs=("file", "sql", "dnsbl", "quota"),
        optional=True,
    ),
    Scenario(
        "chain-noquota",
        "the realistic chain without the quota check",
        lambda directory, requests: setup_chain(directory, requests, quota=False),
        needs=("file", "sql", "dnsbl"),
        optional=True,
    ),
    Scenario(
        "demo-twistdlog",
        "pfxpold, demo check, request log in twistd's log",
        _demo("twistd"),
        optional=True,
    ),
    Scenario(
        "demo-stdout",
        "pfxpold, demo check, request log in twistd's log on standard output",
        _demo("stdout"),
        optional=True,
    ),
    Scenario(
        "demo-syslog",
        "pfxpold, demo check, request log in syslog's mail facility",
        _demo("syslog"),
        optional=True,
    ),
    Scenario(
        "demo-nolog", "pfxpold, demo check, log_requests = false", _demo("off"), optional=True
    ),
    Scenario("noop", "pfxpold, synchronous no-op check", _noop("file"), optional=True),
    Scenario(
        "noop-nolog", "pfxpold, synchronous no-op check, log off", _noop("off"), optional=True
    ),
    Scenario(
        "later-nolog",
        "pfxpold, a check answering on the reactor's next turn, log off",
        _noop("off", "LaterNoopCheck"),
        optional=True,
    ),
    Scenario(
        "async-nolog",
        "pfxpold, async def no-op check (a warm cache), log off",
        _noop("off", "AsyncNoopCheck"),
        optional=True,
    ),
]


def missing_checks(scenario: Scenario) -> list[str]:
    """
    The check types a scenario needs that this checkout does not have.
    """
    return [
        name
        for name in scenario.needs
        if importlib.util.find_spec(f"pfxpold.checks.{name}") is None
    ]


# Running servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    """
    The PIDs of C{pid}'s child processes.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def descendants_of(pid: int) -> list[int]:
    """
    The PIDs of C{pid}'s children, their children, and so on.
    """
    found = []
    waiting = [pid]
    while waiting:
        for child in children_of(waiting.pop()):
            found.append(child)
            waiting.append(child)
    return found


def memory_kb(pids: list[int], field_name: str) -> int:
    """
    The sum of one /proc/PID/status field (VmRSS, VmHWM) over C{pids}, in kB.
    """
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field_name + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


@dataclass
class Server:
    scenario: Scenario
    directory: str
    port: int
    records: str
    process: subprocess.Popen
    pids: list[int] = field(default_factory=list)

    def stop(self) -> None:
        """
        SIGTERM the server (pfxpold stops its workers itself), then SIGKILL
        after 20 s; report any worker left behind.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.pids[1:]:
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            if os.path.exists(f"/proc/{pid}"):
                print(f"WARNING: {self.scenario.name}: worker {pid} outlived its parent")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def start_server(scenario: Scenario, root: str, requests: list[dict]) -> Server:
    directory = os.path.join(root, scenario.name)
    os.makedirs(directory)
    command, expect = scenario.setup(directory, requests)
    port = free_port()
    for path in os.listdir(directory):
        if path.endswith(".toml"):
            full = os.path.join(directory, path)
            with open(full) as f:
                text = f.read().replace("PORT", str(port))
            with open(full, "w") as f:
                f.write(text)
    command = [str(port) if part == "PORT" else part for part in command]
    if scenario.workers > 1:
        command += ["--workers", str(scenario.workers)]
    records = os.path.join(directory, "records.txt")
    write_records(records, requests, expect)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([scenario.repository, BENCH, env.get("PYTHONPATH", "")])
    output = open(os.path.join(directory, "output.txt"), "w")
    process = subprocess.Popen(
        command, cwd=directory, env=env, stdout=output, stderr=subprocess.STDOUT
    )
    output.close()
    try:
        wait_for_port(port, process)
    except RuntimeError as e:
        log = _read(os.path.join(directory, "output.txt")) + _read(
            os.path.join(directory, "pfxpold.log")
        )
        raise RuntimeError(f"{scenario.name}: {e}\n{log[-3000:]}") from None
    pids = [process.pid]
    if scenario.workers > 1:
        deadline = time.monotonic() + 30
        while len(children_of(process.pid)) < scenario.workers - 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{scenario.name}: workers did not start")
            time.sleep(0.1)
        pids += children_of(process.pid)
        # Each worker logs its start-up line once it serves: in its own log
        # file, through the parent's standard output, or in syslog.
        logs = [
            os.path.join(directory, name) for name in ("pfxpold.log", "output.txt", "syslog.txt")
        ] + [
            os.path.join(directory, f"pfxpold.worker{number}.log")
            for number in range(1, scenario.workers)
        ]
        while sum(_read(log).count("pfxpold serving on") for log in logs) < scenario.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{scenario.name}: workers did not start serving")
            time.sleep(0.1)
    # Every process serving the scenario counts, the capture's writer
    # processes too (each pfxpold process forks one).
    pids = [process.pid] + descendants_of(process.pid)
    return Server(scenario, directory, port, records, process, pids)


def loadgen_command(
    loadgen: str,
    server: Server,
    connections: int,
    duration: float,
    warmup: float,
    threads: int,
) -> list[str]:
    """
    The load generator's command line against C{server}.
    """
    return [
        loadgen,
        "-p",
        str(server.port),
        "-f",
        server.records,
        "-c",
        str(connections),
        "-d",
        str(duration),
        "-w",
        str(warmup),
        "-t",
        str(threads),
    ]


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """
    The user and system CPU time of C{pids} so far, in clock ticks.
    """
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def run_loadgen(
    loadgen: str,
    server: Server,
    connections: int,
    duration: float,
    warmup: float,
    threads: int,
) -> dict:
    """
    Run the load generator against C{server}.

    @return: its figures (see bench/loadgen.c), and C{daemon_system_share}:
        the share of the daemon's CPU time spent in the kernel (system
        time) over the whole run, warm-up included.
    """
    command = loadgen_command(loadgen, server, connections, duration, warmup, threads)
    for pid in server.pids:
        command += ["-P", str(pid)]
    before = cpu_ticks(server.pids)
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    after = cpu_ticks(server.pids)
    figures = json.loads(result.stdout)
    user, system = after[0] - before[0], after[1] - before[1]
    figures["daemon_system_share"] = system / (user + system) if user + system else 0.0
    return figures


# Profiling


#: Twisted frames worth showing beside pfxpold's own: reading, writing and
#: the request log's observer.
_TWISTED_FRAMES = (
    "Connection.doRead",
    "FileDescriptor.doWrite",
    "Logger.emit",
    "FileLogObserver.__call__",
    "formatTime",
    "Deferred._runCallbacks",
)


#: The groups of L{profile_groups}, in the order they are shown.
PROFILE_GROUPS = (
    "kernel: send (the answer, and loopback delivery to the client)",
    "kernel: recv",
    "kernel: epoll_ctl (Twisted starts and stops watching for writability)",
    "kernel: epoll_wait",
    "Twisted: reactor and transport (Python)",
    "Twisted: LineReceiver (line splitting)",
    "Twisted: Deferreds and timers",
    "Twisted: logging (events, observers)",
    "asyncio / uvloop event loop (Python)",
    "server: protocol (parse, request, answer)",
    "pfxpold: chain",
    "pfxpold: checks (map lookup, caches, quota logic)",
    "pfxpold: SQLite",
    "pfxpold: request line (formatting, record)",
    "pfxpold: request lines (batch, write, flush)",
    "kernel: every system call (made from C, unseen by py-spy)",
    "other",
)

#: pfxpold's modules, from a frame's path, and their group (the first
#: prefix that matches).
_PFXPOLD_GROUPS = (
    ("pfxpold/requestlog.py:request_line", PROFILE_GROUPS[13]),
    ("pfxpold/requestlog.py:RequestLines.record", PROFILE_GROUPS[13]),
    ("pfxpold/request.py:PolicyRequest.summary", PROFILE_GROUPS[13]),
    ("pfxpold/escape.py", PROFILE_GROUPS[13]),
    ("pfxpold/requestlog.py", PROFILE_GROUPS[14]),
    ("pfxpold/logger.py", PROFILE_GROUPS[14]),
    ("pfxpold/appendfile.py", PROFILE_GROUPS[14]),
    ("pfxpold/state/sqlite.py", PROFILE_GROUPS[12]),
    ("pfxpold/checks/", PROFILE_GROUPS[11]),
    ("pfxpold/state/", PROFILE_GROUPS[11]),
    ("pfxpold/sql/", PROFILE_GROUPS[11]),
    ("pfxpold/rules/", PROFILE_GROUPS[11]),
    ("pfxpold/accessmap.py", PROFILE_GROUPS[11]),
    ("pfxpold/cache.py", PROFILE_GROUPS[11]),
    ("pfxpold/resolver.py", PROFILE_GROUPS[11]),
    ("pfxpold/chain.py", PROFILE_GROUPS[10]),
    ("pfxpold/stages.py", PROFILE_GROUPS[10]),
    ("pfxpold/action.py", PROFILE_GROUPS[10]),
    ("pfxpold/", PROFILE_GROUPS[9]),
    ("reference_server.py", PROFILE_GROUPS[9]),
    ("reference_asyncio.py", PROFILE_GROUPS[9]),
    ("noop_check.py", PROFILE_GROUPS[11]),
    ("twisted/protocols/basic.py", PROFILE_GROUPS[5]),
    ("twisted/internet/defer.py", PROFILE_GROUPS[6]),
    ("twisted/internet/base.py:DelayedCall", PROFILE_GROUPS[6]),
    ("twisted/logger/", PROFILE_GROUPS[7]),
    ("twisted/python/logfile.py", PROFILE_GROUPS[7]),
    ("twisted/", PROFILE_GROUPS[4]),
    ("asyncio/", PROFILE_GROUPS[8]),
    ("uvloop/", PROFILE_GROUPS[8]),
)


def _source_line(path: str, number: int) -> str:
    """
    The text of line C{number} of a frame's file as py-spy names it
    (C{twisted/internet/tcp.py}, relative to C{sys.path}), or C{""}.
    """
    import linecache

    candidates = (
        [path] if os.path.isabs(path) else [os.path.join(entry, path) for entry in sys.path]
    )
    candidates.append(os.path.join(BENCH, path))
    for candidate in candidates:
        text = linecache.getline(candidate, number)
        if text:
            return text
    return ""


def profile_group(frames: list[tuple[str, str, int]]) -> str:
    """
    The group of L{PROFILE_GROUPS} a sampled stack belongs to.

    A stack whose innermost Python line makes a socket or epoll system
    call is the kernel's (py-spy samples a thread in a system call as on
    that line: C{recv}, C{send} through C{untilConcludes}, the poller's
    C{poll} and C{modify}). Otherwise the innermost frame of a known module
    decides: pfxpold's modules by what they do, a Deferred or a timer by
    Twisted's, whoever called it.

    @param frames: C{(function, path, line)} from the outermost to the
        innermost.
    """
    function, path, line = frames[-1]
    text = _source_line(path, line)
    if function == "untilConcludes" and len(frames) > 1:
        text = _source_line(frames[-2][1], frames[-2][2])
    if ".recv(" in text or ".recv_into(" in text:
        return PROFILE_GROUPS[1]
    if ".send(" in text or ".send," in text or ".sendmsg" in text:
        return PROFILE_GROUPS[0]
    if "_poller.poll(" in text:
        return PROFILE_GROUPS[3]
    if "_poller.modify(" in text or "_poller.register(" in text or "_poller.unregister(" in text:
        return PROFILE_GROUPS[2]
    for function, path, _line in reversed(frames):
        where = f"{path}:{function}"
        for prefix, group in _PFXPOLD_GROUPS:
            if where.startswith(prefix) or ("/" + prefix) in where:
                return group
    return PROFILE_GROUPS[-1]


def _frame(text: str) -> tuple[str, str, int]:
    function, _, where = text.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return function, path, int(line) if line.isdigit() else 0


def profile_groups(path: str, cpu_us: float = 0.0, system_share: float = 0.0) -> str:
    """
    A Markdown table of where a server's CPU time per request goes, from
    the samples of a py-spy raw file grouped by L{profile_group}.

    py-spy samples a thread whenever it may run, so a thread that waits
    for a core (the machine's other work, or the client a C{send} on
    loopback just woke) counts where it waits, mostly in its system calls.
    So, with C{system_share} (the kernel's share of the daemon's CPU time,
    from C{/proc}), the kernel's time is split between the system calls by
    their samples, and the rest, the time in Python, between the other
    groups by theirs; without it, by the samples alone.

    @param cpu_us: the scenario's daemon CPU per request, to show each
        group in microseconds per request.
    """
    counts: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [_frame(frame) for frame in stack.split(";") if " (" in frame]
            if frames:
                group = profile_group(frames)
                counts[group] = counts.get(group, 0) + int(count)
    total = sum(counts.values())
    if not total:
        return "(no samples)"
    kernel = sum(count for group, count in counts.items() if group.startswith("kernel"))
    shares = {}
    for group, count in counts.items():
        if not system_share:
            shares[group] = count / total
        elif group.startswith("kernel"):
            shares[group] = system_share * count / kernel
        else:
            shares[group] = (1 - system_share) * count / (total - kernel)
    if system_share and not kernel:
        # The system calls are made from C (uvloop): py-spy sees none.
        shares[PROFILE_GROUPS[-2]] = system_share
    lines = ["| where | share of CPU | µs/request |", "| --- | ---: | ---: |"]
    for group in PROFILE_GROUPS:
        if group in shares:
            micro = f"{shares[group] * cpu_us:.1f}" if cpu_us else "-"
            lines.append(f"| {group} | {100 * shares[group]:.1f} % | {micro} |")
    if cpu_us:
        lines.append(
            f"| all (daemon CPU per request, median of the turns; kernel"
            f" {100 * system_share:.0f} %) | 100 % | {cpu_us:.1f} |"
        )
    return "\n".join(lines)


def summarize_profile(path: str, top: int = 30) -> str:
    """
    Where the samples in a py-spy raw (collapsed stacks) file went: the
    inclusive share of pfxpold's functions (and a few of Twisted's), and
    the functions with the largest own share.
    """
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0

    def name(frame: str) -> tuple[str, bool]:
        function, _, where = frame.partition(" (")
        path = where.split(":")[0]
        ours = "pfxpold/" in path or function in _TWISTED_FRAMES
        return f"{function} ({os.path.basename(path)})" if where else function, ours

    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            samples = int(count)
            total += samples
            frames = [name(frame) for frame in stack.split(";")]
            for frame, ours in set(frames):
                if ours:
                    inclusive[frame] = inclusive.get(frame, 0) + samples
            own[frames[-1][0]] = own.get(frames[-1][0], 0) + samples
    if not total:
        return "(no samples)"
    lines = [
        f"{total} samples (all threads)",
        "",
        "| inclusive | function |",
        "| ---: | --- |",
    ]
    for frame, samples in sorted(inclusive.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"| {100 * samples / total:.1f} % | `{frame}` |")
    lines += ["", "| own | function |", "| ---: | --- |"]
    for frame, samples in sorted(own.items(), key=lambda item: -item[1])[:15]:
        lines.append(f"| {100 * samples / total:.1f} % | `{frame}` |")
    return "\n".join(lines)


def profile(
    loadgen: str,
    server: Server,
    connections: int,
    seconds: float,
    output: str,
    threads: int,
    cpu_us: float = 0.0,
    system_share: float = 0.0,
) -> Optional[str]:
    """
    Sample the server's parent process with py-spy while the load generator
    drives it, and summarize where the time went.

    @return: the Markdown summary, or L{None} without py-spy.
    """
    # In the virtualenv that runs the benchmark, even when not activated.
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if py_spy is None:
        print("py-spy is not installed (pip install py-spy): no profile")
        return None
    command = loadgen_command(loadgen, server, connections, seconds + 2, 0.5, threads)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        raw = os.path.join(output, f"profile-{server.scenario.name}.txt")
        subprocess.run(
            [
                py_spy,
                "record",
                "-p",
                str(server.pids[0]),
                "-d",
                str(int(seconds)),
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                raw,
            ],
            check=True,
            capture_output=True,
        )
    finally:
        driver.wait()
    return profile_groups(raw, cpu_us, system_share) + "\n\n" + summarize_profile(raw)


# Reporting


def median_cpu(results: list[dict], scenario: str, connections: int) -> tuple[float, float]:
    """
    The median daemon CPU per request of a scenario's turns at
    C{connections}, and the median share of it spent in the kernel
    (C{(0.0, 0.0)} without a turn).
    """
    turns = [r for r in results if r["scenario"] == scenario and r["connections"] == connections]
    if not turns:
        return 0.0, 0.0
    cpu = sorted(r["daemon_cpu_us_per_request"] for r in turns)
    system = sorted(r.get("daemon_system_share", 0.0) for r in turns)
    return cpu[len(cpu) // 2], system[len(system) // 2]


def errors_of(result: dict) -> int:
    return sum(result[key] for key in ("malformed", "closed", "connect_errors", "timeouts"))


def markdown_table(results: list[dict], scenarios: list[Scenario]) -> str:
    reference = {r["connections"]: r["rps"] for r in results if r["scenario"] == "reference"}
    lines = [
        "| scenario | C | req/s | % of reference | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms"
        " | errors | wrong | idle conns | daemon CPU µs/req | peak RSS MB | loadgen CPU µs/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {scenario.name: index for index, scenario in enumerate(scenarios)}
    for r in sorted(results, key=lambda r: (order[r["scenario"]], r["connections"])):
        ref = reference.get(r["connections"])
        share = f"{100 * r['rps'] / ref:.0f} %" if ref else "-"
        lines.append(
            f"| {r['scenario']} | {r['connections']} | {r['rps']:,.0f} | {share}"
            f" | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f}"
            f" | {r['max_ms']:.1f} | {errors_of(r)} | {r['wrong']} | {r['starved_connections']}"
            f" | {r['daemon_cpu_us_per_request']:.1f} | {r['peak_rss_kb'] / 1024:.1f}"
            f" | {r['loadgen_cpu_us_per_request']:.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> bool:
    """
    Throughput and p99 against concurrency, one line per scenario.

    @return: whether the plot was written (matplotlib may be missing:
        C{pip install .[bench]}).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib in this virtualenv): no plot")
        return False
    figure, (throughput, p99) = plt.subplots(1, 2, figsize=(12, 5))
    names = list(dict.fromkeys(r["scenario"] for r in results))
    for name in names:
        points = sorted(
            (r for r in results if r["scenario"] == name), key=lambda r: r["connections"]
        )
        x = [r["connections"] for r in points]
        throughput.plot(x, [r["rps"] for r in points], marker="o", label=name)
        p99.plot(x, [max(r["p99_ms"], 0.001) for r in points], marker="o", label=name)
    for axes, title, unit in ((throughput, "throughput", "requests/s"), (p99, "p99 latency", "ms")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent connections (C)")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    p99.set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


# Main


def raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


@contextlib.contextmanager
def servers(scenarios: list[Scenario], root: str, requests: list[dict]) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        for scenario in scenarios:
            started.append(start_server(scenario, root, requests))
            print(f"started {scenario.name} on port {started[-1].port} (pids {started[-1].pids})")
        yield started
    finally:
        for server in started:
            server.stop()
        for helper in HELPERS:
            helper.terminate()
            helper.wait()
        HELPERS.clear()


def pick_scenarios(
    names: Optional[list[str]], baseline: Optional[str] = None, workers: int = 1
) -> list[Scenario]:
    by_name = {scenario.name: scenario for scenario in SCENARIOS}
    if names:
        unknown = [name for name in names if name not in by_name]
        if unknown:
            sys.exit(f"unknown scenarios: {', '.join(unknown)}; known: {', '.join(by_name)}")
        chosen = [by_name[name] for name in names]
    else:
        chosen = [scenario for scenario in SCENARIOS if not scenario.optional]
    runnable = []
    for scenario in chosen:
        missing = missing_checks(scenario)
        if missing:
            print(
                f"SKIPPED scenario {scenario.name}: check type(s) {', '.join(missing)}"
                " not in this checkout (pfxpold/checks/); merge them to measure it"
            )
        else:
            runnable.append(scenario)
    if workers > 1:
        # The same pfxpold scenarios with worker processes, beside the
        # single-process ones: the multi-core speed-up from one run.
        for scenario in list(runnable):
            if scenario.runs_pfxpold:
                runnable.append(
                    dataclasses.replace(
                        scenario,
                        name=f"{scenario.name}-{workers}w",
                        description=f"{scenario.description}, --workers {workers}",
                        workers=workers,
                    )
                )
    if baseline:
        # The same pfxpold scenarios from another checkout, measured in the
        # same run: before/after figures from one machine state.
        for scenario in list(runnable):
            lacking = [
                name
                for name in scenario.needs
                if not os.path.exists(os.path.join(baseline, "pfxpold", "checks", f"{name}.py"))
            ]
            if scenario.workers > 1:
                continue  # a checkout without this branch has no --workers
            if scenario.name.endswith("-syslog") and "PFXPOLD_SYSLOG_SOCKET" not in _read(
                os.path.join(baseline, "pfxpold", "logger.py")
            ):
                # Its observer would write to the machine's /dev/log.
                print(
                    f"SKIPPED scenario {scenario.name}@baseline: {baseline}'s syslog observer"
                    " cannot be pointed at the benchmark's private socket"
                )
                continue
            if scenario.runs_pfxpold and lacking:
                print(
                    f"SKIPPED scenario {scenario.name}@baseline: check type(s)"
                    f" {', '.join(lacking)} not in {baseline}"
                )
            elif scenario.runs_pfxpold:
                runnable.append(
                    dataclasses.replace(
                        scenario,
                        name=f"{scenario.name}@baseline",
                        description=f"{scenario.description}, from {baseline}",
                        repository=os.path.abspath(baseline),
                    )
                )
    return runnable


def sample_memory(server: Server, stop: threading.Event, interval: float, samples: list) -> None:
    started = time.monotonic()
    while not stop.wait(interval):
        samples.append((time.monotonic() - started, memory_kb(server.pids, "VmRSS")))


def soak(args: argparse.Namespace, loadgen: str, scenarios: list[Scenario], root: str) -> int:
    requests = make_requests(args.records)
    failed = 0
    with servers(scenarios, root, requests) as started:
        for server in started:
            samples: list[tuple[float, int]] = [(0.0, memory_kb(server.pids, "VmRSS"))]
            stop = threading.Event()
            interval = max(1.0, args.soak / 20)
            sampler = threading.Thread(
                target=sample_memory, args=(server, stop, interval, samples), daemon=True
            )
            sampler.start()
            result = run_loadgen(
                loadgen, server, args.soak_connections, args.soak, 2.0, args.loadgen_threads
            )
            stop.set()
            sampler.join()
            errors = errors_of(result) + result["wrong"]
            print(
                f"\n## Soak: {server.scenario.name}, {args.soak_connections} connections, {args.soak:g} s\n"
            )
            print(
                f"{result['requests']:,} requests, {result['rps']:,.0f}/s, p99 {result['p99_ms']:.2f} ms,"
                f" max {result['max_ms']:.1f} ms, errors {errors_of(result)}, wrong {result['wrong']},"
                f" connections never answered {result['starved_connections']}"
            )
            print("\n| t (s) | RSS MB |\n| ---: | ---: |")
            for elapsed, kb in samples:
                print(f"| {elapsed:.0f} | {kb / 1024:.1f} |")
            later = [kb for elapsed, kb in samples if elapsed >= args.soak / 4]
            if later:
                growth = (max(later) - min(later)) / 1024
                print(f"\nRSS after the first quarter varies by {growth:.1f} MB (min to max)")
            if errors or result["starved_connections"]:
                failed = 1
    return failed


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        metavar="NAME",
        help="scenarios to run: " + ", ".join(s.name for s in SCENARIOS),
    )
    parser.add_argument("--connections", "-c", type=int, nargs="+", default=[1, 32, 128, 512])
    parser.add_argument(
        "--duration", "-d", type=float, default=5.0, help="measured seconds per point"
    )
    parser.add_argument(
        "--warmup", "-w", type=float, default=1.0, help="unmeasured seconds before each point"
    )
    parser.add_argument("--quick", action="store_true", help="C = 32 and 128 only, 2 s each")
    parser.add_argument("--records", type=int, default=20000, help="distinct requests")
    parser.add_argument("--loadgen-threads", type=int, default=1)
    parser.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help="hold --soak-connections for this long instead",
    )
    parser.add_argument("--soak-connections", type=int, default=1000)
    parser.add_argument(
        "--output", default=os.path.join(BENCH, "results"), help="where the table, JSON and plot go"
    )
    parser.add_argument(
        "--profile",
        type=float,
        metavar="SECONDS",
        help="after measuring, sample each Python server at C=128 with py-spy for this long",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="also run every pfxpold scenario with twistd pfxpold --workers N",
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the pfxpold scenarios from this other checkout (e.g. git archive main)",
    )
    parser.add_argument("--cc", default=os.environ.get("CC", "cc"), help="C compiler")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections = [32, 128]
        args.duration = 2.0
        args.warmup = 0.5
    raise_file_limit(max(args.connections + [args.soak_connections]) * 2 + 256)
    loadgen = build("loadgen", args.cc)
    build("trivial_server", args.cc)
    scenarios = pick_scenarios(args.scenarios, args.baseline, args.workers)
    root = tempfile.mkdtemp(prefix="pfxpold-bench-")
    try:
        if args.soak:
            if not args.scenarios:
                scenarios = [s for s in scenarios if s.name in ("map-100k",)] or [
                    s for s in scenarios if s.name == "demo"
                ]
            return soak(args, loadgen, scenarios, root)
        requests = make_requests(args.records)
        results = []
        with servers(scenarios, root, requests) as started:
            for connections in args.connections:
                for server in started:
                    result = run_loadgen(
                        loadgen,
                        server,
                        connections,
                        args.duration,
                        args.warmup,
                        args.loadgen_threads,
                    )
                    result["scenario"] = server.scenario.name
                    result["peak_rss_kb"] = memory_kb(server.pids, "VmHWM")
                    results.append(result)
                    print(
                        f"{server.scenario.name:>12} C={connections:<4} {result['rps']:>9,.0f} req/s"
                        f"  p99 {result['p99_ms']:7.2f} ms  errors {errors_of(result)}"
                        f"  wrong {result['wrong']}"
                        + (f"  ({result['first_wrong']})" if result["first_wrong"] else "")
                    )
            profiles = {}
            if args.profile:
                os.makedirs(args.output, exist_ok=True)
                for server in started:
                    if server.scenario.python:
                        summary = profile(
                            loadgen,
                            server,
                            128,
                            args.profile,
                            args.output,
                            args.loadgen_threads,
                            *median_cpu(results, server.scenario.name, 128),
                        )
                        if summary is not None:
                            profiles[server.scenario.name] = summary
        os.makedirs(args.output, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        table = markdown_table(results, scenarios)
        header = (
            f"pfxpold benchmark {stamp}: {os.cpu_count()} CPUs, {args.duration:g} s per point"
            f" after {args.warmup:g} s warm-up, {args.records} distinct requests\n\n"
            + "\n".join(f"- {s.name}: {s.description}" for s in scenarios)
            + "\n\n"
        )
        print("\n" + header + table)
        base = os.path.join(args.output, f"bench-{stamp}")
        with open(base + ".md", "w") as f:
            f.write(header + table + "\n")
            for name, summary in profiles.items():
                f.write(f"\n## Profile: {name} (py-spy, C=128, parent process)\n\n{summary}\n")
        for name, summary in profiles.items():
            print(f"\n## Profile: {name} (py-spy, C=128, parent process)\n\n{summary}")
        with open(base + ".json", "w") as f:
            json.dump(results, f, indent=1)
        if results and plot(results, base + ".png"):
            print(f"\nplot: {base}.png")
        print(f"table: {base}.md, raw: {base}.json")
        bad = [r for r in results if errors_of(r) or r["wrong"]]
        return 1 if bad else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
