"""
The five policies of examples/rules.toml behind a real Postfix 3.7: SMTP
clients presented through XCLIENT (address, name, SASL login), and the
replies Postfix sends them.
"""

from __future__ import annotations

import os

from tests.integration.postfix import running_postfix
from tests.integration.support import running_daemon

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "examples",
    "rules.toml",
)

#: A client that no policy concerns: a known name, outside every network.
GOOD = {"client_address": "203.0.113.10", "client_name": "mx.good.example"}

RCPT_REJECTED = "<r@example.net>: Recipient address rejected:"


def example() -> str:
    with open(EXAMPLE, encoding="utf-8") as f:
        return f.read()


def test_example_policies_through_postfix(tmp_path: os.PathLike) -> None:
    """
    Each policy refuses what it should with the code and text Postfix
    sends, and lets the rest through.
    """
    with running_daemon(tmp_path, example()) as daemon, running_postfix(
        daemon.port, message_size_limit="50000000"
    ) as postfix:
        # 1. The application servers, only as someone@apps.example.
        app = {"client_address": "192.0.2.7", "client_name": "app1.corp.example"}
        assert postfix.send("job@apps.example", ["r@example.net"], **app).rcpt == [
            (250, "2.1.5 Ok")
        ]
        refused = postfix.send("job@sub.apps.example", ["r@example.net"], **app)
        assert refused.rcpt == [
            (
                554,
                f"5.7.1 {RCPT_REJECTED} The application servers may not send as"
                " <job@sub.apps.example>",
            )
        ], refused

        # 2. A SASL login, only as an address of its own domain.
        login = dict(GOOD, login="alice@corp.example")
        assert postfix.send("anyone@Corp.Example", ["r@example.net"], **login).rcpt == [
            (250, "2.1.5 Ok")
        ]
        refused = postfix.send("x@other.example", ["r@example.net"], **login)
        assert refused.rcpt == [
            (554, f"5.7.1 {RCPT_REJECTED} Your login may not send as this sender")
        ], refused

        # 3. A declared size over 10 MB, except from 198.51.100.0/24.
        big = ["SIZE=20000000"]
        refused = postfix.send("a@example.com", ["r@example.net"], mail_options=big, **GOOD)
        assert refused.rcpt == [
            (554, f"5.3.4 {RCPT_REJECTED} Message too big: at most 10000000 bytes")
        ], refused
        exempt = {"client_address": "198.51.100.20", "client_name": "big.partner.example"}
        assert postfix.send(
            "a@example.com", ["r@example.net"], mail_options=big, **exempt
        ).rcpt == [(250, "2.1.5 Ok")]

        # 4. More than 50 recipients without a login: accepted, and held.
        many = [f"r{number}@example.net" for number in range(51)]
        held = postfix.send("list@example.com", many, **GOOD)
        assert held.rcpt == [(250, "2.1.5 Ok")] * 51
        assert held.data is not None and held.data[0] == 250, held
        assert held.queue_id in postfix.held()
        assert "More than 50 recipients without a login" in postfix.wait_for_log(
            "More than 50 recipients"
        )
        fifty = postfix.send("list@example.com", many[:50], **GOOD)
        assert fifty.data is not None and fifty.data[0] == 250
        assert fifty.queue_id not in postfix.held()

        # 5. Unknown or dynamic-looking names without a login.
        for name in ("[UNAVAILABLE]", "DSL-198-51-100-9.isp.example", "pool7.isp.example"):
            deferred = postfix.send(
                "a@example.com",
                ["r@example.net"],
                client_address="198.51.100.9",
                client_name=name,
            )
            assert deferred.rcpt == [
                (
                    450,
                    f"4.7.1 {RCPT_REJECTED} Your host name is unknown or looks dynamic;"
                    " use your provider's relay",
                )
            ], (name, deferred)
        passed = postfix.send(
            "a@example.com", ["r@example.net"], client_address="198.51.100.9",
            client_name="dslam.isp.example",
        )
        assert passed.rcpt == [(250, "2.1.5 Ok")]
        with_login = postfix.send(
            "joe@corp.example", ["r@example.net"], client_address="198.51.100.9",
            client_name="[UNAVAILABLE]", login="joe@corp.example",
        )
        assert with_login.rcpt == [(250, "2.1.5 Ok")]
        assert with_login.data is not None and with_login.data[0] == 250
