"""
The quota and greylist checks behind a real Postfix 3.7: a multi-recipient
message is counted once, the message that crosses the limit is refused,
the next day's passes; greylisting as an SMTP client sees it.
"""

from __future__ import annotations

import os

from tests.integration.postfix import running_postfix
from tests.integration.support import running_daemon

QUOTA = """
[server]
default_action = "DUNNO"

[stores.default]
type = "sqlite"
path = "{state}"

[[check]]
name = "quota"
type = "quota"
key = ["sasl_username"]
unit = "messages"
stage = "END-OF-MESSAGE"
limits = [{{ period = "day", max = 2 }}]
action = "{action}"
# Seconds added to the clock: the "next day" below without waiting a day.
time_offset = {offset}
"""


def quota_config(tmp_path: os.PathLike, offset: float = 0.0, action: str = "") -> str:
    return QUOTA.format(
        state=os.path.join(os.fspath(tmp_path), "state.sqlite3"),
        offset=offset,
        action=action or "REJECT 5.7.1 Daily quota of {max} messages reached",
    )


def test_quota_through_postfix(tmp_path: os.PathLike) -> None:
    """
    With 2 messages a day: a 3-recipient message counts as one, so a second
    message passes; the third is refused at END-OF-MESSAGE with the text;
    another user is not affected; the next day (a daemon whose clock is a
    day ahead, on the same SQLite state) the user may send again.
    """
    recipients = ["r1@example.net", "r2@example.net", "r3@example.net"]
    with running_daemon(tmp_path, quota_config(tmp_path)) as daemon:
        port = daemon.port
        with running_postfix(daemon.port) as postfix:
            first = postfix.send("joe@example.com", recipients, login="joe")
            assert first.rcpt == [(250, "2.1.5 Ok")] * 3
            assert first.data is not None and first.data[0] == 250, first
            second = postfix.send("joe@example.com", ["r4@example.net"], login="joe")
            assert second.data is not None and second.data[0] == 250, second
            third = postfix.send("joe@example.com", ["r5@example.net"], login="joe")
            assert third.data == (
                554,
                "5.7.1 <END-OF-MESSAGE>: End-of-data rejected: Daily quota of 2 messages reached",
            ), third
            other = postfix.send("ann@example.com", ["r6@example.net"], login="ann")
            assert other.data is not None and other.data[0] == 250, other
        assert "quota quota: joe is over its day limit: 2 + 1 > 2" in daemon.log()
    with running_daemon(tmp_path, quota_config(tmp_path, offset=86400.0), port=port) as daemon:
        with running_postfix(daemon.port) as postfix:
            tomorrow = postfix.send("joe@example.com", ["r7@example.net"], login="joe")
            assert tomorrow.data is not None and tomorrow.data[0] == 250, tomorrow


def test_recipients_through_postfix(tmp_path: os.PathLike) -> None:
    """
    Counting recipients (12 a day): an 11-recipient message counts 11, so
    a 2-recipient message is then refused and a 1-recipient one passes.
    """
    config = quota_config(tmp_path).replace('unit = "messages"', 'unit = "recipients"')
    config = config.replace("max = 2", "max = 12")
    with running_daemon(tmp_path, config) as daemon, running_postfix(daemon.port) as postfix:
        eleven = [f"r{i}@example.net" for i in range(11)]
        assert postfix.send("joe@example.com", eleven, login="joe").data[0] == 250
        two = postfix.send("joe@example.com", ["a@example.net", "b@example.net"], login="joe")
        assert two.data[0] == 554, two
        assert postfix.send("joe@example.com", ["c@example.net"], login="joe").data[0] == 250


def test_refuse_early_through_postfix(tmp_path: os.PathLike) -> None:
    """
    With refuse_early, once the quota is full the next message is refused
    at RCPT already, before its data is sent.
    """
    config = quota_config(tmp_path) + "refuse_early = true\n"
    with running_daemon(tmp_path, config) as daemon, running_postfix(daemon.port) as postfix:
        for _ in range(2):
            assert postfix.send("joe@example.com", ["r@example.net"], login="joe").data[0] == 250
        refused = postfix.send("joe@example.com", ["r@example.net"], login="joe")
        assert refused.rcpt == [
            (
                554,
                "5.7.1 <r@example.net>: Recipient address rejected:"
                " Daily quota of 2 messages reached",
            )
        ]
        assert refused.data is None


def test_hold_over_quota(tmp_path: os.PathLike) -> None:
    """
    With HOLD as the over-limit action, the message over the quota is
    accepted into Postfix's hold queue for review.
    """
    config = quota_config(tmp_path, action="HOLD over quota {limit}")
    with running_daemon(tmp_path, config) as daemon, running_postfix(daemon.port) as postfix:
        for _ in range(2):
            assert postfix.send("joe@example.com", ["r@example.net"], login="joe").data[0] == 250
        held = postfix.send("joe@example.com", ["r@example.net"], login="joe")
        assert held.data[0] == 250
        assert postfix.held() != []


GREYLIST = """
[server]
default_action = "DUNNO"

[stores.default]
type = "memory"

[[check]]
name = "greylist"
type = "greylist"
delay = 60
"""


def test_greylist_through_postfix(tmp_path: os.PathLike) -> None:
    """
    A new triplet is answered 450 4.7.1 with the greylist text; a
    whitelisted client never is.
    """
    config = GREYLIST + 'whitelist_clients = ["198.51.100.0/24"]\n'
    with running_daemon(tmp_path, config) as daemon, running_postfix(daemon.port) as postfix:
        result = postfix.send("ann@example.com", ["bob@example.net"], client_address="192.0.2.5")
        assert result.rcpt == [
            (
                450,
                "4.7.1 <bob@example.net>: Recipient address rejected:"
                " Greylisted, please try again in 60 seconds",
            )
        ]
        result = postfix.send("ann@example.com", ["bob@example.net"], client_address="198.51.100.5")
        assert result.rcpt == [(250, "2.1.5 Ok")]
