"""
Tests for L{pfxpold.checks.file}: settings, answers, and reloading the map
on change with a L{Clock}, keeping the table in force when the file is
broken or gone.
"""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from pfxpold.checks.file import MAX_MEMO_KEY_LENGTH, FileCheck
from pfxpold.config import ConfigError, load_configuration
from pfxpold.interfaces import ICheck, IConfigWarnings, IExplainable
from pfxpold.regexptable import TableLookupError
from pfxpold.testing import CheckTestCase, make_options, make_request, run_check
from tests.unit.tempdir import temporary_path

EXAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples"
)

RELAY_MAP = """\
192.0.2.10          scanner@example.com     OK
192.0.2.32/27       @example.com            OK
"""
REJECT = (
    "REJECT Sorry, this combination of sender and originating system does not match"
    " any of my policies."
)


def write(path: str, text: str) -> None:
    """
    Write a new version of a map the way an administrator should: beside
    it, then renamed into place.
    """
    with open(path + ".new", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".new", path)


class FileCheckTests(CheckTestCase):
    """
    Answers and settings of the file check.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = temporary_path(self)
        write(self.path, RELAY_MAP)

    def make_check(self, **table) -> FileCheck:
        settings = {
            "map": self.path,
            "lookup": ["client_address", "client_name"],
            "pair_with": ["sender"],
            "not_found": REJECT,
            **table,
        }
        return FileCheck(make_options(reactor=self.clock, **settings))

    def test_interfaces(self):
        """The check provides ICheck and IService."""
        check = self.make_check()
        verifyObject(ICheck, check)
        verifyObject(IService, check)

    def test_relay_acl(self):
        """Listed pairs answer their action, others not_found."""
        check = self.make_check()
        self.assertAction(
            check, make_request(client_address="192.0.2.10", sender="scanner@example.com"), "OK"
        )
        self.assertAction(
            check, make_request(client_address="192.0.2.40", sender="x@Example.com"), "OK"
        )
        self.assertAction(
            check, make_request(client_address="192.0.2.11", sender="scanner@example.com"), REJECT
        )

    def test_not_found_default(self):
        """Without not_found, a miss answers DUNNO."""
        write(self.path, "example.com REJECT no\n")
        check = FileCheck(make_options(reactor=self.clock, map=self.path, lookup=["sender_domain"]))
        self.assertAction(check, make_request(sender="a@example.org"), "DUNNO")
        self.assertAction(check, make_request(sender="a@EXAMPLE.com"), "REJECT no")

    def test_parent_domains_setting(self):
        """parent_domains selects how subdomains match."""
        write(self.path, "example.com REJECT no\n")
        check = FileCheck(
            make_options(
                reactor=self.clock, map=self.path, lookup=["sender"], parent_domains="implicit"
            )
        )
        self.assertAction(check, make_request(sender="a@mail.example.com"), "REJECT no")

    def test_control_characters_match_nothing(self):
        """
        Values are compared exactly: C{alice@example.com\\x00} (which slapd
        would read as alice) matches neither alice nor example.com, and
        answers not_found like any unknown value.
        """
        write(self.path, "alice@example.com OK\nexample.org OK\n192.0.2.10 OK\n")
        check = FileCheck(
            make_options(
                reactor=self.clock,
                map=self.path,
                lookup=["client_address", "sender"],
                not_found="REJECT unknown",
            )
        )
        self.assertAction(check, make_request(sender="alice@example.com"), "OK")
        for sender in ["alice@example.com\x00", "a@example.org\x00", "a@example.org\r"]:
            self.assertAction(check, make_request(sender=sender), "REJECT unknown")
        request = make_request(client_address="192.0.2.10\x00", sender="nobody@example.net")
        self.assertAction(check, request, "REJECT unknown")

    def test_case_sensitive_local_part(self):
        """case_sensitive_local_part keeps local parts apart by case."""
        write(self.path, "Joe@example.com OK\n")
        check = FileCheck(
            make_options(
                reactor=self.clock, map=self.path, lookup=["sender"], case_sensitive_local_part=True
            )
        )
        self.assertAction(check, make_request(sender="Joe@EXAMPLE.com"), "OK")
        self.assertAction(check, make_request(sender="joe@example.com"), "DUNNO")

    def test_errors_name_the_key(self):
        """Bad settings and a bad map are ConfigErrors naming the key and the line."""
        write(self.path, "192.0.2.10 scanner@example.com OK\nbogus line\n")
        error = self.assertRaises(ConfigError, self.make_check)
        self.assertIn("key 'map'", str(error))
        self.assertIn(f"{self.path}:2: expected 3 fields", str(error))
        error = self.assertRaises(ConfigError, self.make_check, map=temporary_path(self))
        self.assertIn("cannot read", str(error))
        error = self.assertRaises(ConfigError, self.make_check, lookup=["client_adress"])
        self.assertIn("key 'lookup'", str(error))
        error = self.assertRaises(ConfigError, self.make_check, pair_with=["sender_at_domain"])
        self.assertIn("key 'pair_with'", str(error))
        self.assertIn("look up sender", str(error))
        error = self.assertRaises(ConfigError, self.make_check, lookup=[])
        self.assertIn("at least one", str(error))
        error = self.assertRaises(ConfigError, self.make_check, parent_domains="yes")
        self.assertIn("key 'parent_domains'", str(error))
        error = self.assertRaises(ConfigError, self.make_check, reload_interval=-1)
        self.assertIn("key 'reload_interval'", str(error))

    def test_relay_acl_example(self):
        """examples/relay-acl-file.toml loads and answers the relay-ACL scenario."""
        configuration = load_configuration(os.path.join(EXAMPLES, "relay-acl-file.toml"), Clock())
        check = configuration.chain.entries[0].check
        self.assertAction(
            check, make_request(client_address="192.0.2.10", sender="scanner@example.com"), "OK"
        )
        self.assertAction(check, make_request(client_address="::ffff:192.0.2.40", sender=""), "OK")
        self.assertAction(
            check,
            make_request(
                client_address="198.51.100.1",
                client_name="bulk.mail.example.com",
                sender="newsletter@example.com",
            ),
            "OK",
        )
        self.assertAction(
            check, make_request(client_address="198.51.100.1", sender="scanner@example.com"), REJECT
        )
        self.assertEqual(
            str(configuration.chain.entries[0].on_error),
            "DEFER Transient internal error. Please try again later.",
        )


class ReloadTests(CheckTestCase):
    """
    The map is re-read when it changes, without a gap; a broken or missing
    file keeps the table in force.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = temporary_path(self)
        write(self.path, "192.0.2.1 OK\n")
        self.check = FileCheck(
            make_options(
                reactor=self.clock, map=self.path, lookup=["client_address"], reload_interval=5.0
            )
        )
        self.check.startService()
        self.addCleanup(self.check.stopService)
        self.request = make_request(client_address="192.0.2.1")

    def test_reload_on_change(self):
        """A new file is in force after the next poll."""
        self.assertAction(self.check, self.request, "OK")
        write(self.path, "192.0.2.1 REJECT changed\n")
        self.assertAction(self.check, self.request, "OK")
        with capturedLogs() as events:
            self.clock.advance(5)
        self.assertAction(self.check, self.request, "REJECT changed")
        self.assertTrue(any("loaded" in event.get("log_format", "") for event in events))

    def test_unchanged_not_reread(self):
        """An unchanged file is not parsed again."""
        before = self.check.map
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertIs(self.check.map, before)

    def test_broken_file_keeps_table(self):
        """A file with an error keeps the old table and logs the file, line and reason once."""
        write(self.path, "192.0.2.1 REJECT new\n192.0.2.2 FROBNICATE\n")
        with capturedLogs() as events:
            self.clock.advance(5)
            self.clock.advance(5)
        self.assertAction(self.check, self.request, "OK")
        errors = [event for event in events if event.get("log_level").name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["file"], os.path.abspath(self.path))
        self.assertEqual(errors[0]["line"], 2)
        self.assertIn("FROBNICATE", errors[0]["reason"])
        write(self.path, "192.0.2.1 REJECT fixed\n")
        self.clock.advance(5)
        self.assertAction(self.check, self.request, "REJECT fixed")

    def test_missing_file_keeps_table(self):
        """A file that disappears keeps the old table, logged once; it is read again when back."""
        os.unlink(self.path)
        with capturedLogs() as events:
            for _ in range(3):
                self.clock.advance(5)
        self.assertAction(self.check, self.request, "OK")
        errors = [event for event in events if event.get("log_level").name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("cannot read", errors[0]["reason"])
        write(self.path, "192.0.2.1 REJECT back\n")
        self.clock.advance(5)
        self.assertAction(self.check, self.request, "REJECT back")

    def test_stop(self):
        """Stopping the check stops polling."""
        self.assertTrue(self.clock.getDelayedCalls())
        self.check.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_reload(self):
        """reload_interval = 0 never polls."""
        check = FileCheck(
            make_options(
                reactor=self.clock, map=self.path, lookup=["client_address"], reload_interval=0
            )
        )
        check.startService()
        self.addCleanup(check.stopService)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the other check's timer only


class MemoTests(CheckTestCase):
    """
    The check remembers its answers by the values looked up, for as long
    as the table they came from is in force.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = temporary_path(self)
        write(self.path, "192.0.2.1 OK\nscanner@example.com REJECT no scanners\n")

    def make_check(self, **table) -> FileCheck:
        check = FileCheck(
            make_options(reactor=self.clock, map=self.path, reload_interval=5.0, **table)
        )
        check.startService()
        self.addCleanup(check.stopService)
        return check

    def test_answer_remembered(self):
        """A second request with the same values is answered from the memo, not the map."""
        check = self.make_check(lookup=["client_address"])
        request = make_request(client_address="192.0.2.1")
        self.assertAction(check, request, "OK")
        self.assertEqual(len(check.memo), 1)
        # Not read from the map again: a memo hit never looks there.
        check.map.lookup = None  # type: ignore[method-assign, assignment]
        self.assertAction(check, make_request(client_address="192.0.2.1"), "OK")

    def test_values_of_every_lookup_and_pair(self):
        """The memo tells requests apart by every lookup and pair_with value."""
        write(self.path, "192.0.2.1 scanner@example.com OK\n")
        check = self.make_check(
            lookup=["client_address"], pair_with=["sender"], not_found="REJECT no pair"
        )
        paired = make_request(client_address="192.0.2.1", sender="scanner@example.com")
        other = make_request(client_address="192.0.2.1", sender="other@example.com")
        for _ in range(2):
            self.assertAction(check, paired, "OK")
            self.assertAction(check, other, "REJECT no pair")
        self.assertEqual(len(check.memo), 2)

    def test_reload_forgets(self):
        """A reloaded map answers at once; nothing remembered from the old one is used."""
        check = self.make_check(lookup=["sender"])
        request = make_request(sender="scanner@example.com")
        self.assertAction(check, request, "REJECT no scanners")
        write(self.path, "scanner@example.com OK\n")
        self.clock.advance(5)
        self.assertAction(check, request, "OK")
        self.assertEqual(len(check.memo), 1)

    def test_bounded(self):
        """The memo holds at most MEMO_SIZE answers, and none for huge values."""
        check = self.make_check(lookup=["sender"])
        check.memo.max_entries = 0
        self.assertAction(check, make_request(sender="scanner@example.com"), "REJECT no scanners")
        self.assertEqual(len(check.memo), 0)
        check = self.make_check(lookup=["sender"])
        huge = "a" * MAX_MEMO_KEY_LENGTH + "@example.com"
        self.assertAction(check, make_request(sender=huge), "DUNNO")
        self.assertEqual(len(check.memo), 0)

    def test_failed_lookup_not_remembered(self):
        """A regexp rule whose result fails is not remembered: it fails every time."""
        write(self.path, "/^(.*)@old\\.example$/ REDIRECT $1@new.example\n")
        check = self.make_check(format="regexp", lookup=["sender"])
        request = make_request(sender="a@b@old.example")
        for _ in range(2):
            self.failureResultOf(run_check(check, request), TableLookupError)
        self.assertEqual(len(check.memo), 0)


HELO_TABLE = """\
# Dynamic-looking client names, then the null sender.
/^(dsl|dyn|dhcp|ppp|pool)[-.0-9]/  DEFER_IF_PERMIT Dynamic-looking host $1 deferred
/^unknown$/                        DEFER_IF_PERMIT No reverse DNS
/^<>$/                             REJECT No bounces here
"""


class RegexpFormatTests(CheckTestCase):
    """
    The file check with format = "regexp" and "pcre".
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = temporary_path(self, "helo.regexp")
        write(self.path, HELO_TABLE)

    def make_check(self, **table) -> FileCheck:
        settings = {
            "map": self.path,
            "format": "regexp",
            "lookup": ["client_name", "sender"],
            **table,
        }
        return FileCheck(make_options(reactor=self.clock, **settings))

    def test_interfaces(self):
        """The check provides ICheck, IConfigWarnings, IExplainable and IService."""
        check = self.make_check()
        for interface in (ICheck, IConfigWarnings, IExplainable, IService):
            verifyObject(interface, check)

    def test_answers(self):
        """Each lookup attribute's whole value is matched, in order; else not_found."""
        check = self.make_check(not_found="OK")
        self.assertAction(
            check,
            make_request(client_name="DSL-1.example.net", sender="a@example.com"),
            "DEFER_IF_PERMIT Dynamic-looking host DSL deferred",
        )
        self.assertAction(check, make_request(client_name="unknown"), "DEFER_IF_PERMIT No reverse DNS")
        self.assertAction(
            check, make_request(client_name="mx.example.com", sender=""), "REJECT No bounces here"
        )
        self.assertAction(check, make_request(client_name="mx.example.com"), "OK")

    def test_pcre(self):
        """format = "pcre" reads a pcre table."""
        write(self.path, "/^mx\\d+\\./ OK\n")
        check = self.make_check(format="pcre")
        self.assertAction(check, make_request(client_name="mx12.example.com"), "OK")
        self.assertAction(check, make_request(client_name="www.example.com"), "DUNNO")

    def test_failed_substitution_fails_the_check(self):
        """A $n result that makes no valid action fails the request (on_error applies)."""
        write(self.path, "/^(.*)@old\\.example$/ REDIRECT $1@new.example\n")
        check = self.make_check(lookup=["sender"])
        failure = self.failureResultOf(
            run_check(check, make_request(sender="a@b@old.example")), TableLookupError
        )
        self.assertIn(":1:", failure.getErrorMessage())

    def test_errors(self):
        """Access-map settings and a broken table are errors naming the key and the line."""
        error = self.assertRaises(ConfigError, self.make_check, pair_with=["sender"])
        self.assertIn("key 'pair_with': is for access maps only", str(error))
        error = self.assertRaises(ConfigError, self.make_check, format="cidr")
        self.assertIn("key 'format'", str(error))
        write(self.path, "/a/ OK\n/(?=b)/ OK\n")
        error = self.assertRaises(ConfigError, self.make_check, format="pcre")
        self.assertIn(f"key 'map': {self.path}:2: '/(?=b)/': not supported by RE2", str(error))

    def test_warnings(self):
        """Rules behind a catch-all are config warnings naming both lines."""
        self.assertEqual(self.make_check().config_warnings(), [])
        write(self.path, "/a/ OK\n/^/ DUNNO\n/b/ OK\n")
        self.assertEqual(
            self.make_check().config_warnings(),
            [f"{self.path}:3: never matches: the rule on line 2 matches every value first"],
        )

    def test_explain(self):
        """explain names each value looked up and the line that matched."""
        check = self.make_check()
        steps = check.explain(make_request(client_name="mx.example.com", sender="dyn@x"))
        self.assertEqual(
            steps,
            [
                ("client_name='mx.example.com'", False, "no rule matches"),
                ("sender='dyn@x'", False, "no rule matches"),
            ],
        )
        steps = check.explain(make_request(client_name="ppp7.example.net"))
        self.assertEqual(
            steps,
            [
                (
                    "client_name='ppp7.example.net'",
                    True,
                    "helo.regexp:2: DEFER_IF_PERMIT Dynamic-looking host ppp deferred",
                )
            ],
        )

    def test_reload(self):
        """A changed table is read again, like an access map."""
        check = self.make_check()
        check.startService()
        self.addCleanup(check.stopService)
        write(self.path, "/^mx/ REJECT changed\n")
        self.clock.advance(5)
        self.assertAction(check, make_request(client_name="mx.example.com"), "REJECT changed")
        write(self.path, "/^mx/ FROBNICATE\n")
        with capturedLogs() as events:
            self.clock.advance(5)
        self.assertAction(check, make_request(client_name="mx.example.com"), "REJECT changed")
        self.assertTrue(any(event.get("line") == 1 for event in events))
