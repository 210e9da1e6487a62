"""
One policy request as Postfix sent it: an immutable mapping of attribute
names to values, with typed helpers for the attributes checks use most.

Values keep the case Postfix sent. Only the helpers that return a domain
lowercase it, because domains compare case-insensitively and local parts,
in theory, do not.
"""

from __future__ import annotations

import ipaddress
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any, Optional, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _domain_of(address: str) -> str:
    """
    The lowercased domain part of an e-mail address, or C{""} when it has
    none.
    """
    at = address.rfind("@")
    if at < 0:
        return ""
    return address[at + 1 :].lower()


def _local_part_of(address: str) -> str:
    """
    The local part of an e-mail address, case preserved; the whole address
    when it has no C{@}.
    """
    at = address.rfind("@")
    if at < 0:
        return address
    return address[:at]


def _to_int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


def client_network(address: IPAddress, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> str:
    """
    The network a client address is counted, greylisted or looked up by:
    every check that groups clients by network derives it here.

    @param address: the client address, IPv4-mapped IPv6 already folded
        (as L{parse_ip} and L{PolicyRequest.client_ip} give it).
    @param ipv4_prefix: the prefix length for an IPv4 address (0-32).
    @param ipv6_prefix: the prefix length for an IPv6 address (0-128).
    @return: the network in its canonical text form, C{"192.0.2.0/24"},
        C{"2001:db8::/64"}.
    """
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    host_bits = address.max_prefixlen - prefix
    network = type(address)(int(address) >> host_bits << host_bits)
    return f"{network}/{prefix}"


def parse_ip(value: str) -> Optional[IPAddress]:
    """
    Parse a client address as Postfix sends it.

    IPv4-mapped IPv6 addresses are folded to IPv4, so that one rule covers a
    client however the socket presented it.

    @return: an L{ipaddress} address, or L{None} when C{value} is not one
        (for example C{"unknown"} or an empty string).
    """
    if not value:
        return None
    if value.startswith("["):
        value = value.strip("[]")
    if value[:5].lower() == "ipv6:":
        value = value[5:]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class PolicyRequest(Mapping[str, str]):
    """
    The attributes of one policy request.

    It behaves as a read-only mapping, so C{request["sender"]},
    C{request.get("tls_sni", "")} and iteration work, and attributes that a
    newer Postfix adds are there too. A missing attribute reads as C{""}
    through the helpers, the way Postfix sends an unknown value.
    """

    __slots__ = ("_attributes",)
    _attributes: dict[str, str]

    def __init__(self, attributes: Mapping[str, str]) -> None:
        object.__setattr__(self, "_attributes", dict(attributes))

    @classmethod
    def adopt(cls, attributes: dict[str, str]) -> PolicyRequest:
        """
        A request holding C{attributes} itself rather than a copy: for the
        protocol, which builds a new dictionary for every request and gives
        it up. Nobody may change the dictionary afterwards.
        """
        request = cls.__new__(cls)
        object.__setattr__(request, "_attributes", attributes)
        return request

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PolicyRequest is immutable")

    @property
    def attributes(self) -> dict[str, str]:
        """
        The request's own dictionary, for code that reads many attributes
        per request (a dictionary's C{get} and subscript are C calls; this
        mapping's are Python calls). Read it; never change it.
        """
        return self._attributes

    def __getitem__(self, name: str) -> str:
        return self._attributes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._attributes)

    def __len__(self) -> int:
        return len(self._attributes)

    # The dictionary's own views and get: Mapping's versions go through
    # __getitem__ (and an exception for every absent attribute), and checks
    # read attributes on every request.

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self._attributes.get(name, default)

    def keys(self) -> KeysView[str]:
        return self._attributes.keys()

    def values(self) -> ValuesView[str]:
        return self._attributes.values()

    def items(self) -> ItemsView[str, str]:
        return self._attributes.items()

    def __repr__(self) -> str:
        return f"PolicyRequest({self._attributes!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PolicyRequest):
            return self._attributes == other._attributes
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._attributes.items()))

    def summary(self) -> str:
        """
        The request as one log line shows it: stage, client, HELO name,
        envelope and queue id.
        """
        get = self._attributes.get
        return (
            f"{get('protocol_state', '').upper()} {get('client_name', '')}"
            f"[{get('client_address', '')}] helo=<{get('helo_name', '')}>"
            f" from=<{get('sender', '')}> to=<{get('recipient', '')}>"
            f" instance={get('instance', '')} queue_id={get('queue_id', '')}"
        )

    def replace(self, **changes: str) -> PolicyRequest:
        """
        A copy of this request with some attributes changed or added.
        """
        attributes = dict(self._attributes)
        attributes.update(changes)
        return PolicyRequest(attributes)

    def _value(self, name: str) -> str:
        return self._attributes.get(name, "")

    @property
    def request(self) -> str:
        """The request type, C{smtpd_access_policy} from Postfix."""
        return self._value("request")

    @property
    def protocol_state(self) -> str:
        """The SMTP stage, uppercased: C{RCPT}, C{DATA}, C{END-OF-MESSAGE}..."""
        return self._value("protocol_state").upper()

    @property
    def protocol_name(self) -> str:
        return self._value("protocol_name")

    @property
    def instance(self) -> str:
        """The same for every request of one message on one connection."""
        return self._value("instance")

    @property
    def queue_id(self) -> str:
        return self._value("queue_id")

    @property
    def helo_name(self) -> str:
        return self._value("helo_name")

    @property
    def sender(self) -> str:
        """The envelope sender; C{""} for the null sender C{<>}."""
        return self._value("sender")

    @property
    def sender_domain(self) -> str:
        """The sender's domain, lowercased; C{""} when there is none."""
        return _domain_of(self._value("sender"))

    @property
    def sender_local_part(self) -> str:
        return _local_part_of(self._value("sender"))

    @property
    def recipient(self) -> str:
        return self._value("recipient")

    @property
    def recipient_domain(self) -> str:
        """The recipient's domain, lowercased; C{""} when there is none."""
        return _domain_of(self._value("recipient"))

    @property
    def recipient_local_part(self) -> str:
        return _local_part_of(self._value("recipient"))

    @property
    def client_address(self) -> str:
        return self._value("client_address")

    @property
    def client_ip(self) -> Optional[IPAddress]:
        """
        The client address as an L{ipaddress} object, IPv4-mapped IPv6
        folded to IPv4, or L{None} when Postfix did not send a valid one.
        """
        return parse_ip(self._value("client_address"))

    @property
    def client_name(self) -> str:
        """The verified client host name, C{"unknown"} when unresolved."""
        return self._value("client_name")

    @property
    def reverse_client_name(self) -> str:
        return self._value("reverse_client_name")

    @property
    def sasl_username(self) -> str:
        return self._value("sasl_username")

    @property
    def sasl_method(self) -> str:
        return self._value("sasl_method")

    @property
    def recipient_count(self) -> int:
        """Accepted recipients at DATA and END-OF-MESSAGE; 0 at RCPT."""
        return _to_int(self._value("recipient_count"))

    @property
    def size(self) -> int:
        """The MAIL FROM SIZE= value, or the real size at END-OF-MESSAGE."""
        return _to_int(self._value("size"))

    @property
    def stress(self) -> bool:
        """C{True} when Postfix says it is overloaded: run cheap checks only."""
        return self._value("stress").lower() == "yes"
