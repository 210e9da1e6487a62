"""
C{pfxpold-explain}: run one request through a configuration with no
daemon, and print what each check answered and, for checks that can say
how (L{pfxpold.interfaces.IExplainable}: the rules check, the file check),
each step.

    pfxpold-explain --config /etc/pfxpold/pfxpold.toml \\
        --sender alice@example.com --client-address 192.0.2.1
    pfxpold-explain --config pfxpold.toml request.txt

The request comes from the same options and files as C{pfxpold-query}.
The checks are built and started as the daemon would (maps read, LDAP,
SQL, DNS and HTTP backends asked), but every state store is replaced by a
private in-memory one: quotas, greylisting and per-message marks start
empty and nothing is written to the production store.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO, cast

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import alsoProvides, implementer

from pfxpold.action import Action
from pfxpold.chain import ChainEntry
from pfxpold.config import (
    ConfigError,
    Configuration,
    load_document,
    read_document,
)
from pfxpold.escape import escape
from pfxpold.interfaces import ICheck, IDecisionListener, IExplainable
from pfxpold.query import add_request_arguments, request_attributes
from pfxpold.request import PolicyRequest

PROGRAM = "pfxpold-explain"

#: What a check's verdict is when the chain never asked it.
NOT_REACHED = "not reached"

#: The chain's verdicts for a check that did not answer.
_FAILED = ("timeout", "error", "invalid action")

#: Seconds to wait for the checks' services to stop.
_STOP_TIMEOUT = 10.0


class ExplainError(Exception):
    """
    The request cannot be explained; the message is the one line to print.
    """


def private_stores(document: dict[str, Any]) -> dict[str, Any]:
    """
    C{document} with every state store (each C{[stores.NAME]}, and the
    default one) replaced by an in-memory store of its own, so that an
    explained request changes no counter, triplet or mark in production.
    """
    stores = document.get("stores", {})
    names = set(stores) if isinstance(stores, dict) else set()
    names.add("default")
    return {**document, "stores": {name: {"type": "memory"} for name in sorted(names)}}


@dataclass
class CheckReport:
    """
    What one check did with the request.

    @ivar verdict: its answer as the chain took it (C{"error"},
        C{"timeout"} ... when it failed), or L{NOT_REACHED}.
    @ivar steps: the C{(step, matched, detail)} lines of an
        L{IExplainable} check.
    @ivar problem: why it failed, or why its steps are missing.
    """

    name: str
    type_name: str
    on_error: str
    verdict: str = NOT_REACHED
    steps: list[tuple[str, bool, str]] = field(default_factory=list)
    problem: Optional[str] = None


@dataclass
class Explanation:
    """
    A request, each check's report in chain order, and the answer.

    @ivar answer: the action sent, or L{None} for no reply.
    @ivar decided_by: the deciding check, C{"default"} or C{"deadline"}.
    """

    request: PolicyRequest
    reports: list[CheckReport]
    answer: Optional[Action]
    decided_by: str


@implementer(ICheck)
class _Recording:
    """
    A check as the explain's chain runs it: asks an L{IExplainable} check
    for its steps first, then for its verdict, and keeps why it failed.
    Both happen within the check's timeout.
    """

    def __init__(self, check: Any, report: CheckReport) -> None:
        self.wrapped = check
        self.report = report
        if IDecisionListener.providedBy(check):
            # A quota counts what the chain let through, in the private store.
            alsoProvides(self, IDecisionListener)

    def check(self, request: PolicyRequest) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._check(request))

    async def _check(self, request: PolicyRequest) -> Any:
        if IExplainable.providedBy(self.wrapped):
            try:
                steps = await maybeDeferred(self.wrapped.explain, request)
                self.report.steps = [(str(s), bool(m), str(d)) for s, m, d in steps]
            except Exception as e:
                self.report.problem = f"explain failed: {type(e).__name__}: {e}"
        try:
            return await maybeDeferred(self.wrapped.check, request)
        except Exception as e:
            self.report.problem = f"{type(e).__name__}: {e}"
            raise

    def decided(self, request: PolicyRequest, action: Optional[Action]) -> Any:
        return self.wrapped.decided(request, action)


async def explain(configuration: Configuration, request: PolicyRequest, clock: Any) -> Explanation:
    """
    Run C{request} through C{configuration}'s chain as the daemon would
    (timeouts, C{on_error}, deadline, default action), recording each
    check's verdict and steps. The configuration's services must be
    running.
    """
    chain = configuration.chain
    reports: list[CheckReport] = []
    entries = []
    for entry in chain.entries:
        record = configuration.checks.get(entry.name)
        report = CheckReport(
            entry.name,
            record.type_name if record else type(entry.check).__name__,
            str(entry.on_error),
        )
        reports.append(report)
        entries.append(
            ChainEntry(
                entry.name,
                _Recording(entry.check, report),
                entry.timeout,
                entry.on_error,
                entry.mode,
            )
        )
    recording = chain.rebuilt(entries, clock, record_verdicts=True)
    decided = recording.decide(request)
    decision = await decided if isinstance(decided, Deferred) else decided
    by_name = {report.name: report for report in reports}
    for name, verdict in decision.verdicts:
        by_name[name].verdict = verdict
    return Explanation(request, reports, decision.action, decision.decided_by)


def render(explanation: Explanation) -> str:
    """
    The explanation as printed: the request, one line per check with its
    verdict, its steps under it (C{yes}/C{no}: whether the step matched),
    and the answer. Every text from the request or a check is escaped.
    """
    lines = [f"request: {escape(explanation.request.summary())}"]
    for report in explanation.reports:
        verdict = report.verdict
        if verdict in _FAILED:
            verdict = f"{verdict}, on_error {report.on_error}"
            if report.problem:
                verdict += f" ({report.problem})"
        lines.append(f"check {report.name} ({report.type_name}): {escape(verdict)}")
        for step, matched, detail in report.steps:
            mark = "yes" if matched else "no "
            lines.append(f"    {mark}  {escape(step)}: {escape(detail)}")
        if report.problem and report.verdict not in _FAILED:
            lines.append(f"    ({escape(report.problem)})")
    if explanation.answer is None:
        lines.append(
            f"answer: no reply (decided by {explanation.decided_by}): the connection is"
            " closed and Postfix applies smtpd_policy_service_default_action"
        )
    else:
        lines.append(f"answer: {explanation.answer} (decided by {explanation.decided_by})")
    return "\n".join(lines)


def load(path: str, reactor: Any) -> Configuration:
    """
    Build the configuration in C{path} with private in-memory stores.

    @raise ExplainError: with the configuration's one-line error.
    """
    try:
        document = private_stores(read_document(path))
        return load_document(document, reactor, path)
    except ConfigError as e:
        raise ExplainError(str(e)) from None


async def run(
    reactor: Any, arguments: argparse.Namespace, out: TextIO, stdin: Optional[bytes] = None
) -> None:
    """
    Explain the request C{arguments} describe with the configuration they
    name, starting and stopping the checks' services around it.

    @raise ExplainError: with the one line to print.
    """
    if not arguments.config:
        raise ExplainError("no configuration: give --config FILE (or set $PFXPOLD_CONFIG)")
    try:
        request = PolicyRequest(request_attributes(arguments, stdin))
    except (OSError, ValueError) as e:
        raise ExplainError(f"the request: {getattr(e, 'strerror', None) or e}") from None
    configuration = load(arguments.config, reactor)
    services = MultiService()
    for service in configuration.services:
        service.setServiceParent(services)
    services.startService()
    try:
        explanation = await explain(configuration, request, reactor)
    finally:
        stopping = maybeDeferred(services.stopService)
        stopping.addTimeout(_STOP_TIMEOUT, reactor)
        try:
            await stopping
        except Exception:
            # Best effort: the explanation (or its error) stands.
            pass
    print(render(explanation), file=out)


def make_parser() -> argparse.ArgumentParser:
    """
    The command line of C{pfxpold-explain}.
    """
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description=(
            "Run one Postfix policy request through a configuration, with no daemon, and"
            " print each check's verdict (and, for checks that can say how, each step)"
            " and the answer. Checks are started as the daemon starts them: maps are"
            " read and LDAP, SQL, DNS and HTTP backends are asked for real. Every state"
            " store is replaced by a private in-memory store, so quotas, greylisting and"
            " per-message marks start empty and nothing is written to the production"
            " store (a greylist check therefore answers as to a first attempt)."
        ),
    )
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help="the TOML configuration file (default: $PFXPOLD_CONFIG)",
    )
    add_request_arguments(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """
    Run C{pfxpold-explain}: exits with 0 when the request was explained,
    1 with one line on standard error when it could not be.
    """
    from twisted.internet.task import react

    arguments = make_parser().parse_args(argv)
    if not arguments.config:
        arguments.config = os.environ.get("PFXPOLD_CONFIG") or None
    _log_to_stderr()

    async def explained(reactor: Any) -> None:
        try:
            await run(reactor, arguments, sys.stdout)
        except ExplainError as e:
            print(f"{PROGRAM}: {' '.join(str(e).split())}", file=sys.stderr)
            raise SystemExit(1) from None

    react(lambda reactor: Deferred.fromCoroutine(explained(reactor)))


def _log_to_stderr() -> None:
    log_to_stderr(PROGRAM)


def log_to_stderr(program: str, quiet: tuple[str, ...] = ()) -> None:
    """
    Show the checks' warnings and errors (a backend that cannot be
    reached, a map that cannot be read) as one escaped line each on
    standard error, prefixed with C{program}; their verdicts are in the
    program's own output.

    @param quiet: log namespaces (prefixes) left out.
    """
    from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) < LogLevel.warn:
            return
        if quiet and str(event.get("log_namespace", "")).startswith(quiet):
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += f": {failure.getErrorMessage()}"
        text = " ".join(text.split())
        # Log formats escape what they quote already; escape only what is
        # still not printable, not their backslashes again.
        print(f"{program}: log: {text if text.isprintable() else escape(text)}", file=sys.stderr)

    globalLogBeginner.beginLoggingTo([cast(ILogObserver, observe)], redirectStandardIO=False)


if __name__ == "__main__":
    main()
