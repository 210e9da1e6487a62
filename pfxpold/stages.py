"""
Which answers Postfix honours at which stage of an SMTP session, and from
which Postfix version.

A policy answer is read by Postfix's C{check_table_result()} (smtpd_check.c)
like an access(5) table result, whatever restriction list asked. Some verbs
only make sense inside a mail transaction, or before the message content
has been received: elsewhere Postfix logs a warning and goes on as if the
answer had been C{DUNNO}, so the mail passes without what the policy meant
to do to it. Other verbs appeared in a given Postfix version; an older one
reads them as the name of an unknown restriction and answers
C{451 4.3.5 Server configuration error}.

The table below records both, one row per verb, with where it comes from.
The chain asks L{problems} once, for the configured C{postfix_version}, and
looks each answer's verb and the request's C{protocol_state} up in what it
returns: an answer Postfix would not honour there is treated as a check
error (the check's C{on_error}), never sent.

Verbs that are not in the table (C{OK}, C{DUNNO}, C{REJECT}, C{4NN text},
C{5NN text}, C{DEFER_IF_REJECT}, C{DEFER_IF_PERMIT}, C{WARN}, restriction
class names) are honoured at every stage by every version pfxpold
supports. A restriction class runs the restrictions the administrator put
in it, which Postfix checks for itself.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from pfxpold.interfaces import IPossibleActions

#: The values of C{protocol_state} (SMTPD_POLICY_README; smtpd.c sets them
#: as the SMTP command being served, or END-OF-MESSAGE after the dot).
STATES = ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN")

#: Stages with no mail transaction: the client restrictions at CONNECT and
#: the HELO/EHLO restrictions (Postfix asks there only with
#: C{smtpd_delay_reject = no}; by default they run at RCPT), VRFY outside a
#: transaction, and ETRN, which RFC 1985 and smtpd.c's etrn_cmd() forbid
#: inside one.
OUTSIDE_TRANSACTION = frozenset({"CONNECT", "EHLO", "HELO", "VRFY", "ETRN"})

Version = tuple[int, int]

#: The oldest Postfix that has the policy protocol (SMTPD_POLICY_README):
#: the lowest C{postfix_version} accepted.
OLDEST_POSTFIX: Version = (2, 1)

#: The default C{postfix_version}: the oldest release pfxpold supports,
#: the first that knows every verb pfxpold can send (BCC and INFO came with
#: 3.0) and older than every release still maintained upstream. pfxpold's
#: own defaults (the quota's C{DEFER}) need 2.6.
DEFAULT_POSTFIX = "3.0"

_VERSION = re.compile(r"([0-9]{1,2})\.([0-9]{1,2})(?:\.[0-9]{1,3})?")


class VersionError(ValueError):
    """
    Not a Postfix version pfxpold can use.
    """


def parse_version(value: Any) -> Version:
    """
    Read a Postfix version: C{"3.7"} or C{"3.7.11"} (the patch level does
    not change what a release honours).

    @raise VersionError: for anything else, or a version older than the
        policy protocol.
    """
    if not isinstance(value, str):
        # A TOML float would read 3.10 as 3.1.
        raise VersionError(f'must be a string such as "3.7", not {value!r}')
    match = _VERSION.fullmatch(value.strip())
    if match is None:
        raise VersionError(f'must be a Postfix version such as "3.7", not {value!r}')
    version = (int(match.group(1)), int(match.group(2)))
    if version < OLDEST_POSTFIX:
        raise VersionError(
            f"{value!r}: Postfix has the policy protocol from"
            f" {OLDEST_POSTFIX[0]}.{OLDEST_POSTFIX[1]} on"
        )
    return version


def shown(version: Version) -> str:
    """C{(3, 7)} as C{"3.7"}."""
    return f"{version[0]}.{version[1]}"


@dataclass(frozen=True)
class Row:
    """
    What Postfix does with one verb.

    @ivar verb: the verb, as L{pfxpold.action.Action} spells it.
    @ivar since: the first Postfix version that knows it.
    @ivar ignored: the stages where Postfix ignores it, each with what
        Postfix does there (and logs).
    @ivar source: where this is written (man page, or smtpd_check.c or
        smtpd.c function).
    """

    verb: str
    since: Version
    ignored: Mapping[str, str]
    source: str


# What Postfix logs when it skips these verbs outside a mail transaction
# (smtpd_check.c, not_in_client_helo(): there is no sender yet), and at
# ETRN (can_delegate_action(): ETRN receives no mail). At VRFY inside a
# transaction they would change the message being sent, not anything VRFY
# asked about: a misuse either way.
_NO_TRANSACTION = (
    'skipped, no mail transaction ("action {verb} is always skipped in Client host or'
    ' Helo command restrictions")'
)
_AT_ETRN = 'skipped ("action {verb} is unavailable in smtpd_etrn_restrictions")'
# Postfix 3.7 logs the CONNECT/HELO warning here too, naming
# smtpd_delay_reject=no even when it is yes (checked in the e2e tests).
_AT_VRFY = (
    "skipped outside a mail transaction (Postfix's warning then wrongly names"
    " smtpd_delay_reject=no), applied to the message being sent inside one"
)


def _delegated(verb: str) -> dict[str, str]:
    """The stages where a verb Postfix hands to its cleanup server is skipped."""
    reasons = {state: _NO_TRANSACTION.format(verb=verb) for state in ("CONNECT", "EHLO", "HELO")}
    reasons["VRFY"] = _AT_VRFY
    reasons["ETRN"] = _AT_ETRN.format(verb=verb)
    return reasons


_PREPEND = {state: _NO_TRANSACTION.format(verb="PREPEND") for state in ("CONNECT", "EHLO", "HELO")}
_PREPEND["VRFY"] = _AT_VRFY
# smtpd_check.c has no ETRN test for PREPEND ("XXX what about ETRN"), but
# ETRN is never inside a transaction, so not_in_client_helo() skips it.
_PREPEND["ETRN"] = _NO_TRANSACTION.format(verb="PREPEND")
# check_table_result(): the headers were written to the queue file when
# DATA began (smtpd.c, data_cmd()); confirmed against Postfix 3.7.
_PREPEND["END-OF-MESSAGE"] = (
    'ignored ("action PREPEND must be used before smtpd_end_of_data_restrictions"):'
    " the mail passes without the header"
)

#: The verbs Postfix honours only at some stages or from some version.
#: HOLD, DISCARD, FILTER, REDIRECT and BCC are recorded during the
#: transaction and handed to the cleanup server after the message
#: (smtpd.c, data_cmd(): "Flush out access table actions that are
#: delegated to the cleanup server"), so they work at MAIL, RCPT, DATA and
#: END-OF-MESSAGE alike. They are also unavailable with
#: C{smtpd_proxy_filter} (can_delegate_action()), which pfxpold cannot see.
ROWS: tuple[Row, ...] = (
    # access(5): "DEFER ... This feature is available in Postfix 2.6 and later."
    Row("DEFER", (2, 6), {}, "access(5) REJECT ACTIONS"),
    # access(5) OTHER ACTIONS; smtpd_check.c check_table_result(),
    # can_delegate_action().
    Row("HOLD", (2, 0), _delegated("HOLD"), "access(5); smtpd_check.c can_delegate_action()"),
    Row("DISCARD", (2, 0), _delegated("DISCARD"), "access(5); smtpd_check.c can_delegate_action()"),
    Row("FILTER", (2, 0), _delegated("FILTER"), "access(5); smtpd_check.c can_delegate_action()"),
    # access(5): REDIRECT "available in Postfix 2.1 and later".
    Row(
        "REDIRECT",
        (2, 1),
        _delegated("REDIRECT"),
        "access(5); smtpd_check.c can_delegate_action()",
    ),
    # access(5): BCC "available in Postfix 3.0 and later" (3.0 keeps only
    # the last BCC of a transaction; later versions keep them all).
    Row("BCC", (3, 0), _delegated("BCC"), "access(5); smtpd_check.c can_delegate_action()"),
    # access(5): PREPEND "cannot execute in the context of
    # smtpd_end_of_data_restrictions"; smtpd_check.c check_table_result()
    # and not_in_client_helo().
    Row("PREPEND", (2, 1), _PREPEND, "access(5); smtpd_check.c check_table_result()"),
    # access(5): INFO "available in Postfix 3.0 and later".
    Row("INFO", (3, 0), {}, "access(5) OTHER ACTIONS"),
)

TABLE: dict[str, Row] = {row.verb: row for row in ROWS}


def problems(version: Version) -> dict[str, dict[str, str]]:
    """
    What Postfix C{version} does not honour.

    @return: for each verb it does not honour somewhere, the stages
        (C{protocol_state} values) where it does not, each with what
        Postfix does instead. A verb the version does not know at all is
        listed at every stage.
    """
    found: dict[str, dict[str, str]] = {}
    for row in ROWS:
        if version < row.since:
            reason = (
                f"{row.verb} needs Postfix {shown(row.since)} or later; Postfix"
                f" {shown(version)} reads it as an unknown restriction"
                " (451 4.3.5 Server configuration error)"
            )
            found[row.verb] = {state: reason for state in STATES}
        elif row.ignored:
            found[row.verb] = dict(row.ignored)
    return found


def problem(verb: str, state: str, version: Version) -> Optional[str]:
    """
    Why Postfix C{version} would not honour C{verb} at C{state}, or
    L{None} when it would (or when C{state} is not one Postfix sends).
    """
    return problems(version).get(verb, {}).get(state)


@dataclass(frozen=True)
class Possible:
    """
    An answer a check can give.

    @ivar verb: its verb.
    @ivar states: the C{protocol_state} values it can give it at, or
        L{None}: at any.
    @ivar origin: where it is written (a file and line, a rule, a key),
        for the warning.
    """

    verb: str
    states: Optional[frozenset[str]]
    origin: str


def possible(verb: str, states: Optional[Iterable[str]], origin: str) -> Possible:
    """
    A L{Possible}, with C{states} uppercased as C{protocol_state} is read.
    """
    return Possible(verb, None if states is None else frozenset(s.upper() for s in states), origin)


def warnings_for(
    name: str, answers: Iterable[Possible], version: Version, on_error: str = ""
) -> list[str]:
    """
    One line for each verb a check can answer at a stage where Postfix
    C{version} would not honour it.

    @param name: the check's name.
    @param on_error: what then happens, as the chain will do it.
    """
    table = problems(version)
    lines: list[str] = []
    seen: set[tuple[str, frozenset[str], str]] = set()
    for answer in answers:
        reasons = table.get(answer.verb)
        if not reasons:
            continue
        states = [
            state
            for state in STATES
            if state in reasons and (answer.states is None or state in answer.states)
        ]
        if not states:
            continue
        key = (answer.verb, frozenset(states), answer.origin)
        if key in seen:
            continue
        seen.add(key)
        by_reason: dict[str, list[str]] = {}
        for state in states:
            by_reason.setdefault(reasons[state], []).append(state)
        what = "; ".join(f"at {', '.join(group)}: {why}" for why, group in by_reason.items())
        then = (
            f"; pfxpold takes it as the check failing (on_error = {on_error})" if on_error else ""
        )
        lines.append(
            f"{name}: can answer {answer.verb} ({answer.origin}), which Postfix"
            f" {shown(version)} does not honour {what}{then}"
        )
    return lines


def chain_warnings(
    entries: Iterable[Any],
    version: Version,
    default_action: Optional[Any] = None,
) -> list[str]:
    """
    The stage warnings of a whole chain: each check's possible answers
    (L{pfxpold.interfaces.IPossibleActions}), and what each check's
    C{on_error} and the chain's C{default_action} answer, at any stage.

    @param entries: L{pfxpold.chain.ChainEntry}-like objects (C{name},
        C{check}, C{on_error} with an optional C{action}).
    """
    lines: list[str] = []
    for entry in entries:
        answers: list[Possible] = []
        if IPossibleActions.providedBy(entry.check):
            try:
                answers.extend(entry.check.possible_actions())
            except Exception as e:
                lines.append(f"{entry.name}: could not list its answers: {type(e).__name__}: {e}")
        lines.extend(warnings_for(entry.name, answers, version, str(entry.on_error)))
        action = getattr(entry.on_error, "action", None)
        if action is not None:
            # A check fails where it runs: where all its answers are bound
            # to some stages, there; else anywhere.
            states: Optional[set[str]] = set()
            for answer in answers:
                if answer.states is None or states is None:
                    states = None
                else:
                    states |= answer.states
            if not answers:
                states = None
            lines.extend(
                warnings_for(entry.name, [possible(action.verb, states, "on_error")], version)
            )
    if default_action is not None:
        lines.extend(
            warnings_for(
                "[server]", [possible(default_action.verb, None, "default_action")], version
            )
        )
    return lines


def stage_table(verbs: Collection[str] = ()) -> list[tuple[str, str, str]]:
    """
    The table as C{(verb, since, not honoured at)} rows, for the README
    and tests.
    """
    rows = []
    for row in ROWS:
        if verbs and row.verb not in verbs:
            continue
        where = ", ".join(state for state in STATES if state in row.ignored) or "-"
        rows.append((row.verb, shown(row.since), where))
    return rows


__all__ = [
    "DEFAULT_POSTFIX",
    "OLDEST_POSTFIX",
    "OUTSIDE_TRANSACTION",
    "Possible",
    "ROWS",
    "Row",
    "STATES",
    "TABLE",
    "VersionError",
    "chain_warnings",
    "parse_version",
    "possible",
    "problem",
    "problems",
    "shown",
    "stage_table",
    "warnings_for",
]
