"""
Tests for L{pfxpold.action}: only lines Postfix accepts reach the wire.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.action import (
    DUNNO,
    MAX_TEXT_LENGTH,
    OK,
    Action,
    ActionError,
    as_action,
    clean_text,
)

OPTIONAL_TEXT = (
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
)
REQUIRED_ARGUMENT = {
    "FILTER": "smtp:[127.0.0.1]:10025",
    "REDIRECT": "abuse@example.com",
    "BCC": "archive@example.com",
    "PREPEND": "X-Policy: checked",
}


class VerbTests(SynchronousTestCase):
    """
    Every access(5) verb is accepted, with or without text as Postfix wants.
    """

    def test_optional_text_verbs(self):
        """Each verb that may stand alone does, and takes a text too."""
        for verb in OPTIONAL_TEXT:
            self.assertEqual(Action.parse(verb).line, f"action={verb}\n\n".encode())
            action = Action.parse(f"{verb} some text")
            self.assertEqual(action.verb, verb)
            self.assertEqual(action.text, "some text")
            self.assertEqual(action.line, f"action={verb} some text\n\n".encode())

    def test_verbs_case_insensitive(self):
        """Verbs are read in any case and sent uppercased, the text unchanged."""
        action = Action.parse("defer_if_permit Try Later")
        self.assertEqual(str(action), "DEFER_IF_PERMIT Try Later")

    def test_required_argument(self):
        """FILTER, REDIRECT, BCC and PREPEND need an argument."""
        for verb, argument in REQUIRED_ARGUMENT.items():
            self.assertEqual(str(Action.parse(f"{verb} {argument}")), f"{verb} {argument}")
            error = self.assertRaises(ActionError, Action.parse, verb)
            self.assertIn("argument", str(error))
            self.assertRaises(ActionError, Action, verb, " \r\n ")

    def test_bad_arguments(self):
        """
        Arguments Postfix would ignore with a warning, letting the mail
        pass, are refused: PREPEND without C{header: text}, FILTER without
        C{transport:destination}, REDIRECT and BCC without one C{user@domain}.
        """
        for value in (
            "PREPEND hello",
            "PREPEND : no name",
            "PREPEND X Policy: spaces in the name",
            "PREPEND 5.7.1",
            "FILTER smtp",
            "FILTER :destination",
            "FILTER smtp:[127.0.0.1]:10025 extra",
            "REDIRECT abuse",
            "REDIRECT abuse@",
            "REDIRECT @example.com",
            "REDIRECT a@example.com b@example.com",
            "REDIRECT a@b@example.com",
            "BCC archive",
            "BCC a@example.com, b@example.com",
        ):
            error = self.assertRaises(ActionError, Action.parse, value)
            self.assertIn("needs", str(error))

    def test_good_arguments(self):
        """Arguments of the form Postfix wants are sent as they are."""
        for value in (
            "PREPEND X-Policy: checked",
            "PREPEND X-Empty:",
            "PREPEND X-Spaced : value",
            "FILTER smtp:[127.0.0.1]:10025",
            "FILTER filter:",
            "FILTER lmtp:unix:/run/lmtp",
            "REDIRECT abuse@example.com",
            "BCC archive@example.com",
        ):
            self.assertEqual(str(Action.parse(value)), value)

    def test_numeric(self):
        """4NN and 5NN codes are actions, with an enhanced status code in the text."""
        self.assertEqual(str(Action.parse("450 4.7.1 Try later")), "450 4.7.1 Try later")
        self.assertEqual(str(Action.parse("554 5.7.1 No")), "554 5.7.1 No")
        self.assertEqual(Action.parse("550 No").line, b"action=550 No\n\n")
        self.assertTrue(Action.parse("421 4.3.2 Closing").decisive)

    def test_bare_numeric(self):
        """
        A 3-digit code without a text is refused: Postfix 3.7 reads a bare
        C{554} or C{450} as OK, and the mail passes.
        """
        for value in ("554", "450", "421", "550 ", "554 \r\n", "550\t"):
            error = self.assertRaises(ActionError, Action.parse, value)
            self.assertIn("needs a text", str(error))
        self.assertRaises(ActionError, Action, "554")
        self.assertRaises(ActionError, Action, "554", " \x00 ")


class StatusCodeWithoutTextTests(SynchronousTestCase):
    """
    An enhanced status code is never sent without a text after it: Postfix
    3.7 then replies with text left over from an earlier policy answer,
    possibly another client's.
    """

    def test_code_alone_refused(self):
        """A verb or 3-digit code followed by a status code and nothing else is refused."""
        for value in (
            "REJECT 5.7.1",
            "550 5.1.1",
            "DEFER 4.7.1",
            "DEFER_IF_PERMIT 4.3.0",
            "DEFER_IF_REJECT 4.7.1",
            "450 4.7.1",
            "421 4.3.2",
            "554 2.0.0",
            "550 5.123.456",
            "HOLD 5.7.1",
        ):
            error = self.assertRaises(ActionError, Action.parse, value)
            self.assertIn("no text after it", str(error))

    def test_whitespace_is_no_text(self):
        """
        Text made only of spaces, tabs or control characters counts as no
        text: C{554 5.7.1 } is refused, not stripped to C{554 5.7.1}.
        """
        for verb, text in (
            ("554", "5.7.1 "),
            ("554", "5.7.1  \t "),
            ("REJECT", "5.7.1\r\n"),
            ("REJECT", "5.7.1 \x00"),
            ("REJECT", " 5.7.1 "),
        ):
            self.assertRaises(ActionError, Action, verb, text)
        self.assertRaises(ActionError, Action.parse, "554 5.7.1 ")

    def test_code_with_text(self):
        """A status code followed by a text is sent as it is."""
        self.assertEqual(str(Action.parse("REJECT 5.7.1 No relay")), "REJECT 5.7.1 No relay")
        self.assertEqual(str(Action.parse("550 5.1.1 Unknown user")), "550 5.1.1 Unknown user")
        self.assertEqual(Action("554", "5.7.1 x").line, b"action=554 5.7.1 x\n\n")

    def test_not_a_status_code(self):
        """Texts that only look like a code are texts."""
        for value in ("REJECT 5.7", "REJECT 5.7.1x", "REJECT 6.7.1", "550 5.7.1.2", "REJECT 5.1234.1"):
            self.assertEqual(str(Action.parse(value)), value)

    def test_bad_numeric(self):
        """Codes outside 4NN/5NN and non-codes are refused."""
        for value in ("250 ok", "350", "45", "4500 x", "600 no", "4x0 no"):
            self.assertRaises(ActionError, Action.parse, value)

    def test_unknown_verb(self):
        """An unknown verb is not a restriction class unless declared."""
        error = self.assertRaises(ActionError, Action.parse, "PERMIT")
        self.assertIn("PERMIT", str(error))
        self.assertRaises(ActionError, Action.parse, "ACCEPT all")

    def test_declared_restriction_class(self):
        """A declared restriction class is an action, as written, without text."""
        action = Action.parse("local_only", ["local_only"])
        self.assertEqual(action.line, b"action=local_only\n\n")
        self.assertTrue(action.is_restriction_class)
        self.assertTrue(action.decisive)
        self.assertFalse(Action.parse("REJECT").is_restriction_class)
        self.assertFalse(Action.parse("450 x").is_restriction_class)

    def test_undeclared_restriction_class(self):
        """An undeclared name is refused, naming restriction_classes."""
        error = self.assertRaises(ActionError, Action.parse, "local_only", ["other"])
        self.assertIn("restriction_classes", str(error))

    def test_restriction_class_takes_no_text(self):
        """A restriction class with a text is refused."""
        self.assertRaises(ActionError, Action.parse, "local_only now", ["local_only"])

    def test_bad_names(self):
        """Names that cannot be restriction classes are refused even if declared."""
        for name in ("-x", "1abc", "a/b", "a=b", "a\x00"):
            self.assertRaises(ActionError, Action.parse, name, [name])

    def test_empty_refused(self):
        """An empty or blank action is refused: Postfix would read it as OK."""
        for value in ("", " ", "\t\r\n"):
            error = self.assertRaises(ActionError, Action.parse, value)
            self.assertIn("empty", str(error))

    def test_not_a_string(self):
        """Only strings are actions."""
        self.assertRaises(ActionError, Action.parse, None)
        self.assertRaises(ActionError, Action, b"OK")
        self.assertRaises(ActionError, Action, "REJECT", b"text")

    def test_decisive(self):
        """Only DUNNO is not decisive, whatever its text."""
        self.assertFalse(DUNNO.decisive)
        self.assertFalse(Action("DUNNO", "maybe").decisive)
        self.assertTrue(OK.decisive)
        self.assertTrue(Action("WARN", "x").decisive)

    def test_immutable(self):
        """An action cannot be changed once built."""
        self.assertRaises(AttributeError, setattr, OK, "verb", "REJECT")
        self.assertRaises(AttributeError, setattr, OK, "line", b"action=REJECT\n\n")

    def test_equality_repr(self):
        """Actions compare and hash by verb and text."""
        self.assertEqual(Action.parse("reject  no"), Action("REJECT", "no"))
        self.assertEqual(hash(Action.parse("reject no")), hash(Action("REJECT", "no")))
        self.assertNotEqual(Action("REJECT", "no"), Action("REJECT"))
        self.assertNotEqual(OK, "OK")
        self.assertEqual(repr(Action("REJECT", "no")), "Action('REJECT no')")


class TextTests(SynchronousTestCase):
    """
    Reply texts are printable ASCII, one line, capped.
    """

    def test_control_characters(self):
        """CR, LF, NUL, TAB and other control characters become spaces."""
        action = Action("REJECT", "a\r\nREJECT b\x00c\td\x1b[0m\x7fe")
        self.assertEqual(action.text, "a REJECT b c d [0m e")
        self.assertEqual(action.line.count(b"\n"), 2)

    def test_non_ascii(self):
        """Non-ASCII characters become C{?}."""
        self.assertEqual(Action("REJECT", "caf\u00e9 \u2028x").text, "caf? ?x")

    def test_cap(self):
        """The text is cut to 256 characters."""
        action = Action("REJECT", "x" * 10000)
        self.assertEqual(len(action.text), MAX_TEXT_LENGTH)
        self.assertEqual(len(action.line), len("action=REJECT ") + MAX_TEXT_LENGTH + 2)

    def test_clean_text_limit(self):
        """clean_text strips, folds spaces it made, and cuts at the limit."""
        self.assertEqual(clean_text("  a\n\n\nb  "), "a b")
        self.assertEqual(clean_text("abc def", limit=4), "abc")

    def test_verb_with_newline(self):
        """A verb with a trailing newline never makes a second line."""
        for verb in ("450\n", "OK\n", "local_only\n", "REJECT\r"):
            self.assertRaises(ActionError, Action, verb, "text")
            self.assertRaises(ActionError, Action, verb)


class AsActionTests(SynchronousTestCase):
    """
    L{as_action} takes what a check returned.
    """

    def test_string_and_action(self):
        """Strings are parsed, actions are passed through."""
        self.assertEqual(as_action("OK"), OK)
        self.assertIs(as_action(DUNNO), DUNNO)

    def test_action_naming_undeclared_class(self):
        """An Action built with an undeclared restriction class is refused."""
        self.assertRaises(ActionError, as_action, Action("local_only"))
        self.assertEqual(as_action(Action("local_only"), ["local_only"]).verb, "local_only")

    def test_other_types(self):
        """None, numbers and bytes are not actions."""
        for value in (None, 550, b"OK", ["OK"]):
            self.assertRaises(ActionError, as_action, value)


verbs = st.sampled_from(
    OPTIONAL_TEXT + tuple(REQUIRED_ARGUMENT) + ("450", "554", "local_only", "bogus")
)


class PropertyTests(SynchronousTestCase):
    """
    Whatever a check returns, the line sent is one action line.
    """

    def assertOneLine(self, action: Action) -> None:
        line = action.line
        self.assertTrue(line.startswith(b"action="))
        self.assertTrue(line.endswith(b"\n\n"))
        self.assertFalse(line.endswith(b"\n\n\n"))
        self.assertEqual(line.count(b"\n"), 2)
        self.assertNotIn(b"\r", line)
        self.assertNotIn(b"\x00", line)
        self.assertLessEqual(len(line), len("action=DEFER_IF_PERMIT ") + MAX_TEXT_LENGTH + 2)
        line.decode("ascii")
        self.assertGreater(len(line), len(b"action=\n\n"))

    @given(verbs, st.text())
    def test_any_text(self, verb, text):
        """Any text with any verb gives one line or an ActionError."""
        try:
            action = Action.parse(f"{verb} {text}", ["local_only"])
        except ActionError:
            return
        self.assertOneLine(action)

    @given(st.text(), st.text())
    def test_constructor(self, verb, text):
        """Any verb and text given to the constructor gives one line or an ActionError."""
        try:
            action = Action(verb, text)
        except ActionError:
            return
        self.assertOneLine(action)

    @given(st.text())
    def test_parse_anything(self, value):
        """Any string parses to one line or raises ActionError."""
        try:
            action = Action.parse(value, ["local_only"])
        except ActionError:
            return
        self.assertOneLine(action)
