"""
The C{Received-SPF} header field (RFC 7208 section 9.1), written so that
no value a client or a DNS zone controls can end it, start another header
or reach outside its place: values are a dot-atom or a quoted-string with
every C{"} and C{\\} escaped, the comment's parentheses and backslashes
are escaped, and every character outside printable ASCII becomes C{?}.
"""

from __future__ import annotations

import re
from typing import Optional

from pfxpold.action import MAX_TEXT_LENGTH

#: RFC 5322 atext.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
#: Longest value written in full; a longer one is cut (and marked).
MAX_VALUE_LENGTH = 80

#: The results RFC 7208 names, as the header writes them.
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


def _printable(text: str, limit: int = MAX_VALUE_LENGTH) -> str:
    text = _NOT_PRINTABLE.sub("?", text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def quote_value(value: str) -> str:
    """
    @return: C{value} as a dot-atom when it is one, else as a
        quoted-string; non-printable characters become C{?}, and a value
        longer than L{MAX_VALUE_LENGTH} is cut.
    """
    value = _printable(value)
    if _DOT_ATOM.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment_text(text: str) -> str:
    """
    @return: C{text} fit for a comment: parentheses and backslashes
        escaped as quoted-pairs, non-printable characters as C{?}.
    """
    text = _NOT_PRINTABLE.sub("?", text)
    return re.sub(r"([()\\])", r"\\\1", text)


def explanation_comment(result: str, receiver: str, identity: str, client_address: str) -> str:
    """
    The comment RFC 7208's examples give, e.g. C{mybox.example.org: domain
    of alice@example.com designates 192.0.2.1 as permitted sender}.
    """
    who = _printable(identity, 64)
    if result == "pass":
        text = f"domain of {who} designates {client_address} as permitted sender"
    elif result == "fail":
        text = f"domain of {who} does not designate {client_address} as permitted sender"
    elif result == "softfail":
        text = (
            f"transitioning domain of {who} does not designate {client_address} as permitted sender"
        )
    elif result in ("neutral", "none"):
        text = f"{client_address} is neither permitted nor denied by domain of {who}"
    elif result == "permerror":
        text = f"permanent error in processing domain of {who}"
    else:
        text = f"temporary error in processing during lookup of {who}"
    return comment_text(f"{_printable(receiver, 64)}: {text}")


def received_spf(
    result: str,
    identity: str,
    client_address: str,
    helo: str,
    envelope_from: str,
    receiver: str,
    mechanism: Optional[str] = None,
    limit: int = MAX_TEXT_LENGTH,
) -> str:
    """
    The header field, at most C{limit} characters (the longest text an
    action may carry): the comment goes first when it does not fit, then
    the mechanism, the receiver, the HELO name and the envelope sender, so
    that the result, the identity and the client address always stay.

    @param identity: C{"mailfrom"} or C{"helo"}.
    @param envelope_from: the MAIL FROM address (C{postmaster@HELO} for
        the null sender), as the client gave it.
    """
    if result not in RESULTS:
        raise ValueError(f"{result!r} is not an SPF result")
    who = envelope_from if identity == "mailfrom" else helo
    comment = explanation_comment(result, receiver, who, client_address)
    pairs = [
        ("client-ip", client_address),
        ("envelope-from", envelope_from),
        ("helo", helo),
        ("receiver", receiver),
        ("identity", identity),
        ("mechanism", mechanism),
    ]
    # What goes first when the field is too long.
    optional = ["mechanism", "receiver", "helo", "envelope-from"]
    present = {key for key, value in pairs if value is not None}
    with_comment = True
    while True:
        fields = "; ".join(
            f"{key}={quote_value(value)}"
            for key, value in pairs
            if key in present and value is not None
        )
        line = f"Received-SPF: {result} "
        if with_comment:
            line += f"({comment}) "
        line += fields + ";"
        if len(line) <= limit:
            return line
        if with_comment:
            with_comment = False
            continue
        dropped = next((key for key in optional if key in present), None)
        if dropped is None:
            # The result, the client address and the identity: always short.
            return line
        present.discard(dropped)
