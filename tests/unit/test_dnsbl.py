"""
Unit tests for L{pfxpold.checks.dnsbl}: query names, validation, scoring,
TTL cache and the failing-list breaker, against an in-memory resolver and a
L{Clock}.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.application.service import IService
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from zope.interface.verify import verifyObject

from pfxpold.checks.dnsbl import (
    DNSBLCheck,
    ListUnavailable,
    nameservers,
    parse_server,
    reversed_ip,
    valid_host_name,
)
from pfxpold.config import ConfigError
from pfxpold.interfaces import ICheck
from pfxpold.testing import CheckTestCase, make_options, make_request, run_check
from tests.unit.tempdir import temporary_path


class FakeResolver:
    """
    Answers from C{records} (name -> {"A": [...], "TXT": [...]}), or with
    a Deferred the test fires when the name is in C{hold}; remembers every
    query.
    """

    def __init__(self, records: dict[str, dict[str, list[str]]], ttl: int = 300) -> None:
        self.records = records
        self.ttl = ttl
        self.queries: list[tuple[str, str, Any]] = []
        self.hold: dict[str, list[Deferred[Any]]] = {}
        self.failing: dict[str, Exception] = {}

    def _lookup(self, kind: str, name: str, timeout: Any) -> Deferred[Any]:
        self.queries.append((kind, name, timeout))
        if name in self.failing:
            return fail(self.failing[name])
        if name in self.hold:
            held: Deferred[Any] = Deferred()
            self.hold[name].append(held)
            return held
        entry = self.records.get(name)
        if entry is None:
            return fail(DNSNameError(dns.Message(rCode=dns.ENAME)))
        answers = []
        for value in entry.get(kind, []):
            payload = dns.Record_A(value) if kind == "A" else dns.Record_TXT(value.encode())
            answers.append(
                dns.RRHeader(name, dns.A if kind == "A" else dns.TXT, ttl=self.ttl, payload=payload)
            )
        return succeed((answers, [], []))

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._lookup("A", name, timeout)

    def lookupText(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._lookup("TXT", name, timeout)


def make_check(
    records: dict[str, dict[str, list[str]]], lists: list[dict[str, Any]], **table: Any
) -> tuple[DNSBLCheck, FakeResolver, Clock]:
    clock = Clock()
    resolver = FakeResolver(records)
    check = DNSBLCheck(make_options(reactor=clock, lists=lists, **table), resolver=resolver)
    check.startService()
    return check, resolver, clock


LISTED = {
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["Blocked, see https://bl.test/127.0.0.2"]},
}


#: A list for each part of a request a list can ask about.
EVERY_SOURCE = [
    {"zone": "bl.test"},
    {"zone": "rhs.test", "lookup": "sender_domain"},
    {"zone": "helo.test", "lookup": "helo_name"},
    {"zone": "name.test", "lookup": "client_name"},
]


class NameTests(CheckTestCase):
    """
    How query names are built, and what is never looked up.
    """

    def test_ipv4_reversed(self) -> None:
        """IPv4 addresses are looked up with their octets reversed."""
        self.assertEqual(reversed_ip(ipaddress.ip_address("192.0.2.10")), "10.2.0.192")

    def test_ipv6_nibbles(self) -> None:
        """IPv6 addresses are looked up as 32 reversed nibbles."""
        name = reversed_ip(ipaddress.ip_address("2001:db8::1"))
        self.assertEqual(name, "1." + "0." * 23 + "8.b.d.0.1.0.0.2")
        self.assertEqual(len(name.split(".")), 32)

    def test_valid_host_names(self) -> None:
        """Host names are lowercased, lose a trailing dot; bad ones are refused."""
        self.assertEqual(valid_host_name("Mail.Example.COM."), "mail.example.com")
        for bad in [
            "",
            "localhost",
            "a..example",
            "-a.example",
            "a-.example",
            "*.example.com",
            "a b.example",
            "ex\u00e4mple.com",
            "x" * 64 + ".example",
            ("a" * 60 + ".") * 5 + "com",
            "[192.0.2.1]",
            "evil.example\n.com",
        ]:
            self.assertIsNone(valid_host_name(bad), bad)

    @given(
        st.one_of(
            st.text(alphabet="aZ09-.\u00e9 _", max_size=80),
            st.lists(st.text(alphabet="aZ09-", max_size=70), min_size=1, max_size=6)
            .map(".".join)
            .flatmap(lambda name: st.sampled_from([name, name + "."])),
        )
    )
    def test_host_name_rule(self, name: str) -> None:
        """
        The one-regex validation accepts exactly the names that the rule
        label by label accepts: 2+ labels of 1-63 letters, digits and
        inner hyphens, 253 characters at most (a trailing dot dropped).
        """
        label = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
        expected = None
        if name and name.isascii():
            lowered = name.lower()
            lowered = lowered[:-1] if lowered.endswith(".") else lowered
            labels = lowered.split(".")
            if (
                len(lowered) <= 253
                and len(labels) >= 2
                and all(label.fullmatch(part) for part in labels)
            ):
                expected = lowered
        self.assertEqual(valid_host_name(name), expected)

    def test_resolver_addresses(self) -> None:
        """Resolver addresses take an optional port; IPv6 ones in brackets."""
        self.assertEqual(parse_server("192.0.2.53"), ("192.0.2.53", 53))
        self.assertEqual(parse_server("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parse_server("::1"), ("::1", 53))
        self.assertEqual(parse_server("[2001:db8::53]:5353"), ("2001:db8::53", 5353))
        for bad in ["dns.example", "192.0.2.53:0", "192.0.2.53:x", "[::1]x", "1.2.3.4:99999"]:
            self.assertIsNone(parse_server(bad), bad)

    def test_invalid_input_not_looked_up(self) -> None:
        """
        A client address that is no IP, and sender, HELO and client names
        that are not host names, send no query at all.
        """
        check, resolver, _ = make_check(
            {},
            EVERY_SOURCE,
        )
        request = make_request(
            client_address="1.2.3.4.evil",
            sender="x@*)(.example",
            helo_name="[192.0.2.1]",
            client_name="unknown",
        )
        self.assertAction(check, request, "DUNNO")
        self.assertEqual(resolver.queries, [])

    def test_scoped_ipv6_not_looked_up(self) -> None:
        """
        A scoped IPv6 client address (C{fe80::1%eth0}) is not looked up:
        no query, no failure that C{on_error = "skip"} would turn into a
        bypass; the other lists still answer, and it is logged once per
        request, escaped, and counted.
        """
        check, resolver, _ = make_check(
            {"evil.test.rhs.test": {"A": ["127.0.0.2"]}},
            [
                {"zone": "bl.test"},
                {"zone": "bl2.test"},
                {"zone": "rhs.test", "lookup": "sender_domain", "reason": False},
            ],
            action="REJECT {lists}",
        )
        for address in ["fe80::1%eth0", "fe80::1%evil.example.com", "::ffff:192.0.2.1%x\x1b"]:
            with capturedLogs() as events:
                self.assertAction(check, make_request(client_address=address), "DUNNO")
                self.assertAction(
                    check,
                    make_request(client_address=address, sender="a@evil.test"),
                    "REJECT rhs.test",
                )
            texts = [formatEvent(event) for event in events]
            self.assertEqual(len(texts), 2, texts)
            self.assertTrue(all(text.isprintable() for text in texts))
        self.assertIn("::ffff:192.0.2.1%x\\x1b", texts[0])
        self.assertEqual(
            [name for _, name, _ in resolver.queries],
            ["example.com.rhs.test", "evil.test.rhs.test"],
        )
        self.assertEqual(check.unusable_addresses, 6)

    def test_sources(self) -> None:
        """Each list asks about its own part of the request, under its zone."""
        check, resolver, _ = make_check(
            {},
            EVERY_SOURCE,
        )
        request = make_request(
            client_address="::ffff:192.0.2.1",
            sender="Alice@Example.ORG",
            helo_name="mx.example.net",
            client_name="mail.example.com",
        )
        self.assertAction(check, request, "DUNNO")
        self.assertEqual(
            [name for _, name, _ in resolver.queries],
            [
                "1.2.0.192.bl.test",
                "example.org.rhs.test",
                "mx.example.net.helo.test",
                "mail.example.com.name.test",
            ],
        )
        self.assertEqual(resolver.queries[0][2], (2.0,))


class ScoreTests(CheckTestCase):
    """
    Codes, weights, threshold, whitelists and the reject text.
    """

    def test_provides_interfaces(self) -> None:
        """The check provides ICheck and IService."""
        check, _, _ = make_check({}, [{"zone": "bl.test"}])
        verifyObject(ICheck, check)
        verifyObject(IService, check)

    def test_listed_with_reason(self) -> None:
        """A listed client is rejected with the list's TXT record as the reason."""
        check, resolver, _ = make_check(LISTED, [{"zone": "bl.test"}])
        self.assertAction(
            check,
            make_request(client_address="127.0.0.2"),
            "REJECT Blocked, see https://bl.test/127.0.0.2",
        )
        self.assertEqual(resolver.queries[-1][:2], ("TXT", "2.0.0.127.bl.test"))

    def test_reason_without_txt_and_template(self) -> None:
        """Without a TXT record the reason names the list; the template is filled."""
        check, _, _ = make_check(
            {"2.0.0.127.bl.test": {"A": ["127.0.0.2"]}},
            [{"zone": "bl.test"}],
            action="554 5.7.1 Listed by {lists}: {reason}",
        )
        self.assertAction(
            check,
            make_request(client_address="127.0.0.2"),
            "554 5.7.1 Listed by bl.test: listed by bl.test",
        )

    def test_txt_cannot_inject(self) -> None:
        """A hostile TXT record cannot add lines or fill template fields."""
        check, _, _ = make_check(
            {"2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["bad\r\naction=OK\n\n{lists}"]}},
            [{"zone": "bl.test"}],
        )
        action = self.successResultOf(run_check(check, make_request(client_address="127.0.0.2")))
        self.assertEqual(action.verb, "REJECT")
        self.assertNotIn(b"\n", action.line[:-2])
        self.assertIn("{lists}", action.text)

    def test_codes(self) -> None:
        """Only configured return codes count."""
        records = {
            "2.0.0.127.bl.test": {"A": ["127.0.0.4"]},
            "3.0.0.127.bl.test": {"A": ["127.0.0.20"]},
        }
        check, _, _ = make_check(records, [{"zone": "bl.test", "codes": ["127.0.0.2-127.0.0.11"]}])
        self.assertEqual(
            self.successResultOf(run_check(check, make_request(client_address="127.0.0.2"))).verb,
            "REJECT",
        )
        self.assertAction(check, make_request(client_address="127.0.0.3"), "DUNNO")

    def test_default_codes_ignore_errors(self) -> None:
        """By default 127.255.255.x (the lists' "query refused") does not count."""
        check, _, _ = make_check(
            {"2.0.0.127.bl.test": {"A": ["127.255.255.254"]}}, [{"zone": "bl.test"}]
        )
        self.assertAction(check, make_request(client_address="127.0.0.2"), "DUNNO")

    def test_bitmask(self) -> None:
        """With a bitmask, an answer counts when it shares a bit with it."""
        records = {
            "2.0.0.127.bl.test": {"A": ["127.0.0.4"]},
            "3.0.0.127.bl.test": {"A": ["127.0.0.8"]},
        }
        check, _, _ = make_check(records, [{"zone": "bl.test", "bitmask": 4, "reason": False}])
        self.assertAction(
            check, make_request(client_address="127.0.0.2"), "REJECT listed by bl.test"
        )
        self.assertAction(check, make_request(client_address="127.0.0.3"), "DUNNO")

    def test_threshold_and_weights(self) -> None:
        """Lists below the threshold alone pass; together they reject."""
        records = {
            "2.0.0.127.a.test": {"A": ["127.0.0.2"]},
            "2.0.0.127.b.test": {"A": ["127.0.0.2"]},
            "3.0.0.127.a.test": {"A": ["127.0.0.2"]},
        }
        lists = [{"zone": "a.test", "weight": 0.6}, {"zone": "b.test", "weight": 0.6}]
        check, _, _ = make_check(records, lists, threshold=1.0, action="REJECT {lists}")
        self.assertAction(check, make_request(client_address="127.0.0.3"), "DUNNO")
        self.assertAction(check, make_request(client_address="127.0.0.2"), "REJECT a.test, b.test")

    def test_whitelist(self) -> None:
        """A DNS whitelist (negative weight) offsets a listing and answers its action."""
        records = {
            "2.0.0.127.bl.test": {"A": ["127.0.0.2"]},
            "2.0.0.127.wl.test": {"A": ["127.0.0.2"]},
        }
        lists = [{"zone": "bl.test"}, {"zone": "wl.test", "weight": -5}]
        check, _, _ = make_check(records, lists, whitelist_action="OK")
        self.assertAction(check, make_request(client_address="127.0.0.2"), "OK")

    def test_configuration_errors(self) -> None:
        """Bad settings are refused when the configuration is loaded."""
        bad: list[dict[str, Any]] = [
            {"lists": []},
            {"lists": [{"zone": "not a zone"}]},
            {"lists": [{"zone": "bl.test", "lookup": "recipient"}]},
            {"lists": [{"zone": "bl.test", "codes": ["127.0.0.300"]}]},
            {"lists": [{"zone": "bl.test", "codes": ["127.0.0.9-127.0.0.2"]}]},
            {"lists": [{"zone": "bl.test", "codes": ["127.0.0.2"], "bitmask": 2}]},
            {"lists": [{"zone": "bl.test", "colour": "red"}]},
            {"lists": [{"zone": "bl.test"}], "resolvers": ["dns.example"]},
            {"lists": [{"zone": "bl.test"}], "action": "BOGUS {reason}"},
        ]
        for table in bad:
            self.assertRaises(ConfigError, DNSBLCheck, make_options(**table))

    def test_resolv_conf_missing(self) -> None:
        """
        A resolv_conf that is given but missing is refused (Twisted would
        silently ask 127.0.0.1); the default one is looked at only when used.
        """
        error = self.assertRaises(
            ConfigError,
            DNSBLCheck,
            make_options(lists=[{"zone": "bl.test"}], resolv_conf="/nonexistent/resolv.conf"),
        )
        self.assertIn("key 'resolv_conf'", str(error))
        self.assertIn("cannot open /nonexistent/resolv.conf", str(error))
        DNSBLCheck(make_options(lists=[{"zone": "bl.test"}]))


class ResolvConfTests(CheckTestCase):
    """
    Without C{resolvers}, the check reads resolv.conf on a timer of its
    own, which stopping the check stops.
    """

    def write(self, path: str, text: str) -> None:
        with open(path, "w", encoding="ascii") as f:
            f.write(text)

    def test_nameservers(self) -> None:
        """nameserver lines give the servers, in order; none gives the local host."""
        lines = [
            "# comment",
            "search example.com",
            "nameserver 192.0.2.53",
            "nameserver   2001:db8::53  ",
            "nameserver dns.example",
            "nameserver",
        ]
        self.assertEqual(nameservers(lines), [("192.0.2.53", 53), ("2001:db8::53", 53)])
        self.assertEqual(nameservers(["search example.com"]), [("127.0.0.1", 53)])

    def test_read_again_and_stopped(self) -> None:
        """
        The file is read at start and again every minute; a change makes a
        resolver for the new servers; stopping leaves no timer behind.
        """
        path = temporary_path(self)
        self.write(path, "nameserver 192.0.2.53\n")
        clock = Clock()
        check = DNSBLCheck(make_options(reactor=clock, lists=[{"zone": "bl.test"}], resolv_conf=path))
        check.startService()
        first = check._resolver
        self.assertEqual(first.servers, [("192.0.2.53", 53)])
        clock.advance(60)
        self.assertIs(check._resolver, first)
        self.write(path, "nameserver 192.0.2.54\n")
        with capturedLogs() as events:
            clock.advance(60)
        self.assertEqual(check._resolver.servers, [("192.0.2.54", 53)])
        self.assertIn("changed", "".join(formatEvent(event) for event in events))
        check.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_resolvers_need_no_timer(self) -> None:
        """With resolvers given, nothing is read and no timer runs."""
        clock = Clock()
        check = DNSBLCheck(
            make_options(reactor=clock, lists=[{"zone": "bl.test"}], resolvers=["192.0.2.53:5353"])
        )
        check.startService()
        self.assertEqual(check._resolver.servers, [("192.0.2.53", 5353)])
        self.assertEqual(clock.getDelayedCalls(), [])
        check.stopService()


class FailureTests(CheckTestCase):
    """
    Failing lists, the TTL cache and sharing of queries in flight.
    """

    def test_one_list_fails(self) -> None:
        """A list that fails counts as not listed while another answers."""
        check, resolver, _ = make_check(LISTED, [{"zone": "bl.test"}, {"zone": "down.test"}])
        resolver.failing["2.0.0.127.down.test"] = TimeoutError()
        self.assertAction(
            check,
            make_request(client_address="127.0.0.2"),
            "REJECT Blocked, see https://bl.test/127.0.0.2",
        )

    def test_all_lists_fail(self) -> None:
        """When no list answers, the check fails so that on_error applies."""
        check, resolver, _ = make_check({}, [{"zone": "down.test"}])
        resolver.failing["2.0.0.127.down.test"] = DNSServerError()
        self.failureResultOf(
            run_check(check, make_request(client_address="127.0.0.2")), ListUnavailable
        )

    def test_breaker(self) -> None:
        """
        After failure_limit failures in a row a list is not asked for
        skip_for seconds, then it is tried again.
        """
        check, resolver, clock = make_check(
            {}, [{"zone": "bl.test"}, {"zone": "down.test"}], failure_limit=3, skip_for=30
        )
        for octet in range(3):
            resolver.failing[f"{octet}.0.0.127.down.test"] = TimeoutError()
            self.assertAction(check, make_request(client_address=f"127.0.0.{octet}"), "DUNNO")
        before = len(resolver.queries)
        self.assertAction(check, make_request(client_address="127.0.0.9"), "DUNNO")
        self.assertEqual([name for _, name, _ in resolver.queries[before:]], ["9.0.0.127.bl.test"])
        clock.advance(31)
        self.assertAction(check, make_request(client_address="127.0.0.8"), "DUNNO")
        self.assertIn(("A", "8.0.0.127.down.test", (2.0,)), resolver.queries)

    def test_only_skipped_lists(self) -> None:
        """When every list is being skipped the check fails (on_error applies)."""
        check, resolver, _ = make_check({}, [{"zone": "down.test"}], failure_limit=1)
        resolver.failing["1.0.0.127.down.test"] = TimeoutError()
        self.failureResultOf(
            run_check(check, make_request(client_address="127.0.0.1")), ListUnavailable
        )
        count = len(resolver.queries)
        self.failureResultOf(
            run_check(check, make_request(client_address="127.0.0.2")), ListUnavailable
        )
        self.assertEqual(len(resolver.queries), count)

    def test_cache_ttl(self) -> None:
        """Answers, negative ones included, are reused until their TTL passes."""
        check, resolver, clock = make_check(LISTED, [{"zone": "bl.test"}], negative_ttl=10)
        request = make_request(client_address="127.0.0.2")
        for _ in range(3):
            self.successResultOf(run_check(check, request))
            self.successResultOf(run_check(check, make_request(client_address="127.0.0.3")))
        self.assertEqual(len(resolver.queries), 3)
        clock.advance(11)
        self.successResultOf(run_check(check, make_request(client_address="127.0.0.3")))
        self.assertEqual(len(resolver.queries), 4)
        clock.advance(300)
        self.successResultOf(run_check(check, request))
        self.assertEqual(len(resolver.queries), 6)

    def test_shared_in_flight(self) -> None:
        """Two requests for one name while it is in flight send one query."""
        check, resolver, _ = make_check({}, [{"zone": "bl.test"}])
        resolver.hold["2.0.0.127.bl.test"] = []
        first = run_check(check, make_request(client_address="127.0.0.2"))
        second = run_check(check, make_request(client_address="127.0.0.2"))
        self.assertEqual(len(resolver.queries), 1)
        resolver.hold["2.0.0.127.bl.test"][0].errback(DNSNameError(dns.Message()))
        self.assertEqual(str(self.successResultOf(first)), "DUNNO")
        self.assertEqual(str(self.successResultOf(second)), "DUNNO")

    def test_cancel_leaves_query(self) -> None:
        """
        The chain's timeout cancels the request's Deferred, not the query
        another request may share.
        """
        check, resolver, _ = make_check(LISTED, [{"zone": "bl.test"}])
        resolver.hold["2.0.0.127.bl.test"] = []
        first = check.check(make_request(client_address="127.0.0.2"))
        second = check.check(make_request(client_address="127.0.0.2"))
        first.cancel()
        self.failureResultOf(first)
        held = resolver.hold.pop("2.0.0.127.bl.test")[0]
        held.callback(([dns.RRHeader("x", dns.A, payload=dns.Record_A("127.0.0.2"))], [], []))
        self.assertEqual(self.successResultOf(second).verb, "REJECT")

    def test_bounded_queries(self) -> None:
        """No more than max_queries queries are in flight at once."""
        check, resolver, _ = make_check({}, [{"zone": "bl.test"}], max_queries=2)
        for octet in range(5):
            resolver.hold[f"{octet}.0.0.127.bl.test"] = []
        pending = [check.check(make_request(client_address=f"127.0.0.{n}")) for n in range(5)]
        self.assertEqual(len(resolver.queries), 2)
        resolver.hold["0.0.0.127.bl.test"][0].errback(DNSNameError(dns.Message()))
        self.assertEqual(len(resolver.queries), 3)
        self.assertEqual(str(self.successResultOf(pending[0])), "DUNNO")
        self.assertNoResult(pending[4])


class CacheHitTests(CheckTestCase):
    """
    When the cache holds every answer a request needs, the check answers
    with a plain L{Action}, at once, without a Deferred.
    """

    def test_not_listed_from_cache(self) -> None:
        """A client the cache knows as not listed is answered DUNNO at once."""
        check, resolver, _ = make_check({}, [{"zone": "bl.test"}, {"zone": "other.test"}])
        request = make_request(client_address="127.0.0.3")
        self.assertIsInstance(check.check(request), Deferred)
        answer = check.check(request)
        self.assertNotIsInstance(answer, Deferred)
        self.assertEqual(str(answer), "DUNNO")
        self.assertEqual(len(resolver.queries), 2)

    def test_listed_with_cached_reason(self) -> None:
        """A listed client's answer, TXT reason included, comes from the cache at once."""
        check, resolver, _ = make_check(LISTED, [{"zone": "bl.test"}])
        request = make_request(client_address="127.0.0.2")
        first = self.successResultOf(run_check(check, request))
        answer = check.check(request)
        self.assertNotIsInstance(answer, Deferred)
        self.assertEqual(answer, first)
        self.assertIn("Blocked, see https://bl.test/127.0.0.2", answer.text)
        self.assertEqual(len(resolver.queries), 2)

    def test_reason_missing_from_cache(self) -> None:
        """
        When the listing is cached but its reason is not (the TXT query
        failed), only the reason is asked again, asynchronously.
        """
        check, resolver, _ = make_check(LISTED, [{"zone": "bl.test"}])
        request = make_request(client_address="127.0.0.2")
        # The A answer is in the cache; the TXT query fails.
        check.cache.put(("2.0.0.127.bl.test", dns.A), _answer(("127.0.0.2",)), 1000)
        resolver.failing["2.0.0.127.bl.test"] = DNSServerError(dns.Message())
        action = self.successResultOf(run_check(check, request))
        self.assertEqual(action.text, "listed by bl.test")
        self.assertEqual([kind for kind, _, _ in resolver.queries], ["TXT"])
        del resolver.failing["2.0.0.127.bl.test"]
        answer = check.check(request)
        self.assertIsInstance(answer, Deferred)
        self.assertIn("Blocked", self.successResultOf(answer).text)
        self.assertEqual(
            [(kind, name) for kind, name, _ in resolver.queries[-1:]],
            [("TXT", "2.0.0.127.bl.test")],
        )
        self.assertNotIsInstance(check.check(request), Deferred)

    def test_whitelisted_from_cache(self) -> None:
        """A whitelisted client is answered the whitelist action at once."""
        records = {"2.0.0.127.wl.test": {"A": ["127.0.0.2"]}}
        lists = [{"zone": "wl.test", "weight": -10}, {"zone": "bl.test"}]
        check, _, _ = make_check(records, lists, whitelist_action="OK")
        request = make_request(client_address="127.0.0.2")
        self.successResultOf(run_check(check, request))
        self.assertEqual(str(check.check(request)), "OK")

    def test_expired_answer_asked_again(self) -> None:
        """An answer past its TTL is asked again, asynchronously."""
        check, resolver, clock = make_check(LISTED, [{"zone": "bl.test"}])
        request = make_request(client_address="127.0.0.2")
        self.successResultOf(run_check(check, request))
        clock.advance(300)
        answer = check.check(request)
        self.assertIsInstance(answer, Deferred)
        self.assertEqual(self.successResultOf(answer).verb, "REJECT")
        self.assertEqual(len(resolver.queries), 4)

    def test_skipped_list_not_answered_from_cache(self) -> None:
        """A list being skipped after failures is not consulted, even from the cache."""
        check, resolver, clock = make_check(LISTED, [{"zone": "bl.test"}])
        request = make_request(client_address="127.0.0.2")
        self.successResultOf(run_check(check, request))
        check.lists[0].skip_until = clock.seconds() + 60
        self.assertRaises(ListUnavailable, check.check, request)

    def test_only_used_sources_computed(self) -> None:
        """Sources no list looks up are not computed (nor validated)."""
        check, _, _ = make_check({}, [{"zone": "bl.test"}])
        subjects = check._subjects(make_request(client_address="127.0.0.2"))
        self.assertEqual(subjects, {"client_address": "2.0.0.127"})

    def test_reversed_addresses_remembered(self) -> None:
        """
        Reversed client addresses (v4-mapped ones folded) are remembered in
        a bounded LRU memo; invalid ones are logged and counted every time.
        """
        from pfxpold.checks import dnsbl

        check, _, _ = make_check({}, [{"zone": "bl.test"}])
        dnsbl.dnsbl_form.cache_clear()
        self.assertEqual(check._reversed_address("::ffff:192.0.2.1"), "1.2.0.192")
        self.assertEqual(check._reversed_address("::ffff:192.0.2.1"), "1.2.0.192")
        self.assertEqual(dnsbl.dnsbl_form.cache_info().hits, 1)
        self.assertEqual(
            dnsbl.dnsbl_form.cache_info().maxsize, dnsbl.MAX_REMEMBERED_ADDRESSES
        )
        for _ in range(2):
            self.assertIsNone(check._reversed_address("not an address"))
        self.assertEqual(check.unusable_addresses, 2)

    def test_full_cache_keeps_recent_answers(self) -> None:
        """
        A full answer cache drops its least recently used answer, not every
        answer: the clients seen lately are still answered at once.
        """
        from pfxpold.checks import dnsbl

        self.patch(dnsbl, "MAX_CACHE_ENTRIES", 2)
        check, resolver, _ = make_check({}, [{"zone": "bl.test"}])
        for octet in (3, 4, 5):
            self.successResultOf(run_check(check, make_request(client_address=f"127.0.0.{octet}")))
        for octet in (4, 5):
            answer = check.check(make_request(client_address=f"127.0.0.{octet}"))
            self.assertNotIsInstance(answer, Deferred)
        self.assertEqual(len(resolver.queries), 3)


class DecisionTests(CheckTestCase):
    """
    With every answer it needs in the cache, the check remembers its
    decision for the request's values, for as long as the first of those
    answers lasts.
    """

    def test_decision_remembered(self) -> None:
        """A client seen again is answered from the decision, not the answers."""
        check, resolver, _ = make_check(LISTED, [{"zone": "bl.test"}, {"zone": "other.test"}])
        request = make_request(client_address="127.0.0.2")
        first = self.successResultOf(run_check(check, request))
        self.assertEqual(len(check.decisions), 0)
        self.assertEqual(check.check(request), first)
        self.assertEqual(len(check.decisions), 1)
        # The answers are gone; the decision still holds.
        check.cache.clear()
        self.assertEqual(check.check(make_request(client_address="127.0.0.2")), first)
        self.assertEqual(len(resolver.queries), 3)

    def test_lasts_as_long_as_its_first_answer(self) -> None:
        """The decision expires with the shortest-lived answer it was weighed from."""
        check, resolver, clock = make_check(
            LISTED, [{"zone": "bl.test"}, {"zone": "other.test"}], negative_ttl=10
        )
        request = make_request(client_address="127.0.0.2")
        self.successResultOf(run_check(check, request))
        clock.advance(5)
        self.assertEqual(check.check(request).verb, "REJECT")
        queries = len(resolver.queries)
        clock.advance(4.9)
        self.assertEqual(check.check(request).verb, "REJECT")
        self.assertEqual(len(resolver.queries), queries)
        clock.advance(0.1)
        answer = check.check(request)
        self.assertIsInstance(answer, Deferred)
        self.assertEqual(self.successResultOf(answer).verb, "REJECT")
        self.assertEqual(
            [name for _, name, _ in resolver.queries[queries:]], ["2.0.0.127.other.test"]
        )

    def test_by_every_source(self) -> None:
        """Requests differing only in a value some list looks up get decisions of their own."""
        records = {"bad.example.rhs.test": {"A": ["127.0.0.2"]}}
        lists = [{"zone": "bl.test"}, {"zone": "rhs.test", "lookup": "sender_domain"}]
        check, _, _ = make_check(records, lists, action="REJECT listed")
        good = make_request(client_address="127.0.0.3", sender="a@good.example")
        bad = make_request(client_address="127.0.0.3", sender="a@bad.example")
        for _ in range(2):
            self.assertEqual(str(self.successResultOf(run_check(check, good))), "DUNNO")
            self.assertEqual(str(self.successResultOf(run_check(check, bad))), "REJECT listed")
        self.assertEqual(len(check.decisions), 2)

    def test_skipping_forgets(self) -> None:
        """
        A list that starts being skipped after failures empties the
        decisions, and none is remembered while a list is skipped.
        """
        check, resolver, _ = make_check(
            LISTED, [{"zone": "bl.test"}, {"zone": "down.test"}], failure_limit=1
        )
        request = make_request(client_address="127.0.0.2")
        self.successResultOf(run_check(check, request))
        self.assertEqual(check.check(request).verb, "REJECT")
        self.assertEqual(len(check.decisions), 1)
        resolver.failing["3.0.0.127.down.test"] = TimeoutError()
        self.successResultOf(run_check(check, make_request(client_address="127.0.0.3")))
        self.assertEqual(len(check.decisions), 0)
        self.assertEqual(check.check(request).verb, "REJECT")
        self.assertEqual(len(check.decisions), 0)

    def test_unusable_address_not_remembered(self) -> None:
        """A client address that is not one is logged for every request, never remembered."""
        check, _, _ = make_check({}, [{"zone": "bl.test"}])
        for _ in range(2):
            with capturedLogs() as events:
                self.assertEqual(str(check.check(make_request(client_address="nonsense"))), "DUNNO")
            self.assertEqual(len(events), 1)
        self.assertEqual(len(check.decisions), 0)
        self.assertEqual(check.unusable_addresses, 2)


def _answer(addresses: tuple[str, ...]) -> Any:
    from pfxpold.checks.dnsbl import Answer

    return Answer(addresses, 300)
