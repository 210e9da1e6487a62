"""
Postfix C{regexp_table(5)} and C{pcre_table(5)} files: parsing, and the
lookup of one value, in the linear-time engine of L{pfxpold.regex}.

A table is read as Postfix reads it: logical lines (a line starting with
whitespace continues the previous one; blank lines and C{#} comments are
skipped), C{/pattern/flags result} rules tried in order until one matches,
C{!/pattern/} for "does not match", C{if /pattern/} ... C{endif} (nested)
to try a block only for values that match, C{$1} .. C{${9}} in a result
for the text a group captured, and for C{regexp:} tables the old
C{/pattern1/!/pattern2/ result} form.

Patterns run in RE2, not in the POSIX or PCRE library Postfix uses: they
match text a client chooses (HELO names, addresses), and RE2 takes time
linear in that text whatever the pattern. What RE2 cannot do (look-around,
back-references, atomic groups and possessive quantifiers, recursion,
C{\\Z}, POSIX collating elements, the C{x} flags) is an error when the
table is read, naming the file and the line; never a pattern that silently
matches something else.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pfxpold.accessmap import MapError, logical_lines
from pfxpold.action import Action, ActionError
from pfxpold.escape import escape
from pfxpold.regex import PatternError, compile_pattern

#: The table formats, by the name Postfix gives them (C{regexp:}, C{pcre:}).
REGEXP = "regexp"
PCRE = "pcre"
FORMATS = (REGEXP, PCRE)

#: Flags each format knows, as Postfix's dict_regexp.c and dict_pcre.c
#: read them; what each does in RE2 is in L{_Flags}.
_KNOWN_FLAGS = {REGEXP: "imx", PCRE: "imsxAEUX"}

#: Flags RE2 cannot honour, and why: an error rather than a pattern that
#: means something else.
_UNSUPPORTED_FLAGS = {
    (REGEXP, "x"): "flag 'x' (POSIX basic syntax) is not supported: write the pattern in"
    " extended syntax (the default)",
    (PCRE, "x"): "flag 'x' (extended, whitespace and # comments ignored) is not supported"
    " by RE2: write the pattern without the whitespace and comments",
}

#: Escapes that assert a position rather than match a character.
_ASSERTION_ESCAPES = frozenset("bBAzZG")

#: glibc's regexp escapes for word starts and ends and buffer ends, which
#: RE2 would take as the plain characters.
_GNU_ANCHORS = "<>`'"


class TableLookupError(ValueError):
    """
    A rule matched, but its result with the captured text is not a valid
    action (a C{REDIRECT $1@example.com} whose C{$1} holds a space): the
    check fails and its C{on_error} applies.
    """


@dataclass(frozen=True)
class Pattern:
    """
    One compiled C{/pattern/flags}, possibly negated.

    @ivar source: the pattern as written, delimiters and flags included.
    @ivar negated: whether it is C{!/pattern/} (true when it does not match).
    @ivar universal: whether it matches every value (known only for simple
        cases; used for warnings, never for matching).
    """

    source: str
    compiled: Any
    negated: bool
    groups: int
    universal: bool

    def search(self, value: str) -> Any:
        """
        @return: the match object, C{True} for a negated pattern that does
            not match, or L{None}.
        """
        found = self.compiled.search(value)
        if self.negated:
            return None if found is not None else True
        return found


#: A part of a result: literal text, or the number of a group.
Part = Union[str, int]


@dataclass(frozen=True)
class MatchRule:
    """
    C{/pattern/flags result}: the result when the pattern (and the second
    pattern, if any) match.

    @ivar action: the action, when the result has no C{$n}.
    @ivar verb: the action's verb, when it has some.
    @ivar parts: the text after the verb, when it has some.
    """

    line: int
    pattern: Pattern
    second: Optional[Pattern]
    result: str
    action: Optional[Action]
    verb: str = ""
    parts: tuple[Part, ...] = ()


@dataclass(frozen=True)
class IfRule:
    """
    C{if /pattern/flags} ... C{endif}: the rules of C{body} are tried only
    for values the pattern matches.
    """

    line: int
    pattern: Pattern
    body: tuple[Union[MatchRule, IfRule], ...]
    end_line: int


Rule = Union[MatchRule, IfRule]


@dataclass
class _Block:
    line: int
    pattern: Optional[Pattern]
    rules: list[Rule] = field(default_factory=list)


def _translate(body: str, table_format: str) -> tuple[str, bool]:
    """
    Turn the text between the delimiters into RE2 syntax, refusing what RE2
    would read differently.

    A POSIX bracket expression takes a backslash literally (C{[\\.]} is a
    backslash or a dot) where RE2 and PCRE read an escape: it is doubled
    for C{regexp:} tables. C{[=a=]} and C{[.a.]} (collating elements) RE2
    reads as plain characters: they are refused.

    @return: the pattern for RE2, and whether it holds a position
        assertion (C{^}, C{$}, C{\\b} ...), for L{Pattern.universal}.
    @raise ValueError: for what RE2 would misread.
    """
    out: list[str] = []
    asserts = False
    position = 0
    length = len(body)
    while position < length:
        character = body[position]
        if character == "\\":
            following = body[position + 1 : position + 2]
            if table_format == REGEXP and following and following in _GNU_ANCHORS:
                # glibc's word and buffer anchors; RE2 would read a literal
                # character.
                raise ValueError(
                    f"\\{following} (a GNU regex anchor) is not supported: use \\b, ^ or $"
                )
            if following in _ASSERTION_ESCAPES:
                asserts = True
            out.append(body[position : position + 2])
            position += 2
            continue
        if character in "^$":
            asserts = True
            out.append(character)
            position += 1
            continue
        if character != "[":
            out.append(character)
            position += 1
            continue
        # A bracket expression: [, an optional ^, a ] taken literally when
        # it comes first, then up to the closing ].
        out.append("[")
        position += 1
        if body[position : position + 1] == "^":
            out.append("^")
            position += 1
        if body[position : position + 1] == "]":
            out.append("\\]")
            position += 1
        while position < length and body[position] != "]":
            character = body[position]
            if character == "[" and body[position + 1 : position + 2] in ("=", "."):
                raise ValueError(
                    f"[{body[position + 1]}...{body[position + 1]}] (POSIX collating elements)"
                    " is not supported"
                )
            if character == "[" and body[position + 1 : position + 2] == ":":
                end = body.find(":]", position + 2)
                if end < 0:
                    raise ValueError("unterminated [: character class")
                out.append(body[position : end + 2])
                position = end + 2
                continue
            if character == "\\":
                if table_format == REGEXP:
                    out.append("\\\\")
                    position += 1
                    continue
                out.append(body[position : position + 2])
                position += 2
                continue
            out.append(character)
            position += 1
        if position >= length:
            raise ValueError("missing ] at the end of a bracket expression")
        out.append("]")
        position += 1
    return "".join(out), asserts


def _read_pattern(
    text: str, position: int, table_format: str, path: str, line: int
) -> tuple[Pattern, int]:
    """
    Read C{!}s, a delimited pattern and its flags from C{text} at
    C{position}, and compile it.

    @return: the pattern and the position after its flags.
    @raise MapError: naming the line.
    """
    negated = False
    start = position
    while position < len(text) and (text[position] == "!" or text[position].isspace()):
        if text[position] == "!":
            negated = not negated
        position += 1
    if position >= len(text):
        raise MapError(path, line, "a pattern is missing")
    delimiter = text[position]
    if delimiter.isalnum() or delimiter == "\\":
        raise MapError(path, line, f"{delimiter!r} cannot delimit a pattern; use /pattern/")
    position += 1
    body_start = position
    while position < len(text):
        if text[position] == "\\" and position + 1 < len(text):
            position += 2
            continue
        if text[position] == delimiter:
            break
        position += 1
    if position >= len(text):
        raise MapError(path, line, f"no closing {delimiter!r} after the pattern")
    body = text[body_start:position]
    position += 1
    flags_start = position
    # dict_regexp.c ends the flags at a '!' too (the second pattern).
    stops = "!" if table_format == REGEXP else ""
    while position < len(text) and not text[position].isspace() and text[position] not in stops:
        position += 1
    flags = text[flags_start:position]
    source = text[start:position].strip()
    ignore_case = True
    multi_line = False
    # POSIX: without REG_NEWLINE a newline is an ordinary character, which
    # "." matches; PCRE: Postfix sets PCRE_DOTALL by default.
    dot_all = True
    ungreedy = False
    anchored = False
    for flag in flags:
        if flag not in _KNOWN_FLAGS[table_format]:
            raise MapError(path, line, f"unknown flag {flag!r} after {source!r}")
        problem = _UNSUPPORTED_FLAGS.get((table_format, flag))
        if problem is not None:
            raise MapError(path, line, problem)
        if flag == "i":
            ignore_case = not ignore_case
        elif flag == "m":
            multi_line = not multi_line
            if table_format == REGEXP:
                # REG_NEWLINE: "." no longer matches a newline.
                dot_all = not dot_all
        elif flag == "s":
            dot_all = not dot_all
        elif flag == "U":
            ungreedy = not ungreedy
        elif flag == "A":
            anchored = not anchored
        # E (PCRE_DOLLAR_ENDONLY): RE2's $ only ever matches at the end (or
        # at a newline with m), and request values hold no newline. X
        # (PCRE_EXTRA: unknown escapes are errors): RE2 always refuses them.
    try:
        translated, asserts = _translate(body, table_format)
    except ValueError as e:
        raise MapError(path, line, f"{source!r}: {e}") from None
    if ungreedy:
        translated = "(?U)" + translated
    if anchored:
        translated = "\\A(?:" + translated + ")"
        asserts = True
    try:
        compiled = compile_pattern(
            translated, ignore_case=ignore_case, dot_all=dot_all, multi_line=multi_line
        )
    except PatternError as e:
        raise MapError(path, line, f"{source!r}: not supported by RE2: {e}") from None
    # Without an assertion, a pattern that matches the empty string matches
    # at the start of any value.
    universal = not negated and not asserts and compiled.search("") is not None
    if not universal and not negated:
        # Anchored forms of "anything" (request values hold no newline).
        inner = body[1:] if body.startswith("^") else body
        inner = inner[:-1] if inner.endswith("$") and not inner.endswith("\\$") else inner
        universal = body in ("^", "$") or inner in (".*", "(.*)", "(?:.*)", ".*?", "(.*?)")
    return Pattern(source, compiled, negated, compiled.groups, universal), position


def _result_parts(result: str, path: str, line: int) -> tuple[tuple[Part, ...], int]:
    """
    Split a result into literal text and group numbers, as Postfix's
    mac_parse does: C{$1}, C{${1}}, C{$(1)}; C{$$} is a C{$}.

    @return: the parts and the highest group number.
    @raise MapError: for a reference that is not a group number.
    """
    parts: list[Part] = []
    literal: list[str] = []
    highest = 0
    position = 0
    while position < len(result):
        character = result[position]
        if character != "$":
            literal.append(character)
            position += 1
            continue
        following = result[position + 1 : position + 2]
        if following == "$":
            literal.append("$")
            position += 2
            continue
        if following in ("{", "("):
            close = "}" if following == "{" else ")"
            end = result.find(close, position + 2)
            if end < 0:
                raise MapError(path, line, f"no closing {close!r} in the result {result!r}")
            name = result[position + 2 : end]
            position = end + 1
        else:
            end = position + 1
            while end < len(result) and (result[end].isalnum() or result[end] == "_"):
                end += 1
            name = result[position + 1 : end]
            position = end
        if not name:
            raise MapError(path, line, f"a '$' without a group number in {result!r} (write $$)")
        if not name.isdigit() or not name.isascii():
            raise MapError(path, line, f"${name} is not a group number ($1, ${{1}})")
        number = int(name)
        if number < 1:
            raise MapError(path, line, f"${name}: groups are numbered from 1")
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(number)
        highest = max(highest, number)
    if literal:
        parts.append("".join(literal))
    return tuple(parts), highest


def _match_rule(
    text: str,
    table_format: str,
    path: str,
    line: int,
    restriction_classes: Collection[str],
    actions: dict[str, Action],
) -> MatchRule:
    pattern, position = _read_pattern(text, 0, table_format, path, line)
    second = None
    if table_format == REGEXP and text[position : position + 1] == "!":
        # "/a/!/b/": matches a but not b; the "!" makes the second negated.
        second, position = _read_pattern(text, position, table_format, path, line)
    result = text[position:].strip()
    if not result:
        raise MapError(path, line, f"{pattern.source!r} has no result")
    if position < len(text) and not text[position].isspace():
        raise MapError(path, line, f"unknown flags or text after {pattern.source!r}")
    parts, highest = _result_parts(result, path, line)
    if highest == 0:
        literal = "".join(str(part) for part in parts)
        action = actions.get(literal)
        if action is None:
            try:
                action = Action.parse(literal, restriction_classes)
            except ActionError as e:
                raise MapError(path, line, str(e)) from None
            actions[literal] = action
        return MatchRule(line, pattern, second, result, action)
    if pattern.negated:
        raise MapError(
            path, line, f"{result!r}: a negated pattern captures nothing for $n to substitute"
        )
    if highest > pattern.groups:
        raise MapError(
            path, line, f"${highest}: {pattern.source!r} has only {pattern.groups} group(s)"
        )
    # The verb comes from the table, never from the request: a sender
    # named "OK@..." must not choose the answer.
    first = parts[0] if isinstance(parts[0], str) else ""
    verb = first.split(None, 1)[0] if first.strip() else ""
    if not verb or len(first) == len(verb):
        raise MapError(path, line, f"{result!r}: the action's verb cannot come from a $n group")
    rest = first[len(verb) :].lstrip()
    text_parts = ((rest,) if rest else ()) + parts[1:]
    sample = "".join("x" if isinstance(part, int) else part for part in text_parts)
    try:
        Action(verb, sample).check_restriction_class(restriction_classes)
    except ActionError as e:
        raise MapError(path, line, str(e)) from None
    return MatchRule(line, pattern, second, result, None, verb, tuple(text_parts))


def parse(
    lines: Iterable[str],
    path: str = "<table>",
    table_format: str = REGEXP,
    restriction_classes: Collection[str] = (),
) -> RegexpTable:
    """
    Read a table from its lines.

    @raise MapError: naming the line of the first error.
    """
    if table_format not in FORMATS:
        raise ValueError(f"unknown table format {table_format!r}")
    stack = [_Block(0, None)]
    actions: dict[str, Action] = {}
    entries = 0
    for number, text in logical_lines(lines, keep_whitespace=True):
        word = text.split(None, 1)[0] if text.split() else ""
        lowered = text[:6].lower()
        if text[0].isalnum():
            if lowered.startswith("if") and not text[2:3].isalnum():
                pattern, position = _read_pattern(text, 2, table_format, path, number)
                if text[position:].strip():
                    raise MapError(
                        path,
                        number,
                        f"text after 'if {pattern.source}': {text[position:].strip()!r}"
                        " (do not indent the lines inside if..endif: a line starting with"
                        " whitespace continues the line before)",
                    )
                stack.append(_Block(number, pattern))
                continue
            if lowered.startswith("endif") and not text[5:6].isalnum():
                if len(stack) == 1:
                    raise MapError(path, number, "endif without if")
                if text[5:].strip():
                    raise MapError(path, number, f"text after endif: {text[5:].strip()!r}")
                block = stack.pop()
                assert block.pattern is not None
                stack[-1].rules.append(
                    IfRule(block.line, block.pattern, tuple(block.rules), number)
                )
                continue
            raise MapError(path, number, f"{word!r}: not a rule (/pattern/ result), if or endif")
        stack[-1].rules.append(
            _match_rule(text, table_format, path, number, restriction_classes, actions)
        )
        entries += 1
    if len(stack) > 1:
        raise MapError(path, stack[-1].line, "if without endif")
    return RegexpTable(table_format, path, tuple(stack[0].rules), entries)


def load(
    path: str, table_format: str = REGEXP, restriction_classes: Collection[str] = ()
) -> RegexpTable:
    """
    Read the table in the file at C{path} (UTF-8).

    @raise MapError: when it cannot be read or has an error.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f, path, table_format, restriction_classes)
    except OSError as e:
        raise MapError(path, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise MapError(path, None, f"not UTF-8: {e.reason}") from None


class RegexpTable:
    """
    A parsed regexp or pcre table.

    @ivar format: L{REGEXP} or L{PCRE}.
    @ivar rules: the top-level rules, C{if} blocks holding theirs.
    @ivar entries: the number of result rules.
    """

    def __init__(self, table_format: str, path: str, rules: tuple[Rule, ...], entries: int) -> None:
        self.format = table_format
        self.path = path
        self.rules = rules
        self.entries = entries

    def lookup(self, value: str) -> Optional[Action]:
        """
        The action of the first rule that matches C{value}, or L{None}.

        @raise TableLookupError: when that rule's result, with the text its
            groups captured, is not a valid action.
        """
        found = self._first(self.rules, value)
        return None if found is None else found[1]

    def trace(self, value: str) -> Optional[tuple[int, Action]]:
        """
        @return: the line of the first rule that matches C{value} and its
            action, or L{None}.
        """
        return self._first(self.rules, value)

    def _first(self, rules: Sequence[Rule], value: str) -> Optional[tuple[int, Action]]:
        for rule in rules:
            if type(rule) is MatchRule:
                found = rule.pattern.search(value)
                if found is None:
                    continue
                if rule.second is not None and rule.second.search(value) is None:
                    continue
                if rule.action is not None:
                    return rule.line, rule.action
                return rule.line, self._expand(rule, found)
            assert isinstance(rule, IfRule)
            if rule.pattern.search(value) is not None:
                inner = self._first(rule.body, value)
                if inner is not None:
                    return inner
        return None

    def _expand(self, rule: MatchRule, found: Any) -> Action:
        text = "".join(
            part if isinstance(part, str) else (found.group(part) or "") for part in rule.parts
        )
        try:
            # Action cleans the text (control characters, non-ASCII,
            # length): the captured text cannot add a line to the answer.
            return Action(rule.verb, text)
        except ActionError as e:
            raise TableLookupError(f"{self.path}:{rule.line}: {escape(str(e))}") from None

    def verbs(self) -> Iterator[tuple[int, str]]:
        """
        Each result rule's line and verb (for C{--check-config}'s stage
        warnings).
        """
        pending = list(reversed(self.rules))
        while pending:
            rule = pending.pop()
            if isinstance(rule, IfRule):
                pending.extend(reversed(rule.body))
            else:
                yield rule.line, rule.action.verb if rule.action is not None else rule.verb

    def unreachable(self) -> list[tuple[int, int]]:
        """
        Rules no value can reach because an earlier rule of the same block
        matches every value (C{/^/}, C{/.*/}, C{/x*/} ...).

        @return: C{(line, line of the earlier rule)} pairs.
        """
        found: list[tuple[int, int]] = []
        self._unreachable(self.rules, found)
        return found

    def _unreachable(self, rules: Sequence[Rule], found: list[tuple[int, int]]) -> None:
        catch_all: Optional[int] = None
        for rule in rules:
            if catch_all is not None:
                found.append((rule.line, catch_all))
                continue
            if isinstance(rule, IfRule):
                self._unreachable(rule.body, found)
            elif rule.pattern.universal and rule.second is None:
                catch_all = rule.line


__all__ = [
    "FORMATS",
    "PCRE",
    "REGEXP",
    "MatchRule",
    "IfRule",
    "Pattern",
    "RegexpTable",
    "TableLookupError",
    "load",
    "parse",
]
