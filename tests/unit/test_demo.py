"""
Tests for the demo check, L{pfxpold.checks.demo}.
"""

from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from pfxpold.checks.demo import DemoCheck
from pfxpold.interfaces import ICheck
from pfxpold.testing import CheckTestCase, make_options, make_request


class DemoCheckTests(CheckTestCase):
    """
    The original pfxpold's coin toss.
    """

    def make(self, coin):
        with capturedLogs() as events:
            check = DemoCheck(make_options(name="demo"), coin=lambda: coin)
        return check, events

    def test_verify(self):
        """DemoCheck provides ICheck."""
        self.assertTrue(verifyObject(ICheck, self.make(0.1)[0]))

    def test_win(self):
        """A low coin wins: OK (you win!)."""
        self.assertAction(self.make(0.1)[0], make_request(), "OK (you win!)")

    def test_lose(self):
        """A high coin loses: DUNNO (you lose!)."""
        self.assertAction(self.make(0.9)[0], make_request(), "DUNNO (you lose!)")

    def test_warning(self):
        """Building the demo check logs a warning that it is only a demo."""
        _, events = self.make(0.5)
        [event] = events
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(event["name"], "demo")
        self.assertIn("demo check", event["log_format"])

    def test_random_default(self):
        """Without an injected coin, both answers come up."""
        with capturedLogs():
            check = DemoCheck(make_options())
        answers = {str(check.check(make_request())) for _ in range(200)}
        self.assertEqual(answers, {"OK (you win!)", "DUNNO (you lose!)"})
