"""
What a real Postfix 3.7 honours at which stage: the claims of
L{pfxpold.stages} that can be checked from outside, checked against a
bare policy server that answers whatever the test says (pfxpold itself
would refuse to send the answers Postfix ignores), and pfxpold's own
handling of such an answer behind the same Postfix.
"""

from __future__ import annotations

import smtplib
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from pfxpold.stages import problem
from tests.integration.postfix import running_postfix
from tests.integration.support import running_daemon

V37 = (3, 7)
EOD_WARNING = "action PREPEND must be used before smtpd_end_of_data_restrictions"


class _PolicyHandler(socketserver.StreamRequestHandler):
    """One Postfix policy connection: answer each request with C{server.answer}."""

    timeout = 60

    def handle(self) -> None:
        server = self.server
        while True:
            request: dict[str, str] = {}
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                line = line.rstrip(b"\n")
                if not line:
                    break
                name, _, value = line.decode("utf-8", "replace").partition("=")
                request[name] = value
            server.requests.append(request)  # type: ignore[attr-defined]
            action = server.answer(request)  # type: ignore[attr-defined]
            self.wfile.write(f"action={action}\n\n".encode("ascii"))
            self.wfile.flush()


class _PolicyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PolicyHandler)
        self.requests: list[dict[str, str]] = []
        self.answer: Callable[[dict[str, str]], str] = lambda request: "DUNNO"

    @property
    def port(self) -> int:
        return self.server_address[1]


@contextmanager
def policy_server() -> Iterator[_PolicyServer]:
    """A bare policy server on 127.0.0.1, stopped when the block ends."""
    server = _PolicyServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def wait_for(read: Callable[[], str], text: str, timeout: float = 15.0) -> str:
    """Poll C{read()} until it holds C{text}; return it."""
    deadline = time.monotonic() + timeout
    while True:
        found = read()
        if text in found or time.monotonic() > deadline:
            assert text in found, found[-3000:]
            return found
        time.sleep(0.05)


def headers(postfix, queue_id: str) -> str:
    """The headers of a queued message, as postcat shows them."""
    result = subprocess.run(
        ["postcat", "-c", f"{postfix.directory}/etc", "-h", "-q", queue_id],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


@pytest.fixture(scope="module")
def transaction_stages():
    """
    A bare policy server asked at RCPT, END-OF-MESSAGE, VRFY and ETRN by a
    Postfix 3.7 with the default smtpd_delay_reject = yes.
    """
    with (
        policy_server() as server,
        running_postfix(
            server.port,
            smtpd_etrn_restrictions=f"check_policy_service inet:127.0.0.1:{server.port}",
            fast_flush_domains="example.net",
        ) as postfix,
    ):
        yield server, postfix


def by_state(answers: dict[str, str]) -> Callable[[dict[str, str]], str]:
    def answer(request: dict[str, str]) -> str:
        key = (request.get("protocol_state", ""), request.get("recipient", ""))
        return answers.get(key, answers.get(key[0], "DUNNO"))

    return answer


def test_prepend_ignored_at_end_of_message(transaction_stages):
    """
    PREPEND at RCPT adds its header; at END-OF-MESSAGE Postfix logs its
    warning and the message is accepted without the header (the table
    says so too).
    """
    server, postfix = transaction_stages
    server.answer = by_state(
        {
            ("RCPT", "keep@example.net"): "HOLD keep it for postcat",
            ("RCPT", "tag@example.net"): "PREPEND X-Stage-Rcpt: yes",
            "END-OF-MESSAGE": "PREPEND X-Stage-Eom: yes",
        }
    )
    result = postfix.send("alice@example.com", ["keep@example.net", "tag@example.net"])
    assert result.rcpt == [(250, "2.1.5 Ok"), (250, "2.1.5 Ok")]
    assert result.data[0] == 250
    assert result.queue_id in postfix.held()
    postfix.wait_for_log(EOD_WARNING)
    shown = headers(postfix, result.queue_id)
    assert "X-Stage-Rcpt: yes" in shown
    assert "X-Stage-Eom" not in shown
    assert EOD_WARNING in problem("PREPEND", "END-OF-MESSAGE", V37)
    assert problem("PREPEND", "RCPT", V37) is None


def test_hold_honoured_at_end_of_message(transaction_stages):
    """HOLD at END-OF-MESSAGE puts the message on hold, as the table says."""
    server, postfix = transaction_stages
    server.answer = by_state({"END-OF-MESSAGE": "HOLD late review"})
    result = postfix.send("bob@example.com", ["carol@example.net"])
    assert result.data[0] == 250
    assert result.queue_id in postfix.held()
    assert problem("HOLD", "END-OF-MESSAGE", V37) is None


def test_hold_skipped_at_vrfy(transaction_stages):
    """
    HOLD at VRFY (outside a transaction) is skipped with Postfix's
    client-or-helo warning, as the table says.
    """
    server, postfix = transaction_stages
    server.answer = by_state({"VRFY": "HOLD vrfy"})
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=30) as smtp:
        smtp.ehlo("client.example.com")
        code, _ = smtp.verify("dave@example.net")
    assert code == 252
    assert any(r.get("protocol_state") == "VRFY" for r in server.requests)
    postfix.wait_for_log(
        "action HOLD is always skipped in Client host or Helo command restrictions"
    )
    assert problem("HOLD", "VRFY", V37) is not None


def test_filter_unavailable_at_etrn(transaction_stages):
    """FILTER at ETRN is unavailable (Postfix says so), as the table says."""
    server, postfix = transaction_stages
    server.answer = by_state({"ETRN": "FILTER smtp:[192.0.2.1]"})
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=30) as smtp:
        smtp.ehlo("client.example.com")
        smtp.docmd("ETRN", "example.net")
    postfix.wait_for_log("action FILTER is unavailable in smtpd_etrn_restrictions")
    assert "smtpd_etrn_restrictions" in problem("FILTER", "ETRN", V37)


def test_skipped_at_connect_and_helo(tmp_path):
    """
    With smtpd_delay_reject = no, Postfix asks at CONNECT and EHLO, and
    skips PREPEND and HOLD there with its warning, as the table says.
    """
    with policy_server() as server:
        policy = f"check_policy_service inet:127.0.0.1:{server.port}"
        server.answer = by_state({"CONNECT": "PREPEND X-Connect: yes", "EHLO": "HOLD helo"})
        with running_postfix(
            server.port,
            smtpd_delay_reject="no",
            smtpd_client_restrictions=policy,
            smtpd_helo_restrictions=policy,
        ) as postfix:
            result = postfix.send("erin@example.com", ["frank@example.net"])
            assert result.data[0] == 250
            assert result.queue_id not in postfix.held()
            log = postfix.wait_for_log(
                "action HOLD is always skipped in Client host or Helo command"
            )
            assert (
                "action PREPEND is always skipped in Client host or Helo command restrictions"
                in log
            )
    states = [r.get("protocol_state") for r in server.requests]
    assert "CONNECT" in states and "EHLO" in states
    assert problem("PREPEND", "CONNECT", V37) is not None
    assert problem("HOLD", "EHLO", V37) is not None


CONFIG = """
[server]
postfix_version = "3.7"

[[check]]
name = "late-tag"
type = "tests.integration.postfix_checks:SenderRules"
stage = "END-OF-MESSAGE"
on_error = "{on_error}"
rules = {{ tagged = "PREPEND X-Late: yes" }}
"""


@pytest.mark.parametrize(
    "on_error, reply",
    [
        (
            "REJECT 5.7.1 Policy answer not usable here",
            (554, "5.7.1 <END-OF-MESSAGE>: End-of-data rejected: Policy answer not usable here"),
        ),
        ("skip", None),
    ],
)
def test_pfxpold_never_sends_prepend_at_end_of_message(tmp_path, on_error, reply):
    """
    pfxpold does not send PREPEND at END-OF-MESSAGE: the check's on_error
    answers instead, Postfix never logs its warning, and pfxpold logs why.
    """
    with (
        running_daemon(tmp_path, CONFIG.format(on_error=on_error)) as daemon,
        running_postfix(daemon.port) as postfix,
    ):
        result = postfix.send("tagged@example.com", ["grace@example.net"])
        assert result.rcpt == [(250, "2.1.5 Ok")]
        if reply is not None:
            assert result.data == reply
        else:
            assert result.data[0] == 250
        daemon_log = wait_for(daemon.log, "does not honour here")
        assert "check late-tag answered PREPEND X-Late: yes" in daemon_log
        assert "END-OF-MESSAGE" in daemon_log
        assert EOD_WARNING not in postfix.log()


def test_policy_server_helper_stops():
    """The bare policy server frees its port when the block ends."""
    with policy_server() as server:
        port = server.port
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
