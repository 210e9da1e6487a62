"""
The C{dnsbl} check: DNS block lists (DNSBL) of the client address, RHSBL
lists of the sender domain, HELO name or client name, and DNS whitelists
(DNSWL), asked in parallel with twisted.names and weighed into a score.

Query names are built only from validated input: the client address as
parsed by L{ipaddress}, domains that are valid host names. Anything else
is not looked up at all, so a request can never make pfxpold ask the DNS
an arbitrary question.
"""

from __future__ import annotations

import functools
import ipaddress
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.application.service import IService, Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    TimeoutError,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.action import DUNNO, Action, ActionError, clean_text
from pfxpold.cache import Coalescer, ExpiringCache
from pfxpold.config import CheckOptions
from pfxpold.escape import escape
from pfxpold.interfaces import ICheck
from pfxpold.request import PolicyRequest, parse_ip
from pfxpold.resolver import (  # noqa: F401 (parse_server: dnsbl's name for it)
    DEFAULT_NAMESERVERS,
    RESOLV_CONF_INTERVAL,
    nameservers,
    parse_server,
)

#: What a list looks up.
SOURCES = ("client_address", "sender_domain", "helo_name", "client_name")

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
#: Two labels or more, in one match: a loop over the labels cost more.
_HOST_NAME = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}")

#: The default codes that count: anything in 127.0.0.0/8 except
#: 127.255.255.0/24, which Spamhaus and others use to say "query refused"
#: (for example through a public resolver), never "listed".
_DEFAULT_CODES = (
    (int(ipaddress.IPv4Address("127.0.0.0")), int(ipaddress.IPv4Address("127.255.254.255"))),
)

DEFAULT_ACTION = "REJECT {reason}"
DEFAULT_TIMEOUT = 2.0
DEFAULT_MAX_QUERIES = 100
DEFAULT_FAILURE_LIMIT = 5
DEFAULT_SKIP_FOR = 60.0
DEFAULT_NEGATIVE_TTL = 60
DEFAULT_MAX_TTL = 3600
MAX_CACHE_ENTRIES = 100_000
#: Client addresses whose reversed form is remembered.
MAX_REMEMBERED_ADDRESSES = 10_000


def valid_host_name(name: str) -> Optional[str]:
    """
    @return: C{name} lowercased and without a trailing dot when it is a
        valid host name (labels of 1-63 letters, digits and hyphens, not
        starting or ending with a hyphen, 253 characters at most, at least
        two labels), else L{None}.
    """
    if not name or not name.isascii():
        return None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if len(name) > 253 or _HOST_NAME.fullmatch(name) is None:
        return None
    return name


def reversed_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """
    The DNSBL form of an address: reversed octets for IPv4
    (C{192.0.2.1} -> C{1.2.0.192}), reversed nibbles for IPv6.
    """
    if address.version == 4:
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


@functools.lru_cache(maxsize=MAX_REMEMBERED_ADDRESSES)
def dnsbl_form(client_address: str) -> Optional[str]:
    """
    The DNSBL form of a client address as Postfix sends it (IPv4-mapped
    folded), or L{None} when it is not an IP address. A scoped IPv6
    address (C{fe80::1%eth0}) parses, but has no DNSBL form: the scope is
    not part of the address.

    A pure function of its argument, so the addresses seen lately are
    remembered (a relay sees the same clients again and again) by
    L{functools.lru_cache}: no clock, no expiry, the least recently used
    going first.
    """
    address = parse_ip(client_address) if "%" not in client_address else None
    return None if address is None else reversed_ip(address)


def _parse_codes(options: CheckOptions, key: str, values: list[str]) -> tuple[tuple[int, int], ...]:
    ranges = []
    for value in values:
        low, _, high = value.partition("-")
        try:
            first = int(ipaddress.IPv4Address(low.strip()))
            last = int(ipaddress.IPv4Address(high.strip())) if high else first
        except ValueError:
            raise options.error(
                key, f"{value!r} is neither an IPv4 address nor a range like 127.0.0.2-127.0.0.11"
            ) from None
        if last < first:
            raise options.error(key, f"{value!r} is an empty range")
        ranges.append((first, last))
    return tuple(ranges)


@dataclass
class DNSList:
    """
    One configured list.

    @ivar zone: the list's DNS zone, e.g. C{zen.spamhaus.org}.
    @ivar source: what is looked up, one of L{SOURCES}.
    @ivar codes: inclusive ranges of answer addresses (as integers) that
        count as listed.
    @ivar bitmask: when not zero, an answer counts when it is in
        127.0.0.0/8 and its address ANDed with this is not zero (replaces
        C{codes}).
    @ivar weight: added to the score when listed; negative for whitelists.
    @ivar fetch_reason: whether to ask for the TXT record of a listed name.
    """

    zone: str
    source: str
    codes: tuple[tuple[int, int], ...]
    bitmask: int
    weight: float
    fetch_reason: bool
    failures: int = 0
    skip_until: float = 0.0

    def counts(self, address: str) -> bool:
        try:
            value = int(ipaddress.IPv4Address(address))
        except ValueError:
            return False
        if self.bitmask:
            return value >> 24 == 127 and bool(value & self.bitmask)
        return any(first <= value <= last for first, last in self.codes)


@dataclass
class Answer:
    """
    What the DNS said about one name: the addresses (empty when not
    listed) and for how long that holds.
    """

    addresses: tuple[str, ...]
    ttl: int
    reasons: list[str] = field(default_factory=list)


class ListUnavailable(Exception):
    """
    Every list that should have been asked failed or is being skipped.
    """


@implementer(ICheck, IService)
class DNSBLCheck(Service):
    """
    Looks the request up in DNS lists and answers by the summed weights of
    the lists that list it.
    """

    _log = Logger()

    def __init__(self, options: CheckOptions, resolver: Any = None) -> None:
        """
        @param resolver: an L{twisted.internet.interfaces.IResolver} to use
            instead of the one built from C{resolvers} at start-up (tests).
        """
        self.setName(options.name)
        self._clock = options.reactor
        self._resolver = resolver
        servers = []
        for value in options.strings("resolvers", []):
            server = parse_server(value)
            if server is None:
                raise options.error(
                    "resolvers",
                    f"{value!r} is not an IP address with an optional port"
                    " (192.0.2.53, 192.0.2.53:5353, [2001:db8::53]:53)",
                )
            servers.append(server)
        self._servers = servers
        # A resolv_conf given but missing would leave Twisted asking 127.0.0.1.
        self._resolv_conf = options.existing_path("resolv_conf", "/etc/resolv.conf")
        self.threshold = options.number("threshold", 1.0)
        self.listed_action = options.string("action", DEFAULT_ACTION)
        try:
            Action.parse(
                self._fill(self.listed_action, ["x.example"], ["reason"]),
                options.restriction_classes,
            )
        except ActionError as e:
            raise options.error("action", str(e)) from None
        self.whitelisted_action = options.action("whitelist_action", "DUNNO")
        self.query_timeout = options.number("query_timeout", DEFAULT_TIMEOUT, positive=True)
        self.failure_limit = options.integer("failure_limit", DEFAULT_FAILURE_LIMIT, minimum=1)
        self.skip_for = options.number("skip_for", DEFAULT_SKIP_FOR, positive=True)
        self.negative_ttl = options.integer("negative_ttl", DEFAULT_NEGATIVE_TTL, minimum=0)
        self.max_ttl = options.integer("max_ttl", DEFAULT_MAX_TTL, minimum=0)
        self._semaphore = DeferredSemaphore(
            options.integer("max_queries", DEFAULT_MAX_QUERIES, minimum=1)
        )
        raw_lists = options.raw("lists", [])
        if not isinstance(raw_lists, list):
            raw_lists = []
        self.lists = [
            self._parse_list(options, raw, position) for position, raw in enumerate(raw_lists, 1)
        ]
        if not self.lists:
            raise options.error("lists", "must be a non-empty list of [[check.lists]] tables")
        # Each source once, in the lists' order: what _subjects computes.
        self._sources = tuple(dict.fromkeys(dns_list.source for dns_list in self.lists))
        #: Client addresses not looked up because they are not IP
        #: addresses (for the metrics).
        self.unusable_addresses = 0
        #: Answers by (name, record type), each kept for its DNS TTL.
        self.cache: ExpiringCache[tuple[str, int], Answer] = ExpiringCache(
            self._clock, MAX_CACHE_ENTRIES
        )
        #: The check's answers by the request values the lists look up
        #: (L{_decision_key}), each kept while every answer it was weighed
        #: from lasts: a client seen again costs one lookup, not one per
        #: list and the weighing.
        self.decisions: ExpiringCache[Any, Action] = ExpiringCache(self._clock, MAX_CACHE_ENTRIES)
        # The value of the one source, or a tuple of the sources' values.
        self._decision_key = operator.attrgetter(*self._sources)
        # Each request waits on its own Deferred: cancelling one (the
        # chain's timeout) must not cancel a query others share, and
        # twisted.names queries end by their own timeout anyway, with an
        # answer worth caching.
        self._in_flight: Coalescer[tuple[str, int], Answer] = Coalescer(cancel_abandoned=False)
        #: Re-reads resolv.conf while the check runs (without resolvers).
        self._resolv_conf_reader: Optional[LoopingCall] = None
        self._nameservers: Optional[list[tuple[str, int]]] = None

    @staticmethod
    def _parse_list(options: CheckOptions, raw: Any, position: int) -> DNSList:
        key = f"lists[{position}]"
        if not isinstance(raw, dict):
            raise options.error(key, "must be a table")
        known = {"zone", "lookup", "codes", "bitmask", "weight", "reason"}
        for name in raw:
            if name not in known:
                raise options.error(key, f"{name!r} is not a setting of a list")
        zone = valid_host_name(raw.get("zone", "")) if isinstance(raw.get("zone"), str) else None
        if zone is None:
            raise options.error(key, "needs a zone that is a valid domain name")
        source = raw.get("lookup", "client_address")
        if source not in SOURCES:
            raise options.error(key, f"lookup must be one of {', '.join(SOURCES)}, not {source!r}")
        codes_value = raw.get("codes", [])
        if isinstance(codes_value, str):
            codes_value = [codes_value]
        if not isinstance(codes_value, list) or not all(isinstance(v, str) for v in codes_value):
            raise options.error(key, "codes must be a list of addresses or ranges")
        codes = _parse_codes(options, key, codes_value) if codes_value else _DEFAULT_CODES
        bitmask = raw.get("bitmask", 0)
        if isinstance(bitmask, bool) or not isinstance(bitmask, int) or not 0 <= bitmask < 2**24:
            raise options.error(key, "bitmask must be a whole number below 2**24")
        if bitmask and codes_value:
            raise options.error(key, "give codes or bitmask, not both")
        weight = raw.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise options.error(key, "weight must be a number")
        fetch_reason = raw.get("reason", True)
        if not isinstance(fetch_reason, bool):
            raise options.error(key, "reason must be true or false")
        return DNSList(zone, source, codes, bitmask, float(weight), fetch_reason)

    # IService

    def startService(self) -> None:
        # Twisted's resolver can re-read a resolv.conf itself, but with a
        # timer that only its private attribute can stop: we read the file
        # on a timer of our own, and give the resolver the addresses.
        if self._resolver is None:
            if self._servers:
                self._resolver = client.Resolver(servers=self._servers, reactor=self._clock)
            else:
                reader = self._resolv_conf_reader = LoopingCall(self._read_resolv_conf)
                reader.clock = self._clock
                reader.start(RESOLV_CONF_INTERVAL, now=True)
        super().startService()

    def stopService(self) -> None:
        reader, self._resolv_conf_reader = self._resolv_conf_reader, None
        if reader is not None and reader.running:
            reader.stop()
        return super().stopService()

    def _read_resolv_conf(self) -> None:
        """
        Read resolv.conf, and use a resolver for its nameservers when they
        are new.
        """
        try:
            with open(self._resolv_conf, encoding="ascii", errors="replace") as f:
                servers = nameservers(f)
        except OSError as e:
            if self._nameservers is not None:
                # Gone for a moment (being rewritten): keep what we have.
                return
            self._log.warn(
                "check {check}: cannot read {path} ({reason}); asking {servers}",
                check=self.name,
                path=self._resolv_conf,
                reason=e.strerror,
                servers=DEFAULT_NAMESERVERS,
            )
            servers = list(DEFAULT_NAMESERVERS)
        if servers == self._nameservers:
            return
        if self._nameservers is not None:
            self._log.info(
                "check {check}: {path} changed; asking {servers}",
                check=self.name,
                path=self._resolv_conf,
                servers=servers,
            )
        self._nameservers = servers
        self._resolver = client.Resolver(servers=servers, reactor=self._clock)

    # ICheck

    def check(self, request: PolicyRequest) -> Any:
        """
        The action, at once when the cache holds every answer the request
        needs (the common case on a busy relay: the same clients again and
        again), else a Deferred that fires with it once the lists answered.
        """
        if self._resolver is None:
            raise ListUnavailable("the check is not started")
        decision_key = self._decision_key(request)
        decided = self.decisions.get(decision_key)
        if decided is not None:
            return decided
        subjects = self._subjects(request)
        now = self._clock.seconds()
        asked: list[tuple[DNSList, str]] = []
        skipped = 0
        for dns_list in self.lists:
            subject = subjects.get(dns_list.source)
            if subject is None:
                continue
            if dns_list.skip_until > now:
                skipped += 1
                continue
            query_name = f"{subject}.{dns_list.zone}"
            if len(query_name) > 253:
                continue
            asked.append((dns_list, query_name))
        if not asked:
            if skipped:
                raise ListUnavailable("every list that applies is being skipped after failures")
            return DUNNO
        cache = self.cache
        answers: list[Any] = []
        # The decision holds as long as the first answer to expire.
        expires = float("inf")
        for _, query_name in asked:
            cached = cache.get_until((query_name, dns.A))
            if cached is None:
                return Deferred.fromCoroutine(self._check_later(asked))
            answers.append(cached[0])
            expires = min(expires, cached[1])
        listed, whitelisted = self._weigh(asked, answers)
        action: Action
        if not listed:
            action = self.whitelisted_action if whitelisted else DUNNO
        else:
            cached_reasons = self._cached_reasons(listed)
            if cached_reasons is None:
                return Deferred.fromCoroutine(self._listed_later(listed))
            reasons, reasons_expire = cached_reasons
            action = self._listed_action(listed, reasons)
            expires = min(expires, reasons_expire)
        if len(asked) == len(self.lists):
            # Only when every list was asked: a skipped list or a value
            # that could not be looked up (logged each time) is weighed
            # again for every request.
            self.decisions.put(decision_key, action, expires - now)
        return action

    async def _check_later(self, asked: list[tuple[DNSList, str]]) -> Action:
        results = await DeferredList(
            [self._lookup(query_name, dns.A) for _, query_name in asked], consumeErrors=True
        )
        listed, whitelisted = self._weigh(asked, [result for _, result in results])
        if listed:
            return self._listed_action(listed, await self._reasons(listed))
        return self.whitelisted_action if whitelisted else DUNNO

    async def _listed_later(self, listed: list[tuple[DNSList, str]]) -> Action:
        return self._listed_action(listed, await self._reasons(listed))

    def _weigh(
        self, asked: list[tuple[DNSList, str]], answers: list[Any]
    ) -> tuple[list[tuple[DNSList, str]], bool]:
        """
        Score the lists' answers (an L{Answer} or a L{Failure} each).

        @return: the lists (and query names) that list the request when the
            score reaches the threshold (else none), and whether a whitelist
            lists it.
        @raise ListUnavailable: when no list answered.
        """
        score = 0.0
        listed: list[tuple[DNSList, str]] = []
        whitelisted = False
        answered = 0
        for (dns_list, query_name), answer in zip(asked, answers, strict=True):
            if isinstance(answer, Failure):
                self._failed(dns_list, answer)
                continue
            answered += 1
            if dns_list.failures:
                dns_list.failures = 0
            if answer.addresses and any(dns_list.counts(address) for address in answer.addresses):
                score += dns_list.weight
                if dns_list.weight < 0:
                    whitelisted = True
                else:
                    listed.append((dns_list, query_name))
        if not answered:
            raise ListUnavailable("no list answered")
        if score >= self.threshold and listed:
            return listed, whitelisted
        return [], whitelisted

    def _listed_action(self, listed: list[tuple[DNSList, str]], reasons: list[str]) -> Action:
        text = self._fill(self.listed_action, [dns_list.zone for dns_list, _ in listed], reasons)
        return Action.parse(text)

    @staticmethod
    def _fill(template: str, zones: list[str], reasons: list[str]) -> str:
        # str.replace, not str.format: a TXT record must not be able to
        # reach into the template's fields.
        return template.replace("{lists}", ", ".join(zones)).replace("{reason}", "; ".join(reasons))

    async def _reasons(self, listed: list[tuple[DNSList, str]]) -> list[str]:
        texts = []
        lookups = [
            self._lookup(name, dns.TXT) if dns_list.fetch_reason else None
            for dns_list, name in listed
        ]
        for (dns_list, _), lookup in zip(listed, lookups, strict=True):
            answer = None
            if lookup is not None:
                try:
                    answer = await lookup
                except Exception:
                    # The reason is a nicety; the listing stands without it.
                    answer = None
            texts.append(self._reason(dns_list, answer))
        return texts

    def _cached_reasons(
        self, listed: list[tuple[DNSList, str]]
    ) -> Optional[tuple[list[str], float]]:
        """
        The reasons of C{listed} from the cache, and until when the first
        of the TXT answers they come from lasts; L{None} when a TXT answer
        that is needed is not there.
        """
        texts = []
        expires = float("inf")
        for dns_list, name in listed:
            answer = None
            if dns_list.fetch_reason:
                cached = self.cache.get_until((name, dns.TXT))
                if cached is None:
                    return None
                answer, until = cached
                expires = min(expires, until)
            texts.append(self._reason(dns_list, answer))
        return texts, expires

    @staticmethod
    def _reason(dns_list: DNSList, answer: Optional[Answer]) -> str:
        text = clean_text(" ".join(answer.reasons), 120) if answer is not None else ""
        return text or f"listed by {dns_list.zone}"

    def _failed(self, dns_list: DNSList, failure: Failure) -> None:
        dns_list.failures += 1
        reason = "timed out" if failure.check(TimeoutError) else escape(failure.getErrorMessage())
        if dns_list.failures >= self.failure_limit:
            dns_list.skip_until = self._clock.seconds() + self.skip_for
            dns_list.failures = 0
            # The remembered decisions weighed this list's answers, which
            # must not count while it is skipped.
            self.decisions.clear()
            self._log.warn(
                "check {check}: list {zone} failed {count} times in a row ({reason});"
                " skipping it for {seconds}s",
                check=self.name,
                zone=dns_list.zone,
                count=self.failure_limit,
                reason=reason,
                seconds=self.skip_for,
            )
        else:
            self._log.info(
                "check {check}: list {zone} failed ({reason}); counted as not listed",
                check=self.name,
                zone=dns_list.zone,
                reason=reason,
            )

    def _subjects(self, request: PolicyRequest) -> dict[str, str]:
        """
        What the lists look up for C{request}, by source; only the sources
        some list uses, and only valid ones.
        """
        subjects = {}
        for source in self._sources:
            if source == "client_address":
                reversed_name = self._reversed_address(request.client_address)
                if reversed_name is not None:
                    subjects[source] = reversed_name
            else:
                name = valid_host_name(getattr(request, source))
                if name is not None:
                    subjects[source] = name
        return subjects

    def _reversed_address(self, client_address: str) -> Optional[str]:
        """
        The DNSBL form of a client address (see L{dnsbl_form}); one that is
        not an IP address is logged and counted.
        """
        reversed_name = dnsbl_form(client_address)
        if reversed_name is None and client_address:
            self.unusable_addresses += 1
            self._log.info(
                "check {check}: client address {address} is not an IP address; not looked up",
                check=self.name,
                address=escape(client_address),
            )
        return reversed_name

    def _lookup(self, name: str, record_type: int) -> Deferred[Answer]:
        """
        Ask for C{name}, from the cache while its TTL lasts, sharing a
        query already in flight for the same name.
        """
        key = (name, record_type)
        cached = self.cache.get(key)
        if cached is not None:
            return succeed(cached)
        return self._in_flight.run(
            key,
            lambda: self._semaphore.run(self._query, name, record_type).addCallback(
                self._remember, key
            ),
        )

    def _query(self, name: str, record_type: int) -> Deferred[Answer]:
        lookup = self._resolver.lookupAddress if record_type == dns.A else self._resolver.lookupText
        result = lookup(name, timeout=(self.query_timeout,))
        return result.addCallbacks(self._answered, self._not_found, (record_type,))

    def _answered(self, result: tuple[list[Any], list[Any], list[Any]], record_type: int) -> Answer:
        answers = [record for record in result[0] if record.type == record_type]
        if not answers:
            # NODATA: the name exists without this type; not listed.
            return Answer((), self._negative_ttl(result[1]))
        ttl = min(self.max_ttl, min(record.ttl for record in answers))
        if record_type == dns.A:
            return Answer(tuple(record.payload.dottedQuad() for record in answers), ttl)
        reasons = [b"".join(record.payload.data).decode("ascii", "replace") for record in answers]
        return Answer((), ttl, reasons)

    def _not_found(self, failure: Failure) -> Answer:
        failure.trap(DNSNameError)
        message = failure.value.args[0] if failure.value.args else None
        authority = getattr(message, "authority", [])
        return Answer((), self._negative_ttl(authority))

    def _negative_ttl(self, authority: list[Any]) -> int:
        for record in authority:
            if record.type == dns.SOA:
                return min(self.max_ttl, record.ttl, record.payload.minimum)
        return self.negative_ttl

    def _remember(self, answer: Answer, key: tuple[str, int]) -> Answer:
        self.cache.put(key, answer, answer.ttl)
        return answer
