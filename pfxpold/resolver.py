"""
Where the checks that ask the DNS (C{dnsbl}, C{spf}) get their resolver:
the C{resolvers} a check's configuration names, or the nameservers of a
resolv.conf(5), re-read while the daemon runs.

Only addresses are accepted as resolvers: resolving the resolver's name
would need a resolver.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, Optional

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names import client

#: Seconds between two readings of resolv.conf (as Twisted's own resolver).
RESOLV_CONF_INTERVAL = 60.0
#: The nameserver of a resolv.conf that names none (resolv.conf(5)).
DEFAULT_NAMESERVERS = [("127.0.0.1", 53)]


def parse_server(value: str) -> Optional[tuple[str, int]]:
    """
    @return: C{(address, port)} for C{"192.0.2.53"}, C{"192.0.2.53:5353"},
        C{"2001:db8::53"} or C{"[2001:db8::53]:5353"}; L{None} for anything
        else (names are refused: resolving the resolver needs a resolver).
    """
    host, port = value, "53"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        return None
    if not 0 < number < 65536:
        return None
    return str(address), number


def nameservers(lines: Iterable[str]) -> list[tuple[str, int]]:
    """
    The C{nameserver} addresses of a resolv.conf(5), in order; the local
    host's when it names none (as the C library does). Lines whose address
    is not an IP address are ignored.
    """
    servers = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append((str(ipaddress.ip_address(fields[1])), 53))
            except ValueError:
                continue
    return servers or list(DEFAULT_NAMESERVERS)


def configured_servers(options: Any) -> list[tuple[str, int]]:
    """
    The C{resolvers} of a check's configuration, parsed.

    @param options: the check's L{pfxpold.config.CheckOptions}.
    @raise pfxpold.config.ConfigError: naming the check and C{resolvers}
        when one is not an IP address with an optional port.
    """
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
    return servers


class ResolverSource:
    """
    A twisted.names resolver for one check: for the configured servers, or
    for the nameservers of a resolv.conf, which is read again every
    L{RESOLV_CONF_INTERVAL} seconds while started (a new resolver when
    they change).

    Twisted's resolver can re-read a resolv.conf itself, but with a timer
    that only its private attribute can stop: the file is read on a timer
    of our own, and the resolver is given the addresses.

    @ivar resolver: the current L{twisted.internet.interfaces.IResolver},
        L{None} until started.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        servers: list[tuple[str, int]],
        resolv_conf: str,
        label: str,
        resolver: Any = None,
    ) -> None:
        """
        @param servers: the configured servers; when empty, C{resolv_conf}'s.
        @param label: names the owner in log lines (C{"check spf"}).
        @param resolver: a resolver to use as it is (tests).
        """
        self._reactor = reactor
        self._servers = servers
        self._resolv_conf = resolv_conf
        self._label = label
        self.resolver = resolver
        self._reader: Optional[LoopingCall] = None
        self._nameservers: Optional[list[tuple[str, int]]] = None

    def start(self) -> None:
        if self.resolver is not None:
            return
        if self._servers:
            self.resolver = client.Resolver(servers=self._servers, reactor=self._reactor)
            return
        reader = self._reader = LoopingCall(self._read_resolv_conf)
        reader.clock = self._reactor
        reader.start(RESOLV_CONF_INTERVAL, now=True)

    def stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and reader.running:
            reader.stop()

    def _read_resolv_conf(self) -> None:
        try:
            with open(self._resolv_conf, encoding="ascii", errors="replace") as f:
                servers = nameservers(f)
        except OSError as e:
            if self._nameservers is not None:
                # Gone for a moment (being rewritten): keep what we have.
                return
            self._log.warn(
                "{label}: cannot read {path} ({reason}); asking {servers}",
                label=self._label,
                path=self._resolv_conf,
                reason=e.strerror,
                servers=DEFAULT_NAMESERVERS,
            )
            servers = list(DEFAULT_NAMESERVERS)
        if servers == self._nameservers:
            return
        if self._nameservers is not None:
            self._log.info(
                "{label}: {path} changed; asking {servers}",
                label=self._label,
                path=self._resolv_conf,
                servers=servers,
            )
        self._nameservers = servers
        self.resolver = client.Resolver(servers=servers, reactor=self._reactor)
