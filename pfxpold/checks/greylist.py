"""
The C{greylist} check: defer the first attempt of every new (client
network, sender, recipient) triplet, as postgrey does; real mail servers
retry, most spam engines do not.

Triplets live in a state store (L{pfxpold.interfaces.IStateStore}); with a
Redis store every MX host shares them, so a retry to another MX passes too.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import math
import re
import socket
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from pfxpold.action import DUNNO, Action
from pfxpold.config import CheckOptions
from pfxpold.escape import escape
from pfxpold.interfaces import ICheck, IStateStore
from pfxpold.request import PolicyRequest
from pfxpold.state import EARLY, NEW, PASSED, GreylistState, store_for

DEFAULT_ACTION = "DEFER_IF_PERMIT Greylisted, please try again in {seconds} seconds"

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


@implementer(ICheck)
class GreylistCheck:
    """
    Greylisting at RCPT, with whitelists, auto-whitelisting of clients that
    retried correctly, and an optional C{X-Greylist:} header.
    """

    _log = Logger()

    def __init__(self, options: CheckOptions) -> None:
        self.name = options.name
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
        self.action = options.action("action", DEFAULT_ACTION)
        try:
            self.action.text.format(seconds=1)
        except (KeyError, IndexError, ValueError) as e:
            raise options.error("action", f"bad placeholder ({e}); use {{seconds}}") from None
        self.header = options.boolean("header", False)
        self.hostname = options.string("hostname", socket.gethostname())
        self.time_offset = options.number("time_offset", 0.0)
        self.store: IStateStore = store_for(options)

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
        prefix = self.ipv4_prefix if address.version == 4 else self.ipv6_prefix
        return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))

    def whitelisted(self, request: PolicyRequest) -> bool:
        """
        Whether the client or the recipient domain is on a whitelist.
        """
        address = request.client_ip
        if address is not None and any(address in network for network in self.whitelist_clients):
            return True
        name = request.client_name
        if name and name != "unknown" and _in_domains(name, self.whitelist_client_names):
            return True
        domain = request.recipient_domain
        return bool(domain) and _in_domains(domain, self.whitelist_recipient_domains)

    def check(self, request: PolicyRequest) -> Any:
        # Only RCPT has the recipient of the triplet.
        if request.protocol_state != "RCPT" or not request.recipient:
            return DUNNO
        network = self.network(request)
        if network is None or self.whitelisted(request):
            return DUNNO
        sender = normalise_sender(
            request.sender, self.extension_separators, self.strip_batv, self.strip_srs
        )
        local, at, domain = request.recipient.rpartition("@")
        recipient = f"{local}@{domain.lower()}" if at else request.recipient
        digest = hashlib.sha256(f"{network}\0{sender}\0{recipient}".encode()).hexdigest()[:40]
        # The braces are a Redis hash tag: a client's keys share a slot.
        base = f"greylist:{{{self.name}:{network}}}"
        now = self.now()
        d: Deferred[GreylistState] = self.store.greylist(
            f"{base}:t:{digest}",
            f"{base}:client",
            now,
            self.delay,
            self.retry_window,
            self.lifetime,
            self.whitelist_after,
        )
        return d.addCallback(self._answer, request, network, sender, now)

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
