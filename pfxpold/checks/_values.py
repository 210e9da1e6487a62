"""
Request values that check templates (LDAP filters, SOAP envelopes) may
name: every attribute Postfix sends, plus the values pfxpold derives from
them (the same names as C{file} lookups and C{sql} parameters); and the
guard that keeps values with control characters out of every backend
lookup.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from twisted.logger import Logger

from pfxpold.accessmap import attribute_value, check_attribute
from pfxpold.escape import escape, has_control
from pfxpold.request import PolicyRequest


def template_value(request: PolicyRequest, name: str) -> str:
    """
    @return: the attribute C{name} of C{request}, or the derived value of
        that name (see L{pfxpold.accessmap.attribute_value}), or C{""}.
    """
    value = attribute_value(request, name)
    return "" if value is None else value


def check_template_names(names: Iterable[str]) -> None:
    """
    Refuse a template at configuration time when a placeholder names no
    request value (a misspelt C{{sendr}} would otherwise always be empty).

    @raise ValueError: naming the first unknown placeholder.
    """
    for name in names:
        try:
            check_attribute(name)
        except ValueError as e:
            raise ValueError(f"placeholder {{{name}}}: {e}") from None


class RefusedValue(ValueError):
    """
    A value was not looked up because it holds a control character.
    """


class ControlCharacterGuard:
    """
    The one place where a check refuses to look up a value holding a
    control character (C0, DEL or C1): slapd stops reading a value at a
    NUL, so C{alice@example.com\\x00} would find alice; other backends
    truncate, fail or compare it in their own ways. No address, domain or
    host name Postfix passes on holds one, so the value is not looked up
    and the check answers as it documents (LDAP and SQL: C{not_found};
    HTTP: an error, C{on_error}).

    @ivar refused: values refused since the daemon started (for metrics).
    """

    _log = Logger()

    def __init__(self, check_name: str) -> None:
        self.check_name = check_name
        self.refused = 0

    def refuses(self, values: Iterable[tuple[str, Optional[str]]]) -> bool:
        """
        @param values: C{(name, value)} pairs about to be looked up; a
            L{None} value (SQL's NULL) is never refused.
        @return: whether one holds a control character, having logged it
            (escaped) and counted it.
        """
        for name, value in values:
            if value is not None and has_control(value):
                self.refused += 1
                self._log.warn(
                    "check {check}: {name} holds a control character, not looked up: {value}",
                    check=self.check_name,
                    name=escape(name),
                    value=escape(value),
                )
                return True
        return False
