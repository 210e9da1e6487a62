"""
Unit tests for L{pfxpold.whitelist}: the greylist check's C{whitelist_file}
and the quota check's C{unlimited_file}, access maps re-read when they
change, on a L{Clock}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.checks.greylist import GreylistCheck
from pfxpold.checks.quota import QuotaCheck
from pfxpold.config import CheckOptions, ConfigError
from pfxpold.testing import make_request, run_check
from pfxpold.whitelist import ExemptionFile, map_attributes
from tests.unit.tempdir import temporary_directory

GREYLISTED = "DEFER_IF_PERMIT Greylisted, please try again in 300 seconds"


def write(path: str, text: str) -> None:
    """Replace the file as an admin's tools do: a new file renamed into place."""
    with open(path + ".new", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".new", path)


class Exemptions(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.path = os.path.join(temporary_directory(self), "exempt")

    def options(self, **table: Any) -> CheckOptions:
        self.table = CheckOptions(
            table,
            name="test",
            reactor=self.clock,
            document={"stores": {"default": {"type": "memory"}}},
            shared={},
        )
        return self.table

    def greylist(self, text: str = "", **table: Any) -> GreylistCheck:
        write(self.path, text)
        check = GreylistCheck(self.options(whitelist_file=self.path, **table))
        self.assertEqual(self.table.unused(), [])
        return check

    def answer(self, check: Any, **changes: str) -> str:
        changes.setdefault("client_address", "192.0.2.10")
        changes.setdefault("client_name", "mail.example.org")
        changes.setdefault("sender", "alice@example.org")
        changes.setdefault("recipient", "bob@example.net")
        return str(self.successResultOf(run_check(check, make_request("rcpt", **changes))))


class GreylistFileTests(Exemptions):
    """
    whitelist_file: clients, client names and recipients in access syntax.
    """

    def test_entries(self) -> None:
        """
        A network, a parent domain of the client's name and a recipient
        domain exempt; DUNNO carves an exception; others are greylisted.
        """
        check = self.greylist(
            "192.0.2.0/24 OK\n192.0.2.66 DUNNO\n.relay.example OK\nexample.com OK\n"
        )
        self.assertEqual(self.answer(check), "DUNNO")
        self.assertEqual(self.answer(check, client_address="192.0.2.66"), GREYLISTED)
        self.assertEqual(
            self.answer(check, client_address="198.51.100.1", client_name="mx1.relay.example"),
            "DUNNO",
        )
        self.assertEqual(
            self.answer(check, client_address="198.51.100.2", recipient="carol@example.com"),
            "DUNNO",
        )
        self.assertEqual(self.answer(check, client_address="198.51.100.3"), GREYLISTED)

    def test_reloaded_when_changed(self) -> None:
        """
        A change to the file takes effect at the next look
        (reload_interval), without a restart; a broken file keeps the
        table in force, logged once.
        """
        check = self.greylist("203.0.113.0/24 OK\n")
        exemptions = check.whitelist_file
        assert exemptions is not None
        self.assertTrue(IService.providedBy(exemptions))
        exemptions.startService()
        self.addCleanup(exemptions.stopService)
        self.assertEqual(self.answer(check), GREYLISTED)
        write(self.path, "192.0.2.10 OK\n")
        self.assertEqual(self.answer(check, client_address="192.0.2.10"), GREYLISTED)
        with capturedLogs() as events:
            self.clock.advance(5)
        self.assertIn("loaded 1 entries from " + self.path, formatEvent(events[0]))
        self.assertEqual(self.answer(check, client_address="192.0.2.10"), "DUNNO")
        write(self.path, "192.0.2.10\n")
        with capturedLogs() as events:
            self.clock.advance(5)
            self.clock.advance(5)
        self.assertEqual(len(events), 1)
        self.assertIn("keeping the table in force", formatEvent(events[0]))
        self.assertEqual(self.answer(check, client_address="192.0.2.10"), "DUNNO")

    def test_lookup_setting(self) -> None:
        """whitelist_file_lookup chooses the attributes; sender then counts."""
        check = self.greylist("example.org OK\n", whitelist_file_lookup=["sender"])
        self.assertEqual(self.answer(check), "DUNNO")
        self.assertEqual(self.answer(check, sender="x@example.net"), GREYLISTED)

    def test_configuration_errors(self) -> None:
        """
        A missing file, an entry that is neither OK nor DUNNO, a bad lookup
        attribute, or lookup settings without a file: one line naming the
        check and its own key.
        """
        cases: list[tuple[dict[str, Any], str]] = [
            ({"whitelist_file": self.path + ".missing"}, "key 'whitelist_file': cannot read"),
            ({"whitelist_file": self.path}, "key 'whitelist_file': "),
            (
                {"whitelist_file": self.path, "whitelist_file_lookup": ["nonsense"]},
                "key 'whitelist_file_lookup': 'nonsense' is neither",
            ),
            (
                {"whitelist_file_lookup": ["sender"]},
                "key 'whitelist_file_lookup': needs whitelist_file",
            ),
        ]
        write(self.path, "192.0.2.1 REJECT no\n")
        for table, expected in cases:
            error = self.assertRaises(ConfigError, GreylistCheck, self.options(**table))
            self.assertIn(expected, str(error))
            self.assertNotIn("\n", str(error))
        error = self.assertRaises(
            ConfigError, GreylistCheck, self.options(whitelist_file=self.path)
        )
        self.assertIn("entries may say OK or DUNNO only, not REJECT", str(error))

    def test_shared_service(self) -> None:
        """The watcher is a shared service, started and stopped with the daemon."""
        check = self.greylist("192.0.2.0/24 OK\n")
        self.assertIsInstance(check.whitelist_file, ExemptionFile)
        self.assertIn(check.whitelist_file, self.table._shared.values())


class QuotaFileTests(Exemptions):
    """
    unlimited_file: identities the quota never counts.
    """

    def quota(self, text: str, **table: Any) -> QuotaCheck:
        write(self.path, text)
        table.setdefault("key", ["sasl_username"])
        table.setdefault("limits", [{"period": "hour", "max": 1}])
        check = QuotaCheck(self.options(unlimited_file=self.path, **table))
        self.assertEqual(self.table.unused(), [])
        return check

    sent = 0

    def send(self, check: QuotaCheck, **changes: str) -> str:
        self.sent += 1
        changes.setdefault("instance", f"a{self.sent}")
        changes.setdefault("queue_id", f"Q{self.sent}")
        request = make_request("eod", **changes)
        return str(self.successResultOf(run_check(check, request)))

    def test_unlimited(self) -> None:
        """A login in the file is never refused; others are."""
        check = self.quota("newsletter OK\n")
        for _ in range(3):
            self.assertEqual(self.send(check, sasl_username="newsletter"), "DUNNO")
        self.assertEqual(self.send(check, sasl_username="alice"), "DUNNO")
        self.assertNotEqual(self.send(check, sasl_username="alice"), "DUNNO")

    def test_default_lookups_follow_the_key(self) -> None:
        """The key's parts are looked up; client_network by the client's address."""
        self.assertEqual(
            map_attributes(["client_network", "sender_domain", "client_address"]),
            ["client_address", "sender_domain"],
        )
        check = self.quota("192.0.2.0/24 OK\n", key=["client_network"])
        assert check.unlimited_file is not None
        self.assertEqual(check.unlimited_file.lookups, ("client_address",))
        for _ in range(3):
            self.assertEqual(self.send(check, client_address="192.0.2.9"), "DUNNO")
