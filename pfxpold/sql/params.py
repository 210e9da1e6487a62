"""
The C{:name} parameters of the queries administrators write: a small lexer
that turns them into a driver's positional placeholders, so that request
values are always bound by the driver, never put into the SQL text.

Three kinds of parameter:

  - C{:sender}: one value, one placeholder;
  - C{:client_address_keys}: a list of values (L{pfxpold.sql.keys}), as
    many placeholders as the list has values, separated by commas, for
    C{IN (...)}; an empty list is one NULL, which matches nothing;
  - C{:client_address_keys_rank(origin)}: where the value of C{origin}
    stands in that list, C{0} for the first (most specific), for
    C{ORDER BY}: a C{CASE (origin) WHEN ? THEN 0 WHEN ? THEN 1 ... END}
    that every database understands.

The lexer knows two dialects. C{"standard"} (SQLite, PostgreSQL): C{'...'}
with C{''}, C{E'...'} with backslashes, C{"..."}, C{$tag$...$tag$},
C{--} and C{/* */} comments, C{::} casts. C{"mysql"}: C{'...'} and
C{"..."} with backslashes and doubled quotes, C{`...`}, C{#}, C{-- } and
C{/* */} comments; C{/*!...*/} (code MySQL runs) is refused. PyMySQL puts
escaped values into the statement's text, so there the lexer must see
quotes exactly where MySQL does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")

DIALECTS = ("standard", "mysql")
LIST_SUFFIX = "_keys"
RANK_SUFFIX = "_keys_rank"


class QueryError(ValueError):
    """
    A query's text cannot be used.
    """


@dataclass(frozen=True)
class Parameter:
    """
    One C{:name} of a query.

    @ivar name: the value (or list of values) it binds: C{sender},
        C{client_address_keys}; a rank names its list.
    @ivar rank_of: for a rank, the translated expression whose value is
        ranked; L{None} otherwise.
    """

    name: str
    rank_of: Optional[Query] = None

    @property
    def is_list(self) -> bool:
        return self.name.endswith(LIST_SUFFIX)


class Query:
    """
    A translated query: SQL text with parameters still to be expanded.

    @ivar names: every value name the query binds (a list's name once per
        use), in the order their placeholders appear.
    @ivar lists: whether a parameter is a list (the SQL then depends on the
        lists' lengths).
    """

    def __init__(self, parts: Sequence[Union[str, Parameter]], placeholder: str) -> None:
        self.parts = list(parts)
        self.placeholder = placeholder
        self.names: list[str] = []
        self.lists = False
        for part in self.parts:
            if isinstance(part, Parameter):
                if part.rank_of is not None:
                    self.names.extend(part.rank_of.names)
                    self.lists = True
                self.names.append(part.name)
                self.lists = self.lists or part.is_list
        self._fixed: Optional[str] = None
        if not self.lists:
            self._fixed = "".join(
                self.placeholder if isinstance(part, Parameter) else part for part in self.parts
            )

    @property
    def sql(self) -> str:
        """
        The SQL of a query without lists.
        """
        if self._fixed is None:
            raise ValueError("the query's text depends on its key lists")
        return self._fixed

    def bind(self, values: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """
        The SQL and the values to bind, in placeholder order.

        @param values: each name's value; a list's value is a sequence of
            strings.
        """
        if self._fixed is not None:
            return self._fixed, [values[name] for name in self.names]
        sql: list[str] = []
        bound: list[Any] = []
        self._render(values, sql, bound)
        return "".join(sql), bound

    def _render(self, values: Mapping[str, Any], sql: list[str], bound: list[Any]) -> None:
        placeholder = self.placeholder
        for part in self.parts:
            if isinstance(part, str):
                sql.append(part)
            elif part.rank_of is not None:
                # An empty list ranks against one NULL, which equals
                # nothing: never a bare 0, which ORDER BY reads as a
                # column number.
                keys = values[part.name] or [None]
                sql.append("(CASE (")
                part.rank_of._render(values, sql, bound)
                sql.append(")")
                for rank, key in enumerate(keys):
                    sql.append(f" WHEN {placeholder} THEN {rank}")
                    bound.append(key)
                sql.append(f" ELSE {len(keys)} END)")
            elif part.is_list:
                keys = values[part.name]
                if not keys:
                    sql.append(placeholder)
                    bound.append(None)
                else:
                    sql.append(", ".join([placeholder] * len(keys)))
                    bound.extend(keys)
            else:
                sql.append(placeholder)
                bound.append(values[part.name])


class _Lexer:
    def __init__(self, query: str, placeholder: str, escape_percent: bool, dialect: str) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown SQL dialect {dialect!r}")
        self.query = query
        self.placeholder = placeholder
        self.escape_percent = escape_percent
        self.mysql = dialect == "mysql"

    def lex(self, index: int, in_argument: bool) -> tuple[list[Union[str, Parameter]], int]:
        """
        Lex from C{index} to the end, or (C{in_argument}) to the C{)} that
        closes a rank's argument.

        @return: the parts and the index after the last one lexed.
        """
        query = self.query
        length = len(query)
        parts: list[Union[str, Parameter]] = []
        depth = 0

        def copy(text: str) -> None:
            parts.append(text.replace("%", "%%") if self.escape_percent else text)

        while index < length:
            char = query[index]
            if char in "'\"" or (self.mysql and char == "`"):
                end = self._quote_end(index)
                copy(query[index : end + 1])
                index = end + 1
            elif (
                query.startswith("--", index)
                and (not self.mysql or index + 2 >= length or query[index + 2] in " \t\r\n\f\v")
            ) or (self.mysql and char == "#"):
                end = query.find("\n", index)
                end = length if end < 0 else end
                copy(query[index:end])
                index = end
            elif query.startswith("/*", index):
                if self.mysql and (
                    query.startswith("/*!", index) or query.startswith("/*M!", index)
                ):
                    raise QueryError(
                        f"MySQL's executable comments (/*!...*/) are not supported"
                        f" (character {index + 1})"
                    )
                end = query.find("*/", index + 2)
                if end < 0:
                    raise QueryError(f"unterminated comment at character {index + 1}")
                copy(query[index : end + 2])
                index = end + 2
            elif char == "$" and not self.mysql:
                tag = _DOLLAR_TAG.match(query, index)
                if tag:
                    end = query.find(tag.group(), tag.end())
                    if end < 0:
                        raise QueryError(
                            f"unterminated {tag.group()} quote at character {index + 1}"
                        )
                    copy(query[index : end + len(tag.group())])
                    index = end + len(tag.group())
                elif index + 1 < length and query[index + 1].isdigit():
                    raise QueryError("write parameters as :name, not $1")
                else:
                    copy(char)
                    index += 1
            elif char == ":":
                if query.startswith("::", index):
                    copy("::")
                    index += 2
                    continue
                name = _IDENTIFIER.match(query, index + 1)
                if name is None:
                    copy(char)
                    index += 1
                    continue
                index = name.end()
                if name.group().endswith(RANK_SUFFIX):
                    parameter, index = self._rank(name.group(), index)
                    parts.append(parameter)
                else:
                    parts.append(Parameter(name.group()))
            elif char == "?" and self.placeholder == "?":
                raise QueryError("write parameters as :name, not ?")
            elif in_argument and char in "()":
                if char == ")" and depth == 0:
                    return parts, index
                depth += 1 if char == "(" else -1
                copy(char)
                index += 1
            else:
                copy(char)
                index += 1
        if in_argument:
            raise QueryError("unterminated ( after a _keys_rank parameter")
        return parts, index

    def _rank(self, name: str, index: int) -> tuple[Parameter, int]:
        """
        Lex C{(expression)} after C{:name_keys_rank}.
        """
        query = self.query
        if not query.startswith("(", index):
            raise QueryError(
                f":{name} needs the column it ranks: :{name}(column) (character {index + 1})"
            )
        parts, end = self.lex(index + 1, in_argument=True)
        argument = Query(parts, self.placeholder)
        if not "".join(part for part in parts if isinstance(part, str)).strip() and not any(
            isinstance(part, Parameter) for part in parts
        ):
            raise QueryError(f":{name}() needs the column it ranks: :{name}(column)")
        list_name = name[: -len(RANK_SUFFIX)] + LIST_SUFFIX
        return Parameter(list_name, rank_of=argument), end + 1

    def _quote_end(self, index: int) -> int:
        """
        The index of the quote that ends the quoted text starting at
        C{index}.
        """
        query = self.query
        length = len(query)
        char = query[index]
        if self.mysql:
            backslashes = char != "`"
        else:
            backslashes = (
                char == "'"
                and index > 0
                and query[index - 1] in "eE"
                and (index < 2 or not (query[index - 2].isalnum() or query[index - 2] == "_"))
            )
        end = index + 1
        while True:
            if end >= length:
                raise QueryError(f"unterminated {char} quote at character {index + 1}")
            if backslashes and query[end] == "\\":
                end += 2
                continue
            if query[end] == char:
                if end + 1 < length and query[end + 1] == char:
                    end += 2
                    continue
                return end
            end += 1


def parse_query(
    query: str, placeholder: str, escape_percent: bool, dialect: str = "standard"
) -> Query:
    """
    Translate a query written with C{:name} parameters to a driver's
    positional placeholders.

    Quoted strings, quoted identifiers and comments (as C{dialect} reads
    them) are copied as they are; C{::} (a PostgreSQL cast) is not a
    parameter.

    @param placeholder: C{"?"} (SQLite) or C{"%s"} (psycopg, PyMySQL).
    @param escape_percent: whether a literal C{%} must be written C{%%}
        (psycopg and PyMySQL, whose placeholders start with C{%}).
    @param dialect: C{"standard"} or C{"mysql"}.
    @raise QueryError: for unterminated quotes or comments, another
        parameter syntax (C{?}, C{$1}), or a rank without its column.
    """
    parts, _ = _Lexer(query, placeholder, escape_percent, dialect).lex(0, in_argument=False)
    return Query(parts, placeholder)


def translate_query(
    query: str, placeholder: str, escape_percent: bool, dialect: str = "standard"
) -> tuple[str, list[str]]:
    """
    Translate a query without key lists (see L{parse_query}).

    @return: the translated query and the parameter names, in the order
        of their placeholders (a name used twice appears twice).
    @raise QueryError: as L{parse_query} does, and for key lists.
    """
    parsed = parse_query(query, placeholder, escape_percent, dialect)
    if parsed.lists:
        raise QueryError("this query's text depends on its key lists: use parse_query")
    return parsed.sql, parsed.names
