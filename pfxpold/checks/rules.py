"""
The C{rules} check: policies written as an ordered list of rules, in the
configuration file and in files it includes, without Python.

The first rule that matches answers; no match answers DUNNO, so the check
chains like any other. The rule language is L{pfxpold.rules.program} and
L{pfxpold.rules.conditions}; this module loads the rules (and reads them
again when an included file or a list file changes), runs them, keeps the
per-message marks in a state store, and hands mail to C{quota} checks.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, FirstError, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.action import DUNNO, Action, ActionError
from pfxpold.checks.file import file_loader
from pfxpold.config import CheckOptions
from pfxpold.escape import escape
from pfxpold.interfaces import (
    ICheck,
    IConfigWarnings,
    IExplainable,
    IPossibleActions,
    IUsesChecks,
)
from pfxpold.request import PolicyRequest
from pfxpold.rules.conditions import Condition, Equals, Facts, Not, RuleError
from pfxpold.rules.program import MAIN, Program, ProgramBuilder, Rule, RuleSet
from pfxpold.stages import STATES, Possible, possible
from pfxpold.state import store_for

DEFAULT_RELOAD_INTERVAL = 5.0
DEFAULT_MARK_LIFETIME = 3600.0


def _signature(path: str) -> Optional[tuple[int, int, int, int]]:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def mark_key(instance: str) -> str:
    """The store key of a message's marks."""
    return f"mark:{instance}"


class _Run:
    """
    Where the rules of one request have got to: the rule sets entered
    (each with the candidates still to try), the marks this request set,
    and the mark writes under way.
    """

    __slots__ = ("program", "facts", "stack", "writes", "added")

    def __init__(self, program: Program, facts: Facts) -> None:
        self.program = program
        self.facts = facts
        self.stack: list[list[Any]] = [[program.main, 0]]
        self.writes: list[Deferred[Any]] = []
        self.added: set[str] = set()


@implementer(ICheck, IExplainable, IConfigWarnings, IUsesChecks, IPossibleActions)
class RulesCheck(MultiService):
    """
    Runs an ordered list of rules (see L{pfxpold.rules.program}).

    Settings: C{rule} (the rules: C{[[check.rule]]} tables), C{ruleset}
    (named rule sets for C{jump}: C{[[check.ruleset.NAME]]}), C{include}
    (TOML files of C{[[rule]]} and C{[[ruleset.NAME]]} tables, after the
    check's own rules), C{reload_interval} (seconds between looks at the
    included and list files, default 5; 0: never), C{store} (where marks
    are kept; used only when a rule marks), C{mark_lifetime} (seconds a
    mark is kept, default 3600).
    """

    _log = Logger()

    def __init__(
        self,
        options: CheckOptions,
        run: Optional[Callable[..., Deferred[Any]]] = None,
    ) -> None:
        """
        Compile the rules, so that C{--check-config} reports every error
        in them.

        @param run: how to call the loader when a file changed; by default
            in the reactor's thread pool when it has one, else at once.
        """
        super().__init__()
        self.check_name = options.name
        self.reactor = options.reactor
        # A shadow rules check keeps its marks apart from the enforcing
        # ones: what it marks must not change what they decide.
        self.mark_prefix = "shadow:" if options.mode == "shadow" else ""
        self._writes_for: Any = None
        self._writes = False
        self._options = options
        self._restriction_classes = options.restriction_classes
        self._base_directory = options.base_directory
        self._rules_table = options.raw("rule", None)
        self._sets_table = options.raw("ruleset", None)
        self.includes = [
            os.path.join(options.base_directory, os.path.expanduser(path))
            for path in options.strings("include", [])
        ]
        if self._rules_table is None and self._sets_table is None and not self.includes:
            raise options.error("rule", "no rules: add [[check.rule]] tables or 'include' files")
        self.mark_lifetime = options.number("mark_lifetime", DEFAULT_MARK_LIFETIME, positive=True)
        interval = options.number("reload_interval", DEFAULT_RELOAD_INTERVAL)
        if interval < 0:
            raise options.error("reload_interval", "must be 0 (never) or more seconds")
        if run is None:
            run = file_loader(options.reactor)
        self._run_loader = run
        self._signatures: dict[str, Optional[tuple[int, int, int, int]]] = {}
        self.store: Any = None
        self._checks: Optional[Mapping[str, Any]] = None
        self._starting = True
        try:
            self.program = self._load()
        except _LoadError as e:
            raise options.error(e.key, e.reason) from None
        if self.program.needs_marks or "store" in options:
            self.store = store_for(options)
        self._starting = False
        self._loading = False
        self._last_error: Optional[str] = None
        if interval > 0:
            timer = TimerService(interval, self.reload)
            timer.clock = options.reactor
            timer.setServiceParent(self)

    # Loading

    def _load(self) -> Program:
        """
        Read the included files and compile every rule.

        @raise _LoadError: naming the key (C{rule} or C{include}) and the
            file, rule and reason.
        """
        builder = ProgramBuilder(self._base_directory, self._restriction_classes)
        signatures: dict[str, Optional[tuple[int, int, int, int]]] = {}
        try:
            builder.add("", self._rules_table, self._sets_table, self._base_directory)
        except RuleError as e:
            raise _LoadError("rule" if self._rules_table is not None else "ruleset", str(e)) from None
        for path in self.includes:
            signatures[path] = _signature(path)
            try:
                with open(path, "rb") as f:
                    document = tomllib.load(f)
            except OSError as e:
                raise _LoadError("include", f"cannot read {path}: {e.strerror}") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise _LoadError("include", f"{path}: not valid TOML: {e}") from None
            unknown = sorted(set(document) - {"rule", "ruleset"})
            if unknown:
                raise _LoadError(
                    "include", f"{path}: {unknown[0]!r} is not [[rule]] nor [[ruleset.NAME]]"
                )
            try:
                builder.add(
                    path, document.get("rule"), document.get("ruleset"), os.path.dirname(path)
                )
            except RuleError as e:
                raise _LoadError("include", str(e)) from None
        try:
            program = builder.build(self.includes)
        except RuleError as e:
            raise _LoadError("include" if self.includes else "rule", str(e)) from None
        for path in program.files:
            if path not in signatures:
                signatures[path] = _signature(path)
        if program.needs_marks and self.store is None and not self._starting:
            raise _LoadError(
                "store", "rules that mark were added while running: restart pfxpold to use them"
            )
        if self._checks is not None:
            try:
                self._find_quotas(program, self._checks)
            except RuleError as e:
                raise _LoadError("include", str(e)) from None
        self._signatures = signatures
        return program

    @property
    def uses(self) -> frozenset[str]:
        """The quota checks the rules name."""
        return frozenset(self.program.quotas)

    def link(self, checks: Mapping[str, Any]) -> None:
        """
        Find the C{quota} checks the rules name.

        @raise pfxpold.config.ConfigError: when one is missing, is not a
            quota check, or counts all mail by itself.
        """
        try:
            self._find_quotas(self.program, checks)
        except RuleError as e:
            raise self._options.error("rule", str(e)) from None
        self._checks = checks

    @staticmethod
    def _find_quotas(program: Program, checks: Mapping[str, Any]) -> None:
        for rule in program.rules():
            if rule.quota is None:
                continue
            quota = checks.get(rule.quota)
            where = f"{rule.where}: " if rule.where else ""
            if quota is None or not callable(getattr(quota, "apply", None)):
                raise RuleError(f"{where}rule {rule.name!r}: 'quota': no quota check {rule.quota!r}")
            if not getattr(quota, "rules_only", False):
                raise RuleError(
                    f"{where}rule {rule.name!r}: 'quota': check {rule.quota!r} counts all mail"
                    " by itself; set rules_only = true in it"
                )

    def reload(self) -> Optional[Deferred[None]]:
        """
        Compile the rules again if an included file or a list file changed
        since they were read. Never fails: errors are logged and the rules
        in force stay.

        @return: a Deferred that fires when a reload is done, or L{None}
            when there was nothing to do.
        """
        if self._loading:
            return None
        if all(_signature(path) == seen for path, seen in self._signatures.items()):
            return None
        # Remember what was seen before reading: a file that changes while
        # being read is read again at the next look, and a broken file is
        # not logged at every look.
        self._signatures = {path: _signature(path) for path in self._signatures}
        self._loading = True
        loading = self._run_loader(self._load)
        loading.addCallbacks(self._install, self._failed)
        loading.addBoth(self._done)
        return loading

    def _install(self, program: Program) -> None:
        self.program = program
        self._last_error = None
        self._log.info(
            "check {check}: loaded {count} rules",
            check=self.check_name,
            count=sum(len(rule_set.rules) for rule_set in program.sets.values()),
        )

    def _failed(self, failure: Failure) -> None:
        if failure.check(_LoadError):
            reason = str(failure.value.reason)
            if reason != self._last_error:
                self._last_error = reason
                self._log.error(
                    "check {check}: {reason}; keeping the rules in force",
                    check=self.check_name,
                    reason=escape(reason),
                )
        else:
            self._log.failure(
                "check {check}: reading the rules failed; keeping the rules in force",
                failure,
                check=self.check_name,
            )

    def _done(self, result: object) -> None:
        self._loading = False

    # Deciding

    def check(self, request: PolicyRequest) -> Any:
        """
        The action of the first rule that matches, or DUNNO.
        """
        program = self.program
        main = program.main
        # RuleSet.candidates_of, inlined: finding the candidates is most of
        # the check's cost, and a call is a good part of that.
        mask = main.always
        attributes = request.attributes
        try:
            for key, remembered in main.keys:
                mask |= remembered[key(attributes)]
        except KeyError:
            mask = main.candidates_without(attributes)
        if not mask:
            return DUNNO
        # The common case first: the first candidate only answers, always
        # the same, and the index alone decides it.
        answer = main.answers[(mask & -mask).bit_length() - 1]
        if answer is not None:
            return answer
        return self._first(program, request, mask)

    def _first(self, program: Program, request: PolicyRequest, mask: int) -> Any:
        """
        The rules of the main list that only answer, in order, until one
        answers; the first other rule hands over to the general loop.
        """
        rules = program.main.rules
        facts: Optional[Facts] = None
        while mask:
            low = mask & -mask
            rule = rules[low.bit_length() - 1]
            if not rule.simple:
                run = _Run(program, facts or Facts(request))
                run.stack[0][1] = mask
                return self._go(run)
            mask ^= low
            condition = rule.condition
            if condition is not None and not rule.filed_alone:
                # The facts are built only for a condition the index does
                # not decide.
                if facts is None:
                    facts = Facts(request)
                if not condition.test(facts):
                    continue
            return rule.action.fill(request)  # type: ignore[union-attr]
        return DUNNO

    def _go(self, run: _Run) -> Any:
        facts = run.facts
        stack = run.stack
        while stack:
            frame = stack[-1]
            mask = frame[1]
            if not mask:
                stack.pop()
                continue
            low = mask & -mask
            rule: Rule = frame[0].rules[low.bit_length() - 1]
            if facts.marks is None and rule.needs_marks:
                # The marks are read when a rule first needs them, so
                # requests no such rule can match never wait for the store.
                return self._read_marks(run).addCallback(lambda _: self._go(run))
            frame[1] = mask ^ low
            condition = rule.condition
            if condition is not None and not condition.test(facts):
                continue
            if rule.marks:
                self._mark(run, rule)
            if rule.quota is not None:
                answer = self._apply_quota(rule, facts.request)
                if isinstance(answer, Deferred):
                    return answer.addCallback(self._after_quota, run)
                if answer.decisive:
                    return self._answer(run, answer)
                continue
            if rule.action is not None:
                return self._answer(run, rule.action.fill(facts.request))
            if rule.jump is not None:
                target: RuleSet = run.program.sets[rule.jump]
                stack.append([target, target.candidates(facts)])
                continue
            if rule.returns:
                stack.pop()
        return self._answer(run, DUNNO)

    def _after_quota(self, answer: Any, run: _Run) -> Any:
        if isinstance(answer, str):
            answer = Action.parse(answer, self._restriction_classes)
        if answer.decisive:
            return self._answer(run, answer)
        return self._go(run)

    def _apply_quota(self, rule: Rule, request: PolicyRequest) -> Any:
        if self._checks is None or rule.quota is None or rule.quota not in self._checks:
            raise LookupError(f"quota check {rule.quota!r} not linked")
        answer = self._checks[rule.quota].apply(request)
        if isinstance(answer, str):
            answer = Action.parse(answer, self._restriction_classes)
        return answer

    def _answer(self, run: _Run, action: Action) -> Any:
        if not run.writes:
            return action

        def unwrapped(failure: Failure) -> Failure:
            if failure.check(FirstError):
                return failure.value.subFailure  # type: ignore[no-any-return]
            return failure

        # The marks are stored before the answer goes out: the next request
        # of the message (which Postfix sends only after this answer) sees
        # them, whichever pfxpold it reaches.
        waiting = gatherResults(run.writes, consumeErrors=True)
        return waiting.addCallbacks(lambda _: action, unwrapped)

    def _mark(self, run: _Run, rule: Rule) -> None:
        run.added.update(rule.marks)
        if run.facts.marks is not None:
            run.facts.marks.update(rule.marks)
        instance = run.facts.request.instance
        if not instance or self.store is None:
            return
        expires = self.reactor.seconds() + self.mark_lifetime
        for mark in rule.marks:
            run.writes.append(self.store.set_mark(mark_key(self.mark_prefix + instance), mark, expires))

    def _read_marks(self, run: _Run) -> Deferred[None]:
        instance = run.facts.request.instance
        if not instance or self.store is None:
            run.facts.marks = set(run.added)
            return succeed(None)

        def read(marks: frozenset[str]) -> None:
            run.facts.marks = set(marks) | run.added

        reading: Deferred[frozenset[str]] = self.store.marks(
            mark_key(self.mark_prefix + instance), self.reactor.seconds()
        )
        return reading.addCallback(read)

    @property
    def writes_state(self) -> bool:
        """
        Whether its rules mark messages or count them in quotas: with
        C{[server] parallel}, it is then started only once every check
        before it answered DUNNO.
        """
        program = self.program
        if self._writes_for is not program:
            self._writes = bool(program.quotas) or any(rule.marks for rule in program.rules())
            self._writes_for = program
        return self._writes

    # Explaining

    def config_warnings(self) -> list[str]:
        warnings = self.program.warnings()
        if self._checks is None and self.program.quotas:
            warnings.append("quota rules are not linked to their quota checks")
        return warnings

    def possible_actions(self) -> list[Possible]:
        """
        Each rule's action (and a quota rule's quota action), at the
        stages its conditions, and those of the rules that jump to its
        rule set, allow.
        """
        found: list[Possible] = []
        checks = self._checks or {}

        def visit(set_name: str, states: Optional[frozenset[str]], path: tuple[str, ...]) -> None:
            for rule in self.program.sets[set_name].rules:
                mine = _narrowed(states, _stages_of(rule.condition))
                if mine is not None and not mine:
                    continue  # never holds
                where = f"rule {rule.name!r}" if set_name == MAIN else (
                    f"rule set {set_name!r}: rule {rule.name!r}"
                )
                if rule.action is not None:
                    found.append(possible(rule.action.verb, mine, where))
                quota = checks.get(rule.quota) if rule.quota is not None else None
                if quota is not None and callable(getattr(quota, "answers", None)):
                    for answer in quota.answers():
                        both = _narrowed(mine, answer.states)
                        if both is None or both:
                            found.append(
                                Possible(answer.verb, both, f"{where}, quota {rule.quota!r}")
                            )
                if rule.jump is not None and rule.jump not in path:
                    visit(rule.jump, mine, path + (rule.jump,))

        visit(MAIN, None, (MAIN,))
        return found

    def explain(self, request: PolicyRequest) -> Any:
        """
        Go through the rules as L{check} does, rule by rule (the index
        aside), without marking, counting or waiting for a quota: a quota
        rule is shown as matched and the rules go on as within the limit.
        The message's marks are read from the store when a rule tests them
        and the store can be reached.

        @return: C{(rule, matched, detail)} tuples, or a Deferred that
            fires with them; the last says what was answered.
        """
        program = self.program
        instance = request.instance
        if not any(rule.needs_marks for rule in program.rules()) or not instance:
            return self._trace(program, Facts(request, set()), "")
        if self.store is None:
            return self._trace(program, Facts(request, set()), "")

        def traced(marks: Any) -> list[tuple[str, bool, str]]:
            if isinstance(marks, Failure):
                return self._trace(
                    program,
                    Facts(request, set()),
                    f"(marks unread: {marks.getErrorMessage()})",
                )
            return self._trace(program, Facts(request, set(marks)), "")

        reading = maybeDeferred(
            self.store.marks, mark_key(self.mark_prefix + instance), self.reactor.seconds()
        )
        return reading.addBoth(traced)

    def _trace(self, program: Program, facts: Facts, note: str) -> list[tuple[str, bool, str]]:
        steps: list[tuple[str, bool, str]] = []
        stack: list[list[Any]] = [[program.main, 0]]
        while stack:
            frame = stack[-1]
            rule_set, index = frame
            if index >= len(rule_set.rules):
                stack.pop()
                continue
            frame[1] = index + 1
            rule: Rule = rule_set.rules[index]
            label = rule.name if rule_set.name == MAIN else f"{rule_set.name}: {rule.name}"
            reason = rule.condition.why_not(facts) if rule.condition is not None else None
            if reason is not None:
                if note and rule.needs_marks:
                    reason = f"{reason} {note}"
                steps.append((label, False, reason))
                continue
            if rule.marks:
                assert facts.marks is not None
                facts.marks.update(rule.marks)
            if rule.action is not None:
                try:
                    action = str(rule.action.fill(facts.request))
                except ActionError as e:
                    action = f"an invalid action ({e}): the check's on_error applies"
                steps.append((label, True, _joined(rule, f"answers {action}")))
                return steps
            if rule.quota is not None:
                steps.append(
                    (label, True, _joined(rule, f"applies quota {rule.quota!r} (not counted here)"))
                )
                continue
            if rule.jump is not None:
                steps.append((label, True, _joined(rule, f"jumps to {rule.jump!r}")))
                stack.append([program.sets[rule.jump], 0])
                continue
            if rule.returns:
                steps.append((label, True, _joined(rule, "returns")))
                stack.pop()
                continue
            steps.append((label, True, _joined(rule, "")))
        steps.append(("(end of rules)", False, "no rule answered: DUNNO"))
        return steps


def _stages_of(condition: Optional[Condition]) -> Optional[frozenset[str]]:
    """
    The C{protocol_state} values a condition can hold at, from its
    C{protocol_state} tests (C{protocol_state = "RCPT"}, or under C{not});
    L{None} when it does not test it.
    """
    if condition is None:
        return None
    states: Optional[frozenset[str]] = None
    for part in condition.conjuncts():
        negated = isinstance(part, Not)
        test = part.part if isinstance(part, Not) else part
        if not isinstance(test, Equals) or test.attribute.name != "protocol_state":
            continue
        named = frozenset(value.upper() for value in test.values)
        these = frozenset(STATES) - named if negated else named
        states = these if states is None else states & these
    return states


def _narrowed(
    outer: Optional[frozenset[str]], inner: Optional[frozenset[str]]
) -> Optional[frozenset[str]]:
    if outer is None:
        return inner
    if inner is None:
        return outer
    return outer & inner


def _joined(rule: Rule, what: str) -> str:
    parts = []
    if rule.marks:
        parts.append("marks " + ", ".join(rule.marks))
    if what:
        parts.append(what)
    return "; ".join(parts)


class _LoadError(Exception):
    """
    The rules cannot be loaded: C{reason}, under the check's key C{key}.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason
