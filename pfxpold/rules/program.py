"""
A rule set compiled: rules in order, each with its condition and what it
does, and an index that finds the rules a request can match without
testing them all.

A rule (one C{[[check.rule]]} table, or one C{[[rule]]} of an included
file) has a C{name}, an optional C{if} condition table (see
L{pfxpold.rules.conditions}) and what it does when the condition holds:

    - C{action}: answer it (the rules stop). Its text may name request
      values, C{{sender}}, filled in when it answers;
    - C{jump}: go through the named rule set (C{[[check.ruleset.NAME]]});
      when that set answers, that is the answer, else the rules go on
      after the jump;
    - C{return = true}: leave the current rule set (in the main list:
      answer DUNNO);
    - C{quota}: apply a C{quota} check's limit to the mail the rule
      matches: over the limit, its answer; within, the rules go on;
    - C{mark}: remember a mark for the message (its C{instance}), which
      a later request of the same message tests with C{marked}. Alone, the
      rules go on.

The index: a rule whose condition needs some attribute to equal a value
(C{sender_domain = "example.com"}), an address to be in a network
(C{client_address = "192.0.2.0/24"}), a name to be in a domain or a
pattern to match, is filed under that value, network, domain or pattern;
the candidates for a request are the rules filed under its values, plus
the rules that could not be filed, in their order. Candidates are kept as
the bits of an integer. What the indexes give is a pure function of one
request attribute's value (a derived value's source: C{sender} for
C{sender_domain}), so it is remembered per value: finding the candidates
of a request whose values were seen is one dict subscript per attribute
(the client's attributes together, as one key).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Optional

import re2

from pfxpold.action import Action, ActionError
from pfxpold.request import PolicyRequest, parse_ip
from pfxpold.rules.conditions import (
    KNOWN_ATTRIBUTES,
    Attribute,
    Compiler,
    Condition,
    Equals,
    Facts,
    InDomain,
    InNetworks,
    Matches,
    NetworkTable,
    RuleError,
    check_mark_name,
)

#: The keys of a rule table.
RULE_KEYS = ("name", "if", "action", "jump", "return", "quota", "mark")

#: Attributes with a handful of values, filed under only when a rule has
#: nothing better.
_FEW_VALUES = frozenset(
    {"protocol_state", "protocol_name", "request", "stress", "encryption_protocol"}
)

#: Values whose candidates are remembered, per attribute and rule set, in
#: each of two generations.
REMEMBERED = 8192

#: Values longer than this (on average, for a group of attributes) are not
#: remembered: a domain name has at most 253 characters, an address 254.
REMEMBERED_LENGTH = 256

#: Actions remembered per template, with the values they were made from.
FILLED = 1024

#: The name of the list a check's C{[[check.rule]]} tables make.
MAIN = "main"

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class Template:
    """
    An action whose text names request values: C{{sender}},
    C{{client_address}}... Values are put in in one pass, so a value
    cannot bring in a placeholder, and the action is made as any other
    (L{Action}), which replaces control characters and non-ASCII and caps
    the text's length.

    @ivar names: the attributes the text names.
    """

    __slots__ = ("verb", "text", "names", "_attributes", "action", "_filled", "_older")

    def __init__(self, value: str, restriction_classes: tuple[str, ...]) -> None:
        """
        @raise RuleError: when it is not an action Postfix accepts, even
            with every value empty (C{REJECT 5.7.1 {sender}} would be a
            status code without text for the null sender).
        """
        if not isinstance(value, str):
            raise RuleError(f"'action' must be a string, not {value!r}")
        parts = value.split(None, 1)
        if parts and "{" in parts[0]:
            raise RuleError(f"the action's verb cannot be a placeholder: {value!r}")
        self.names = tuple(dict.fromkeys(_PLACEHOLDER.findall(value)))
        self._attributes = {name: Attribute(name) for name in self.names}
        try:
            empty = Action.parse(_PLACEHOLDER.sub("", value), restriction_classes)
            if self.names:
                Action.parse(_PLACEHOLDER.sub("x@example.com", value), restriction_classes)
        except ActionError as e:
            hint = " (with its placeholders empty)" if self.names else ""
            raise RuleError(f"action {value!r}{hint}: {e}") from None
        self.verb = empty.verb
        self.text = value.split(None, 1)[1] if len(parts) > 1 else ""
        #: The action itself when the text names nothing.
        self.action: Optional[Action] = None if self.names else empty
        #: The actions made for the last values (as L{_Remembered}): an
        #: action is made and checked in a few microseconds, and the same
        #: recipient or client comes back.
        self._filled: dict[tuple[str, ...], Action] = {}
        self._older: dict[tuple[str, ...], Action] = {}

    def fill(self, request: PolicyRequest) -> Action:
        """
        @raise ActionError: when the filled action is not valid (a
            C{REDIRECT} to something that is not an address).
        """
        if self.action is not None:
            return self.action
        attributes = self._attributes
        values = tuple(attribute.get(request) for attribute in attributes.values())
        action = self._filled.get(values)
        if action is not None:
            return action
        action = self._older.get(values)
        if action is None:
            filled = dict(zip(attributes, values, strict=True))
            text = _PLACEHOLDER.sub(lambda match: filled[match.group(1)], self.text)
            action = Action(self.verb, text)
            if sum(map(len, values)) > REMEMBERED_LENGTH * len(values):
                return action
        if len(self._filled) >= FILLED:
            self._older = self._filled
            self._filled = {}
        self._filled[values] = action
        return action


@dataclass
class Rule:
    """
    One compiled rule.

    @ivar where: where it was written (the file, for included rules).
    @ivar position: its place in its rule set.
    """

    name: str
    where: str
    condition: Optional[Condition]
    action: Optional[Template] = None
    jump: Optional[str] = None
    returns: bool = False
    quota: Optional[str] = None
    marks: tuple[str, ...] = ()
    position: int = 0

    @property
    def terminal(self) -> bool:
        """Whether matching it always ends the current rule set."""
        return self.action is not None or self.returns

    def __post_init__(self) -> None:
        #: Whether its condition tests marks (read once per request).
        self.needs_marks = self.condition is not None and self.condition.needs_marks
        self.simple = False
        #: Whether the index alone decides that it matches.
        self.filed_alone = False

    def finish(self) -> None:
        """
        Note, once its settings are all known, whether it only answers:
        the check's fast path.
        """
        self.simple = (
            self.action is not None
            and not self.marks
            and not self.needs_marks
            and self.quota is None
            and self.jump is None
            and not self.returns
        )

    def test(self, facts: Facts) -> bool:
        return self.condition is None or self.condition.test(facts)

    def does(self) -> str:
        """What it does, for the explain."""
        done = []
        if self.marks:
            done.append("marks " + ", ".join(self.marks))
        if self.quota is not None:
            done.append(f"applies quota {self.quota!r}")
        if self.action is not None:
            done.append("answers " + (str(self.action.action) if self.action.action else
                                      f"{self.action.verb} {self.action.text}".strip()))
        if self.jump is not None:
            done.append(f"jumps to {self.jump!r}")
        if self.returns:
            done.append("returns")
        return "; ".join(done)


class RuleSet:
    """
    Rules in order, and their index.
    """

    def __init__(self, name: str, rules: list[Rule]) -> None:
        self.name = name
        self.rules = rules
        for position, rule in enumerate(rules):
            rule.position = position
        self.always = 0
        self._exact: dict[str, tuple[Attribute, dict[str, int]]] = {}
        self._networks: dict[str, tuple[Attribute, NetworkTable]] = {}
        self._patterns: dict[str, tuple[Attribute, list[tuple[str, int]], list[Rule]]] = {}
        self._domains: dict[str, tuple[Attribute, dict[str, int]]] = {}
        for rule in rules:
            if not self._file(rule):
                self.always |= 1 << rule.position
        lookups: dict[str, list[Callable[[PolicyRequest], int]]] = {}
        for attribute, table in self._exact.values():
            lookups.setdefault(attribute.source, []).append(_exact_lookup(attribute, table))
        for attribute, networks in self._networks.values():
            lookups.setdefault(attribute.source, []).append(_network_lookup(attribute, networks))
        for attribute, matcher, bits in self._pattern_sets():
            lookups.setdefault(attribute.source, []).append(
                _pattern_lookup(attribute, matcher, bits)
            )
        for attribute, domains in self._domains.values():
            lookups.setdefault(attribute.source, []).append(_domain_lookup(attribute, domains))
        #: What the indexes give for each request attribute (or group of
        #: attributes) they read (see L{_Remembered}). Every index gives a
        #: pure function of one attribute's value, so one dict access per
        #: attribute, or per group, finds what they all give.
        self._sources: tuple[_Remembered, ...] = tuple(
            _Remembered(names, tuple(found for name in names for found in lookups[name]))
            for names in _grouped(lookups)
        )
        #: Each key and what is remembered for it (as L{candidates_of} reads
        #: them; the check inlines it).
        self.keys = tuple((remembered.key, remembered) for remembered in self._sources)
        self.indexed = len(rules) - bin(self.always).count("1")
        #: By position, the answer of a rule that only answers, always the
        #: same, and that the index alone decides: being its request's
        #: first candidate is answering it. L{None} for the others.
        self.answers: tuple[Optional[Action], ...] = tuple(
            rule.action.action
            if rule.simple and rule.action is not None and (rule.condition is None or rule.filed_alone)
            else None
            for rule in rules
        )

    def _file(self, rule: Rule) -> bool:
        """
        File C{rule} in the index under its first equality or network
        condition (else a domain, else a regular expression); C{False}
        when it has none.
        """
        if rule.condition is None:
            return False
        bit = 1 << rule.position
        conjuncts = rule.condition.conjuncts()
        # Filed under the most telling condition: protocol_state = "RCPT"
        # or sasl_username = "" hold for most requests; a network or an
        # address for few.
        conjuncts = tuple(
            sorted(
                conjuncts,
                key=lambda part: isinstance(part, Equals)
                and (part.attribute.name in _FEW_VALUES or "" in part.values),
            )
        )
        for part in conjuncts:
            if isinstance(part, Equals):
                _, table = self._exact.setdefault(part.attribute.name, (part.attribute, {}))
                for value in part.values:
                    table[value] = table.get(value, 0) | bit
            elif isinstance(part, InNetworks):
                _, networks = self._networks.setdefault(
                    part.attribute.name, (part.attribute, NetworkTable())
                )
                for network in part.networks:
                    networks.add(network, bit, int.__or__)
            else:
                continue
            # Filed under its whole condition: being a candidate is
            # matching.
            rule.filed_alone = part is rule.condition
            return True
        for part in conjuncts:
            if isinstance(part, InDomain):
                _, domains = self._domains.setdefault(part.attribute.name, (part.attribute, {}))
                for domain in part.domains:
                    domains[domain] = domains.get(domain, 0) | bit
                rule.filed_alone = part is rule.condition
                return True
        for part in conjuncts:
            if isinstance(part, Matches):
                # Filed alone only once RE2 built the set (L{_pattern_sets}):
                # without it, the patterns are in every request's candidates.
                _, patterns, alone = self._patterns.setdefault(
                    part.attribute.name, (part.attribute, [], [])
                )
                patterns.extend((pattern, bit) for pattern in part.patterns)
                if part is rule.condition:
                    alone.append(rule)
                return True
        return False

    def _pattern_sets(self) -> Iterator[tuple[Attribute, Any, tuple[int, ...]]]:
        """
        The patterns filed under each attribute, as one RE2 set: one pass
        over the value finds every pattern that matches, where testing
        the rules one by one would run each pattern.
        """
        for attribute, patterns, alone in self._patterns.values():
            matcher = pattern_set([pattern for pattern, _ in patterns])
            if matcher is None:
                for _, bit in patterns:
                    self.always |= bit
                continue
            # The set finds the patterns that search finds: a rule whose
            # whole condition is these patterns is a candidate when it
            # matches.
            for rule in alone:
                rule.filed_alone = True
            yield attribute, matcher, tuple(bit for _, bit in patterns)

    def candidates_of(self, request: PolicyRequest) -> int:
        """
        @return: the rules C{request} may match, as bits by position.
        """
        mask = self.always
        # The request's own dict: PolicyRequest.get is a Python call, and
        # this loop is most of the check's cost.
        attributes = request.attributes
        try:
            for key, remembered in self.keys:
                mask |= remembered[key(attributes)]
        except KeyError:
            return self.candidates_without(attributes)
        return mask

    def candidates_without(self, attributes: dict[str, str]) -> int:
        """
        L{candidates_of} for a request that lacks an attribute the index
        reads (its keys read it as Postfix's empty value): each source
        read on its own.
        """
        mask = self.always
        for remembered in self._sources:
            mask |= remembered[remembered.key_of(attributes)]
        return mask

    def candidates(self, facts: Facts) -> int:
        """
        @return: the rules C{facts} may match, as bits by position.
        """
        return self.candidates_of(facts.request)


#: Request attributes that are the same for every request of an SMTP
#: session, and mostly for every session of a client: the index reads them
#: together, as one key, when it reads more than one of them.
SESSION = ("client_address", "client_name", "reverse_client_name", "helo_name")


def _grouped(lookups: Mapping[str, object]) -> list[tuple[str, ...]]:
    """
    The attributes in C{lookups}, the session's together when more than
    one of them is there, each other alone.
    """
    session = tuple(name for name in SESSION if name in lookups)
    alone = () if len(session) > 1 else session
    groups: list[tuple[str, ...]] = [
        (name,) for name in lookups if name not in session or name in alone
    ]
    if len(session) > 1:
        groups.insert(0, session)
    return groups


class _Remembered(dict[Any, int]):
    """
    What the indexes reading one request attribute, or a group of them,
    give for their values: the bits of the rules filed under what each
    value makes (its folded form, its domain, the networks holding it, the
    patterns it matches).

    The senders, clients and recipients of a relay come back, and a dict
    access costs less than folding, parsing or matching: the last values
    are remembered in two generations, C{recent} and C{older}; when
    C{recent} holds L{REMEMBERED} values it becomes C{older}, and a value
    found in C{older} moves back to C{recent}, so values in steady use stay
    however many others pass. It is itself C{recent}: a dict whose misses
    (C{__missing__}) look in C{older}, then ask the indexes, so that a
    value remembered costs one subscript.

    @ivar key: the key of a request's attributes (a dict): the value, or
        the tuple of a group's values; L{KeyError} when one is missing
        (then L{key_of}).
    """

    __slots__ = ("names", "lookups", "key", "older")

    def __init__(
        self, names: tuple[str, ...], lookups: tuple[Callable[[PolicyRequest], int], ...]
    ) -> None:
        super().__init__()
        self.names = names
        self.lookups = lookups
        self.key = itemgetter(*names)
        self.older: dict[Any, int] = {}

    def key_of(self, attributes: Mapping[str, str]) -> Any:
        """The key when an attribute is missing: Postfix's empty value."""
        if len(self.names) == 1:
            return attributes.get(self.names[0], "")
        return tuple(attributes.get(name, "") for name in self.names)

    def __missing__(self, key: Any) -> int:
        found = self.older.get(key)
        if found is None:
            # The indexes read the attributes from a request, derived
            # values (a sender's domain, a client's network) with them:
            # they see exactly what a request with these values makes them
            # see.
            values = (key,) if len(self.names) == 1 else key
            request = PolicyRequest.adopt(dict(zip(self.names, values, strict=True)))
            found = 0
            for lookup in self.lookups:
                found |= lookup(request)
            if sum(map(len, values)) > REMEMBERED_LENGTH * len(values):
                # Longer than any name or address: whoever connects chose
                # it, and it would only fill the memory.
                return found
        if len(self) >= REMEMBERED:
            self.older = dict(self)
            self.clear()
        self[key] = found
        return found


def _exact_lookup(attribute: Attribute, table: dict[str, int]) -> Callable[[PolicyRequest], int]:
    get_folded = attribute.get_folded
    return lambda request: table.get(get_folded(request), 0)


def _network_lookup(attribute: Attribute, networks: NetworkTable) -> Callable[[PolicyRequest], int]:
    get = attribute.get

    def lookup(request: PolicyRequest) -> int:
        ip = parse_ip(get(request))
        return 0 if ip is None else networks.mask(ip)

    return lookup


def _pattern_lookup(
    attribute: Attribute, matcher: Any, bits: tuple[int, ...]
) -> Callable[[PolicyRequest], int]:
    get = attribute.get

    def lookup(request: PolicyRequest) -> int:
        found = 0
        for index in matcher.Match(get(request)) or ():
            found |= bits[index]
        return found

    return lookup


def _domain_lookup(attribute: Attribute, domains: dict[str, int]) -> Callable[[PolicyRequest], int]:
    """
    The rules filed under the value's domain and under each domain above
    it, one dict access per label: C{a.b.example} looks up C{a.b.example},
    C{b.example} and C{example}, as L{InDomain} tests.
    """
    get = attribute.get
    domain_of = attribute.domain

    def lookup(request: PolicyRequest) -> int:
        name = domain_of(get(request))
        found = 0
        while name:
            found |= domains.get(name, 0)
            dot = name.find(".")
            if dot < 0:
                break
            name = name[dot + 1 :]
        return found

    return lookup


def pattern_set(patterns: list[str]) -> Any:
    """
    C{patterns} as one RE2 set that searches the way
    L{pfxpold.rules.conditions.Matches} does (ignoring case; each pattern
    was compiled alone first, with L{pfxpold.regex.compile_pattern}, which
    reported any that RE2 refuses).

    @return: the set, or L{None} if RE2 would not build it.
    """
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = False
    matcher = re2.Set.SearchSet(options)
    try:
        for pattern in patterns:
            matcher.Add(pattern)
        matcher.Compile()
    except re2.error:
        return None
    return matcher


def positions(mask: int) -> Iterator[int]:
    """The positions of the bits set in C{mask}, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


@dataclass
class Program:
    """
    Every rule set of a check: the main list and the named sets.

    @ivar files: the files it was read from (included rule files and
        list files), whose changes make it be read again.
    """

    sets: dict[str, RuleSet]
    files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        #: The main list (read on every request: an attribute, not a
        #: property).
        self.main: RuleSet = self.sets[MAIN]

    @property
    def needs_marks(self) -> bool:
        return any(rule.needs_marks or rule.marks for rule in self.rules())

    def rules(self) -> Iterator[Rule]:
        for rule_set in self.sets.values():
            yield from rule_set.rules

    @property
    def quotas(self) -> set[str]:
        return {rule.quota for rule in self.rules() if rule.quota is not None}

    def warnings(self) -> list[str]:
        """
        Rules that can never match, and names no request has.
        """
        found = []
        for rule_set in self.sets.values():
            where = "" if rule_set.name == MAIN else f"rule set {rule_set.name!r}: "
            for later in rule_set.rules:
                for earlier in rule_set.rules[: later.position]:
                    if earlier.terminal and shadows(earlier, later):
                        found.append(
                            f"{where}rule {later.name!r} can never match:"
                            f" rule {earlier.name!r} before it matches every request it does"
                        )
                        break
        for rule in self.rules():
            names: list[str] = []
            if rule.condition is not None:
                names.extend(a.name for a in rule.condition.attributes() if not a.known)
            if rule.action is not None:
                names.extend(n for n in rule.action.names if n not in KNOWN_ATTRIBUTES)
            for name in dict.fromkeys(names):
                close = difflib.get_close_matches(name, sorted(KNOWN_ATTRIBUTES), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                found.append(
                    f"rule {rule.name!r}: {name!r} is not an attribute Postfix sends nor one"
                    f" pfxpold derives; it is always empty{hint}"
                )
        return found


def shadows(earlier: Rule, later: Rule) -> bool:
    """
    Whether C{earlier} matches every request C{later} matches: each of
    its conditions is implied by one of C{later}'s.
    """
    if earlier.condition is None:
        return True
    if later.condition is None:
        return False
    mine = later.condition.conjuncts()
    return all(any(part.implies(theirs) for part in mine) for theirs in earlier.condition.conjuncts())


class ProgramBuilder:
    """
    Compiles rule tables into a L{Program}.

    @param restriction_classes: the names actions may give besides the
        access(5) verbs.
    """

    def __init__(self, base_directory: str, restriction_classes: tuple[str, ...]) -> None:
        self.restriction_classes = restriction_classes
        self.lists: dict[Any, Any] = {}
        self.sets: dict[str, list[Rule]] = {MAIN: []}
        self.defined_in: dict[str, str] = {}
        self.base_directory = base_directory
        self.rule_names: dict[tuple[str, str], str] = {}

    def add(self, where: str, rules: Any, rule_sets: Any, base_directory: str) -> None:
        """
        Add the main-list rules and the named sets of one table (the
        check's, or an included file's).

        @param where: how errors name it: the included file, or C{""} for
            the check's own table.
        @raise RuleError: naming the rule.
        """
        compiler = Compiler(base_directory, self.lists)
        if rules is not None:
            self.sets[MAIN].extend(self._rules(compiler, where, MAIN, rules))
        if rule_sets is None:
            return
        prefix = f"{where}: " if where else ""
        if not isinstance(rule_sets, Mapping):
            raise RuleError(f"{prefix}'ruleset' must be tables of rules: [[ruleset.NAME]]")
        for name, tables in rule_sets.items():
            if not _SET_NAME.fullmatch(name) or name == MAIN:
                raise RuleError(f"{prefix}{name!r} cannot name a rule set")
            if name in self.sets:
                raise RuleError(
                    f"{prefix}rule set {name!r} is also defined in {self.defined_in[name]}"
                )
            self.defined_in[name] = where or "the check's table"
            self.sets[name] = self._rules(compiler, where, name, tables)

    def _rules(self, compiler: Compiler, where: str, set_name: str, tables: Any) -> list[Rule]:
        if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
            raise RuleError(f"{where or 'rule'}: rules must be tables: [[rule]]")
        rules = []
        for number, table in enumerate(tables, start=len(self.sets.get(set_name, ())) + 1):
            name = table.get("name", f"#{number}")
            label = (f"{where}: " if where else "") + (
                f"rule {name!r}" if set_name == MAIN else f"rule set {set_name!r}: rule {name!r}"
            )
            if not isinstance(name, str) or not name.strip():
                raise RuleError(f"{label}: 'name' must be a non-empty string")
            if (set_name, name) in self.rule_names:
                raise RuleError(
                    f"{label}: the name is also used in {self.rule_names[(set_name, name)]}"
                )
            self.rule_names[(set_name, name)] = where or "the check's table"
            try:
                rules.append(self._rule(compiler, where, name, table))
            except RuleError as e:
                raise RuleError(f"{label}: {e}") from None
        return rules

    def _rule(self, compiler: Compiler, where: str, name: str, table: Mapping[str, Any]) -> Rule:
        for key in table:
            if key not in RULE_KEYS:
                close = difflib.get_close_matches(key, RULE_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" ({', '.join(RULE_KEYS)})"
                raise RuleError(f"{key!r} is not a rule setting{hint}")
        condition = None
        if "if" in table:
            try:
                condition = compiler.table(table["if"])
            except RuleError as e:
                raise RuleError(f"'if': {e}") from None
        rule = Rule(name, where, condition)
        if "action" in table:
            rule.action = Template(table["action"], self.restriction_classes)
        if "jump" in table:
            if not isinstance(table["jump"], str):
                raise RuleError(f"'jump' names a rule set, not {table['jump']!r}")
            rule.jump = table["jump"]
        if "return" in table:
            if table["return"] is not True:
                raise RuleError("'return' can only be true")
            rule.returns = True
        if "quota" in table:
            if not isinstance(table["quota"], str):
                raise RuleError(f"'quota' names a quota check, not {table['quota']!r}")
            rule.quota = table["quota"]
        if "mark" in table:
            marks = table["mark"] if isinstance(table["mark"], list) else [table["mark"]]
            try:
                rule.marks = tuple(check_mark_name(mark) for mark in marks)
            except RuleError as e:
                raise RuleError(f"'mark': {e}") from None
        ending = [key for key in ("action", "jump", "return") if key in table]
        if len(ending) > 1:
            raise RuleError(f"a rule does one of action, jump, return, not {' and '.join(ending)}")
        if rule.quota is not None and ending:
            raise RuleError(f"a quota rule answers the quota's action; drop {ending[0]!r}")
        if not ending and rule.quota is None and not rule.marks:
            raise RuleError("does nothing: give it an action, jump, return, quota or mark")
        rule.finish()
        return rule

    def build(self, files: Iterable[str] = ()) -> Program:
        """
        @raise RuleError: when a jump names no rule set, or jumps loop.
        """
        sets = {name: RuleSet(name, rules) for name, rules in self.sets.items()}
        for rule_set in sets.values():
            for rule in rule_set.rules:
                if rule.jump is not None and rule.jump not in sets:
                    known = ", ".join(sorted(set(sets) - {MAIN})) or "none"
                    raise RuleError(
                        f"{_prefix(rule)}rule {rule.name!r}: 'jump': no rule set {rule.jump!r}"
                        f" (rule sets: {known})"
                    )
        _check_loops(sets)
        program = Program(sets, sorted(set(files) | {path for path, _ in self.lists}))
        return program


def _prefix(rule: Rule) -> str:
    return f"{rule.where}: " if rule.where else ""


def _check_loops(sets: dict[str, RuleSet]) -> None:
    targets = {
        name: [rule for rule in rule_set.rules if rule.jump is not None]
        for name, rule_set in sets.items()
    }

    def visit(name: str, path: list[str]) -> None:
        for rule in targets[name]:
            assert rule.jump is not None
            if rule.jump in path:
                loop = " -> ".join(path[path.index(rule.jump) :] + [rule.jump])
                raise RuleError(f"{_prefix(rule)}rule {rule.name!r}: jumps loop: {loop}")
            visit(rule.jump, path + [rule.jump])

    visit(MAIN, [MAIN])
    for name in sets:
        visit(name, [name])


__all__ = ["MAIN", "Program", "ProgramBuilder", "Rule", "RuleError", "RuleSet", "Template"]
