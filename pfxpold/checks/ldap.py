"""
The C{ldap} check: searches a directory (OpenLDAP, Active Directory, ...)
with a filter filled from the request, over one persistent ldaptor
connection, and answers by whether an entry was found or by the value of
one of its attributes.

The filter template is parsed once, at start-up, into ldaptor filter
objects; request values are put into those objects' assertion values, never
into filter text, so no sender can widen the search (C{*)(uid=*} is looked
up as those eight characters).
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Optional

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, DeferredSemaphore, fail
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
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
from ldaptor.protocols import pureldap  # noqa: E402
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

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MARKER = "pfxpoldvalue{}x"
_MARKER_PATTERN = re.compile(r"pfxpoldvalue(\d+)x")


class LDAPCheckError(Exception):
    """
    The directory's answer cannot be used.
    """


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
        server = options.string("server")
        self.bind_dn = options.string("bind_dn", None)
        self._password = options.secret("bind_password_file", None)
        if self.bind_dn is not None and self._password is None:
            raise options.error("bind_password_file", "is required with bind_dn")
        if self._password is not None and self.bind_dn is None:
            raise options.error("bind_dn", "is required with bind_password_file")
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
            if server.split(":", 1)[0] in ("tls", "ssl"):
                try:
                    require_tls("ldap")
                except MissingExtraError as e:
                    raise options.error("server", str(e)) from None
            try:
                endpoint = clientFromString(self._clock, server)
            except (ValueError, TypeError, KeyError) as e:
                raise options.error("server", f"is not a client endpoint string: {e}") from None
            factory = Factory.forProtocol(self._make_protocol)
            service = ClientService(
                _WatchedEndpoint(endpoint, self._unreachable),
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

    def _make_protocol(self) -> _Client:
        protocol = _Client()
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

    def _prepare(self, protocol: LDAPClient) -> Optional[Deferred[Any]]:
        """
        Bind each new connection before any search goes over it.
        """
        if self.bind_dn is None:
            self._bound(None)
            return None
        request = pureldap.LDAPBindRequest(dn=self.bind_dn, auth=self._password)
        return protocol.send(request).addCallback(self._bound)

    def _bound(self, response: Any) -> None:
        if response is None or response.resultCode == ldaperrors.Success.resultCode:
            self._down = None
            self.connected = True
            self._log.info("check {check}: connected to the directory", check=self.name)
        else:
            error = ldaperrors.get(response.resultCode, response.errorMessage)
            # Never the password; the DN and the server's reason suffice.
            self._log.error(
                "check {check}: bind as {dn} failed: {reason}",
                check=self.name,
                dn=self.bind_dn,
                reason=escape(str(error)),
            )
            raise error

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
