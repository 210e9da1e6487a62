"""
Exemption files in a running daemon: a greylist's whitelist_file and a
quota's unlimited_file are read again when they change, without a restart
or a reload.
"""

from __future__ import annotations

import os
import time

from tests.integration.support import PolicyClient, running_daemon

GREYLISTED = "DEFER_IF_PERMIT Greylisted"

REQUEST = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "helo_name": "mx.example.net",
    "sender": "alice@example.org",
    "recipient": "bob@example.net",
    "client_address": "192.0.2.10",
    "client_name": "mx.example.net",
    "instance": "1.2.3",
}


def write(path, text: str) -> None:
    """Replace the file as an admin's tools do: a new file renamed into place."""
    with open(f"{path}.new", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(f"{path}.new", path)


def ask(port: int, **changes: str) -> str | None:
    with PolicyClient(port) as client:
        return client.ask(dict(REQUEST, **changes))


def wait_for(port: int, expected: str, timeout: float = 10.0, **changes: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        answer = ask(port, **changes)
        if answer is not None and answer.startswith(expected):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"no {expected!r} within {timeout}s")


def test_greylist_whitelist_file_change(tmp_path):
    """
    A client added to whitelist_file passes without greylisting once the
    file is looked at again; taken out, it is greylisted again.
    """
    whitelist = tmp_path / "whitelist.map"
    write(whitelist, "203.0.113.0/24 OK\n")
    config = f"""
[[check]]
name = "greylist"
type = "greylist"
whitelist_file = "{whitelist}"
whitelist_file_reload_interval = 0.2
"""
    with running_daemon(tmp_path, config) as daemon:
        assert ask(daemon.port).startswith(GREYLISTED)
        assert ask(daemon.port, client_address="203.0.113.5") == "DUNNO"
        write(whitelist, "203.0.113.0/24 OK\n192.0.2.0/24 OK\n")
        took = wait_for(daemon.port, "DUNNO", instance="2")
        write(whitelist, "203.0.113.0/24 OK\n")
        wait_for(daemon.port, GREYLISTED, sender="carol@example.org", instance="3")
        log = daemon.log()
    assert f"check greylist: loaded 2 entries from {whitelist}" in log
    print(
        f"\nwhitelist_file measured: change effective {took:.2f}s after the write (interval 0.2 s)"
    )


def test_quota_unlimited_file_change(tmp_path):
    """
    A login over its quota is let through once unlimited_file names it,
    without a restart.
    """
    unlimited = tmp_path / "unlimited.map"
    write(unlimited, "newsletter OK\n")
    config = f"""
[[check]]
name = "quota"
type = "quota"
key = ["sasl_username"]
stage = "RCPT"
unit = "recipients"
limits = [{{ period = "hour", max = 1 }}]
action = "DEFER_IF_PERMIT over quota"
unlimited_file = "{unlimited}"
unlimited_file_reload_interval = 0.2
"""
    with running_daemon(tmp_path, config) as daemon:
        assert ask(daemon.port, sasl_username="newsletter") == "DUNNO"
        assert ask(daemon.port, sasl_username="newsletter", instance="2") == "DUNNO"
        assert ask(daemon.port, sasl_username="alice") == "DUNNO"
        assert ask(daemon.port, sasl_username="alice", instance="2") == "DEFER_IF_PERMIT over quota"
        write(unlimited, "newsletter OK\nalice OK\n")
        wait_for(daemon.port, "DUNNO", sasl_username="alice", instance="3")
