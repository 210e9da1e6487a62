"""
The C{:name} parameters of the queries administrators write: a small lexer
that turns them into a driver's positional placeholders, so that request
values are always bound by the driver, never put into the SQL text.
"""

from __future__ import annotations

import re

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


class QueryError(ValueError):
    """
    A query's text cannot be used.
    """


def translate_query(query: str, placeholder: str, escape_percent: bool) -> tuple[str, list[str]]:
    """
    Translate a query written with C{:name} parameters to a driver's
    positional placeholders.

    Quoted strings (C{'...'}, C{E'...'}, C{$tag$...$tag$}), quoted
    identifiers and comments are copied as they are; C{::} (a PostgreSQL
    cast) is not a parameter.

    @param placeholder: C{"?"} (SQLite) or C{"%s"} (psycopg).
    @param escape_percent: whether a literal C{%} must be written C{%%}
        (psycopg, whose placeholders start with C{%}).
    @return: the translated query and the parameter names, in the order
        of their placeholders (a name used twice appears twice).
    @raise QueryError: for unterminated quotes or comments, or another
        parameter syntax (C{?}, C{$1}).
    """
    parts: list[str] = []
    names: list[str] = []
    length = len(query)

    def copy(text: str) -> None:
        parts.append(text.replace("%", "%%") if escape_percent else text)

    index = 0
    while index < length:
        char = query[index]
        if char in "'\"":
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
                    break
                end += 1
            copy(query[index : end + 1])
            index = end + 1
        elif query.startswith("--", index):
            end = query.find("\n", index)
            end = length if end < 0 else end
            copy(query[index:end])
            index = end
        elif query.startswith("/*", index):
            end = query.find("*/", index + 2)
            if end < 0:
                raise QueryError(f"unterminated comment at character {index + 1}")
            copy(query[index : end + 2])
            index = end + 2
        elif char == "$":
            tag = _DOLLAR_TAG.match(query, index)
            if tag:
                end = query.find(tag.group(), tag.end())
                if end < 0:
                    raise QueryError(f"unterminated {tag.group()} quote at character {index + 1}")
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
            names.append(name.group())
            parts.append(placeholder)
            index = name.end()
        elif char == "?" and placeholder == "?":
            raise QueryError("write parameters as :name, not ?")
        else:
            copy(char)
            index += 1
    return "".join(parts), names
