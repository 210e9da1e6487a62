"""
Tests for C{pfxpold-admin} (pfxpold.admin): its command line, the commands
run on checks over the in-memory store (with a Clock), their tables and
JSON, and its one-line errors. Real SQLite and Redis stores beside a
running daemon are in tests/integration/test_admin.py.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pfxpold import admin
from pfxpold.checks.greylist import GreylistCheck
from pfxpold.checks.quota import QuotaCheck
from pfxpold.config import CheckOptions, load_configuration
from pfxpold.testing import make_request, run_check
from tests.unit.tempdir import temporary_directory

# 2027-01-15 08:00:00 UTC: an hour window ends at 09:00.
START = 1_800_000_000.0
assert START % 3600 == 0


def result_of(test: SynchronousTestCase, coroutine: Any) -> Any:
    return test.successResultOf(Deferred.fromCoroutine(coroutine))


class ParserTests(SynchronousTestCase):
    """
    The command line.
    """

    def parse(self, *argv: str) -> Any:
        return admin.make_parser().parse_args(list(argv))

    def test_common_options_before_or_after(self) -> None:
        """
        --config, --check, --timeout and --json may come before or after
        the command; given before, they are kept after.
        """
        before = self.parse("--config", "a.toml", "--json", "--timeout", "3", "quota", "show")
        after = self.parse("quota", "show", "--config", "a.toml", "--json", "--timeout", "3")
        for arguments in (before, after):
            self.assertEqual(
                (arguments.config, arguments.json, arguments.timeout, arguments.check),
                ("a.toml", True, 3.0, None),
            )
        defaults = self.parse("--config", "a.toml", "whitelist", "list")
        self.assertEqual((defaults.json, defaults.timeout), (False, admin.DEFAULT_TIMEOUT))

    def test_commands(self) -> None:
        """
        Each area has its commands and their options.
        """
        arguments = self.parse("quota", "reset", "--all")
        self.assertEqual(
            (arguments.area, arguments.command, arguments.all), ("quota", "reset", True)
        )
        arguments = self.parse("greylist", "delete", "--key", "k1", "--key", "k2")
        self.assertEqual(arguments.key, ["k1", "k2"])
        arguments = self.parse(
            "whitelist", "add", "--sender-domain", "example.org", "--comment", "x"
        )
        self.assertEqual((arguments.sender_domain, arguments.client), ("example.org", None))

    def test_whitelist_needs_one_kind(self) -> None:
        """
        A whitelist entry is a client or a sender domain, exactly one.
        """
        self.patch(admin.argparse.ArgumentParser, "exit", self._exit)
        self.patch(admin.argparse.ArgumentParser, "_print_message", lambda *args: None)
        for argv in (
            ["whitelist", "add"],
            ["whitelist", "add", "--client", "192.0.2.1", "--sender-domain", "example.org"],
            ["quota"],
        ):
            self.assertRaises(SystemExit, self.parse, *argv)

    @staticmethod
    def _exit(parser: Any, status: int = 0, message: Any = None) -> None:
        raise SystemExit(status)


class CommandTests(SynchronousTestCase):
    """
    The commands, on checks built from their tables over one in-memory
    store.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.shared: dict[Any, Any] = {}
        self.serial = 0
        self.quota = QuotaCheck(
            self.options(
                "q",
                key=["sasl_username"],
                limits=[
                    {"period": "hour", "max": 5},
                    {"period": "sliding", "seconds": 600, "max": 3, "precision": 60},
                ],
                unlimited=["boss"],
            )
        )
        self.greylist = GreylistCheck(self.options("g", delay=300))

    def options(self, name: str, **table: Any) -> CheckOptions:
        return CheckOptions(
            table,
            name=name,
            reactor=self.clock,
            document={"stores": {"default": {"type": "memory"}}},
            shared=self.shared,
        )

    def arguments(self, *argv: str) -> Any:
        return admin.make_parser().parse_args(list(argv))

    def send(self, user: str, instance: str) -> str:
        request = make_request("eod", sasl_username=user, instance=instance)
        return str(self.successResultOf(run_check(self.quota, request)))

    def count(self, user: str, messages: int) -> None:
        for _ in range(messages):
            self.serial += 1
            request = make_request("eod", sasl_username=user, instance=f"{user}.{self.serial}")
            self.successResultOf(run_check(self.quota, request))

    def test_quota_show(self) -> None:
        """
        show: the identity the check computes from the values given, its
        count in every window, the limits, and when each count is back to
        zero (a fixed window's end; the last used bucket leaving a
        sliding window).
        """
        self.count("alice", 2)
        self.clock.advance(90)
        self.count("alice", 1)
        arguments = self.arguments("quota", "show", "--sasl-username", "alice")
        identity = admin.quota_identity(self.quota, arguments)
        self.assertEqual(identity, "alice")
        result = result_of(self, admin.quota_show(self.quota, identity))
        limits = [(x["limit"], x["count"], x["max"], x["resets_at"]) for x in result["limits"]]
        self.assertEqual(limits, [("hour", 3, 5, START + 3600), ("600s", 3, 3, START + 120 + 600)])
        text = admin.render(arguments, result)
        self.assertIn("quota q (stores.default): alice\n", text)
        self.assertRegex(text, r"hour +hour +3 +5 +2027-01-15 09:00:00 UTC \(in 58m 30s\)")
        self.assertRegex(text, r"600s +sliding 600s +3 +3 +2027-01-15 08:12:00 UTC \(in 10m 30s\)")
        json.dumps(result)

    def test_quota_show_empty_and_unlimited(self) -> None:
        """
        An identity without counts shows zeros and no reset time; an
        unlimited one says so.
        """
        arguments = self.arguments("quota", "show", "--identity", "boss")
        result = result_of(self, admin.quota_show(self.quota, "nobody"))
        self.assertEqual([x["count"] for x in result["limits"]], [0, 0])
        self.assertEqual([x["resets_at"] for x in result["limits"]], [None, None])
        result = result_of(self, admin.quota_show(self.quota, "boss"))
        self.assertEqual(
            admin.render(arguments, result),
            "quota q (stores.default): boss: unlimited (nothing is counted)",
        )

    def test_quota_identity_needs_values(self) -> None:
        """
        Without the values the check counts by, the error names the
        options to give.
        """
        error = self.assertRaises(
            admin.AdminError,
            admin.quota_identity,
            self.quota,
            self.arguments("quota", "show", "--sender", "a@example.com"),
        )
        self.assertEqual(
            str(error), "quota q counts by sasl_username: give --sasl-username (or --identity)"
        )

    def test_quota_identity_options_named_once(self) -> None:
        """
        Key parts computed from one option (sender and sender_domain)
        name it once.
        """
        check = QuotaCheck(
            self.options(
                "q2",
                key=["sender", "sender_domain", "client_network"],
                limits=[{"period": "hour", "max": 5}],
            )
        )
        error = self.assertRaises(
            admin.AdminError,
            admin.quota_identity,
            check,
            self.arguments("quota", "show", "--client-address", "192.0.2.1"),
        )
        self.assertEqual(
            str(error),
            "quota q2 counts by sender, sender_domain, client_network:"
            " give --sender --client-address (or --identity)",
        )
        arguments = self.arguments(
            "quota", "show", "--client-address", "192.0.2.1", "--sender", "a@Example.com"
        )
        self.assertEqual(
            admin.quota_identity(check, arguments), "a@example.com,example.com,192.0.2.0/24"
        )

    def test_quota_reset(self) -> None:
        """
        reset forgets one identity's counts (the next message passes where
        it was refused), or every identity's with --all.
        """
        self.count("alice", 3)
        self.count("bob", 1)
        self.assertNotEqual(self.send("alice", "alice.x"), "DUNNO")
        result = result_of(self, admin.quota_reset(self.quota, "alice", False))
        self.assertEqual(result["removed"], 2)
        self.assertEqual(self.send("alice", "alice.y"), "DUNNO")
        show = result_of(self, admin.quota_show(self.quota, "bob"))
        self.assertEqual(show["limits"][0]["count"], 1)
        result = result_of(self, admin.quota_reset(self.quota, None, True))
        self.assertEqual(result["removed"], 4)
        self.assertEqual(self.quota.store.counts, {})
        arguments = self.arguments("quota", "reset", "--all")
        self.assertEqual(
            admin.render(arguments, result), "quota q: every identity: 4 counter keys removed"
        )

    def greylist_request(self, client: str, sender: str, recipient: str) -> str:
        request = make_request("rcpt", client_address=client, sender=sender, recipient=recipient)
        return str(self.successResultOf(run_check(self.greylist, request)))

    def test_greylist_list(self) -> None:
        """
        list: the entries of a client (its network), of a sender (as the
        check normalises it) or of a recipient, with age and state.
        """
        self.greylist_request("192.0.2.7", "alice+x@Example.com", "bob@example.net")
        self.clock.advance(400)
        self.greylist_request("192.0.2.8", "carol@example.com", "bob@example.net")
        self.greylist_request("198.51.100.1", "alice@example.com", "dave@example.net")
        self.greylist_request("192.0.2.7", "alice@example.com", "bob@example.net")
        result = result_of(
            self,
            admin.greylist_list(
                self.greylist, self.arguments("greylist", "list", "--client", "192.0.2.99")
            ),
        )
        rows = [(e["sender"], e["state"], e["passes"], e["age"]) for e in result["entries"]]
        self.assertEqual(
            rows,
            [("alice@example.com", "passed", 1, 400.0), ("carol@example.com", "waiting", 0, 0.0)],
        )
        arguments = self.arguments("greylist", "list", "--sender", "prvs=1234=alice@EXAMPLE.COM")
        result = result_of(self, admin.greylist_list(self.greylist, arguments))
        self.assertEqual(
            [e["client_network"] for e in result["entries"]], ["192.0.2.0/24", "198.51.100.0/24"]
        )
        text = admin.render(arguments, result)
        self.assertEqual(
            text.splitlines()[0].split(),
            ["CLIENT", "SENDER", "RECIPIENT", "STATE", "AGE", "FORGOTTEN", "AT", "KEY"],
        )
        self.assertRegex(
            text.splitlines()[1],
            r"^192\.0\.2\.0/24 +alice@example\.com +bob@example\.net +passed \(1x\) +6m 40s +",
        )
        arguments = self.arguments("greylist", "list", "--recipient", "dave@EXAMPLE.net")
        result = result_of(self, admin.greylist_list(self.greylist, arguments))
        self.assertEqual([e["sender"] for e in result["entries"]], ["alice@example.com"])

    def test_greylist_bad_client(self) -> None:
        """
        A client that is not an address is refused in one line.
        """
        arguments = self.arguments("greylist", "list", "--client", "mx.example.com")
        error = self.assertRaises(
            admin.AdminError, admin.greylist_filters, self.greylist, arguments
        )
        self.assertEqual(str(error), "--client 'mx.example.com' is not an IP address")

    def test_greylist_delete(self) -> None:
        """
        delete by the three values (the check computes the key): the next
        attempt is new again; by a client alone: all of its entries.
        """
        self.greylist_request("192.0.2.7", "alice@example.com", "bob@example.net")
        self.greylist_request("192.0.2.7", "carol@example.com", "bob@example.net")
        self.greylist_request("203.0.113.5", "carol@example.com", "bob@example.net")
        self.clock.advance(300)
        arguments = self.arguments(
            "greylist",
            "delete",
            "--client",
            "192.0.2.1",
            "--sender",
            "alice@example.com",
            "--recipient",
            "bob@example.net",
        )
        result = result_of(self, admin.greylist_delete(self.greylist, arguments))
        self.assertEqual(result["removed"], 1)
        self.assertEqual(admin.exit_status(arguments, result), 0)
        self.assertTrue(
            self.greylist_request("192.0.2.7", "alice@example.com", "bob@example.net").startswith(
                "DEFER_IF_PERMIT"
            )
        )
        result = result_of(self, admin.greylist_delete(self.greylist, arguments))
        self.assertEqual((result["removed"], admin.exit_status(arguments, result)), (1, 0))
        result = result_of(self, admin.greylist_delete(self.greylist, arguments))
        self.assertEqual((result["removed"], admin.exit_status(arguments, result)), (0, 1))
        arguments = self.arguments("greylist", "delete", "--client", "192.0.2.1")
        result = result_of(self, admin.greylist_delete(self.greylist, arguments))
        self.assertEqual(result["removed"], 1)
        self.assertEqual(len(self.greylist.store.triplets), 1)

    def test_whitelist(self) -> None:
        """
        add stores the entry in the form the check compares (and the check
        honours it); list shows it; remove takes it away.
        """
        self.clock.advance(0.5)
        self.greylist.whitelist_refresh = 0
        arguments = self.arguments(
            "whitelist", "add", "--client", "192.0.2.77/24", "--comment", "ticket\x1b7"
        )
        result = result_of(self, admin.whitelist(self.greylist, arguments))
        self.assertEqual(
            admin.render(arguments, result),
            "whitelist (stores.default): client 192.0.2.0/24 added; greylist checks honour it within 0s",
        )
        self.assertEqual(
            self.greylist_request("192.0.2.7", "a@example.com", "b@example.net"), "DUNNO"
        )
        arguments = self.arguments("whitelist", "list")
        result = result_of(self, admin.whitelist(self.greylist, arguments))
        self.assertEqual(
            result["entries"],
            [
                {
                    "kind": "client",
                    "value": "192.0.2.0/24",
                    "added": START + 0.5,
                    "comment": "ticket\x1b7",
                }
            ],
        )
        self.assertEqual(
            admin.render(arguments, result).splitlines()[1].split(),
            ["client", "192.0.2.0/24", "2027-01-15", "08:00:00", "UTC", "ticket\\x1b7"],
        )
        arguments = self.arguments("whitelist", "remove", "--client", "192.0.2.0/24")
        result = result_of(self, admin.whitelist(self.greylist, arguments))
        self.assertEqual((result["removed"], admin.exit_status(arguments, result)), (True, 0))
        self.assertTrue(
            self.greylist_request("192.0.2.7", "a@example.com", "b@example.net").startswith(
                "DEFER_IF_PERMIT"
            )
        )
        arguments = self.arguments("whitelist", "add", "--sender-domain", "not a domain")
        error = self.assertRaises(admin.AdminError, admin._whitelist_request, arguments, START)
        self.assertEqual(str(error), "whitelist: 'not a domain' is not a domain")


class ErrorTests(SynchronousTestCase):
    """
    What cannot be done is said in one line on standard error, with exit
    status 2.
    """

    def run_admin(self, config: str, *argv: str) -> tuple[int, str, str]:
        directory = temporary_directory(self)
        path = os.path.join(directory, "pfxpold.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config)
        arguments = admin.make_parser().parse_args(["--config", path, *argv])
        out, err = io.StringIO(), io.StringIO()
        status = self.successResultOf(
            Deferred.fromCoroutine(admin._main(Clock(), arguments, out, err))
        )
        return status, out.getvalue(), err.getvalue().replace(directory, "DIR")

    def test_memory_store(self) -> None:
        """
        The in-memory store cannot be reached from outside the daemon: the
        tool says it needs SQLite or Redis.
        """
        config = '[stores.m]\ntype = "memory"\n[[check]]\ntype = "greylist"\nstore = "m"\n'
        status, out, err = self.run_admin(config, "whitelist", "list")
        self.assertEqual(status, 2)
        self.assertEqual(out, "")
        self.assertEqual(
            err,
            "pfxpold-admin: stores.m is a memory store: its state lives inside the daemon and"
            " cannot be reached from outside; pfxpold-admin needs an SQLite or Redis store\n",
        )

    def test_missing_sqlite_file(self) -> None:
        """
        A missing SQLite file is an error, not a new empty file.
        """
        config = '[[check]]\ntype = "greylist"\n'
        status, out, err = self.run_admin(config, "greylist", "list")
        self.assertEqual(status, 2)
        self.assertEqual(
            err,
            "pfxpold-admin: stores.default: DIR/pfxpold-state.sqlite3: no such file"
            " (has the daemon run?)\n",
        )

    def test_check_choice(self) -> None:
        """
        Without a check of the kind, or with several and no --check, the
        error names them.
        """
        config = (
            '[[check]]\nname = "g1"\ntype = "greylist"\n[[check]]\nname = "g2"\ntype = "greylist"\n'
        )
        status, out, err = self.run_admin(config, "greylist", "list")
        self.assertEqual(
            (status, err),
            (
                2,
                "pfxpold-admin: DIR/pfxpold.toml: several greylist checks (g1, g2); use --check NAME\n",
            ),
        )
        status, out, err = self.run_admin(config, "quota", "show", "--identity", "x")
        self.assertEqual(
            (status, err), (2, "pfxpold-admin: DIR/pfxpold.toml: has no quota check\n")
        )
        status, out, err = self.run_admin(config, "greylist", "list", "--check", "g3")
        self.assertEqual(
            (status, err),
            (
                2,
                "pfxpold-admin: DIR/pfxpold.toml: no greylist check named 'g3' (greylist: g1, g2)\n",
            ),
        )

    def test_bad_configuration(self) -> None:
        """
        A configuration error is the daemon's one line.
        """
        status, out, err = self.run_admin("[[check]]\ntype = 'nope'\n", "whitelist", "list")
        self.assertEqual(status, 2)
        self.assertTrue(err.startswith("pfxpold-admin: DIR/pfxpold.toml: "), err)
        self.assertEqual(err.count("\n"), 1)

    def test_finds_checks_in_configuration(self) -> None:
        """
        find_check() picks the check by name among the configured ones.
        """
        directory = temporary_directory(self)
        path = os.path.join(directory, "c.toml")
        with open(path, "w") as f:
            f.write(
                '[[check]]\nname = "g1"\ntype = "greylist"\n[[check]]\nname = "q"\ntype = "quota"\nlimits = [{period = "hour", max = 1}]\n'
            )
        configuration = load_configuration(path, Clock())
        self.assertEqual(admin.find_check(configuration, QuotaCheck, None).name, "q")
        self.assertEqual(admin.find_check(configuration, GreylistCheck, "g1").name, "g1")


class FormatTests(SynchronousTestCase):
    """
    Durations, times and tables.
    """

    def test_duration(self) -> None:
        """
        The two largest units, signed as in/ago when asked.
        """
        self.assertEqual(admin.duration(0), "0s")
        self.assertEqual(admin.duration(3725), "1h 2m")
        self.assertEqual(admin.duration(90061), "1d 1h")
        self.assertEqual(admin.duration(59, signed=True), "in 59s")
        self.assertEqual(admin.duration(-120, signed=True), "2m ago")

    def test_table(self) -> None:
        """
        Columns as wide as their widest cell, no trailing spaces.
        """
        self.assertEqual(admin.table(["A", "BB"], [["xxx", "y"], ["z", ""]]), "A    BB\nxxx  y\nz")
