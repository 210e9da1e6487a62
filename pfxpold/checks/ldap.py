"""
The C{ldap} check: searches a directory (OpenLDAP, Active Directory, ...)
with a filter filled from the request, over one persistent ldaptor
connection, and answers by whether an entry was found or by the value of
one of its attributes.

The filter template is parsed once, at start-up, into ldaptor filter
objects; request values are put into those objects' assertion values, never
into filter text, so no sender can widen the search (C{*)(uid=*} is looked
up as those eight characters).

The connection may be protected by TLS, either from the first byte
(C{ldaps://}) or after an LDAP STARTTLS request (RFC 4513), with the
server's certificate verified against a CA and a host name; and bound by a
simple bind (a DN and a password) or by SASL EXTERNAL, which lets the
directory take the client's identity from the connection: the peer
credentials of a unix socket (C{ldapi://}) or a TLS client certificate.
"""

from __future__ import annotations

import ipaddress
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import IService, Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IHandshakeListener,
    IReactorPluggableNameResolver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.action import Action, ActionError
from pfxpold.cache import Coalescer, ExpiringCache
from pfxpold.checks import MissingExtraError, require_tls
from pfxpold.checks._values import ControlCharacterGuard, check_template_names, template_value
from pfxpold.config import CheckOptions
from pfxpold.escape import escape
from pfxpold.interfaces import ICheck
from pfxpold.request import PolicyRequest

# ldaptor 21.2 builds its filter grammar with pyparsing's pre-3.0 names;
# silence exactly those deprecation warnings, and only from ldaptor.
_LDAPTOR_MODULES = r"ldaptor(\.|$)"
warnings.filterwarnings("ignore", category=DeprecationWarning, module=_LDAPTOR_MODULES)

from ldaptor import ldapfilter  # noqa: E402
from ldaptor.protocols import pureber, pureldap  # noqa: E402
from ldaptor.protocols.ldap import ldaperrors  # noqa: E402
from ldaptor.protocols.ldap.ldapclient import LDAPClient  # noqa: E402

SCOPES = {
    "base": pureldap.LDAP_SCOPE_baseObject,
    "one": pureldap.LDAP_SCOPE_singleLevel,
    "sub": pureldap.LDAP_SCOPE_wholeSubtree,
}
DEFAULT_REQUEST_TIMEOUT = 5.0
DEFAULT_MAX_REQUESTS = 10
DEFAULT_MAX_ENTRIES = 10
MAX_CACHE_ENTRIES = 10_000
#: Longest wait between reconnection attempts, in seconds.
RETRY_MAX_DELAY = 10.0

#: Ports of ldap:// and ldaps:// URLs that name none.
LDAP_PORT = 389
LDAPS_PORT = 636
#: Where Debian's slapd listens for C{ldapi:///} (its SLAPD_SERVICES).
DEFAULT_LDAPI_PATH = "/var/run/slapd/ldapi"
#: The SASL mechanisms the check binds with: ldaptor sends a SASL bind
#: request as it is given, with no mechanism of its own, so only those
#: needing no exchange of challenges can be had: EXTERNAL.
SASL_MECHANISMS = ("EXTERNAL",)
#: The settings that shape TLS, meaningful only where TLS is spoken.
TLS_KEYS = ("ca_file", "tls_hostname", "cert_file", "key_file")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MARKER = "pfxpoldvalue{}x"
_MARKER_PATTERN = re.compile(r"pfxpoldvalue(\d+)x")


class LDAPCheckError(Exception):
    """
    The directory's answer cannot be used.
    """


@dataclass(frozen=True)
class Server:
    """
    Where the directory is, from the C{server} setting.

    @ivar scheme: C{"ldap"}, C{"ldaps"} or C{"ldapi"} for an LDAP URL;
        C{""} for a Twisted client endpoint string, kept in C{endpoint}.
    @ivar host: the host of an ldap:// or ldaps:// URL.
    @ivar port: its port.
    @ivar path: the socket of an ldapi:// URL.
    """

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""
    endpoint: str = ""

    @property
    def local(self) -> bool:
        """Whether the directory is reached over a unix socket."""
        return self.scheme == "ldapi" or self.endpoint.startswith("unix:")

    @property
    def implicit_tls(self) -> bool:
        """Whether TLS starts with the connection (ldaps://, tls:)."""
        return self.scheme == "ldaps" or self.endpoint.startswith("tls:")


def parse_server(text: str) -> Server:
    """
    Read the C{server} setting: an LDAP URL (C{ldap://host[:port]},
    C{ldaps://host[:port]}, C{ldapi://} and a percent-encoded socket path)
    or, without C{://}, a Twisted client endpoint string.

    @raise ValueError: for an URL that is not one of those.
    """
    if "://" not in text:
        return Server("", endpoint=text)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"is not a valid LDAP URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps", "ldapi"):
        raise ValueError(f"{scheme}:// is not ldap://, ldaps:// or ldapi://")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            "an LDAP URL here names only the server: give the base and the filter"
            " in base and filter"
        )
    if scheme == "ldapi":
        path = unquote(parts.netloc) or DEFAULT_LDAPI_PATH
        if not path.startswith("/"):
            raise ValueError(
                "ldapi:// takes an absolute socket path, percent-encoded:"
                " ldapi://%2Fvar%2Frun%2Fslapd%2Fldapi"
            )
        return Server("ldapi", path=path)
    if parts.username is not None or not parts.hostname:
        raise ValueError(f"{scheme}:// must name a host (and no user): {scheme}://host:port")
    default_port = LDAPS_PORT if scheme == "ldaps" else LDAP_PORT
    return Server(scheme, host=parts.hostname, port=port or default_port)


class FilterTemplate:
    """
    An LDAP filter with C{{attribute}} placeholders in its values, parsed
    once; L{fill} makes a filter object for a request.

    @ivar names: the request attributes the template uses.
    """

    def __init__(self, template: str) -> None:
        """
        @raise ValueError: when the template is not a valid filter, a
            placeholder stands anywhere but in a value, or names no request
            value.
        """
        self.names: list[str] = []

        def mark(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.names:
                self.names.append(name)
            return _MARKER.format(self.names.index(name))

        marked = _PLACEHOLDER.sub(mark, template)
        check_template_names(self.names)
        try:
            with warnings.catch_warnings():
                # Parsing warns again (parseString); test runners that
                # reset the warning filters per test would show it.
                warnings.filterwarnings(
                    "ignore", category=DeprecationWarning, module=_LDAPTOR_MODULES
                )
                self._parsed = ldapfilter.parseFilter(marked)
        except (ldapfilter.InvalidLDAPFilter, Exception) as e:
            raise ValueError(f"not a valid LDAP filter: {e}") from None
        probe = self.fill({name: "" for name in self.names})
        if _MARKER_PATTERN.search(probe.asText()):
            raise ValueError("placeholders may stand only in attribute values")

    def fill(self, values: dict[str, str]) -> Any:
        """
        @return: a ldaptor filter object with the placeholders replaced by
            C{values}, taken literally (wildcards and parentheses included).
        """
        return self._fill(self._parsed, values)

    def _value(self, text: str, values: dict[str, str]) -> str:
        return _MARKER_PATTERN.sub(lambda m: values[self.names[int(m.group(1))]], text)

    def _fill(self, node: Any, values: dict[str, str]) -> Any:
        if isinstance(node, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
            return type(node)([self._fill(child, values) for child in node.data])
        if isinstance(node, pureldap.LDAPFilter_not):
            return pureldap.LDAPFilter_not(self._fill(node.value, values))
        if isinstance(node, pureldap.LDAPFilter_substrings):
            return pureldap.LDAPFilter_substrings(
                type=node.type,
                substrings=[
                    type(part)(self._value(part.value, values)) for part in node.substrings
                ],
            )
        if isinstance(node, pureldap.LDAPFilter_extensibleMatch):
            return pureldap.LDAPFilter_extensibleMatch(
                matchingRule=node.matchingRule,
                type=node.type,
                matchValue=pureldap.LDAPMatchingRuleAssertion_matchValue(
                    self._value(node.matchValue.value, values)
                ),
                dnAttributes=node.dnAttributes,
            )
        if isinstance(node, pureldap.LDAPAttributeValueAssertion):
            return type(node)(
                attributeDesc=node.attributeDesc,
                assertionValue=pureldap.LDAPAssertionValue(
                    self._value(node.assertionValue.value, values)
                ),
            )
        return node


class _Client(LDAPClient):
    """
    ldaptor's client, remembering when the server last sent anything, to
    tell a slow search from a server that has stopped answering.
    """

    clock: Any = None
    last_received = 0.0
    lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.last_received = self.clock.seconds()
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.lost is not None:
            self.lost(reason)


@implementer(IHandshakeListener)
class _TLSClient(_Client):
    """
    A client that also says when its TLS handshake is done, so that
    nothing (a bind's password above all) is sent before the server's
    certificate has been verified.
    """

    handshake_done = False
    _waiting: Optional[list[Deferred[None]]] = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(None)

    def when_handshake_done(self) -> Deferred[None]:
        """
        @return: a Deferred that fires when the handshake is done, or fails
            with the reason the connection was lost first (a certificate
            that does not verify, for one).
        """
        if self.handshake_done:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if self._waiting is None:
            self._waiting = []
        self._waiting.append(waiter)
        return waiter

    def start_tls(self, options: Any) -> Deferred[None]:
        """
        Start TLS on the connection, after the server accepted STARTTLS.

        @return: L{when_handshake_done}'s Deferred.
        """
        self.transport.startTLS(options)
        return self.when_handshake_done()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.errback(reason)
        super().connectionLost(reason)


class _SASLBindRequest(pureldap.LDAPBindRequest):  # type: ignore[misc]
    """
    A SASL bind request whose credentials are always sent, empty ones too.

    ldaptor leaves empty credentials out, and slapd then answers EXTERNAL
    with saslBindInProgress (an empty challenge) instead of binding: an
    empty initial response is how a client asks to be authorized as the
    identity the connection proves (RFC 4422, appendix A).
    """

    def __init__(self, mechanism: str, credentials: bytes = b"") -> None:
        super().__init__(dn="", auth=(mechanism, credentials), sasl=True)

    def toWire(self) -> bytes:
        mechanism, credentials = self.auth
        return pureber.BERSequence(
            [
                pureber.BERInteger(self.version),
                pureber.BEROctetString(self.dn),
                pureber.BERSequence(
                    [pureber.BEROctetString(mechanism), pureber.BEROctetString(credentials)],
                    tag=pureber.CLASS_CONTEXT | 3,
                ),
            ],
            tag=self.tag,
        ).toWire()


class _SetupError(Exception):
    """
    A new connection could not be made ready: STARTTLS refused, TLS failed,
    the bind refused. The message is what the admin reads in the log.
    """


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """
    An endpoint that says when a connection attempt fails, so that the
    check can fail requests at once while the directory is unreachable
    instead of holding each one for its timeout.
    """

    def __init__(self, endpoint: Any, failed: Any) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory: Any) -> Deferred[Any]:
        attempt = self._endpoint.connect(factory)

        def failed(failure: Failure) -> Failure:
            self._failed(failure)
            return failure

        return attempt.addErrback(failed)


@implementer(ICheck, IService)
class LDAPCheck(Service):
    """
    Searches a directory for each request.
    """

    _log = Logger()

    def __init__(self, options: CheckOptions, service: Any = None) -> None:
        """
        @param service: something with C{whenConnected()} to use instead of
            the L{ClientService} built from C{server} (tests).
        """
        self.setName(options.name)
        self._clock = options.reactor
        self._classes = options.restriction_classes
        try:
            self.server = parse_server(options.string("server"))
        except ValueError as e:
            raise options.error("server", str(e)) from None
        self.bind_dn = options.string("bind_dn", None)
        self._password = options.secret("bind_password_file", None)
        if self.bind_dn is not None and self._password is None:
            raise options.error("bind_password_file", "is required with bind_dn")
        if self._password is not None and self.bind_dn is None:
            raise options.error("bind_dn", "is required with bind_password_file")
        self.starttls = options.boolean("starttls", False)
        #: Twisted's client TLS options, when TLS is spoken (ldaps:// or
        #: STARTTLS), else None.
        self.tls_options = self._tls_settings(options)
        self.sasl_mechanism = self._sasl_settings(options)
        self.base = options.string("base")
        self.scope = SCOPES[options.choice("scope", tuple(SCOPES), "sub")]
        try:
            self.filter = FilterTemplate(options.string("filter"))
        except ValueError as e:
            raise options.error("filter", str(e)) from None
        self.attribute = options.string("attribute", None)
        self.found = options.action("found", "DUNNO" if self.attribute else "OK")
        self.not_found = options.action("not_found", "DUNNO")
        self.request_timeout = options.number(
            "request_timeout", DEFAULT_REQUEST_TIMEOUT, positive=True
        )
        self.max_entries = options.integer("max_entries", DEFAULT_MAX_ENTRIES, minimum=1)
        self.cache_ttl = options.number("cache_ttl", 0.0)
        self._semaphore = DeferredSemaphore(
            options.integer("max_requests", DEFAULT_MAX_REQUESTS, minimum=1)
        )
        #: Answers by filter text, kept cache_ttl seconds.
        self.cache: ExpiringCache[str, Action] = ExpiringCache(self._clock, MAX_CACHE_ENTRIES)
        #: With a cache, the searches in flight, shared by requests that
        #: ask the same while one runs.
        self.in_flight: Coalescer[str, Action] = Coalescer(cancel_abandoned=True)
        self.guard = ControlCharacterGuard(options.name)
        if service is None:
            factory = Factory.forProtocol(self._make_protocol)
            service = ClientService(
                _WatchedEndpoint(self._endpoint(options), self._unreachable),
                factory,
                retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=RETRY_MAX_DELAY),
                clock=self._clock,
                prepareConnection=self._prepare,
            )
        self._service = service
        #: Why the directory is unreachable: set when a connection is
        #: lost or an attempt fails, cleared when one is bound.
        self._down: Optional[str] = None
        #: Whether a bound connection is up (shown by pfxpold.metrics).
        self.connected = False

    def _tls_settings(self, options: CheckOptions) -> Any:
        """
        @return: Twisted's client TLS options for the TLS settings, or
            L{None} when the connection is not to speak TLS.
        """
        server = self.server
        if not (self.starttls or server.scheme == "ldaps"):
            for key in TLS_KEYS:
                if key in options:
                    raise options.error(key, "needs starttls = true or an ldaps:// server")
            if server.endpoint.startswith("tls:"):
                try:
                    require_tls("ldap")
                except MissingExtraError as e:
                    raise options.error("server", str(e)) from None
            return None
        if self.starttls and (
            server.local or server.implicit_tls or server.endpoint.startswith("ssl:")
        ):
            raise options.error(
                "starttls", "is for ldap:// servers (ldaps:// speaks TLS from the start)"
            )
        try:
            ssl = require_tls("ldap")
        except MissingExtraError as e:
            raise options.error("starttls" if self.starttls else "server", str(e)) from None
        hostname = options.string("tls_hostname", server.host or None)
        if hostname is None:
            raise options.error(
                "tls_hostname",
                "is required with starttls and an endpoint string: or give server as ldap://host:port",
            )
        trust_root: Any = None
        ca_file = options.path("ca_file", None)
        if ca_file is not None:
            trust_root = _load_certificates(options, "ca_file", ca_file, ssl)
        client_certificate: Any = None
        cert_file = options.path("cert_file", None)
        key_file = options.path("key_file", cert_file)
        if key_file is not None and cert_file is None:
            raise options.error("cert_file", "is required with key_file")
        if cert_file is not None:
            client_certificate = _load_client_certificate(options, cert_file, key_file, ssl)
        return ssl.optionsForClientTLS(
            hostname, trustRoot=trust_root, clientCertificate=client_certificate
        )

    def _sasl_settings(self, options: CheckOptions) -> Optional[str]:
        """
        @return: the SASL mechanism to bind with, or L{None} for a simple
            (or no) bind.
        """
        mechanism = options.string("sasl_mechanism", None)
        if mechanism is None:
            return None
        mechanism = mechanism.upper()
        if mechanism not in SASL_MECHANISMS:
            raise options.error(
                "sasl_mechanism",
                f"{mechanism!r} is not supported: only EXTERNAL (ldaptor has no SASL"
                " mechanism of its own; use bind_dn for a password)",
            )
        if self.bind_dn is not None:
            raise options.error("sasl_mechanism", "replaces bind_dn: give one of them")
        if not self.server.local and "cert_file" not in options:
            raise options.error(
                "sasl_mechanism",
                "EXTERNAL needs an ldapi:// server (the directory sees this process's"
                " user) or a TLS client certificate (cert_file)",
            )
        return mechanism

    def _endpoint(self, options: CheckOptions) -> Any:
        """
        @return: the endpoint that reaches the directory.
        """
        server = self.server
        if server.scheme == "ldapi":
            return UNIXClientEndpoint(self._clock, server.path)
        if server.scheme in ("ldap", "ldaps"):
            endpoint: Any
            try:
                address = ipaddress.ip_address(server.host)
            except ValueError:
                if IReactorPluggableNameResolver.providedBy(self._clock):
                    # Every address of the name, IPv6 and IPv4, tried in turn.
                    endpoint = HostnameEndpoint(self._clock, server.host, server.port)
                else:
                    # A reactor without a resolver (a test's Clock) cannot
                    # back a HostnameEndpoint.
                    endpoint = TCP4ClientEndpoint(self._clock, server.host, server.port)
            else:
                # An address needs no name resolution.
                tcp = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
                endpoint = tcp(self._clock, server.host, server.port)
            if server.scheme == "ldaps":
                endpoint = wrapClientTLS(self.tls_options, endpoint)
            return endpoint
        try:
            return clientFromString(self._clock, server.endpoint)
        except (ValueError, TypeError, KeyError) as e:
            raise options.error("server", f"is not a client endpoint string: {e}") from None

    def _make_protocol(self) -> _Client:
        protocol = _TLSClient()
        protocol.clock = self._clock
        protocol.last_received = self._clock.seconds()
        protocol.lost = self._lost
        return protocol

    def _lost(self, reason: Failure) -> None:
        if self._down is None:
            self._log.warn(
                "check {check}: lost the directory connection ({reason}); reconnecting",
                check=self.name,
                reason=reason.getErrorMessage(),
            )
            self._down = f"connection lost: {reason.getErrorMessage()}"
        # Else keep the reason already known (a certificate refused, a
        # bind refused): it says more than the connection's end.
        self.connected = False

    def _unreachable(self, reason: Failure) -> None:
        if self._down is None or not self._down.startswith("cannot connect"):
            self._log.warn(
                "check {check}: cannot connect to the directory ({reason})",
                check=self.name,
                reason=reason.getErrorMessage(),
            )
        self._down = f"cannot connect: {reason.getErrorMessage()}"
        self.connected = False

    def _prepare(self, protocol: Any) -> Deferred[None]:
        """
        Make each new connection ready before any search goes over it: TLS
        (its handshake done and the certificate verified), then the bind.
        Bounded by request_timeout; a connection that cannot be made ready
        is closed, and the ClientService tries again after its back-off.
        """
        setup = Deferred.fromCoroutine(self._setup(protocol))
        setup.addTimeout(self.request_timeout, self._clock)
        setup.addErrback(self._setup_failed, protocol)
        return setup

    async def _setup(self, protocol: Any) -> None:
        if self.starttls:
            response = await protocol.send(pureldap.LDAPStartTLSRequest())
            if response.resultCode != ldaperrors.Success.resultCode:
                error = ldaperrors.get(response.resultCode, response.errorMessage)
                raise _SetupError(f"the directory refused STARTTLS: {error}")
            await self._handshake(protocol.start_tls(self.tls_options))
        elif self.server.implicit_tls and hasattr(protocol, "when_handshake_done"):
            await self._handshake(protocol.when_handshake_done())
        if self.sasl_mechanism is not None:
            request = _SASLBindRequest(self.sasl_mechanism)
            self._bound(await protocol.send(request), f"SASL {self.sasl_mechanism} bind")
        elif self.bind_dn is not None:
            request = pureldap.LDAPBindRequest(dn=self.bind_dn, auth=self._password)
            self._bound(await protocol.send(request), f"bind as {self.bind_dn}")
        else:
            self._bound(None, "")

    async def _handshake(self, done: Deferred[None]) -> None:
        try:
            await done
        except CancelledError:
            raise
        except Exception as e:
            raise _SetupError(f"TLS with the directory failed: {_tls_reason(e)}") from None

    def _setup_failed(self, failure: Failure, protocol: Any) -> Failure:
        if failure.check(_SetupError):
            reason = str(failure.value)
        elif failure.check(defer.TimeoutError):
            reason = f"no answer while setting up the connection within {self.request_timeout}s"
        else:
            reason = f"setting up the connection failed: {failure.getErrorMessage()}"
        if self._down != reason:
            self._log.error("check {check}: {reason}", check=self.name, reason=escape(reason))
        self._down = reason
        self.connected = False
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            abort = getattr(transport, "abortConnection", None) or transport.loseConnection
            abort()
        return failure

    def _bound(self, response: Any, what: str = "bind") -> None:
        if response is None or response.resultCode == ldaperrors.Success.resultCode:
            self._down = None
            self.connected = True
            self._log.info("check {check}: connected to the directory", check=self.name)
        else:
            error = ldaperrors.get(response.resultCode, response.errorMessage)
            # Never the password; the DN and the server's reason suffice.
            raise _SetupError(f"{what} failed: {error}")

    def startService(self) -> None:
        super().startService()
        self._service.startService()

    def stopService(self) -> Any:
        super().stopService()
        return self._service.stopService()

    def check(self, request: PolicyRequest) -> Any:
        values = {name: template_value(request, name) for name in self.filter.names}
        if any(not value for value in values.values()):
            # An empty sender (a bounce) or a missing attribute: nothing to
            # look up.
            return self.not_found
        if self.guard.refuses(values.items()):
            # slapd would stop at a NUL: alice@example.com\x00 would find
            # alice. No entry holds such a value, so: not found.
            return self.not_found
        search_filter = self.filter.fill(values)
        key = search_filter.asText()
        if self.cache_ttl <= 0:
            return self._semaphore.run(self._search, search_filter)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        # Each request waits on its own Deferred: one giving up (the
        # chain's timeout) leaves the search to the others.
        return self.in_flight.run(
            key,
            lambda: self._semaphore.run(self._search, search_filter).addCallback(
                self._remember, key
            ),
        )

    def _remember(self, action: Action, key: str) -> Action:
        self.cache.put(key, action, self.cache_ttl)
        return action

    def _search(self, search_filter: Any) -> Deferred[Action]:
        """
        One search over the shared connection, bounded by request_timeout.
        """
        started = self._clock.seconds()
        protocol_holder: list[Any] = []
        entries: list[Any] = []

        def cancel(deferred: Deferred[Action]) -> None:
            # Cancelled by the chain's timeout or our own: the search's
            # answer, if it ever comes, is ignored by got_response.
            protocol = protocol_holder[0] if protocol_holder else None
            silent = (
                protocol is not None
                and getattr(protocol, "last_received", started) < started
                and protocol.connected
            )
            if silent and protocol is not None:
                # Nothing came back since before this search was sent: the
                # server has stopped answering; reconnect rather than queue
                # more searches on a dead connection.
                self._log.warn(
                    "check {check}: the directory sent nothing for {seconds}s; reconnecting",
                    check=self.name,
                    seconds=round(self._clock.seconds() - started, 3),
                )
                protocol.transport.abortConnection()

        result: Deferred[Action] = Deferred(cancel)

        def got_response(response: Any) -> bool:
            if result.called:
                return isinstance(response, pureldap.LDAPSearchResultDone)
            if isinstance(response, pureldap.LDAPSearchResultEntry):
                entries.append(response)
                return False
            if isinstance(response, pureldap.LDAPSearchResultReference):
                return False
            if isinstance(response, pureldap.LDAPSearchResultDone):
                code = response.resultCode
                # noSuchObject (a wrong base) is an error, not "not found":
                # with not_found = REJECT it would reject all mail.
                if code in (
                    ldaperrors.Success.resultCode,
                    ldaperrors.LDAPSizeLimitExceeded.resultCode,
                ):
                    try:
                        result.callback(self._decide(entries))
                    except Exception:
                        result.errback(Failure())
                else:
                    result.errback(
                        Failure(LDAPCheckError(str(ldaperrors.get(code, response.errorMessage))))
                    )
                return True
            result.errback(Failure(LDAPCheckError(f"unexpected answer {response!r}")))
            return True

        def send(protocol: Any) -> None:
            if result.called:
                return
            protocol_holder.append(protocol)
            request = pureldap.LDAPSearchRequest(
                baseObject=self.base,
                scope=self.scope,
                derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
                sizeLimit=self.max_entries,
                timeLimit=max(1, int(self.request_timeout)),
                typesOnly=False,
                filter=search_filter,
                attributes=[self.attribute] if self.attribute else ["1.1"],
            )
            failed = protocol.send_multiResponse(request, got_response)
            # ldaptor fails this Deferred when the connection is lost.
            failed.addErrback(lambda failure: None if result.called else result.errback(failure))

        def not_connected(failure: Failure) -> None:
            if not result.called:
                result.errback(failure)

        if self._down is not None:
            # Fail at once rather than hold the request while the
            # ClientService waits out its back-off.
            return fail(LDAPCheckError(f"directory unavailable ({self._down})"))
        connected = self._service.whenConnected(failAfterFailures=1)
        connected.addCallbacks(send, not_connected)
        connected.addErrback(not_connected)
        result.addTimeout(self.request_timeout, self._clock)
        return result

    def _decide(self, entries: list[Any]) -> Action:
        if not self.attribute:
            return self.found if entries else self.not_found
        wanted = self.attribute.lower()
        values: set[str] = set()
        for entry in entries:
            for name, entry_values in entry.attributes:
                name = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
                if name.lower() != wanted:
                    continue
                for value in entry_values:
                    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                    values.add(text.strip())
        values.discard("")
        if not values:
            return self.found if entries else self.not_found
        if len(values) > 1:
            # LDAP values are unordered: picking one would be arbitrary.
            raise LDAPCheckError(
                f"{len(values)} different values of {self.attribute}: {sorted(values)[:5]!r}"
            )
        value = values.pop()
        if "\n" in value or "\r" in value or "\0" in value:
            raise LDAPCheckError(f"{self.attribute} holds a line break")
        try:
            return Action.parse(value, self._classes)
        except ActionError as e:
            raise LDAPCheckError(f"{self.attribute} is not an action: {e}") from None


def _tls_reason(error: BaseException) -> str:
    """
    What an admin needs to read of a failed TLS handshake: OpenSSL's
    reason (C{certificate verify failed}), or that the certificate does not
    name the host.
    """
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover: TLS needs it (require_tls)
        VerificationError = ()  # type: ignore[assignment,misc]
    if isinstance(error, VerificationError):
        return f"the certificate is not valid for the host name ({error})"
    errors = getattr(error, "args", ())
    if errors and isinstance(errors[0], list):
        # pyOpenSSL: [(library, function, reason), ...]
        # OpenSSL's last reason sums up: "certificate verify failed".
        reasons = [str(entry[-1]) for entry in errors[0] if isinstance(entry, tuple) and entry]
        if reasons:
            return reasons[-1]
    return str(error) or type(error).__name__


def _pem_blocks(data: bytes, kind: bytes) -> list[bytes]:
    pattern = re.compile(
        rb"-----BEGIN " + kind + rb"-----.+?-----END " + kind + rb"-----", re.DOTALL
    )
    return pattern.findall(data)


def _load_certificates(options: CheckOptions, key: str, path: str, ssl: Any) -> Any:
    """
    @return: a trust root holding every certificate of the PEM file C{path}.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise options.error(key, f"cannot read {path}: {e.strerror}") from None
    blocks = _pem_blocks(data, b"CERTIFICATE")
    if not blocks:
        raise options.error(key, f"{path} holds no PEM certificate")
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise options.error(key, f"{path}: not a valid PEM certificate: {e}") from None
    return ssl.trustRootFromCertificates(certificates)


def _load_client_certificate(options: CheckOptions, cert_file: str, key_file: str, ssl: Any) -> Any:
    """
    @return: the client's certificate with its private key, from one PEM
        file or two.
    """
    texts = []
    for key, path in (("cert_file", cert_file), ("key_file", key_file)):
        try:
            with open(path, "rb") as f:
                texts.append(f.read())
        except OSError as e:
            raise options.error(key, f"cannot read {path}: {e.strerror}") from None
    certificate = _pem_blocks(texts[0], b"CERTIFICATE")
    private_key = re.search(
        rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", texts[1], re.DOTALL
    )
    if not certificate:
        raise options.error("cert_file", f"{cert_file} holds no PEM certificate")
    if private_key is None:
        raise options.error("key_file", f"{key_file} holds no PEM private key (unencrypted)")
    try:
        return ssl.PrivateCertificate.loadPEM(certificate[0] + b"\n" + private_key.group(0))
    except Exception as e:
        raise options.error(
            "cert_file", f"{cert_file} and {key_file} do not make a client certificate: {e}"
        ) from None
