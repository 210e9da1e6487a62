"""
The C{http} check: asks a web service for the action, as a REST call
(the request's attributes POSTed as JSON or a form, the action read from a
JSON field or a plain text body) or as a SOAP call (an XML envelope filled
from the request, the action read from an element of the answer).

Requests go through twisted.web's L{Agent} with a persistent connection
pool; TLS certificates are verified (against the system's trust store, or
the CA file given). Answers are capped in size, must not break lines, and
SOAP answers are parsed without DTDs, so a service cannot inject a second
action or blow up the daemon's memory.
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ElementTree
from io import BytesIO
from typing import Any, Optional
from urllib.parse import urlencode, urlsplit
from xml.sax.saxutils import escape

from twisted.application.service import IService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IPolicyForHTTPS
from zope.interface import implementer

from pfxpold.action import Action
from pfxpold.checks import MissingExtraError, require_tls
from pfxpold.checks._values import (
    ControlCharacterGuard,
    RefusedValue,
    check_template_names,
    template_value,
)
from pfxpold.config import CheckOptions
from pfxpold.interfaces import ICheck
from pfxpold.request import PolicyRequest

MODES = ("json", "form", "soap")
DEFAULT_MAX_RESPONSE_SIZE = 65536
DEFAULT_MAX_REQUESTS = 20
DEFAULT_CONNECT_TIMEOUT = 5.0

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ServiceError(Exception):
    """
    The web service's answer cannot be used: wrong status, too large, not
    parseable, or without a usable action.
    """


class _BodyCollector(Protocol):
    """
    Collects a response body up to C{limit} bytes; beyond that it drops the
    connection and fails, so a service cannot make pfxpold buffer a huge
    answer.
    """

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.declared_too_large = False

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit or self.declared_too_large:
            _stop_producing(self)
            self.finished.errback(
                Failure(ServiceError(f"answer is larger than {self.limit} bytes"))
            )
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


def _stop_producing(collector: _BodyCollector) -> None:
    # deliverBody makes an IPushProducer the body protocol's transport:
    # stopping it drops the connection.
    if collector.transport is not None:
        IPushProducer(collector.transport).stopProducing()


def read_body(response: Any, limit: int) -> Deferred[bytes]:
    """
    @return: a Deferred that fires with the body of C{response}, or fails
        with L{ServiceError} when it is longer than C{limit} bytes.
        Cancelling it drops the connection.
    """
    collector: Optional[_BodyCollector] = None

    def cancel(deferred: Deferred[bytes]) -> None:
        if collector is not None:
            _stop_producing(collector)

    finished: Deferred[bytes] = Deferred(cancel)
    collector = _BodyCollector(finished, limit)
    if response.length is not UNKNOWN_LENGTH and response.length > limit:
        # Said too large up front: drop it at the first bytes.
        collector.declared_too_large = True
    response.deliverBody(collector)
    return finished


@implementer(IPolicyForHTTPS)
class _TrustCA:
    """
    Verifies servers against one CA certificate instead of the system's
    trust store (for a service with an internal CA).
    """

    def __init__(self, pem: bytes) -> None:
        self._ssl = require_tls("http")
        self._ca = self._ssl.Certificate.loadPEM(pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self._ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._ca)


def xml_template(template: str, request: PolicyRequest) -> str:
    """
    Fill C{{name}} placeholders in a SOAP envelope with the request's
    attributes, escaped as XML (unknown attributes become empty). Values
    are put in in one pass, so a value cannot bring in a placeholder.
    """
    return _PLACEHOLDER.sub(
        lambda match: escape(
            template_value(request, match.group(1)), {'"': "&quot;", "'": "&apos;"}
        ),
        template,
    )


@implementer(ICheck, IService)
class HTTPCheck(Service):
    """
    Asks a web service what to answer.
    """

    _log = Logger()

    def __init__(self, options: CheckOptions) -> None:
        self.setName(options.name)
        self._reactor = options.reactor
        self._classes = options.restriction_classes
        url = options.string("url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise options.error("url", f"must be an http:// or https:// URL, not {url!r}")
        self.url = url.encode("ascii")
        # "encoding"; "mode" was its name before checks had mode = "shadow",
        # and a mode the chain does not read still reaches this table.
        if "encoding" in options and "mode" in options:
            raise options.error("mode", "use encoding alone (mode is its old name)")
        self.mode = options.choice("mode" if "mode" in options else "encoding", MODES, "json")
        self.attributes = options.strings("attributes", [])
        self.action_field = options.string("action_field", "action")
        self.max_response_size = options.integer(
            "max_response_size", DEFAULT_MAX_RESPONSE_SIZE, minimum=64
        )
        headers = Headers({b"User-Agent": [b"pfxpold"]})
        for name, value in options.table("headers", {}).items():
            if not isinstance(value, str) or "\n" in value or "\r" in value:
                raise options.error("headers", f"{name!r} must be a one-line string")
            headers.addRawHeader(name, value)
        username = options.string("username", None)
        password = options.secret("password_file", None)
        if (username is None) != (password is None):
            raise options.error("username", "username and password_file go together")
        if username is not None:
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            headers.setRawHeaders(b"Authorization", [f"Basic {token}".encode("ascii")])
        self.template: Optional[str] = None
        #: The names of the SOAP template's placeholders, in order.
        self.template_names: list[str] = []
        self.action_path = ""
        self.namespaces: dict[str, str] = {}
        if self.mode == "soap":
            self.template = options.string("soap_template", None)
            template_key = "soap_template"
            if self.template is None:
                template_key = "soap_template_file"
                path = options.path("soap_template_file")
                try:
                    with open(path, encoding="utf-8") as f:
                        self.template = f.read()
                except OSError as e:
                    raise options.error(
                        "soap_template_file", f"cannot read {path}: {e.strerror}"
                    ) from None
            else:
                options.path("soap_template_file", None)
            self.template_names = _PLACEHOLDER.findall(self.template)
            try:
                check_template_names(self.template_names)
            except ValueError as e:
                raise options.error(template_key, str(e)) from None
            self.action_path = options.string("action_path")
            self.namespaces = options.table("namespaces", {})
            try:
                ElementTree.fromstring(xml_template(self.template, _EMPTY_REQUEST))
            except ElementTree.ParseError as e:
                raise options.error(template_key, f"is not well-formed XML: {e}") from None
            try:
                ElementTree.Element("x").find(self.action_path, self.namespaces)
            except (SyntaxError, KeyError, TypeError, ValueError) as e:
                raise options.error("action_path", f"is not an ElementTree path: {e}") from None
            headers.setRawHeaders(b"Content-Type", [b"text/xml; charset=utf-8"])
            headers.setRawHeaders(
                b"SOAPAction", [f'"{options.string("soap_action", "")}"'.encode("ascii")]
            )
        elif self.mode == "json":
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
        else:
            headers.setRawHeaders(b"Content-Type", [b"application/x-www-form-urlencoded"])
        self.headers = headers
        self.guard = ControlCharacterGuard(options.name)
        ca_file = options.path("ca_file", None)
        policy: Any = None
        if parts.scheme == "https" or ca_file is not None:
            try:
                require_tls("http")
            except MissingExtraError as e:
                raise options.error("ca_file" if parts.scheme == "http" else "url", str(e)) from None
        if ca_file is not None:
            try:
                with open(ca_file, "rb") as f:
                    policy = _TrustCA(f.read())
            except OSError as e:
                raise options.error("ca_file", f"cannot read {ca_file}: {e.strerror}") from None
            except Exception as e:
                raise options.error("ca_file", f"not a PEM certificate: {e}") from None
        elif parts.scheme == "https":
            policy = BrowserLikePolicyForHTTPS()
        max_requests = options.integer("max_requests", DEFAULT_MAX_REQUESTS, minimum=1)
        connect_timeout = options.number("connect_timeout", DEFAULT_CONNECT_TIMEOUT, positive=True)
        self._semaphore = DeferredSemaphore(max_requests)
        self._pool = HTTPConnectionPool(self._reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_requests
        if policy is None:
            # http://: the Agent's own policy is never used, and needs no TLS.
            self._agent = Agent(self._reactor, pool=self._pool, connectTimeout=connect_timeout)
        else:
            self._agent = Agent(
                self._reactor,
                contextFactory=policy,
                pool=self._pool,
                connectTimeout=connect_timeout,
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._pool.closeCachedConnections()

    def body(self, request: PolicyRequest) -> bytes:
        """
        The body to POST for C{request}.
        """
        if self.mode == "soap":
            assert self.template is not None
            return xml_template(self.template, request).encode("utf-8")
        names = self.attributes or list(request)
        values = {name: request.get(name, "") for name in names}
        if self.mode == "json":
            return json.dumps(values).encode("utf-8")
        return urlencode(values).encode("ascii")

    def sent_values(self, request: PolicyRequest) -> list[tuple[str, str]]:
        """
        The request's values that L{body} puts in the body, by name.
        """
        if self.template is not None:
            return [(name, template_value(request, name)) for name in self.template_names]
        return [(name, request.get(name, "")) for name in self.attributes or request]

    def check(self, request: PolicyRequest) -> Deferred[Action]:
        if self.guard.refuses(self.sent_values(request)):
            # What the service would do with it is unknown (XML 1.0 cannot
            # even carry most of them): not sent, and on_error decides.
            return fail(RefusedValue("a request value holds a control character; not sent"))
        return self._semaphore.run(lambda: Deferred.fromCoroutine(self._ask(request)))

    async def _ask(self, request: PolicyRequest) -> Action:
        try:
            response = await self._agent.request(
                b"POST", self.url, self.headers, FileBodyProducer(BytesIO(self.body(request)))
            )
        except ResponseNeverReceived as e:
            if all(reason.check(CancelledError) for reason in e.reasons):
                # The chain's timeout cancelled us; say so, so that it is
                # reported as a timeout rather than a failure.
                raise CancelledError() from None
            raise
        body = await read_body(response, self.max_response_size)
        if self.mode == "soap":
            value = self.soap_action(body, response.code)
        elif not 200 <= response.code < 300:
            raise ServiceError(f"HTTP status {response.code}")
        elif self.action_field:
            value = self.json_action(body)
        else:
            value = body.decode("utf-8", "replace").strip()
        if "\n" in value or "\r" in value or "\0" in value:
            raise ServiceError("the action has a line break or NUL")
        return Action.parse(value, self._classes)

    def json_action(self, body: bytes) -> str:
        """
        @return: the action in the JSON C{body}, at the dotted path
            C{action_field}.
        """
        try:
            value: Any = json.loads(body)
        except ValueError as e:
            raise ServiceError(f"answer is not JSON: {e}") from None
        for key in self.action_field.split("."):
            if not isinstance(value, dict) or key not in value:
                raise ServiceError(f"answer has no {self.action_field!r} field")
            value = value[key]
        if not isinstance(value, str):
            raise ServiceError(f"{self.action_field!r} is not a string")
        return value

    def soap_action(self, body: bytes, code: int) -> str:
        """
        @return: the text of the element at C{action_path} in the SOAP
            answer C{body}.
        """
        if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
            # SOAP forbids DTDs; refusing them rules out entity expansion.
            raise ServiceError("SOAP answer has a DTD")
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError as e:
            raise ServiceError(f"answer is not XML: {e}") from None
        fault = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Fault"), None)
        if fault is not None:
            text = " ".join(part.strip() for part in fault.itertext() if part.strip())
            raise ServiceError(f"SOAP fault (HTTP {code}): {text[:200]}")
        if not 200 <= code < 300:
            raise ServiceError(f"HTTP status {code}")
        element = root.find(self.action_path, self.namespaces)
        action = (element.text or "").strip() if element is not None else ""
        if not action:
            raise ServiceError(f"SOAP answer has no {self.action_path!r}")
        return action


_EMPTY_REQUEST = PolicyRequest({})
