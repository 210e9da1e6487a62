"""
Tests for the chain's shortcut for checks whose Deferred or coroutine has
already finished when C{check} returns (a warm cache): the outcome must be
what the asynchronous path gives, and the caller gets it at once, as a
plain L{Decision}, with no timer or Deferred of the chain's own.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.action import Action
from pfxpold.chain import ChainEntry, CheckChain, Decision, ErrorPolicy
from pfxpold.interfaces import ICheck
from pfxpold.testing import make_request

DEFER = "DEFER_IF_PERMIT Service temporarily unavailable"


@implementer(ICheck)
class Returns:
    """A check that returns what C{make} gives, counting calls."""

    def __init__(self, make) -> None:
        self.make = make
        self.calls = 0

    def check(self, request):
        self.calls += 1
        return self.make()


@implementer(ICheck)
class Cached:
    """An C{async def} check answering from its cache without waiting."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    async def check(self, request):
        return self.answer


def chain(*checks, clock=None, on_error="skip", default=None):
    entries = [
        ChainEntry(f"c{number}", check, 5.0, ErrorPolicy.parse(on_error))
        for number, check in enumerate(checks, 1)
    ]
    return CheckChain(
        entries,
        Action.parse(default) if default else None,
        20.0,
        ErrorPolicy.parse(DEFER),
        clock or Clock(),
    )


class SettledTests(SynchronousTestCase):
    """
    Already finished Deferreds and coroutines.
    """

    def test_finished_coroutine(self):
        """A finished coroutine decides at once, as a plain Decision."""
        clock = Clock()
        result = chain(Cached("DUNNO"), Cached("REJECT cached"), clock=clock).decide(
            make_request()
        )
        self.assertIsInstance(result, Decision)
        self.assertEqual((str(result.action), result.decided_by), ("REJECT cached", "c2"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_fired_then_plain(self):
        """After a fired Deferred, later plain checks run at once, in order."""
        later = Returns(lambda: "OK")
        decision = chain(Returns(lambda: succeed("DUNNO")), later).decide(make_request())
        self.assertEqual(later.calls, 1)
        self.assertEqual(decision.action, Action("OK"))

    def test_default_after_fired(self):
        """The default action applies after fired DUNNOs."""
        result = chain(Cached("DUNNO"), default="OK").decide(make_request())
        self.assertEqual((result.action, result.decided_by), (Action("OK"), "default"))

    def test_failed_goes_to_on_error(self):
        """An already failed Deferred is the check's error (on_error)."""
        with capturedLogs() as events:
            result = chain(
                Returns(lambda: fail(RuntimeError("down"))), on_error="REJECT down"
            ).decide(make_request())
        self.assertEqual((str(result.action), result.decided_by), ("REJECT down", "c1"))
        self.assertTrue([e for e in events if e.get("check") == "c1"])
        self.flushLoggedErrors(RuntimeError)

    def test_cancelled_is_a_chain_error(self):
        """An already cancelled Deferred ends the request as before: a chain error."""
        with capturedLogs():
            result = chain(Returns(lambda: fail(CancelledError()))).decide(make_request())
        self.assertEqual((str(result.action), result.decided_by), (DEFER, "error"))
        self.flushLoggedErrors(CancelledError)

    def test_paused_waits(self):
        """A fired but paused Deferred is waited for."""
        paused = succeed("REJECT later")
        paused.pause()
        decision = chain(Returns(lambda: paused)).decide(make_request())
        self.assertNoResult(decision)
        paused.unpause()
        self.assertEqual(str(self.successResultOf(decision).action), "REJECT later")

    def test_pending_waits(self):
        """A Deferred without a result yet is waited for, within the timeout."""
        clock = Clock()
        waiting = Deferred()
        decision = chain(Returns(lambda: waiting), clock=clock).decide(make_request())
        self.assertNoResult(decision)
        waiting.callback("OK")
        self.assertEqual(self.successResultOf(decision).action, Action("OK"))
        self.assertEqual(clock.getDelayedCalls(), [])
