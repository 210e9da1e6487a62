"""
Integration tests of the quota and greylist checks on their real stores: a
real redis-server and SQLite files, pfxpold run as real twistd daemons,
many concurrent Postfix-like connections.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Optional

import pytest

from tests.integration.redis_server import RedisServer, running_redis
from tests.integration.support import (
    PolicyClient,
    encode_request,
    read_reply,
    require_program,
    running_daemon,
)

EOM = {
    "request": "smtpd_access_policy",
    "protocol_state": "END-OF-MESSAGE",
    "protocol_name": "ESMTP",
    "client_address": "192.0.2.10",
    "client_name": "client.example",
    "sender": "app@example.com",
    "recipient": "",
    "recipient_count": "3",
    "size": "1000",
    "queue_id": "4AB12",
}
_serial = itertools.count()
_serial_lock = threading.Lock()


def unique(prefix: str) -> str:
    with _serial_lock:
        return f"{prefix}-{os.getpid()}-{next(_serial)}"


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the tests of this module."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def store_table(kind: str, redis: Optional[RedisServer], directory: str) -> str:
    if kind == "redis":
        assert redis is not None
        return f'[stores.main]\ntype = "redis"\nendpoint = "{redis.endpoint}"\ntimeout = 2.0\n'
    path = os.path.join(directory, "state.sqlite3")
    return f'[stores.main]\ntype = "sqlite"\npath = "{path}"\n'


def quota_config(
    store: str, limit: int, on_error: str = "451 4.3.0 quota store unavailable"
) -> str:
    return f"""
[server]
default_action = "OK"
log_requests = false

{store}
[[check]]
name = "quota"
type = "quota"
store = "main"
key = ["sasl_username"]
unit = "messages"
limits = [{{ period = "day", max = {limit} }}, {{ period = "sliding", seconds = 3600, max = {limit * 10} }}]
action = "REJECT 5.7.1 quota {{limit}} of {{max}} reached"
timeout = 5.0
on_error = "{on_error}"
"""


def blast(port: int, user: str, connections: int, per_connection: int) -> list[Optional[str]]:
    """
    Send C{connections * per_connection} END-OF-MESSAGE requests for
    C{user}, every message its own instance: each connection writes all its
    requests at once (pipelined), then reads the answers, so hundreds are
    in flight together.
    """

    def one_connection(number: int) -> list[Optional[str]]:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            requests = b"".join(
                # The port in it: the messages sent to another daemon are
                # other messages (the same instance would be counted once).
                encode_request(
                    dict(EOM, sasl_username=user, instance=f"{user}.{port}.{number}.{index}")
                )
                for index in range(per_connection)
            )
            sock.sendall(requests)
            answers = []
            for _ in range(per_connection):
                reply = read_reply(sock)
                answers.append(None if reply is None else reply[len(b"action=") : -2].decode())
            return answers

    with ThreadPoolExecutor(connections) as pool:
        results = list(pool.map(one_connection, range(connections)))
    return [answer for answers in results for answer in answers]


def ask(daemon: object, user: str, **changes: str) -> Optional[str]:
    with daemon.client() as client:  # type: ignore[attr-defined]
        return client.ask(dict(EOM, sasl_username=user, instance=unique(user), **changes))


def poll(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_concurrent_requests_never_pass_limit(
    kind: str, redis: RedisServer, tmp_path: os.PathLike
) -> None:
    """
    300 requests for one key, 30 pipelined on each of 10 connections, with
    a limit of 100: exactly 100 pass, not one more; the refusals name the
    limit.
    """
    config = quota_config(store_table(kind, redis, os.fspath(tmp_path)), 100)
    with running_daemon(tmp_path, config) as daemon:
        answers = blast(daemon.port, unique("concurrent"), 10, 30)
    assert answers.count("OK") == 100, answers
    assert answers.count("REJECT 5.7.1 quota day of 100 reached") == 200


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_two_daemons_share_one_limit(kind: str, redis: RedisServer, tmp_path: os.PathLike) -> None:
    """
    Two pfxpold daemons on one store (Redis, or one SQLite file), loaded
    at once with 8 connections each: the global limit holds exactly.
    """
    config = quota_config(store_table(kind, redis, os.fspath(tmp_path)), 150)
    user = unique("shared")
    with ExitStack() as stack:
        first = stack.enter_context(running_daemon(tmp_path, config))
        second = stack.enter_context(running_daemon(tmp_path, config))
        with ThreadPoolExecutor(2) as pool:
            loads = [pool.submit(blast, daemon.port, user, 8, 25) for daemon in (first, second)]
            answers = [answer for load in loads for answer in load.result()]
        assert "database is locked" not in first.log() + second.log()
    assert len(answers) == 400
    assert answers.count("OK") == 150, answers


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_same_message_through_two_daemons_counted_once(
    kind: str, redis: RedisServer, tmp_path: os.PathLike
) -> None:
    """
    Two daemons on one store (Redis, or one SQLite file) each asked about
    the same messages (the same C{instance}): each message is counted once,
    so both answer OK for the 3 messages of a limit of 3, and a 4th is
    refused by either.
    """
    config = quota_config(store_table(kind, redis, os.fspath(tmp_path)), 3)
    user = unique("once")
    with ExitStack() as stack:
        first = stack.enter_context(running_daemon(tmp_path, config))
        second = stack.enter_context(running_daemon(tmp_path, config))
        for number in range(3):
            request = dict(EOM, sasl_username=user, instance=f"{user}.{number}")
            for daemon in (first, second, first):
                with daemon.client() as client:
                    assert client.ask(request) == "OK", (number, daemon)
        assert ask(second, user) == "REJECT 5.7.1 quota day of 3 reached"
        assert ask(first, user) == "REJECT 5.7.1 quota day of 3 reached"


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_same_message_through_two_workers_counted_once(
    kind: str, redis: RedisServer, tmp_path: os.PathLike
) -> None:
    """
    With C{--workers 2} on one store (Redis, or one SQLite file), the
    parent and its worker are each asked about the same messages (the same
    C{instance}), on connections each of them accepted: each message is
    counted once, so all three of a limit of 3 pass at both, a 4th is
    refused by either, and (Redis) 3 are counted.
    """
    from tests.integration.redis_groups import counted
    from tests.integration.test_workers import CONFIG, PID_CHECK, the_worker

    # The quota, then a check that answers with the serving process's PID.
    (tmp_path / "pidcheck.py").write_text(PID_CHECK)  # type: ignore[operator]
    config = quota_config(store_table(kind, redis, os.fspath(tmp_path)), 3) + CONFIG
    user = unique("workers")
    with running_daemon(
        tmp_path, config, extra_args=("--workers", "2"), extra_path=os.fspath(tmp_path)
    ) as daemon:
        parent = daemon.process.pid
        worker = the_worker(daemon)
        by_process: dict[int, PolicyClient] = {}
        clients = []
        try:
            # The kernel gives each new connection to whichever process
            # accepts first: connect until both have one. A RCPT request is
            # not counted (the quota counts at END-OF-MESSAGE).
            probe = dict(EOM, protocol_state="RCPT", recipient="r@example.net", sasl_username=user)
            for _ in range(300):
                client = daemon.client()
                clients.append(client)
                answer = str(client.ask(probe))
                by_process.setdefault(int(answer.split("pid=")[1]), client)
                if len(by_process) == 2:
                    break
            assert set(by_process) == {parent, worker}
            for number in range(3):
                request = dict(EOM, sasl_username=user, instance=f"{user}.{number}")
                for pid in (parent, worker, parent, worker):
                    assert by_process[pid].ask(request) == f"OK pid={pid}", (number, pid)
            for pid in (worker, parent):
                request = dict(EOM, sasl_username=user, instance=unique(user))
                assert by_process[pid].ask(request) == "REJECT 5.7.1 quota day of 3 reached"
        finally:
            for client in clients:
                client.close()
    if kind == "redis":
        assert counted(redis.port, user) == 3


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_counts_survive_restart(kind: str, redis: RedisServer, tmp_path: os.PathLike) -> None:
    """
    Counts are kept in the store: after a pfxpold restart the same limit
    goes on from where it was.
    """
    config = quota_config(store_table(kind, redis, os.fspath(tmp_path)), 5)
    user = unique("restart")
    with running_daemon(tmp_path, config) as daemon:
        assert [ask(daemon, user) for _ in range(3)] == ["OK"] * 3
    with running_daemon(tmp_path, config) as daemon:
        answers = [ask(daemon, user) for _ in range(3)]
    assert answers == ["OK", "OK", "REJECT 5.7.1 quota day of 5 reached"]


def test_refused_mail_is_not_counted(redis: RedisServer, tmp_path: os.PathLike) -> None:
    """
    A message that a later check rejects is taken back off the quota.
    """
    config = quota_config(store_table("redis", redis, os.fspath(tmp_path)), 2)
    config += """
[[check]]
name = "no-big-mail"
type = "tests.integration.test_state_stores.reject_big"
"""
    user = unique("refused")
    with running_daemon(tmp_path, config) as daemon:
        assert ask(daemon, user, size="999999") == "REJECT too big"
        assert ask(daemon, user, size="999999") == "REJECT too big"
        assert ask(daemon, user) == "OK"
        assert ask(daemon, user) == "OK"
        assert ask(daemon, user) == "REJECT 5.7.1 quota day of 2 reached"


def reject_big(options: object) -> object:
    """A check type for the test above: rejects messages over 100 kB."""
    from zope.interface import implementer

    from pfxpold.interfaces import ICheck

    @implementer(ICheck)
    class RejectBig:
        def check(self, request: object) -> str:
            return "REJECT too big" if request.size > 100_000 else "DUNNO"  # type: ignore[attr-defined]

    return RejectBig()


def test_redis_restart(tmp_path: os.PathLike) -> None:
    """
    While Redis is down, requests get the check's on_error answer at once
    (no hang); after Redis is back, pfxpold reconnects and counts again.
    """
    with running_redis(tmp_path) as redis:
        config = quota_config(store_table("redis", redis, os.fspath(tmp_path)), 1000)
        user = unique("outage")
        with running_daemon(tmp_path, config) as daemon:
            assert ask(daemon, user) == "OK"
            redis.stop()
            started = time.monotonic()
            answers = [ask(daemon, user) for _ in range(5)]
            assert answers == ["451 4.3.0 quota store unavailable"] * 5
            # Failing fast: far below the check's 5 s timeout per request.
            assert time.monotonic() - started < 5
            redis.start()
            assert poll(lambda: ask(daemon, user) == "OK")
            assert "connection lost; reconnecting" in daemon.log()
            assert "reconnected" in daemon.log()


def greylist_config(store: str, delay: float) -> str:
    return f"""
[server]
default_action = "OK"
log_requests = false

{store}
[[check]]
name = "greylist"
type = "greylist"
store = "main"
delay = {delay}
header = true
"""


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_greylist_retry_on_another_daemon(
    kind: str, redis: RedisServer, tmp_path: os.PathLike
) -> None:
    """
    A triplet deferred by one daemon passes at the other after the delay
    (the state is shared), with an X-Greylist header, and later without.
    """
    config = greylist_config(store_table(kind, redis, os.fspath(tmp_path)), 1.0)
    rcpt = dict(
        EOM,
        protocol_state="RCPT",
        recipient=f"{unique('rcpt')}@example.net",
        recipient_count="0",
        instance="g.1",
    )
    with ExitStack() as stack:
        first = stack.enter_context(running_daemon(tmp_path, config))
        second = stack.enter_context(running_daemon(tmp_path, config))
        with first.client() as client:
            assert client.ask(rcpt).startswith("DEFER_IF_PERMIT Greylisted")
        answers: list[Optional[str]] = []

        def retried() -> bool:
            with second.client() as client:
                answers.append(client.ask(rcpt))
            return answers[-1] != answers[0] or not answers[-1].startswith("DEFER_IF_PERMIT")

        assert poll(retried)
        assert answers[-1].startswith("PREPEND X-Greylist: delayed 1 seconds by pfxpold at ")
        with first.client() as client:
            assert client.ask(rcpt) == "OK"


def test_redis_frozen(tmp_path: os.PathLike) -> None:
    """
    A Redis that stops answering (SIGSTOP) costs each request at most the
    store's timeout, answered with on_error; once it answers again, so does
    the quota.
    """
    with running_redis(tmp_path) as redis:
        store = store_table("redis", redis, os.fspath(tmp_path)).replace(
            "timeout = 2.0", "timeout = 1.0"
        )
        user = unique("frozen")
        with running_daemon(tmp_path, quota_config(store, 1000)) as daemon:
            assert ask(daemon, user) == "OK"
            redis.pause()
            try:
                started = time.monotonic()
                assert ask(daemon, user) == "451 4.3.0 quota store unavailable"
                # The 1 s store timeout answered, not the check's 5 s one.
                assert time.monotonic() - started < 4.5
            finally:
                redis.resume()
            assert poll(lambda: ask(daemon, user) == "OK")
        assert "no answer in 1.0s" in daemon.log()


def test_redis_password_and_database(tmp_path: os.PathLike) -> None:
    """
    With password_file and database, pfxpold authenticates and selects the
    database before counting; a wrong password is an on_error answer.
    """
    with running_redis(tmp_path, ("--requirepass", "s3cret")) as redis:
        secret = os.path.join(os.fspath(tmp_path), "redis.secret")
        with open(secret, "w") as f:
            f.write("s3cret\n")
        store = store_table("redis", redis, os.fspath(tmp_path))
        good = store + f'password_file = "{secret}"\ndatabase = 3\n'
        user = unique("auth")
        with running_daemon(tmp_path, quota_config(good, 2)) as daemon:
            assert [ask(daemon, user) for _ in range(3)] == [
                "OK",
                "OK",
                "REJECT 5.7.1 quota day of 2 reached",
            ]
        cli = [require_program("redis-cli", "redis-tools"), "-p", str(redis.port)]
        keys = subprocess.run(
            [*cli, "--no-auth-warning", "-a", "s3cret", "-n", "3", "--scan"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"pfxpold:quota:{{quota:{user}}}:day:" in keys
        with open(secret, "w") as f:
            f.write("wrong\n")
        with running_daemon(tmp_path, quota_config(good, 2)) as daemon:
            assert ask(daemon, user) == "451 4.3.0 quota store unavailable"
