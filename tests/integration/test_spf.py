"""
The spf check against the RFC 7208 test suite (the SPF council's
C{rfc7208-tests.yml}, release 2014.04, as pyspf 2.0.14 ships it; BSD
licence in C{tests/integration/spf/rfc7208-tests.LICENSE}), every case
run through L{pfxpold.checks.spf.SPFCheck} asking a real twisted.names
server (C{spf_dns_server.py}, its own process, one port per scenario) on
loopback; and the check in a real pfxpold daemon.

Each case's result is read from the action the check answers: with
C{permerror_reject} and C{temperror_defer} on and every result but fail
prepended, the reject, defer or header names it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
from collections.abc import Iterator

import pytest
import pytest_twisted
import yaml

from pfxpold.checks.spf import SPFCheck
from pfxpold.query import make_parser, query, request_attributes
from pfxpold.testing import make_options, make_request, run_check
from tests.integration.deployment import readme_block
from tests.integration.dns_ports import DNSServerProcess, running_dns_server
from tests.integration.support import REPOSITORY, running_daemon

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = os.path.join(HERE, "spf", "rfc7208-tests.yml")

#: pyspf's default explanation for a fail; the suite's driver sets it to
#: C{DEFAULT}.
DEFAULT_EXPLANATION = "SPF fail - not authorized"

#: Cases the check cannot pass, with the reason. Strict: one that passes
#: fails the run, so the list stays true.
KNOWN_FAILURES: dict[str, str] = {}


def load_suite() -> list[tuple[int, str, dict]]:
    with open(SUITE, "rb") as f:
        scenarios = list(yaml.safe_load_all(f))
    cases = []
    for index, scenario in enumerate(scenarios):
        for name, case in scenario["tests"].items():
            cases.append((index, name, case))
    return cases


CASES = load_suite()
SCENARIOS = 1 + max(index for index, _, _ in CASES)


@contextlib.contextmanager
def serving(directory, suite: str) -> Iterator[DNSServerProcess]:
    """
    spf_dns_server.py serving C{suite}'s scenarios, each on its own port
    (free for UDP and TCP, picked by the server), for the duration of the
    block.
    """
    with running_dns_server(
        "spf_dns_server.py", {"suite": suite}, str(directory / "suite.json")
    ) as server:
        yield server


@pytest.fixture(scope="module")
def suite_server(tmp_path_factory) -> Iterator[DNSServerProcess]:
    """
    The DNS server serving every scenario's zone data, each on its own
    port.
    """
    with serving(tmp_path_factory.mktemp("spf-dns"), SUITE) as server:
        assert len(server.ports) == SCENARIOS
        yield server


def suite_check(reactor, port: int, null_sender: bool) -> SPFCheck:
    """
    A check that names each result in its answer: the HELO identity only
    for the null sender, the MAIL FROM identity otherwise.
    """
    options = make_options(
        name="spf",
        reactor=reactor,
        resolvers=[f"127.0.0.1:{port}"],
        query_timeout=0.5,
        helo_reject="Fail" if null_sender else "No_Check",
        mail_from_reject="No_Check" if null_sender else "Fail",
        permerror_reject=True,
        temperror_defer=True,
        reject_action="550 5.7.23 {result}: {reason}",
        permerror_action="550 5.7.24 {result}: {reason}",
        defer_action="DEFER_IF_PERMIT {result}: {reason}",
        skip_addresses=[],
        receiver="receiver.test",
    )
    return SPFCheck(options)


def result_of(action) -> tuple[str, str]:
    """
    The SPF result and explanation an action of L{suite_check} names.
    """
    text = action.text
    if action.verb == "PREPEND":
        assert text.startswith("Received-SPF: "), text
        return text.split()[1], ""
    if action.verb == "DEFER_IF_PERMIT":
        result, _, reason = text.partition(": ")
        return result, reason
    status, rest = text.split(" ", 1)
    result, _, reason = rest.partition(": ")
    return result, reason


@pytest.mark.parametrize(
    ("index", "name", "case"),
    [
        pytest.param(
            *case,
            id=case[1],
            marks=[pytest.mark.xfail(reason=KNOWN_FAILURES[case[1]], strict=True)]
            if case[1] in KNOWN_FAILURES
            else [],
        )
        for case in CASES
    ],
)
@pytest_twisted.ensureDeferred
async def test_rfc7208_suite(suite_server, index: int, name: str, case: dict) -> None:
    """
    One case of the RFC 7208 test suite: the check's result is one the
    case allows, and a fail carries the explanation it expects.
    """
    from twisted.internet import reactor

    sender = case.get("mailfrom", "")
    check = suite_check(reactor, suite_server.ports[index], null_sender=not sender)
    check.startService()
    try:
        request = make_request(
            client_address=case["host"],
            sender=sender,
            helo_name=case.get("helo", ""),
            sasl_username="",
            instance="",
        )
        action = await run_check(check, request)
    finally:
        check.stopService()
    result, explanation = result_of(action)
    expected = case["result"]
    allowed = [expected] if isinstance(expected, str) else list(expected)
    assert result in allowed, f"{name} ({case.get('spec')}): {result}, wanted {allowed}: {action}"
    if "explanation" in case and result == "fail":
        wanted = case["explanation"]
        if wanted == "DEFAULT":
            wanted = DEFAULT_EXPLANATION
        assert explanation == wanted, f"{name}: explanation {explanation!r}"


#: The zone of the daemon test, in the suite's format.
DAEMON_ZONE = {
    "tests": {},
    "zonedata": {
        "example.org": [{"TXT": "v=spf1 ip4:192.0.2.1 mx -all"}, {"MX": [10, "mx.example.org"]}],
        "mx.example.org": [{"A": "192.0.2.2"}],
        "mail.example.org": [{"TXT": "v=spf1 a -all"}, {"A": "192.0.2.1"}],
        "bad-helo.example": [{"TXT": "v=spf1 -all"}],
        "loop.example": [{"TXT": "v=spf1 include:loop.example -all"}],
        "soft.example": [{"TXT": "v=spf1 ~all"}],
        "slow.example": [{"TXT": "TIMEOUT"}],
    },
}

BASE = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "helo_name": "mail.example.org",
    "queue_id": "",
    "sender": "alice@example.org",
    "recipient": "bob@example.com",
    "client_address": "192.0.2.1",
    "client_name": "mail.example.org",
    "reverse_client_name": "mail.example.org",
    "instance": "1.1",
    "sasl_username": "",
}


def test_spf_in_daemon(tmp_path) -> None:
    """
    In a real daemon, with pypolicyd-spf's defaults: a pass prepends the
    header once per message, a MAIL FROM or HELO fail is rejected, an
    include loop and a timeout only prepend, authenticated and loopback
    clients are not checked, and a hostile sender stays inside its quotes.
    """
    suite = tmp_path / "zone.yml"
    suite.write_text(yaml.safe_dump(DAEMON_ZONE))
    with serving(tmp_path, str(suite)) as server:
        text = f"""
[[check]]
name = "spf"
type = "spf"
timeout = 5.0
resolvers = ["127.0.0.1:{server.ports[0]}"]
receiver = "mx.test"
query_timeout = 0.5
"""
        with running_daemon(tmp_path, text) as daemon, daemon.client() as client:
            header = client.ask(BASE)
            assert header == (
                "PREPEND Received-SPF: pass (mx.test: domain of alice@example.org designates"
                " 192.0.2.1 as permitted sender) client-ip=192.0.2.1;"
                ' envelope-from="alice@example.org"; helo=mail.example.org; receiver=mx.test;'
                ' identity=mailfrom; mechanism="ip4:192.0.2.1";'
            )
            # The second recipient of the same message: no second header.
            assert client.ask(dict(BASE, recipient="carol@example.com")) == "DUNNO"
            mx = client.ask(dict(BASE, instance="1.2", client_address="192.0.2.2", helo_name=""))
            assert mx.startswith("PREPEND Received-SPF: pass "), mx
            assert "mechanism=mx;" in mx
            refused = dict(BASE, instance="1.3", client_address="198.51.100.7", helo_name="x.test")
            assert client.ask(refused) == (
                "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please see"
                " https://www.open-spf.org/Why?s=mfrom;id=alice@example.org;ip=198.51.100.7;r=mx.test"
            )
            # The same message's next recipient gets the same refusal.
            assert client.ask(dict(refused, recipient="carol@example.com")).startswith("550 5.7.23")
            helo = dict(BASE, instance="1.4", helo_name="bad-helo.example")
            assert client.ask(helo).startswith("550 5.7.23 Message rejected due to: SPF fail")
            assert "s=helo;id=bad-helo.example;" in client.ask(dict(helo, instance="1.5"))
            assert client.ask(dict(refused, instance="1.6", sasl_username="alice")) == "DUNNO"
            assert client.ask(dict(refused, instance="1.7", client_address="127.0.0.1")) == "DUNNO"
            loop = client.ask(dict(BASE, instance="1.8", sender="x@loop.example"))
            assert loop.startswith("PREPEND Received-SPF: permerror "), loop
            soft = client.ask(dict(BASE, instance="1.9", sender="x@soft.example"))
            assert soft.startswith("PREPEND Received-SPF: softfail "), soft
            slow = client.ask(dict(BASE, instance="1.10", sender="x@slow.example"))
            assert slow.startswith("PREPEND Received-SPF: temperror "), slow
            hostile = client.ask(
                dict(BASE, instance="1.11", sender='a"b\\c;(x)@soft.example', helo_name='h;x="y')
            )
            assert hostile.startswith("PREPEND Received-SPF: softfail "), hostile
            assert 'envelope-from="a\\"b\\\\c;(x)@soft.example";' in hostile, hostile
            assert 'helo="h;x=\\"y";' in hostile, hostile


#: The zone the README's spf answers assume.
README_ZONE = {
    "tests": {},
    "zonedata": {"example.org": [{"TXT": "v=spf1 ip4:198.51.100.0/24 -all"}]},
}
#: The receiver in the README's answers: this host's name.
README_RECEIVER = "mx.example.com"


def test_spf_example_as_shipped(tmp_path) -> None:
    """
    examples/spf.toml, only its resolver set to the tests' DNS server,
    answers the README's requests as the README shows: a pass prepends the
    Received-SPF header, a fail gets the README's reject, an authenticated
    client is not checked.
    """
    with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as f:
        assert "`v=spf1 ip4:198.51.100.0/24 -all`" in f.read()
    with open(os.path.join(REPOSITORY, "examples", "spf.toml"), encoding="utf-8") as f:
        shipped = f.read()
    suite = tmp_path / "zone.yml"
    suite.write_text(yaml.safe_dump(README_ZONE))
    with serving(tmp_path, str(suite)) as server:
        resolver = '# resolvers = ["127.0.0.1:53"]'
        assert resolver in shipped
        text = shipped.replace(resolver, f'resolvers = ["127.0.0.1:{server.ports[0]}"]')
        lines = readme_block("spf-answers").splitlines()
        assert len(lines) == 6, lines
        with running_daemon(tmp_path, text) as daemon:
            for number, (command, answer) in enumerate(zip(lines[::2], lines[1::2], strict=True)):
                arguments = shlex.split(command)
                assert arguments[0] == "pfxpold-query" and answer.startswith("# "), command
                parsed = make_parser().parse_args(
                    arguments[1:] + ["--server", f"127.0.0.1:{daemon.port}"]
                )
                attributes = request_attributes(parsed)
                # Each pfxpold-query process is a message of its own.
                attributes["instance"] = f"readme.{number}"
                request = "".join(f"{name}={value}\n" for name, value in attributes.items())
                expected = answer[2:].replace(README_RECEIVER, socket.gethostname())
                assert query(parsed.server, (request + "\n").encode(), 30.0) == expected
