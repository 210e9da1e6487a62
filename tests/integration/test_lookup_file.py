"""
The C{file} check in a real pfxpold daemon: the relay-ACL sample as
shipped, and the map replaced under traffic (re-read in the reactor's
thread pool, no request missed) or broken (old table kept, error logged
with file and line).
"""

from __future__ import annotations

import os
import shutil
import time

from tests.integration.support import REPOSITORY, running_daemon

EXAMPLES = os.path.join(REPOSITORY, "examples")
REJECT = (
    "REJECT Sorry, this combination of sender and originating system does not match"
    " any of my policies."
)
SCANNER = {
    "client_address": "192.0.2.10",
    "client_name": "unknown",
    "sender": "scanner@example.com",
}


def copy_example(tmp_path) -> str:
    """
    examples/relay-acl-file.toml and its map, copied into C{tmp_path}.

    @return: the configuration's text, polling the map every 0.2 s.
    """
    shutil.copy(os.path.join(EXAMPLES, "relay-acl.map"), os.path.join(tmp_path, "relay-acl.map"))
    with open(os.path.join(EXAMPLES, "relay-acl-file.toml"), encoding="utf-8") as f:
        config = f.read()
    return config + "reload_interval = 0.2\n"


def replace_map(tmp_path, text: str) -> None:
    path = os.path.join(tmp_path, "relay-acl.map")
    with open(path + ".new", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".new", path)


def test_relay_acl_sample(tmp_path):
    """The shipped sample answers the relay-ACL scenario."""
    with running_daemon(tmp_path, copy_example(tmp_path)) as daemon, daemon.client() as client:
        assert client.ask(SCANNER) == "OK"
        assert client.ask({**SCANNER, "client_address": "192.0.2.11"}) == REJECT
        assert (
            client.ask({**SCANNER, "client_address": "2001:db8:10::7", "sender": "a@example.com"})
            == "OK"
        )
        named = {"client_address": "198.51.100.1", "client_name": "bulk.mail.example.com"}
        assert client.ask({**named, "sender": "newsletter@example.com"}) == "OK"
        assert client.ask({**named, "sender": "ceo@example.com"}) == REJECT


def test_reload_under_traffic(tmp_path):
    """
    Replacing the map changes the answers within a few polls, and every
    request in between is answered from the old or the new table.
    """
    with running_daemon(tmp_path, copy_example(tmp_path)) as daemon, daemon.client() as client:
        assert client.ask(SCANNER) == "OK"
        lines = [f"198.51.{i // 256}.{i % 256} filler{i}@example.com OK" for i in range(20000)]
        replace_map(tmp_path, "\n".join(lines + ["192.0.2.10 scanner@example.com REJECT moved\n"]))
        answers = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            answers.append(client.ask(SCANNER))
            if answers[-1] == "REJECT moved":
                break
        assert answers[-1] == "REJECT moved", answers[-5:]
        assert set(answers) <= {"OK", "REJECT moved"}
        assert "loaded 20001 entries" in daemon.log()


def test_broken_map_keeps_table(tmp_path):
    """A broken map leaves the old table in force and logs the file, line and reason."""
    with running_daemon(tmp_path, copy_example(tmp_path)) as daemon, daemon.client() as client:
        replace_map(
            tmp_path, "192.0.2.10 scanner@example.com REJECT new\n\n192.0.2.11 x@example.com OOPS\n"
        )
        path = os.path.join(tmp_path, "relay-acl.map")
        deadline = time.monotonic() + 20
        while f"{path}:3:" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        assert "OOPS" in daemon.log()
        assert "keeping the table in force" in daemon.log()
        assert client.ask(SCANNER) == "OK"
