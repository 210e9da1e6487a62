"""
C{pfxpold-replay --lookups live} against a real backend whose data changed
after the capture: a pfxpold daemon (twistd) captures requests decided by
a DNS list served by a twisted.names server in its own process on
loopback (tests/integration/dns_server.py), and counted by a quota in a
SQLite file. The list's zone then changes.

Replayed with the unchanged configuration, recorded lookups reuse the
captured verdicts (the DNS server is not needed, and not asked when it
runs), while live lookups follow the changed zone and report exactly the
answers it changes. No replay touches the production SQLite file.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from tests.integration.dns_ports import running_dns_server
from tests.integration.support import running_daemon
from tests.integration.test_replay import replay

#: The clients asked about, each with a sender of its own.
LISTED = "127.0.0.2"  # listed before and after (its TXT reason changes)
DELISTED = "127.0.0.3"  # listed when captured, removed from the zone since
NEWLY_LISTED = "127.0.0.4"  # added to the zone since the capture
CLEAN = "192.0.2.9"  # never listed

BEFORE = {
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["listed: old reason"]},
    "3.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["listed: delisted since"]},
}

AFTER = {
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["listed: new reason"]},
    "4.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["listed: new entry"]},
}

CONFIG = """
[server]
capture = "capture.jsonl"
default_action = "DUNNO"
log_requests = false

[stores.default]
type = "sqlite"
path = "state.sqlite3"

[[check]]
name = "dnsbl"
type = "dnsbl"
timeout = 5.0
on_error = "DEFER_IF_PERMIT DNS lists unavailable"
resolvers = ["127.0.0.1:{port}"]
query_timeout = 1.0

[[check.lists]]
zone = "bl.test"

[[check]]
name = "quota"
type = "quota"
key = ["sender"]
unit = "recipients"
stage = "RCPT"
limits = [{{ period = "sliding", seconds = 3600, max = 3 }}]
action = "DEFER 4.7.1 quota exceeded"
"""


class DNSServer:
    """
    A dns_server.py process this test started.

    @ivar port: the port it serves, UDP and TCP.
    """

    def __init__(self, process: subprocess.Popen, port: int, query_log: str) -> None:
        self.process = process
        self.port = port
        self.query_log = query_log

    def queries(self) -> list[str]:
        if not os.path.exists(self.query_log):
            return []
        with open(self.query_log) as f:
            return f.read().splitlines()


@contextmanager
def dns_server(directory: str, port: int, records: dict, name: str) -> Iterator[DNSServer]:
    """
    Serve C{records} on 127.0.0.1:C{port} (UDP and TCP; C{0}: a port free
    for both, picked by the server) for the block, then stop the server,
    also when the block fails.
    """
    query_log = os.path.join(directory, f"{name}.queries")
    zones = {"port": port, "ttl": 300, "records": records, "query_log": query_log}
    path = os.path.join(directory, f"{name}.json")
    with running_dns_server("dns_server.py", zones, path) as server:
        yield DNSServer(server.process, server.ports[0], query_log)


def request(client_address: str, sender: str, recipient: str, instance: str) -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "helo_name": "mx.example.net",
        "queue_id": "",
        "sender": sender,
        "recipient": recipient,
        "recipient_count": "0",
        "client_address": client_address,
        "client_name": "mx.example.net",
        "reverse_client_name": "mx.example.net",
        "instance": instance,
    }


def store_files(directory: str) -> dict[str, tuple[bytes, int]]:
    """
    The production SQLite store's files (with -wal and -shm), by name:
    their bytes and modification time.
    """
    files = {}
    for path in sorted(glob.glob(os.path.join(directory, "state.sqlite3*"))):
        with open(path, "rb") as f:
            files[os.path.basename(path)] = (f.read(), os.stat(path).st_mtime_ns)
    return files


def report_of(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def test_live_lookups_follow_changed_backend(tmp_path):
    """
    Capture through a real DNS list and a SQLite quota; change the zone.
    With the same configuration, --lookups recorded finds no change with
    the DNS server stopped, and asks it nothing when it runs again with
    the changed zone; --lookups live reports exactly the answers the
    changed zone changes (listed -> not, not -> listed, and with
    --compare text the changed reason), fails the accept-to-refuse gate,
    and no replay changes the production SQLite file.
    """
    directory = str(tmp_path)
    clients = [LISTED, DELISTED, NEWLY_LISTED, CLEAN]
    senders = {client: f"user{index}@example.org" for index, client in enumerate(clients)}
    answers: dict[str, list] = {client: [] for client in clients}

    with dns_server(directory, 0, BEFORE, "before") as before:
        # The configuration names this port; the changed zone is served on
        # it later.
        port = before.port
        with running_daemon(tmp_path, CONFIG.format(port=port)) as daemon:
            with daemon.client() as client:
                # Three recipients per sender: the quota's limit exactly.
                for round in range(3):
                    for client_address in clients:
                        answers[client_address].append(
                            client.ask(
                                request(
                                    client_address,
                                    senders[client_address],
                                    f"rcpt{round}@example.com",
                                    f"{round}.{client_address}",
                                )
                            )
                        )
                # One more from the clean sender than the quota allows:
                # the counters really are in the SQLite file.
                over = client.ask(request(CLEAN, senders[CLEAN], "rcpt3@example.com", "3.x"))
            assert daemon.stop() in (0, -15)
        assert "A 3.0.0.127.bl.test" in before.queries()
    assert answers == {
        LISTED: ["REJECT listed: old reason"] * 3,
        DELISTED: ["REJECT listed: delisted since"] * 3,
        NEWLY_LISTED: ["DUNNO"] * 3,
        CLEAN: ["DUNNO"] * 3,
    }
    assert over == "DEFER 4.7.1 quota exceeded"

    capture = os.path.join(directory, "capture.jsonl")
    [config] = glob.glob(os.path.join(directory, "pfxpold-*.toml"))
    production = store_files(directory)
    assert "state.sqlite3" in production

    # The DNS server is gone: recorded lookups need it not.
    result = replay("--config", config, "--json", capture)
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert (report["requests"], report["changed"]) == (13, 0)
    assert report["recorded_lookups"] == {"dnsbl": {"recorded": 13, "unrecorded": 0, "live": 0}}
    assert report["live_checks"] == []
    assert store_files(directory) == production

    with dns_server(directory, port, AFTER, "after") as after:
        # Running with the changed zone: still the recorded verdicts, and
        # not one query.
        result = replay("--config", config, "--json", "--compare", "text", capture)
        assert result.returncode == 0, result.stderr
        assert report_of(result)["changed"] == 0
        assert after.queries() == []

        result = replay("--config", config, "--lookups", "live", "--json", capture)
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1] == (
            "pfxpold-replay: failed: 3 answers changed from accepting to refusing"
        )
        report = report_of(result)
        assert report["lookups"] == "live"
        assert report["requests"] == 13
        assert report["changed"] == 6
        assert report["accept_to_refuse"] == 3
        assert sorted((row["old"], row["new"], row["count"]) for row in report["answers"]) == [
            ("DEFER", "DEFER", 1),
            ("DUNNO", "DUNNO", 3),
            ("DUNNO", "REJECT", 3),
            ("REJECT", "DUNNO", 3),
            ("REJECT", "REJECT", 3),
        ]
        assert sorted((c["old_by"], c["new_by"], c["count"]) for c in report["causes"]) == [
            ("default", "dnsbl", 3),
            ("dnsbl", "default", 3),
        ]
        assert sorted(report["top_clients"]) == [[DELISTED, 3], [NEWLY_LISTED, 3]]
        assert sorted(report["top_senders"]) == [
            [senders[DELISTED], 3],
            [senders[NEWLY_LISTED], 3],
        ]
        assert {(s["client_address"], s["old"], s["new"]) for s in report["samples"]} == {
            (DELISTED, "REJECT listed: delisted since", "DUNNO"),
            (NEWLY_LISTED, "DUNNO", "REJECT listed: new entry"),
        }
        assert report["recorded_lookups"] == {}
        queries = after.queries()
        assert "A 4.0.0.127.bl.test" in queries
        assert "A 3.0.0.127.bl.test" in queries

        # Compared by their whole text, the listed client's new reason is
        # a change too: its answers came from the zone as it is now.
        result = replay(
            "--config", config, "--lookups", "live", "--compare", "text", "--json", capture
        )
        assert result.returncode == 1
        report = report_of(result)
        assert report["changed"] == 9
        assert {
            "old": "REJECT listed: old reason",
            "new": "REJECT listed: new reason",
            "count": 3,
        } in report["answers"]

    assert store_files(directory) == production
