"""
The C{spf} check: the client's HELO name and MAIL FROM domain checked
against their SPF records (RFC 7208), as pypolicyd-spf (Debian's
postfix-policyd-spf-python) does, with its defaults, but without blocking:
the DNS is asked through twisted.names, the evaluation is pyspf's, fed the
answers (see L{pfxpold.spf}).

Flow, as pypolicyd-spf's: clients that authenticated and clients in
C{skip_addresses} are not checked. The HELO identity is checked first
(C{helo_reject}); a result the policy rejects or defers answers at once.
Then the MAIL FROM identity (C{mail_from_reject}), or for the null sender
the HELO result stands. A result that is neither rejected nor deferred
prepends a C{Received-SPF} header (C{header = true}), once per message:
the other recipients of the same message (same C{instance}) get C{DUNNO}.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any, Optional

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, DeferredSemaphore, TimeoutError, succeed
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.action import DUNNO, Action, ActionError, clean_text
from pfxpold.cache import Coalescer, ExpiringCache
from pfxpold.config import CheckOptions
from pfxpold.escape import escape, has_control
from pfxpold.interfaces import ICheck
from pfxpold.request import PolicyRequest
from pfxpold.resolver import ResolverSource, configured_servers
from pfxpold.spf.evaluate import (
    Answer,
    Outcome,
    Question,
    TemporaryFailure,
    evaluate,
    pairs_from_records,
)
from pfxpold.spf.header import received_spf

#: pypolicyd-spf's HELO_reject and Mail_From_reject values (any case):
#: which results are rejected. C{False} checks and only prepends the
#: header; C{No_Check} does not check; C{Null} (HELO only) rejects a HELO
#: fail only for the null sender.
POLICIES: dict[str, frozenset[str]] = {
    "spf_not_pass": frozenset({"fail", "softfail", "neutral"}),
    "softfail": frozenset({"fail", "softfail"}),
    "fail": frozenset({"fail"}),
    "null": frozenset({"fail"}),
    "false": frozenset(),
    "no_check": frozenset(),
}
POLICY_NAMES = ("SPF_Not_Pass", "Softfail", "Fail", "Null", "False", "No_Check")

DEFAULT_REJECT = "550 5.7.23 Message rejected due to: {reason}. Please see {url}"
DEFAULT_PERMERROR = "550 5.7.24 Message rejected due to: {reason}. Please see {url}"
DEFAULT_DEFER = "DEFER_IF_PERMIT 4.7.24 Message deferred due to: {reason}. Please see {url}"
DEFAULT_URL = (
    "https://www.open-spf.org/Why?s={scope};id={identity};ip={client_address};r={receiver}"
)
DEFAULT_SKIP = ["127.0.0.0/8", "::ffff:127.0.0.0/104", "::1"]
DEFAULT_QUERY_TIMEOUT = 5.0
#: pypolicyd-spf's Lookup_Time: the whole evaluation of one identity.
DEFAULT_LOOKUP_TIME = 20.0
DEFAULT_MAX_QUERIES = 100
DEFAULT_NEGATIVE_TTL = 60
DEFAULT_MAX_TTL = 3600
MAX_CACHE_ENTRIES = 100_000
#: Messages whose outcome is remembered (so a message with many
#: recipients gets one header), and for how long.
MAX_INSTANCES = 10_000
INSTANCE_SECONDS = 3600.0
#: The longest name the DNS carries.
MAX_NAME_LENGTH = 253

_LOOKUPS = {
    "A": "lookupAddress",
    "AAAA": "lookupIPV6Address",
    "MX": "lookupMailExchange",
    "PTR": "lookupPointer",
    "TXT": "lookupText",
    "SPF": "lookupSenderPolicy",
    "CNAME": "lookupCanonicalName",
}
_TYPE_CODES = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "PTR": dns.PTR,
    "TXT": dns.TXT,
    "SPF": dns.SPF,
    "CNAME": dns.CNAME,
}
_TEMPLATE_FIELDS = (
    "reason",
    "url",
    "result",
    "scope",
    "identity",
    "client_address",
    "helo_name",
    "sender",
    "receiver",
)


def query_name(name: str) -> Optional[str]:
    """
    @return: C{name} as it can be asked: printable ASCII (a label may hold
        any octet, and the RFC 7208 test suite asks for names with spaces
        and C{%}), or an internationalised name in its IDNA form; labels of
        1 to 63 characters, 253 in all. L{None} when it cannot be asked.
    """
    if not name or has_control(name):
        return None
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(name) > MAX_NAME_LENGTH:
        return None
    if not all(0 < len(label) < 64 for label in name.split(".")):
        return None
    return name


@dataclass
class Verdict:
    """
    The outcome of one identity: its result, what the policy does with it
    (C{"reject"}, C{"defer"}, C{"prepend"} or C{"dunno"}), and the header
    that describes it.
    """

    scope: str
    outcome: Outcome
    decision: str
    header: str


@implementer(ICheck, IService)
class SPFCheck(Service):
    """
    Checks the HELO and MAIL FROM identities against SPF, and answers by
    the configured policy.
    """

    _log = Logger()

    def __init__(self, options: CheckOptions, resolver: Any = None) -> None:
        """
        @param resolver: an L{twisted.internet.interfaces.IResolver} to use
            instead of the one built from C{resolvers} (tests).
        """
        self.setName(options.name)
        self._clock = options.reactor
        self._resolver_source = ResolverSource(
            options.reactor,
            configured_servers(options),
            options.existing_path("resolv_conf", "/etc/resolv.conf"),
            f"check {options.name}",
            resolver,
        )
        self.helo_policy = self._policy(options, "helo_reject", POLICY_NAMES)
        self.mail_from_policy = self._policy(
            options, "mail_from_reject", tuple(name for name in POLICY_NAMES if name != "Null")
        )
        self.permerror_reject = options.boolean("permerror_reject", False)
        self.temperror_defer = options.boolean("temperror_defer", False)
        self.header = options.boolean("header", True)
        receiver = options.string("receiver", "") or socket.gethostname()
        if query_name(receiver.rstrip(".")) is None or " " in receiver:
            raise options.error("receiver", f"{receiver!r} is not a host name")
        self.receiver = receiver.rstrip(".")
        self.reason_url = options.string("reason_url", DEFAULT_URL)
        self.reject_template = self._template(options, "reject_action", DEFAULT_REJECT)
        self.permerror_template = self._template(options, "permerror_action", DEFAULT_PERMERROR)
        self.defer_template = self._template(options, "defer_action", DEFAULT_DEFER)
        self.skip_authenticated = options.boolean("skip_authenticated", True)
        self.skip_networks = []
        for value in options.strings("skip_addresses", DEFAULT_SKIP):
            try:
                network = ipaddress.ip_network(value.strip(), strict=False)
            except ValueError:
                raise options.error(
                    "skip_addresses", f"{value!r} is not an address or network"
                ) from None
            self.skip_networks.append(network)
            if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
                mapped = network.network_address.ipv4_mapped
                if mapped is not None:
                    # request.client_ip folds ::ffff:127.0.0.1 to 127.0.0.1.
                    self.skip_networks.append(
                        ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
                    )
        self.query_timeout = options.number("query_timeout", DEFAULT_QUERY_TIMEOUT, positive=True)
        self.lookup_time = options.number("lookup_time", DEFAULT_LOOKUP_TIME, positive=True)
        self.negative_ttl = options.integer("negative_ttl", DEFAULT_NEGATIVE_TTL, minimum=0)
        self.max_ttl = options.integer("max_ttl", DEFAULT_MAX_TTL, minimum=0)
        self._semaphore = DeferredSemaphore(
            options.integer("max_queries", DEFAULT_MAX_QUERIES, minimum=1)
        )
        #: DNS answers by question, each kept for its TTL.
        self.cache: ExpiringCache[Question, Answer] = ExpiringCache(self._clock, MAX_CACHE_ENTRIES)
        self._in_flight: Coalescer[Question, Answer] = Coalescer(cancel_abandoned=False)
        #: What each recent message got: its action, or DUNNO once its
        #: header was prepended.
        self._instances: ExpiringCache[str, Action] = ExpiringCache(self._clock, MAX_INSTANCES)
        #: DNS questions sent (for tests and the log).
        self.queries_sent = 0

    @staticmethod
    def _policy(options: CheckOptions, key: str, names: tuple[str, ...]) -> str:
        value = options.string(key, "Fail")
        if value.lower() not in {name.lower() for name in names}:
            raise options.error(key, f"must be one of {', '.join(names)}, not {value!r}")
        return value.lower()

    def _template(self, options: CheckOptions, key: str, default: str) -> str:
        template = options.string(key, default)
        sample = self._fill(template, {field: "x.example" for field in _TEMPLATE_FIELDS})
        try:
            Action.parse(sample, options.restriction_classes)
        except ActionError as e:
            raise options.error(key, str(e)) from None
        return template

    @staticmethod
    def _fill(template: str, values: dict[str, str]) -> str:
        # str.replace, not str.format: a sender or an exp= text must not
        # reach into the template's fields.
        for field in _TEMPLATE_FIELDS:
            template = template.replace("{" + field + "}", values.get(field, ""))
        return template

    # IService

    def startService(self) -> None:
        self._resolver_source.start()
        super().startService()

    def stopService(self) -> Any:
        self._resolver_source.stop()
        return super().stopService()

    # ICheck

    def check(self, request: PolicyRequest) -> Any:
        if self.skip_authenticated and request.sasl_username:
            return DUNNO
        address = request.client_ip
        if address is None:
            if request.client_address:
                self._log.info(
                    "check {check}: client address {address} is not an IP address; not checked",
                    check=self.name,
                    address=escape(request.client_address),
                )
            return DUNNO
        if any(address in network for network in self.skip_networks):
            return DUNNO
        instance = request.instance
        if instance:
            earlier = self._instances.get(instance)
            if earlier is not None:
                return earlier
        if self._resolver_source.resolver is None:
            raise RuntimeError("the check is not started")
        return Deferred.fromCoroutine(self._decide(request, str(address)))

    async def _decide(self, request: PolicyRequest, client_address: str) -> Action:
        action = await self._verdict(request, client_address)
        if request.instance:
            # Further recipients of the message: the same refusal, or
            # nothing once the header is there.
            remembered = DUNNO if action.verb == "PREPEND" else action
            self._instances.put(request.instance, remembered, INSTANCE_SECONDS)
        return action

    async def _verdict(self, request: PolicyRequest, client_address: str) -> Action:
        sender = request.sender
        helo = request.helo_name
        if not sender and not helo:
            return DUNNO
        if not helo:
            # pypolicyd-spf: the sender's domain stands in for a missing HELO.
            helo = sender.rpartition("@")[2] if "@" in sender else "unknown"
        helo_verdict: Optional[Verdict] = None
        if self.helo_policy != "no_check":
            helo_verdict = await self._check_identity(
                "helo", self.helo_policy, client_address, helo, helo, sender
            )
            if self.helo_policy == "null" and sender:
                helo_verdict.decision = "dunno"
            if helo_verdict.decision in ("reject", "defer"):
                return self._refusal(helo_verdict, client_address, helo, sender, helo)
        if not sender or self.mail_from_policy == "no_check":
            if helo_verdict is None:
                return DUNNO
            return self._prepend(helo_verdict, request)
        mail_from_verdict = await self._check_identity(
            "mailfrom", self.mail_from_policy, client_address, sender, helo, sender
        )
        if mail_from_verdict.decision in ("reject", "defer"):
            return self._refusal(mail_from_verdict, client_address, helo, sender, sender)
        if (
            mail_from_verdict.outcome.result == "none"
            and helo_verdict is not None
            and helo_verdict.outcome.result != "none"
        ):
            return self._prepend(helo_verdict, request)
        return self._prepend(mail_from_verdict, request)

    async def _check_identity(
        self, scope: str, policy: str, client_address: str, identity: str, helo: str, sender: str
    ) -> Verdict:
        envelope_from = sender if scope == "mailfrom" else f"postmaster@{helo}"
        domain = identity.rpartition("@")[2].rstrip(".")
        if has_control(identity) or len(identity) > 2 * MAX_NAME_LENGTH:
            # Postfix never sends these; nothing is asked for them.
            outcome = Outcome("none", "", None, 0)
        elif "." not in domain or domain.startswith("["):
            # RFC 7208 section 4.3: not a multi-label domain name
            # (localhost, an address literal): "none", without asking.
            outcome = Outcome("none", "", None, 0)
        else:
            start = self._clock.seconds()
            outcome = await evaluate(
                client_address,
                sender if scope == "mailfrom" else "",
                helo,
                self.receiver,
                self._ask,
                self._clock.seconds,
                start + self.lookup_time,
                self._cached,
            )
        result = outcome.result
        if result in POLICIES[policy]:
            decision = "reject"
        elif policy == "false":
            decision = "prepend"
        elif result == "permerror" and self.permerror_reject:
            decision = "reject"
        elif result == "temperror" and self.temperror_defer:
            decision = "defer"
        else:
            decision = "prepend"
        self._log.info(
            "check {check}: SPF {scope} {result} for {identity} from {client}"
            " ({explanation}); {decision}",
            check=self.name,
            scope=scope,
            result=result,
            identity=escape(identity),
            client=client_address,
            explanation=escape(outcome.explanation),
            decision=decision,
        )
        header = received_spf(
            result,
            scope,
            client_address,
            helo,
            envelope_from or f"postmaster@{helo}",
            self.receiver,
            outcome.mechanism,
        )
        return Verdict(scope, outcome, decision, header)

    def _refusal(
        self, verdict: Verdict, client_address: str, helo: str, sender: str, identity: str
    ) -> Action:
        result = verdict.outcome.result
        if verdict.decision == "defer":
            template = self.defer_template
        elif result == "permerror":
            template = self.permerror_template
        else:
            template = self.reject_template
        reason = clean_text(verdict.outcome.explanation, 120) or f"SPF {result}"
        values = {
            "scope": "mfrom" if verdict.scope == "mailfrom" else "helo",
            "identity": urllib.parse.quote(identity, safe="@.-_+"),
            "client_address": client_address,
            "receiver": self.receiver,
        }
        values["url"] = self._fill(self.reason_url, values)
        values.update(
            reason=reason,
            result=result,
            identity=clean_text(identity, 120),
            helo_name=clean_text(helo, 120),
            sender=clean_text(sender, 120),
        )
        return Action.parse(self._fill(template, values))

    def _prepend(self, verdict: Verdict, request: PolicyRequest) -> Action:
        if not self.header or request.protocol_state == "END-OF-MESSAGE":
            # Postfix ignores PREPEND there (with a warning).
            return DUNNO
        return Action("PREPEND", verdict.header)

    # DNS

    def _cached(self, key: Question) -> Optional[Answer]:
        """
        The answer to a question without asking: from the cache, or void
        for a name that cannot be asked; else L{None}.
        """
        if query_name(key[0]) is None or key[1] not in _LOOKUPS:
            return ()
        return self.cache.get(key)

    def _ask(self, key: Question) -> Deferred[Answer]:
        """
        One question, from the cache while its TTL lasts, sharing a query
        in flight; never fails.
        """
        name, record_type = key
        asked = query_name(name)
        if asked is None or record_type not in _LOOKUPS:
            # pyspf skips most bad names itself; the others are void.
            return succeed(())
        cached = self.cache.get(key)
        if cached is not None:
            return succeed(cached)
        return self._in_flight.run(key, lambda: self._semaphore.run(self._query, asked, key))

    def _query(self, name: str, key: Question) -> Deferred[Answer]:
        record_type = key[1]
        self.queries_sent += 1
        resolver = self._resolver_source.resolver
        lookup = getattr(resolver, _LOOKUPS[record_type])
        result: Deferred[Any] = lookup(name, timeout=(self.query_timeout,))
        return result.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(key,),
            errbackArgs=(key,),
        )

    def _answered(self, result: tuple[list[Any], list[Any], list[Any]], key: Question) -> Answer:
        record_type = key[1]
        records = result[0]
        answer = pairs_from_records(records, record_type)
        wanted = _TYPE_CODES[record_type]
        ttls = [record.ttl for record in records if record.type in (wanted, dns.CNAME)]
        ttl = min(ttls) if ttls else self._negative_ttl(result[1])
        self.cache.put(key, answer, min(self.max_ttl, ttl))
        return answer

    def _failed(self, failure: Failure, key: Question) -> Answer:
        name, record_type = key
        if failure.check(DNSNameError):
            message = failure.value.args[0] if failure.value.args else None
            answer: Answer = ()
            self.cache.put(key, answer, self._negative_ttl(getattr(message, "authority", [])))
            return answer
        reason = "timeout" if failure.check(TimeoutError) else escape(failure.getErrorMessage())
        self._log.info(
            "check {check}: {type} {name} failed ({reason})",
            check=self.name,
            type=record_type,
            name=escape(name),
            reason=reason,
        )
        return TemporaryFailure(reason)

    def _negative_ttl(self, authority: list[Any]) -> int:
        for record in authority:
            if record.type == dns.SOA:
                return min(self.max_ttl, record.ttl, record.payload.minimum)
        return min(self.max_ttl, self.negative_ttl)
