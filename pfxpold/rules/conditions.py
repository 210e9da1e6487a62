"""
The conditions of a rule: a rule's C{if} table compiled, once, into
matchers that test a request.

A condition table names attributes (the request's own and the values
pfxpold derives from them) and what each must be::

    if = { client_address = "192.0.2.0/24", sender_domain = { not = "apps.example" } }

A plain value is equality (a list: any of its values; for an IP attribute,
addresses and CIDR networks); a table of operators says more (C{is}, C{in},
C{in_file}, C{domain}, C{regex}, C{gt}, C{ge}, C{lt}, C{le}, C{present},
C{same_as}, C{not}); C{all}, C{any}, C{not} group conditions, and
C{marked} tests a mark an earlier request of the same message left.

Strings compare without regard to case, as Postfix compares addresses,
domains and host names; domains and host names also without a trailing
dot. Regular expressions run in RE2 (L{pfxpold.regex}), whose time is
linear in the text whatever the pattern: the HELO name and the addresses
are chosen by whoever connects.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

from pfxpold.accessmap import DERIVED_ATTRIBUTES, POSTFIX_ATTRIBUTES, attribute_value
from pfxpold.escape import escape
from pfxpold.regex import PatternError, compile_pattern
from pfxpold.request import IPAddress, PolicyRequest, parse_ip

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Values the rules derive besides those of L{pfxpold.accessmap}.
RULE_DERIVED = frozenset({"sasl_domain"})

#: Every attribute a rule may name without a warning.
KNOWN_ATTRIBUTES = POSTFIX_ATTRIBUTES | DERIVED_ATTRIBUTES | RULE_DERIVED

#: Keys of a condition table that are not attributes.
GROUP_KEYS = ("all", "any", "not", "marked")

#: The operators of an attribute's table.
OPERATORS = (
    "is",
    "in",
    "in_file",
    "domain",
    "regex",
    "gt",
    "ge",
    "lt",
    "le",
    "present",
    "same_as",
    "not",
)

#: Attributes whose value is (or ends in) a domain: compared without a
#: trailing dot, and C{domain} tests their domain.
_ADDRESSES = frozenset({"sender", "recipient", "sasl_sender", "sasl_username"})
_DOMAINS = frozenset(
    {
        "sender_domain",
        "recipient_domain",
        "etrn_domain",
        "sasl_domain",
        "client_name",
        "reverse_client_name",
        "helo_name",
        "tls_sni",
    }
)
#: The request attribute each derived value is made from: a derived value
#: is a function of that one attribute's value (which the index relies on).
SOURCES = {
    "sender_domain": "sender",
    "sender_local_part": "sender",
    "sender_at_domain": "sender",
    "recipient_domain": "recipient",
    "recipient_local_part": "recipient",
    "recipient_at_domain": "recipient",
    "client_ip": "client_address",
    "client_network": "client_address",
    "sasl_domain": "sasl_username",
}
#: Attributes holding an IP address: C{is} and C{in} take networks.
IP_ATTRIBUTES = frozenset({"client_address", "server_address", "client_ip"})

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_MARK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RuleError(ValueError):
    """
    A rule cannot be compiled; the message says which and why.
    """


def check_mark_name(value: Any) -> str:
    """
    @return: C{value}, a valid mark name.
    @raise RuleError: when it is not one.
    """
    if not isinstance(value, str) or not _MARK.fullmatch(value):
        raise RuleError(
            f"a mark name is 1-64 letters, digits, '.', '_' or '-', not {value!r}"
        )
    return value


def _domain_of(value: str) -> str:
    at = value.rfind("@")
    return "" if at < 0 else value[at + 1 :]


class Attribute:
    """
    How one attribute is read from a request and folded for comparison.

    @ivar name: the attribute's name.
    @ivar is_ip: whether it holds an IP address.
    @ivar known: whether Postfix sends it or pfxpold derives it.
    @ivar source: the request attribute its value is made from: its own
        name, or the one a derived value is made from (C{sender} for
        C{sender_domain}).
    """

    __slots__ = ("name", "is_ip", "known", "source", "get", "get_folded", "_strip_dot", "_address")

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_ip = name in IP_ATTRIBUTES
        self.known = name in KNOWN_ATTRIBUTES
        self.source = SOURCES.get(name, name)
        self._strip_dot = name in _DOMAINS
        self._address = name in _ADDRESSES
        self.get = self._getter(name)
        self.get_folded = self._folded_getter(name, self.get)

    def _folded_getter(
        self, name: str, get: Callable[[PolicyRequest], str]
    ) -> Callable[[PolicyRequest], str]:
        # One call per value on the hot path, not three.
        derived = name in DERIVED_ATTRIBUTES or name in RULE_DERIVED
        if name in ("sender_domain", "recipient_domain"):
            source = name.partition("_")[0]
            return lambda request: _domain_of(request.get(source, "")).lower().rstrip(".")
        if self._strip_dot and derived:
            return lambda request: get(request).lower().rstrip(".")
        if self._strip_dot:
            return lambda request: request.get(name, "").lower().rstrip(".")
        if derived:
            return lambda request: get(request).lower()
        return lambda request: request.get(name, "").lower()

    @staticmethod
    def _getter(name: str) -> Callable[[PolicyRequest], str]:
        if name == "sasl_domain":
            return lambda request: _domain_of(request.get("sasl_username", "")).lower()
        if name in ("sender_domain", "recipient_domain"):
            # As PolicyRequest's own properties, in one call.
            source = name.partition("_")[0]
            return lambda request: _domain_of(request.get(source, "")).lower()
        if name in DERIVED_ATTRIBUTES:
            return lambda request: attribute_value(request, name) or ""
        return lambda request: request.get(name, "")

    def fold(self, value: str) -> str:
        """
        C{value} as it is compared: lowercased, and a domain or host name
        without its trailing dot.
        """
        value = value.lower()
        if self._strip_dot:
            return value.rstrip(".")
        return value

    def domain(self, value: str) -> str:
        """
        The domain C{domain} tests in C{value}: an address's domain part,
        or the (folded) name itself.
        """
        if self._address:
            return _domain_of(value).lower().rstrip(".")
        return value.lower().rstrip(".")


_PARSED: dict[str, Optional[IPAddress]] = {}
_PARSED_SIZE = 8192
_UNPARSED = object()


class Facts:
    """
    One request as the conditions see it: attribute values read and
    folded at most once, and the message's marks.

    @ivar marks: the marks of the message (L{None} until read from the
        store), and those this request's rules set.
    """

    __slots__ = ("request", "values", "_ips", "marks")

    def __init__(self, request: PolicyRequest, marks: Optional[set[str]] = None) -> None:
        self.request = request
        #: Folded values by attribute name, as read so far.
        self.values: dict[str, str] = {}
        self._ips: dict[str, Optional[IPAddress]] = {}
        self.marks = marks

    def raw(self, attribute: Attribute) -> str:
        return attribute.get(self.request)

    def folded(self, attribute: Attribute) -> str:
        value = self.values.get(attribute.name)
        if value is None:
            value = self.values[attribute.name] = attribute.get_folded(self.request)
        return value

    def ip(self, attribute: Attribute) -> Optional[IPAddress]:
        name = attribute.name
        if name in self._ips:
            return self._ips[name]
        value = attribute.get(self.request)
        ip = _PARSED.get(value, _UNPARSED)
        if ip is _UNPARSED:
            # Parsing an address costs more than the rest of a lookup, and
            # clients come back: remember the last few thousand.
            if len(_PARSED) >= _PARSED_SIZE:
                _PARSED.clear()
            ip = _PARSED[value] = parse_ip(value)
        self._ips[name] = ip  # type: ignore[assignment]
        return ip  # type: ignore[return-value]


class NetworkTable:
    """
    Networks by prefix length, so that finding those holding an address
    costs one dict access per distinct length, whatever their number.
    Each network carries a value; L{lookup} gives the values of every
    network that holds the address.
    """

    __slots__ = ("_lengths", "_tables")

    def __init__(self) -> None:
        #: (version, prefix length) -> {network address as int: values}
        self._lengths: dict[tuple[int, int], dict[int, Any]] = {}
        self._tables: list[tuple[int, int, dict[int, Any]]] = []

    def add(self, network: Network, value: Any, combine: Callable[[Any, Any], Any]) -> None:
        if (network.version, network.prefixlen) not in self._lengths:
            table: dict[int, Any] = {}
            self._lengths[(network.version, network.prefixlen)] = table
            self._tables.append((network.version, network.prefixlen, table))
        table = self._lengths[(network.version, network.prefixlen)]
        key = int(network.network_address)
        table[key] = combine(table[key], value) if key in table else value

    def mask(self, ip: IPAddress) -> int:
        """
        The values (bits) of every network holding C{ip}, ORed together.
        """
        number = int(ip)
        bits = 32 if ip.version == 4 else 128
        found = 0
        for version, length, table in self._tables:
            if version == ip.version:
                shift = bits - length
                found |= table.get((number >> shift) << shift, 0)
        return found

    def lookup(self, ip: IPAddress) -> Iterable[Any]:
        number = int(ip)
        version = ip.version
        bits = 32 if version == 4 else 128
        for (table_version, length), table in self._lengths.items():
            if table_version != version:
                continue
            shift = bits - length
            found = table.get((number >> shift) << shift)
            if found is not None:
                yield found

    def __bool__(self) -> bool:
        return bool(self._lengths)


def parse_network(value: str) -> Network:
    """
    An address or CIDR network as a rule writes it (C{192.0.2.0/24},
    C{2001:db8::/32}, C{192.0.2.10}); an IPv4-mapped IPv6 network is folded
    to IPv4, as client addresses are.

    @raise RuleError: when it is neither, or has host bits set.
    """
    try:
        network = ipaddress.ip_network(value.strip().strip("[]"), strict=True)
    except ValueError as e:
        raise RuleError(f"{value!r} is not an IP address or network: {e}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
        mapped = network.network_address.ipv4_mapped
        network = ipaddress.ip_network(f"{mapped}/{max(network.prefixlen - 96, 0)}")
    return network


class ValueList:
    """
    A list of values a C{in} or C{in_file} condition tests: folded strings,
    or networks for an IP attribute.
    """

    __slots__ = ("names", "networks", "size")

    def __init__(self, attribute: Attribute, values: Iterable[str]) -> None:
        self.names: frozenset[str] = frozenset()
        self.networks = NetworkTable()
        self.size = 0
        names = set()
        for value in values:
            self.size += 1
            if attribute.is_ip:
                self.networks.add(parse_network(value), True, lambda old, new: True)
            else:
                names.add(attribute.fold(value))
        self.names = frozenset(names)

    def holds(self, facts: Facts, attribute: Attribute) -> bool:
        if attribute.is_ip:
            ip = facts.ip(attribute)
            return ip is not None and any(True for _ in self.networks.lookup(ip))
        return facts.folded(attribute) in self.names


def read_list_file(path: str) -> list[str]:
    """
    The values of a list file: one a line, C{#} comments and blank lines
    skipped.

    @raise RuleError: when it cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    values = []
    for line in lines:
        value = line.split("#", 1)[0].strip()
        if value:
            values.append(value)
    return values


class Condition:
    """
    A compiled condition.

    @ivar needs_marks: whether it tests marks.
    @ivar key: a hashable form of it: two conditions with the same key
        hold for the same requests.
    """

    needs_marks = False
    key: Any = None

    def test(self, facts: Facts) -> bool:
        raise NotImplementedError()

    def describe(self) -> str:
        raise NotImplementedError()

    def why_not(self, facts: Facts) -> Optional[str]:
        """
        @return: L{None} when the condition holds, else what failed.
        """
        if self.test(facts):
            return None
        return self.failure(facts)

    def failure(self, facts: Facts) -> str:
        seen = self.seen(facts)
        return f"{self.describe()}: {seen}" if seen else self.describe()

    def seen(self, facts: Facts) -> str:
        """What the request holds that the condition looked at."""
        return ""

    def attributes(self) -> Iterable[Attribute]:
        return ()

    def conjuncts(self) -> tuple[Condition, ...]:
        """The conditions that must all hold: itself, or an C{all}'s parts."""
        return (self,)

    def implies(self, other: Condition) -> bool:
        """
        Whether every request this condition holds for also satisfies
        C{other} (C{False} when it cannot tell).
        """
        return self.key == other.key


def _shown(value: str) -> str:
    return repr(escape(value)) if len(value) <= 80 else repr(escape(value[:77]) + "...")


class _AttributeCondition(Condition):
    attribute: Attribute

    def attributes(self) -> Iterable[Attribute]:
        return (self.attribute,)

    def seen(self, facts: Facts) -> str:
        return f"{self.attribute.name} is {_shown(facts.raw(self.attribute))}"


class Equals(_AttributeCondition):
    """The folded value is one of a set of values."""

    __slots__ = ("attribute", "values", "written", "key")

    def __init__(self, attribute: Attribute, values: Iterable[str]) -> None:
        self.attribute = attribute
        self.written = tuple(values)
        self.values = frozenset(attribute.fold(value) for value in self.written)
        self.key = ("is", attribute.name, self.values)

    def test(self, facts: Facts) -> bool:
        return facts.folded(self.attribute) in self.values

    def describe(self) -> str:
        if len(self.written) == 1:
            return f"{self.attribute.name} is {_shown(self.written[0])}"
        shown = ", ".join(self.written[:5])
        more = ", ..." if len(self.written) > 5 else ""
        return f"{self.attribute.name} in [{shown}{more}]"

    def implies(self, other: Condition) -> bool:
        if isinstance(other, Equals) and other.attribute.name == self.attribute.name:
            return self.values <= other.values
        return self.key == other.key


class InNetworks(_AttributeCondition):
    """The IP address is in one of a list of networks."""

    __slots__ = ("attribute", "networks", "table", "key")

    def __init__(self, attribute: Attribute, networks: list[Network]) -> None:
        self.attribute = attribute
        self.networks = tuple(networks)
        self.table = NetworkTable()
        for network in networks:
            self.table.add(network, 1, int.__or__)
        self.key = ("in", attribute.name, frozenset(self.networks))

    def test(self, facts: Facts) -> bool:
        ip = facts.ip(self.attribute)
        return ip is not None and self.table.mask(ip) != 0

    def describe(self) -> str:
        shown = ", ".join(str(network) for network in self.networks[:5])
        more = ", ..." if len(self.networks) > 5 else ""
        return f"{self.attribute.name} in {shown}{more}"

    def implies(self, other: Condition) -> bool:
        if isinstance(other, InNetworks) and other.attribute.name == self.attribute.name:
            return all(
                any(
                    mine.version == theirs.version and mine.subnet_of(theirs)  # type: ignore[arg-type]
                    for theirs in other.networks
                )
                for mine in self.networks
            )
        return self.key == other.key


class InFile(_AttributeCondition):
    """The value is in a list file (read again when the file changes)."""

    __slots__ = ("attribute", "path", "values", "key")

    def __init__(self, attribute: Attribute, path: str, values: ValueList) -> None:
        self.attribute = attribute
        self.path = path
        self.values = values
        self.key = ("in_file", attribute.name, path)

    def test(self, facts: Facts) -> bool:
        return self.values.holds(facts, self.attribute)

    def describe(self) -> str:
        return f"{self.attribute.name} in {self.path} ({self.values.size} values)"


class InDomain(_AttributeCondition):
    """The (address's) domain is one of some domains or below one."""

    __slots__ = ("attribute", "domains", "key")

    def __init__(self, attribute: Attribute, domains: Iterable[str]) -> None:
        self.attribute = attribute
        self.domains = frozenset(domain.lower().strip(".") for domain in domains)
        self.key = ("domain", attribute.name, self.domains)

    def test(self, facts: Facts) -> bool:
        name = self.attribute.domain(facts.raw(self.attribute))
        if not name:
            return False
        domains = self.domains
        while True:
            if name in domains:
                return True
            dot = name.find(".")
            if dot < 0:
                return False
            name = name[dot + 1 :]

    def describe(self) -> str:
        shown = ", ".join(sorted(self.domains)[:5])
        return f"{self.attribute.name} in domain {shown} or below"

    def implies(self, other: Condition) -> bool:
        if isinstance(other, InDomain) and other.attribute.name == self.attribute.name:
            return all(
                any(mine == theirs or mine.endswith("." + theirs) for theirs in other.domains)
                for mine in self.domains
            )
        return self.key == other.key


class Matches(_AttributeCondition):
    """A regular expression (RE2) finds a match in the value."""

    __slots__ = ("attribute", "patterns", "compiled", "key")

    def __init__(self, attribute: Attribute, patterns: list[str]) -> None:
        self.attribute = attribute
        self.patterns = tuple(patterns)
        compiled = []
        for pattern in patterns:
            try:
                # As Postfix's regexp tables: case does not matter unless
                # the pattern says (?-i).
                compiled.append(compile_pattern(pattern, ignore_case=True))
            except PatternError as e:
                raise RuleError(f"regex {pattern!r}: RE2 cannot compile it: {e}") from None
        self.compiled = tuple(compiled)
        self.key = ("regex", attribute.name, self.patterns)

    def test(self, facts: Facts) -> bool:
        value = facts.raw(self.attribute)
        for pattern in self.compiled:
            if pattern.search(value) is not None:
                return True
        return False

    def describe(self) -> str:
        return f"{self.attribute.name} matches {' or '.join(map(repr, self.patterns))}"


_COMPARISONS: dict[str, tuple[str, Callable[[int, int], bool]]] = {
    "gt": (">", lambda value, limit: value > limit),
    "ge": (">=", lambda value, limit: value >= limit),
    "lt": ("<", lambda value, limit: value < limit),
    "le": ("<=", lambda value, limit: value <= limit),
    "eq": ("=", lambda value, limit: value == limit),
}


class Compare(_AttributeCondition):
    """A number compared with a limit; a value that is not a number fails."""

    __slots__ = ("attribute", "operator", "limit", "compare", "key")

    def __init__(self, attribute: Attribute, operator: str, limit: int) -> None:
        self.attribute = attribute
        self.operator = operator
        self.limit = limit
        self.compare = _COMPARISONS[operator][1]
        self.key = (operator, attribute.name, limit)

    def test(self, facts: Facts) -> bool:
        value = facts.raw(self.attribute)
        try:
            number = int(value)
        except ValueError:
            return False
        return self.compare(number, self.limit)

    def describe(self) -> str:
        return f"{self.attribute.name} {_COMPARISONS[self.operator][0]} {self.limit}"


class Present(_AttributeCondition):
    """The attribute has a value (Postfix sends an unknown one empty)."""

    __slots__ = ("attribute", "wanted", "key")

    def __init__(self, attribute: Attribute, wanted: bool) -> None:
        self.attribute = attribute
        self.wanted = wanted
        self.key = ("present", attribute.name, wanted)

    def test(self, facts: Facts) -> bool:
        return bool(facts.raw(self.attribute)) is self.wanted

    def describe(self) -> str:
        return f"{self.attribute.name} is {'present' if self.wanted else 'empty'}"


class SameAs(_AttributeCondition):
    """Two attributes are equal (folded; IP addresses as addresses)."""

    __slots__ = ("attribute", "other", "key")

    def __init__(self, attribute: Attribute, other: Attribute) -> None:
        self.attribute = attribute
        self.other = other
        self.key = ("same_as",) + tuple(sorted((attribute.name, other.name)))

    def attributes(self) -> Iterable[Attribute]:
        return (self.attribute, self.other)

    def test(self, facts: Facts) -> bool:
        if self.attribute.is_ip and self.other.is_ip:
            return facts.ip(self.attribute) == facts.ip(self.other)
        return facts.folded(self.attribute) == facts.folded(self.other)

    def describe(self) -> str:
        return f"{self.attribute.name} is the same as {self.other.name}"

    def seen(self, facts: Facts) -> str:
        return (
            f"{self.attribute.name} is {_shown(facts.raw(self.attribute))},"
            f" {self.other.name} is {_shown(facts.raw(self.other))}"
        )


class Marked(Condition):
    """The message carries one of some marks."""

    __slots__ = ("names", "key")
    needs_marks = True

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        self.key = ("marked", self.names)

    def test(self, facts: Facts) -> bool:
        marks = facts.marks
        return bool(marks) and not self.names.isdisjoint(marks)  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"marked {' or '.join(sorted(self.names))}"

    def seen(self, facts: Facts) -> str:
        marks = ", ".join(sorted(facts.marks or ())) or "no marks"
        return f"the message has {marks}"


class Not(Condition):
    __slots__ = ("part", "key", "needs_marks")

    def __init__(self, part: Condition) -> None:
        self.part = part
        self.key = ("not", part.key)
        self.needs_marks = part.needs_marks

    def test(self, facts: Facts) -> bool:
        return not self.part.test(facts)

    def describe(self) -> str:
        return f"not ({self.part.describe()})"

    def seen(self, facts: Facts) -> str:
        return self.part.seen(facts) or "it holds"

    def attributes(self) -> Iterable[Attribute]:
        return self.part.attributes()


class All(Condition):
    __slots__ = ("parts", "key", "needs_marks")

    def __init__(self, parts: list[Condition]) -> None:
        self.parts = tuple(parts)
        self.key = ("all", frozenset(part.key for part in parts))
        self.needs_marks = any(part.needs_marks for part in parts)

    def test(self, facts: Facts) -> bool:
        for part in self.parts:
            if not part.test(facts):
                return False
        return True

    def why_not(self, facts: Facts) -> Optional[str]:
        for part in self.parts:
            reason = part.why_not(facts)
            if reason is not None:
                return reason
        return None

    def describe(self) -> str:
        return " and ".join(part.describe() for part in self.parts)

    def attributes(self) -> Iterable[Attribute]:
        for part in self.parts:
            yield from part.attributes()

    def conjuncts(self) -> tuple[Condition, ...]:
        return tuple(c for part in self.parts for c in part.conjuncts())


class AnyOf(Condition):
    __slots__ = ("parts", "key", "needs_marks")

    def __init__(self, parts: list[Condition]) -> None:
        self.parts = tuple(parts)
        self.key = ("any", frozenset(part.key for part in parts))
        self.needs_marks = any(part.needs_marks for part in parts)

    def test(self, facts: Facts) -> bool:
        for part in self.parts:
            if part.test(facts):
                return True
        return False

    def describe(self) -> str:
        return "any of (" + "; ".join(part.describe() for part in self.parts) + ")"

    def failure(self, facts: Facts) -> str:
        reasons = [part.why_not(facts) or part.describe() for part in self.parts]
        return "none of (" + "; ".join(reasons) + ")"

    def attributes(self) -> Iterable[Attribute]:
        for part in self.parts:
            yield from part.attributes()


class Compiler:
    """
    Turns condition tables into L{Condition}s.

    @param base_directory: where relative C{in_file} paths are found.
    @param lists: list files already read, by (path, IP or not), shared
        between the rules that name the same file.
    """

    def __init__(self, base_directory: str, lists: dict[tuple[str, bool], ValueList]) -> None:
        self.base_directory = base_directory
        self.lists = lists
        self._attributes: dict[str, Attribute] = {}

    def attribute(self, name: Any) -> Attribute:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RuleError(f"{name!r} is not an attribute name")
        found = self._attributes.get(name)
        if found is None:
            found = self._attributes[name] = Attribute(name)
        return found

    def table(self, table: Any) -> Condition:
        """
        Compile a condition table: every entry must hold.
        """
        if not isinstance(table, Mapping):
            raise RuleError(f"a condition must be a table, not {table!r}")
        if not table:
            raise RuleError("an empty condition table; leave 'if' out for a rule that always applies")
        parts = [self._entry(key, value) for key, value in table.items()]
        return parts[0] if len(parts) == 1 else All(parts)

    def _group(self, key: str, value: Any) -> list[Condition]:
        if isinstance(value, Mapping):
            value = [value]
        if not isinstance(value, list) or not value:
            raise RuleError(f"{key!r} takes a list of condition tables, not {value!r}")
        return [self.table(item) for item in value]

    def _entry(self, key: str, value: Any) -> Condition:
        if key == "all":
            parts = self._group(key, value)
            return parts[0] if len(parts) == 1 else All(parts)
        if key == "any":
            return AnyOf(self._group(key, value))
        if key == "not":
            parts = self._group(key, value)
            return Not(parts[0] if len(parts) == 1 else All(parts))
        if key == "marked":
            names = value if isinstance(value, list) else [value]
            if not names:
                raise RuleError("'marked' needs a mark name")
            return Marked(check_mark_name(name) for name in names)
        attribute = self.attribute(key)
        if isinstance(value, Mapping):
            if not value:
                raise RuleError(f"{key}: an empty table of operators")
            parts = [self._operator(attribute, operator, argument) for operator, argument in value.items()]
            return parts[0] if len(parts) == 1 else All(parts)
        return self._operator(attribute, "is", value)

    def _strings(self, attribute: Attribute, operator: str, value: Any) -> list[str]:
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(item, str) for item in values):
            raise RuleError(
                f"{attribute.name}: {operator!r} takes a string or a list of strings, not {value!r}"
            )
        return values

    def _number(self, attribute: Attribute, operator: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise RuleError(f"{attribute.name}: {operator!r} takes a whole number, not {value!r}")
        return value

    def _operator(self, attribute: Attribute, operator: str, value: Any) -> Condition:
        name = attribute.name
        if operator in ("is", "in"):
            if isinstance(value, int) and not isinstance(value, bool):
                return Compare(attribute, "eq", value)
            values = self._strings(attribute, operator, value)
            if attribute.is_ip:
                return InNetworks(attribute, [parse_network(item) for item in values])
            return Equals(attribute, values)
        if operator == "in_file":
            if not isinstance(value, str) or not value:
                raise RuleError(f"{name}: 'in_file' takes a file name, not {value!r}")
            path = os.path.join(self.base_directory, os.path.expanduser(value))
            key = (path, attribute.is_ip)
            found = self.lists.get(key)
            if found is None:
                try:
                    found = self.lists[key] = ValueList(attribute, read_list_file(path))
                except RuleError as e:
                    raise RuleError(f"{name}: 'in_file': {e}") from None
            return InFile(attribute, path, found)
        if operator == "domain":
            return InDomain(attribute, self._strings(attribute, operator, value))
        if operator == "regex":
            return Matches(attribute, self._strings(attribute, operator, value))
        if operator in ("gt", "ge", "lt", "le"):
            return Compare(attribute, operator, self._number(attribute, operator, value))
        if operator == "present":
            if not isinstance(value, bool):
                raise RuleError(f"{name}: 'present' takes true or false, not {value!r}")
            return Present(attribute, value)
        if operator == "same_as":
            if not isinstance(value, str):
                raise RuleError(f"{name}: 'same_as' takes an attribute name, not {value!r}")
            return SameAs(attribute, self.attribute(value))
        if operator == "not":
            if isinstance(value, Mapping):
                parts = [self._operator(attribute, op, arg) for op, arg in value.items()]
                if not parts:
                    raise RuleError(f"{name}: 'not' needs an operator table or a value")
                return Not(parts[0] if len(parts) == 1 else All(parts))
            return Not(self._operator(attribute, "is", value))
        raise RuleError(
            f"{name}: {operator!r} is not an operator ({', '.join(OPERATORS)})"
        )


__all__ = [
    "Attribute",
    "Compiler",
    "Condition",
    "Facts",
    "KNOWN_ATTRIBUTES",
    "NetworkTable",
    "RuleError",
]
