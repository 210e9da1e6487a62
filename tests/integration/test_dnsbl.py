"""
The dnsbl check in a real pfxpold daemon against a twisted.names
authoritative server run as its own process on loopback (never the
machine's resolver), with lists that answer, one that is slow, one that
never answers and a resolver address that is gone.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.dns_ports import running_dns_server
from tests.integration.support import PolicyClient, running_daemon

RECORDS = {
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["Blocked: see http://bl.test/?127.0.0.2"]},
    "3.0.0.127.bl.test": {"A": ["127.0.0.3"]},
    "3.0.0.127.wl.test": {"A": ["127.0.10.2"]},
    "spam.example.rhsbl.test": {"A": ["127.0.1.2"], "TXT": ["spammer domain"]},
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test": {"A": ["127.0.0.2"]},
}

BASE = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "helo_name": "mx.example.net",
    "queue_id": "",
    "sender": "alice@example.org",
    "recipient": "bob@example.com",
    "client_address": "192.0.2.1",
    "client_name": "mx.example.net",
    "reverse_client_name": "mx.example.net",
    "instance": "1.2.3",
}


class DNSServer:
    def __init__(self, process: subprocess.Popen, port: int, silent_port: int, log: str):
        self.process = process
        self.port = port
        self.silent_port = silent_port
        self.query_log = log

    def queries(self) -> list[str]:
        with open(self.query_log) as f:
            return f.read().splitlines()


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dns")
    zones = {
        "port": 0,
        "silent_port": 0,
        "ttl": 300,
        "records": RECORDS,
        "slow": {"slow.test": 0.5},
        "silent": ["dead.test"],
        "query_log": str(directory / "queries.log"),
    }
    with running_dns_server("dns_server.py", zones, str(directory / "zones.json")) as server:
        port, silent_port = server.ports
        yield DNSServer(server.process, port, silent_port, str(directory / "queries.log"))


def config(resolver: str, lists: str, **settings: str) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in settings.items())
    return f"""
[server]
log_verdicts = true

[[check]]
name = "dnsbl"
type = "dnsbl"
timeout = 5.0
on_error = "DEFER_IF_PERMIT DNS lists unavailable"
resolvers = ["{resolver}"]
query_timeout = 1.0
{extra}
{lists}
"""


LISTS = """
[[check.lists]]
zone = "bl.test"
codes = ["127.0.0.2-127.0.0.11"]

[[check.lists]]
zone = "rhsbl.test"
lookup = "sender_domain"

[[check.lists]]
zone = "wl.test"
weight = -10
"""


def test_lists_in_daemon(tmp_path, dns_server):
    """
    Listed clients and sender domains are rejected with the TXT reason, an
    IPv6 client is looked up by nibbles, a whitelisted client is accepted,
    and a hostile sender domain is never sent to the DNS.
    """
    text = config(f"127.0.0.1:{dns_server.port}", LISTS, whitelist_action='"OK"')
    with running_daemon(tmp_path, text) as daemon, daemon.client() as client:
        assert client.ask(BASE) == "DUNNO"
        listed = dict(BASE, client_address="127.0.0.2")
        assert client.ask(listed) == "REJECT Blocked: see http://bl.test/?127.0.0.2"
        ipv6 = dict(BASE, client_address="2001:db8::1")
        assert client.ask(ipv6) == "REJECT listed by bl.test"
        assert client.ask(dict(BASE, client_address="127.0.0.3")) == "OK"
        spam = dict(BASE, sender="x@Spam.Example")
        assert client.ask(spam) == "REJECT spammer domain"
        hostile = dict(BASE, sender="x@evil.example.*)(", client_address="1.2.3.4.evil")
        assert client.ask(hostile) == "DUNNO"
    queries = dns_server.queries()
    assert "A 2.0.0.127.bl.test" in queries
    assert "TXT 2.0.0.127.bl.test" in queries
    assert "A spam.example.rhsbl.test" in queries
    assert not [q for q in queries if "evil" in q or "*" in q]


def timed(client: PolicyClient, request: dict[str, str]) -> tuple[str | None, float]:
    started = time.monotonic()
    answer = client.ask(request)
    return answer, time.monotonic() - started


def test_slow_and_dead_lists(tmp_path, dns_server):
    """
    A list that never answers costs query_timeout and is then skipped by the
    breaker while a slow list within the timeout is still asked; requests on other
    connections run in parallel rather than queueing behind each other.
    """
    lists = LISTS + '\n[[check.lists]]\nzone = "dead.test"\n\n[[check.lists]]\nzone = "slow.test"\n'
    text = config(f"127.0.0.1:{dns_server.port}", lists, failure_limit="3", skip_for="600")
    with running_daemon(tmp_path, text) as daemon:
        with daemon.client() as client:
            answer, first = timed(client, dict(BASE, client_address="127.0.0.2"))
            assert answer == "REJECT Blocked: see http://bl.test/?127.0.0.2"
            # dead.test never answers: the request waits for query_timeout.
            assert first >= 0.9

        def ask(octet: int) -> tuple[str | None, float]:
            with daemon.client() as client:
                return timed(client, dict(BASE, client_address=f"192.0.2.{octet}"))

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            waiting = pool.map(ask, range(10, 18))
            time.sleep(0.2)
            # Nothing to look up (no valid address or name): answered at
            # once while the others wait for the dead list.
            nothing = dict(BASE, client_address="unknown", sender="", client_name="unknown")
            with daemon.client() as client:
                answer, unblocked = timed(client, nothing)
            assert answer == "DUNNO"
            results = list(waiting)
        parallel = time.monotonic() - started
        assert [answer for answer, _ in results] == ["DUNNO"] * 8
        # The breaker has opened for dead.test (3 failures); slow.test
        # still answers within query_timeout and costs its 0.5 s.
        with daemon.client() as client:
            answer, after = timed(client, dict(BASE, client_address="192.0.2.99"))
        assert answer == "DUNNO"
        assert 0.4 <= after
        queries = dns_server.queries()
        assert "A 99.2.0.192.slow.test" in queries
        assert "A 99.2.0.192.dead.test" not in queries
        log = daemon.log()
        assert "list dead.test failed 3 times in a row" in log
    print(
        f"\ndnsbl measured: dead list first request {first:.2f}s; 8 parallel requests"
        f" {parallel:.2f}s in all (max {max(t for _, t in results):.2f}s); a request with"
        f" nothing to look up meanwhile {unblocked:.3f}s; after breaker"
        f" {after:.2f}s (slow list answers in 0.5s)"
    )


def test_resolver_gone(tmp_path, dns_server):
    """
    With the resolver gone (a UDP port that never replies), every list
    fails after query_timeout and on_error answers; once the breaker opens,
    on_error answers at once.
    """
    text = config(f"127.0.0.1:{dns_server.silent_port}", LISTS, failure_limit="2")
    with running_daemon(tmp_path, text) as daemon, daemon.client() as client:
        answer, first = timed(client, BASE)
        assert answer == "DEFER_IF_PERMIT DNS lists unavailable"
        assert first >= 0.9
        timed(client, BASE)
        answer, open_breaker = timed(client, BASE)
        assert answer == "DEFER_IF_PERMIT DNS lists unavailable"
    print(
        f"\ndnsbl measured: resolver gone {first:.2f}s to on_error; with breaker open {open_breaker:.3f}s"
    )


def test_replay_lookups_live_and_recorded(tmp_path, dns_server):
    """
    pfxpold-replay over a capture of DNS list answers: with the recorded
    lookups (the default) the DNS server is not asked again; with
    C{--lookups live} it is, read only, and a changed list setting
    changes exactly the answer it should, from what the server says now.
    """
    from tests.integration.test_replay import replay

    def configuration(codes: str) -> str:
        return f"""
[server]
capture = "capture.jsonl"
log_requests = false

[[check]]
name = "dnsbl"
type = "dnsbl"
timeout = 5.0
resolvers = ["127.0.0.1:{dns_server.port}"]
query_timeout = 1.0

[[check.lists]]
zone = "bl.test"
codes = [{codes}]
"""

    listed = dict(BASE, client_address="127.0.0.2", instance="live.1")
    clean = dict(BASE, client_address="192.0.2.9", instance="live.2")
    with running_daemon(tmp_path, configuration('"127.0.0.2"')) as daemon:
        with daemon.client() as client:
            assert client.ask(listed) == "REJECT Blocked: see http://bl.test/?127.0.0.2"
            assert client.ask(clean) == "DUNNO"
        assert daemon.stop() in (0, -15)
    capture = str(tmp_path / "capture.jsonl")
    same = tmp_path / "same.toml"
    same.write_text(configuration('"127.0.0.2"'))

    asked = len(dns_server.queries())
    result = replay("--config", str(same), "--json", capture)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["requests"], report["changed"]) == (2, 0)
    assert len(dns_server.queries()) == asked, "recorded lookups asked the DNS server"

    result = replay("--config", str(same), "--lookups", "live", "--json", capture)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["changed"] == 0
    assert "A 2.0.0.127.bl.test" in dns_server.queries()[asked:]

    narrowed = tmp_path / "narrowed.toml"
    narrowed.write_text(configuration('"127.0.0.3"'))
    result = replay("--config", str(narrowed), "--lookups", "live", "--json", capture)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["changed"] == 1
    assert {"old": "REJECT", "new": "DUNNO", "count": 1} in report["answers"]
    assert {"old": "DUNNO", "new": "DUNNO", "count": 1} in report["answers"]
