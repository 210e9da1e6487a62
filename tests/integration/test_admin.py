"""
Integration tests of C{pfxpold-admin}: the real command (a subprocess)
against a real redis-server and real SQLite files, while a real twistd
daemon serves requests from the same store.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, Optional

import pytest

from tests.integration import test_state_stores as state_stores
from tests.integration.redis_server import RedisServer, running_redis
from tests.integration.support import daemon_environment, free_port, running_daemon
from tests.integration.test_state_stores import EOM

RCPT = dict(EOM, protocol_state="RCPT", recipient="bob@example.net", recipient_count="0")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the tests of this module."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def store_table(kind: str, redis: Optional[RedisServer], directory: str) -> str:
    table = state_stores.store_table(kind, redis, directory)
    # A prefix per test directory: tests sharing the server never meet.
    return table + (f'prefix = "t{abs(hash(directory))}:"\n' if kind == "redis" else "")


def config(store: str) -> str:
    return f"""
[server]
default_action = "OK"
log_requests = false

{store}
[[check]]
name = "outbound"
type = "quota"
store = "main"
key = ["sasl_username"]
limits = [{{ period = "hour", max = 2 }}, {{ period = "day", max = 100 }}]

[[check]]
name = "greylist"
type = "greylist"
store = "main"
delay = 300
auto_whitelist_after = 0
whitelist_refresh = 0
"""


def write_config(directory: str, text: str) -> str:
    path = os.path.join(directory, "admin.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def admin(config_path: str, *argv: str) -> subprocess.CompletedProcess:
    """Run pfxpold-admin as a person would."""
    return subprocess.run(
        [sys.executable, "-m", "pfxpold.admin", "--config", config_path, *argv],
        env=daemon_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def ask(daemon: Any, attributes: dict[str, str]) -> Optional[str]:
    with daemon.client() as client:
        return client.ask(attributes)


def message(user: str, number: int) -> dict[str, str]:
    return dict(EOM, sasl_username=user, instance=f"{user}.{number}")


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_quota_show_and_reset(kind: str, redis: RedisServer, tmp_path: os.PathLike) -> None:
    """
    A user who used up the hour's quota is shown at 2 of 2 (table and
    JSON, with the reset time); after C{quota reset}, the next message
    passes, while another user's counts stay.
    """
    directory = os.fspath(tmp_path)
    text = config(store_table(kind, redis, directory))
    path = write_config(directory, text)
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon, message("alice", 1)) == "OK"
        assert ask(daemon, message("alice", 2)) == "OK"
        assert ask(daemon, message("alice", 3)).startswith("DEFER 4.7.1 Sending quota exceeded")
        assert ask(daemon, message("bob", 1)) == "OK"

        shown = admin(path, "quota", "show", "--sasl-username", "alice")
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0] == "quota outbound (stores.main): alice"
        assert lines[1].split() == ["LIMIT", "PERIOD", "COUNT", "MAX", "BACK", "TO", "0", "AT"]
        assert lines[2].split()[:4] == ["hour", "hour", "2", "2"]
        assert lines[2].endswith(")") and " UTC (in " in lines[2]
        assert lines[3].split()[:4] == ["day", "day", "2", "100"]

        as_json = admin(path, "quota", "show", "--sasl-username", "alice", "--json")
        assert as_json.returncode == 0, as_json.stderr
        result = json.loads(as_json.stdout)
        assert (result["check"], result["identity"], result["unlimited"]) == (
            "outbound",
            "alice",
            False,
        )
        hour = result["limits"][0]
        assert (hour["limit"], hour["count"], hour["max"]) == ("hour", 2, 2)
        assert time.time() < hour["resets_at"] <= time.time() + 3600

        reset = admin(path, "quota", "reset", "--sasl-username", "alice")
        assert reset.returncode == 0, reset.stderr
        assert reset.stdout == "quota outbound: alice: 2 counter keys removed\n"
        assert ask(daemon, message("alice", 4)) == "OK"
        after = json.loads(admin(path, "--json", "quota", "show", "--identity", "bob").stdout)
        assert [limit["count"] for limit in after["limits"]] == [1, 1]


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_whitelist_and_greylist(kind: str, redis: RedisServer, tmp_path: os.PathLike) -> None:
    """
    A greylisted client's entry is listed (table and JSON) by client, by
    sender and by recipient; once its network is whitelisted at run time
    the next request from it is not greylisted, while another client
    still is; removing the entry greylists it again; deleting a triplet
    makes it new again.
    """
    directory = os.fspath(tmp_path)
    text = config(store_table(kind, redis, directory))
    path = write_config(directory, text)
    near = dict(RCPT, client_address="192.0.2.10", sender="alice+news@Example.com")
    far = dict(RCPT, client_address="198.51.100.20", sender="carol@example.org")
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon, near).startswith("DEFER_IF_PERMIT Greylisted")
        assert ask(daemon, far).startswith("DEFER_IF_PERMIT Greylisted")

        listed = admin(path, "greylist", "list", "--client", "192.0.2.99")
        assert listed.returncode == 0, listed.stderr
        header, *rows = listed.stdout.splitlines()
        assert header.split()[:5] == ["CLIENT", "SENDER", "RECIPIENT", "STATE", "AGE"]
        assert len(rows) == 1
        assert rows[0].split()[:4] == [
            "192.0.2.0/24",
            "alice@example.com",
            "bob@example.net",
            "waiting",
        ]
        for option, value in (
            ("--sender", "alice@EXAMPLE.com"),
            ("--recipient", "bob@example.net"),
        ):
            found = json.loads(admin(path, "--json", "greylist", "list", option, value).stdout)
            networks = sorted(entry["client_network"] for entry in found["entries"])
            expected = (
                ["192.0.2.0/24"] if option == "--sender" else ["192.0.2.0/24", "198.51.100.0/24"]
            )
            assert networks == expected
        entry = json.loads(
            admin(path, "greylist", "list", "--client", "192.0.2.1", "--json").stdout
        )["entries"][0]
        assert entry["state"] == "waiting" and entry["passes"] == 0
        assert 0 <= entry["age"] < 60

        added = admin(
            path, "whitelist", "add", "--client", "192.0.2.0/24", "--comment", "ticket 42"
        )
        assert added.returncode == 0, added.stderr
        assert added.stdout.startswith("whitelist (stores.main): client 192.0.2.0/24 added")
        assert ask(daemon, near) == "OK"
        assert ask(daemon, dict(near, recipient="other@example.net")) == "OK"
        assert ask(daemon, far).startswith("DEFER_IF_PERMIT Greylisted")
        listing = admin(path, "whitelist", "list", "--json")
        assert [
            (e["kind"], e["value"], e["comment"]) for e in json.loads(listing.stdout)["entries"]
        ] == [("client", "192.0.2.0/24", "ticket 42")]

        domain = admin(path, "whitelist", "add", "--sender-domain", "Example.ORG")
        assert domain.returncode == 0, domain.stderr
        assert ask(daemon, far) == "OK"

        removed = admin(path, "whitelist", "remove", "--client", "192.0.2.9/24")
        assert (removed.returncode, removed.stdout) == (
            0,
            "whitelist (stores.main): client 192.0.2.0/24 removed\n",
        )
        assert ask(daemon, near).startswith("DEFER_IF_PERMIT Greylisted")
        again = admin(path, "whitelist", "remove", "--client", "192.0.2.0/24")
        assert again.returncode == 1

        deleted = admin(
            path,
            "greylist",
            "delete",
            "--client",
            "192.0.2.10",
            "--sender",
            "alice@example.com",
            "--recipient",
            "bob@example.net",
        )
        assert (deleted.returncode, deleted.stdout) == (
            0,
            "greylist greylist: 1 entries removed\n",
        )
        left = json.loads(
            admin(path, "--json", "greylist", "list", "--client", "192.0.2.10").stdout
        )
        assert left["entries"] == []


def test_redis_unreachable(tmp_path: os.PathLike) -> None:
    """
    With Redis down, every command exits 2 within about --timeout, with a
    one-line message on standard error.
    """
    port = free_port()
    path = write_config(
        os.fspath(tmp_path),
        config(f'[stores.main]\ntype = "redis"\nendpoint = "tcp:host=127.0.0.1:port={port}"\n'),
    )
    for argv in (
        ["quota", "show", "--sasl-username", "alice"],
        ["greylist", "list", "--client", "192.0.2.1"],
        ["whitelist", "add", "--client", "192.0.2.0/24"],
    ):
        started = time.monotonic()
        result = admin(path, "--timeout", "1", *argv)
        elapsed = time.monotonic() - started
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert result.stderr == (
            f"pfxpold-admin: store unreachable: stores.main (tcp:host=127.0.0.1:port={port}):"
            " not connected\n"
        )
        assert elapsed < 10


def test_sqlite_missing_or_locked(tmp_path: os.PathLike) -> None:
    """
    A missing SQLite file, and one another process holds locked, exit 2
    with one line (the lock within about --timeout).
    """
    directory = os.fspath(tmp_path)
    path = write_config(directory, config(store_table("sqlite", None, directory)))
    database = os.path.join(directory, "state.sqlite3")
    missing = admin(path, "whitelist", "list")
    assert missing.returncode == 2
    assert missing.stderr == (
        f"pfxpold-admin: stores.main: {database}: no such file (has the daemon run?)\n"
    )
    # Once the file exists (the daemon made it), the tool opens it.
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE placeholder (x)")
    assert admin(path, "whitelist", "list").stdout == "whitelist (stores.main): empty\n"

    holder = sqlite3.connect(database, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        locked = admin(path, "--timeout", "1", "whitelist", "add", "--sender-domain", "a.example")
        elapsed = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert locked.returncode == 2
    assert locked.stderr.startswith(f"pfxpold-admin: store unreachable: stores.main: {database}: ")
    assert "locked" in locked.stderr
    assert locked.stderr.count("\n") == 1
    assert elapsed < 10
