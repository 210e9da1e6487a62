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

Two ways of running checks change only when a check runs, never what is
answered. A I{shadow} check (C{shadow = true}) runs once the request is
decided, if the walk reached its place, and its verdict is only logged
and counted: the answer never waits for it. With C{parallel}, every check
that writes no state starts at once; the answer is still the first
decisive verdict in chain order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
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
#: C{on_deadline}: the checks that did not answer in time are treated by
#: their own C{on_error}, and the chain answers from what it knows.
KNOWN = "known"

#: A check's C{mode}: it decides, or it is only watched.
ENFORCE = "enforce"
SHADOW = "shadow"
MODES = (ENFORCE, SHADOW)

#: What a chain error (a broken check or chain, a cancelled decision) is
#: answered with when C{on_deadline} is C{"known"} and so names no action.
ERROR_ACTION = "DEFER_IF_PERMIT Service temporarily unavailable"

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

    @classmethod
    def parse_deadline(cls, value: str, restriction_classes: tuple[str, ...] = ()) -> ErrorPolicy:
        """
        Read an C{on_deadline}: C{"known"}, C{"noreply"} or an action
        string.

        @raise ActionError: for anything else (C{"skip"} too: there is no
            next check once the deadline has passed).
        """
        if value == KNOWN:
            return cls(KNOWN)
        if value == SKIP:
            raise ActionError(f"{SKIP!r} is not an answer at the deadline")
        return cls.parse(value, restriction_classes)

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
    #: L{ENFORCE}, or L{SHADOW}: its verdict is logged and counted, never
    #: answered.
    mode: str = ENFORCE


class CheckUnavailable(Exception):
    """
    A check cannot reach or use its backend for a reason its message states
    in full (a refused login, a certificate that does not verify, nothing
    listening): logged in one line even the first time, since a traceback
    would only show the backend library's insides.
    """


class DeadlinePassed(TimeoutError):
    """
    A check had not answered when the request's deadline passed (with
    C{on_deadline = "known"}, handled by its C{on_error}).
    """
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
    @ivar shadows: C{(check name, verdict)} of the shadow checks run for
        this request, once it is decided: an action, C{"error"},
        C{"timeout"}, or C{"pending"} for one still running when the
        answer is sent (its verdict is logged when it comes).
    """

    action: Optional[Action]
    decided_by: str
    verdicts: list[tuple[str, str]] = field(default_factory=list)
    shadows: Optional[list[tuple[str, str]]] = None


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


#: A check of a parallel request not started yet: one that writes state,
#: waiting for every check before it to answer DUNNO.
_NOT_STARTED: Any = object()
#: A check of a parallel request still running.
_RUNNING: Any = object()


class _Race:
    """
    A request whose checks run at once (C{parallel}): each check's
    answer, kept until the answers before it in chain order are known.

    @ivar results: per check, L{_NOT_STARTED}, L{_RUNNING}, its L{Action}
        or a L{Failure}.
    @ivar pending: the Deferreds of the checks still running, by index.
    @ivar started: when each check was started (0 when no observer reads
        it).
    @ivar next: the first check in chain order whose answer is not used
        yet.
    @ivar passed: the last non-decisive answer before it.
    @ivar launching: whether checks are being started, so that answers now
        are only recorded.
    @ivar done: whether the request is decided.
    """

    __slots__ = (
        "request",
        "verdicts",
        "results",
        "pending",
        "started",
        "next",
        "passed",
        "launching",
        "done",
        "decision",
    )

    def __init__(self, request: PolicyRequest, verdicts: list[tuple[str, str]], size: int) -> None:
        self.request = request
        self.verdicts = verdicts
        self.results: list[Any] = [_NOT_STARTED] * size
        self.pending: dict[int, Deferred[Any]] = {}
        self.started = [0.0] * size
        self.next = 0
        self.passed = DUNNO
        self.launching = False
        self.done = False
        self.decision: Optional[Deferred[Decision]] = None


class _ShadowRun:
    """
    A shadow check still running after its request was answered.
    """

    __slots__ = ("entry", "request", "decision", "pending", "started", "verdict")

    def __init__(
        self,
        entry: ChainEntry,
        request: PolicyRequest,
        decision: Decision,
        pending: Deferred[Any],
        started: float,
    ) -> None:
        self.entry = entry
        self.request = request
        self.decision = decision
        self.pending: Optional[Deferred[Any]] = pending
        self.started = started
        self.verdict = "pending"


@implementer(IPolicyDecider)
class CheckChain:
    """
    Runs checks in order; the first decisive answer (anything but DUNNO)
    wins, and C{default_action} applies when every check passes. Without a
    default action, the last check's DUNNO is answered, text and all.

    Shadow entries (L{SHADOW}) are left out of that walk: once a request
    is decided, those it reached are started, their verdicts logged and
    counted (L{_run_shadows}). With C{parallel}, the checks of a request
    start at once (L{_race}), with the same answers.

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
        parallel: bool = False,
    ) -> None:
        """
        @param entries: every check, in chain order, shadow ones included.
        @param deadline_policy: what the deadline answers: L{KNOWN} (the
            checks that did not answer are treated by their own
            C{on_error}), C{noreply} or an action.
        @param parallel: start every check of a request that writes no
            state at once (see L{_race}).
        """
        for entry in entries:
            if not ICheck.providedBy(entry.check):
                raise TypeError(f"check {entry.name!r} does not provide ICheck")
            if entry.mode not in MODES:
                raise ValueError(f"check {entry.name!r}: mode {entry.mode!r} is not one of {MODES}")
        #: Every check, shadow ones included, in chain order.
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
        self.parallel = parallel
        self._clock = clock
        self._parsed: dict[str, Action] = {}
        self._plain_verbs: set[str] = set()
        # The kind of error each failing check last raised: during a backend
        # outage every request fails alike, and one traceback is enough.
        self._failing: dict[str, type] = {}
        # The checks that decide; the walk knows only them.
        self._steps = tuple(entry for entry in self.entries if entry.mode == ENFORCE)
        self._positions = {entry.name: index for index, entry in enumerate(self._steps)}
        # Each shadow check with the number of deciding checks before it: it
        # runs when the request was decided by a check at or after that
        # place (or by none), as it would have run if it decided.
        shadows: list[tuple[int, ChainEntry]] = []
        for entry in self.entries:
            if entry.mode == SHADOW:
                shadows.append((sum(1 for _ in self._steps_before(entry)), entry))
        self._shadows = tuple(shadows)
        self._shadow_runs: set[_ShadowRun] = set()
        self._listeners = tuple(
            entry.check for entry in self.entries if IDecisionListener.providedBy(entry.check)
        )
        self._error_action = (
            deadline_policy.action
            if deadline_policy.kind != KNOWN
            else Action.parse(ERROR_ACTION, restriction_classes)
        )
        # The check timeouts' queues first: a check timing out exactly at
        # the deadline is handled as its own timeout, so its on_error may
        # still answer.
        self._expiries = Expiries(clock)
        by_timeout: dict[float, int] = {}
        race_by_timeout: dict[float, int] = {}
        for entry in self._steps:
            if entry.timeout not in by_timeout:
                by_timeout[entry.timeout] = self._expiries.queue(entry.timeout, self._timed_out)
                if parallel:
                    race_by_timeout[entry.timeout] = self._expiries.queue(
                        entry.timeout, self._race_timed_out
                    )
        self._timeout_queues = tuple(by_timeout[entry.timeout] for entry in self._steps)
        self._race_timeout_queues = tuple(
            race_by_timeout.get(entry.timeout, -1) for entry in self._steps
        )
        self._deadline_queue = self._expiries.queue(deadline, self._give_up)
        self._race_deadline_queue = self._expiries.queue(deadline, self._race_give_up)
        shadow_queues: dict[float, int] = {}
        for _, entry in self._shadows:
            if entry.timeout not in shadow_queues:
                shadow_queues[entry.timeout] = self._expiries.queue(
                    entry.timeout, self._shadow_timed_out
                )
        self._shadow_queues = shadow_queues

    def _steps_before(self, shadow: ChainEntry) -> Iterator[ChainEntry]:
        for entry in self.entries:
            if entry is shadow:
                return
            if entry.mode == ENFORCE:
                yield entry

    def rebuilt(
        self, entries: list[ChainEntry], clock: IReactorTime, record_verdicts: Optional[bool] = None
    ) -> CheckChain:
        """
        A chain with this one's settings (default action, deadline and its
        policy, restriction classes, Postfix version, C{parallel}) over
        other entries and another clock: how C{pfxpold-explain} and
        C{pfxpold-replay} run a configuration's checks wrapped in their
        own, without copying the settings one by one.

        @param record_verdicts: L{None} to keep this chain's.
        """
        return CheckChain(
            entries,
            default_action=self.default_action,
            deadline=self.deadline,
            deadline_policy=self.deadline_policy,
            clock=clock,
            restriction_classes=self.restriction_classes,
            record_verdicts=self.record_verdicts if record_verdicts is None else record_verdicts,
            postfix_version=self.postfix_version,
            parallel=self.parallel,
        )

    def decide(self, request: PolicyRequest) -> Union[Decision, Deferred[Decision]]:
        """
        Decide on C{request}, start the shadow checks it reached, and tell
        the L{IDecisionListener} checks.

        @return: a L{Decision}, at once when every check answered at once
            (with a value, or a Deferred or coroutine that had already
            finished), else a Deferred that fires with one within the
            deadline and never fails. Shadow checks never delay it.
        """
        verdicts: list[tuple[str, str]] = []
        if self.parallel:
            outcome: Union[Decision, _Walk, _Race] = self._race(request, verdicts)
        else:
            outcome = self._run(request, verdicts, 0, DUNNO, None)
        if type(outcome) is not Decision:
            if type(outcome) is _Walk:
                decision = self._wait(outcome)
            else:
                assert type(outcome) is _Race
                decision = self._race_wait(outcome)
            decision.addCallback(self._honoured, request)
            if self._shadows:
                decision.addCallback(self._run_shadows, request)
            if self._listeners:
                decision.addCallback(self._tell_listeners, request)
            return decision
        assert type(outcome) is Decision
        outcome = self._honoured(outcome, request)
        if self._shadows:
            self._run_shadows(outcome, request)
        if self._listeners:
            self._tell_listeners(outcome, request)
        return outcome

    def _honoured(self, decision: Decision, request: PolicyRequest) -> Decision:
        """
        The decision, unless its action is one Postfix would not honour at
        the request's stage: a checks' own answers are held to that in
        L{_to_action}, but an C{on_error}, C{default_action} or deadline
        action is the configuration's, and is only warned about by
        C{--check-config}. Such an answer is never sent: the request gets
        no reply, so that Postfix applies its
        C{smtpd_policy_service_default_action}, and the log says why.
        """
        action = decision.action
        if action is None:
            return decision
        reasons = self._stage_problems.get(action.verb)
        if reasons is None:
            return decision
        reason = reasons.get(request.protocol_state)
        if reason is None:
            return decision
        self._log.error(
            "the configured answer {action} (by {by}) is one Postfix does not honour here"
            " ({reason}); no reply is sent, so Postfix applies its"
            " smtpd_policy_service_default_action",
            action=escape(str(action)),
            by=decision.decided_by,
            reason=escape(str(reason)),
        )
        return replace(decision, action=None)

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
        entries = self._steps
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
        entry = self._steps[walk.index]
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
        decision = self._failed(self._steps[walk.index], failure, walk.verdicts, walk.started)
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
        timeout = self._steps[walk.index].timeout
        self._go_on_after_failure(walk, Failure(TimeoutError(f"not done within {timeout}s")))

    def _give_up(self, walk: _Walk) -> None:
        """
        The request C{walk} missed its deadline: stop waiting, and answer
        C{deadline_policy}: with L{KNOWN}, the check waited for and those
        not run yet are treated by their own C{on_error}.
        """
        pending, walk.pending = walk.pending, None
        self._expiries.discard(self._timeout_queues[walk.index], walk)
        if pending is not None:
            self._abandon(pending)
        policy = self.deadline_policy
        if policy.kind == KNOWN:
            decision = self._failed(
                self._steps[walk.index],
                Failure(DeadlinePassed(f"still running at the {self.deadline}s deadline")),
                walk.verdicts,
                walk.started,
            )
            if decision is None:
                decision = self._not_run(walk.index + 1, walk.passed, walk.verdicts)
            decision.decided_by = "deadline"
        else:
            if self.observer is not None:
                self.observer.check_abandoned(self._steps[walk.index].name, walk.started)
            decision = Decision(policy.action, "deadline", walk.verdicts)
        self._missed(walk.request, decision)
        self._finish(walk, decision)

    def _missed(self, request: PolicyRequest, decision: Decision) -> None:
        self._log.warn(
            "request from {client} missed the {deadline}s deadline; answering {outcome}",
            client=escape(request.client_address),
            deadline=self.deadline,
            outcome=NOREPLY if decision.action is None else escape(str(decision.action)),
        )

    def _not_run(self, index: int, passed: Action, verdicts: list[tuple[str, str]]) -> Decision:
        """
        The deadline passed before the checks from C{index} on were run:
        each is treated by its C{on_error} (a check that could not answer),
        in chain order, and without a decisive one the chain answers what
        it knows.
        """
        for entry in self._steps[index:]:
            if self.record_verdicts:
                verdicts.append((entry.name, "not run"))
            if entry.on_error.kind != SKIP:
                return Decision(entry.on_error.action, entry.name, verdicts)
        return Decision(self.default_action or passed, "default", verdicts)

    def _cancelled(self, walk: _Walk) -> None:
        """
        The caller gave up on the decision: stop waiting, and answer as a
        chain error rather than fail (a decider never fails).
        """
        pending, walk.pending = walk.pending, None
        if pending is not None:
            self._expiries.discard(self._timeout_queues[walk.index], walk)
            self._abandon(pending)
        self._finish(walk, Decision(self._error_action, "error", walk.verdicts))

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
        return Decision(self._error_action, "error", verdicts)

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
        if failure.check(DeadlinePassed):
            self._log.warn(
                "check {check} {reason}; on_error={outcome}",
                check=entry.name,
                reason=failure.getErrorMessage(),
                outcome=str(policy),
            )
            verdict = "deadline"
        elif failure.check(TimeoutError):
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
        elif failure.check(CheckUnavailable) or not is_clean(failure.getErrorMessage()):
            # A backend's refusal says all in its message; a message quoting
            # a backend's or a client's text with control characters in it
            # is escaped, in one line, since a traceback would carry it raw.
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

    # Parallel checks

    def _race(self, request: PolicyRequest, verdicts: list[tuple[str, str]]) -> Any:
        """
        Start every check of C{request} that writes no state, in chain
        order, and use their answers in chain order: the first decisive
        one decides, as in the walk. A check that writes state (quota,
        greylist, rules that mark: its C{writes_state} is true) is started
        only once every check before it answered DUNNO, so nothing is
        counted for mail another check refused.

        @return: the L{Decision}, or the L{_Race} waiting for answers.
        """
        steps = self._steps
        race = _Race(request, verdicts, len(steps))
        race.launching = True
        try:
            for index, entry in enumerate(steps):
                if race.results[index] is not _NOT_STARTED or getattr(
                    entry.check, "writes_state", False
                ):
                    # Started already (its turn came), or to start when
                    # every check before it answered DUNNO.
                    continue
                self._launch(race, index)
                if race.next == index and race.results[index] is not _RUNNING:
                    # Answered at once and every answer before it is used:
                    # a decisive one now spares starting the others.
                    decision = self._resolve(race)
                    if decision is not None:
                        race.launching = False
                        return self._race_decided(race, decision)
            decision = self._resolve(race)
        except Exception:
            decision = self._chain_error(Failure(), verdicts)
        race.launching = False
        if decision is not None:
            return self._race_decided(race, decision)
        return race

    def _launch(self, race: _Race, index: int) -> None:
        """
        Start check C{index}; its answer, if it has one now, is in
        C{race.results}.
        """
        entry = self._steps[index]
        if self.observer is not None:
            race.started[index] = self._clock.seconds()
        race.results[index] = _RUNNING
        try:
            result = entry.check.check(race.request)
            if type(result) not in _PLAIN and isinstance(result, (Deferred, CoroutineType)):
                if type(result) is CoroutineType:
                    result = Deferred.fromCoroutine(result)
                race.pending[index] = result
                result.addBoth(self._race_answered, race, index, result)
                if index in race.pending:
                    self._expiries.add(self._race_timeout_queues[index], (race, index))
                return
            self._race_result(race, index, result)
        except Exception:
            race.results[index] = Failure()

    def _race_result(self, race: _Race, index: int, outcome: object) -> None:
        """
        Record check C{index}'s answer or failure.
        """
        entry = self._steps[index]
        if isinstance(outcome, Failure):
            race.results[index] = outcome
            return
        try:
            action = self._to_action(outcome, race.request)
        except Exception:
            race.results[index] = Failure()
            return
        if self._failing and entry.name in self._failing:
            self._recovered(entry)
        if self.observer is not None:
            self.observer.check_answered(entry.name, action.verb, race.started[index])
        race.results[index] = action

    def _race_answered(
        self, outcome: object, race: _Race, index: int, pending: Deferred[Any]
    ) -> None:
        """
        Check C{index}'s Deferred fired: record its answer and, unless
        checks are being started, use what can be used.

        @return: L{None}: the result of a check given up on is swallowed.
        """
        if race.pending.get(index) is not pending:
            return None
        del race.pending[index]
        self._expiries.discard(self._race_timeout_queues[index], (race, index))
        self._race_result(race, index, outcome)
        if not race.launching:
            self._race_advance(race)
        return None

    def _race_timed_out(self, key: tuple[_Race, int]) -> None:
        race, index = key
        pending = race.pending.pop(index, None)
        if pending is None:
            return
        self._abandon(pending)
        timeout = self._steps[index].timeout
        race.results[index] = Failure(TimeoutError(f"not done within {timeout}s"))
        self._race_advance(race)

    def _race_advance(self, race: _Race) -> None:
        if race.done:
            return
        race.launching = True
        try:
            decision = self._resolve(race)
        except Exception:
            decision = self._chain_error(Failure(), race.verdicts)
        race.launching = False
        if decision is not None:
            self._race_decided(race, decision)

    def _resolve(self, race: _Race) -> Optional[Decision]:
        """
        Use the answers known, in chain order, from C{race.next} on,
        starting a check that writes state when its turn comes.

        @return: the decision, or L{None} while an answer is awaited.
        """
        steps = self._steps
        results = race.results
        while race.next < len(steps):
            index = race.next
            result = results[index]
            if result is _NOT_STARTED:
                self._launch(race, index)
                result = results[index]
            if result is _RUNNING:
                return None
            entry = steps[index]
            if type(result) is Failure:
                if result.check(_NotRun):
                    if self.record_verdicts:
                        race.verdicts.append((entry.name, "not run"))
                    if entry.on_error.kind != SKIP:
                        return Decision(entry.on_error.action, entry.name, race.verdicts)
                    race.next += 1
                    continue
                decision = self._failed(entry, result, race.verdicts, race.started[index])
                if decision is not None:
                    return decision
                race.next += 1
                continue
            if self.record_verdicts:
                race.verdicts.append((entry.name, str(result)))
            if result.decisive:
                return Decision(result, entry.name, race.verdicts)
            race.passed = result
            race.next += 1
        return Decision(self.default_action or race.passed, "default", race.verdicts)

    def _race_decided(self, race: _Race, decision: Decision) -> Decision:
        """
        The request is decided: cancel the checks still running (their
        answers can no longer matter), and answer.
        """
        race.done = True
        for index, pending in list(race.pending.items()):
            del race.pending[index]
            self._expiries.discard(self._race_timeout_queues[index], (race, index))
            self._abandon(pending)
        if race.decision is not None:
            self._expiries.discard(self._race_deadline_queue, race)
            if not race.decision.called:
                race.decision.callback(decision)
        return decision

    def _race_wait(self, race: _Race) -> Deferred[Decision]:
        race.decision = Deferred(lambda decision: self._race_cancelled(race))
        self._expiries.add(self._race_deadline_queue, race)
        return race.decision

    def _race_cancelled(self, race: _Race) -> None:
        self._race_decided(race, Decision(self._error_action, "error", race.verdicts))

    def _race_give_up(self, race: _Race) -> None:
        """
        The request C{race} missed its deadline. With L{KNOWN}, the checks
        still running and those not started are treated by their own
        C{on_error}, and the chain answers from the answers it has, in
        chain order; otherwise it answers C{deadline_policy}.
        """
        if race.done:
            return
        policy = self.deadline_policy
        running = list(race.pending.items())
        for index, pending in running:
            del race.pending[index]
            self._expiries.discard(self._race_timeout_queues[index], (race, index))
            self._abandon(pending)
        if policy.kind == KNOWN:
            message = f"still running at the {self.deadline}s deadline"
            for index, _ in running:
                race.results[index] = Failure(DeadlinePassed(message))
            for index, result in enumerate(race.results):
                if result is _NOT_STARTED:
                    race.results[index] = Failure(_NotRun())
            try:
                decision = self._resolve(race) or self._chain_error(
                    Failure(RuntimeError("no decision")), race.verdicts
                )
            except Exception:
                decision = self._chain_error(Failure(), race.verdicts)
            decision.decided_by = "deadline"
        else:
            if self.observer is not None:
                for index, _ in running:
                    self.observer.check_abandoned(self._steps[index].name, race.started[index])
            decision = Decision(policy.action, "deadline", race.verdicts)
        self._missed(race.request, decision)
        self._race_decided(race, decision)

    # Shadow checks

    def _run_shadows(self, decision: Decision, request: PolicyRequest) -> Decision:
        """
        Run the shadow checks the request reached: those placed before the
        deciding check (all of them when no check decided). Each is only
        started here; one that answers later is logged when it does.
        """
        position = self._positions.get(decision.decided_by, len(self._steps))
        shadows: list[tuple[str, str]] = []
        decision.shadows = shadows
        for before, entry in self._shadows:
            if before <= position:
                try:
                    verdict = self._shadow(entry, request, decision)
                except Exception:
                    self._log.failure("shadow check {check} broke the chain", check=entry.name)
                    verdict = "error"
                shadows.append((entry.name, verdict))
        return decision

    def _shadow(self, entry: ChainEntry, request: PolicyRequest, decision: Decision) -> str:
        """
        Start shadow check C{entry}.

        @return: its verdict, or C{"pending"} while it runs.
        """
        started = self._clock.seconds()
        try:
            result = entry.check.check(request)
            if type(result) not in _PLAIN and isinstance(result, (Deferred, CoroutineType)):
                if type(result) is CoroutineType:
                    result = Deferred.fromCoroutine(result)
                run = _ShadowRun(entry, request, decision, result, started)
                self._shadow_runs.add(run)
                result.addBoth(self._shadow_answered, run)
                if run.pending is None:
                    # It had answered already.
                    return run.verdict
                self._expiries.add(self._shadow_queues[entry.timeout], run)
                return "pending"
            action = self._to_action(result, request)
        except Exception:
            return self._shadow_failed(entry, request, decision, Failure())
        return self._shadow_verdict(entry, request, decision, action)

    def _shadow_answered(self, outcome: object, run: _ShadowRun) -> None:
        pending, run.pending = run.pending, None
        if pending is None:
            return None
        self._shadow_runs.discard(run)
        self._expiries.discard(self._shadow_queues[run.entry.timeout], run)
        if isinstance(outcome, Failure):
            run.verdict = self._shadow_failed(run.entry, run.request, run.decision, outcome)
            return None
        try:
            action = self._to_action(outcome, run.request)
        except Exception:
            run.verdict = self._shadow_failed(run.entry, run.request, run.decision, Failure())
            return None
        run.verdict = self._shadow_verdict(run.entry, run.request, run.decision, action)
        return None

    def _shadow_timed_out(self, run: _ShadowRun) -> None:
        pending, run.pending = run.pending, None
        if pending is None:
            return
        self._shadow_runs.discard(run)
        self._abandon(pending)
        self._shadow_failed(
            run.entry,
            run.request,
            run.decision,
            Failure(TimeoutError(f"not done within {run.entry.timeout}s")),
        )

    def cancel_shadows(self) -> int:
        """
        Cancel the shadow checks still running (when the daemon stops:
        their verdicts can change no answer, and waiting for them would
        only lengthen the stop).

        @return: how many were cancelled.
        """
        runs = list(self._shadow_runs)
        self._shadow_runs.clear()
        for run in runs:
            pending, run.pending = run.pending, None
            self._expiries.discard(self._shadow_queues[run.entry.timeout], run)
            if pending is not None:
                self._abandon(pending)
        return len(runs)

    @property
    def shadows_running(self) -> int:
        """
        How many shadow checks are still running.
        """
        return len(self._shadow_runs)

    def _shadow_verdict(
        self, entry: ChainEntry, request: PolicyRequest, decision: Decision, action: Action
    ) -> str:
        """
        Log and count a shadow check's verdict beside the real answer.
        "would have answered" is logged only when, deciding, the check
        would have changed the answer.
        """
        verdict = str(action)
        answered = NOREPLY if decision.action is None else str(decision.action)
        differs = action.decisive and verdict != answered
        fields = dict(
            check=entry.name,
            verdict=escape(verdict),
            answered=escape(answered),
            client=escape(request.client_address),
            sender=escape(request.sender),
            recipient=escape(request.recipient),
            state=escape(request.protocol_state),
            shadow=entry.name,
            differs=differs,
        )
        if differs:
            self._log.info(
                "shadow check {check} would have answered {verdict}, answered {answered}"
                " (client {client}, from <{sender}> to <{recipient}> at {state})",
                **fields,
            )
        else:
            self._log.info(
                "shadow check {check} answered {verdict}, no change to {answered}"
                " (client {client}, from <{sender}> to <{recipient}> at {state})",
                **fields,
            )
        if self.observer is not None:
            shadow_answered = getattr(self.observer, "shadow_answered", None)
            if shadow_answered is not None:
                shadow_answered(entry.name, action.verb, differs)
        return verdict

    def _shadow_failed(
        self, entry: ChainEntry, request: PolicyRequest, decision: Decision, failure: Failure
    ) -> str:
        """
        Log and count a shadow check's failure: it never changes the answer.
        """
        verdict = "timeout" if failure.check(TimeoutError) else "error"
        if failure.check(CancelledError) and verdict == "error":
            verdict = "cancelled"
        self._log.warn(
            "shadow check {check} failed ({error}); the answer {answered} is unaffected"
            " (client {client})",
            check=entry.name,
            error=escape(f"{failure.type.__name__}: {failure.getErrorMessage()}"),
            answered=escape(NOREPLY if decision.action is None else str(decision.action)),
            client=escape(request.client_address),
            shadow=entry.name,
        )
        if self.observer is not None:
            shadow_answered = getattr(self.observer, "shadow_answered", None)
            if shadow_answered is not None:
                shadow_answered(entry.name, verdict, False)
        return verdict


class _NotRun(Exception):
    """
    A check of a parallel request was not started before the deadline.
    """
