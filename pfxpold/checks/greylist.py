"""
The C{greylist} check: defer the first attempt of every new (client
network, sender, recipient) triplet, as postgrey does; real mail servers
retry, most spam engines do not.

Triplets live in a state store (L{pfxpold.interfaces.IStateStore}); with a
Redis store every MX host shares them, so a retry to another MX passes too.

The check records a triplet in the same atomic store operation that tells
whether it is new, early or passed, so it needs no
L{pfxpold.interfaces.IDecisionListener}: its deferral is decisive in the
chain, so a triplet it records as new is the one deferred (a check before
it that decides first keeps it from running at all).
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import math
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.action import DUNNO, Action
from pfxpold.cache import Coalescer
from pfxpold.config import CheckOptions
from pfxpold.escape import escape
from pfxpold.interfaces import ICheck, IPossibleActions, IStateStore
from pfxpold.request import IPAddress, PolicyRequest, client_network
from pfxpold.stages import Possible, possible
from pfxpold.state import (
    EARLY,
    NEW,
    PASSED,
    WHITELIST_CLIENT,
    WHITELIST_SENDER,
    GreylistState,
    Triplet,
    WhitelistEntry,
    store_for,
)
from pfxpold.state.outage import LOCAL, ON_ERROR, PASS, DegradableCheck
from pfxpold.whitelist import exemption_file

DEFAULT_ACTION = "DEFER_IF_PERMIT Greylisted, please try again in {seconds} seconds"
#: Seconds the store's run-time whitelist is kept before it is read again.
DEFAULT_WHITELIST_REFRESH = 10.0
#: The key of the one read of the run-time whitelist in flight.
_RUNTIME_WHITELIST = "runtime whitelist"
#: What whitelist_file's entries are looked up by, unless whitelist_file_lookup says.
WHITELIST_FILE_LOOKUPS = ("client_address", "client_name", "recipient")

_SRS0 = re.compile(r"^SRS0[=+-][^=]*=[^=]*=([^=]+)=(.+)$", re.IGNORECASE)
_SRS1 = re.compile(r"^SRS1[=+-][^=]*=[^=]*==[^=]*=[^=]*=([^=]+)=(.+)$", re.IGNORECASE)
_BATV = re.compile(r"^(?:prvs|msprvs1)=[^=]+=(.+)$", re.IGNORECASE)


def normalise_sender(
    sender: str,
    extension_separators: str = "+",
    strip_batv: bool = True,
    strip_srs: bool = True,
) -> str:
    """
    The sender as greylisting compares it: domain lowercased, an SRS
    address turned back into the original sender, a BATV tag
    (C{prvs=TAG=local}) and an address extension (C{local+ext}) removed.
    """
    local, at, domain = sender.rpartition("@")
    if not at:
        return sender
    if strip_srs:
        match = _SRS0.match(local) or _SRS1.match(local)
        if match is not None:
            domain, local = match.group(1), match.group(2)
    if strip_batv:
        match = _BATV.match(local)
        if match is not None:
            local = match.group(1)
    for separator in extension_separators:
        stripped = local.split(separator, 1)[0]
        if stripped:
            local = stripped
    return f"{local}@{domain.lower()}"


def _in_domains(name: str, domains: frozenset[str]) -> bool:
    """
    Whether C{name} is one of C{domains} or below one of them.
    """
    name = name.lower().rstrip(".")
    while name:
        if name in domains:
            return True
        _, dot, name = name.partition(".")
        if not dot:
            return False
    return False


def whitelist_entry(kind: str, value: str, added: float = 0.0, comment: str = "") -> WhitelistEntry:
    """
    A run-time whitelist entry, its value in the form the check compares:
    a network in its canonical form, a domain lowercased.

    @raise ValueError: when C{value} is not a network (or an address) for
        L{WHITELIST_CLIENT}, not a domain for L{WHITELIST_SENDER}.
    """
    if kind == WHITELIST_CLIENT:
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not a network or an address") from None
        return WhitelistEntry(kind, str(network), added, comment)
    if kind == WHITELIST_SENDER:
        domain = value.strip().lower().strip(".")
        if not domain or any(c.isspace() or c in "@/\\" for c in domain):
            raise ValueError(f"{value!r} is not a domain")
        return WhitelistEntry(kind, domain, added, comment)
    raise ValueError(f"{kind!r} is not a kind of whitelist entry")


@dataclass(frozen=True)
class RuntimeWhitelist:
    """
    A store's run-time whitelist, ready to match.

    @ivar networks: for each IP version, the prefix lengths in use with
        the set of network numbers (the address's top bits) of that
        length: a lookup costs one shift and one set look-up per length
        in use, however many networks there are.
    @ivar domains: sender domains (their subdomains match too).
    """

    networks: dict[int, tuple[tuple[int, frozenset[int]], ...]] = field(default_factory=dict)
    domains: frozenset[str] = frozenset()

    @classmethod
    def of(cls, entries: list[WhitelistEntry]) -> RuntimeWhitelist:
        numbers: dict[int, dict[int, set[int]]] = {}
        domains = set()
        for entry in entries:
            try:
                entry = whitelist_entry(entry.kind, entry.value)
            except ValueError:
                # Written by hand into the store: skipped rather than
                # failing every request.
                continue
            if entry.kind == WHITELIST_CLIENT:
                network = ipaddress.ip_network(entry.value)
                shift = network.max_prefixlen - network.prefixlen
                by_length = numbers.setdefault(network.version, {})
                by_length.setdefault(network.prefixlen, set()).add(
                    int(network.network_address) >> shift
                )
            else:
                domains.add(entry.value)
        networks = {
            version: tuple((length, frozenset(values)) for length, values in by_length.items())
            for version, by_length in numbers.items()
        }
        return cls(networks, frozenset(domains))

    def covers(self, address: IPAddress, sender: str) -> bool:
        """
        Whether the client C{address} or the domain of the (normalised)
        C{sender} is on this whitelist.
        """
        lengths = self.networks.get(address.version)
        if lengths:
            number = int(address)
            bits = address.max_prefixlen
            for length, values in lengths:
                if number >> (bits - length) in values:
                    return True
        if not self.domains:
            return False
        _, at, domain = sender.rpartition("@")
        return bool(at and domain) and _in_domains(domain, self.domains)


@implementer(ICheck, IPossibleActions)
class GreylistCheck(DegradableCheck):
    """
    Greylisting at RCPT, with whitelists, auto-whitelisting of clients that
    retried correctly, and an optional C{X-Greylist:} header.

    A service for its degraded mode (C{on_store_down}; see
    L{DegradableCheck}).
    """

    #: It records what it sees: with C{[server] parallel}, started only once
    #: every check before it answered DUNNO.
    writes_state = True

    _log = Logger()

    def __init__(self, options: CheckOptions) -> None:
        super().__init__()
        self.name: str = options.name  # type: ignore[assignment]
        self.reactor = options.reactor
        self.delay = options.number("delay", 300.0)
        if self.delay < 0:
            raise options.error("delay", "must be 0 or more seconds")
        self.retry_window = options.number("retry_window", 2 * 86400.0, positive=True)
        if self.retry_window <= self.delay:
            raise options.error("retry_window", "must be longer than delay")
        self.lifetime = options.number("lifetime", 35 * 86400.0, positive=True)
        self.whitelist_after = options.integer("auto_whitelist_after", 5, minimum=0)
        self.ipv4_prefix = options.integer("ipv4_prefix", 24, minimum=0)
        self.ipv6_prefix = options.integer("ipv6_prefix", 64, minimum=0)
        if self.ipv4_prefix > 32 or self.ipv6_prefix > 128:
            raise options.error("ipv4_prefix", "prefixes are at most 32 (IPv4) and 128 (IPv6)")
        self.extension_separators = options.string("extension_separators", "+")
        self.strip_batv = options.boolean("strip_batv", True)
        self.strip_srs = options.boolean("strip_srs", True)
        networks = []
        for value in options.strings("whitelist_clients", []):
            try:
                networks.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise options.error("whitelist_clients", f"{value!r} is not a network") from None
        self.whitelist_clients = tuple(networks)
        self.whitelist_client_names = frozenset(
            name.lower().strip(".") for name in options.strings("whitelist_client_names", [])
        )
        self.whitelist_recipient_domains = frozenset(
            name.lower().strip(".") for name in options.strings("whitelist_recipient_domains", [])
        )
        self.whitelist_file = exemption_file(options, "whitelist_file", WHITELIST_FILE_LOOKUPS)
        self.action = options.action("action", DEFAULT_ACTION)
        try:
            self.action.text.format(seconds=1)
        except (KeyError, IndexError, ValueError) as e:
            raise options.error("action", f"bad placeholder ({e}); use {{seconds}}") from None
        self.header = options.boolean("header", False)
        self.hostname = options.string("hostname", socket.gethostname())
        self.time_offset = options.number("time_offset", 0.0)
        self.whitelist_refresh = options.number("whitelist_refresh", DEFAULT_WHITELIST_REFRESH)
        if self.whitelist_refresh < 0:
            raise options.error("whitelist_refresh", "must be 0 or more seconds")
        self.store: IStateStore = store_for(options)
        self._runtime: Optional[RuntimeWhitelist] = None
        self._runtime_until = 0.0
        # One read of the store's whitelist at a time, whoever waits for it.
        self._runtime_reads: Coalescer[str, RuntimeWhitelist] = Coalescer(cancel_abandoned=False)
        self.read_outage(options, "greylist", (ON_ERROR, PASS, LOCAL))

    def now(self) -> float:
        """
        The reactor's time plus C{time_offset}.
        """
        return self.reactor.seconds() + self.time_offset

    def network(self, request: PolicyRequest) -> Optional[str]:
        """
        The client network of the triplet, or L{None} without a valid
        client address.
        """
        address = request.client_ip
        if address is None:
            return None
        return self.client_network(address)

    def client_network(self, address: IPAddress) -> str:
        """
        The client network of the triplet for a client C{address}.
        """
        return client_network(address, self.ipv4_prefix, self.ipv6_prefix)

    def triplet(self, network: str, sender: str, recipient: str) -> Triplet:
        """
        The triplet as this check compares it: the sender normalised (see
        L{normalise_sender}), the recipient's domain lowercased.
        """
        sender = normalise_sender(
            sender, self.extension_separators, self.strip_batv, self.strip_srs
        )
        local, at, domain = recipient.rpartition("@")
        return Triplet(network, sender, f"{local}@{domain.lower()}" if at else recipient)

    def key_prefix(self, network: Optional[str] = None) -> str:
        """
        What the keys of this check's triplets start with: all of them, or
        those of one client network.
        """
        if network is None:
            return f"greylist:{{{self.name}:"
        return f"greylist:{{{self.name}:{network}}}:t:"

    def keys(self, triplet: Triplet) -> tuple[str, str]:
        """
        The store keys of a triplet and of its client network (which
        counts the network's passed triplets for auto-whitelisting).
        """
        digest = hashlib.sha256(
            f"{triplet.network}\0{triplet.sender}\0{triplet.recipient}".encode()
        ).hexdigest()[:40]
        # The braces are a Redis hash tag: a client's keys share a slot.
        base = f"greylist:{{{self.name}:{triplet.network}}}"
        return f"{base}:t:{digest}", f"{base}:client"

    def runtime_whitelist(self) -> Union[RuntimeWhitelist, Deferred[RuntimeWhitelist]]:
        """
        The store's run-time whitelist (what C{pfxpold-admin whitelist}
        adds), read again once C{whitelist_refresh} seconds passed since it
        was last read. Requests that come while it is read wait for that
        one read.

        @return: the whitelist, or a Deferred that fires with it (or fails
            when the store cannot be read; nothing is kept then, so the
            next request reads again).
        """
        now = self.reactor.seconds()
        if self._runtime is not None and now < self._runtime_until:
            return self._runtime
        return self._runtime_reads.run(
            _RUNTIME_WHITELIST,
            lambda: self.store.whitelist_list().addCallback(self._runtime_read, now),
        )

    def _runtime_read(self, entries: list[WhitelistEntry], now: float) -> RuntimeWhitelist:
        self._runtime = RuntimeWhitelist.of(entries)
        self._runtime_until = now + self.whitelist_refresh
        return self._runtime

    def whitelisted(self, request: PolicyRequest) -> bool:
        """
        Whether the client or the recipient domain is on a whitelist.
        """
        if self.whitelist_file is not None and self.whitelist_file.exempt(request):
            return True
        address = request.client_ip
        if address is not None and any(address in network for network in self.whitelist_clients):
            return True
        name = request.client_name
        if name and name != "unknown" and _in_domains(name, self.whitelist_client_names):
            return True
        domain = request.recipient_domain
        return bool(domain) and _in_domains(domain, self.whitelist_recipient_domains)

    def possible_actions(self) -> list[Possible]:
        """
        Its C{action}, and with C{header} a PREPEND, at RCPT only.
        """
        found = [possible(self.action.verb, ["RCPT"], "action")]
        if self.header:
            found.append(possible("PREPEND", ["RCPT"], "header"))
        return found

    def check(self, request: PolicyRequest) -> Any:
        # Only RCPT has the recipient of the triplet.
        if request.protocol_state != "RCPT" or not request.recipient:
            return DUNNO
        address = request.client_ip
        if address is None or self.whitelisted(request):
            return DUNNO
        triplet = self.triplet(self.client_network(address), request.sender, request.recipient)
        outage = self.outage
        if outage is not None and outage.active:
            return self._degraded(request, address, triplet)
        runtime = self.runtime_whitelist()
        if isinstance(runtime, Deferred):
            answer: Any = runtime.addCallback(
                lambda runtime: self._greylist(request, address, triplet, runtime)
            )
        else:
            answer = self._greylist(request, address, triplet, runtime)
        if outage is not None and isinstance(answer, Deferred):
            answer.addErrback(self._store_failed, request, address, triplet)
        return answer

    def _store_failed(
        self, failure: Failure, request: PolicyRequest, address: IPAddress, triplet: Triplet
    ) -> Any:
        """
        The store failed: answer as degraded mode does when it is down,
        else fail (and the check's C{on_error} applies).
        """
        assert self.outage is not None
        # The client key: a plain counter, in the triplet's slot.
        if not self.outage.failed(failure, self.keys(triplet)[1]):
            return failure
        return self._degraded(request, address, triplet)

    def _degraded(self, request: PolicyRequest, address: IPAddress, triplet: Triplet) -> Any:
        """
        The answer while the store is down: DUNNO (C{"pass"}), or the
        local greylist's (C{"local"}), with the run-time whitelist last
        read from the store.
        """
        assert self.outage is not None
        local = self.outage.local
        if local is None:
            return DUNNO
        runtime = self._runtime or RuntimeWhitelist()
        return self._greylist(request, address, triplet, runtime, local)

    def _greylist(
        self,
        request: PolicyRequest,
        address: IPAddress,
        triplet: Triplet,
        runtime: RuntimeWhitelist,
        store: Optional[IStateStore] = None,
    ) -> Any:
        if runtime.covers(address, triplet.sender):
            return DUNNO
        triplet_key, client_key = self.keys(triplet)
        now = self.now()
        d: Deferred[GreylistState] = (store or self.store).greylist(
            triplet_key,
            client_key,
            now,
            self.delay,
            self.retry_window,
            self.lifetime,
            self.whitelist_after,
            triplet,
        )
        return d.addCallback(self._answer, request, triplet.network, triplet.sender, now)

    def _answer(
        self, state: GreylistState, request: PolicyRequest, network: str, sender: str, now: float
    ) -> Action:
        if state.verdict in (NEW, EARLY):
            wait = max(1, math.ceil(state.first_seen + self.delay - now))
            self._log.info(
                "greylist {check}: {verdict} triplet {network} {sender} -> {recipient};"
                " deferred for {seconds}s",
                check=self.name,
                verdict=state.verdict,
                network=network,
                sender=escape(sender),
                recipient=escape(request.recipient),
                seconds=wait,
            )
            return Action(self.action.verb, self.action.text.format(seconds=wait))
        if state.verdict == PASSED:
            waited = int(now - state.first_seen)
            self._log.info(
                "greylist {check}: triplet {network} {sender} -> {recipient} passed after {seconds}s",
                check=self.name,
                network=network,
                sender=escape(sender),
                recipient=escape(request.recipient),
                seconds=waited,
            )
            if self.header:
                date = email.utils.formatdate(now, usegmt=True)
                return Action(
                    "PREPEND",
                    f"X-Greylist: delayed {waited} seconds by pfxpold at {self.hostname}; {date}",
                )
        return DUNNO
