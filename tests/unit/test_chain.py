"""
Tests for L{pfxpold.chain}: order, first decisive answer, errors, timeouts,
the deadline and decision listeners.
"""

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pfxpold.action import Action
from pfxpold.chain import ChainEntry, CheckChain, Decision, ErrorPolicy
from pfxpold.interfaces import ICheck, IDecisionListener, IPolicyDecider
from pfxpold.testing import make_request

DEFER = "DEFER_IF_PERMIT Service temporarily unavailable"


@implementer(ICheck)
class Answer:
    """A check that answers what it is given and counts its calls."""

    def __init__(self, result):
        self.result = result
        self.calls = 0

    def check(self, request):
        self.calls += 1
        result = self.result
        return result() if callable(result) else result


@implementer(ICheck)
class RequestAnswer:
    """A check that answers what C{answer(request)} gives."""

    def __init__(self, answer):
        self.answer = answer

    def check(self, request):
        return self.answer(request)


@implementer(ICheck)
class Raises:
    """A check that raises."""

    def __init__(self):
        self.calls = 0

    def check(self, request):
        self.calls += 1
        raise RuntimeError("backend down")


@implementer(ICheck)
class Async:
    """An C{async def} check awaiting a Deferred the test fires."""

    def __init__(self):
        self.waiting = Deferred()

    async def check(self, request):
        return await self.waiting


@implementer(ICheck, IDecisionListener)
class Listener(Answer):
    """A check that also records what the chain decided."""

    def __init__(self, result="DUNNO", raises=False):
        super().__init__(result)
        self.decisions = []
        self.raises = raises

    def decided(self, request, action):
        self.decisions.append((request, action))
        if self.raises:
            raise RuntimeError("listener broke")


def chain(*checks, default=None, deadline=20.0, on_deadline=DEFER, clock=None, **kwargs):
    """
    A chain of C{checks}, each a check or a (check, timeout, on_error)
    tuple; names are c1, c2...
    """
    entries = []
    for position, item in enumerate(checks, start=1):
        if isinstance(item, tuple):
            check, timeout, on_error = item
        else:
            check, timeout, on_error = item, 10.0, "skip"
        entries.append(
            ChainEntry(f"c{position}", check, timeout, ErrorPolicy.parse(on_error, ("local",)))
        )
    return CheckChain(
        entries,
        default_action=Action.parse(default) if default else None,
        deadline=deadline,
        deadline_policy=ErrorPolicy.parse(on_deadline),
        clock=clock if clock is not None else Clock(),
        restriction_classes=("local",),
        **kwargs,
    )


def stubborn(later):
    """
    A check type whose C{async def} catches the chain's cancellation and
    then waits for C{later} anyway.
    """

    @implementer(ICheck)
    class Stubborn:
        async def check(self, request):
            try:
                await Deferred()
            except CancelledError:
                pass
            return await later

    return Stubborn


class ChainTestCase(SynchronousTestCase):
    """
    The checks here raise L{RuntimeError} on purpose; each test that makes
    one fail asserts the logged event itself.
    """

    def tearDown(self):
        self.flushLoggedErrors(RuntimeError)


class SynchronousChainTests(ChainTestCase):
    """
    Checks that answer at once are run without a Deferred.
    """

    def test_verify(self):
        """CheckChain provides IPolicyDecider."""
        self.assertTrue(verifyObject(IPolicyDecider, chain(Answer("OK"))))

    def test_not_a_check(self):
        """Something that does not provide ICheck is refused at construction."""
        self.assertRaises(TypeError, chain, object())

    def test_first_decisive_wins(self):
        """Checks run in order; the first decisive one decides and later ones do not run."""
        first, second, third = Answer("DUNNO"), Answer("REJECT no"), Answer("OK")
        decision = chain(first, second, third).decide(make_request())
        self.assertIsInstance(decision, Decision)
        self.assertEqual(decision.action, Action("REJECT", "no"))
        self.assertEqual(decision.decided_by, "c2")
        self.assertEqual((first.calls, second.calls, third.calls), (1, 1, 0))

    def test_default_action(self):
        """When every check passes, default_action is the answer."""
        decision = chain(Answer("DUNNO"), Answer("DUNNO"), default="OK").decide(make_request())
        self.assertEqual(decision.action, Action("OK"))
        self.assertEqual(decision.decided_by, "default")

    def test_last_dunno_without_default(self):
        """Without a default action, the last DUNNO is answered with its text."""
        decision = chain(Answer("DUNNO first"), Answer("DUNNO (you lose!)")).decide(make_request())
        self.assertEqual(str(decision.action), "DUNNO (you lose!)")

    def test_action_objects_and_classes(self):
        """A check may answer an Action or a declared restriction class."""
        self.assertEqual(chain(Answer(Action("HOLD"))).decide(make_request()).action.verb, "HOLD")
        self.assertEqual(chain(Answer("local")).decide(make_request()).action.verb, "local")

    def test_record_verdicts(self):
        """With record_verdicts, every check's verdict is kept in order."""
        decision = chain(Answer("DUNNO"), Raises(), Answer("OK"), record_verdicts=True).decide(
            make_request()
        )
        self.assertEqual(decision.verdicts, [("c1", "DUNNO"), ("c2", "error"), ("c3", "OK")])

    def test_no_verdicts_by_default(self):
        """Without record_verdicts, none are kept."""
        self.assertEqual(chain(Answer("DUNNO"), Answer("OK")).decide(make_request()).verdicts, [])

    def test_raise_skip(self):
        """A check that raises with on_error=skip is passed over and logged."""
        with capturedLogs() as events:
            decision = chain((Raises(), 1, "skip"), Answer("OK")).decide(make_request())
        self.assertEqual(decision.action, Action("OK"))
        [event] = [e for e in events if e.get("check") == "c1"]
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertEqual(event["outcome"], "skip")
        self.assertTrue(event["log_failure"].check(RuntimeError))

    def test_raise_action(self):
        """A check that raises with an action as on_error answers that action."""
        second = Answer("OK")
        with capturedLogs():
            decision = chain((Raises(), 1, DEFER), second).decide(make_request())
        self.assertEqual(str(decision.action), DEFER)
        self.assertEqual(decision.decided_by, "c1")
        self.assertEqual(second.calls, 0)

    def test_raise_noreply(self):
        """A check that raises with on_error=noreply decides no answer."""
        with capturedLogs():
            decision = chain((Raises(), 1, "noreply"), Answer("OK")).decide(make_request())
        self.assertIsNone(decision.action)
        self.assertEqual(decision.decided_by, "c1")

    def test_invalid_action(self):
        """An invalid action is logged as a check bug and handled by on_error."""
        for bad in ("", "PERMIT", "local please", 42, None, "FILTER"):
            with capturedLogs() as events:
                decision = chain((Answer(bad), 1, "REJECT broken")).decide(make_request())
            self.assertEqual(str(decision.action), "REJECT broken", bad)
            [event] = [e for e in events if e.get("check") == "c1"]
            self.assertEqual(event["log_level"], LogLevel.error)
            self.assertIn("bug", event["log_format"])

    def test_actions_postfix_misreads(self):
        """
        A check answering an action real Postfix 3.7 misreads (a status code
        without text, a bare 3-digit code, a PREPEND, FILTER, REDIRECT or
        BCC argument Postfix would ignore) gets its on_error, whether it
        returns the string, an L{Action} it builds, or a Deferred.
        """
        misread = (
            "REJECT 5.7.1",
            "550 5.1.1",
            "554 5.7.1 ",
            "554",
            "450",
            "PREPEND no colon",
            "FILTER smtp",
            "REDIRECT nobody",
            "BCC a@example.com b@example.com",
        )
        for bad in misread:
            verb, _, text = bad.partition(" ")
            for result in (
                bad,
                lambda verb=verb, text=text: Action(verb, text),
                lambda bad=bad: succeed(bad),
            ):
                with capturedLogs() as events:
                    decision = chain(
                        (Answer(result), 1, "DEFER_IF_PERMIT 4.3.0 check broken"),
                        Answer("OK"),
                        record_verdicts=True,
                    ).decide(make_request())
                if isinstance(decision, Deferred):
                    decision = self.successResultOf(decision)
                self.assertEqual(
                    str(decision.action), "DEFER_IF_PERMIT 4.3.0 check broken", (bad, result)
                )
                self.assertIn(("c1", "invalid action"), decision.verdicts)
                [event] = [e for e in events if e.get("check") == "c1"]
                self.assertEqual(event["log_level"], LogLevel.error)

    def test_invalid_action_skip_and_noreply(self):
        """An invalid action with skip goes on, with noreply answers nothing."""
        with capturedLogs():
            self.assertEqual(
                chain((Answer("bad verb"), 1, "skip"), Answer("OK")).decide(make_request()).action,
                Action("OK"),
            )
            self.assertIsNone(
                chain((Answer("bad verb"), 1, "noreply")).decide(make_request()).action
            )

    def test_all_skipped(self):
        """When every check fails and is skipped, the default applies."""
        with capturedLogs():
            decision = chain(Raises(), Raises(), default="DUNNO").decide(make_request())
        self.assertEqual(decision.action, Action("DUNNO"))

    def test_fast_path_no_timer(self):
        """A synchronous chain schedules nothing on the clock."""
        clock = Clock()
        chain(Answer("DUNNO"), Answer("OK"), clock=clock).decide(make_request())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_fast_path_no_deferred(self):
        """A synchronous chain, listeners included, makes no Deferred at all."""

        def no_deferreds(*args, **kwargs):
            raise AssertionError("the fast path made a Deferred")

        checks = chain(Listener("DUNNO"), Answer("DUNNO"), Answer(Action("OK")))
        self.patch(Deferred, "__init__", no_deferreds)
        self.assertEqual(checks.decide(make_request()).action, Action("OK"))

    def test_parsed_strings_cached(self):
        """The same action string is parsed once and the same Action is reused."""
        checks = chain(Answer("REJECT no"))
        first = checks.decide(make_request()).action
        self.assertIs(checks.decide(make_request()).action, first)


class AsynchronousChainTests(ChainTestCase):
    """
    Checks that return Deferreds or coroutines, timeouts and the deadline.
    """

    def test_fired_deferred(self):
        """An already fired Deferred is used like a plain answer, at once."""
        decision = chain(Answer(lambda: succeed("DUNNO")), Answer("REJECT x")).decide(
            make_request()
        )
        self.assertEqual(decision.action, Action("REJECT", "x"))

    def test_failed_deferred(self):
        """An already failed Deferred is handled by on_error."""
        with capturedLogs():
            decision = chain(
                (Answer(lambda: fail(RuntimeError("x"))), 1, DEFER), Answer("OK")
            ).decide(make_request())
        self.assertEqual(str(decision.action), DEFER)

    def test_deferred_later(self):
        """A Deferred fired later decides, then later checks run in order."""
        clock = Clock()
        waiting = Deferred()
        last = Answer("OK")
        decision = chain(Answer("DUNNO"), Answer(waiting), last, clock=clock).decide(make_request())
        self.assertNoResult(decision)
        self.assertEqual(last.calls, 0)
        clock.advance(1)
        waiting.callback("DUNNO")
        result = self.successResultOf(decision)
        self.assertEqual(result.action, Action("OK"))
        self.assertEqual(result.decided_by, "c3")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_async_def(self):
        """An C{async def} check's answer is used."""
        check = Async()
        decision = chain(check, Answer("OK")).decide(make_request())
        self.assertNoResult(decision)
        check.waiting.callback("REJECT async")
        self.assertEqual(str(self.successResultOf(decision).action), "REJECT async")

    def test_async_def_after_async(self):
        """Several asynchronous checks in a row run one after the other."""
        first, second = Async(), Async()
        decision = chain(first, second, default="OK").decide(make_request())
        first.waiting.callback("DUNNO")
        self.assertNoResult(decision)
        second.waiting.callback("DUNNO")
        self.assertEqual(self.successResultOf(decision).action, Action("OK"))

    def test_async_raises(self):
        """An C{async def} check that raises is handled by on_error."""

        @implementer(ICheck)
        class Broken:
            async def check(self, request):
                raise RuntimeError("no")

        with capturedLogs() as events:
            decision = chain((Broken(), 1, "noreply")).decide(make_request())
        self.assertIsNone(decision.action)
        self.assertTrue([e for e in events if e.get("check") == "c1"])

    def test_invalid_async_action(self):
        """An invalid action from a Deferred is handled by on_error."""
        with capturedLogs() as events:
            decision = chain((Answer(lambda: succeed("NOPE x")), 1, "REJECT bug")).decide(
                make_request()
            )
        self.assertEqual(str(decision.action), "REJECT bug")
        self.assertIn("bug", [e for e in events if e.get("check") == "c1"][0]["log_format"])

    def check_timeout(self, on_error):
        """Run a check that never answers, past its timeout."""
        clock = Clock()
        cancelled = []
        waiting = Deferred(lambda d: cancelled.append(True))
        last = Answer("OK")
        checks = chain((Answer(waiting), 2.0, on_error), last, clock=clock, record_verdicts=True)
        with capturedLogs() as events:
            decision = checks.decide(make_request())
            clock.advance(1.9)
            self.assertNoResult(decision)
            clock.advance(0.2)
            result = self.successResultOf(decision)
        self.assertEqual(cancelled, [True])
        [event] = [e for e in events if e.get("check") == "c1"]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn("timed out", event["log_format"])
        self.assertEqual(event["outcome"], on_error)
        self.assertIn(("c1", "timeout"), result.verdicts)
        self.assertEqual(clock.getDelayedCalls(), [])
        return result, last

    def test_timeout_skip(self):
        """A check that times out with skip lets the next check decide."""
        result, last = self.check_timeout("skip")
        self.assertEqual(result.action, Action("OK"))
        self.assertEqual(last.calls, 1)

    def test_timeout_action(self):
        """A check that times out with an action answers it."""
        result, last = self.check_timeout(DEFER)
        self.assertEqual(str(result.action), DEFER)
        self.assertEqual(last.calls, 0)

    def test_timeout_noreply(self):
        """A check that times out with noreply answers nothing."""
        result, last = self.check_timeout("noreply")
        self.assertIsNone(result.action)

    def test_timeout_async_def(self):
        """An C{async def} check past its timeout is cancelled and handled."""
        clock = Clock()
        check = Async()
        with capturedLogs():
            decision = chain((check, 1.0, "REJECT slow"), clock=clock).decide(make_request())
            clock.advance(1.0)
        self.assertEqual(str(self.successResultOf(decision).action), "REJECT slow")
        self.assertTrue(check.waiting.called)

    def test_deadline(self):
        """The whole request is bounded by the deadline, whatever the check timeouts."""
        clock = Clock()
        first, second = Deferred(), Deferred()
        checks = chain(
            (Answer(first), 8.0, "skip"),
            (Answer(second), 8.0, "skip"),
            deadline=10.0,
            on_deadline="REJECT too slow",
            clock=clock,
        )
        with capturedLogs() as events:
            decision = checks.decide(make_request())
            clock.advance(8.0)  # the first check times out and is skipped
            self.assertNoResult(decision)
            clock.advance(2.0)  # the deadline passes during the second
            result = self.successResultOf(decision)
        self.assertEqual(str(result.action), "REJECT too slow")
        self.assertEqual(result.decided_by, "deadline")
        self.assertTrue(second.called)
        self.assertTrue([e for e in events if "deadline" in e["log_format"]])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline_noreply(self):
        """on_deadline=noreply answers nothing when the deadline passes."""
        clock = Clock()
        checks = chain(
            (Answer(Deferred()), 30.0, "skip"), deadline=5.0, on_deadline="noreply", clock=clock
        )
        with capturedLogs():
            decision = checks.decide(make_request())
            clock.advance(5.0)
        self.assertIsNone(self.successResultOf(decision).action)

    def test_deadline_ignores_cancellation(self):
        """
        A check whose Deferred ignores cancellation (and fires later) cannot
        hold the request past the deadline, nor break anything when it fires.
        """
        clock = Clock()
        stubborn = Deferred(lambda d: None)
        checks = chain(
            (Answer(stubborn), 30.0, "skip"), deadline=5.0, on_deadline="DEFER late", clock=clock
        )
        with capturedLogs():
            decision = checks.decide(make_request())
            clock.advance(5.0)
        self.assertEqual(str(self.successResultOf(decision).action), "DEFER late")
        self.assertTrue(stubborn.called)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline_async_def_swallows_cancel(self):
        """
        An C{async def} check that catches the cancellation and keeps
        waiting still cannot hold the request past the deadline.
        """
        clock = Clock()
        later = Deferred()

        Stubborn = stubborn(later)

        checks = chain(
            (Stubborn(), 30.0, "skip"), deadline=5.0, on_deadline="DEFER late", clock=clock
        )
        with capturedLogs():
            decision = checks.decide(make_request())
            clock.advance(5.0)
            self.assertEqual(str(self.successResultOf(decision).action), "DEFER late")
            later.callback("OK")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout_async_def_swallows_cancel(self):
        """
        A check's own timeout holds even when its coroutine catches the
        cancellation and keeps waiting.
        """
        clock = Clock()
        Stubborn = stubborn(Deferred())

        checks = chain((Stubborn(), 2.0, "REJECT slow"), deadline=50.0, clock=clock)
        with capturedLogs():
            decision = checks.decide(make_request())
            clock.advance(2.0)
        self.assertEqual(str(self.successResultOf(decision).action), "REJECT slow")
        self.assertEqual(clock.getDelayedCalls(), [])


class RequestTimerTests(ChainTestCase):
    """
    The requests waiting for checks share one timer per chain, due no later
    than the first check timeout or deadline of any of them.
    """

    def test_one_timer_per_chain(self):
        """
        However many requests wait, the clock holds one timer for them,
        due at the first expiry; none is left when they are decided.
        """
        clock = Clock()
        waiting = [Deferred() for _ in range(50)]
        answers = iter(waiting)
        checks = chain((Answer(lambda: next(answers)), 3.0, "skip"), clock=clock)
        decisions = []
        for _ in range(50):
            decisions.append(checks.decide(make_request()))
            clock.advance(0.01)
        self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [3.0])
        for pending in waiting:
            pending.callback("OK")
        self.assertEqual(
            [self.successResultOf(decision).action for decision in decisions], [Action("OK")] * 50
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_next_check_timeout(self):
        """
        After a check answers and the next one waits, the next check's
        timeout holds from when it was run; the timer no longer needed by
        the first one fires harmlessly and moves on to it.
        """
        clock = Clock()
        first, second = Deferred(), Deferred()
        checks = chain(
            (Answer(first), 3.0, "skip"), (Answer(second), 4.0, "REJECT slow"), clock=clock
        )
        with capturedLogs():
            decision = checks.decide(make_request())
            self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [3.0])
            clock.advance(1.0)
            first.callback("DUNNO")
            clock.advance(2.0)  # the first check's timeout, no longer waited for
            self.assertNoResult(decision)
            self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [5.0])
            clock.advance(1.9)
            self.assertNoResult(decision)
            clock.advance(0.1)
        self.assertEqual(str(self.successResultOf(decision).action), "REJECT slow")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeouts_in_order(self):
        """
        Requests waiting on checks of different timeouts each time out at
        their own time, on the one timer.
        """
        clock = Clock()

        def first_waits_for_slow(request):
            return Deferred() if request.get("slow") else "DUNNO"

        checks = chain(
            (RequestAnswer(first_waits_for_slow), 5.0, "REJECT five"),
            (Answer(lambda: Deferred()), 2.0, "REJECT two"),
            clock=clock,
        )
        with capturedLogs():
            five = checks.decide(make_request(slow="1"))
            clock.advance(1.0)
            two = checks.decide(make_request())
            clock.advance(2.0)
            self.assertEqual(str(self.successResultOf(two).action), "REJECT two")
            self.assertNoResult(five)
            clock.advance(2.0)
        self.assertEqual(str(self.successResultOf(five).action), "REJECT five")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_answer_while_its_callbacks_run(self):
        """
        A check answering with a Deferred whose callbacks are running (a
        request decided from within them) is waited for, and decides once
        they are done.
        """
        clock = Clock()
        shared = Deferred()
        checks = chain(Answer(lambda: shared), clock=clock)
        inner = []

        def decide_within(result):
            decision = checks.decide(make_request())
            self.assertNoResult(decision)
            inner.append(decision)
            return result

        shared.addCallback(decide_within)
        shared.callback("REJECT shared")
        [inner_decision] = inner
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(str(self.successResultOf(inner_decision).action), "REJECT shared")

    def test_timer_at_deadline_when_sooner(self):
        """
        When the deadline comes before a check's timeout, the timer is due
        at the deadline, which decides (the check's timeout is not logged).
        """
        clock = Clock()
        cancelled = []
        waiting = Deferred(lambda d: cancelled.append(True))
        checks = chain(
            (Answer(waiting), 30.0, "REJECT own timeout"),
            deadline=5.0,
            on_deadline="DEFER late",
            clock=clock,
        )
        with capturedLogs() as events:
            decision = checks.decide(make_request())
            self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [5.0])
            clock.advance(5.0)
        result = self.successResultOf(decision)
        self.assertEqual((str(result.action), result.decided_by), ("DEFER late", "deadline"))
        self.assertEqual(cancelled, [True])
        self.assertFalse([e for e in events if e.get("check") == "c1"])

    def test_timeout_equal_to_deadline(self):
        """
        A check timing out exactly at the deadline is handled as its own
        timeout first, as when each had its own timer: its on_error answers.
        """
        clock = Clock()
        checks = chain(
            (Answer(Deferred()), 5.0, "REJECT own timeout"),
            deadline=5.0,
            on_deadline="DEFER late",
            clock=clock,
        )
        with capturedLogs():
            decision = checks.decide(make_request())
            clock.advance(5.0)
        result = self.successResultOf(decision)
        self.assertEqual((str(result.action), result.decided_by), ("REJECT own timeout", "c1"))

    def test_deadline_passed_before_next_check_answers(self):
        """
        When a check times out (skip) at the deadline and the next one
        answers later, the deadline decides at once and the next check's
        Deferred is cancelled.
        """
        clock = Clock()
        cancelled = []
        second = Deferred(lambda d: cancelled.append(True))
        checks = chain(
            (Answer(Deferred()), 5.0, "skip"),
            (Answer(second), 5.0, "skip"),
            deadline=5.0,
            on_deadline="DEFER late",
            clock=clock,
        )
        with capturedLogs():
            decision = checks.decide(make_request())
            clock.advance(5.0)
        result = self.successResultOf(decision)
        self.assertEqual((str(result.action), result.decided_by), ("DEFER late", "deadline"))
        self.assertEqual(cancelled, [True])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_late_answer_ignored(self):
        """
        A check that answers after its timeout (an C{async def} check that
        swallowed the cancellation) changes nothing: the request was
        decided by its on_error, once, and the next check ran once.
        """
        clock = Clock()
        later = Deferred()

        Stubborn = stubborn(later)

        last = Answer("OK")
        checks = chain((Stubborn(), 2.0, "skip"), last, clock=clock, record_verdicts=True)
        with capturedLogs():
            decision = checks.decide(make_request())
            clock.advance(2.0)
        result = self.successResultOf(decision)
        later.callback("REJECT too late")
        self.assertEqual(result.action, Action("OK"))
        self.assertEqual(result.verdicts, [("c1", "timeout"), ("c2", "OK")])
        self.assertEqual(last.calls, 1)

    def test_breaking_cancellation(self):
        """
        A check whose cancellation raises, past its timeout, still lets
        the request be answered (its on_error); the error is logged.
        """

        def broken_canceller(deferred):
            raise RuntimeError("cannot cancel")

        clock = Clock()
        checks = chain((Answer(Deferred(broken_canceller)), 2.0, "REJECT slow"), clock=clock)
        with capturedLogs():
            decision = checks.decide(make_request())
            clock.advance(2.0)
        self.assertEqual(str(self.successResultOf(decision).action), "REJECT slow")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_caller_cancels(self):
        """
        Cancelling a pending decision cancels the check waited for, stops
        the timer, and still answers (as a chain error): a decider never fails.
        """
        clock = Clock()
        cancelled = []
        waiting = Deferred(lambda d: cancelled.append(True))
        decision = chain(Answer(waiting), clock=clock).decide(make_request())
        decision.cancel()
        result = self.successResultOf(decision)
        self.assertEqual((str(result.action), result.decided_by), (DEFER, "error"))
        self.assertEqual(cancelled, [True])
        self.assertEqual(clock.getDelayedCalls(), [])


class ListenerTests(ChainTestCase):
    """
    L{IDecisionListener} checks hear the final answer once per request.
    """

    def test_synchronous(self):
        """Every listener hears the action sent, whichever check decided."""
        first, second = Listener("DUNNO"), Listener("DUNNO")
        request = make_request()
        chain(first, Answer("REJECT no"), second).decide(request)
        self.assertEqual(first.decisions, [(request, Action("REJECT", "no"))])
        self.assertEqual(second.decisions, [(request, Action("REJECT", "no"))])
        self.assertEqual(second.calls, 0)

    def test_asynchronous(self):
        """A listener hears the answer only once the asynchronous chain decides."""
        listener = Listener()
        waiting = Deferred()
        decision = chain(listener, Answer(waiting)).decide(make_request())
        self.assertEqual(listener.decisions, [])
        waiting.callback("HOLD")
        self.successResultOf(decision)
        self.assertEqual([action for _, action in listener.decisions], [Action("HOLD")])

    def test_noreply(self):
        """A listener hears None when no reply is sent."""
        listener = Listener()
        with capturedLogs():
            chain(listener, (Raises(), 1, "noreply")).decide(make_request())
        self.assertEqual([action for _, action in listener.decisions], [None])

    def test_deadline(self):
        """A listener hears the deadline's answer."""
        clock = Clock()
        listener = Listener()
        with capturedLogs():
            decision = chain(
                listener, (Answer(Deferred()), 30.0, "skip"), deadline=1.0, clock=clock
            ).decide(make_request())
            clock.advance(1.0)
        self.successResultOf(decision)
        self.assertEqual([str(action) for _, action in listener.decisions], [DEFER])

    def test_listener_error_logged(self):
        """A failing listener is logged and changes neither the answer nor other listeners."""
        broken, fine = Listener(raises=True), Listener()
        with capturedLogs() as events:
            decision = chain(broken, fine, Answer("OK")).decide(make_request())
        self.assertEqual(decision.action, Action("OK"))
        self.assertEqual(len(fine.decisions), 1)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["log_failure"].check(RuntimeError))

    def test_listener_error_async(self):
        """A failing listener on the asynchronous path does not fail the decision."""
        broken = Listener(raises=True)
        waiting = Deferred()
        with capturedLogs() as events:
            decision = chain(broken, Answer(waiting)).decide(make_request())
            waiting.callback("OK")
        self.assertEqual(self.successResultOf(decision).action, Action("OK"))
        self.assertEqual(len([e for e in events if "log_failure" in e]), 1)


class ErrorPolicyTests(SynchronousTestCase):
    """
    L{ErrorPolicy.parse} reads on_error values.
    """

    def test_parse(self):
        """skip, noreply and actions are read; anything else is refused."""
        from pfxpold.action import ActionError

        self.assertEqual(ErrorPolicy.parse("skip").kind, "skip")
        self.assertEqual(ErrorPolicy.parse("noreply").kind, "noreply")
        policy = ErrorPolicy.parse("REJECT x")
        self.assertEqual((policy.kind, str(policy)), ("reply", "REJECT x"))
        self.assertRaises(ActionError, ErrorPolicy.parse, "sometimes")


class RepeatedFailureLoggingTests(SynchronousTestCase):
    """
    A backend outage makes every request fail alike: the first failure is
    logged with its traceback, repeats in one line, and recovery is logged.
    """

    def test_error_messages_escaped(self):
        """
        A check error quoting a client's or a backend's control characters
        (first time, again, or an invalid action) is logged escaped, in one
        printable line without a traceback; so is the client address of a
        request that missed the deadline.
        """
        outcomes = [LookupError("no \x1b[2J\rFORGED")] * 2 + ["BOGUS\x1b[2J\rverb"]

        @implementer(ICheck)
        class Hostile:
            def check(self, request):
                outcome = outcomes.pop(0)
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome

        clock = Clock()
        chain = CheckChain(
            [ChainEntry("hostile", Hostile(), 1.0, ErrorPolicy.parse("skip"))],
            default_action=None,
            deadline=5.0,
            deadline_policy=ErrorPolicy.parse("noreply"),
            clock=clock,
        )
        with capturedLogs() as events:
            for _ in range(3):
                chain.decide(make_request())
        texts = [formatEvent(event) for event in events]
        self.assertEqual(len(texts), 3, texts)
        self.assertFalse([event for event in events if "log_failure" in event])
        for text in texts:
            self.assertTrue(text.isprintable(), text)
        self.assertIn("no \\x1b[2J\\x0dFORGED", texts[0])
        self.assertIn("no \\x1b[2J\\x0dFORGED", texts[1])

        @implementer(ICheck)
        class Slow:
            def check(self, request):
                return Deferred()

        chain = CheckChain(
            [ChainEntry("slow", Slow(), 10.0, ErrorPolicy.parse("skip"))],
            default_action=None,
            deadline=1.0,
            deadline_policy=ErrorPolicy.parse("DUNNO"),
            clock=clock,
        )
        with capturedLogs() as events:
            chain.decide(make_request(client_address="192.0.2.1\r\x85"))
            clock.advance(1.0)
        [text] = [formatEvent(event) for event in events if "deadline" in formatEvent(event)]
        self.assertIn("192.0.2.1\\x0d\\x85", text)

    def test_unavailable_is_one_line(self):
        """
        A L{CheckUnavailable} (a backend's refusal, its reason in the
        message) is logged in one escaped line naming the check and the
        on_error outcome, the first time too: no traceback.
        """
        from pfxpold.chain import CheckUnavailable

        @implementer(ICheck)
        class Refused:
            def check(self, request):
                raise CheckUnavailable("cannot connect: Access denied for 'x'\r\nFORGED")

        chain = CheckChain(
            [ChainEntry("refused", Refused(), 1.0, ErrorPolicy.parse("DEFER try later"))],
            default_action=None,
            deadline=5.0,
            deadline_policy=ErrorPolicy.parse("noreply"),
            clock=Clock(),
        )
        with capturedLogs() as events:
            for _ in range(2):
                decision = chain.decide(make_request())
                if isinstance(decision, Deferred):
                    decision = self.successResultOf(decision)
                self.assertEqual(str(decision.action), "DEFER try later")
        texts = [formatEvent(event) for event in events]
        self.assertFalse([event for event in events if "log_failure" in event])
        self.assertEqual(len(texts), 2, texts)
        self.assertIn("check refused failed: CheckUnavailable: cannot connect:", texts[0])
        self.assertIn("check refused failed again:", texts[1])
        for text in texts:
            self.assertIn("Access denied for 'x'\\x0d\\x0aFORGED", text)
            self.assertIn("on_error=DEFER try later", text)
            self.assertTrue(text.isprintable(), text)

    def test_repeats_are_one_line_until_recovery(self):
        """Three identical failures give one traceback and two one-line
        warnings; an answer logs recovery; a later failure has a traceback
        again."""
        outcomes = [ConnectionRefusedError("down")] * 3 + ["DUNNO", ConnectionRefusedError("down")]

        @implementer(ICheck)
        class Flaky:
            def check(self, request):
                outcome = outcomes.pop(0)
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome

        chain = CheckChain(
            [ChainEntry("flaky", Flaky(), 1.0, ErrorPolicy.parse("skip"))],
            default_action=None,
            deadline=5.0,
            deadline_policy=ErrorPolicy.parse("noreply"),
            clock=Clock(),
        )
        with capturedLogs() as events:
            for _ in range(5):
                chain.decide(make_request())
        texts = [formatEvent(event) for event in events]
        tracebacks = [event for event in events if "log_failure" in event]
        self.assertEqual(len(tracebacks), 2)
        self.assertEqual(sum("failed again" in text for text in texts), 2)
        self.assertEqual(sum("answers again" in text for text in texts), 1)
        self.flushLoggedErrors(ConnectionRefusedError)
