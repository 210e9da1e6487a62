"""
Unit tests for L{pfxpold.checks.ldap}: filter templates, result mapping,
timeouts, caching and connection state, with ldaptor's test driver and a
L{Clock} instead of a directory.
"""

from __future__ import annotations

from typing import Any

from ldaptor.protocols import pureldap
from ldaptor.testutil import LDAPClientTestDriver
from twisted.application.service import IService
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from pfxpold.checks import ldap
from pfxpold.checks.ldap import FilterTemplate, LDAPCheck, LDAPCheckError
from pfxpold.config import ConfigError
from pfxpold.interfaces import ICheck
from pfxpold.testing import CheckTestCase, make_options, make_request, run_check
from tests.unit.tempdir import secret_file


class FakeService:
    """
    Stands in for the ClientService: hands out one protocol.
    """

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.running = False

    def whenConnected(self, failAfterFailures: Any = None) -> Deferred[Any]:
        return succeed(self.protocol)

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> Deferred[None]:
        self.running = False
        return succeed(None)


class SilentProtocol:
    """
    A connected LDAP client whose server never answers.
    """

    def __init__(self, clock: Clock) -> None:
        self.connected = True
        self.transport = StringTransport()
        self.last_received = clock.seconds()
        self.handlers: list[Any] = []

    def send_multiResponse(self, op: Any, handler: Any) -> Deferred[Any]:
        self.handlers.append((op, handler))
        return Deferred()


def entry(dn: str, **attributes: list[str]) -> pureldap.LDAPSearchResultEntry:
    return pureldap.LDAPSearchResultEntry(
        objectName=dn,
        attributes=[
            (name.encode(), [v.encode() for v in values]) for name, values in attributes.items()
        ],
    )


DONE = pureldap.LDAPSearchResultDone(resultCode=0)


def make_check(*responses: Any, clock: Any = None, **table: Any) -> tuple[LDAPCheck, Any]:
    table.setdefault("server", "tcp:127.0.0.1:389")
    table.setdefault("base", "dc=example,dc=com")
    table.setdefault("filter", "(mail={sender})")
    protocol = responses[0] if responses and not isinstance(responses[0], list) else None
    if protocol is None:
        protocol = LDAPClientTestDriver(*responses)
    check = LDAPCheck(
        make_options(reactor=clock or Clock(), **table), service=FakeService(protocol)
    )
    return check, protocol


class FilterTemplateTests(CheckTestCase):
    """
    Request values go into filter objects, never into filter text.
    """

    def test_injection_is_literal(self) -> None:
        """A sender full of filter syntax is one literal assertion value."""
        template = FilterTemplate("(&(objectClass=person)(mail={sender}))")
        search = template.fill({"sender": "*)(uid=*"})
        self.assertEqual(search.asText(), "(&(objectClass=person)(mail=\\2a\\29\\28uid=\\2a))")
        equality = list(search.data)[1]
        self.assertIsInstance(equality, pureldap.LDAPFilter_equalityMatch)
        self.assertEqual(equality.assertionValue.value, "*)(uid=*")

    def test_substrings_and_not(self) -> None:
        """Placeholders work inside substrings and negations."""
        template = FilterTemplate("(!(mail=*@{sender_domain}))")
        self.assertEqual(template.fill({"sender_domain": "a*b"}).asText(), "(!(mail=*@a\\2ab))")
        self.assertEqual(template.names, ["sender_domain"])

    def test_bad_templates(self) -> None:
        """Placeholders outside values, and broken filters, are refused."""
        for bad in ["({sender}=x)", "(mail={sender}", "mail={sender}", "({client_address}=*)"]:
            self.assertRaises(ValueError, FilterTemplate, bad)

    def test_unknown_placeholder(self) -> None:
        """
        A placeholder naming no request value (a misspelt C{{sendr}}) is a
        one-line configuration error naming the check and the key, not a
        search for an empty value on every request.
        """
        error = self.assertRaises(
            ConfigError,
            LDAPCheck,
            make_options(
                name="directory",
                server="tcp:127.0.0.1:389",
                base="dc=x",
                filter="(|(mail={sendr})(uid={sasl_username}))",
            ),
        )
        message = str(error)
        self.assertIn("check 'directory': key 'filter': placeholder {sendr}:", message)
        self.assertNotIn("\n", message)

    def test_derived_placeholders(self) -> None:
        """Placeholders take the derived names that file and sql lookups take."""
        template = FilterTemplate("(&(net={client_network})(d={sender_at_domain}))")
        check, driver = make_check([DONE], filter="(&(net={client_network})(d={sender_at_domain}))")
        self.assertEqual(template.names, ["client_network", "sender_at_domain"])
        self.assertAction(
            check, make_request(client_address="192.0.2.7", sender="a@Example.COM"), "DUNNO"
        )
        self.assertEqual(
            driver.sent[0].filter.asText(), "(&(net=192.0.2.0/24)(d=@example.com))"
        )

    def test_configuration_errors(self) -> None:
        """Bad settings are refused when the configuration is loaded."""
        base = {"server": "tcp:127.0.0.1:389", "base": "dc=x", "filter": "(mail={sender})"}
        bad: list[dict[str, Any]] = [
            {k: v for k, v in base.items() if k != "base"},
            dict(base, filter="(mail={sender}"),
            dict(base, server="nonsense:1"),
            dict(base, scope="tree"),
            dict(base, bind_dn="cn=x"),
            dict(base, bind_password_file="/nonexistent/secret"),
            dict(base, found="BOGUS action"),
        ]
        for table in bad:
            self.assertRaises(ConfigError, LDAPCheck, make_options(**table))


class MappingTests(CheckTestCase):
    """
    Found / not found, and attribute values as actions.
    """

    def test_interfaces_and_service(self) -> None:
        """The check provides ICheck and IService and starts its connection service."""
        check, _ = make_check()
        verifyObject(ICheck, check)
        verifyObject(IService, check)
        check.startService()
        self.assertTrue(check._service.running)
        check.stopService()
        self.assertFalse(check._service.running)

    def test_found_not_found(self) -> None:
        """An entry found answers found, none answers not_found; the search is as configured."""
        check, driver = make_check(
            [entry("uid=a,dc=example,dc=com"), DONE],
            [DONE],
            found="REJECT known",
            scope="one",
        )
        self.assertAction(check, make_request(sender="a@example.com"), "REJECT known")
        self.assertAction(check, make_request(sender="b@example.com"), "DUNNO")
        search = driver.sent[0]
        self.assertEqual(search.baseObject, "dc=example,dc=com")
        self.assertEqual(search.scope, pureldap.LDAP_SCOPE_singleLevel)
        self.assertEqual(search.attributes, ["1.1"])
        self.assertEqual(search.filter.asText(), "(mail=a@example.com)")

    def test_empty_value_not_searched(self) -> None:
        """An empty sender (a bounce) answers not_found without a search."""
        check, driver = make_check(not_found="OK bounce")
        self.assertAction(check, make_request(sender=""), "OK bounce")
        self.assertEqual(driver.sent, [])

    def test_attribute_value(self) -> None:
        """The attribute's value is the action; without a value, found applies."""
        check, driver = make_check(
            [entry("uid=a,dc=x", description=["REJECT go away"]), DONE],
            [entry("uid=b,dc=x"), DONE],
            attribute="description",
        )
        self.assertAction(check, make_request(), "REJECT go away")
        self.assertAction(check, make_request(), "DUNNO")
        self.assertEqual(driver.sent[0].attributes, ["description"])

    def test_multiple_values(self) -> None:
        """Equal values across entries agree; different values are an error."""
        check, _ = make_check(
            [
                entry("uid=a,dc=x", description=["OK"]),
                entry("uid=b,dc=x", description=["OK"]),
                DONE,
            ],
            [entry("uid=c,dc=x", description=["OK", "REJECT no"]), DONE],
            attribute="description",
        )
        self.assertAction(check, make_request(), "OK")
        self.failureResultOf(run_check(check, make_request()), LDAPCheckError)

    def test_unsafe_values(self) -> None:
        """A value with a line break, or that is no action, is an error."""
        check, _ = make_check(
            [entry("uid=a,dc=x", description=["OK\naction=REJECT"]), DONE],
            [entry("uid=a,dc=x", description=["MAYBE later"]), DONE],
            attribute="description",
        )
        self.failureResultOf(run_check(check, make_request()), LDAPCheckError)
        self.failureResultOf(run_check(check, make_request()), LDAPCheckError)

    def test_server_error(self) -> None:
        """
        A search the server refuses, or under a base that does not exist,
        is an error (on_error applies), never "not found".
        """
        check, _ = make_check(
            [pureldap.LDAPSearchResultDone(resultCode=50, errorMessage=b"no")],
            [pureldap.LDAPSearchResultDone(resultCode=32, errorMessage=b"no such object")],
            not_found="REJECT unknown",
        )
        self.failureResultOf(run_check(check, make_request()), LDAPCheckError)
        self.failureResultOf(run_check(check, make_request()), LDAPCheckError)

    def test_size_limit(self) -> None:
        """More entries than max_entries still means found."""
        check, driver = make_check(
            [entry("uid=a,dc=x"), pureldap.LDAPSearchResultDone(resultCode=4)], max_entries=1
        )
        self.assertAction(check, make_request(), "OK")
        self.assertEqual(driver.sent[0].sizeLimit, 1)

    def test_cache(self) -> None:
        """With cache_ttl, an answer is reused until the TTL passes."""
        clock = Clock()
        check, driver = make_check([entry("uid=a,dc=x"), DONE], [DONE], clock=clock, cache_ttl=60)
        self.assertAction(check, make_request(sender="a@x.example"), "OK")
        self.assertAction(check, make_request(sender="a@x.example"), "OK")
        self.assertEqual(len(driver.sent), 1)
        clock.advance(61)
        self.assertAction(check, make_request(sender="a@x.example"), "DUNNO")
        self.assertEqual(len(driver.sent), 2)

    def test_full_cache_keeps_recent_answers(self) -> None:
        """
        A full cache drops its least recently used answer, not every
        answer: no burst of searches after the cap.
        """
        self.patch(ldap, "MAX_CACHE_ENTRIES", 2)
        check, driver = make_check([DONE], [DONE], [DONE], cache_ttl=60)
        for sender in ("a@x.example", "b@x.example", "c@x.example"):
            self.assertAction(check, make_request(sender=sender), "DUNNO")
        self.assertAction(check, make_request(sender="b@x.example"), "DUNNO")
        self.assertAction(check, make_request(sender="c@x.example"), "DUNNO")
        self.assertEqual(len(driver.sent), 3)
        self.assertEqual(len(check.cache), 2)

    def test_concurrent_searches_shared(self) -> None:
        """
        With a cache, requests asking the same while a search runs wait for
        that search; one giving up leaves it to the others.
        """
        clock = Clock()
        protocol = SilentProtocol(clock)
        check, _ = make_check(protocol, clock=clock, cache_ttl=60)
        first, second = (run_check(check, make_request()) for _ in range(2))
        other = run_check(check, make_request(sender="other@example.com"))
        self.assertEqual(len(protocol.handlers), 2)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        protocol.handlers[0][1](entry("uid=a,dc=x"))
        protocol.handlers[0][1](DONE)
        self.assertEqual(str(self.successResultOf(second)), "OK")
        self.assertEqual(len(check.in_flight), 1)
        protocol.handlers[1][1](DONE)
        self.assertEqual(str(self.successResultOf(other)), "DUNNO")
        self.assertEqual(len(check.in_flight), 0)


class ConnectionTests(CheckTestCase):
    """
    Timeouts, a silent server, bounded concurrency and the bind.
    """

    def test_timeout_silent_server(self) -> None:
        """
        A search unanswered for request_timeout fails with TimeoutError, and
        a server silent since before the search gets its connection dropped.
        """
        clock = Clock()
        protocol = SilentProtocol(clock)
        clock.advance(10)
        check, _ = make_check(protocol, clock=clock, request_timeout=2)
        result = run_check(check, make_request())
        clock.advance(2)
        self.failureResultOf(result, TimeoutError)
        self.assertTrue(protocol.transport.disconnecting)
        # A late answer is ignored and ends the search.
        handler = protocol.handlers[0][1]
        self.assertTrue(handler(DONE))

    def test_timeout_busy_server(self) -> None:
        """A slow search on a server that still talks keeps the connection."""
        clock = Clock()
        protocol = SilentProtocol(clock)
        check, _ = make_check(protocol, clock=clock, request_timeout=2)
        result = run_check(check, make_request())
        clock.advance(1)
        protocol.last_received = clock.seconds()
        clock.advance(1)
        self.failureResultOf(result, TimeoutError)
        self.assertFalse(protocol.transport.disconnecting)

    def test_bounded(self) -> None:
        """No more than max_requests searches are on the wire at once."""
        clock = Clock()
        protocol = SilentProtocol(clock)
        check, _ = make_check(protocol, clock=clock, max_requests=2, request_timeout=5)
        results = [run_check(check, make_request()) for _ in range(3)]
        self.assertEqual(len(protocol.handlers), 2)
        entry_found = entry("uid=a,dc=x")
        protocol.handlers[0][1](entry_found)
        protocol.handlers[0][1](DONE)
        self.assertEqual(str(self.successResultOf(results[0])), "OK")
        self.assertEqual(len(protocol.handlers), 3)

    def test_down_fails_at_once(self) -> None:
        """While the directory is unreachable, requests fail without waiting."""
        check, driver = make_check()
        check._lost(Failure(ConnectionError("gone")))
        self.failureResultOf(run_check(check, make_request()), LDAPCheckError)
        self.assertEqual(driver.sent, [])

    def test_bind(self) -> None:
        """A new connection is bound with the DN and the password from the file."""
        path = secret_file(self, "s3cret")
        check, _ = make_check(bind_dn="cn=pfxpold,dc=x", bind_password_file=path)
        driver = LDAPClientTestDriver([pureldap.LDAPBindResponse(resultCode=0)])
        self.successResultOf(check._prepare(driver))
        self.assertEqual(driver.sent[0].dn, "cn=pfxpold,dc=x")
        self.assertEqual(driver.sent[0].auth, "s3cret")
        refused = LDAPClientTestDriver([pureldap.LDAPBindResponse(resultCode=49)])
        self.failureResultOf(check._prepare(refused))


class ControlCharacterTests(CheckTestCase):
    """
    A value with a control character is never sent to the directory.
    """

    def test_nul_not_searched(self) -> None:
        """
        C{alice@example.com\\x00} (slapd stops at the NUL and would find
        alice) answers not_found without a search, logged escaped and
        counted.
        """
        check, driver = make_check(found="OK alice", not_found="REJECT unknown")
        with capturedLogs() as events:
            self.assertAction(
                check, make_request(sender="alice@example.com\x00"), "REJECT unknown"
            )
        self.assertEqual(driver.sent, [])
        self.assertEqual(check.guard.refused, 1)
        texts = [formatEvent(event) for event in events]
        self.assertIn("alice@example.com\\x00", " ".join(texts))
        self.assertTrue(all(text.isprintable() for text in texts))

    def test_other_controls_not_searched(self) -> None:
        """CR, ESC, DEL and C1 controls are refused as well."""
        check, driver = make_check(not_found="REJECT unknown")
        for value in ["a\rb@x.test", "a\x1b[2J@x.test", "a\x7f@x.test", "a\x85@x.test"]:
            self.assertAction(check, make_request(sender=value), "REJECT unknown")
        self.assertEqual(driver.sent, [])

    def test_bind_error_escaped(self) -> None:
        """The directory's own error text is escaped in the bind failure's log line."""
        path = secret_file(self, "s3cret")
        check, _ = make_check(bind_dn="cn=pfxpold,dc=x", bind_password_file=path)
        refused = LDAPClientTestDriver(
            [pureldap.LDAPBindResponse(resultCode=49, errorMessage="no\r\x1b[2Jway")]
        )
        with capturedLogs() as events:
            self.failureResultOf(check._prepare(refused))
        [text] = [formatEvent(event) for event in events]
        self.assertTrue(text.isprintable(), text)
        self.assertIn("no\\x0d\\x1b[2Jway", text)
