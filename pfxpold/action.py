"""
The answer to a policy request, and the rules that keep it safe on the
wire.

An L{Action} is always one line Postfix accepts (access(5)): a known verb,
or the name of a restriction class the administrator declared, and a text
that is printable ASCII, capped in length and never empty where Postfix
needs a value.
"""

from __future__ import annotations

import re
from collections.abc import Collection

#: Verbs that may stand alone or take an optional text.
_OPTIONAL_TEXT = frozenset(
    {
        "OK",
        "DUNNO",
        "REJECT",
        "DEFER",
        "DEFER_IF_REJECT",
        "DEFER_IF_PERMIT",
        "HOLD",
        "DISCARD",
        "INFO",
        "WARN",
    }
)

#: Verbs that need an argument: without it Postfix answers 451 4.3.5.
_REQUIRED_ARGUMENT = frozenset({"FILTER", "REDIRECT", "BCC", "PREPEND"})

# fullmatch, never "$": "$" also matches before a trailing newline, which
# would let Action("450\n", "text") put a second line on the wire.
_NUMERIC = re.compile(r"[45][0-9][0-9]")
_RESTRICTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")

#: An RFC 3463 enhanced status code as Postfix recognises one at the start
#: of a text (its dsn_valid()): class, subject and detail, then a space or
#: the end. Sent with nothing after it, real Postfix 3.7 replies with
#: whatever an earlier, longer policy answer left in its buffer, which may
#: be another client's text.
_STATUS_CODE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?= |$)")

#: What Postfix needs after these verbs; anything else it ignores with a
#: warning and the mail passes (Postfix 3.7.11, smtpd_check.c). A header
#: name is printable ASCII but the colon, then the colon (RFC 5322).
_ARGUMENTS = {
    "PREPEND": (re.compile(r"[!-9;-~]+ *:.*"), "a header line, 'Name: text'"),
    "FILTER": (re.compile(r"[^: ]+:[^ ]*"), "transport:destination"),
    "REDIRECT": (re.compile(r"[^ @]+@[^ @]+"), "one user@domain address"),
    "BCC": (re.compile(r"[^ @]+@[^ @]+"), "one user@domain address"),
}

#: Longest text we send. Postfix puts a prefix such as
#: C{"554 5.7.1 <recipient>: Recipient address rejected: "} in front of it,
#: and an SMTP reply line may hold 512 octets in all (RFC 5321).
MAX_TEXT_LENGTH = 256

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_SPACES = re.compile(r" {2,}")


class ActionError(ValueError):
    """
    A string is not an action Postfix would accept.
    """


def clean_text(text: str, limit: int = MAX_TEXT_LENGTH) -> str:
    """
    Make a reply text safe to put on the wire: every character outside
    printable ASCII (CR, LF, NUL, other control characters and non-ASCII)
    becomes a space or C{"?"}, runs of spaces fold, and the result is cut to
    C{limit} characters.
    """
    if _UNPRINTABLE.search(text):
        text = _UNPRINTABLE.sub(
            lambda match: " " if match.group() < " " or match.group() == "\x7f" else "?",
            text,
        )
        text = _SPACES.sub(" ", text)
    text = text.strip()
    if len(text) > limit:
        text = text[:limit].rstrip()
    return text


def value_of(verb: str, text: str) -> str:
    """
    The action as written after C{action=}: the verb, and the text if any.
    """
    return f"{verb} {text}" if text else verb


class Action:
    """
    A validated policy action: a verb and an optional text.

    @ivar verb: the verb as Postfix reads it (uppercased for the access(5)
        verbs, as written for a restriction class).
    @ivar text: the cleaned text, possibly empty.
    @ivar line: the exact bytes to send, C{b"action=...\\n\\n"}.
    """

    __slots__ = ("verb", "text", "line")

    verb: str
    text: str
    line: bytes

    def __init__(self, verb: str, text: str = "") -> None:
        """
        @raise ActionError: when the verb is not one Postfix knows, nor could
            name a restriction class, or a verb lacks its argument.
        """
        if not isinstance(verb, str) or not isinstance(text, str):
            raise ActionError("an action's verb and text must be strings")
        upper = verb.upper()
        if upper in _OPTIONAL_TEXT or upper in _REQUIRED_ARGUMENT:
            verb = upper
        elif not _NUMERIC.fullmatch(verb) and not _RESTRICTION_NAME.fullmatch(verb):
            raise ActionError(f"{verb!r} is not a Postfix access(5) action")
        # Validated as cleaned, i.e. as sent: cleaning strips, so
        # "554 5.7.1 " or "REJECT 5.7.1\r\n" end up as a code alone.
        text = clean_text(text)
        if verb in _REQUIRED_ARGUMENT:
            if not text:
                raise ActionError(f"{verb} needs an argument")
            pattern, wanted = _ARGUMENTS[verb]
            if not pattern.fullmatch(text):
                # Postfix would log a warning and let the mail pass.
                raise ActionError(f"{verb} needs {wanted}, not {text!r}")
        elif _NUMERIC.fullmatch(verb) and not text:
            # Postfix 3.7 takes a bare code as OK: the mail would pass.
            raise ActionError(f"{verb} needs a text after the code (alone, Postfix reads it as OK)")
        code = _STATUS_CODE.match(text)
        if code is not None and code.end() == len(text):
            raise ActionError(
                f"{value_of(verb, text)!r} has a status code but no text after it"
                " (Postfix would reply with text left over from an earlier answer)"
            )
        value = value_of(verb, text)
        object.__setattr__(self, "verb", verb)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "line", b"action=" + value.encode("ascii") + b"\n\n")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Action is immutable")

    @classmethod
    def parse(cls, value: str, restriction_classes: Collection[str] = ()) -> Action:
        """
        Parse and validate an action as an administrator or a check writes
        it, e.g. C{"REJECT Not allowed"} or C{"550 5.7.1 No relay"}.

        @param restriction_classes: names the administrator declared in
            Postfix (smtpd_restriction_classes or restriction names) that may
            be returned as actions.
        @raise ActionError: when Postfix would not accept the action.
        """
        if not isinstance(value, str):
            raise ActionError(f"an action must be a string, not {type(value).__name__}")
        parts = value.split(None, 1)
        if not parts:
            raise ActionError("an action must not be empty (Postfix reads it as OK)")
        verb = parts[0]
        text = parts[1] if len(parts) > 1 else ""
        action = cls(verb, text)
        action.check_restriction_class(restriction_classes)
        return action

    @property
    def is_restriction_class(self) -> bool:
        """
        Whether the verb names a restriction class rather than an access(5)
        action.
        """
        verb = self.verb
        return not (
            verb in _OPTIONAL_TEXT or verb in _REQUIRED_ARGUMENT or _NUMERIC.fullmatch(verb)
        )

    def check_restriction_class(self, restriction_classes: Collection[str]) -> None:
        """
        @raise ActionError: when this action names a restriction class that
            is not among C{restriction_classes}, or gives one a text.
        """
        if not self.is_restriction_class:
            return
        if self.verb not in restriction_classes:
            raise ActionError(
                f"{self.verb!r} is not a Postfix access(5) action"
                " nor a restriction class declared in restriction_classes"
            )
        if self.text:
            raise ActionError(f"the restriction class {self.verb!r} takes no text")

    @property
    def decisive(self) -> bool:
        """
        Whether this action ends the chain: anything but DUNNO does.
        """
        return self.verb != "DUNNO"

    def __str__(self) -> str:
        return f"{self.verb} {self.text}" if self.text else self.verb

    def __repr__(self) -> str:
        return f"Action({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Action):
            return self.verb == other.verb and self.text == other.text
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.verb, self.text))


DUNNO = Action("DUNNO")
OK = Action("OK")


def as_action(result: object, restriction_classes: Collection[str] = ()) -> Action:
    """
    Turn what a check returned (an L{Action} or an action string) into a
    validated L{Action}.

    @raise ActionError: when it is neither, or not valid.
    """
    if isinstance(result, Action):
        result.check_restriction_class(restriction_classes)
        return result
    if isinstance(result, str):
        return Action.parse(result, restriction_classes)
    raise ActionError(f"a check returned {result!r}, not an action")
