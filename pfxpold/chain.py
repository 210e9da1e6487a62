"""
The check chain: runs the configured checks in order and turns their
answers, failures and timeouts into one decision per request.

Checks that answer at once are run without a Deferred or a timer, so the
common case costs a few function calls. A check may also answer with a
Deferred or a coroutine: one that has already fired (a warm cache) is used
at once, like a plain answer, and the request stays on the synchronous
path. One still waiting moves the rest of the request onto the
asynchronous path, bounded by the check's timeout and the whole-request
deadline. Those bounds are kept by one L{Expiries} per chain, not by a
timer per request: at a few hundred requests waiting at once, adding and
removing a dictionary entry costs less than a C{callLater} and its
cancellation.

Only Twisted's public Deferred API is used: a coroutine becomes a Deferred
with C{Deferred.fromCoroutine}; a check's Deferred gets one C{addBoth}
callback, which runs at once when the Deferred has a result (that is how
the chain tells a fired one from a waiting one) and otherwise continues
the request through the chain's own methods when it fires; a check given
up on is C{cancel}led.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any, Optional, Union

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.action import DUNNO, Action, ActionError, as_action
from pfxpold.escape import escape, is_clean
from pfxpold.expiries import Expiries
from pfxpold.interfaces import ICheck, IDecisionListener, IPolicyDecider
from pfxpold.request import PolicyRequest
from pfxpold.stages import DEFAULT_POSTFIX, Version, parse_version, problems, shown

SKIP = "skip"
NOREPLY = "noreply"

#: What checks answer at once.
_PLAIN = frozenset((Action, str))


class StageError(ActionError):
    """
    A valid action that Postfix would ignore or misuse at the request's
    C{protocol_state} (L{pfxpold.stages}).
    """

    def __init__(self, action: Action, state: str, version: Version, reason: str) -> None:
        where = state or "(no protocol_state)"
        super().__init__(f"Postfix {shown(version)} at {where}: {reason}")
        self.action = action
        self.state = state


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


class _Walk:
    """
    A request the chain is working on, from the first check that answered
    with a Deferred to its decision.

    @ivar index: the check being run or waited for.
    @ivar passed: the last non-decisive answer before it.
    @ivar started: when it was run (0 when no observer reads it).
    @ivar pending: the Deferred waited for; L{None} when not waiting.
    @ivar settling: whether the Deferred's first callback is being added,
        so that an answer now is used at once, not as a later one.
    @ivar outcome: an answer (or failure) that came while settling.
    @ivar decision: the Deferred of the decision, once the request waits.
    @ivar deadline_at: when the request's deadline passes.
    """

    __slots__ = (
        "request",
        "verdicts",
        "index",
        "passed",
        "started",
        "pending",
        "settling",
        "outcome",
        "decision",
        "deadline_at",
    )

    def __init__(self, request: PolicyRequest, verdicts: list[tuple[str, str]]) -> None:
        self.request = request
        self.verdicts = verdicts
        self.index = 0
        self.passed = DUNNO
        self.started = 0.0
        self.pending: Optional[Deferred[Any]] = None
        self.settling = False
        self.outcome: Any = None
        self.decision: Optional[Deferred[Decision]] = None
        self.deadline_at = 0.0


@implementer(IPolicyDecider)
class CheckChain:
    """
    Runs checks in order; the first decisive answer (anything but DUNNO)
    wins, and C{default_action} applies when every check passes. Without a
    default action, the last check's DUNNO is answered, text and all.

    @ivar deadline: seconds a request waiting for checks may take in all
        before C{deadline_policy} answers it.
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
        postfix_version: Version = parse_version(DEFAULT_POSTFIX),
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
        self.postfix_version = postfix_version
        # Verb -> protocol_state -> why Postfix would not honour it there
        # (pfxpold.stages); answers with other verbs cost one dict lookup.
        self._stage_problems = problems(postfix_version)
        self._clock = clock
        self._parsed: dict[str, Action] = {}
        self._plain_verbs: set[str] = set()
        # The kind of error each failing check last raised: during a backend
        # outage every request fails alike, and one traceback is enough.
        self._failing: dict[str, type] = {}
        self._listeners = tuple(
            entry.check for entry in self.entries if IDecisionListener.providedBy(entry.check)
        )
        # The check timeouts' queues first: a check timing out exactly at
        # the deadline is handled as its own timeout, so its on_error may
        # still answer.
        self._expiries = Expiries(clock)
        by_timeout: dict[float, int] = {}
        for entry in self.entries:
            if entry.timeout not in by_timeout:
                by_timeout[entry.timeout] = self._expiries.queue(entry.timeout, self._timed_out)
        self._timeout_queues = tuple(by_timeout[entry.timeout] for entry in self.entries)
        self._deadline_queue = self._expiries.queue(deadline, self._give_up)

    def decide(self, request: PolicyRequest) -> Union[Decision, Deferred[Decision]]:
        """
        Decide on C{request}, and tell the L{IDecisionListener} checks.

        @return: a L{Decision}, at once when every check answered at once
            (with a value, or a Deferred or coroutine that had already
            finished), else a Deferred that fires with one within the
            deadline and never fails.
        """
        verdicts: list[tuple[str, str]] = []
        outcome = self._run(request, verdicts, 0, DUNNO, None)
        if type(outcome) is _Walk:
            decision = self._wait(outcome)
            if self._listeners:
                decision.addCallback(self._tell_listeners, request)
            return decision
        assert type(outcome) is Decision
        if self._listeners:
            self._tell_listeners(outcome, request)
        return outcome

    def _tell_listeners(self, decision: Decision, request: PolicyRequest) -> Decision:
        for listener in self._listeners:
            try:
                listener.decided(request, decision.action)
            except Exception:
                self._log.failure("decision listener {listener!r} failed", listener=listener)
        return decision

    # The walk through the checks

    def _run(
        self,
        request: PolicyRequest,
        verdicts: list[tuple[str, str]],
        index: int,
        passed: Action,
        walk: Optional[_Walk],
    ) -> Union[Decision, _Walk]:
        """
        Run the checks from C{index} on, for as long as they answer at once.

        @param walk: the request's L{_Walk}, if it has one yet.
        @return: the decision, or the request's L{_Walk} waiting for check
            C{walk.index}'s Deferred.
        """
        entries = self.entries
        observer = self.observer
        started = 0.0
        while index < len(entries):
            entry = entries[index]
            if observer is not None:
                started = self._clock.seconds()
            try:
                result = entry.check.check(request)
                # type() first: Deferred is an abstract Awaitable, and
                # isinstance on it takes the slow ABC path.
                if type(result) not in _PLAIN and isinstance(result, (Deferred, CoroutineType)):
                    if walk is None:
                        walk = _Walk(request, verdicts)
                    if not self._settle(walk, result):
                        walk.index = index
                        walk.passed = passed
                        walk.started = started
                        return walk
                    result = walk.outcome
                    walk.outcome = None
                    if isinstance(result, Failure):
                        if result.check(CancelledError):
                            # Cancelled by someone else: the check broke.
                            return self._chain_error(result, verdicts)
                        result.raiseException()
                action = self._to_action(result, request)
                if self._failing and entry.name in self._failing:
                    self._recovered(entry)
            except Exception:
                decision = self._failed(entry, Failure(), verdicts, started)
                if decision is not None:
                    return decision
                index += 1
                continue
            if observer is not None:
                observer.check_answered(entry.name, action.verb, started)
            if self.record_verdicts:
                verdicts.append((entry.name, str(action)))
            if action.decisive:
                return Decision(action, entry.name, verdicts)
            passed = action
            index += 1
        return Decision(self.default_action or passed, "default", verdicts)

    def _settle(
        self, walk: _Walk, pending: Union[Deferred[Any], CoroutineType[Any, Any, Any]]
    ) -> bool:
        """
        Take a check's Deferred or coroutine's answer if it has one now.

        @return: whether it had: its result (or failure) is then in
            C{walk.outcome}; otherwise C{walk.pending} is the Deferred to
            wait for, and L{_answered} continues the walk when it fires.
        """
        if type(pending) is CoroutineType:
            pending = Deferred.fromCoroutine(pending)
        walk.pending = pending
        # A Deferred that has fired (and is not paused, nor running its
        # callbacks) runs this callback at once.
        walk.settling = True
        pending.addBoth(self._answered, walk, pending)
        walk.settling = False
        return walk.pending is None

    def _answered(self, outcome: object, walk: _Walk, pending: Deferred[Any]) -> None:
        """
        A check's Deferred fired: use its answer at once while settling,
        else go on with the walk.

        @return: L{None}: the result (or a late failure) of a check given up
            on is swallowed, not an unhandled error.
        """
        if walk.pending is not pending:
            return None
        walk.pending = None
        if walk.settling:
            walk.outcome = outcome
            return None
        self._expiries.discard(self._timeout_queues[walk.index], walk)
        entry = self.entries[walk.index]
        try:
            if isinstance(outcome, Failure):
                if outcome.check(CancelledError):
                    # Not cancelled by the chain (it stopped waiting first):
                    # the check broke; end the request as a chain error.
                    self._finish(walk, self._chain_error(outcome, walk.verdicts))
                    return None
                outcome.raiseException()
            action = self._to_action(outcome, walk.request)
            if self._failing and entry.name in self._failing:
                self._recovered(entry)
        except Exception:
            self._go_on_after_failure(walk, Failure())
            return None
        if self.observer is not None:
            self.observer.check_answered(entry.name, action.verb, walk.started)
        if self.record_verdicts:
            walk.verdicts.append((entry.name, str(action)))
        if action.decisive:
            self._finish(walk, Decision(action, entry.name, walk.verdicts))
        else:
            self._go_on(walk, walk.index + 1, action)
        return None

    def _go_on_after_failure(self, walk: _Walk, failure: Failure) -> None:
        decision = self._failed(self.entries[walk.index], failure, walk.verdicts, walk.started)
        if decision is not None:
            self._finish(walk, decision)
        else:
            self._go_on(walk, walk.index + 1, walk.passed)

    def _go_on(self, walk: _Walk, index: int, passed: Action) -> None:
        """
        Run the checks after the one that answered late, and wait again or
        decide.
        """
        try:
            outcome = self._run(walk.request, walk.verdicts, index, passed, walk)
        except Exception:
            self._finish(walk, self._chain_error(Failure(), walk.verdicts))
            return
        if type(outcome) is _Walk:
            self._wait(walk)
        else:
            assert type(outcome) is Decision
            self._finish(walk, outcome)

    def _wait(self, walk: _Walk) -> Deferred[Decision]:
        """
        Wait for C{walk.pending} within its check's timeout and the
        request's deadline, which starts with the first wait.

        @return: the Deferred of the request's decision.
        """
        expiries = self._expiries
        if walk.decision is None:
            walk.decision = Deferred(lambda decision: self._cancelled(walk))
            walk.deadline_at = self._clock.seconds() + self.deadline
            expiries.add(self._deadline_queue, walk)
        elif self._clock.seconds() >= walk.deadline_at:
            # A check timed out (skip) at the deadline, or the checks after
            # a late answer took the rest of it.
            self._give_up(walk)
            return walk.decision
        expiries.add(self._timeout_queues[walk.index], walk)
        return walk.decision

    # Endings

    def _timed_out(self, walk: _Walk) -> None:
        """
        The check C{walk} waits for took longer than its timeout.
        """
        pending, walk.pending = walk.pending, None
        if pending is None:
            return
        self._abandon(pending)
        timeout = self.entries[walk.index].timeout
        self._go_on_after_failure(walk, Failure(TimeoutError(f"not done within {timeout}s")))

    def _give_up(self, walk: _Walk) -> None:
        """
        The request C{walk} missed its deadline: stop waiting, and answer
        C{deadline_policy}.
        """
        pending, walk.pending = walk.pending, None
        self._expiries.discard(self._timeout_queues[walk.index], walk)
        if pending is not None:
            self._abandon(pending)
        if self.observer is not None:
            self.observer.check_abandoned(self.entries[walk.index].name, walk.started)
        policy = self.deadline_policy
        self._log.warn(
            "request from {client} missed the {deadline}s deadline; answering {outcome}",
            client=escape(walk.request.client_address),
            deadline=self.deadline,
            outcome=str(policy),
        )
        self._finish(walk, Decision(policy.action, "deadline", walk.verdicts))

    def _cancelled(self, walk: _Walk) -> None:
        """
        The caller gave up on the decision: stop waiting, and answer as a
        chain error rather than fail (a decider never fails).
        """
        pending, walk.pending = walk.pending, None
        if pending is not None:
            self._expiries.discard(self._timeout_queues[walk.index], walk)
            self._abandon(pending)
        self._finish(walk, Decision(self.deadline_policy.action, "error", walk.verdicts))

    def _finish(self, walk: _Walk, decision: Decision) -> None:
        self._expiries.discard(self._deadline_queue, walk)
        if walk.decision is not None and not walk.decision.called:
            walk.decision.callback(decision)

    def _abandon(self, pending: Deferred[Any]) -> None:
        """
        Cancel a check's Deferred the chain no longer waits for; a check
        whose cancellation breaks must not leave the request unanswered.
        """
        try:
            pending.cancel()
        except Exception:
            self._log.failure("cancelling a check's Deferred failed")

    def _chain_error(self, failure: Failure, verdicts: list[tuple[str, str]]) -> Decision:
        self._log.failure("check chain failed", failure)
        return Decision(self.deadline_policy.action, "error", verdicts)

    # Answers and failures

    def _to_action(self, result: object, request: PolicyRequest) -> Action:
        """
        Turn what a check returned into a validated L{Action}, remembering
        parsed strings: most checks answer from a handful of them. The
        action must be one Postfix honours at the request's stage
        (L{pfxpold.stages}).

        @raise StageError: when Postfix would not honour it there.
        @raise ActionError: when it is not a valid action.
        """
        if type(result) is str:
            action = self._parsed.get(result)
            if action is None:
                action = Action.parse(result, self.restriction_classes)
                if len(self._parsed) < 4096:
                    self._parsed[result] = action
        elif type(result) is Action and result.verb in self._plain_verbs:
            # An access(5) verb or a status code: nothing to check against
            # the restriction classes.
            action = result
        else:
            action = as_action(result, self.restriction_classes)
            if not action.is_restriction_class:
                # Bounded: the access(5) verbs and three-digit codes.
                self._plain_verbs.add(action.verb)
        reasons = self._stage_problems.get(action.verb)
        if reasons is not None:
            reason = reasons.get(request.protocol_state)
            if reason is not None:
                raise StageError(action, request.protocol_state, self.postfix_version, reason)
        return action

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
        elif failure.check(StageError):
            self._log.error(
                "check {check} answered {action}, which Postfix does not honour here"
                " ({reason}); on_error={outcome}",
                check=entry.name,
                action=escape(str(failure.value.action)),
                reason=escape(failure.getErrorMessage()),
                outcome=str(policy),
            )
            verdict = "action not honoured at this stage"
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
