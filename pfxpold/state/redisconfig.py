"""
The settings of a Redis store (C{[stores.NAME]} with C{type = "redis"}),
read and checked in one place, and the connections they describe: one
server, a master found through Sentinel, or a Cluster; plain TCP or TLS;
a bare password or an ACL user.

Every mistake is a L{ConfigError} naming the file, the store and the key,
raised when the configuration is loaded, not at the first request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint

from pfxpold.config import CheckOptions, endpoint_fields

DEFAULT_ENDPOINT = "tcp:host=127.0.0.1:port=6379"
DEFAULT_TIMEOUT = 2.0
DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

#: Seconds a TCP connection may take to be made.
CONNECT_TIMEOUT = 5.0

_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]]+))(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class Address:
    """
    A Redis server's (or sentinel's) host and port.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, default_port: int) -> Address:
    """
    A C{host:port} (C{[v6]:port} for IPv6; the port may be left out) as
    an L{Address}.

    @raise ValueError: when it is not one.
    """
    found = _ADDRESS.match(text.strip())
    if found is None:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [address]:port)")
    host = found.group("v6") or found.group("host")
    if found.group("v6"):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    port = int(found.group("port")) if found.group("port") else default_port
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port {port} is out of range (1-65535)")
    return Address(host, port)


def _is_ip(host: str) -> Optional[int]:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


@dataclass(frozen=True)
class RedisSettings:
    """
    A Redis store's settings, checked.

    @ivar mode: C{"server"}, C{"sentinel"} or C{"cluster"}.
    @ivar endpoint: the single server's Twisted client endpoint string.
    @ivar sentinels: the sentinels' addresses (mode C{"sentinel"}).
    @ivar master_name: the master's name as the sentinels know it.
    @ivar cluster_nodes: some of the cluster's nodes (mode C{"cluster"}):
        the rest are learnt from them.
    @ivar tls_options: Twisted's client TLS options factory, called with
        the host to verify, or L{None} without TLS.
    """

    mode: str
    endpoint: str
    sentinels: tuple[Address, ...]
    master_name: Optional[str]
    cluster_nodes: tuple[Address, ...]
    database: int
    username: Optional[str]
    password: Optional[str]
    sentinel_username: Optional[str]
    sentinel_password: Optional[str]
    timeout: float
    prefix: str
    tls: bool
    tls_server_name: Optional[str]
    tls_options: Optional[Callable[[str], Any]]

    def connector(self, reactor: Any) -> Callable[[Address], IStreamClientEndpoint]:
        """
        @return: a function that makes the client endpoint of a server
            found at run time (a master, a sentinel, a cluster node), over
            TLS when the store uses it.
        """

        def connect(address: Address) -> IStreamClientEndpoint:
            version = _is_ip(address.host)
            endpoint: IStreamClientEndpoint
            if version == 4:
                endpoint = TCP4ClientEndpoint(reactor, address.host, address.port, CONNECT_TIMEOUT)
            elif version == 6:
                endpoint = TCP6ClientEndpoint(reactor, address.host, address.port, CONNECT_TIMEOUT)
            else:
                endpoint = HostnameEndpoint(
                    reactor, address.host, address.port, timeout=CONNECT_TIMEOUT
                )
            if self.tls_options is not None:
                name = self.tls_server_name or address.host
                endpoint = wrapClientTLS(self.tls_options(name), endpoint)
            return endpoint

        return connect

    def server_endpoint(self, reactor: Any) -> IStreamClientEndpoint:
        """
        @return: the single server's endpoint (mode C{"server"}).
        """
        endpoint = clientFromString(reactor, self.endpoint)
        if self.tls_options is not None:
            _, _, keywords = endpoint_fields(self.endpoint)
            name = self.tls_server_name or keywords.get("host", "")
            endpoint = wrapClientTLS(self.tls_options(name), endpoint)
        return endpoint


def _addresses(options: CheckOptions, key: str, default_port: int) -> tuple[Address, ...]:
    texts = options.strings(key, [])
    if key in options and not texts:
        raise options.error(key, "must name at least one host:port")
    found = []
    for text in texts:
        try:
            found.append(parse_address(text, default_port))
        except ValueError as e:
            raise options.error(key, str(e)) from None
    return tuple(found)


def _read_pem(options: CheckOptions, key: str) -> Optional[str]:
    path = options.existing_path(key, None)
    if path is None:
        return None
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read()
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise options.error(key, f"{path} holds no PEM certificate")
    return text


def _tls_options(options: CheckOptions) -> Optional[Callable[[str], Any]]:
    """
    The TLS settings, checked now (files read, certificates parsed).
    """
    tls = options.boolean("tls", False)
    keys = ("tls_ca_file", "tls_server_name", "tls_certificate")
    if not tls:
        for key in keys:
            if key in options:
                raise options.error(key, "needs tls = true")
        return None
    try:
        from twisted.internet import ssl
    except ImportError:  # pragma: no cover: pyOpenSSL is an extra
        raise options.error(
            "tls", "needs pyOpenSSL and service_identity: install pfxpold[redis]"
        ) from None
    ca_text = _read_pem(options, "tls_ca_file")
    certificate_text = _read_pem(options, "tls_certificate")
    trust: Any = None
    if ca_text is not None:
        blocks = re.findall(
            r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", ca_text, re.S
        )
        try:
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(block.encode("ascii")) for block in blocks]
            )
        except Exception as e:
            raise options.error("tls_ca_file", f"not a PEM certificate: {e}") from None
    client_certificate = None
    if certificate_text is not None:
        try:
            client_certificate = ssl.PrivateCertificate.loadPEM(certificate_text.encode("ascii"))
        except Exception as e:
            raise options.error(
                "tls_certificate", f"not a PEM certificate followed by its key: {e}"
            ) from None

    def make(host: str) -> Any:
        extra: dict[str, Any] = {}
        if trust is not None:
            extra["trustRoot"] = trust
        if client_certificate is not None:
            extra["clientCertificate"] = client_certificate
        return ssl.optionsForClientTLS(host, **extra)

    return make


def read_settings(options: CheckOptions) -> RedisSettings:
    """
    Read and check a Redis store's settings.

    Keys: C{endpoint} (one server, a Twisted client endpoint string), or
    C{sentinels} (C{["host:port", ...]}) with C{master_name}, or
    C{cluster_nodes} (C{["host:port", ...]}); C{database} (not on a
    cluster); C{username} (an ACL user) and C{password_file};
    C{sentinel_username} and C{sentinel_password_file} (when the sentinels
    want their own); C{tls} with C{tls_ca_file}, C{tls_server_name},
    C{tls_certificate} (a client certificate followed by its key);
    C{timeout}; C{prefix}.

    @raise ConfigError: naming the store and the key at fault.
    """
    sentinels = _addresses(options, "sentinels", DEFAULT_SENTINEL_PORT)
    cluster_nodes = _addresses(options, "cluster_nodes", DEFAULT_REDIS_PORT)
    master_name = options.string("master_name", None)
    given = [key for key in ("endpoint", "sentinels", "cluster_nodes") if key in options]
    if len(given) > 1:
        raise options.error(given[1], f"cannot be used with {given[0]}: choose one")
    if sentinels:
        mode = "sentinel"
        if not master_name:
            raise options.error("master_name", "is required with sentinels")
    elif master_name is not None:
        raise options.error("master_name", "needs sentinels")
    else:
        mode = "cluster" if cluster_nodes else "server"
    endpoint = options.string("endpoint", DEFAULT_ENDPOINT)
    if mode == "server":
        try:
            clientFromString(options.reactor, endpoint)
        except (ValueError, TypeError, KeyError) as e:
            raise options.error("endpoint", f"not a Twisted client endpoint: {e}") from None
        kind, _, _ = endpoint_fields(endpoint)
        if kind == "tls" and options.boolean("tls", False):
            raise options.error("tls", "the endpoint is a tls: one already")
    database = options.integer("database", 0, minimum=0)
    if mode == "cluster" and database:
        raise options.error("database", "a Redis Cluster has database 0 only")
    username = options.string("username", None)
    password = options.secret("password_file", None)
    if username is not None and password is None:
        raise options.error("username", "needs password_file (the ACL user's password)")
    sentinel_username = options.string("sentinel_username", None)
    sentinel_password = options.secret("sentinel_password_file", None)
    for key in ("sentinel_username", "sentinel_password_file"):
        if key in options and mode != "sentinel":
            raise options.error(key, "needs sentinels")
    if sentinel_username is not None and sentinel_password is None:
        raise options.error("sentinel_username", "needs sentinel_password_file")
    tls_options = _tls_options(options)
    tls_server_name = options.string("tls_server_name", None)
    if tls_options is not None and mode == "server":
        kind, _, keywords = endpoint_fields(endpoint)
        if not tls_server_name and not keywords.get("host"):
            raise options.error(
                "tls_server_name", f"is required: the {kind}: endpoint names no host"
            )
    return RedisSettings(
        mode=mode,
        endpoint=endpoint,
        sentinels=sentinels,
        master_name=master_name,
        cluster_nodes=cluster_nodes,
        database=database,
        username=username,
        password=password,
        sentinel_username=sentinel_username,
        sentinel_password=sentinel_password,
        timeout=options.number("timeout", DEFAULT_TIMEOUT, positive=True),
        prefix=options.string("prefix", "pfxpold:"),
        tls=tls_options is not None,
        tls_server_name=tls_server_name,
        tls_options=tls_options,
    )


def describe(name: str, settings: RedisSettings) -> str:
    """
    How the log names a store: its name and where it is.
    """
    if settings.mode == "sentinel":
        return f"{name} (sentinel master {settings.master_name})"
    if settings.mode == "cluster":
        return f"{name} (cluster {', '.join(map(str, settings.cluster_nodes))})"
    return f"{name} ({settings.endpoint})"
