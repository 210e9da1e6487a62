"""
C{pfxpold-replay}: run captured requests (L{pfxpold.capture}) through
another configuration, offline, and show what would have changed.

    pfxpold-replay --config new.toml /var/lib/pfxpold/capture.jsonl*

Requests are replayed one after another in captured order (the files of
workers merged by time), on a L{Clock} that follows the captured times,
so greylisting and quotas see the delays they saw. Every state store is
a private in-memory one (L{pfxpold.explain.private_stores}): nothing is
written to the production Redis or SQLite.

Lookups (C{sql}, C{ldap}, C{dnsbl}, C{http} checks) are, with
C{--lookups recorded} (the default), answered by the verdict the capture
recorded for the check of the same name, where the check's settings are
unchanged (the capture's header holds a fingerprint of each), and asked
live otherwise; with C{--lookups live} every backend is asked (read only:
lookups only read). A check the old chain never reached has no recorded
verdict; it answers C{DUNNO} and is counted as I{unrecorded}.

Answers are compared by verb, or status code (C{REJECT}, C{450}),
or with C{--compare text} by their whole text. The exit status is 0
when the changes pass the gate, 1 when more than C{--max-changed} of the
answers changed or (C{--fail-on-refuse}, the default) an answer changed
from accepting to refusing, and 2 when the replay could not run.
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Optional, TextIO, cast

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.task import Clock
from zope.interface import directlyProvides, implementer, providedBy

from pfxpold import explain
from pfxpold.action import DUNNO, ActionError
from pfxpold.capture import LOOKUP_TYPES, check_fingerprints
from pfxpold.chain import ChainEntry, CheckChain, Decision
from pfxpold.config import Configuration
from pfxpold.escape import escape
from pfxpold.interfaces import ICheck
from pfxpold.request import PolicyRequest

PROGRAM = "pfxpold-replay"

#: Exit statuses.
PASSED, FAILED, BROKEN = 0, 1, 2

#: Verbs that refuse (or hold back) the mail; status codes 4xx and 5xx too.
REFUSING = frozenset(("REJECT", "DEFER", "DEFER_IF_REJECT", "DEFER_IF_PERMIT", "HOLD", "DISCARD"))

#: Seconds to wait for the checks' services to stop.
_STOP_TIMEOUT = 10.0


class ReplayError(Exception):
    """
    The replay cannot run; the message is the one line to print.
    """


class _RecordedFailure(Exception):
    """
    The check failed when the request was captured.
    """


def answer_key(answer: Optional[str], text: bool = False) -> str:
    """
    What two answers are compared by: C{"no reply"}, the whole text
    (C{text}), or the verb or status code (C{"REJECT"}, C{"450"}).
    """
    if answer is None:
        return "no reply"
    if text:
        return answer
    verb = answer.split(None, 1)[0] if answer else answer
    return verb if verb.isdigit() else verb.upper()


def refuses(answer: Optional[str]) -> bool:
    """
    Whether C{answer} refuses, defers, holds or discards the mail.
    """
    if not answer:
        return False
    verb = answer_key(answer)
    if verb.isdigit():
        return verb[:1] in ("4", "5")
    return verb in REFUSING


# Reading captures


@dataclass
class Captured:
    """
    One captured request.

    @ivar fingerprints: the checks' fingerprints in force when it was
        captured (from the last header line before it).
    """

    t: float
    attributes: dict[str, str]
    answer: Optional[str]
    decided_by: str
    verdicts: dict[str, str]
    fingerprints: dict[str, str]


@dataclass
class Reading:
    """
    What reading the capture files found besides requests.
    """

    files: list[str] = field(default_factory=list)
    unreadable: int = 0
    first_headers: list[dict[str, str]] = field(default_factory=list)


def _open(path: str) -> IO[str]:
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rt", encoding="ascii", errors="replace")
        return open(path, encoding="ascii", errors="replace")
    except OSError as e:
        raise ReplayError(f"{path}: cannot read: {e.strerror}") from None


def _fingerprints(header: dict[str, Any]) -> dict[str, str]:
    checks = header.get("checks")
    if not isinstance(checks, dict):
        return {}
    return {
        str(name): str(value.get("fingerprint", ""))
        for name, value in checks.items()
        if isinstance(value, dict)
    }


def first_header(path: str) -> dict[str, str]:
    """
    The check fingerprints of the first header line of C{path} (C{{}}
    when it has none).
    """
    with _open(path) as f:
        line = f.readline()
    try:
        header = json.loads(line)
    except ValueError:
        return {}
    if isinstance(header, dict) and "pfxpold_capture" in header:
        return _fingerprints(header)
    return {}


def _records(path: str, reading: Reading) -> Iterator[Captured]:
    fingerprints: dict[str, str] = {}
    names: list[str] = []
    loads = json.loads
    with _open(path) as f:
        try:
            for line in f:
                try:
                    record = loads(line)
                    if "pfxpold_capture" in record:
                        fingerprints = _fingerprints(record)
                        names = [str(name) for name in record.get("names", ())]
                        continue
                    values = record.get("values")
                    if values is not None:
                        if len(values) != len(names):
                            raise ValueError("values")
                        attributes = dict(zip(names, values, strict=True))
                    else:
                        attributes = record["request"]
                        if not isinstance(attributes, dict):
                            raise TypeError("request")
                    answer = record.get("answer")
                    verdicts = record.get("verdicts") or ()
                    yield Captured(
                        float(record["t"]),
                        {str(k): str(v) for k, v in attributes.items()},
                        None if answer is None else str(answer),
                        str(record.get("by", "")),
                        {str(name): str(verdict) for name, verdict in verdicts},
                        fingerprints,
                    )
                except (ValueError, TypeError, KeyError, AttributeError):
                    reading.unreadable += 1
        except (OSError, EOFError) as e:
            # A truncated .gz (still being compressed, or copied half).
            reading.unreadable += 1
            print(f"{PROGRAM}: {path}: {e}", file=sys.stderr)


def read_captures(paths: Iterable[str], reading: Reading) -> Iterator[Captured]:
    """
    The requests of every file in C{paths}, merged by time: each file is
    in the order its process answered them.
    """
    streams = []
    for path in paths:
        reading.files.append(path)
        reading.first_headers.append(first_header(path))
        streams.append(_records(path, reading))
    return heapq.merge(*streams, key=lambda captured: captured.t)


# The chain on a simulated clock


class ReplayReactor:
    """
    The real reactor for network I/O, with a L{Clock}'s time: every
    C{seconds}, C{callLater} and C{getDelayedCalls} of the checks and
    stores goes to the clock that follows the captured times.
    """

    def __init__(self, reactor: Any, clock: Clock) -> None:
        self._reactor = reactor
        self.clock = clock
        directlyProvides(self, *providedBy(reactor))

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, f, *args, **kwargs)

    def getDelayedCalls(self) -> Any:
        return self.clock.getDelayedCalls()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(ICheck)
class RecordedCheck:
    """
    A lookup answered by the verdict the capture recorded for it, while
    its settings are those the capture's header describes; asked live
    otherwise.

    @ivar current: the request being replayed.
    @ivar used: requests answered from the recording.
    @ivar unrecorded: requests the old chain had not asked this check.
    @ivar live: requests it was asked live (its settings had changed).
    """

    def __init__(self, name: str, check: Any, fingerprint: str) -> None:
        self.name = name
        self.wrapped = check
        self.fingerprint = fingerprint
        self.current: Optional[Captured] = None
        self.used = 0
        self.unrecorded = 0
        self.live = 0

    def check(self, request: PolicyRequest) -> Any:
        captured = self.current
        if captured is None or captured.fingerprints.get(self.name) != self.fingerprint:
            self.live += 1
            return maybeDeferred(self.wrapped.check, request)
        verdict = captured.verdicts.get(self.name)
        if verdict is None:
            self.unrecorded += 1
            return DUNNO
        self.used += 1
        if verdict == "timeout":
            raise TimeoutError("timed out when captured")
        if verdict == "invalid action":
            raise ActionError("answered an invalid action when captured")
        if verdict == "error":
            raise _RecordedFailure("failed when captured")
        return verdict


@dataclass
class Replayer:
    """
    A configuration's chain set up for replay.
    """

    chain: CheckChain
    clock: Clock
    recorded: list[RecordedCheck]
    services: MultiService
    live_checks: list[str]


def build(
    configuration: Configuration,
    clock: Clock,
    lookups: str,
    first_headers: list[dict[str, str]],
) -> Replayer:
    """
    The chain of C{configuration} on C{clock}, its lookups answered from
    the capture when C{lookups} is C{"recorded"}, and the services to
    start for the checks that run live.
    """
    fingerprints = check_fingerprints(configuration)
    old = configuration.chain
    entries = []
    recorded: list[RecordedCheck] = []
    skipped: set[int] = set()
    live_checks = []
    for entry in old.entries:
        record = configuration.checks.get(entry.name)
        type_name = record.type_name if record else ""
        check = entry.check
        if lookups == "recorded" and type_name in LOOKUP_TYPES:
            fingerprint = fingerprints[entry.name]["fingerprint"]
            check = RecordedCheck(entry.name, entry.check, fingerprint)
            recorded.append(check)
            if first_headers and all(h.get(entry.name) == fingerprint for h in first_headers):
                # Never asked live (unless a reload changed it mid-capture).
                skipped.add(id(entry.check))
            else:
                live_checks.append(entry.name)
        elif type_name in LOOKUP_TYPES or not record:
            live_checks.append(entry.name)
        entries.append(ChainEntry(entry.name, check, entry.timeout, entry.on_error, entry.mode))
    chain = old.rebuilt(entries, clock)
    services = MultiService()
    for service in configuration.services:
        if id(service) not in skipped:
            IService(service).setServiceParent(services)
    return Replayer(chain, clock, recorded, services, live_checks)


# The diff


@dataclass
class Report:
    """
    What the replay found.
    """

    config: str
    files: list[str]
    lookups: str
    compare: str
    requests: int = 0
    changed: int = 0
    accept_to_refuse: int = 0
    unreadable: int = 0
    first: Optional[float] = None
    last: Optional[float] = None
    seconds: float = 0.0
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    causes: Counter[tuple[str, str]] = field(default_factory=Counter)
    senders: Counter[str] = field(default_factory=Counter)
    clients: Counter[str] = field(default_factory=Counter)
    recipients: Counter[str] = field(default_factory=Counter)
    samples: list[dict[str, Any]] = field(default_factory=list)
    recorded: dict[str, dict[str, int]] = field(default_factory=dict)
    live_checks: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.changed / self.requests if self.requests else 0.0

    def note(self, captured: Captured, decision: Decision, text: bool, samples: int) -> None:
        """
        Count one replayed request.
        """
        self.requests += 1
        if self.first is None:
            self.first = captured.t
        self.last = captured.t
        action = decision.action
        new = None if action is None else str(action)
        old_key = answer_key(captured.answer, text)
        new_key = answer_key(new, text)
        self.pairs[old_key, new_key] += 1
        if old_key == new_key:
            return
        self.changed += 1
        if refuses(new) and not refuses(captured.answer):
            self.accept_to_refuse += 1
        self.causes[captured.decided_by, decision.decided_by] += 1
        attributes = captured.attributes
        self.senders[attributes.get("sender", "")] += 1
        self.clients[attributes.get("client_address", "")] += 1
        self.recipients[attributes.get("recipient", "")] += 1
        if len(self.samples) < samples:
            self.samples.append(
                {
                    "t": captured.t,
                    "protocol_state": attributes.get("protocol_state", ""),
                    "client_address": attributes.get("client_address", ""),
                    "sender": attributes.get("sender", ""),
                    "recipient": attributes.get("recipient", ""),
                    "old": captured.answer,
                    "old_by": captured.decided_by,
                    "new": new,
                    "new_by": decision.decided_by,
                }
            )

    def as_json(self, top: int) -> dict[str, Any]:
        return {
            "config": self.config,
            "files": self.files,
            "lookups": self.lookups,
            "compare": self.compare,
            "requests": self.requests,
            "changed": self.changed,
            "changed_share": round(self.share, 6),
            "accept_to_refuse": self.accept_to_refuse,
            "unreadable_lines": self.unreadable,
            "first": self.first,
            "last": self.last,
            "seconds": round(self.seconds, 3),
            "answers": [
                {"old": old, "new": new, "count": count}
                for (old, new), count in sorted(self.pairs.items(), key=_by_count)
            ],
            "causes": [
                {"old_by": old, "new_by": new, "count": count}
                for (old, new), count in sorted(self.causes.items(), key=_by_count)
            ],
            "top_senders": self.senders.most_common(top),
            "top_clients": self.clients.most_common(top),
            "top_recipients": self.recipients.most_common(top),
            "samples": self.samples,
            "recorded_lookups": self.recorded,
            "live_checks": self.live_checks,
        }


def _by_count(item: tuple[tuple[str, str], int]) -> tuple[int, tuple[str, str]]:
    return -item[1], item[0]


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[-1].rjust(widths[-1])]).rstrip())
    return lines


def render(report: Report, top: int) -> str:
    """
    The report as printed. Every text from a request is escaped.
    """
    lines = [
        f"replayed {report.requests} requests from {len(report.files)} file(s) through"
        f" {report.config} (lookups {report.lookups}, compared by {report.compare})",
        f"changed: {report.changed} ({report.share:.2%}),"
        f" accept -> refuse: {report.accept_to_refuse}",
    ]
    if report.unreadable:
        lines.append(f"unreadable lines skipped: {report.unreadable}")
    lines += ["", "answers (old -> new):"]
    rows = [("old", "", "new", "count")]
    for (old, new), count in sorted(report.pairs.items(), key=_by_count):
        rows.append((escape(old), "->" if old != new else "==", escape(new), str(count)))
    lines += _table(rows)
    if report.causes:
        lines += ["", "decided by (old -> new), changed answers only:"]
        rows = [("old", "", "new", "count")]
        for (old, new), count in sorted(report.causes.items(), key=_by_count):
            rows.append((old, "->", new, str(count)))
        lines += _table(rows)
    for title, counter in (
        ("senders", report.senders),
        ("clients", report.clients),
        ("recipients", report.recipients),
    ):
        if counter:
            lines += ["", f"top changed {title}:"]
            lines += _table([(escape(v) or "<>", str(n)) for v, n in counter.most_common(top)])
    if report.samples:
        lines += ["", "samples:"]
        for sample in report.samples:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sample["t"]))
            lines.append(
                f"  {stamp} {escape(sample['protocol_state'])}"
                f" [{escape(sample['client_address'])}] from=<{escape(sample['sender'])}>"
                f" to=<{escape(sample['recipient'])}>: {escape(str(sample['old']))}"
                f" ({sample['old_by']}) -> {escape(str(sample['new']))} ({sample['new_by']})"
            )
    for name, counts in report.recorded.items():
        if counts["unrecorded"]:
            lines.append(
                f"note: check {name} was not asked when {counts['unrecorded']} of these"
                " requests were captured; it answered DUNNO for them (use --lookups live)"
            )
    return "\n".join(lines)


def gate(report: Report, max_changed: Optional[float], fail_on_refuse: bool) -> list[str]:
    """
    Why the changes fail the gate (empty: they pass).
    """
    reasons = []
    if max_changed is not None and report.share > max_changed:
        reasons.append(f"{report.share:.2%} of answers changed, more than {max_changed:.2%}")
    if fail_on_refuse and report.accept_to_refuse:
        reasons.append(f"{report.accept_to_refuse} answers changed from accepting to refusing")
    return reasons


# Running it


async def replay(
    replayer: Replayer,
    captured: Iterable[Captured],
    report: Report,
    reactor: Any,
    text: bool = False,
    samples: int = 10,
) -> None:
    """
    Run each captured request through C{replayer}'s chain at its captured
    time, and note the outcome in C{report}. Checks that answer at once
    (maps, rules, memory stores, recorded lookups) cost no reactor turn;
    for a check still waiting, the real reactor runs until it answers,
    and a check that does not answer within the chain's deadline (real
    time) is given up as the chain's deadline.
    """
    clock = replayer.clock
    chain = replayer.chain
    recorded = replayer.recorded
    note = report.note
    adopt = PolicyRequest.adopt
    for request in captured:
        delay = request.t - clock.seconds()
        if delay > 0:
            clock.advance(delay)
        for check in recorded:
            check.current = request
        decided = chain.decide(adopt(request.attributes))
        if type(decided) is not Decision:
            waiting = cast(Deferred[Decision], decided)
            clock.advance(0)
            if not waiting.called:
                guard = reactor.callLater(chain.deadline, clock.advance, chain.deadline)
                try:
                    decided = await waiting
                finally:
                    if guard.active():
                        guard.cancel()
            else:
                decided = await waiting
        note(request, decided, text, samples)


def _share(value: str) -> float:
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a share (0.01 or 1%)") from None
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not between 0 and 1 (or 0% and 100%)")
    return share


def load(path: str, reactor: Any) -> Configuration:
    """
    Build the configuration in C{path} with private in-memory stores.

    @raise ReplayError: with the configuration's one-line error.
    """
    try:
        return explain.load(path, reactor)
    except explain.ExplainError as e:
        raise ReplayError(str(e)) from None


async def run(
    reactor: Any, arguments: argparse.Namespace, out: TextIO, err: Optional[TextIO] = None
) -> int:
    """
    Replay the captures C{arguments} name through their configuration and
    print the report.

    @return: the exit status.
    @raise ReplayError: with the one line to print.
    """
    reading = Reading()
    captured = read_captures(arguments.captures, reading)
    clock = Clock()
    configuration = load(arguments.config, ReplayReactor(reactor, clock))
    replayer = build(configuration, clock, arguments.lookups, reading.first_headers)
    report = Report(
        arguments.config,
        reading.files,
        arguments.lookups,
        "text" if arguments.compare == "text" else "verb",
        live_checks=replayer.live_checks,
    )
    replayer.services.startService()
    started = time.perf_counter()
    try:
        await replay(
            replayer,
            captured,
            report,
            reactor,
            text=arguments.compare == "text",
            samples=arguments.samples,
        )
    finally:
        report.seconds = time.perf_counter() - started
        stopping = maybeDeferred(replayer.services.stopService)
        stopping.addTimeout(_STOP_TIMEOUT, reactor)
        try:
            await stopping
        except Exception:
            pass
    report.unreadable = reading.unreadable
    report.recorded = {
        check.name: {"recorded": check.used, "unrecorded": check.unrecorded, "live": check.live}
        for check in replayer.recorded
    }
    if arguments.json:
        json.dump(report.as_json(arguments.top), out, indent=2)
        out.write("\n")
    else:
        print(render(report, arguments.top), file=out)
    err = err or sys.stderr
    reasons = gate(report, arguments.max_changed, arguments.fail_on_refuse)
    for reason in reasons:
        print(f"{PROGRAM}: failed: {reason}", file=err)
    if arguments.timing:
        rate = report.requests / report.seconds if report.seconds else 0.0
        print(
            f"{PROGRAM}: {report.requests} requests in {report.seconds:.1f}s ({rate:,.0f} req/s)",
            file=err,
        )
    return FAILED if reasons else PASSED


def make_parser() -> argparse.ArgumentParser:
    """
    The command line of C{pfxpold-replay}.
    """
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description=(
            "Run requests captured by pfxpold ([server] capture) through another"
            " configuration, offline, on a clock that follows the captured times, with"
            " private in-memory state stores, and show which answers would change. Exit"
            " status: 0 when the changes pass, 1 when they fail --max-changed or"
            " --fail-on-refuse, 2 when the replay could not run."
        ),
    )
    parser.add_argument("--config", "-c", required=True, help="the TOML configuration to try")
    parser.add_argument(
        "captures", nargs="+", metavar="CAPTURE", help="capture files (.jsonl, or .jsonl...gz)"
    )
    parser.add_argument(
        "--lookups",
        choices=("recorded", "live"),
        default="recorded",
        help=(
            "recorded (default): SQL, LDAP, DNS list and HTTP checks whose settings are"
            " unchanged answer what the capture recorded; live: ask their backends"
        ),
    )
    parser.add_argument(
        "--compare",
        choices=("verb", "text"),
        default="verb",
        help="compare answers by verb or status code (default), or by their whole text",
    )
    parser.add_argument(
        "--max-changed",
        type=_share,
        default=None,
        metavar="SHARE",
        help="fail (exit 1) when more than SHARE of the answers changed (0.01 or 1%%)",
    )
    parser.add_argument(
        "--fail-on-refuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fail (exit 1) when an answer changed from accepting to refusing (default: on)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--top", type=int, default=5, help="how many changed senders, clients, recipients"
    )
    parser.add_argument(
        "--samples", type=int, default=10, help="how many changed requests to show"
    )
    parser.add_argument(
        "--timing", action="store_true", help="print the replay's speed on standard error"
    )
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """
    Run C{pfxpold-replay}.
    """
    from twisted.internet.task import react

    from pfxpold.explain import log_to_stderr

    arguments = make_parser().parse_args(argv)
    log_to_stderr(PROGRAM, quiet=("pfxpold.chain",))

    async def replayed(reactor: Any) -> None:
        try:
            status = await run(reactor, arguments, sys.stdout)
        except ReplayError as e:
            print(f"{PROGRAM}: {' '.join(str(e).split())}", file=sys.stderr)
            raise SystemExit(BROKEN) from None
        if status:
            raise SystemExit(status)

    react(lambda reactor: Deferred.fromCoroutine(replayed(reactor)))


if __name__ == "__main__":
    main()
