"""
Degraded mode with a real redis-server and a real daemon: Redis is stopped
(by the PID we started) while a client keeps sending, the quota goes on
enforcing this host's share of the limit on local counters, and after Redis
is started again on the same port the local counts are added to Redis once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import threading
import time
from typing import Optional

from tests.integration.redis_groups import redis_cli
from tests.integration.redis_server import running_redis
from tests.integration.support import encode_request, free_port, read_reply, running_daemon
from tests.integration.test_admin import admin, write_config
from tests.integration.test_metrics import scrape, value
from tests.integration.test_state_stores import EOM, poll

LIMIT = 20
HOSTS = 2
SHARE = LIMIT // HOSTS


def config(endpoint: str, metrics_port: int) -> str:
    return f"""
[server]
default_action = "OK"
log_requests = false

[metrics]
listen = "tcp:{metrics_port}:interface=127.0.0.1"

[stores.main]
type = "redis"
endpoint = "{endpoint}"
timeout = 1.0

[[check]]
name = "quota"
type = "quota"
store = "main"
key = ["sasl_username"]
limits = [{{ period = "day", max = {LIMIT} }}]
action = "REJECT 5.7.1 quota {{limit}} of {{max}} reached"
timeout = 3.0
on_error = "451 4.3.0 quota store unavailable"
on_store_down = "local"
local_share = "divided"
hosts = {HOSTS}
probe_interval = 0.5
"""


class Load(threading.Thread):
    """
    A client sending END-OF-MESSAGE requests one after another on one
    connection, each for a user of its own (so no limit is reached), until
    stopped; it keeps every answer.
    """

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.answers: list[Optional[str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            number = 0
            while not self.stopping.is_set():
                number += 1
                user = f"load-{number}"
                sock.sendall(encode_request(dict(EOM, sasl_username=user, instance=user)))
                reply = read_reply(sock)
                self.answers.append(None if reply is None else reply[len(b"action=") : -2].decode())

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


def ask(port: int, user: str, instance: str) -> Optional[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(encode_request(dict(EOM, sasl_username=user, instance=instance)))
        reply = read_reply(sock)
    return None if reply is None else reply[len(b"action=") : -2].decode()


def test_redis_stopped_and_reconciled(tmp_path: os.PathLike) -> None:
    """
    Two daemons (the two hosts), one under load; Redis stopped: each enters
    degraded mode (no request gets on_error) and refuses alice at LIMIT /
    HOSTS on its local counters. When Redis is back (same port, its data
    kept in its append-only file), both leave degraded mode having added
    every local count: Redis then holds exactly what was accepted, for
    alice and for every load user, alice is over her limit there, and
    pfxpold-admin quota show agrees. The metrics show the mode and the
    amount reconciled.
    """
    directory = os.fspath(tmp_path)
    metrics_port = free_port()
    with running_redis(tmp_path, extra_args=("--appendonly", "yes")) as server:
        text = config(server.endpoint, metrics_port)
        path = write_config(directory, text)
        with (
            running_daemon(tmp_path, text) as daemon,
            running_daemon(tmp_path, config(server.endpoint, free_port())) as other,
        ):
            before = [ask(daemon.port, "alice", f"before.{n}") for n in range(4)]
            assert before == ["OK"] * 4
            load = Load(daemon.port)
            load.start()
            try:
                assert poll(lambda: len(load.answers) >= 50)
                stopped = time.monotonic()
                server.stop()
                assert poll(lambda: "degraded mode:" in daemon.log(), timeout=20)
                to_degraded = time.monotonic() - stopped
                refused = f"REJECT 5.7.1 quota day of {SHARE} reached"
                answers = [ask(daemon.port, "alice", f"during.{n}") for n in range(SHARE + 2)]
                assert answers == ["OK"] * SHARE + [refused] * 2, answers
                answers = [ask(other.port, "alice", f"other.{n}") for n in range(SHARE + 1)]
                assert answers == ["OK"] * SHARE + [refused], answers
                samples = scrape(metrics_port)
                assert value(samples, "pfxpold_check_degraded", check="quota") == 1
                server.start()
                started = time.monotonic()
                assert poll(lambda: "degraded mode left" in daemon.log(), timeout=30)
                to_reconciled = time.monotonic() - started
                assert poll(lambda: "degraded mode left" in other.log(), timeout=30)
            finally:
                load.stop()
            # Redis decides again, with what both hosts sent in its window:
            # 4 before, 2 * SHARE during the outage.
            over = f"REJECT 5.7.1 quota day of {LIMIT} reached"
            assert ask(daemon.port, "alice", "after.1") == over
            assert ask(other.port, "alice", "after.2") == over
            assert "reconciled 10 messages from 10 local counts" in other.log()
            log = daemon.log()
            samples = scrape(metrics_port)

        # The daemon is stopped: Redis holds what it was left with.
        assert set(load.answers) == {"OK"}, set(load.answers)
        accepted_load = len(load.answers)
        left = re.search(r"reconciled (\d+) messages from (\d+) local counts", log)
        assert left is not None, log
        reconciled = int(left.group(1))
        # alice's share, and the load sent while Redis was down.
        assert reconciled >= SHARE + 1
        assert value(samples, "pfxpold_check_degraded", check="quota") == 0
        assert value(samples, "pfxpold_check_reconciled_total", check="quota") == reconciled
        assert log.count("degraded mode:") == 1
        assert log.count("degraded mode left") == 1

        assert redis_sum(server.port, "pfxpold:quota:{quota:load-*") == accepted_load
        assert redis_sum(server.port, "pfxpold:quota:{quota:alice}:day:*") == 4 + 2 * SHARE
        shown = admin(path, "--json", "quota", "show", "--sasl-username", "alice")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["limits"][0]["count"] == 4 + 2 * SHARE
    print(
        f"\nRedis stopped -> degraded: {to_degraded:.3f} s;"
        f" Redis started -> reconciled: {to_reconciled:.3f} s;"
        f" {reconciled} messages reconciled, {accepted_load} load messages"
    )
    print("\n".join(line for line in log.splitlines() if "degraded" in line))


#: Sums the counters whose names match ARGV[1], inside Redis: one round trip.
SUM_SCRIPT = (
    "local total = 0 "
    "for _, key in ipairs(redis.call('KEYS', ARGV[1])) do "
    "total = total + tonumber(redis.call('GET', key) or 0) end "
    "return total"
)


def redis_sum(port: int, pattern: str) -> int:
    """
    The sum of the counters in the Redis on C{port} whose names match C{pattern}.
    """
    return int(redis_cli(port, "EVAL", SUM_SCRIPT, "0", pattern))


def sqlite_config(path: str) -> str:
    return f"""
[server]
default_action = "OK"
log_requests = false

[stores.main]
type = "sqlite"
path = "{path}"
busy_timeout = 0.3

[[check]]
name = "quota"
type = "quota"
store = "main"
key = ["sasl_username"]
limits = [{{ period = "day", max = 5 }}]
action = "REJECT 5.7.1 quota {{limit}} of {{max}} reached"
timeout = 3.0
on_error = "451 4.3.0 quota store unavailable"
on_store_down = "local"
probe_interval = 0.3
"""


def test_sqlite_locked_and_reconciled(tmp_path: os.PathLike) -> None:
    """
    An SQLite file another process keeps locked (a backup, a stuck admin
    tool) is a down store: after busy_timeout the check enforces the full
    limit locally (local_share = "full"), and once the lock is gone the
    local counts are added to the file, as pfxpold-admin shows.
    """
    directory = os.fspath(tmp_path)
    database = os.path.join(directory, "state.sqlite3")
    text = sqlite_config(database)
    path = write_config(directory, text)
    with running_daemon(tmp_path, text) as daemon:
        assert [ask(daemon.port, "bob", f"before.{n}") for n in range(2)] == ["OK"] * 2
        # The daemon may be inside a short transaction of its own (a
        # write, a sweep): wait for it rather than fail on SQLITE_BUSY.
        holder = sqlite3.connect(database, timeout=10, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            answers = [ask(daemon.port, "bob", f"during.{n}") for n in range(6)]
            assert answers == ["OK"] * 5 + ["REJECT 5.7.1 quota day of 5 reached"], answers
            assert "degraded mode:" in daemon.log()
            assert "degraded mode left" not in daemon.log()
        finally:
            if holder.in_transaction:
                holder.execute("ROLLBACK")
            holder.close()
        assert poll(lambda: "degraded mode left" in daemon.log(), timeout=20)
        assert "reconciled 5 messages from 5 local counts" in daemon.log()
    shown = admin(path, "--json", "quota", "show", "--sasl-username", "bob")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["limits"][0]["count"] == 7


def greylist_config(endpoint: str, mode: str) -> str:
    return f"""
[server]
default_action = "OK"
log_requests = false

[stores.main]
type = "redis"
endpoint = "{endpoint}"
timeout = 1.0

[[check]]
name = "greylist"
type = "greylist"
store = "main"
delay = 1
whitelist_clients = []
on_error = "451 4.3.0 greylist store unavailable"
on_store_down = "{mode}"
probe_interval = 0.3
"""


def rcpt(recipient: str) -> dict[str, str]:
    return dict(
        EOM,
        protocol_state="RCPT",
        recipient=recipient,
        recipient_count="0",
        sasl_username="",
        instance="g.1",
    )


def ask_rcpt(port: int, recipient: str) -> Optional[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(encode_request(rcpt(recipient)))
        reply = read_reply(sock)
    return None if reply is None else reply[len(b"action=") : -2].decode()


def test_greylist_local_and_pass(tmp_path: os.PathLike) -> None:
    """
    With Redis stopped, a greylist with on_store_down = "local" defers a
    new triplet and lets its retry after the delay pass (in this process);
    one with "pass" answers OK at once. Both leave degraded mode when Redis
    is back, and greylist in Redis again.
    """
    with running_redis(tmp_path) as server:
        with (
            running_daemon(tmp_path, greylist_config(server.endpoint, "local")) as local,
            running_daemon(tmp_path, greylist_config(server.endpoint, "pass")) as passing,
        ):
            assert ask_rcpt(local.port, "first@example.net").startswith("DEFER_IF_PERMIT")
            server.stop()
            assert ask_rcpt(local.port, "down@example.net").startswith("DEFER_IF_PERMIT")
            assert poll(lambda: ask_rcpt(local.port, "down@example.net") == "OK")
            assert ask_rcpt(passing.port, "down@example.net") == "OK"
            assert ask_rcpt(passing.port, "other@example.net") == "OK"
            for daemon in (local, passing):
                assert "degraded mode: " in daemon.log()
            assert "greylisting in this process" in local.log()
            assert "passing mail unchecked" in passing.log()
            server.start()
            for daemon in (local, passing):
                assert poll(lambda daemon=daemon: "degraded mode left" in daemon.log())
            # Redis greylists again: the triplet passed locally is new there.
            assert ask_rcpt(local.port, "down@example.net").startswith("DEFER_IF_PERMIT")
            assert ask_rcpt(passing.port, "down@example.net").startswith("DEFER_IF_PERMIT")
