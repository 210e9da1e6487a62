"""
Tests for L{pfxpold.escape}: log-line escaping and the control-character
test every backend lookup applies.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.escape import escape, has_control, is_clean

HOSTILE = {
    "evil\rFORGED OK@x.test": "evil\\x0dFORGED OK@x.test",
    "a\nb": "a\\x0ab",
    "\x1b[31mred": "\\x1b[31mred",
    "tab\there": "tab\\x09here",
    "v\x0btab": "v\\x0btab",
    "nel\x85": "nel\\x85",
    "ls\u2028ps\u2029": "ls\\u2028ps\\u2029",
    "nul\x00": "nul\\x00",
    "del\x7f": "del\\x7f",
    "zw\u200bsp": "zw\\u200bsp",
    "tag\U000e0041": "tag\\U000e0041",
    "back\\slash": "back\\\\slash",
    "\\x0d": "\\\\x0d",
}


class EscapeTests(SynchronousTestCase):
    """
    Every character that is not printable is escaped, and so is the
    backslash, so that the result is printable and unambiguous.
    """

    def test_hostile(self) -> None:
        """Controls, line and paragraph separators and format characters are escaped."""
        for raw, escaped in HOSTILE.items():
            self.assertEqual(escape(raw), escaped)
            self.assertTrue(escape(raw).isprintable())
            self.assertFalse(is_clean(raw))

    def test_clean_unchanged(self) -> None:
        """Printable text, non-ASCII included, is returned as it is."""
        for text in ["", "RCPT mx.example[192.0.2.1] from=<a@b.example>", "ünï©ødé 🙂"]:
            self.assertIs(escape(text), text)
            self.assertTrue(is_clean(text))

    @given(st.text())
    def test_any_text(self, text: str) -> None:
        """
        Any text escapes to a printable line, is clean exactly when
        escaping leaves it alone (the ASCII fast test included), and reads
        back as it was.
        """
        escaped = escape(text)
        self.assertTrue(escaped.isprintable())
        self.assertEqual(is_clean(text), escaped == text)
        if text.isascii():
            # Python's own unescaping reads it back.
            self.assertEqual(escaped.encode().decode("unicode_escape"), text)

    def test_unambiguous(self) -> None:
        """Different texts never escape to the same line."""
        escaped = {escape(raw) for raw in HOSTILE} | {escape(e) for e in HOSTILE.values()}
        self.assertEqual(len(escaped), 2 * len(HOSTILE))


class HasControlTests(SynchronousTestCase):
    """
    C0, DEL and C1 controls are what a lookup refuses.
    """

    def test_controls(self) -> None:
        """NUL, CR, ESC, DEL, NEL and CSI are controls."""
        for value in ["a\x00", "\r", "\x1b", "\x7f", "\x85", "\x9b", "\x1f"]:
            self.assertTrue(has_control(value), value)

    def test_no_controls(self) -> None:
        """Addresses, non-ASCII names and filter syntax are not."""
        for value in ["alice@example.com", "ünï@exämple.com", "*)(uid=*", "a b", "\u00a0", ""]:
            self.assertFalse(has_control(value), value)
