"""
Tests for C{[server] parallel} and C{on_deadline = "known"} in
L{pfxpold.chain}: checks start at once, the answer is the first decisive
verdict in chain order, checks that write state wait for DUNNOs, the rest
is cancelled once the request is decided, and the deadline answers from
what is known.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.action import Action
from pfxpold.chain import ChainEntry, CheckChain, Decision, ErrorPolicy
from pfxpold.interfaces import ICheck
from pfxpold.testing import make_request
from tests.unit.test_chain import Answer, Raises


@implementer(ICheck)
class Waiting:
    """
    A check answering with a Deferred the test fires; records its calls
    and whether each Deferred was cancelled.
    """

    writes_state = False

    def __init__(self):
        self.calls = []

    def check(self, request):
        cancelled = []
        waiting = Deferred(lambda d: cancelled.append(True))
        self.calls.append((waiting, cancelled))
        return waiting

    def fire(self, result, call=0):
        self.calls[call][0].callback(result)

    @property
    def cancelled(self):
        return [bool(cancelled) for _, cancelled in self.calls]


class Writer(Waiting):
    """A check that writes state (as quota and greylist do)."""

    writes_state = True


def make_chain(*checks, clock, deadline=20.0, on_deadline="known", parallel=True, default=None):
    """
    A chain of C{(check, on_error)} or C{(check, on_error, timeout)}; names
    are c1, c2...
    """
    entries = []
    for position, item in enumerate(checks, start=1):
        check, on_error = item[:2]
        timeout = item[2] if len(item) > 2 else 10.0
        entries.append(ChainEntry(f"c{position}", check, timeout, ErrorPolicy.parse(on_error)))
    return CheckChain(
        entries,
        default_action=Action.parse(default) if default else None,
        deadline=deadline,
        deadline_policy=ErrorPolicy.parse_deadline(on_deadline),
        clock=clock,
        parallel=parallel,
    )


class ParallelTests(SynchronousTestCase):
    """
    The order of answers with parallel checks.
    """

    def setUp(self):
        self.clock = Clock()

    def decide(self, chain):
        outcome = chain.decide(make_request())
        if isinstance(outcome, Decision):
            return [outcome]
        results = []
        outcome.addCallback(results.append)
        return results

    def test_started_at_once(self):
        """
        Every check starts before any answers.
        """
        checks = [Waiting(), Waiting(), Waiting()]
        chain = make_chain(*[(check, "skip") for check in checks], clock=self.clock)
        self.decide(chain)
        self.assertEqual([len(check.calls) for check in checks], [1, 1, 1])

    def test_chain_order_wins(self):
        """
        A later check's decisive verdict waits for the earlier checks: it
        is the answer only when they answer DUNNO.
        """
        first, second = Waiting(), Waiting()
        chain = make_chain((first, "skip"), (second, "skip"), clock=self.clock)
        results = self.decide(chain)
        second.fire("REJECT second")
        self.assertEqual(results, [])
        first.fire("DUNNO")
        [decision] = results
        self.assertEqual((str(decision.action), decision.decided_by), ("REJECT second", "c2"))

    def test_earlier_verdict_overrides(self):
        """
        An earlier check's decisive verdict is the answer even if a later
        one answered first.
        """
        first, second = Waiting(), Waiting()
        chain = make_chain((first, "skip"), (second, "skip"), clock=self.clock)
        results = self.decide(chain)
        second.fire("REJECT second")
        first.fire("OK first")
        [decision] = results
        self.assertEqual((str(decision.action), decision.decided_by), ("OK first", "c1"))

    def test_same_as_sequential(self):
        """
        For every combination of answers and any order of arrival, the
        parallel chain answers what the sequential one does.
        """
        import itertools

        verdicts = ["DUNNO", "REJECT r", "OK o"]
        for answers in itertools.product(verdicts, repeat=3):
            for order in itertools.permutations(range(3)):
                expected = make_chain(
                    *[(Answer(a), "skip") for a in answers], clock=Clock(), parallel=False
                ).decide(make_request())
                checks = [Waiting(), Waiting(), Waiting()]
                results = self.decide(make_chain(*[(c, "skip") for c in checks], clock=Clock()))
                for index in order:
                    if checks[index].calls and not checks[index].calls[0][0].called:
                        checks[index].fire(answers[index])
                [decision] = results
                self.assertEqual(
                    (str(decision.action), decision.decided_by),
                    (str(expected.action), expected.decided_by),
                    (answers, order),
                )

    def test_rest_cancelled(self):
        """
        When the request is decided, the checks still running after the
        deciding one are cancelled.
        """
        first, second, third = Waiting(), Waiting(), Waiting()
        chain = make_chain((first, "skip"), (second, "skip"), (third, "skip"), clock=self.clock)
        results = self.decide(chain)
        first.fire("REJECT first")
        self.assertEqual(str(results[0].action), "REJECT first")
        self.assertEqual((second.cancelled, third.cancelled), ([True], [True]))
        self.assertFalse(chain._expiries)

    def test_plain_answers_stop_early(self):
        """
        Checks answering at once are started in order, and a decisive one
        spares starting the others, as without parallel.
        """
        last = Answer("OK")
        chain = make_chain(
            (Answer("DUNNO"), "skip"),
            (Answer("REJECT no"), "skip"),
            (last, "skip"),
            clock=self.clock,
        )
        [decision] = self.decide(chain)
        self.assertEqual(str(decision.action), "REJECT no")
        self.assertEqual(last.calls, 0)

    def test_failure_on_error(self):
        """
        A failing check's on_error applies in its place in chain order.
        """
        later = Waiting()
        chain = make_chain((Raises(), "DEFER broken"), (later, "skip"), clock=self.clock)
        with capturedLogs():
            [decision] = self.decide(chain)
        self.assertEqual((str(decision.action), decision.decided_by), ("DEFER broken", "c1"))
        self.assertEqual(later.calls, [])
        chain = make_chain((Raises(), "skip"), (Answer("OK"), "skip"), clock=self.clock)
        with capturedLogs():
            [decision] = self.decide(chain)
        self.assertEqual(str(decision.action), "OK")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_own_timeout(self):
        """
        A check that does not answer within its timeout is cancelled and
        treated by its on_error.
        """
        slow, fast = Waiting(), Waiting()
        chain = make_chain((slow, "skip", 1.0), (fast, "skip", 5.0), clock=self.clock)
        results = self.decide(chain)
        fast.fire("REJECT fast")
        with capturedLogs():
            self.clock.advance(1.0)
        self.assertEqual(slow.cancelled, [True])
        self.assertEqual(str(results[0].action), "REJECT fast")

    def test_caller_cancels(self):
        """
        Cancelling the decision cancels every check still running and
        answers as a chain error, never failing.
        """
        checks = [Waiting(), Waiting()]
        chain = make_chain(*[(c, "skip") for c in checks], clock=self.clock)
        decided = chain.decide(make_request())
        results = []
        decided.addCallback(results.append)
        decided.cancel()
        self.assertEqual([c.cancelled for c in checks], [[True], [True]])
        self.assertEqual(results[0].decided_by, "error")
        self.assertFalse(chain._expiries)


class StateTests(SynchronousTestCase):
    """
    Checks that write state run only when every check before them
    answered DUNNO.
    """

    def setUp(self):
        self.clock = Clock()

    def test_writer_waits(self):
        """
        A writer starts only when the checks before it answered DUNNO;
        a lookup after it starts at once.
        """
        lookup, writer, after = Waiting(), Writer(), Waiting()
        chain = make_chain((lookup, "skip"), (writer, "skip"), (after, "skip"), clock=self.clock)
        results = []
        chain.decide(make_request()).addCallback(results.append)
        self.assertEqual((len(writer.calls), len(after.calls)), (0, 1))
        lookup.fire("DUNNO")
        self.assertEqual(len(writer.calls), 1)
        after.fire("REJECT after")
        self.assertEqual(results, [])
        writer.fire("DUNNO")
        self.assertEqual(str(results[0].action), "REJECT after")

    def test_nothing_written_for_refused_mail(self):
        """
        When a check before the writer refuses, the writer never runs.
        """
        lookup, writer = Waiting(), Writer()
        chain = make_chain((lookup, "skip"), (writer, "skip"), clock=self.clock)
        results = []
        chain.decide(make_request()).addCallback(results.append)
        lookup.fire("REJECT spam")
        self.assertEqual(str(results[0].action), "REJECT spam")
        self.assertEqual(writer.calls, [])

    def test_writer_first(self):
        """
        A writer first in the chain starts at once, like the lookups.
        """
        writer, lookup = Writer(), Waiting()
        chain = make_chain((writer, "skip"), (lookup, "skip"), clock=self.clock)
        chain.decide(make_request())
        self.assertEqual((len(writer.calls), len(lookup.calls)), (1, 1))

    def test_real_check_types(self):
        """
        The quota and greylist checks say they write state.
        """
        from pfxpold.checks.greylist import GreylistCheck
        from pfxpold.checks.quota import QuotaCheck

        self.assertTrue(QuotaCheck.writes_state)
        self.assertTrue(GreylistCheck.writes_state)


class DeadlineTests(SynchronousTestCase):
    """
    C{on_deadline = "known"}: checks still running at the deadline are
    treated by their own on_error, and the chain answers from what it has.
    """

    def setUp(self):
        self.clock = Clock()

    def run_to_deadline(self, chain, fire=()):
        results = []
        chain.decide(make_request()).addCallback(results.append)
        for check, answer in fire:
            check.fire(answer)
        with capturedLogs() as events:
            self.clock.advance(chain.deadline)
        return results, [formatEvent(event) for event in events]

    def test_known_verdict_used(self):
        """
        A check still running with on_error skip is skipped, and a later
        check's decisive verdict already known is the answer.
        """
        slow, known = Waiting(), Waiting()
        chain = make_chain((slow, "skip", 30.0), (known, "skip"), clock=self.clock, deadline=5.0)
        results, logged = self.run_to_deadline(chain, [(known, "REJECT known")])
        [decision] = results
        self.assertEqual((str(decision.action), decision.decided_by), ("REJECT known", "deadline"))
        self.assertEqual(slow.cancelled, [True])
        self.assertTrue([m for m in logged if "check c1 still running at the 5.0s deadline" in m])
        self.assertTrue(
            [m for m in logged if "missed the 5.0s deadline; answering REJECT known" in m]
        )

    def test_own_on_error(self):
        """
        A check still running is treated by its own on_error, before the
        verdicts after it.
        """
        slow, known = Waiting(), Waiting()
        chain = make_chain(
            (slow, "DEFER slow", 30.0), (known, "skip"), clock=self.clock, deadline=5.0
        )
        results, _ = self.run_to_deadline(chain, [(known, "REJECT known")])
        self.assertEqual(str(results[0].action), "DEFER slow")

    def test_default_when_all_skip(self):
        """
        When every check still running skips and none known is decisive,
        the default action is answered.
        """
        slow, known = Waiting(), Waiting()
        chain = make_chain(
            (slow, "skip", 30.0), (known, "skip"), clock=self.clock, deadline=5.0, default="DUNNO"
        )
        results, _ = self.run_to_deadline(chain, [(known, "DUNNO")])
        self.assertEqual(str(results[0].action), "DUNNO")

    def test_writer_not_started(self):
        """
        A writer not started by the deadline is not run; its on_error
        stands for it.
        """
        slow, writer = Waiting(), Writer()
        chain = make_chain(
            (slow, "skip", 30.0), (writer, "DEFER quota unknown"), clock=self.clock, deadline=5.0
        )
        results, _ = self.run_to_deadline(chain)
        self.assertEqual(writer.calls, [])
        self.assertEqual(str(results[0].action), "DEFER quota unknown")

    def test_old_behaviour(self):
        """
        With an action as on_deadline, the deadline answers it, whatever
        is known.
        """
        slow, known = Waiting(), Waiting()
        chain = make_chain(
            (slow, "skip", 30.0),
            (known, "skip"),
            clock=self.clock,
            deadline=5.0,
            on_deadline="DEFER late",
        )
        results, _ = self.run_to_deadline(chain, [(known, "REJECT known")])
        self.assertEqual(
            (str(results[0].action), results[0].decided_by), ("DEFER late", "deadline")
        )
        self.assertEqual(slow.cancelled, [True])

    def test_sequential_known(self):
        """
        Without parallel, the check waited for at the deadline is treated
        by its on_error, then the checks not run yet by theirs.
        """
        slow, later = Waiting(), Waiting()
        chain = make_chain(
            (slow, "skip", 30.0), (later, "skip"), clock=self.clock, deadline=5.0, parallel=False
        )
        results, _ = self.run_to_deadline(chain)
        self.assertEqual((str(results[0].action), results[0].decided_by), ("DUNNO", "deadline"))
        self.assertEqual(later.calls, [])
        slow, later = Waiting(), Waiting()
        chain = make_chain(
            (slow, "skip", 30.0),
            (later, "DEFER not run"),
            clock=self.clock,
            deadline=5.0,
            parallel=False,
        )
        results, _ = self.run_to_deadline(chain)
        self.assertEqual(str(results[0].action), "DEFER not run")
        self.assertEqual(slow.cancelled, [True])

    def test_counted_as_deadline(self):
        """
        A check still running at the deadline is counted as a "deadline"
        error with the on_error applied, not as its own timeout.
        """
        from pfxpold.metrics import Metrics

        slow = Waiting()
        chain = make_chain((slow, "skip", 30.0), clock=self.clock, deadline=5.0, parallel=False)
        metrics = Metrics(self.clock)
        chain.observer = metrics
        self.run_to_deadline(chain)
        self.assertEqual(metrics.check_errors, {("c1", "deadline"): 1})
        self.assertEqual(metrics.check_on_error, {("c1", "skip"): 1})
