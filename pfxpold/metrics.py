"""
Prometheus metrics: what a serving daemon counts, and its C{/metrics} page.

With a C{[metrics]} table in the configuration, the daemon counts its
requests, checks, limit violations and store operations, and serves them
in Prometheus's text format (through C{prometheus_client}, the optional
C{metrics} extra) on the table's C{listen} endpoint. Without the table
nothing here is imported and nothing is counted.

Counting is done in plain Python integers in dictionaries, one small update
per request and per check run: C{prometheus_client}'s own metric objects
cost several times more per update (about 0.5 µs for a counter and 1 µs
for a histogram observation, 1.2 and 2.3 µs in its multi-process mode).
The figures become metric families (C{prometheus_client}'s) only when
C{/metrics} is read. Gauges (connections, requests in flight, backends
connected, DNS lists skipped) are read at that moment too.

With C{--workers N}, only the parent listens for scrapes. Each worker
writes a snapshot of its figures (JSON) into a private directory the parent
made, once a second; the parent adds them to its own when it is scraped, so
one scrape shows the whole daemon, a worker's last second at most behind.
Counters of a worker that exited stay in the sums; its gauges do not.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Optional

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold import __version__
from pfxpold.action import ActionError
from pfxpold.chain import DeadlinePassed
from pfxpold.interfaces import IStateStore

#: Where a worker writes its snapshots: set by the parent before it starts
#: its workers, inherited by them.
WORKERS_DIRECTORY = "PFXPOLD_METRICS_DIR"

#: Seconds between a worker's snapshots.
SNAPSHOT_INTERVAL = 1.0

#: Upper bounds (seconds) of the latency histograms' buckets: most answers
#: take well under a millisecond, a backend's timeout seconds.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: The SMTP stages Postfix sends; anything else is counted as C{"other"}, so
#: that a client cannot make up label values without end.
PROTOCOL_STATES = frozenset(
    {"CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN"}
)

#: The action label of a request answered without a reply.
NOREPLY = "noreply"


class _Family:
    """
    What a metric family is: its kind, help text and label names, and for a
    gauge how the processes' values add up (C{"sum"}, C{"min"}, C{"max"}).
    """

    __slots__ = ("kind", "help", "labels", "merge")

    def __init__(self, kind: str, help: str, labels: tuple[str, ...], merge: str = "sum") -> None:
        self.kind = kind
        self.help = help
        self.labels = labels
        self.merge = merge


#: Every family pfxpold's own figures go to, by name.
FAMILIES = {
    "pfxpold_requests": _Family(
        "counter",
        "Requests answered, by SMTP stage, action verb (noreply: closed without"
        " a reply) and the check that decided (default, deadline, error).",
        ("protocol_state", "action", "check"),
    ),
    "pfxpold_request_duration_seconds": _Family(
        "histogram", "Seconds from a request's last line to its answer.", ()
    ),
    "pfxpold_check_duration_seconds": _Family(
        "histogram", "Seconds a check took to answer, fail or time out.", ("check",)
    ),
    "pfxpold_check_verdicts": _Family(
        "counter", "Answers of each check, by action verb.", ("check", "verdict")
    ),
    "pfxpold_check_errors": _Family(
        "counter",
        "Failures of each check: timeout (its timeout), deadline (the request's),"
        " invalid_action, or the exception's class name.",
        ("check", "kind"),
    ),
    "pfxpold_check_on_error": _Family(
        "counter",
        "on_error applied after a check failed: skip, noreply or the action verb.",
        ("check", "applied"),
    ),
    "pfxpold_shadow_verdicts": _Family(
        "counter",
        "Verdicts of shadow checks (shadow = true), which never decide: by"
        " action verb (or error, timeout, cancelled), and differs=\"true\" when"
        " the check, deciding, would have changed the answer.",
        ("check", "action", "differs"),
    ),
    "pfxpold_limit_violations": _Family(
        "counter",
        "Connections closed for breaking the protocol or its limits, by kind.",
        ("kind",),
    ),
    "pfxpold_store_operation_duration_seconds": _Family(
        "histogram", "Seconds a state store operation took.", ("store", "operation")
    ),
    "pfxpold_store_errors": _Family(
        "counter",
        "Failed state store operations, by the exception's class name.",
        ("store", "operation", "kind"),
    ),
    "pfxpold_request_log_lost_lines": _Family(
        "counter", "Request log lines lost to failed writes.", ()
    ),
    "pfxpold_connections": _Family("gauge", "Open Postfix connections.", ()),
    "pfxpold_requests_in_flight": _Family("gauge", "Requests received and not yet answered.", ()),
    "pfxpold_backend_connected": _Family(
        "gauge",
        "1 when the backend's connection is up (in every process, with --workers).",
        ("backend",),
        merge="min",
    ),
    "pfxpold_check_degraded": _Family(
        "gauge",
        "1 while a quota or greylist check answers without its down store"
        " (on_store_down; in any process, with --workers).",
        ("check",),
        merge="max",
    ),
    "pfxpold_check_reconciled": _Family(
        "counter",
        "What a quota check counted locally while its store was down and then"
        " added to the store (in the check's unit).",
        ("check",),
    ),
    "pfxpold_circuit_breaker_open": _Family(
        "gauge",
        "1 while a failing DNS list is skipped (in any process, with --workers).",
        ("check", "target"),
        merge="max",
    ),
}


class _Histogram:
    """
    Observations counted in L{DURATION_BUCKETS} (the last count is above
    them all) and their sum.
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bound >= seconds, Prometheus's "le".
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds


class _CheckFigures(_Histogram):
    """
    One check's latencies, and its answers by verb.
    """

    __slots__ = ("verdicts",)

    def __init__(self) -> None:
        super().__init__()
        self.verdicts: dict[str, int] = {}


def _bump(counts: dict[Any, int], key: Any) -> None:
    counts[key] = counts.get(key, 0) + 1


def _histogram(histograms: dict[Any, _Histogram], key: Any) -> _Histogram:
    histogram = histograms.get(key)
    if histogram is None:
        histogram = histograms[key] = _Histogram()
    return histogram


def _error_kind(failure: Failure) -> str:
    if failure.check(DeadlinePassed):
        return "deadline"
    if failure.check(TimeoutError):
        return "timeout"
    if failure.check(ActionError):
        return "invalid_action"
    return failure.type.__name__


class Metrics:
    """
    The figures of one process, and the hooks that count them.

    The protocol calls L{answered} for every answer (through
    C{PolicyFactory.metrics}); limit violations are the factory's own
    C{violations}, read when scraped;
    the chain calls L{check_answered}, L{check_failed} and
    L{check_abandoned} for every check run (through C{CheckChain.observer},
    set by L{instrument}). Per-check figures are kept by check name here,
    not in the chain, so they go on across a configuration reload.

    @ivar factory: the L{pfxpold.protocol.PolicyFactory} counted, once
        L{attach}ed: its connections, requests in flight, request log and
        current chain are read when a snapshot is taken.
    @ivar workers: the L{WorkerSnapshots} whose figures are added to this
        process's, in a parent with workers.
    @ivar reloads: the object whose C{reloads_succeeded},
        C{reloads_failed} and C{last_reload_time} are shown, once
        L{watch_reloads} named it.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._seconds = clock.seconds
        self.requests: dict[tuple[str, str, str], int] = {}
        self.request_duration = _Histogram()
        self.checks: dict[str, _CheckFigures] = {}
        self.check_errors: dict[tuple[str, str], int] = {}
        self.check_on_error: dict[tuple[str, str], int] = {}
        self.store_duration: dict[tuple[str, str], _Histogram] = {}
        self.store_errors: dict[tuple[str, str, str], int] = {}
        self.shadow_verdicts: dict[tuple[str, str, str], int] = {}
        self.reconciled: dict[str, int] = {}
        self.factory: Any = None
        self.workers: Optional[WorkerSnapshots] = None
        self.reloads: Any = None

    # Wiring

    def attach(self, factory: Any) -> None:
        """
        Count what C{factory} serves, with the chain it holds now.
        """
        self.factory = factory
        factory.metrics = self
        self.instrument(factory.decider)

    def instrument(self, chain: Any) -> None:
        """
        Count the checks of C{chain} and the operations of the state stores
        they use. A reload calls this with the new chain before it swaps it
        in; the figures go on under the same check and store names.
        """
        chain.observer = self
        timed: dict[int, TimedStore] = {}
        for entry in getattr(chain, "entries", ()):
            outage = getattr(entry.check, "outage", None)
            if outage is not None:
                outage.observer = self
            store = getattr(entry.check, "store", None)
            if store is None or isinstance(store, TimedStore):
                continue
            if IStateStore.providedBy(store):
                if id(store) not in timed:
                    timed[id(store)] = TimedStore(store, self, self._clock)
                entry.check.store = timed[id(store)]

    def watch_reloads(self, reloads: Any) -> None:
        """
        Show the reloads C{reloads} counts: its C{reloads_succeeded},
        C{reloads_failed} and C{last_reload_time} attributes, read at each
        scrape (missing ones read as 0, and no time).
        """
        self.reloads = reloads

    # The hot path: one call per answer, one per check run.

    def answered(self, request: Any, decision: Any, started: float) -> None:
        """
        Count an answered request.

        @param decision: the L{pfxpold.chain.Decision} answered.
        @param started: when its last line arrived, on this clock.
        """
        # Inlined, as in check_answered: every call here costs the
        # throughput of a busy daemon.
        seconds = self._seconds() - started
        histogram = self.request_duration
        histogram.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        histogram.sum += seconds
        state = request.protocol_state
        if state not in PROTOCOL_STATES:
            state = "other"
        action = decision.action
        key = (state, NOREPLY if action is None else action.verb, decision.decided_by)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

    def check_answered(self, name: str, verdict: str, started: float) -> None:
        """
        Count check C{name}'s answer (the action verb C{verdict}), begun at
        C{started}.
        """
        seconds = self._seconds() - started
        figures = self.checks.get(name)
        if figures is None:
            figures = self.checks[name] = _CheckFigures()
        figures.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        figures.sum += seconds
        verdicts = figures.verdicts
        verdicts[verdict] = verdicts.get(verdict, 0) + 1

    def check_failed(self, name: str, failure: Failure, on_error: Any, started: float) -> None:
        """
        Count check C{name}'s failure and the C{on_error} policy applied.
        """
        self._check_figures(name).observe(self._seconds() - started)
        _bump(self.check_errors, (name, _error_kind(failure)))
        applied = on_error.action.verb if on_error.action is not None else on_error.kind
        _bump(self.check_on_error, (name, applied))

    def shadow_answered(self, name: str, verdict: str, differs: bool) -> None:
        """
        Count shadow check C{name}'s verdict (an action verb, C{"error"},
        C{"timeout"} or C{"cancelled"}), and whether it would have changed
        the answer.
        """
        _bump(self.shadow_verdicts, (name, verdict, "true" if differs else "false"))

    def check_abandoned(self, name: str, started: float) -> None:
        """
        Count check C{name} given up on because the request's deadline
        passed (its on_error does not apply: the deadline's policy does).
        """
        self._check_figures(name).observe(self._seconds() - started)
        _bump(self.check_errors, (name, "deadline"))

    def check_reconciled(self, name: str, amount: int) -> None:
        """
        Check C{name} added C{amount} counted locally to its store.
        """
        self.reconciled[name] = self.reconciled.get(name, 0) + amount

    def _check_figures(self, name: str) -> _CheckFigures:
        figures = self.checks.get(name)
        if figures is None:
            figures = self.checks[name] = _CheckFigures()
        return figures

    def store_done(self, store: str, operation: str, started: float, outcome: Any) -> None:
        """
        Count a store operation that ended with C{outcome}.
        """
        _histogram(self.store_duration, (store, operation)).observe(self._seconds() - started)
        if isinstance(outcome, Failure):
            _bump(self.store_errors, (store, operation, outcome.type.__name__))

    # Snapshots

    def snapshot(self) -> dict[str, Any]:
        """
        This process's figures as plain data (JSON's), the gauges read now.

        Safe to call from another thread than the reactor's (the twisted.web
        resource of prometheus_client renders in one): every dictionary is
        copied in one step before it is read.
        """
        counters: list[tuple[str, Sequence[str], float]] = []
        histograms: list[tuple[str, Sequence[str], list[int], float]] = []
        gauges: list[tuple[str, Sequence[str], float]] = []
        for (state, action, check), count in self.requests.copy().items():
            counters.append(("pfxpold_requests", (state, action, check), count))
        counts = list(self.request_duration.counts)
        histograms.append(
            ("pfxpold_request_duration_seconds", (), counts, self.request_duration.sum)
        )
        for name, figures in self.checks.copy().items():
            histograms.append(
                ("pfxpold_check_duration_seconds", (name,), list(figures.counts), figures.sum)
            )
            for verdict, count in figures.verdicts.copy().items():
                counters.append(("pfxpold_check_verdicts", (name, verdict), count))
        for family, table in (
            ("pfxpold_check_errors", self.check_errors),
            ("pfxpold_check_on_error", self.check_on_error),
            ("pfxpold_store_errors", self.store_errors),
            ("pfxpold_shadow_verdicts", self.shadow_verdicts),
            (
                "pfxpold_check_reconciled",
                {(name,): n for name, n in self.reconciled.copy().items()},
            ),
        ):
            for labels, count in table.copy().items():
                counters.append((family, labels, count))
        for (store, operation), histogram in self.store_duration.copy().items():
            histograms.append(
                (
                    "pfxpold_store_operation_duration_seconds",
                    (store, operation),
                    list(histogram.counts),
                    histogram.sum,
                )
            )
        factory = self.factory
        if factory is not None:
            gauges.append(("pfxpold_connections", (), len(factory.connections)))
            gauges.append(("pfxpold_requests_in_flight", (), factory.in_flight))
            for kind, count in dict(getattr(factory, "violations", {})).items():
                counters.append(("pfxpold_limit_violations", (kind,), count))
            request_log = factory.request_log
            if request_log is not None:
                counters.append(
                    ("pfxpold_request_log_lost_lines", (), getattr(request_log, "dropped", 0))
                )
            gauges.extend(self._backends(factory.decider))
        return {
            "pid": os.getpid(),
            "counters": counters,
            "histograms": histograms,
            "gauges": gauges,
        }

    def _backends(self, chain: Any) -> Iterator[tuple[str, Sequence[str], float]]:
        """
        The backend gauges of C{chain}'s checks, found by the attributes
        they share: a check's or a store's client's boolean C{connected}
        (LDAP, Redis), a DNS list's C{skip_until} (the dnsbl check's circuit
        breaker).
        """
        now = self._clock.seconds()
        seen: set[str] = set()
        for entry in getattr(chain, "entries", ()):
            check = entry.check
            degraded = getattr(getattr(check, "outage", None), "active", None)
            if isinstance(degraded, bool):
                yield ("pfxpold_check_degraded", (entry.name,), int(degraded))
            connected = getattr(check, "connected", None)
            if isinstance(connected, bool):
                yield ("pfxpold_backend_connected", (entry.name,), int(connected))
            store = getattr(check, "store", None)
            if isinstance(store, TimedStore):
                store = store.store
            client = getattr(store, "client", None)
            connected = getattr(client, "connected", None)
            store_name = getattr(store, "name", None)
            if isinstance(connected, bool) and isinstance(store_name, str):
                if store_name not in seen:
                    seen.add(store_name)
                    yield ("pfxpold_backend_connected", (store_name,), int(connected))
            for dns_list in getattr(check, "lists", ()):
                skip_until = getattr(dns_list, "skip_until", None)
                zone = getattr(dns_list, "zone", None)
                if isinstance(skip_until, float) and isinstance(zone, str):
                    yield (
                        "pfxpold_circuit_breaker_open",
                        (entry.name, zone),
                        int(skip_until > now),
                    )


@implementer(IStateStore)
class TimedStore:
    """
    A state store as the checks see it once metrics are on: every
    operation's time and failure is counted under the store's name, and
    anything else is the store's own.
    """

    def __init__(self, store: Any, metrics: Metrics, clock: Any) -> None:
        self.store = store
        self._metrics = metrics
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _timed(self, operation: str, result: Deferred[Any]) -> Deferred[Any]:
        started = self._clock.seconds()
        metrics = self._metrics
        name = self.store.name

        def done(outcome: Any) -> Any:
            metrics.store_done(name, operation, started, outcome)
            return outcome

        return result.addBoth(done)

    def consume(self, counters: Any, amount: int, now: float, once: Any = None) -> Deferred[Any]:
        if once is None:
            return self._timed("consume", self.store.consume(counters, amount, now))
        return self._timed("consume", self.store.consume(counters, amount, now, once))

    def release(self, counters: Any, amount: int, now: float, once: Any = None) -> Deferred[Any]:
        if once is None:
            return self._timed("release", self.store.release(counters, amount, now))
        return self._timed("release", self.store.release(counters, amount, now, once))

    def greylist(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self._timed("greylist", self.store.greylist(*args, **kwargs))

    def expire(self, now: float) -> Deferred[Any]:
        return self._timed("expire", self.store.expire(now))


# Adding up processes


def merge(snapshots: Iterable[dict[str, Any]], live: Callable[[int], bool]) -> dict[str, Any]:
    """
    Add up the snapshots of several processes: counters and histograms of
    every snapshot, gauges of the live processes only (by each family's
    C{merge}).

    @param live: whether the process with this PID still runs.
    @return: C{{family: {labels: value}}}; a histogram's value is
        C{[counts, sum]}.
    """
    merged: dict[str, dict[tuple[str, ...], Any]] = {name: {} for name in FAMILIES}
    for snapshot in snapshots:
        for name, labels, value in snapshot.get("counters", ()):
            if name in merged:
                values = merged[name]
                key = tuple(labels)
                values[key] = values.get(key, 0) + value
        for name, labels, counts, total in snapshot.get("histograms", ()):
            if name in merged and len(counts) == len(DURATION_BUCKETS) + 1:
                values = merged[name]
                key = tuple(labels)
                if key in values:
                    old_counts, old_total = values[key]
                    values[key] = [
                        [a + b for a, b in zip(old_counts, counts, strict=True)],
                        old_total + total,
                    ]
                else:
                    values[key] = [list(counts), total]
        if not live(snapshot.get("pid", 0)):
            continue
        for name, labels, value in snapshot.get("gauges", ()):
            if name in merged:
                values = merged[name]
                key = tuple(labels)
                how = FAMILIES[name].merge
                if key not in values:
                    values[key] = value
                elif how == "min":
                    values[key] = min(values[key], value)
                elif how == "max":
                    values[key] = max(values[key], value)
                else:
                    values[key] = values[key] + value
    return merged


def families(merged: dict[str, Any]) -> Iterator[Any]:
    """
    The metric families (C{prometheus_client}'s) of L{merge}d figures.
    """
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    bounds = [repr(float(bound)) for bound in DURATION_BUCKETS] + ["+Inf"]
    for name, family in FAMILIES.items():
        labels = list(family.labels)
        metric: Any
        if family.kind == "counter":
            metric = CounterMetricFamily(name, family.help, labels=labels)
            for key, value in sorted(merged[name].items()):
                metric.add_metric(list(key), value)
        elif family.kind == "gauge":
            metric = GaugeMetricFamily(name, family.help, labels=labels)
            for key, value in sorted(merged[name].items()):
                metric.add_metric(list(key), value)
        else:
            metric = HistogramMetricFamily(name, family.help, labels=labels)
            for key, (counts, total) in sorted(merged[name].items()):
                cumulative = 0
                buckets = []
                for bound, count in zip(bounds, counts, strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                metric.add_metric(list(key), buckets, total)
        yield metric


class Collector:
    """
    A C{prometheus_client} collector of everything pfxpold shows: its own
    figures, its workers', its reloads and its version.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        metrics = self.metrics
        snapshots = [metrics.snapshot()]
        own = snapshots[0]["pid"]
        live: Callable[[int], bool] = lambda pid: pid == own  # noqa: E731
        if metrics.workers is not None:
            snapshots.extend(metrics.workers.read())
            live = metrics.workers.live_with(own)
        yield from families(merge(snapshots, live))
        reloads = metrics.reloads
        if reloads is not None:
            family = CounterMetricFamily(
                "pfxpold_reloads", "Configuration reloads, by result.", labels=["result"]
            )
            family.add_metric(["succeeded"], getattr(reloads, "reloads_succeeded", 0) or 0)
            family.add_metric(["failed"], getattr(reloads, "reloads_failed", 0) or 0)
            yield family
            last = getattr(reloads, "last_reload_time", None)
            if last is not None:
                yield GaugeMetricFamily(
                    "pfxpold_last_reload_timestamp_seconds",
                    "When the configuration was last reloaded (POSIX time).",
                    value=last,
                )
        info = GaugeMetricFamily(
            "pfxpold_build_info",
            "pfxpold's version and Python's; always 1.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, "{}.{}.{}".format(*sys.version_info[:3])], 1)
        yield info


def registry(metrics: Metrics) -> Any:
    """
    A fresh C{prometheus_client} registry holding pfxpold's collector and
    the library's process, platform and garbage collector ones (for this
    process: the parent, with workers).
    """
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        PlatformCollector,
        ProcessCollector,
    )

    registry = CollectorRegistry()
    registry.register(Collector(metrics))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def exporter(metrics: Metrics, listen: str, reactor: Any) -> Service:
    """
    The service serving C{/metrics} (C{prometheus_client}'s twisted.web
    resource; it renders in the reactor's thread pool) on C{listen}.
    """
    from prometheus_client.twisted import MetricsResource
    from twisted.application import strports
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry(metrics)))
    site = Site(root)
    site.noisy = False
    service: Service = strports.service(listen, site, reactor=reactor)
    return service


# Workers


class WorkerSnapshots(Service):
    """
    In a parent with workers: the private directory where the workers write
    their snapshots, made when the daemon starts (as the user it runs as),
    named to the workers in C{$PFXPOLD_METRICS_DIR}, read at each scrape,
    and removed once the workers have ended.

    @param pool: the L{pfxpold.workers.WorkerPool}; its C{workers} tell
        which worker processes still run.
    """

    _log = Logger()

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.directory: Optional[str] = None

    def startService(self) -> None:
        super().startService()
        self.directory = tempfile.mkdtemp(prefix="pfxpold-metrics-")
        os.environ[WORKERS_DIRECTORY] = self.directory

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        os.environ.pop(WORKERS_DIRECTORY, None)
        # The pool stops alongside: remove the directory once its workers
        # wrote their last snapshot.
        ended = [worker.ended for worker in list(self.pool.workers.values())]

        def remove(result: Any) -> None:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None

        return DeferredList(ended).addCallback(remove)

    def live_with(self, own: int) -> Callable[[int], bool]:
        """
        @return: whether a PID is this process's (C{own}) or a running
            worker's.
        """
        pids = {worker.pid for worker in list(self.pool.workers.values())}
        pids.add(own)
        return pids.__contains__

    def read(self) -> list[dict[str, Any]]:
        """
        The workers' last snapshots; one being replaced is read whole
        either before or after (they are renamed into place).
        """
        directory = self.directory
        if directory is None:
            return []
        snapshots = []
        try:
            names = os.listdir(directory)
        except OSError:
            return []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    snapshots.append(json.load(f))
            except (OSError, ValueError):
                continue
        return snapshots


class SnapshotWriter(TimerService):
    """
    In a worker: writes this process's snapshot into the parent's directory
    every L{SNAPSHOT_INTERVAL} seconds and when the worker stops.
    """

    _log = Logger()

    def __init__(self, metrics: Metrics, directory: str, clock: Any) -> None:
        super().__init__(SNAPSHOT_INTERVAL, self.write)
        self.clock = clock
        self.metrics = metrics
        self.path = os.path.join(directory, f"worker-{os.getpid()}.json")
        self._failing = False

    def stopService(self) -> Any:
        stopped = super().stopService()
        self.write()
        return stopped

    def write(self) -> None:
        temporary = self.path + ".new"
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(self.metrics.snapshot(), f)
            os.replace(temporary, self.path)
        except OSError as e:
            if not self._failing:
                self._failing = True
                self._log.warn(
                    "cannot write metrics for the parent to {path}: {reason}",
                    path=self.path,
                    reason=e.strerror,
                )
            return
        self._failing = False
