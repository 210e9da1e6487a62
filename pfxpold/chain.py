"""
The check chain: runs the configured checks in order and turns their
answers, failures and timeouts into one decision per request.

Checks that answer at once are run without a Deferred or a timer, so the
common case costs a few function calls; a check that returns a Deferred or a
coroutine moves the rest of the request onto an asynchronous path bounded by
the check's timeout and the whole-request deadline, with one timer per
request for whichever of the two comes first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any, Optional, Union, final

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.action import DUNNO, Action, ActionError, as_action
from pfxpold.escape import escape, is_clean
from pfxpold.interfaces import ICheck, IDecisionListener, IPolicyDecider
from pfxpold.request import PolicyRequest

SKIP = "skip"
NOREPLY = "noreply"


@dataclass(frozen=True)
class ErrorPolicy:
    """
    What to do when a check fails, times out or returns an invalid action.

    @ivar kind: C{"skip"} to go on with the next check (fail open),
        C{"noreply"} to close the connection without an answer so that
        Postfix applies its C{smtpd_policy_service_default_action}, or
        C{"reply"} to answer C{action} (fail closed).
    """

    kind: str
    action: Optional[Action] = None

    @classmethod
    def parse(cls, value: str, restriction_classes: tuple[str, ...] = ()) -> ErrorPolicy:
        """
        Read C{"skip"}, C{"noreply"} or an action string.

        @raise ActionError: for anything else.
        """
        if value == SKIP or value == NOREPLY:
            return cls(value)
        return cls("reply", Action.parse(value, restriction_classes))

    def __str__(self) -> str:
        return str(self.action) if self.action is not None else self.kind


@dataclass(frozen=True)
class ChainEntry:
    """
    One configured check and how the chain treats it.
    """

    name: str
    check: Any
    timeout: float
    on_error: ErrorPolicy


@dataclass
class Decision:
    """
    The outcome of a request.

    @ivar action: what to answer, or L{None} to close the connection
        without an answer.
    @ivar decided_by: the name of the deciding check, C{"default"} when no
        check was decisive, or C{"deadline"}.
    @ivar verdicts: C{(check name, verdict)} pairs in the order the checks
        ran, filled only when the chain records them (debug logging).
    """

    action: Optional[Action]
    decided_by: str
    verdicts: list[tuple[str, str]] = field(default_factory=list)


def _settled(pending: Any) -> Any:
    """
    A check's Deferred or coroutine, as a Deferred, or its result when it
    already has one. A check answering from a warm cache with C{async def}
    or C{succeed()} then costs no coroutine, timers or Deferreds of the
    chain's own: the profile of the asynchronous path showed them costing
    more than the check.

    @return: the result, or a Deferred that fires with it.
    @raise Exception: what the check failed with, when it already failed
        (except a cancellation, which goes the asynchronous way as before).
    """
    if isinstance(pending, CoroutineType):
        pending = Deferred.fromCoroutine(pending)
    if not pending.called or pending.paused:
        return pending
    outcome: list[Any] = []
    later: list[Deferred[Any]] = []

    def take(result: Any) -> None:
        if later:
            later[0].callback(result)
        else:
            outcome.append(result)

    pending.addBoth(take)
    if not outcome:
        # Its callbacks are running right now (re-entrancy): wait for them.
        later.append(Deferred(lambda _: pending.cancel()))
        return later[0]
    result = outcome[0]
    if isinstance(result, Failure):
        if result.check(CancelledError):
            return fail(result)
        result.raiseException()
    return result


# final: so that mypy narrows on the fast path's type(outcome) is _Waiting.
@final
class _Waiting:
    """
    Where a request's chain stopped: check C{index}, run at C{started} (0
    when no observer reads it), answers later, with C{pending}; C{passed} is
    the last non-decisive answer before it.
    """

    __slots__ = ("index", "passed", "pending", "started")

    def __init__(
        self, index: int, pending: Deferred[Any], passed: Action, started: float = 0.0
    ) -> None:
        self.index = index
        self.pending = pending
        self.passed = passed
        self.started = started


class _Continuation:
    """
    The rest of a request's chain once a check answered with a Deferred:
    waits for it, then runs the following checks, with one timer for
    whichever comes first of the waited-for check's timeout and the
    request's deadline.

    One timer per request instead of one per check and one for the
    request, and no coroutine or Deferred of the chain's own around each
    check: on a chain where every request waits for a store, these cost
    more than the rest of the chain.
    """

    __slots__ = (
        "chain",
        "request",
        "verdicts",
        "decision",
        "deadline_at",
        "waiting",
        "check_at",
        "timer",
        "timer_at",
    )

    def __init__(
        self, chain: CheckChain, request: PolicyRequest, verdicts: list[tuple[str, str]]
    ) -> None:
        self.chain = chain
        self.request = request
        self.verdicts = verdicts
        self.decision: Deferred[Decision] = Deferred(self._cancelled)
        self.deadline_at = chain._clock.seconds() + chain.deadline
        self.waiting: Optional[_Waiting] = None
        self.check_at = 0.0
        self.timer: Any = None
        self.timer_at = 0.0

    def wait(self, waiting: _Waiting) -> Deferred[Decision]:
        """
        Wait for C{waiting.pending}, within its check's timeout and the
        deadline.

        @return: the Deferred of the request's decision.
        """
        chain = self.chain
        clock = chain._clock
        now = clock.seconds()
        self.waiting = waiting
        self.check_at = now + chain.entries[waiting.index].timeout
        due = min(self.check_at, self.deadline_at)
        if self.timer is None or due != self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = clock.callLater(max(0.0, due - now), self._expired)
            self.timer_at = due
        waiting.pending.addBoth(self._answered, waiting)
        return self.decision

    def _answered(self, outcome: Any, waiting: _Waiting) -> None:
        # None: the result (or a late failure) of a check given up on is
        # swallowed, not an unhandled error.
        if waiting is not self.waiting:
            return None
        self.waiting = None
        chain = self.chain
        entry = chain.entries[waiting.index]
        try:
            if isinstance(outcome, Failure):
                if outcome.check(CancelledError):
                    # Not cancelled by the chain (it stopped waiting first):
                    # the check broke; end the request as a chain error.
                    self._unexpected(outcome)
                    return None
                outcome.raiseException()
            action = chain._to_action(outcome)
            if chain._failing and entry.name in chain._failing:
                chain._recovered(entry)
        except Exception:
            self._go_on_after_failure(waiting, Failure())
            return None
        if chain.observer is not None:
            chain.observer.check_answered(entry.name, action.verb, waiting.started)
        if chain.record_verdicts:
            self.verdicts.append((entry.name, str(action)))
        if action.decisive:
            self._finish(Decision(action, entry.name, self.verdicts))
        else:
            self._go_on(waiting.index + 1, action)
        return None

    def _expired(self) -> None:
        self.timer = None
        waiting, self.waiting = self.waiting, None
        if waiting is None:
            return
        chain = self.chain
        # The check's timeout first when both are due, as when each had
        # its own timer: its on_error may still answer.
        check_timed_out = self.check_at <= self.deadline_at
        self._abandon(waiting.pending)
        if check_timed_out:
            timeout = chain.entries[waiting.index].timeout
            failure = Failure(TimeoutError(f"not done within {timeout}s"))
            self._go_on_after_failure(waiting, failure)
        else:
            self._abandoned(waiting)
            self._finish(chain._deadline_passed(self.request, self.verdicts))

    def _abandoned(self, waiting: _Waiting) -> None:
        observer = self.chain.observer
        if observer is not None:
            observer.check_abandoned(self.chain.entries[waiting.index].name, waiting.started)

    def _go_on_after_failure(self, waiting: _Waiting, failure: Failure) -> None:
        decision = self.chain._failed(
            self.chain.entries[waiting.index], failure, self.verdicts, waiting.started
        )
        if decision is not None:
            self._finish(decision)
        else:
            self._go_on(waiting.index + 1, waiting.passed)

    def _go_on(self, index: int, passed: Action) -> None:
        try:
            outcome, _ = self.chain._run_checks(self.request, index, passed, self.verdicts)
        except Exception:
            self._unexpected(Failure())
            return
        if type(outcome) is _Waiting:
            if self.chain._clock.seconds() >= self.deadline_at:
                self._abandon(outcome.pending.addErrback(lambda failure: None))
                self._abandoned(outcome)
                self._finish(self.chain._deadline_passed(self.request, self.verdicts))
            else:
                self.wait(outcome)
            return
        self._finish(outcome)

    def _unexpected(self, failure: Failure) -> None:
        self.chain._log.failure("check chain failed", failure)
        self._finish(Decision(self.chain.deadline_policy.action, "error", self.verdicts))

    def _finish(self, decision: Decision) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.decision.called:
            self.decision.callback(decision)

    def _cancelled(self, decision: Deferred[Decision]) -> None:
        """
        The caller gave up on the decision: stop waiting, and answer as a
        chain error rather than fail (a decider never fails).
        """
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            self._abandon(waiting.pending)
        self._finish(Decision(self.chain.deadline_policy.action, "error", self.verdicts))

    def _abandon(self, pending: Deferred[Any]) -> None:
        """
        Cancel a check's Deferred the chain no longer waits for; a check
        whose cancellation breaks must not leave the request unanswered.
        """
        try:
            pending.cancel()
        except Exception:
            self.chain._log.failure("cancelling a check's Deferred failed")


class _CheckFailed(Exception):
    """
    A check's answer could not be used; carries the policy outcome.
    """


@implementer(IPolicyDecider)
class CheckChain:
    """
    Runs checks in order; the first decisive answer (anything but DUNNO)
    wins, and C{default_action} applies when every check passes. Without a
    default action, the last check's DUNNO is answered, text and all.

    @ivar observer: told of every check's answer, failure and abandonment
        (a L{pfxpold.metrics.Metrics}), or L{None}: nothing is timed or
        called.
    """

    observer: Optional[Any] = None

    _log = Logger()

    def __init__(
        self,
        entries: list[ChainEntry],
        default_action: Optional[Action],
        deadline: float,
        deadline_policy: ErrorPolicy,
        clock: IReactorTime,
        restriction_classes: tuple[str, ...] = (),
        record_verdicts: bool = False,
    ) -> None:
        for entry in entries:
            if not ICheck.providedBy(entry.check):
                raise TypeError(f"check {entry.name!r} does not provide ICheck")
        self.entries = tuple(entries)
        self.default_action = default_action
        self.deadline = deadline
        self.deadline_policy = deadline_policy
        self.restriction_classes = restriction_classes
        self.record_verdicts = record_verdicts
        self._clock = clock
        self._parsed: dict[str, Action] = {}
        # The kind of error each failing check last raised: during a backend
        # outage every request fails alike, and one traceback is enough.
        self._failing: dict[str, type] = {}
        self._listeners = tuple(
            entry.check for entry in self.entries if IDecisionListener.providedBy(entry.check)
        )

    def decide(self, request: PolicyRequest) -> Union[Decision, Deferred[Decision]]:
        """
        Decide on C{request}, and tell the L{IDecisionListener} checks.

        @return: a L{Decision}, at once when every check answered at once,
            else a Deferred that fires with one within the deadline and
            never fails.
        """
        decision = self._decide(request)
        if not self._listeners:
            return decision
        if isinstance(decision, Deferred):
            return decision.addCallback(self._tell_listeners, request)
        return self._tell_listeners(decision, request)

    def _tell_listeners(self, decision: Decision, request: PolicyRequest) -> Decision:
        for listener in self._listeners:
            try:
                listener.decided(request, decision.action)
            except Exception:
                self._log.failure("decision listener {listener!r} failed", listener=listener)
        return decision

    def _decide(self, request: PolicyRequest) -> Union[Decision, Deferred[Decision]]:
        verdicts: list[tuple[str, str]] = []
        outcome, settled = self._run_checks(request, 0, DUNNO, verdicts)
        if type(outcome) is _Waiting:
            return _Continuation(self, request, verdicts).wait(outcome)
        # A check answered with a Deferred or coroutine that had already
        # finished: the caller still gets a (fired) Deferred, as before.
        return succeed(outcome) if settled else outcome

    def _run_checks(
        self,
        request: PolicyRequest,
        index: int,
        passed: Action,
        verdicts: list[tuple[str, str]],
    ) -> tuple[Union[Decision, _Waiting], bool]:
        """
        Run the checks from C{index} on, for as long as they answer at once.

        @return: the decision, or a L{_Waiting} when a check answers later;
            and whether a check answered with a Deferred or a coroutine
            (that had already finished).
        """
        decision: Optional[Decision] = None
        settled = False
        entries = self.entries
        observer = self.observer
        started = 0.0
        while index < len(entries):
            entry = entries[index]
            if observer is not None:
                started = self._clock.seconds()
            try:
                result = entry.check.check(request)
                if isinstance(result, (Deferred, CoroutineType)):
                    settled = True
                    result = _settled(result)
                    if isinstance(result, Deferred):
                        return _Waiting(index, result, passed, started), True
                action = self._to_action(result)
                if self._failing and entry.name in self._failing:
                    self._recovered(entry)
            except Exception:
                decision = self._failed(entry, Failure(), verdicts, started)
                if decision is not None:
                    break
                index += 1
                continue
            if observer is not None:
                observer.check_answered(entry.name, action.verb, started)
            if self.record_verdicts:
                verdicts.append((entry.name, str(action)))
            if action.decisive:
                decision = Decision(action, entry.name, verdicts)
                break
            passed = action
            index += 1
        if decision is None:
            decision = Decision(self.default_action or passed, "default", verdicts)
        return decision, settled

    def _deadline_passed(self, request: PolicyRequest, verdicts: list[tuple[str, str]]) -> Decision:
        policy = self.deadline_policy
        self._log.warn(
            "request from {client} missed the {deadline}s deadline; answering {outcome}",
            client=escape(request.client_address),
            deadline=self.deadline,
            outcome=str(policy),
        )
        return Decision(policy.action, "deadline", verdicts)

    def _to_action(self, result: object) -> Action:
        """
        Turn what a check returned into a validated L{Action}, remembering
        parsed strings: most checks answer from a handful of them.

        @raise ActionError: when it is not a valid action.
        """
        if type(result) is str:
            action = self._parsed.get(result)
            if action is None:
                action = Action.parse(result, self.restriction_classes)
                if len(self._parsed) < 4096:
                    self._parsed[result] = action
            return action
        return as_action(result, self.restriction_classes)

    def _recovered(self, entry: ChainEntry) -> None:
        del self._failing[entry.name]
        self._log.info("check {check} answers again", check=entry.name)

    def _failed(
        self,
        entry: ChainEntry,
        failure: Failure,
        verdicts: list[tuple[str, str]],
        started: float = 0.0,
    ) -> Optional[Decision]:
        """
        Log a check's failure and apply its C{on_error}.

        @param started: when the check was run, for the L{observer}.

        @return: the decision when the failure ends the request, L{None}
            when the chain goes on (C{skip}).
        """
        policy = entry.on_error
        if failure.check(TimeoutError):
            self._log.warn(
                "check {check} timed out after {timeout}s; on_error={outcome}",
                check=entry.name,
                timeout=entry.timeout,
                outcome=str(policy),
            )
            verdict = "timeout"
        elif failure.check(ActionError):
            self._log.error(
                "check {check} returned an invalid action ({reason}); this is a bug"
                " in the check; on_error={outcome}",
                check=entry.name,
                reason=escape(failure.getErrorMessage()),
                outcome=str(policy),
            )
            verdict = "invalid action"
        elif self._failing.get(entry.name) is failure.type:
            self._log.warn(
                "check {check} failed again: {error}; on_error={outcome}",
                check=entry.name,
                error=escape(f"{type(failure.value).__name__}: {failure.getErrorMessage()}"),
                outcome=str(policy),
            )
            verdict = "error"
        elif not is_clean(failure.getErrorMessage()):
            # A message quoting a backend's or a client's text with control
            # characters in it: escaped, in one line, since a traceback
            # would carry it raw.
            self._failing[entry.name] = failure.type
            self._log.warn(
                "check {check} failed: {error}; on_error={outcome}",
                check=entry.name,
                error=escape(f"{type(failure.value).__name__}: {failure.getErrorMessage()}"),
                outcome=str(policy),
            )
            verdict = "error"
        else:
            self._failing[entry.name] = failure.type
            self._log.failure(
                "check {check} failed; on_error={outcome} (the same error again is"
                " logged in one line until the check answers)",
                failure,
                check=entry.name,
                outcome=str(policy),
            )
            verdict = "error"
        if self.observer is not None:
            self.observer.check_failed(entry.name, failure, policy, started)
        if self.record_verdicts:
            verdicts.append((entry.name, verdict))
        if policy.kind == SKIP:
            return None
        return Decision(policy.action, entry.name, verdicts)
