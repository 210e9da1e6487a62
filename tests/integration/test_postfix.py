"""
pfxpold behind a real Postfix 3.7: what the SMTP client sees is what the
configured chain decided, at RCPT and at END-OF-MESSAGE, and Postfix applies
its own default action when pfxpold is gone.
"""

import json

import pytest

from tests.integration.postfix import running_postfix
from tests.integration.support import running_daemon

CONFIG = """
[server]
default_action = "DUNNO"

[[check]]
name = "record"
type = "tests.integration.postfix_checks:Recorder"
path = "{record}"

[[check]]
name = "rcpt-rules"
type = "tests.integration.postfix_checks:SenderRules"
rules = {{ reject = "REJECT Not from you", defer = "DEFER_IF_PERMIT Try later", ok = "OK", hold = "HOLD Review", badcheck = "BOGUS verb" }}

[[check]]
name = "eom-rules"
type = "tests.integration.postfix_checks:SenderRules"
stage = "END-OF-MESSAGE"
rules = {{ eomreject = "REJECT Too much" }}
"""


@pytest.fixture(scope="module")
def mail_system(tmp_path_factory):
    """A pfxpold with the chain above and a Postfix asking it."""
    directory = tmp_path_factory.mktemp("postfix-e2e")
    record = directory / "requests.jsonl"
    with (
        running_daemon(directory, CONFIG.format(record=record)) as daemon,
        running_postfix(daemon.port) as postfix,
    ):
        yield daemon, postfix, record


def test_reject_at_rcpt(mail_system):
    """REJECT at RCPT reaches the client as 554 5.7.1 with the text."""
    _, postfix, _ = mail_system
    result = postfix.send("reject@example.com", ["bob@example.net"])
    assert result.rcpt == [
        (554, "5.7.1 <bob@example.net>: Recipient address rejected: Not from you")
    ]
    assert result.data is None


def test_defer_if_permit_at_rcpt(mail_system):
    """DEFER_IF_PERMIT at RCPT reaches the client as 450 4.7.1 with the text."""
    _, postfix, _ = mail_system
    result = postfix.send("defer@example.com", ["bob@example.net"], client_address="192.0.2.10")
    assert result.rcpt == [(450, "4.7.1 <bob@example.net>: Recipient address rejected: Try later")]


def test_ok_is_accepted_and_delivered(mail_system):
    """OK at RCPT lets the message through; Postfix queues it and discards it."""
    _, postfix, _ = mail_system
    result = postfix.send("ok@example.com", ["bob@example.net", "carol@example.net"])
    assert [code for code, _ in result.rcpt] == [250, 250]
    assert result.data[0] == 250 and result.queue_id
    postfix.wait_for_log(f"{result.queue_id}: removed")


def test_hold_puts_message_in_hold_queue(mail_system):
    """HOLD accepts the message and leaves it in Postfix's hold queue."""
    _, postfix, _ = mail_system
    result = postfix.send("hold@example.com", ["bob@example.net"])
    assert result.data[0] == 250
    assert result.queue_id in postfix.held()
    assert "hold: RCPT from" in postfix.wait_for_log("Recipient address Review")


def test_reject_at_end_of_message(mail_system):
    """REJECT at END-OF-MESSAGE refuses the message after DATA with 554 5.7.1."""
    _, postfix, _ = mail_system
    result = postfix.send("eomreject@example.com", ["bob@example.net"])
    assert result.rcpt == [(250, "2.1.5 Ok")]
    assert result.data == (554, "5.7.1 <END-OF-MESSAGE>: End-of-data rejected: Too much")


def test_invalid_action_from_check_uses_on_error(mail_system):
    """A check answering a verb Postfix does not know never reaches Postfix:
    the check's on_error (the default DEFER_IF_PERMIT) is sent instead."""
    daemon, postfix, _ = mail_system
    result = postfix.send("badcheck@example.com", ["bob@example.net"])
    assert result.rcpt == [
        (
            450,
            "4.7.1 <bob@example.net>: Recipient address rejected: Service temporarily unavailable",
        )
    ]
    assert "returned an invalid action" in daemon.log()


def test_requests_as_postfix_sends_them(mail_system):
    """pfxpold sees Postfix 3.7's requests: all attributes at every stage, one
    instance per message, XCLIENT's client and login, the real size at
    END-OF-MESSAGE."""
    _, postfix, record = mail_system
    record.write_text("")
    result = postfix.send(
        "Alice@Example.COM",
        ["ok1@example.net", "ok2@example.net"],
        client_address="2001:db8::7",
        client_name="mx.example.org",
        login="joe",
    )
    assert result.data[0] == 250
    requests = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["protocol_state"] for r in requests] == ["RCPT", "RCPT", "END-OF-MESSAGE"]
    assert len({r["instance"] for r in requests}) == 1
    for request in requests:
        assert len(request) >= 29
        assert request["sender"] == "Alice@Example.COM"
        assert request["client_address"] == "2001:db8::7"
        assert request["sasl_username"] == "joe"
    assert [r["recipient_count"] for r in requests] == ["0", "0", "2"]
    assert requests[2]["recipient"] == ""
    assert int(requests[2]["size"]) > 0


def test_postfix_applies_its_default_action_without_pfxpold(tmp_path):
    """With pfxpold stopped, Postfix retries, then answers its own
    smtpd_policy_service_default_action (451 4.3.5)."""
    with running_daemon(tmp_path, CONFIG.format(record=tmp_path / "r.jsonl")) as daemon:
        port = daemon.port
    with running_postfix(port) as postfix:
        result = postfix.send("ok@example.com", ["bob@example.net"])
        log = postfix.log()
    assert result.rcpt == [
        (451, "4.3.5 <bob@example.net>: Recipient address rejected: Server configuration problem")
    ]
    assert "problem talking to server" in log
