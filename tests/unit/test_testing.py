"""
Tests for L{pfxpold.testing}, the helpers pfxpold ships for testing checks.
"""

from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.action import Action, ActionError
from pfxpold.config import CheckOptions, ConfigError
from pfxpold.interfaces import ICheck
from pfxpold.testing import CheckTestCase, make_options, make_request, run_check


@implementer(ICheck)
class RelayCheck:
    """The README's example check."""

    def __init__(self, options):
        from ipaddress import ip_network

        self.networks = [ip_network(n) for n in options.strings("networks")]

    def check(self, request):
        if any(request.client_ip in network for network in self.networks):
            return "OK"
        return "REJECT Not allowed to relay"


@implementer(ICheck)
class AsyncCheck:
    """An C{async def} check."""

    async def check(self, request):
        return Action("HOLD", request.sender)


@implementer(ICheck)
class SlowCheck:
    """A check that answers after a delay on its options' reactor."""

    def __init__(self, options):
        self.reactor = options.reactor
        self.delay = options.number("delay")

    def check(self, request):
        return deferLater(self.reactor, self.delay, lambda: "DEFER_IF_PERMIT slow")


class HelperTests(SynchronousTestCase):
    """
    make_request, make_options and run_check.
    """

    def test_make_request(self):
        """make_request starts from a fixture and applies changes."""
        request = make_request("data", sender="x@Y.example", tls_sni="mx")
        self.assertEqual(request.protocol_state, "DATA")
        self.assertEqual(request.sender_domain, "y.example")
        self.assertEqual(request["tls_sni"], "mx")
        self.assertEqual(make_request().protocol_state, "RCPT")

    def test_make_options(self):
        """make_options gives CheckOptions over the table, with a Clock by default."""
        options = make_options(name="mine", networks=["192.0.2.0/24"])
        self.assertIsInstance(options, CheckOptions)
        self.assertIsInstance(options.reactor, Clock)
        self.assertEqual(options.name, "mine")
        self.assertEqual(options.strings("networks"), ["192.0.2.0/24"])
        error = self.assertRaises(ConfigError, options.string, "missing")
        self.assertIn("check 'mine': key 'missing'", str(error))

    def test_make_options_reactor_and_classes(self):
        """A given reactor and restriction classes are passed on."""
        clock = Clock()
        options = make_options(reactor=clock, restriction_classes=["local"], answer="local")
        self.assertIs(options.reactor, clock)
        self.assertEqual(options.action("answer").verb, "local")

    def test_run_check_plain(self):
        """run_check validates a plain answer into an Action."""
        check = RelayCheck(make_options(networks=["192.0.2.0/24"]))
        action = self.successResultOf(run_check(check, make_request(client_address="192.0.2.7")))
        self.assertEqual(action, Action("OK"))

    def test_run_check_async(self):
        """run_check runs an C{async def} check."""
        action = self.successResultOf(run_check(AsyncCheck(), make_request(sender="a@b")))
        self.assertEqual(action, Action("HOLD", "a@b"))

    def test_run_check_deferred_clock(self):
        """run_check waits for a Deferred fired by the check's Clock."""
        clock = Clock()
        result = run_check(SlowCheck(make_options(reactor=clock, delay=3)), make_request())
        self.assertNoResult(result)
        clock.advance(3)
        self.assertEqual(self.successResultOf(result), Action("DEFER_IF_PERMIT", "slow"))

    def test_run_check_invalid(self):
        """An invalid answer fails with ActionError."""

        @implementer(ICheck)
        class Bad:
            def check(self, request):
                return "MAYBE"

        self.failureResultOf(run_check(Bad(), make_request()), ActionError)

    def test_run_check_raises(self):
        """What the check raises is the failure."""

        @implementer(ICheck)
        class Broken:
            def check(self, request):
                raise KeyError("x")

        self.failureResultOf(run_check(Broken(), make_request()), KeyError)


class AssertActionTests(CheckTestCase):
    """
    CheckTestCase.assertAction, as the README shows it.
    """

    def test_readme_example(self):
        """The README's RelayCheck tests pass."""
        check = RelayCheck(make_options(networks=["192.0.2.0/24"]))
        self.assertAction(check, make_request(client_address="192.0.2.7"), "OK")
        request = make_request("data", client_address="198.51.100.1")
        self.assertAction(check, request, "REJECT Not allowed to relay")

    def test_returns_action(self):
        """assertAction returns the action, and accepts an Action as expected."""
        action = self.assertAction(AsyncCheck(), make_request(sender="s@x"), Action("HOLD", "s@x"))
        self.assertEqual(action.verb, "HOLD")

    def test_async_def(self):
        """An C{async def} check is asserted like any other."""
        self.assertAction(AsyncCheck(), make_request(sender="s@x"), "hold s@x")

    def test_clock(self):
        """A check waiting on a Clock is asserted once the clock has advanced."""
        clock = Clock()
        check = SlowCheck(make_options(reactor=clock, delay=1))
        result = run_check(check, make_request())
        clock.advance(1)
        self.assertEqual(self.successResultOf(result), Action("DEFER_IF_PERMIT", "slow"))

    def test_mismatch_fails(self):
        """A different action fails the assertion."""
        check = RelayCheck(make_options(networks=[]))
        self.assertRaises(self.failureException, self.assertAction, check, make_request(), "OK")

    def test_waiting_fails(self):
        """A check that has not answered yet fails the assertion."""
        check = SlowCheck(make_options(delay=1))
        self.assertRaises(self.failureException, self.assertAction, check, make_request(), "OK")

    def test_restriction_classes(self):
        """Restriction classes are accepted when declared."""

        @implementer(ICheck)
        class Local:
            def check(self, request):
                return "local_only"

        self.assertAction(Local(), make_request(), "local_only", ["local_only"])
