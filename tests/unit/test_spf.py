"""
The spf check without a network: pyspf fed by a fake resolver that
answers at once (macro expansion, limits, loops, hostile records and
requests), the action mapping of every policy, the Received-SPF header,
the cache and configuration errors.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pfxpold.checks.spf import SPFCheck, query_name
from pfxpold.config import ConfigError
from pfxpold.interfaces import ICheck
from pfxpold.spf.header import comment_text, quote_value, received_spf
from pfxpold.testing import make_options, make_request, run_check

_METHODS = {
    "lookupAddress": dns.A,
    "lookupIPV6Address": dns.AAAA,
    "lookupMailExchange": dns.MX,
    "lookupPointer": dns.PTR,
    "lookupText": dns.TXT,
    "lookupSenderPolicy": dns.SPF,
    "lookupCanonicalName": dns.CNAME,
}


class FakeResolver:
    """
    Answers from C{records}: name -> list of (type, value); a name that is
    missing is NXDOMAIN, a value C{"TIMEOUT"} fails with a timeout and
    C{"SERVFAIL"} with a server error. Remembers every question.
    """

    def __init__(self, records: dict[str, list[tuple[str, Any]]]) -> None:
        self.records = {name.lower(): value for name, value in records.items()}
        self.asked: list[tuple[str, str]] = []

    def __getattr__(self, method: str) -> Any:
        record_type = _METHODS[method]

        def lookup(name: str, timeout: Any = None) -> Deferred[Any]:
            kind = dns.QUERY_TYPES[record_type]
            self.asked.append((kind, name))
            entries = self.records.get(name.lower())
            if entries is None:
                return fail(DNSNameError(dns.Message(rCode=dns.ENAME)))
            answers = []
            for entry_kind, value in entries:
                if entry_kind != kind:
                    continue
                if value == "TIMEOUT":
                    return fail(TimeoutError())
                if value == "SERVFAIL":
                    return fail(DNSServerError(dns.Message(rCode=dns.ESERVER)))
                if kind == "TXT":
                    strings = value if isinstance(value, list) else [value]
                    payload: Any = dns.Record_TXT(*[s.encode() for s in strings], ttl=300)
                elif kind == "A":
                    payload = dns.Record_A(value, ttl=300)
                elif kind == "AAAA":
                    payload = dns.Record_AAAA(value, ttl=300)
                elif kind == "MX":
                    payload = dns.Record_MX(value[0], value[1], ttl=300)
                else:
                    payload = dns.Record_PTR(value, ttl=300)
                answers.append(dns.RRHeader(name, record_type, payload=payload, ttl=300))
            return succeed((answers, [], []))

        return lookup


RECORDS = {
    "example.org": [("TXT", "v=spf1 ip4:192.0.2.1 mx -all"), ("MX", (10, "mx.example.org"))],
    "mx.example.org": [("A", "192.0.2.2")],
    "helo.example.org": [("TXT", "v=spf1 a -all"), ("A", "192.0.2.1")],
    "soft.example": [("TXT", "v=spf1 ~all")],
    "neutral.example": [("TXT", "v=spf1 ?all")],
    "broken.example": [("TXT", "v=spf1 bogus -all")],
    "slow.example": [("TXT", "TIMEOUT")],
    "failing.example": [("TXT", "SERVFAIL")],
    "explained.example": [("TXT", "v=spf1 -all exp=why.explained.example")],
    "why.explained.example": [("TXT", "%{i} may not send for %{d} as %{l}\r\nInjected: yes")],
    "macro.example": [("TXT", "v=spf1 exists:%{ir}.%{l1r+-}._spf.%{d2} -all")],
    "self.example": [("TXT", "v=spf1 include:self.example -all")],
    "ping.example": [("TXT", "v=spf1 redirect=pong.example")],
    "pong.example": [("TXT", "v=spf1 redirect=ping.example")],
    "voids.example": [("TXT", "v=spf1 a:n1.example a:n2.example a:n3.example -all")],
    "many.example": [
        ("TXT", "v=spf1 " + " ".join(f"a:h{n}.many.example" for n in range(11)) + " -all")
    ],
    "huge.example": [("TXT", ["v=spf1 " + "ip4:198.51.100.1 " * 14] + ["x" * 250] * 200)],
    "bigmx.example": [("TXT", "v=spf1 mx -all")]
    + [("MX", (n, f"mx{n}.bigmx.example")) for n in range(11)],
}
for number in range(11):
    RECORDS[f"h{number}.many.example"] = [("A", "198.51.100.9")]


def make_check(resolver: Any = None, clock: Any = None, **settings: Any) -> SPFCheck:
    settings.setdefault("receiver", "mx.test")
    check = SPFCheck(
        make_options(name="spf", reactor=clock or Clock(), type="spf", **settings),
        resolver=resolver if resolver is not None else FakeResolver(RECORDS),
    )
    check.startService()
    return check


def request(**changes: str) -> Any:
    values = {
        "client_address": "192.0.2.1",
        "sender": "alice@example.org",
        "helo_name": "helo.example.org",
        "sasl_username": "",
        "instance": "",
        "protocol_state": "RCPT",
    }
    values.update(changes)
    return make_request(**values)


class SPFCheckTests(SynchronousTestCase):
    def answer(self, check: SPFCheck, **changes: str) -> str:
        action = self.successResultOf(run_check(check, request(**changes)))
        return action.line[len(b"action=") : -2].decode()

    def test_provides_icheck(self) -> None:
        """The check provides ICheck."""
        self.assertTrue(verifyObject(ICheck, make_check()))

    def test_pass_prepends_header(self) -> None:
        """A pass prepends a Received-SPF header naming the mechanism."""
        self.assertEqual(
            self.answer(make_check()),
            "PREPEND Received-SPF: pass (mx.test: domain of alice@example.org designates"
            " 192.0.2.1 as permitted sender) client-ip=192.0.2.1;"
            ' envelope-from="alice@example.org"; helo=helo.example.org; receiver=mx.test;'
            ' identity=mailfrom; mechanism="ip4:192.0.2.1";',
        )

    def test_mx_addresses_fetched_together(self) -> None:
        """The MX mechanism matches, its hosts' addresses asked once each."""
        resolver = FakeResolver(RECORDS)
        check = make_check(resolver, helo_reject="No_Check")
        self.assertIn("mechanism=mx;", self.answer(check, client_address="192.0.2.2"))
        self.assertEqual(resolver.asked.count(("A", "mx.example.org")), 1)

    def test_fail_rejected_with_url(self) -> None:
        """A MAIL FROM fail is rejected with pypolicyd-spf's text and URL."""
        self.assertEqual(
            self.answer(make_check(), client_address="198.51.100.7", helo_name="x.test"),
            "550 5.7.23 Message rejected due to: SPF fail - not authorized. Please see"
            " https://www.open-spf.org/Why?s=mfrom;id=alice@example.org;ip=198.51.100.7;r=mx.test",
        )

    def test_helo_fail_rejected_first(self) -> None:
        """A HELO fail is rejected before the MAIL FROM identity is asked."""
        resolver = FakeResolver(RECORDS)
        answer = self.answer(make_check(resolver), client_address="198.51.100.7")
        self.assertIn("s=helo;id=helo.example.org;", answer)
        self.assertNotIn(("TXT", "example.org"), resolver.asked)

    def test_policies(self) -> None:
        """Each policy rejects the results pypolicyd-spf's does, and no other."""
        cases = [
            ("Fail", "soft.example", "PREPEND"),
            ("Softfail", "soft.example", "550"),
            ("Softfail", "neutral.example", "PREPEND"),
            ("SPF_Not_Pass", "neutral.example", "550"),
            ("spf_not_pass", "example.org", "PREPEND"),
            ("False", "x.test", "PREPEND"),
            ("No_Check", "x.test", "DUNNO"),
        ]
        for policy, domain, verb in cases:
            check = make_check(helo_reject="No_Check", mail_from_reject=policy)
            sender = "bob@example.org" if domain == "x.test" else f"bob@{domain}"
            client = "198.51.100.7" if domain == "x.test" else "192.0.2.1"
            answer = self.answer(check, sender=sender, client_address=client)
            self.assertEqual(answer.split()[0], verb, (policy, domain, answer))

    def test_null_policy(self) -> None:
        """HELO Null rejects a HELO fail only for the null sender."""
        check = make_check(helo_reject="Null", mail_from_reject="False")
        bad = {"client_address": "198.51.100.7"}
        self.assertTrue(self.answer(check, sender="", **bad).startswith("550 5.7.23"))
        self.assertTrue(self.answer(check, **bad).startswith("PREPEND Received-SPF: fail"))

    def test_errors_mapped(self) -> None:
        """permerror and temperror prepend by default, and are refused when asked to."""
        default = make_check(helo_reject="No_Check")
        self.assertTrue(
            self.answer(default, sender="a@broken.example").startswith(
                "PREPEND Received-SPF: permerror"
            )
        )
        self.assertTrue(
            self.answer(default, sender="a@slow.example").startswith(
                "PREPEND Received-SPF: temperror"
            )
        )
        strict = make_check(helo_reject="No_Check", permerror_reject=True, temperror_defer=True)
        self.assertTrue(
            self.answer(strict, sender="a@broken.example").startswith(
                "550 5.7.24 Message rejected due to: SPF Permanent Error"
            )
        )
        for domain in ("slow.example", "failing.example"):
            self.assertTrue(
                self.answer(strict, sender=f"a@{domain}").startswith(
                    "DEFER_IF_PERMIT 4.7.24 Message deferred due to: SPF Temporary Error"
                )
            )

    def test_macro_expansion(self) -> None:
        """exists: is asked with %{ir} and %{l1r+-} (RFC 7208 7.4: reversed, then the rightmost part) expanded."""
        resolver = FakeResolver(RECORDS)
        check = make_check(resolver, helo_reject="No_Check")
        self.answer(check, sender="first-last@macro.example", client_address="192.0.2.7")
        self.assertIn(("A", "7.2.0.192.first._spf.macro.example"), resolver.asked)

    def test_explanation_expanded_and_cleaned(self) -> None:
        """The exp= text is expanded, and its line break cannot start a header."""
        check = make_check(helo_reject="No_Check")
        answer = self.answer(check, sender="eve@explained.example", client_address="192.0.2.9")
        self.assertTrue(
            answer.startswith(
                "550 5.7.23 Message rejected due to: 192.0.2.9 may not send for"
                " explained.example as eve"
            ),
            answer,
        )
        self.assertNotIn("\n", answer)
        self.assertNotIn("\r", answer)

    def test_loops_end_in_permerror(self) -> None:
        """include and redirect loops end at the lookup limit as permerror."""
        resolver = FakeResolver(RECORDS)
        check = make_check(resolver, helo_reject="No_Check")
        for domain in ("self.example", "ping.example"):
            answer = self.answer(check, sender=f"a@{domain}")
            self.assertTrue(answer.startswith("PREPEND Received-SPF: permerror"), answer)
        self.assertLess(len(resolver.asked), 30)

    def test_limits(self) -> None:
        """More than 10 DNS mechanisms, 2 void lookups or 10 MX names: permerror."""
        check = make_check(helo_reject="No_Check")
        for domain in ("many.example", "voids.example", "bigmx.example"):
            answer = self.answer(check, sender=f"a@{domain}", client_address="198.51.100.77")
            self.assertTrue(answer.startswith("PREPEND Received-SPF: permerror"), (domain, answer))

    def test_huge_record(self) -> None:
        """A TXT record of 50 KB in 200 strings is evaluated, not fatal."""
        check = make_check(helo_reject="No_Check")
        answer = self.answer(check, sender="a@huge.example", client_address="198.51.100.1")
        self.assertTrue(answer.startswith("PREPEND Received-SPF: "), answer)

    def test_hostile_requests(self) -> None:
        """Control characters, bad domains and non-IP clients ask nothing odd."""
        resolver = FakeResolver(RECORDS)
        check = make_check(resolver)
        self.assertEqual(self.answer(check, client_address="unknown"), "DUNNO")
        answer = self.answer(check, sender="a@evil\x00.example\r\nX: y", helo_name="h\x1b[2J")
        self.assertTrue(answer.startswith("PREPEND Received-SPF: none"), answer)
        answer = self.answer(check, sender="a@" + "x" * 70 + ".example", helo_name="")
        self.assertTrue(answer.startswith("PREPEND Received-SPF: none"), answer)
        for _, name in resolver.asked:
            self.assertIsNotNone(query_name(name), name)

    def test_single_label_and_literal_not_asked(self) -> None:
        """A HELO name of one label or an address literal is "none", not asked (RFC 7208 4.3)."""
        resolver = FakeResolver(RECORDS)
        check = make_check(resolver)
        for helo in ("[192.0.2.1]", "localhost", "foo."):
            answer = self.answer(check, helo_name=helo, sender="")
            self.assertTrue(answer.startswith("PREPEND Received-SPF: none"), answer)
        self.assertEqual(resolver.asked, [])

    def test_skipped_clients(self) -> None:
        """Authenticated, loopback and configured clients are not checked."""
        resolver = FakeResolver(RECORDS)
        check = make_check(resolver, skip_addresses=["127.0.0.0/8", "203.0.113.0/24"])
        self.assertEqual(self.answer(check, sasl_username="alice"), "DUNNO")
        self.assertEqual(self.answer(check, client_address="127.0.0.1"), "DUNNO")
        self.assertEqual(self.answer(check, client_address="::ffff:127.0.0.1"), "DUNNO")
        self.assertEqual(self.answer(check, client_address="203.0.113.5"), "DUNNO")
        self.assertEqual(resolver.asked, [])

    def test_one_header_per_message(self) -> None:
        """The second recipient of a message gets DUNNO, a refusal is repeated."""
        check = make_check()
        self.assertTrue(self.answer(check, instance="m1").startswith("PREPEND"))
        self.assertEqual(self.answer(check, instance="m1"), "DUNNO")
        refused = self.answer(check, instance="m2", client_address="198.51.100.7")
        self.assertEqual(self.answer(check, instance="m2", client_address="198.51.100.7"), refused)

    def test_no_header_when_off_or_too_late(self) -> None:
        """header = false, or END-OF-MESSAGE, answers DUNNO instead of PREPEND."""
        self.assertEqual(self.answer(make_check(header=False)), "DUNNO")
        self.assertEqual(self.answer(make_check(), protocol_state="END-OF-MESSAGE"), "DUNNO")

    def test_answers_cached_for_ttl(self) -> None:
        """A second request asks nothing until the TTL has passed."""
        clock = Clock()
        resolver = FakeResolver(RECORDS)
        check = make_check(resolver, clock)
        self.answer(check)
        asked = len(resolver.asked)
        self.answer(check)
        self.assertEqual(len(resolver.asked), asked)
        clock.advance(301)
        self.answer(check)
        self.assertEqual(len(resolver.asked), 2 * asked)

    def test_not_started(self) -> None:
        """A check that was never started fails rather than answering."""
        check = SPFCheck(make_options(name="spf", type="spf"))
        self.failureResultOf(run_check(check, request()), RuntimeError)


class ConfigurationTests(SynchronousTestCase):
    def test_errors_name_check_and_key(self) -> None:
        """Each bad setting is one line naming the check and the key."""
        cases = {
            "helo_reject": "Sometimes",
            "mail_from_reject": "Null",
            "resolvers": ["dns.example"],
            "skip_addresses": ["192.0.2.300"],
            "reject_action": "SMILE {reason}",
            "defer_action": "450",
            "receiver": "bad host\n",
            "query_timeout": 0,
        }
        for key, value in cases.items():
            with self.assertRaises(ConfigError) as raised:
                SPFCheck(make_options(name="spf", type="spf", **{key: value}))
            message = str(raised.exception)
            self.assertIn("spf", message)
            self.assertIn(key, message)
            self.assertNotIn("\n", message)


class HeaderTests(SynchronousTestCase):
    def test_quote_value(self) -> None:
        """Dot-atoms stay bare; anything else is a quoted-string, escaped."""
        self.assertEqual(quote_value("mail.example.org"), "mail.example.org")
        self.assertEqual(quote_value("a@example.org"), '"a@example.org"')
        self.assertEqual(quote_value('a"b\\c'), '"a\\"b\\\\c"')
        self.assertEqual(quote_value("x\r\nInjected: 1"), '"x??Injected: 1"')

    def test_comment_escaped(self) -> None:
        """A comment's parentheses and backslashes are quoted-pairs."""
        self.assertEqual(comment_text("a(b)\\c\n"), "a\\(b\\)\\\\c?")

    def test_header_fits_an_action(self) -> None:
        """A header with long values drops the comment and optional fields, not the result."""
        header = received_spf(
            "softfail", "mailfrom", "2001:db8::1", "h" * 200, "x" * 200 + "@e.example", "mx.test"
        )
        self.assertLessEqual(len(header), 256)
        self.assertTrue(header.startswith("Received-SPF: softfail client-ip="), header)
        self.assertIn("identity=mailfrom;", header)
        self.assertNotIn("\n", header)

    def test_unknown_result_refused(self) -> None:
        """Only RFC 7208's results make a header."""
        with self.assertRaises(ValueError):
            received_spf("maybe", "helo", "192.0.2.1", "h", "a@h", "r")


class LibraryTests(SynchronousTestCase):
    def test_missing_pyspf(self) -> None:
        """examples/spf.toml without pyspf: one line naming the check and the spf extra."""
        import os

        from pfxpold.config import load_configuration
        from tests.unit.test_extras import EXAMPLES, forget, unimportable

        unimportable(self, "spf")
        forget(self, "pfxpold.checks.spf")
        forget(self, "pfxpold.spf.evaluate")
        path = os.path.join(EXAMPLES, "spf.toml")
        error = self.assertRaises(ConfigError, load_configuration, path, Clock())
        self.assertEqual(
            str(error), f"{path}: check 'spf': needs pyspf: pip install 'pfxpold[spf]'"
        )

    def test_pyspf_outside_a_check(self) -> None:
        """pyspf used outside an evaluation asks its own DNS lookup, not a feeder."""
        import spf as pyspf

        from pfxpold.spf import evaluate

        asked = []
        original = pyspf._pfxpold_original_lookup
        self.addCleanup(setattr, evaluate, "_ORIGINAL_LOOKUP", original)
        evaluate._ORIGINAL_LOOKUP = lambda *args: asked.append(args) or []
        self.assertEqual(pyspf.DNSLookup("example.org", "TXT", True, 5), [])
        self.assertEqual(asked, [("example.org", "TXT", True, 5)])


class EvaluateTests(SynchronousTestCase):
    def test_runs(self) -> None:
        """Cold, pyspf runs once per round of questions; with every answer cached, once."""
        from pfxpold.spf.evaluate import evaluate

        answers = {
            ("example.org", "TXT"): ((("example.org", "TXT"), (b"v=spf1 mx -all",)),),
            ("example.org", "MX"): ((("example.org", "MX"), (10, "mx.example.org")),),
            ("mx.example.org", "A"): ((("mx.example.org", "A"), "192.0.2.2"),),
        }
        asked = []

        def ask(key):
            asked.append(key)
            return succeed(answers[key])

        cold = self.successResultOf(
            Deferred.fromCoroutine(
                evaluate("192.0.2.2", "a@example.org", "h.test", "mx.test", ask, lambda: 0.0)
            )
        )
        self.assertEqual((cold.result, cold.mechanism, cold.runs), ("pass", "mx", 3))
        # The MX host's address came with the MX answer, not a run later.
        self.assertEqual(len(asked), 3)
        warm = self.successResultOf(
            Deferred.fromCoroutine(
                evaluate(
                    "192.0.2.2",
                    "a@example.org",
                    "h.test",
                    "mx.test",
                    ask,
                    lambda: 0.0,
                    cached=answers.get,
                )
            )
        )
        self.assertEqual((warm.result, warm.runs), ("pass", 1))
        self.assertEqual(len(asked), 3)
