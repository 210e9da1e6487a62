"""
The key lists of the C{sql} check: the expansions access maps do (the
client address's enclosing networks, a name's parent domains), as lists of
strings bound to a query's C{:name_keys} parameter, most specific first, so
that one portable query matches C{192.0.2.0/24} rows and C{example.com}
rows on SQLite, PostgreSQL and MySQL alike.

  - an IP address (C{client_address_keys}, C{client_ip_keys},
    C{server_address_keys}): the address (IPv4-mapped IPv6 folded to IPv4),
    then every network holding it in CIDR form, longest prefix first, from
    C{192.0.2.10/32} to C{0.0.0.0/0} (34 keys; 130 for IPv6); none when
    Postfix sent no address;
  - a host name or domain (C{client_name_keys}, C{helo_name_keys},
    C{sender_domain_keys}, ...): the name, lowercased, then its parent
    domains without a leading dot (C{mail.example.com}, C{example.com},
    C{com}); none for an empty or C{unknown} name;
  - an address (C{sender_keys}, C{recipient_keys}, C{sasl_sender_keys}):
    access(5) order, C{user@domain}, the domain and its parents, C{user@},
    lowercased; C{<>} for the null sender;
  - C{sender_at_domain_keys}, C{recipient_at_domain_keys}: the domain and
    its parents written C{@example.com}, as the relay ACL's table keeps
    them; none for the null sender.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from pfxpold.accessmap import ATTRIBUTE_KINDS, attribute_value, lookup_key
from pfxpold.request import PolicyRequest, parse_ip

#: A query names a key list as C{:<attribute>_keys}.
LIST_SUFFIX = "_keys"
#: ... and its ordering helper as C{:<attribute>_keys_rank(column)}.
RANK_SUFFIX = "_keys_rank"

#: At most this many parent domains: a DNS name has at most 127 labels,
#: and a longer (hostile) name must not make a query with thousands of
#: placeholders. The least specific parents are kept, so that a row for
#: example.com cannot be escaped by adding labels in front of it.
MAX_PARENT_DOMAINS = 127


def network_keys(value: Optional[str]) -> list[str]:
    """
    The address, then every network holding it, longest prefix first.
    """
    address = parse_ip(value or "")
    if address is None:
        return []
    keys = [str(address)]
    number = int(address)
    bits = address.max_prefixlen
    kind = type(address)
    for prefix in range(bits, -1, -1):
        host_bits = bits - prefix
        keys.append(f"{kind(number >> host_bits << host_bits)}/{prefix}")
    return keys


def _bounded(domains: list[str]) -> list[str]:
    if len(domains) <= MAX_PARENT_DOMAINS + 1:
        return domains
    return [domains[0]] + domains[-MAX_PARENT_DOMAINS:]


def _name_keys(attribute: str) -> Callable[[PolicyRequest], list[str]]:
    def keys(request: PolicyRequest) -> list[str]:
        return _bounded(list(lookup_key(request, attribute, "implicit").names))

    return keys


def _address_keys(attribute: str) -> Callable[[PolicyRequest], list[str]]:
    def keys(request: PolicyRequest) -> list[str]:
        found = list(lookup_key(request, attribute, "implicit").names)
        if len(found) < 3 or "@" not in found[0]:
            return found
        return [found[0], *_bounded(found[1:-1]), found[-1]]

    return keys


def _ip_keys(attribute: str) -> Callable[[PolicyRequest], list[str]]:
    def keys(request: PolicyRequest) -> list[str]:
        return network_keys(attribute_value(request, attribute))

    return keys


def _at_domain_keys(attribute: str) -> Callable[[PolicyRequest], list[str]]:
    def keys(request: PolicyRequest) -> list[str]:
        return ["@" + name for name in _name_keys(attribute)(request)]

    return keys


def _key_lists() -> dict[str, tuple[str, Callable[[PolicyRequest], list[str]]]]:
    makers = {"ip": _ip_keys, "host": _name_keys, "domain": _name_keys, "address": _address_keys}
    lists = {
        attribute + LIST_SUFFIX: (attribute, makers[kind](attribute))
        for attribute, kind in ATTRIBUTE_KINDS.items()
    }
    for side in ("sender", "recipient"):
        lists[f"{side}_at_domain{LIST_SUFFIX}"] = (
            f"{side}_domain",
            _at_domain_keys(f"{side}_domain"),
        )
    return lists


#: Each key list's name: the attribute it is derived from (whose value
#: identifies the list, for the cache) and how.
KEY_LISTS = _key_lists()


def check_key_list(name: str) -> None:
    """
    @raise ValueError: when C{name} is not a key list.
    """
    if name not in KEY_LISTS:
        raise ValueError(
            f"{name!r} is not a key list; key lists are {', '.join(sorted(KEY_LISTS))}"
        )
