"""
Unit tests for L{pfxpold.checks.http}: what is POSTed, how answers are
read, and the limits on them, without a network (a L{MemoryReactor} and
in-memory responses).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from twisted.application.service import IService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface.verify import verifyObject

from pfxpold.checks._values import RefusedValue
from pfxpold.checks.http import HTTPCheck, ServiceError, read_body, xml_template
from pfxpold.config import ConfigError
from pfxpold.interfaces import ICheck
from pfxpold.testing import make_options, make_request
from tests.unit.tempdir import secret_file

SOAP_OPTIONS: dict[str, Any] = {
    "url": "http://policy.example/soap",
    "mode": "soap",
    "soap_template": "<e xmlns='urn:p'><s>{sender}</s><c>{client_address}</c></e>",
    "action_path": "p:Body/p:action",
    "namespaces": {"p": "urn:p"},
}


class FakeResponse:
    """
    Enough of L{twisted.web.iweb.IResponse} for L{read_body}.
    """

    def __init__(self, length: Any = UNKNOWN_LENGTH) -> None:
        self.length = length
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(StringTransport())


class ConfigurationTests(SynchronousTestCase):
    """
    Settings and what is sent.
    """

    def test_provides_interfaces(self) -> None:
        """The check provides ICheck and IService, and opens nothing when built."""
        reactor = MemoryReactorClock()
        check = HTTPCheck(make_options(reactor=reactor, url="https://policy.example/"))
        verifyObject(ICheck, check)
        verifyObject(IService, check)
        self.assertEqual(reactor.tcpClients, [])

    def test_json_body(self) -> None:
        """JSON mode posts the chosen attributes as one JSON object."""
        check = HTTPCheck(
            make_options(url="http://p.example/", attributes=["sender", "client_address", "nope"])
        )
        body = json.loads(check.body(make_request(sender="a@b.example", client_address="::1")))
        self.assertEqual(body, {"sender": "a@b.example", "client_address": "::1", "nope": ""})

    def test_form_body(self) -> None:
        """Form mode posts every attribute, URL-encoded."""
        check = HTTPCheck(make_options(url="http://p.example/", mode="form"))
        form = parse_qs(check.body(make_request(sender="a&b=c@example.org")).decode())
        self.assertEqual(form["sender"], ["a&b=c@example.org"])
        self.assertIn("client_address", form)

    def test_xml_template_escapes(self) -> None:
        """Placeholders are filled with XML-escaped values, in one pass."""
        request = make_request(sender="<x>&'\"{client_address}@example.org")
        self.assertEqual(
            xml_template("<s a='{sender}'>{sender}</s>{missing}", request),
            "<s a='&lt;x&gt;&amp;&apos;&quot;{client_address}@example.org'>"
            "&lt;x&gt;&amp;&apos;&quot;{client_address}@example.org</s>",
        )

    def test_soap_body(self) -> None:
        """SOAP mode posts the filled template; the envelope stays well formed."""
        check = HTTPCheck(make_options(**SOAP_OPTIONS))
        body = check.body(make_request(sender="</s><evil/>@example.org"))
        self.assertIn(b"&lt;/s&gt;&lt;evil/&gt;@example.org", body)

    def test_encoding(self) -> None:
        """
        The encoding is C{encoding}; C{mode}, its old name, still sets it.
        """
        self.assertEqual(HTTPCheck(make_options(url="http://p.example/")).mode, "json")
        for key in ("encoding", "mode"):
            check = HTTPCheck(make_options(url="http://p.example/", **{key: "form"}))
            self.assertEqual(check.mode, "form", key)

    def test_configuration_errors(self) -> None:
        """Bad settings are refused when the configuration is loaded."""
        bad: list[dict[str, Any]] = [
            {},
            {"url": "ftp://p.example/"},
            {"url": "http:///nohost"},
            {"url": "http://p.example/", "mode": "xmlrpc"},
            {"url": "http://p.example/", "encoding": "xmlrpc"},
            {"url": "http://p.example/", "encoding": "json", "mode": "form"},
            {"url": "http://p.example/", "headers": {"X-A": "a\r\nX-B: b"}},
            {"url": "http://p.example/", "username": "joe"},
            {"url": "http://p.example/", "ca_file": "/nonexistent/ca.pem"},
            dict(SOAP_OPTIONS, soap_template="<unclosed>"),
            dict(SOAP_OPTIONS, action_path="p:x/[bad"),
            {k: v for k, v in SOAP_OPTIONS.items() if k != "soap_template"},
        ]
        for table in bad:
            self.assertRaises(ConfigError, HTTPCheck, make_options(**table))

    def test_unknown_placeholder(self) -> None:
        """
        A SOAP placeholder naming no request value (a misspelt C{{sendr}})
        is a one-line configuration error naming the check and the key,
        from an inline template or a template file.
        """
        template = "<e><s>{sendr}</s><r>{recipient}</r></e>"
        error = self.assertRaises(
            ConfigError, HTTPCheck, make_options(**dict(SOAP_OPTIONS, soap_template=template))
        )
        message = str(error)
        self.assertIn("key 'soap_template': placeholder {sendr}:", message)
        self.assertNotIn("\n", message)
        path = secret_file(self, template)
        options = {k: v for k, v in SOAP_OPTIONS.items() if k != "soap_template"}
        error = self.assertRaises(
            ConfigError, HTTPCheck, make_options(soap_template_file=path, **options)
        )
        self.assertIn("key 'soap_template_file': placeholder {sendr}:", str(error))

    def test_derived_placeholders(self) -> None:
        """SOAP placeholders take the derived names that file and sql lookups take."""
        template = "<e><n>{client_network}</n><d>{recipient_at_domain}</d></e>"
        check = HTTPCheck(make_options(**dict(SOAP_OPTIONS, soap_template=template)))
        body = check.body(make_request(client_address="192.0.2.7", recipient="b@Example.NET"))
        self.assertEqual(body, b"<e><n>192.0.2.0/24</n><d>@example.net</d></e>")

    def test_basic_auth(self) -> None:
        """username and password_file make a Basic Authorization header."""
        path = secret_file(self, "s3cret")
        check = HTTPCheck(make_options(url="http://p.example/", username="joe", password_file=path))
        self.assertEqual(check.headers.getRawHeaders(b"Authorization"), [b"Basic am9lOnMzY3JldA=="])


class AnswerTests(SynchronousTestCase):
    """
    Reading the action out of answers.
    """

    def test_json_field_path(self) -> None:
        """A dotted action_field walks into nested objects."""
        check = HTTPCheck(make_options(url="http://p.example/", action_field="result.action"))
        self.assertEqual(check.json_action(b'{"result": {"action": "REJECT no"}}'), "REJECT no")
        for body in [
            b'{"result": {}}',
            b'{"result": "x"}',
            b"[1]",
            b"{",
            b'{"result": {"action": 1}}',
        ]:
            self.assertRaises(ServiceError, check.json_action, body)

    def test_soap_answer(self) -> None:
        """The action is the text of the element at action_path."""
        check = HTTPCheck(make_options(**SOAP_OPTIONS))
        answer = b"<r xmlns='urn:p'><Body><action> OK fine </action></Body></r>"
        self.assertEqual(check.soap_action(answer, 200), "OK fine")
        self.assertRaises(ServiceError, check.soap_action, b"<r xmlns='urn:p'/>", 200)
        self.assertRaises(ServiceError, check.soap_action, answer, 503)
        self.assertRaises(ServiceError, check.soap_action, b"not xml", 200)

    def test_soap_refuses_dtd(self) -> None:
        """A DTD (entity expansion, external entities) is refused outright."""
        check = HTTPCheck(make_options(**SOAP_OPTIONS))
        bomb = (
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            b"<r xmlns='urn:p'><Body><action>&b;</action></Body></r>"
        )
        error = self.assertRaises(ServiceError, check.soap_action, bomb, 200)
        self.assertIn("DTD", str(error))

    def test_soap_fault(self) -> None:
        """A SOAP fault is an error that carries its text."""
        check = HTTPCheck(make_options(**SOAP_OPTIONS))
        fault = (
            b"<E xmlns='urn:x'><Body><Fault><faultstring>db down</faultstring></Fault></Body></E>"
        )
        error = self.assertRaises(ServiceError, check.soap_action, fault, 500)
        self.assertIn("db down", str(error))


class BodyTests(SynchronousTestCase):
    """
    The capped body reader.
    """

    def test_small_body(self) -> None:
        """A body within the limit is returned whole."""
        response = FakeResponse()
        body = read_body(response, 10)
        response.protocol.dataReceived(b"12345")
        response.protocol.dataReceived(b"67890")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(body), b"1234567890")

    def test_too_large(self) -> None:
        """Past the limit the connection is dropped and the read fails."""
        response = FakeResponse()
        body = read_body(response, 10)
        response.protocol.dataReceived(b"12345678901")
        self.assertTrue(response.protocol.transport.producerState == "stopped")
        self.failureResultOf(body, ServiceError)

    def test_declared_too_large(self) -> None:
        """A Content-Length over the limit fails at the first bytes."""
        response = FakeResponse(length=10_000_000)
        body = read_body(response, 100)
        response.protocol.dataReceived(b"x")
        self.failureResultOf(body, ServiceError)

    def test_cancel(self) -> None:
        """Cancelling the read (the chain's timeout) drops the connection."""
        response = FakeResponse()
        body: Deferred[bytes] = read_body(response, 100)
        body.cancel()
        self.failureResultOf(body, CancelledError)
        self.assertEqual(response.protocol.transport.producerState, "stopped")


class ControlCharacterTests(SynchronousTestCase):
    """
    A value with a control character is never sent to the service.
    """

    def test_sent_value_refused(self) -> None:
        """
        A NUL in a value the body would carry fails the check at once
        (on_error decides), with nothing sent; the refusal is counted.
        """
        for options in [
            {"url": "http://p.example/", "attributes": ["sender"]},
            {"url": "http://p.example/", "mode": "form"},
            SOAP_OPTIONS,
        ]:
            reactor = MemoryReactorClock()
            check = HTTPCheck(make_options(reactor=reactor, **options))
            failure = self.failureResultOf(
                check.check(make_request(sender="alice@example.com\x00")), RefusedValue
            )
            self.assertIn("control character", failure.getErrorMessage())
            self.assertEqual(reactor.tcpClients, [])
            self.assertEqual(check.guard.refused, 1)

    def test_unsent_value_not_refused(self) -> None:
        """A control character in an attribute the body does not carry is no reason."""
        check = HTTPCheck(make_options(url="http://p.example/", attributes=["recipient"]))
        self.assertEqual(
            check.sent_values(make_request(sender="a\x00", recipient="b@example.org")),
            [("recipient", "b@example.org")],
        )
        self.assertFalse(check.guard.refuses(check.sent_values(make_request(sender="a\x00"))))
