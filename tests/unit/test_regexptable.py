"""
Tests for L{pfxpold.regexptable}: Postfix regexp_table(5) and pcre_table(5)
files as the man pages describe them, the flags, if/endif, $n results,
errors with their line, and patterns that would stall a backtracking
engine.
"""

from __future__ import annotations

import re2
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.accessmap import MapError
from pfxpold.action import Action
from pfxpold.regexptable import PCRE, REGEXP, TableLookupError, parse


def table(text: str, table_format: str = REGEXP, classes: tuple[str, ...] = ()):
    return parse(text.splitlines(True), "t.regexp", table_format, classes)


def answer(text: str, value: str, table_format: str = REGEXP) -> str | None:
    found = table(text, table_format).lookup(value)
    return None if found is None else str(found)


# In the spirit of regexp_table(5)'s "EXAMPLE SMTPD ACCESS MAP".
REGEXP_EXAMPLE = """\
# Disallow sender-specified routing. This is a must if you relay mail
# for other domains.
/[%!@].*[%!@]/       550 Sender-specified routing rejected

# Postmaster is OK, that way they can talk to us about how to fix
# their problem.
/^postmaster@/       OK

# Protect your outgoing majordomo exploders
if !/^owner-/
/^(.*)-outgoing@(.*)$/   550 Use ${1}@${2} instead
endif
"""

# In the spirit of pcre_table(5)'s example, without its look-ahead.
PCRE_EXAMPLE = """\
# Protect your outgoing majordomo exploders
if !/^owner-/
/^(.*)-outgoing@(.*)/ 550 Use ${1}@${2} instead
endif

# A multi-line entry. The text is sent as one line.
#
/^noddy@my\\.domain$/
 550 This user is a funny one. You really don't want to send mail to
 them as it only makes their head spin.
"""


class ManPageExampleTests(SynchronousTestCase):
    """
    The tables of the man pages answer as Postfix would.
    """

    def test_regexp_example(self):
        """regexp_table(5)'s access map: routing, postmaster, exploders."""
        self.assertEqual(
            answer(REGEXP_EXAMPLE, "a%b@example.com"), "550 Sender-specified routing rejected"
        )
        self.assertEqual(answer(REGEXP_EXAMPLE, "Postmaster@example.com"), "OK")
        self.assertEqual(
            answer(REGEXP_EXAMPLE, "list-outgoing@example.com"),
            "550 Use list@example.com instead",
        )
        self.assertIsNone(answer(REGEXP_EXAMPLE, "owner-list-outgoing@example.com"))
        self.assertIsNone(answer(REGEXP_EXAMPLE, "alice@example.com"))

    def test_pcre_example(self):
        """pcre_table(5)'s access map, and its entry continued over three lines."""
        self.assertEqual(
            answer(PCRE_EXAMPLE, "list-outgoing@example.com", PCRE),
            "550 Use list@example.com instead",
        )
        self.assertIsNone(answer(PCRE_EXAMPLE, "owner-list-outgoing@example.com", PCRE))
        self.assertEqual(
            answer(PCRE_EXAMPLE, "noddy@my.domain", PCRE),
            "550 This user is a funny one. You really don't want to send mail to"
            " them as it only makes their head spin.",
        )

    def test_pcre_lookahead_is_a_load_error(self):
        """
        The man page's own /^(?!owner-)/ needs look-ahead, which RE2 has
        not: a load error naming the line, not a pattern that means
        something else.
        """
        error = self.assertRaises(
            MapError, table, "\n/^(?!owner-)(.*)-outgoing@(.*)/ 550 Use ${1}@${2} instead\n", PCRE
        )
        self.assertEqual(error.line, 2)
        self.assertIn("not supported by RE2", error.reason)
        self.assertIn("(?!", str(error))

    def test_pcre_friend_lookahead_is_a_load_error(self):
        """
        pcre_table(5)'s friend@ entry, /^(friend@(?!my\\.domain$).*)$/, needs
        look-ahead too: refused with its line, after the lines before it
        were read.
        """
        text = (
            "# Bounce friend@whatever, except when whatever is our domain.\n"
            "/^(friend@(?!my\\.domain$).*)$/  550 Stick this in your pipe $1\n"
        )
        error = self.assertRaises(MapError, table, text, PCRE)
        self.assertEqual(error.line, 2)
        self.assertIn("not supported by RE2", error.reason)

    def test_header_filter_example(self):
        """
        The header filter map of both man pages: junk subjects and a
        recipient, whatever their case; other headers pass.
        """
        text = (
            "# These were once common in junk mail.\n"
            "/^Subject: make money fast/     REJECT\n"
            "/^To: friend@public\\.com/       REJECT\n"
        )
        for table_format in (REGEXP, PCRE):
            self.assertEqual(answer(text, "Subject: Make Money Fast!!!", table_format), "REJECT")
            self.assertEqual(answer(text, "To: Friend@Public.com", table_format), "REJECT")
            self.assertIsNone(answer(text, "To: friend@publicXcom", table_format))
            self.assertIsNone(answer(text, "X-Subject: make money fast", table_format))

    def test_body_filter_example(self):
        """
        The body filter map of both man pages: a line of 60 or more
        base64 characters is OK (and skipped); a shorter one is not.
        """
        text = (
            "# First skip over base 64 encoded text to save CPU cycles.\n"
            "~^[[:alnum:]+/]{60,}$~          OK\n"
            "\n"
            "# Put your own body patterns here.\n"
        )
        for table_format in (REGEXP, PCRE):
            self.assertEqual(answer(text, "QUJD+/" * 10, table_format), "OK")
            self.assertIsNone(answer(text, "QUJD+/" * 9, table_format))
            self.assertIsNone(answer(text, "QUJD+/" * 10 + "=", table_format))

    def test_first_match_wins(self):
        """Rules are tried in order; the first that matches answers."""
        text = "/^a/ REJECT first\n/^ab/ REJECT second\n"
        self.assertEqual(answer(text, "abc"), "REJECT first")
        self.assertEqual(table(text).trace("abc"), (1, Action.parse("REJECT first")))


class SyntaxTests(SynchronousTestCase):
    """
    Lines, negation, delimiters, if/endif and the second pattern.
    """

    def test_comments_blank_lines_and_continuations(self):
        """Comments and blank lines are skipped; indented lines continue a rule."""
        text = "# comment\n\n   # indented comment\n/^a/\n  REJECT\n  with text\n/b/ OK\n"
        parsed = table(text)
        self.assertEqual(parsed.entries, 2)
        self.assertEqual(answer(text, "a"), "REJECT with text")
        self.assertEqual(table(text).trace("b")[0], 7)

    def test_continuation_keeps_pattern_whitespace(self):
        """A pattern continued on the next line keeps that line's whitespace."""
        text = "/a\n  b/ OK\n"
        self.assertEqual(answer(text, "a  b"), "OK")
        self.assertIsNone(answer(text, "a b"))

    def test_negation(self):
        """!/pattern/ answers for values the pattern does not match; !! cancels."""
        text = "!/@example\\.com$/ REJECT not ours\n"
        self.assertEqual(answer(text, "a@example.net"), "REJECT not ours")
        self.assertIsNone(answer(text, "a@example.com"))
        self.assertEqual(answer("!!/x/ OK\n", "x"), "OK")

    def test_other_delimiters(self):
        """Any non-alphanumeric character delimits; an escaped one is part of the pattern."""
        self.assertEqual(answer("~^[[:alnum:]+/]{3}$~ OK\n", "a+/"), "OK")
        self.assertEqual(answer("/a\\/b/ OK\n", "a/b"), "OK")
        self.assertEqual(answer("|a\\|b| OK\n", "a|b"), "OK")

    def test_second_pattern_regexp(self):
        """regexp's /pattern1/!/pattern2/ matches pattern1 but not pattern2."""
        text = "/^(.*)-outgoing@(.*)$/!/^owner-/ 550 Use ${1}@${2} instead\n"
        self.assertEqual(answer(text, "l-outgoing@x.example"), "550 Use l@x.example instead")
        self.assertIsNone(answer(text, "owner-l-outgoing@x.example"))

    def test_if_endif_nested(self):
        """if/endif blocks nest; a failed condition skips its whole block."""
        text = (
            "if /@example\\.com$/\n"
            "if !/^postmaster@/\n"
            "/^spam/ REJECT spam\n"
            "endif\n"
            "/^postmaster@/ OK\n"
            "ENDIF\n"
            "/^spam/ HOLD elsewhere\n"
        )
        self.assertEqual(answer(text, "spam1@example.com"), "REJECT spam")
        self.assertEqual(answer(text, "postmaster@example.com"), "OK")
        self.assertEqual(answer(text, "spam1@example.net"), "HOLD elsewhere")
        self.assertIsNone(answer(text, "alice@example.com"))

    def test_if_negated(self):
        """if !/pattern/ enters its block for values the pattern does not match."""
        text = "if !/^owner-/\n/outgoing/ REJECT no\nendif\n"
        self.assertEqual(answer(text, "x-outgoing@y"), "REJECT no")
        self.assertIsNone(answer(text, "owner-x-outgoing@y"))

    def test_substitution_forms(self):
        """$1, ${1}, $(1) and $$; an unmatched group is empty text."""
        text = "/^(a)(b)?(c)@/ REJECT $1-${2}-$(3) costs $$5\n"
        self.assertEqual(answer(text, "abc@x"), "REJECT a-b-c costs $5")
        self.assertEqual(answer(text, "ac@x"), "REJECT a--c costs $5")

    def test_substitution_cannot_inject(self):
        """
        Captured text goes through the action's cleaning: a control
        character cannot start a second line of the answer, and the verb is
        the table's.
        """
        parsed = table("/^(.*)@/ REJECT no $1\n")
        action = parsed.lookup("x\nOK\r\n@example.com")
        self.assertEqual(action.verb, "REJECT")
        self.assertEqual(action.line, b"action=REJECT no x OK\n\n")

    def test_substitution_making_an_invalid_action(self):
        """A result made invalid by its captured text fails the lookup (on_error)."""
        parsed = table("/^(.*)@old\\.example$/ REDIRECT $1@new.example\n")
        self.assertEqual(str(parsed.lookup("bob@old.example")), "REDIRECT bob@new.example")
        error = self.assertRaises(TableLookupError, parsed.lookup, "a@b@old.example")
        self.assertIn("t.regexp:1", str(error))


class FlagTests(SynchronousTestCase):
    """
    Every flag of both formats: mapped to RE2, or refused by name.
    """

    def test_case_insensitive_by_default(self):
        """Both formats match case-insensitively; 'i' makes a pattern case-sensitive."""
        for table_format in (REGEXP, PCRE):
            self.assertEqual(answer("/^abc$/ OK\n", "ABC", table_format), "OK")
            self.assertIsNone(answer("/^abc$/i OK\n", "ABC", table_format))
            self.assertEqual(answer("/^abc$/i OK\n", "abc", table_format), "OK")
            self.assertEqual(answer("/^abc$/ii OK\n", "ABC", table_format), "OK")

    def test_multi_line(self):
        """'m' lets ^ and $ match at a newline, in both formats."""
        for table_format in (REGEXP, PCRE):
            self.assertIsNone(answer("/^b$/ OK\n", "a\nb", table_format))
            self.assertEqual(answer("/^b$/m OK\n", "a\nb", table_format), "OK")

    def test_dot_matches_newline(self):
        """
        A dot matches a newline by default (POSIX without REG_NEWLINE;
        Postfix's PCRE_DOTALL); 's' (pcre) and 'm' (regexp) turn that off.
        """
        self.assertEqual(answer("/a.b/ OK\n", "a\nb", PCRE), "OK")
        self.assertIsNone(answer("/a.b/s OK\n", "a\nb", PCRE))
        self.assertEqual(answer("/a.b/ OK\n", "a\nb", REGEXP), "OK")
        self.assertIsNone(answer("/a.b/m OK\n", "a\nb", REGEXP))

    def test_anchored(self):
        """pcre's 'A' anchors the pattern at the start of the value."""
        self.assertEqual(answer("/b/ OK\n", "ab", PCRE), "OK")
        self.assertIsNone(answer("/b/A OK\n", "ab", PCRE))
        self.assertEqual(answer("/a|b/A OK\n", "bc", PCRE), "OK")

    def test_ungreedy(self):
        """pcre's 'U' makes quantifiers lazy, which shows in what $1 captures."""
        self.assertEqual(answer("/^(a+)/ REJECT $1\n", "aaa", PCRE), "REJECT aaa")
        self.assertEqual(answer("/^(a+)/U REJECT $1\n", "aaa", PCRE), "REJECT a")

    def test_dollar_end_only_and_extra(self):
        """pcre's 'E' and 'X' are accepted: RE2 already behaves so."""
        self.assertEqual(answer("/a$/E OK\n", "ba", PCRE), "OK")
        self.assertEqual(answer("/a/X OK\n", "a", PCRE), "OK")
        self.assertRaises(MapError, table, "/\\q/X OK\n", PCRE)

    def test_extended_flags_refused(self):
        """'x' means POSIX basic syntax (regexp) or verbose mode (pcre): both refused by name."""
        error = self.assertRaises(MapError, table, "/a/x OK\n", REGEXP)
        self.assertIn("POSIX basic syntax", error.reason)
        error = self.assertRaises(MapError, table, "\n\n/a b/x OK\n", PCRE)
        self.assertEqual(error.line, 3)
        self.assertIn("flag 'x'", error.reason)

    def test_unknown_flags(self):
        """A flag the format does not know is an error; regexp knows no 's'."""
        self.assertIn("unknown flag 's'", self.assertRaises(MapError, table, "/a/s OK\n").reason)
        self.assertIn("unknown flag 'q'", self.assertRaises(MapError, table, "/a/q OK\n", PCRE).reason)


class ErrorTests(SynchronousTestCase):
    """
    Every mistake is an error naming the file and the line.
    """

    def assertError(self, text: str, line: int, words: str, table_format: str = REGEXP) -> None:
        error = self.assertRaises(MapError, table, text, table_format)
        self.assertEqual(error.line, line)
        self.assertIn(words, error.reason)
        self.assertTrue(str(error).startswith(f"t.regexp:{line}: "))

    def test_errors(self):
        """Structure, results, substitutions and actions are checked at load."""
        self.assertError("/a/ OK\nendif\n", 2, "endif without if")
        self.assertError("/a/ OK\nif /a/\n/b/ OK\n", 2, "if without endif")
        self.assertError("if /a/\n  /b/ OK\nendif\n", 1, "do not indent")
        self.assertError("/a/ OK\n/unclosed OK\n", 2, "no closing '/'")
        self.assertError("/a/\n", 1, "has no result")
        self.assertError("hello OK\n", 1, "not a rule")
        self.assertError("/a/ FROBNICATE\n", 1, "not a Postfix access(5) action")
        self.assertError("/a/ 550\n", 1, "needs a text after the code")
        self.assertError("/(a)/ REJECT $2\n", 1, "has only 1 group")
        self.assertError("/a/ REJECT $0\n", 1, "numbered from 1")
        self.assertError("/a/ REJECT $x\n", 1, "not a group number")
        self.assertError("/a/ REJECT costs $ 5\n", 1, "without a group number")
        self.assertError("/a/ REJECT ${1\n", 1, "no closing")
        self.assertError("!/(a)/ REJECT $1\n", 1, "negated pattern captures nothing")
        self.assertError("/(.*)/ $1\n", 1, "verb cannot come from a $n group")
        self.assertError("/(.*)/ REJECT$1\n", 1, "verb cannot come from a $n group")
        self.assertError("/[[=a=]]/ OK\n", 1, "collating elements")
        self.assertError("/\\<spam\\>/ OK\n", 1, "GNU regex anchor")
        self.assertError("/(a)\\1/ OK\n", 1, "not supported by RE2", PCRE)
        self.assertError("/a(?<=b)/ OK\n", 1, "not supported by RE2", PCRE)
        self.assertError("/a++/ OK\n", 1, "not supported by RE2", PCRE)
        self.assertError("/a\\Z/ OK\n", 1, "not supported by RE2", PCRE)
        self.assertError("/(?>a)/ OK\n", 1, "not supported by RE2", PCRE)

    def test_restriction_classes(self):
        """A restriction class may be a result once declared, never with a $n text."""
        self.assertRaises(MapError, table, "/a/ relay_check\n")
        self.assertEqual(
            str(table("/a/ relay_check\n", classes=("relay_check",)).lookup("a")), "relay_check"
        )
        self.assertRaises(MapError, table, "/(a)/ relay_check $1\n", REGEXP, ("relay_check",))

    def test_posix_bracket_backslash(self):
        """In a POSIX bracket expression a backslash is literal; in PCRE it escapes."""
        self.assertEqual(answer("/^[\\.]$/ OK\n", "\\", REGEXP), "OK")
        self.assertIsNone(answer("/^[\\.]$/ OK\n", "\\", PCRE))
        self.assertEqual(answer("/^[]a]$/ OK\n", "]", REGEXP), "OK")
        # In PCRE (and RE2) an escaped < is the character itself.
        self.assertEqual(answer("/\\<a/ OK\n", "<a", PCRE), "OK")


class UnreachableTests(SynchronousTestCase):
    """
    Rules after one that matches every value are found for --check-config.
    """

    def test_catch_all(self):
        """Patterns that match everything hide the rest of their block only."""
        for catch_all in ("/^/", "/$/", "/.*/", "/x*/", "/^(.*)$/", "/^.*/A"):
            parsed = table(f"/a/ OK\n{catch_all} DUNNO\n/b/ OK\nif /c/\n/d/ OK\nendif\n", PCRE)
            self.assertEqual(parsed.unreachable(), [(3, 2), (4, 2)], catch_all)

    def test_inside_if(self):
        """A catch-all inside an if block hides only that block's later rules."""
        parsed = table("if /a/\n/^/ OK\n/b/ OK\nendif\n/c/ OK\n")
        self.assertEqual(parsed.unreachable(), [(3, 2)])

    def test_not_catch_all(self):
        """Anchored, negated or second-pattern rules do not hide later ones."""
        for rule in ("/^$/", "/^a/", "!/^/", "/\\bx*/", "/^/!/b/"):
            self.assertEqual(table(f"{rule} OK\n/b/ OK\n").unreachable(), [], rule)


class LinearTimeTests(SynchronousTestCase):
    """
    Patterns that take a backtracking engine exponential time run in RE2.
    """

    CATASTROPHIC = ("(a+)+$", "(a|a)+$", "(a|aa)+$", "(a*)*b", "(.*a){12}$", "^(\\w+\\s?)*$")

    def test_engine_is_re2(self):
        """
        Every compiled pattern is an RE2 one, so a 4 KiB adversarial value
        costs time linear in its length, whatever the pattern.
        """
        hostile = "a" * 4096 + "!"
        for table_format in (REGEXP, PCRE):
            for pattern in self.CATASTROPHIC:
                text = f"/{pattern}/ REJECT slow\nif /{pattern}/\n/x/ OK\nendif\n"
                parsed = table(text, table_format)
                first = parsed.rules[0]
                self.assertIsInstance(first.pattern.compiled, re2._Regexp)
                self.assertIsInstance(parsed.rules[1].pattern.compiled, re2._Regexp)
                # Runs to the end: no match for the ones needing a b or the
                # end after a's, no exception, no backtracking engine.
                parsed.lookup(hostile)
