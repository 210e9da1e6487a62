"""
The check chain: runs the configured checks in order and turns their
answers, failures and timeouts into one decision per request.

Checks that answer at once are run without a Deferred or a timer, so the
common case costs a few function calls; a check that returns a Deferred or a
coroutine moves the rest of the request onto an asynchronous path bounded by
the check's timeout and the whole-request deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any, Optional, Union

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.action import DUNNO, Action, ActionError, as_action
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
    """

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
        passed = DUNNO
        decision: Optional[Decision] = None
        # Whether a check answered with a Deferred or a coroutine that had
        # already finished: the caller then still gets a (fired) Deferred.
        settled = False
        for index, entry in enumerate(self.entries):
            try:
                result = entry.check.check(request)
                if isinstance(result, (Deferred, CoroutineType)):
                    settled = True
                    result = _settled(result)
                    if isinstance(result, Deferred):
                        return self._decide_later(request, index, result, passed, verdicts)
                action = self._to_action(result)
                if self._failing and entry.name in self._failing:
                    self._recovered(entry)
            except Exception:
                decision = self._failed(entry, Failure(), verdicts)
                if decision is not None:
                    break
                continue
            if self.record_verdicts:
                verdicts.append((entry.name, str(action)))
            if action.decisive:
                decision = Decision(action, entry.name, verdicts)
                break
            passed = action
        if decision is None:
            decision = Decision(self.default_action or passed, "default", verdicts)
        return succeed(decision) if settled else decision

    def _decide_later(
        self,
        request: PolicyRequest,
        index: int,
        pending: Any,
        passed: Action,
        verdicts: list[tuple[str, str]],
    ) -> Deferred[Decision]:
        """
        Finish the chain asynchronously, from check C{index} whose result
        C{pending} is a Deferred or a coroutine, within the deadline.
        """
        decision = self._within(
            Deferred.fromCoroutine(self._run_from(request, index, pending, passed, verdicts)),
            self.deadline,
        )

        def deadline_passed(failure: Failure) -> Decision:
            failure.trap(TimeoutError)
            policy = self.deadline_policy
            self._log.warn(
                "request from {client} missed the {deadline}s deadline; answering {outcome}",
                client=request.client_address,
                deadline=self.deadline,
                outcome=str(policy),
            )
            return Decision(policy.action, "deadline", verdicts)

        def unexpected(failure: Failure) -> Decision:
            self._log.failure("check chain failed", failure)
            return Decision(self.deadline_policy.action, "error", verdicts)

        decision.addErrback(deadline_passed)
        decision.addErrback(unexpected)
        return decision

    async def _run_from(
        self,
        request: PolicyRequest,
        index: int,
        pending: Any,
        passed: Action,
        verdicts: list[tuple[str, str]],
    ) -> Decision:
        entries = self.entries
        while index < len(entries):
            entry = entries[index]
            index += 1
            try:
                if pending is None:
                    pending = entry.check.check(request)
                if isinstance(pending, CoroutineType):
                    pending = Deferred.fromCoroutine(pending)
                if isinstance(pending, Deferred):
                    pending = await self._within(pending, entry.timeout)
                action = self._to_action(pending)
                if self._failing and entry.name in self._failing:
                    self._recovered(entry)
            except CancelledError:
                # The whole-request deadline cancelled us; let it decide.
                raise
            except Exception:
                decision = self._failed(entry, Failure(), verdicts)
                if decision is not None:
                    return decision
                pending = None
                continue
            pending = None
            if self.record_verdicts:
                verdicts.append((entry.name, str(action)))
            if action.decisive:
                return Decision(action, entry.name, verdicts)
            passed = action
        return Decision(self.default_action or passed, "default", verdicts)

    def _within(self, pending: Deferred[Any], seconds: float) -> Deferred[Any]:
        """
        Bound C{pending} by C{seconds}.

        Unlike L{Deferred.addTimeout}, this does not depend on C{pending}
        honouring its cancellation: a coroutine that catches
        L{CancelledError} and keeps waiting would otherwise hold the request
        for as long as it likes.

        @return: a Deferred that fires with C{pending}'s result, or fails
            with L{TimeoutError} after C{seconds}; C{pending} is then
            cancelled and whatever it does later is ignored.
        """
        bounded: Deferred[Any] = Deferred(lambda _: pending.cancel())

        def timed_out() -> None:
            if not bounded.called:
                bounded.errback(TimeoutError(f"not done within {seconds}s"))
            pending.cancel()

        timer = self._clock.callLater(seconds, timed_out)

        def done(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
            if not bounded.called:
                if isinstance(outcome, Failure):
                    bounded.errback(outcome)
                else:
                    bounded.callback(outcome)
            # Swallowed: a late failure of an abandoned check is not an
            # unhandled error.

        pending.addBoth(done)
        return bounded

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
        self, entry: ChainEntry, failure: Failure, verdicts: list[tuple[str, str]]
    ) -> Optional[Decision]:
        """
        Log a check's failure and apply its C{on_error}.

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
                reason=failure.getErrorMessage(),
                outcome=str(policy),
            )
            verdict = "invalid action"
        elif self._failing.get(entry.name) is failure.type:
            self._log.warn(
                "check {check} failed again: {error}; on_error={outcome}",
                check=entry.name,
                error=f"{failure.type.__name__}: {failure.getErrorMessage()}",
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
        if self.record_verdicts:
            verdicts.append((entry.name, verdict))
        if policy.kind == SKIP:
            return None
        return Decision(policy.action, entry.name, verdicts)
