"""
Regular expressions on text a sender controls, in a linear-time engine.

A pattern in a rule or a regexp table runs on the HELO name, the client
name and the addresses, all chosen by whoever connects. Python's C{re}
backtracks, so a pattern such as C{(a+)+$} can take seconds on a few
kilobytes of hostile input and stall every connection the reactor serves.
RE2 (Google's engine, through the C{google-re2} binding) matches in time
linear in the input, whatever the pattern; in exchange it refuses
back-references and look-around. A pattern it cannot compile is an error
when the configuration is loaded, never a silent mismatch later.
"""

from __future__ import annotations

from typing import Any

import re2


class PatternError(ValueError):
    """
    A pattern the engine refuses, with the engine's reason as the message.
    """


def compile_pattern(
    pattern: str, ignore_case: bool = False, dot_all: bool = False, multi_line: bool = False
) -> Any:
    """
    Compile C{pattern} with RE2.

    @param ignore_case: match case-insensitively.
    @param dot_all: C{.} matches a newline too.
    @param multi_line: C{^} and C{$} match at line breaks too.
    @return: a compiled pattern with C{search}, C{match} and C{sub} as in
        C{re} (RE2's own syntax: see U{https://github.com/google/re2/wiki/Syntax}).
    @raise PatternError: when RE2 cannot compile it; the message says why.
    """
    options = re2.Options()
    # RE2 otherwise writes its own copy of every compile error to stderr.
    options.log_errors = False
    options.case_sensitive = not ignore_case
    options.dot_nl = dot_all
    if multi_line:
        # RE2's own inline flag: ^ and $ match at line breaks too.
        pattern = "(?m)" + pattern
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        reason = e.args[0] if e.args else "invalid pattern"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(str(reason)) from None


__all__ = ["PatternError", "compile_pattern"]
