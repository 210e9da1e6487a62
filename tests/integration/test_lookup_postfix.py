"""
The relay-ACL scenario of the original pfxpold end to end, through a real
Postfix: an allowed scanner gets 250, an unknown origin gets the 554
reject, and a database outage gets the 4xx defer; from the shipped access
map and from the shipped PostgreSQL sample against a real PostgreSQL.
"""

from __future__ import annotations

import os
import shutil

from tests.integration.postfix import running_postfix
from tests.integration.support import REPOSITORY, running_daemon
from tests.integration.test_lookup_sql import postgresql_config

EXAMPLES = os.path.join(REPOSITORY, "examples")
REJECTED = (
    554,
    "5.7.1 <bob@example.net>: Recipient address rejected: Sorry, this combination of"
    " sender and originating system does not match any of my policies.",
)
DEFERRED = (
    450,
    "4.7.1 <bob@example.net>: Recipient address rejected: Transient internal error."
    " Please try again later.",
)


def scanner(postfix, client_address: str = "192.0.2.10"):
    """The scan-to-mail device's SMTP session as Postfix answers it."""
    return postfix.send(
        "scanner@example.com",
        ["bob@example.net"],
        client_address=client_address,
        client_name="unknown",
    )


def test_relay_acl_from_file(tmp_path):
    """The shipped access map: the scanner relays, an unknown origin is rejected."""
    shutil.copy(os.path.join(EXAMPLES, "relay-acl.map"), os.path.join(tmp_path, "relay-acl.map"))
    with open(os.path.join(EXAMPLES, "relay-acl-file.toml"), encoding="utf-8") as f:
        config = f.read()
    with running_daemon(tmp_path, config) as daemon, running_postfix(daemon.port) as postfix:
        allowed = scanner(postfix)
        assert allowed.rcpt == [(250, "2.1.5 Ok")]
        assert allowed.data is not None and allowed.data[0] == 250
        assert scanner(postfix, "198.51.100.7").rcpt == [REJECTED]


def test_relay_acl_from_postgresql(tmp_path, lookup_postgresql):
    """
    The shipped PostgreSQL sample: the scanner relays, an unknown origin is
    rejected, and while the database is down the client is told to retry
    (4xx); once it is back, the scanner relays again.
    """
    config = postgresql_config(lookup_postgresql)
    with running_daemon(tmp_path, config) as daemon, running_postfix(daemon.port) as postfix:
        assert scanner(postfix).rcpt == [(250, "2.1.5 Ok")]
        assert scanner(postfix, "198.51.100.7").rcpt == [REJECTED]
        lookup_postgresql.stop()
        try:
            assert scanner(postfix).rcpt == [DEFERRED]
        finally:
            lookup_postgresql.start()
        assert scanner(postfix).rcpt == [(250, "2.1.5 Ok")]
