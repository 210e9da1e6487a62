"""
Postfix-style access maps: parsing C{key action} tables and looking request
attributes up in them in access(5) order.

The key derivation (which strings a sender, a host name or a client address
is looked up as, most specific first) is kept apart from the table, so that
other checks (SQL, LDAP) can look up the same keys in their own backends.

Lookup order, per kind of attribute (access(5)):

  - an e-mail address (C{sender}, C{recipient}): C{user@domain}, then the
    domain and its parent domains, then C{user@}; the null sender is
    looked up as C{<>};
  - a domain (C{sender_domain}, C{recipient_domain}) or a host name
    (C{client_name}, C{reverse_client_name}, C{helo_name}): the name, then
    its parent domains; C{unknown} and empty names are not looked up;
  - an IP address (C{client_address}, C{server_address}): the longest
    matching network of the table, IPv4-mapped IPv6 addresses folded to
    IPv4;
  - anything else (C{sasl_username}, ...): the value itself.

Parent domains are looked up as C{.example.com} (C{"dot"}, the default),
as C{example.com} (C{"implicit"}: Postfix's behaviour when
C{smtpd_access_maps} is in C{parent_domain_matches_subdomains}), or not at
all (C{"off"}).

Domains and host names always compare case-insensitively; local parts and
plain values compare case-insensitively too (as Postfix's own maps do)
unless C{fold_local_part} is false.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar, Union

from pfxpold.action import Action, ActionError
from pfxpold.request import IPAddress, PolicyRequest, client_network, parse_ip

V = TypeVar("V")

PARENT_STYLES = ("dot", "implicit", "off")

#: The attributes Postfix 3.7+ sends (SMTPD_POLICY_README).
POSTFIX_ATTRIBUTES = frozenset(
    """request protocol_state protocol_name helo_name queue_id sender recipient
    recipient_count client_address client_name reverse_client_name instance
    sasl_method sasl_username sasl_sender size ccert_subject ccert_issuer
    ccert_fingerprint encryption_protocol encryption_cipher encryption_keysize
    etrn_domain stress ccert_pubkey_fingerprint client_port policy_context
    server_address server_port compatibility_level mail_version tls_sni""".split()
)

#: Values computed from a request rather than sent by Postfix.
DERIVED_ATTRIBUTES = frozenset(
    {
        "sender_domain",
        "sender_local_part",
        "sender_at_domain",
        "recipient_domain",
        "recipient_local_part",
        "recipient_at_domain",
        "client_ip",
        "client_network",
    }
)

#: How each attribute is looked up in an access map; the rest are plain.
ATTRIBUTE_KINDS = {
    "sender": "address",
    "recipient": "address",
    "sasl_sender": "address",
    "sender_domain": "domain",
    "recipient_domain": "domain",
    "etrn_domain": "domain",
    "client_name": "host",
    "reverse_client_name": "host",
    "helo_name": "host",
    "tls_sni": "host",
    "client_address": "ip",
    "server_address": "ip",
    "client_ip": "ip",
}

_OCTETS = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3}){0,3}$")
_BRACKETED = re.compile(r"^\[([^\]]+)\](/[0-9]+)?$")


def attribute_value(request: PolicyRequest, name: str) -> Optional[str]:
    """
    The value of a Postfix attribute or a derived value for C{request}.

    Derived values: C{sender_domain} and C{recipient_domain} (lowercased),
    C{sender_local_part}, C{recipient_local_part}, C{sender_at_domain} and
    C{recipient_at_domain} (C{"@example.com"}, or C{""}), C{client_ip} (the
    client address normalised, IPv4-mapped folded) and C{client_network}
    (its /24 for IPv4, /64 for IPv6); the last two are L{None} when Postfix
    sent no valid address.
    """
    if name == "sender_domain":
        return request.sender_domain
    if name == "recipient_domain":
        return request.recipient_domain
    if name == "sender_local_part":
        return request.sender_local_part
    if name == "recipient_local_part":
        return request.recipient_local_part
    if name == "sender_at_domain":
        domain = request.sender_domain
        return "@" + domain if domain else ""
    if name == "recipient_at_domain":
        domain = request.recipient_domain
        return "@" + domain if domain else ""
    if name == "client_ip":
        ip = request.client_ip
        return None if ip is None else str(ip)
    if name == "client_network":
        ip = request.client_ip
        return None if ip is None else client_network(ip)
    return request.get(name, "")


def check_attribute(name: str) -> None:
    """
    @raise ValueError: when C{name} is neither a Postfix attribute nor a
        derived value.
    """
    if name not in POSTFIX_ATTRIBUTES and name not in DERIVED_ATTRIBUTES:
        raise ValueError(
            f"{name!r} is neither a Postfix policy attribute nor one of"
            f" {', '.join(sorted(DERIVED_ATTRIBUTES))}"
        )


def domain_keys(name: str, parent_style: str = "dot") -> list[str]:
    """
    The keys a domain or host name is looked up as: the name, lowercased
    and without a trailing dot, then its parent domains in C{parent_style}.
    """
    name = name.lower().rstrip(".")
    if not name:
        return []
    keys = [name]
    if parent_style == "off" or name.startswith("["):
        return keys
    dot = name.find(".")
    while dot >= 0:
        keys.append(name[dot:] if parent_style == "dot" else name[dot + 1 :])
        dot = name.find(".", dot + 1)
    return keys


def address_keys(
    address: str, parent_style: str = "dot", fold_local_part: bool = True
) -> list[str]:
    """
    The keys an e-mail address is looked up as, in access(5) order:
    C{user@domain}, the domain and its parents, C{user@}; C{<>} for the
    null sender.
    """
    if not address:
        return ["<>"]
    local, at, domain = address.rpartition("@")
    if not at:
        local = address.lower() if fold_local_part else address
        return [local, local + "@"]
    if fold_local_part:
        local = local.lower()
    domain = domain.lower().rstrip(".")
    keys = [f"{local}@{domain}"]
    keys.extend(domain_keys(domain, parent_style))
    keys.append(local + "@")
    return keys


@dataclass(frozen=True)
class LookupKey:
    """
    What one attribute of one request is looked up as: a list of names
    (most specific first) or an IP address.
    """

    names: Sequence[str] = ()
    ip: Optional[IPAddress] = None


NO_KEY = LookupKey()


def lookup_key(
    request: PolicyRequest,
    attribute: str,
    parent_style: str = "dot",
    fold_local_part: bool = True,
) -> LookupKey:
    """
    Derive the lookup key of C{attribute} of C{request} for its kind.
    """
    kind = ATTRIBUTE_KINDS.get(attribute, "plain")
    value = attribute_value(request, attribute)
    if kind == "ip":
        ip = parse_ip(value or "")
        return NO_KEY if ip is None else LookupKey(ip=ip)
    if kind == "address":
        return LookupKey(address_keys(value or "", parent_style, fold_local_part))
    if not value:
        return NO_KEY
    if kind == "host":
        if value.lower() == "unknown":
            return NO_KEY
        return LookupKey(domain_keys(value, parent_style))
    if kind == "domain":
        return LookupKey(domain_keys(value, parent_style))
    return LookupKey([value.lower() if fold_local_part else value])


class KeyTable(Generic[V]):
    """
    One column of an access map: names in a dict, networks in one dict per
    prefix length, so that a lookup costs one dict access per name and at
    most one per distinct prefix length (longest first).
    """

    __slots__ = ("names", "_networks", "_lengths")

    def __init__(self) -> None:
        self.names: dict[str, V] = {}
        self._networks: dict[int, dict[int, dict[int, V]]] = {4: {}, 6: {}}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}

    def __len__(self) -> int:
        return len(self.names) + sum(
            len(table) for family in self._networks.values() for table in family.values()
        )

    def get_or_add(
        self, key: Union[str, ipaddress.IPv4Network, ipaddress.IPv6Network], make: Any
    ) -> V:
        """
        The value stored under C{key}, or C{make()} stored there first.
        """
        if isinstance(key, str):
            value = self.names.get(key)
            if value is None:
                value = self.names[key] = make()
            return value
        family = self._networks[key.version]
        table = family.get(key.prefixlen)
        if table is None:
            table = family[key.prefixlen] = {}
            self._lengths[key.version] = sorted(family, reverse=True)
        number = int(key.network_address) >> (key.max_prefixlen - key.prefixlen)
        value = table.get(number)
        if value is None:
            value = table[number] = make()
        return value

    def add(self, key: Union[str, ipaddress.IPv4Network, ipaddress.IPv6Network], value: V) -> bool:
        """
        Store C{value} under C{key}.

        @return: C{False} when the key was there already (nothing stored).
        """
        stored: list[V] = []

        def make() -> V:
            stored.append(value)
            return value

        self.get_or_add(key, make)
        return bool(stored)

    def match(self, key: LookupKey) -> Iterator[V]:
        """
        The values matching C{key}, most specific first.
        """
        if key.ip is not None:
            ip = key.ip
            bits = ip.max_prefixlen
            number = int(ip)
            family = self._networks[ip.version]
            for length in self._lengths[ip.version]:
                value = family[length].get(number >> (bits - length))
                if value is not None:
                    yield value
            return
        names = self.names
        for name in key.names:
            value = names.get(name)
            if value is not None:
                yield value

    def values(self) -> Iterator[V]:
        """
        Every value stored, names first.
        """
        yield from self.names.values()
        for family in self._networks.values():
            for table in family.values():
                yield from table.values()

    def first(self, key: LookupKey) -> Optional[V]:
        """
        The most specific value matching C{key}, or L{None}.
        """
        for value in self.match(key):
            return value
        return None


class MapError(ValueError):
    """
    An access map cannot be used.

    @ivar path: the file.
    @ivar line: the line number (1-based), or L{None} for the whole file.
    @ivar reason: what is wrong.
    """

    def __init__(self, path: str, line: Optional[int], reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


def parse_key(
    text: str, fold_local_part: bool = True
) -> Union[str, ipaddress.IPv4Network, ipaddress.IPv6Network]:
    """
    Read one key of a map: a network (C{192.0.2.0/24}, C{2001:db8::/32},
    an address, an access(5) octet prefix such as C{192.168}) or a name,
    normalised as lookups derive them (C{@example.com} is read as
    C{example.com}).

    @raise ValueError: for a network that is not valid.
    """
    bracketed = _BRACKETED.match(text)
    if bracketed and (":" in bracketed.group(1) or _OCTETS.match(bracketed.group(1))):
        text = bracketed.group(1) + (bracketed.group(2) or "")
    if "/" in text and (":" in text or text[:1].isdigit()):
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise ValueError(f"{text!r} is not a valid network: {e}") from None
        return _fold_network(network)
    if _OCTETS.match(text):
        octets = text.split(".")
        if any(int(octet) > 255 for octet in octets):
            raise ValueError(f"{text!r} is not a valid IPv4 address or prefix")
        padded = octets + ["0"] * (4 - len(octets))
        return ipaddress.IPv4Network(f"{'.'.join(padded)}/{8 * len(octets)}")
    if ":" in text:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            pass
        else:
            return _fold_network(ipaddress.ip_network(address))
    if text == "<>":
        return text
    local, at, domain = text.rpartition("@")
    if not at:
        return text.lower().rstrip(".")
    domain = domain.lower().rstrip(".")
    if not local:
        return domain
    return f"{local.lower() if fold_local_part else local}@{domain}"


def _fold_network(
    network: Union[ipaddress.IPv4Network, ipaddress.IPv6Network],
) -> Union[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


def logical_lines(
    lines: Iterable[str], keep_whitespace: bool = False
) -> Iterator[tuple[int, str]]:
    """
    The logical lines of a Postfix table with their first line number:
    comments and blank lines dropped, a line starting with whitespace
    continuing the previous one.

    @param keep_whitespace: keep each physical line's whitespace, as
        Postfix's readllines does for regexp and pcre tables (a pattern
        that goes on over two lines keeps its exact text); by default a
        continuation is joined with one space, as in access maps.
    """
    start = 0
    pending: Optional[str] = None
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace() and pending is not None:
            pending += line if keep_whitespace else " " + stripped
            continue
        if pending is not None:
            yield start, pending.rstrip()
        start, pending = number, line if keep_whitespace else stripped
    if pending is not None:
        yield start, pending.rstrip()


class AccessMap:
    """
    A parsed access map: C{key action} lines, or C{key key action} lines
    for a pair table (first column × second column).

    @ivar table: the first column; its values are actions, or for a pair
        table the L{KeyTable} of the second column.
    @ivar pairs: whether this is a pair table.
    @ivar entries: the number of lines read.
    """

    def __init__(self, table: KeyTable[Any], pairs: bool, entries: int) -> None:
        self.table = table
        self.pairs = pairs
        self.entries = entries

    @classmethod
    def parse(
        cls,
        lines: Iterable[str],
        path: str = "<map>",
        pairs: bool = False,
        restriction_classes: Collection[str] = (),
        fold_local_part: bool = True,
    ) -> AccessMap:
        """
        Read a map from its lines.

        @raise MapError: naming the line of the first error.
        """
        table: KeyTable[Any] = KeyTable()
        actions: dict[str, Action] = {}
        columns = 2 if pairs else 1
        entries = 0
        for number, line in logical_lines(lines):
            fields = line.split(None, columns)
            if len(fields) <= columns:
                raise MapError(path, number, f"expected {columns + 1} fields: {line!r}")
            text = fields[columns]
            action = actions.get(text)
            if action is None:
                try:
                    action = Action.parse(text, restriction_classes)
                except ActionError as e:
                    raise MapError(path, number, str(e)) from None
                actions[text] = action
            try:
                keys = [parse_key(field, fold_local_part) for field in fields[:columns]]
            except ValueError as e:
                raise MapError(path, number, str(e)) from None
            if pairs:
                inner = table.get_or_add(keys[0], KeyTable)
                added = inner.add(keys[1], action)
            else:
                added = table.add(keys[0], action)
            if not added:
                shown = " ".join(fields[:columns])
                raise MapError(path, number, f"{shown!r} is listed twice")
            entries += 1
        return cls(table, pairs, entries)

    @classmethod
    def load(
        cls,
        path: str,
        pairs: bool = False,
        restriction_classes: Collection[str] = (),
        fold_local_part: bool = True,
    ) -> AccessMap:
        """
        Read the map in the file at C{path} (UTF-8).

        @raise MapError: when it cannot be read or has an error.
        """
        try:
            with open(path, encoding="utf-8") as f:
                return cls.parse(f, path, pairs, restriction_classes, fold_local_part)
        except OSError as e:
            raise MapError(path, None, f"cannot read: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise MapError(path, None, f"not UTF-8: {e.reason}") from None

    def actions(self) -> Iterator[Action]:
        """
        Every entry's action (for C{--check-config}'s stage warnings).
        """
        if not self.pairs:
            yield from self.table.values()
            return
        for inner in self.table.values():
            yield from inner.values()

    def lookup(
        self, keys: Sequence[LookupKey], second: Sequence[LookupKey] = ()
    ) -> Optional[Action]:
        """
        The action for the first of C{keys} that matches (for a pair table:
        the first combination of C{keys} × C{second}, first column major),
        or L{None}.
        """
        if not self.pairs:
            for key in keys:
                for action in self.table.match(key):
                    return action
            return None
        for key in keys:
            for inner in self.table.match(key):
                for other in second:
                    for action in inner.match(other):
                        return action
        return None
