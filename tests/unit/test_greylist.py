"""
Tests for the greylist check (pfxpold.checks.greylist) on the in-memory
store, with a Clock for the delay, the retry window and expiry.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from pfxpold.checks.greylist import GreylistCheck, normalise_sender, whitelist_entry
from pfxpold.config import CheckOptions, ConfigError
from pfxpold.interfaces import ICheck, IDecisionListener
from pfxpold.request import PolicyRequest
from pfxpold.state import StoreError, Triplet, WhitelistEntry
from pfxpold.testing import CheckTestCase, make_request, run_check

START = 1_800_000_000.0
DEFERRED = "DEFER_IF_PERMIT Greylisted, please try again in {} seconds"


class NormaliseSenderTests(CheckTestCase):
    """
    normalise_sender().
    """

    def test_domain_lowercased(self) -> None:
        """
        The domain is lowercased, the local part kept.
        """
        self.assertEqual(normalise_sender("Alice@Example.COM"), "Alice@example.com")

    def test_extension(self) -> None:
        """
        An address extension is removed, with configurable separators.
        """
        self.assertEqual(normalise_sender("alice+lists@example.com"), "alice@example.com")
        self.assertEqual(normalise_sender("alice-lists@example.com", "+-"), "alice@example.com")
        self.assertEqual(normalise_sender("alice+x@example.com", ""), "alice+x@example.com")
        self.assertEqual(normalise_sender("+x@example.com"), "+x@example.com")

    def test_batv(self) -> None:
        """
        A BATV tag is removed, unless disabled.
        """
        self.assertEqual(normalise_sender("prvs=1234abcdef=bob@example.com"), "bob@example.com")
        self.assertEqual(
            normalise_sender("prvs=1234abcdef=bob@example.com", strip_batv=False),
            "prvs=1234abcdef=bob@example.com",
        )

    def test_srs(self) -> None:
        """
        An SRS address is turned back into the original sender.
        """
        self.assertEqual(
            normalise_sender("SRS0=HHH=TT=Orig.Example=carol@forwarder.example"),
            "carol@orig.example",
        )
        self.assertEqual(
            normalise_sender("SRS1=HHH=fw1.example==HHH=TT=orig.example=carol@fw2.example"),
            "carol@orig.example",
        )
        self.assertEqual(
            normalise_sender("SRS0=HHH=TT=orig.example=carol@fw.example", strip_srs=False),
            "SRS0=HHH=TT=orig.example=carol@fw.example",
        )

    def test_null_sender(self) -> None:
        """
        The null sender stays empty.
        """
        self.assertEqual(normalise_sender(""), "")


class GreylistTests(CheckTestCase):
    """
    The greylist check on the in-memory store.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)

    def make(self, **table: Any) -> GreylistCheck:
        self.options = CheckOptions(
            table,
            name="greylist",
            reactor=self.clock,
            document={"stores": {"default": {"type": "memory"}}},
            shared={},
        )
        check = GreylistCheck(self.options)
        self.assertEqual(self.options.unused(), [])
        return check

    def request(self, **changes: str) -> PolicyRequest:
        changes.setdefault("client_address", "192.0.2.10")
        changes.setdefault("sender", "alice@example.com")
        changes.setdefault("recipient", "bob@example.net")
        return make_request("rcpt", **changes)

    def answer(self, check: GreylistCheck, **changes: str) -> str:
        return str(self.successResultOf(run_check(check, self.request(**changes))))

    def test_interface(self) -> None:
        """
        The check provides ICheck, and not IDecisionListener: it records a
        triplet in the store operation that decides its own answer.
        """
        check = self.make()
        self.assertTrue(verifyObject(ICheck, check))
        self.assertFalse(IDecisionListener.providedBy(check))

    def test_delay_then_pass(self) -> None:
        """
        The first attempt is deferred with the wait in the text; an early
        retry too; a retry after the delay passes, and later ones too.
        """
        check = self.make(delay=300)
        self.assertEqual(self.answer(check), DEFERRED.format(300))
        self.clock.advance(120)
        self.assertEqual(self.answer(check), DEFERRED.format(180))
        self.clock.advance(180)
        self.assertEqual(self.answer(check), "DUNNO")
        self.clock.advance(86400)
        self.assertEqual(self.answer(check), "DUNNO")

    def test_retry_window(self) -> None:
        """
        A retry after the retry window is a new first attempt.
        """
        check = self.make(delay=300, retry_window=3600)
        self.answer(check)
        self.clock.advance(3601)
        self.assertEqual(self.answer(check), DEFERRED.format(300))

    def test_triplet(self) -> None:
        """
        The same /24, the normalised sender and the recipient make one
        triplet; another sender, recipient or network is another.
        """
        check = self.make(delay=60)
        self.answer(check)
        self.clock.advance(60)
        self.assertEqual(
            self.answer(
                check,
                client_address="192.0.2.99",
                sender="prvs=0123456789=alice+news@EXAMPLE.com",
                recipient="bob@EXAMPLE.net",
            ),
            "DUNNO",
        )
        self.assertEqual(self.answer(check, recipient="carol@example.net"), DEFERRED.format(60))
        self.assertEqual(self.answer(check, sender="dave@example.com"), DEFERRED.format(60))
        self.assertEqual(self.answer(check, client_address="192.0.3.10"), DEFERRED.format(60))

    def test_ipv6_prefix(self) -> None:
        """
        IPv6 clients are grouped by the configured prefix (/64 by default).
        """
        check = self.make(delay=60, ipv6_prefix=48)
        self.assertEqual(
            check.network(self.request(client_address="2001:db8:1:2::1")), "2001:db8:1::/48"
        )
        self.answer(check, client_address="2001:db8:1:2::1")
        self.clock.advance(60)
        self.assertEqual(self.answer(check, client_address="2001:db8:1:ffff::9"), "DUNNO")

    def test_auto_whitelist(self) -> None:
        """
        After N passed retries the client network is whitelisted: a new
        triplet from it passes at once.
        """
        check = self.make(delay=60, auto_whitelist_after=2)
        for recipient in ("r1@example.net", "r2@example.net"):
            self.answer(check, recipient=recipient)
        self.clock.advance(60)
        self.assertEqual(self.answer(check, recipient="r1@example.net"), "DUNNO")
        self.assertEqual(self.answer(check, recipient="r3@example.net"), DEFERRED.format(60))
        self.assertEqual(self.answer(check, recipient="r2@example.net"), "DUNNO")
        self.assertEqual(self.answer(check, recipient="r4@example.net"), "DUNNO")
        self.assertEqual(self.answer(check, client_address="198.51.100.1"), DEFERRED.format(60))

    def test_whitelists(self) -> None:
        """
        Whitelisted client networks, client names (and their subdomains)
        and recipient domains are never greylisted.
        """
        check = self.make(
            whitelist_clients=["192.0.2.0/28", "2001:db8::/32"],
            whitelist_client_names=["Trusted.example"],
            whitelist_recipient_domains=["postmaster.example"],
        )
        self.assertEqual(self.answer(check, client_address="192.0.2.1"), "DUNNO")
        self.assertEqual(self.answer(check, client_address="2001:db8::5"), "DUNNO")
        self.assertEqual(
            self.answer(check, client_address="203.0.113.1", client_name="mx1.trusted.example."),
            "DUNNO",
        )
        self.assertEqual(
            self.answer(check, client_address="203.0.113.1", recipient="x@postmaster.example"),
            "DUNNO",
        )
        self.assertEqual(
            self.answer(check, client_address="203.0.113.1", client_name="untrusted.example"),
            DEFERRED.format(300),
        )

    def test_header(self) -> None:
        """
        With header = true, the passing retry gets an X-Greylist header
        with the delay, as postgrey adds; later ones do not.
        """
        check = self.make(delay=60, header=True, hostname="mx.example")
        self.answer(check)
        self.clock.advance(75)
        self.assertEqual(
            self.answer(check),
            "PREPEND X-Greylist: delayed 75 seconds by pfxpold at mx.example;"
            " Fri, 15 Jan 2027 08:01:15 GMT",
        )
        self.assertEqual(self.answer(check), "DUNNO")

    def test_only_rcpt(self) -> None:
        """
        Other stages (PREPEND is not allowed at END-OF-MESSAGE), and
        requests without a client address, pass untouched.
        """
        check = self.make()
        self.assertEqual(str(self.successResultOf(run_check(check, make_request("eod")))), "DUNNO")
        self.assertEqual(str(self.successResultOf(run_check(check, make_request("data")))), "DUNNO")
        self.assertEqual(self.answer(check, client_address="unknown"), "DUNNO")

    def test_expiry_while_running(self) -> None:
        """
        The store's timer forgets expired triplets while the daemon runs.
        """
        check = self.make(delay=60, retry_window=600, lifetime=3600)
        store = check.store
        store.startService()
        self.addCleanup(store.stopService)
        self.answer(check)
        self.assertEqual(len(store.triplets), 1)
        self.clock.pump([300, 300])
        self.assertEqual(len(store.triplets), 0)

    def test_store_failure(self) -> None:
        """
        A store failure fails the check, so its on_error applies.
        """
        check = self.make()
        check.store.greylist = lambda *args: fail(StoreError("down"))
        self.failureResultOf(run_check(check, self.request()), StoreError)

    def test_time_offset(self) -> None:
        """
        time_offset moves the greylist's clock.
        """
        self.assertEqual(self.make(time_offset=10.0).now(), START + 10)

    def test_configuration_errors(self) -> None:
        """
        Mistakes in the table are reported with the key.
        """
        cases = [
            ({"delay": -1}, "delay"),
            ({"delay": 600, "retry_window": 300}, "retry_window"),
            ({"whitelist_clients": ["not a network"]}, "whitelist_clients"),
            ({"ipv4_prefix": 33}, "ipv4_prefix"),
            ({"action": "DEFER_IF_PERMIT {minutes}"}, "action"),
            ({"whitelist_refresh": -1}, "whitelist_refresh"),
        ]
        for table, key in cases:
            error = self.assertRaises(ConfigError, self.make, **table)
            self.assertIn(f"key '{key}'", str(error), table)

    def test_clear_triplet_kept(self) -> None:
        """
        The store gets the triplet in clear, normalised as compared, under
        the key the check's keys() computes (what pfxpold-admin lists and
        deletes by).
        """
        check = self.make()
        self.answer(check, sender="alice+news@EXAMPLE.com", recipient="Bob@Example.NET")
        clear = Triplet("192.0.2.0/24", "alice@example.com", "Bob@example.net")
        key = check.keys(clear)[0]
        self.assertTrue(key.startswith(check.key_prefix("192.0.2.0/24")))
        self.assertEqual(check.store.clear, {key: clear})
        self.assertEqual(
            check.triplet("192.0.2.0/24", "alice+x@example.COM", "Bob@EXAMPLE.net"), clear
        )

    def test_runtime_whitelist(self) -> None:
        """
        A client network or a sender domain (and its subdomains) on the
        store's run-time whitelist is not greylisted; other clients still
        are.
        """
        check = self.make(whitelist_refresh=0)
        store = check.store
        self.successResultOf(store.whitelist_add(WhitelistEntry("client", "192.0.2.0/25")))
        self.successResultOf(store.whitelist_add(WhitelistEntry("sender", "example.org")))
        self.assertEqual(self.answer(check, client_address="192.0.2.7"), "DUNNO")
        self.assertEqual(self.answer(check, client_address="192.0.2.200"), DEFERRED.format(300))
        self.assertEqual(
            self.answer(check, client_address="198.51.100.1", sender="x@lists.Example.org"),
            "DUNNO",
        )
        self.assertEqual(
            self.answer(
                check, client_address="198.51.100.1", sender="SRS0=h=tt=example.org=x@fw.example"
            ),
            "DUNNO",
        )
        self.assertEqual(
            self.answer(check, client_address="198.51.100.1", sender="x@example.org.evil"),
            DEFERRED.format(300),
        )
        self.assertEqual(len(store.triplets), 2)

    def test_runtime_whitelist_cached(self) -> None:
        """
        The run-time whitelist is read once per whitelist_refresh seconds
        of the check's clock: an entry added meanwhile counts from the next
        read.
        """
        check = self.make(whitelist_refresh=10)
        store = check.store
        reads = []
        read = store.whitelist_list

        def counted() -> Any:
            reads.append(self.clock.seconds())
            return read()

        store.whitelist_list = counted
        self.assertEqual(self.answer(check), DEFERRED.format(300))
        self.successResultOf(store.whitelist_add(WhitelistEntry("client", "192.0.2.0/24")))
        self.clock.advance(9)
        self.assertEqual(self.answer(check), DEFERRED.format(291))
        self.clock.advance(1)
        self.assertEqual(self.answer(check), "DUNNO")
        self.assertEqual(reads, [START, START + 10])

    def test_runtime_whitelist_one_read(self) -> None:
        """
        Requests that come while the whitelist is read wait for that one
        read; a failed read fails them (on_error applies) and is not kept;
        a request given up meanwhile (cancelled) is left alone.
        """
        check = self.make(whitelist_refresh=10)
        pending: list[Deferred[Any]] = []

        def held() -> Deferred[Any]:
            pending.append(Deferred())
            return pending[-1]

        check.store.whitelist_list = held
        first = run_check(check, self.request())
        second = run_check(check, self.request(recipient="carol@example.net"))
        self.assertEqual(len(pending), 1)
        pending[0].errback(StoreError("down"))
        self.failureResultOf(first, StoreError)
        self.failureResultOf(second, StoreError)
        third = run_check(check, self.request())
        self.assertEqual(len(pending), 2)
        cancelled = run_check(check, self.request(recipient="dave@example.net"))
        cancelled.cancel()
        self.failureResultOf(cancelled)
        pending[1].callback([WhitelistEntry("client", "192.0.2.10/32"), WhitelistEntry("x", "y")])
        self.assertIsNone(self.successResultOf(pending[1]))
        self.assertEqual(str(self.successResultOf(third)), "DUNNO")
        self.assertEqual(len(pending), 2)


class WhitelistEntryTests(CheckTestCase):
    """
    whitelist_entry(): what pfxpold-admin stores, in the form compared.
    """

    def test_forms(self) -> None:
        """
        A network is made canonical (an address is a one-address
        network), a domain lowercased; nonsense is refused.
        """
        self.assertEqual(whitelist_entry("client", "192.0.2.9/24").value, "192.0.2.0/24")
        self.assertEqual(whitelist_entry("client", "2001:DB8::1").value, "2001:db8::1/128")
        self.assertEqual(whitelist_entry("sender", "Example.ORG.").value, "example.org")
        for kind, value in [
            ("client", "example.org"),
            ("sender", "a@b"),
            ("sender", ""),
            ("x", "y"),
        ]:
            self.assertRaises(ValueError, whitelist_entry, kind, value)
