"""
What a stateful check does while its shared store is down: degraded mode.

A C{quota} or C{greylist} check with C{on_store_down = "local"} (greylist
also C{"pass"}) does not let a down store decide its answers. The first
store call that fails with a L{pfxpold.state.StoreError} (unreachable,
timed out, failed) puts the check in degraded mode: from then on no request
waits for the store; the check answers from a private in-process
L{MemoryStore} (or passes), and every C{probe_interval} seconds (on the
check's clock) one attempt is made to reach the store again.

A quota check journals every count it makes locally (L{Pending}). When the
store answers again, the journal is added to the shared counters before
the check leaves degraded mode (the reconciliation): mail sent during the
outage counts toward its windows. Each journalled count carries a
counted-once mark (the message's own, or one made for it), written in the
same atomic store operation as its addition, so a reconciliation that
fails half-way, or times out after the store did the work, is simply run
again: what was added already is found by its mark and not added twice.
A message counted in the store before the outage and counted again
locally is found the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    TimeoutError,
    gatherResults,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfxpold.config import CheckOptions
from pfxpold.escape import escape
from pfxpold.state import DEFAULT_STORE, Consumption, Counter, Once, StoreError
from pfxpold.state.memory import MemoryStore

#: The default of C{on_store_down}: the store's failure fails the check, and
#: its C{on_error} applies (the behaviour before degraded mode existed).
ON_ERROR = "on_error"
#: C{on_store_down}: enforce (or greylist) on local state.
LOCAL = "local"
#: C{on_store_down} of a greylist check: let mail through unchecked.
PASS = "pass"

#: C{local_share}: each process enforces the whole limit on its own.
FULL = "full"
#: C{local_share}: each process enforces the limit divided by C{hosts}.
DIVIDED = "divided"
SHARES = (FULL, DIVIDED)

#: Seconds between two attempts to reach a down store, by default.
DEFAULT_PROBE_INTERVAL = 5.0
#: Journalled counts sent to the store at once while reconciling.
RECONCILE_BATCH = 200
#: The limit of a reconciled addition: it is always made (the mail was
#: accepted already), whatever the shared counter holds.
UNLIMITED = 2**52
#: Seconds a reconciled mark is kept at least, so that a retried
#: reconciliation still finds it.
MARK_GRACE = 3600.0


def store_down(failure: Failure) -> bool:
    """
    Whether C{failure} (of a store call) says the store cannot be used
    now, rather than that the check itself went wrong.
    """
    return failure.check(StoreError, TimeoutError) is not None


@dataclass(frozen=True)
class OutageSettings:
    """
    A check's C{on_store_down} settings.

    @ivar mode: L{ON_ERROR}, L{LOCAL} or L{PASS}.
    @ivar share: L{FULL} or L{DIVIDED} (quota only).
    @ivar hosts: what a divided limit is divided by.
    @ivar probe_interval: seconds between two attempts to reach the store
        while degraded.
    """

    mode: str = ON_ERROR
    share: str = FULL
    hosts: int = 1
    probe_interval: float = DEFAULT_PROBE_INTERVAL

    def local_limit(self, limit: int) -> int:
        """
        The share of C{limit} one process enforces while degraded: all of
        it, or C{limit // hosts} (rounded down, so that the hosts together
        never pass the limit).
        """
        if self.share == DIVIDED:
            return limit // self.hosts
        return limit


def read_outage_settings(options: CheckOptions, modes: tuple[str, ...]) -> OutageSettings:
    """
    Read C{on_store_down} (one of C{modes}), C{probe_interval} and, when
    C{modes} has L{LOCAL} for a quota, C{local_share} and C{hosts}.

    @param modes: the modes the check type offers; L{ON_ERROR} first.
    @raise pfxpold.config.ConfigError: naming the check and the key.
    """
    mode = options.choice("on_store_down", modes, ON_ERROR)
    probe_interval = options.number("probe_interval", DEFAULT_PROBE_INTERVAL, positive=True)
    if mode == ON_ERROR and "probe_interval" in options:
        raise options.error("probe_interval", 'is for on_store_down = "local" or "pass"')
    quota = PASS not in modes
    share, hosts = FULL, 1
    if quota:
        share = options.choice("local_share", SHARES, FULL)
        hosts = options.integer("hosts", 1, minimum=1)
        if mode != LOCAL:
            for key in ("local_share", "hosts"):
                if key in options:
                    raise options.error(key, 'is for on_store_down = "local"')
        if share == DIVIDED and "hosts" not in options:
            raise options.error(
                "hosts", 'is required with local_share = "divided" (the number of MX hosts)'
            )
        if share == FULL and "hosts" in options:
            raise options.error("hosts", 'is for local_share = "divided"')
    return OutageSettings(mode, share, hosts, probe_interval)


@dataclass(frozen=True)
class Pending:
    """
    One count made locally, to be added to the shared store.

    @ivar counters: the counters it was added to (their keys and expiries
        are the shared ones; their limits do not matter).
    @ivar amount: what was added.
    @ivar once: its counted-once mark: the message's, or one made for it.
    """

    counters: tuple[Counter, ...]
    amount: int
    once: Once

    def reconciling(self, now: float) -> Optional[tuple[tuple[Counter, ...], Once]]:
        """
        The counters to add it to at C{now} (those whose window is not
        over), always made, and its mark, kept long enough for a retry to
        find it; L{None} when nothing is left to do.
        """
        live = tuple(
            Counter(c.key, (c.key,), UNLIMITED, c.expires_at)
            for c in self.counters
            if c.expires_at > now
        )
        if not live and self.once.expires_at <= now:
            return None
        expires = max([self.once.expires_at, now + MARK_GRACE] + [c.expires_at for c in live])
        return live, Once(self.once.key, expires, self.once.instance)


@dataclass(frozen=True)
class _Binding:
    """
    A check object using an L{Outage}: its settings, store and clock.
    """

    settings: OutageSettings
    store: Callable[[], Any]
    now: Callable[[], float]


class Outage:
    """
    One check's degraded mode: whether it is on, the local store, the
    journal of local counts, and the probe that ends it.

    It outlives the check object: a reload that replaces the check (with
    the same name, store and C{on_store_down}) hands it to the successor
    (see L{pfxpold.config.CheckOptions.shared}), so a degraded check stays
    degraded and keeps its local counts. The running check objects
    L{attach} to it; the last one attached is the one whose store is
    tried. When the last one detaches, what was not reconciled is logged
    as dropped.

    @ivar active: whether the check is degraded now.
    @ivar since: when it became degraded.
    @ivar local: the private store answered from while degraded (with
        L{LOCAL}), else L{None}.
    @ivar journal: local counts not yet in the shared store, by mark key.
    @ivar reconciled: the amount reconciled since the check was built.
    @ivar observer: who is told what was reconciled
        (L{pfxpold.metrics.Metrics}), or L{None}; whether the check is
        degraded is read from L{active} when the metrics are scraped.
    """

    _log = Logger()

    def __init__(
        self,
        kind: str,
        check: str,
        settings: OutageSettings,
        reactor: Any,
        store: Callable[[], Any],
        now: Callable[[], float],
        unit: str = "",
    ) -> None:
        """
        @param kind: the check type, for the log (C{"quota"}).
        @param check: the check's name.
        @param store: returns the shared store (the check's, as it is now:
            metrics may wrap it).
        @param now: the check's time (its windows' clock).
        @param unit: what a count counts, for the log.
        """
        self.kind = kind
        self.check = check
        self.reactor = reactor
        self._first = _Binding(settings, store, now)
        self._owners: list[_Binding] = []
        self.unit = unit
        self.active = False
        self.since = 0.0
        self.local: Optional[MemoryStore] = None
        if settings.mode == LOCAL:
            self.local = MemoryStore(CheckOptions({}, name=f"{check} (local)", reactor=reactor))
        self.journal: dict[str, Pending] = {}
        self.reconciled = 0
        self.observer: Any = None
        self._probe_call: Any = None
        self._probing = False
        self._stopped = False
        self._probe_key = ""
        #: Mark keys of the counts on their way to the store.
        self._sending: set[str] = set()
        # What this outage reconciled so far: amount, counts, already there.
        self._tally = [0, 0, 0]

    # Who uses it

    def _owner(self) -> _Binding:
        return self._owners[-1] if self._owners else self._first

    @property
    def settings(self) -> OutageSettings:
        """
        The settings of the check object that uses it now.
        """
        return self._owner().settings

    def _store(self) -> Any:
        return self._owner().store()

    def _now(self) -> float:
        return self._owner().now()

    def attach(
        self, settings: OutageSettings, store: Callable[[], Any], now: Callable[[], float]
    ) -> object:
        """
        A check object using this outage started: from now on its C{store}
        is the one tried (while degraded, at once).

        @return: what to L{detach} it with.
        """
        binding = _Binding(settings, store, now)
        self._owners.append(binding)
        # The fallback once none is attached: the latest, not the first,
        # so that replaced check objects are not kept alive.
        self._first = binding
        self._stopped = False
        if self.local is not None and not self.local.running:
            self.local.startService()
        if self.active:
            self._schedule()
        return binding

    def detach(self, binding: object) -> None:
        """
        A check object using this outage stopped. Once none is left, the
        probe stops, and what was not reconciled is logged as dropped.
        """
        self._owners = [owner for owner in self._owners if owner is not binding]
        if self._owners:
            return
        self._stopped = True
        if self._probe_call is not None:
            if self._probe_call.active():
                self._probe_call.cancel()
            self._probe_call = None
        if self.local is not None and self.local.running:
            self.local.stopService()
        if self.journal:
            amount = sum(pending.amount for pending in self.journal.values())
            self._log.warn(
                "{kind} {check}: stopped while degraded: {amount} {unit} counted locally"
                " ({count} counts) are dropped, never added to store {store}",
                kind=self.kind,
                check=self.check,
                amount=amount,
                unit=self.unit,
                count=len(self.journal),
                store=getattr(self._store(), "name", "?"),
            )

    # Entering

    def failed(self, failure: Failure, key: Optional[str] = None) -> bool:
        """
        A store call failed with C{failure}: enter degraded mode when it
        says the store is down and the check does not simply fail.

        @param key: a counter key (a string or nothing) in the slot of the
            operation that failed, read by the probes while nothing is left
            to reconcile: on a Redis Cluster with one master down, the
            probe asks that master.
        @return: whether the check answers without the store (degraded).
        """
        if self.settings.mode == ON_ERROR or not store_down(failure):
            return False
        self.enter(failure, key)
        return True

    def enter(self, failure: Failure, key: Optional[str] = None) -> None:
        """
        Become degraded (if not already) because of C{failure}, and try the
        store again after C{probe_interval}.
        """
        if self.active:
            return
        self._probe_key = key or f"probe:{{{self.check}}}"
        self.active = True
        self.since = self.reactor.seconds()
        self._tally = [0, 0, 0]
        doing = {
            LOCAL: (
                "enforcing on local counters"
                if self.kind == "quota"
                else "greylisting in this process"
            ),
            PASS: "passing mail unchecked",
        }[self.settings.mode]
        share = ""
        if self.kind == "quota" and self.settings.share == DIVIDED:
            share = f" (each limit divided by {self.settings.hosts} hosts)"
        self._log.warn(
            "{kind} {check}: store {store} is down ({reason}); degraded mode:"
            " {doing}{share}, trying the store every {interval}s",
            kind=self.kind,
            check=self.check,
            store=getattr(self._store(), "name", "?"),
            reason=escape(str(failure.value) or failure.type.__name__),
            doing=doing,
            share=share,
            interval=self.settings.probe_interval,
            degraded=True,
        )
        self._schedule()

    # While degraded

    def record(self, pending: Pending) -> None:
        """
        Journal a local count.
        """
        self.journal[pending.once.key] = pending

    def forget(self, once: Once) -> bool:
        """
        A local count was taken back (its message refused): drop it from
        the journal.

        @return: whether it was only here (else it is in the shared store,
            or on its way there: the caller takes it back there too).
        """
        return self.journal.pop(once.key, None) is not None and once.key not in self._sending

    # Leaving

    def _schedule(self) -> None:
        if self._probe_call is None and not self._stopped:
            self._probe_call = self.reactor.callLater(self.settings.probe_interval, self.probe)

    def probe(self) -> Deferred[bool]:
        """
        Try the store: reconcile the journal (or, with nothing to add, read
        from it); leave degraded mode when that worked, else try again
        after C{probe_interval}.

        @return: a Deferred that fires with whether the check left
            degraded mode (it never fails).
        """
        self._probe_call = None
        if self._probing or not self.active:
            return Deferred.fromCoroutine(self._nothing())
        self._probing = True
        return Deferred.fromCoroutine(self._probe())

    async def _nothing(self) -> bool:
        return False

    def _bounded(self, d: Deferred[Any]) -> Deferred[Any]:
        # A store that hangs never keeps the check degraded past its next
        # probe: what the store did meanwhile is found by the marks.
        return d.addTimeout(self.settings.probe_interval, self.reactor)

    async def _probe(self) -> bool:
        store = self._store()
        started = self.reactor.seconds()
        try:
            if not self.journal:
                await self._bounded(store.counters([self._probe_key], self._now()))
            while self.journal:
                await self._reconcile(store)
        except Exception as e:
            self._probing = False
            if not isinstance(e, (StoreError, TimeoutError, CancelledError)):
                self._log.failure(
                    "{kind} {check}: trying the store failed",
                    Failure(e),
                    kind=self.kind,
                    check=self.check,
                )
            elif self._tally[1]:
                self._log.warn(
                    "{kind} {check}: reconciling stopped ({reason}); {left} local counts"
                    " left, trying again in {interval}s",
                    kind=self.kind,
                    check=self.check,
                    reason=escape(str(e) or type(e).__name__),
                    left=len(self.journal),
                    interval=self.settings.probe_interval,
                )
            self._schedule()
            return False
        self._probing = False
        self._leave(self.reactor.seconds() - started)
        return True

    async def _reconcile(self, store: Any) -> None:
        """
        Add one batch of the journal to the shared store; each count leaves
        the journal when the store took it.
        """
        now = self._now()
        batch = list(islice(self.journal.values(), RECONCILE_BATCH))
        adding = []
        for pending in batch:
            work = pending.reconciling(now)
            if work is None:
                self.journal.pop(pending.once.key, None)
                continue
            counters, once = work
            self._sending.add(once.key)
            d = store.consume(counters, pending.amount, now, once)
            d.addBoth(self._sent, once.key)
            adding.append(d.addCallback(self._added, pending))
        if adding:
            await self._bounded(gatherResults(adding, consumeErrors=True)).addErrback(_first_error)

    def _sent(self, result: Any, key: str) -> Any:
        self._sending.discard(key)
        return result

    def _added(self, result: Consumption, pending: Pending) -> None:
        if self.journal.pop(pending.once.key, None) is None:
            # Taken back (its message refused) while it was on its way:
            # the taking back, sent after it, undoes it in the store.
            return
        self._tally[1] += 1
        if result.repeated:
            self._tally[2] += pending.amount
            return
        self._tally[0] += pending.amount
        self.reconciled += pending.amount
        if self.observer is not None:
            self.observer.check_reconciled(self.check, pending.amount)

    def _leave(self, took: float) -> None:
        if not self.active:
            return
        self.active = False
        amount, counts, already = self._tally
        reconciled = ""
        if self.kind == "quota":
            reconciled = (
                "; reconciled {amount} {unit} from {counts} local counts ({already} counted"
                " there already) in {took}s"
            )
        self._log.info(
            "{kind} {check}: store {store} answers again after {seconds}s; degraded mode left"
            + reconciled,
            kind=self.kind,
            check=self.check,
            store=getattr(self._store(), "name", "?"),
            seconds=round(self.reactor.seconds() - self.since, 3),
            amount=amount,
            unit=self.unit or "units",
            counts=counts,
            already=already,
            took=round(took, 3),
            degraded=False,
        )


def _first_error(failure: Failure) -> Failure:
    # gatherResults wraps the first failure: the caller wants the store's.
    if failure.check(FirstError):
        return failure.value.subFailure  # type: ignore[no-any-return]
    return failure


class DegradableCheck(MultiService):
    """
    A check service with a degraded mode (C{on_store_down}): while it runs,
    it is the check object whose store the mode tries (see
    L{Outage.attach}).

    @ivar outage: the degraded mode, or L{None} with C{on_store_down =
        "on_error"}.
    @ivar outage_settings: this check object's C{on_store_down} settings.
    """

    outage: Optional[Outage] = None
    _outage_binding: object = None

    def read_outage(self, options: CheckOptions, kind: str, modes: tuple[str, ...]) -> None:
        """
        Read the check's C{on_store_down} settings (one of C{modes}) and
        find its degraded mode: the one a predecessor with the same name,
        store and mode had (a reload), or a new one. Call it once its
        C{name}, C{reactor}, C{store} (and a quota's C{unit}) are set.
        """
        self.outage_settings = settings = read_outage_settings(options, modes)
        if settings.mode == ON_ERROR:
            return
        name = self.name
        assert name is not None
        store_name = options.string("store", DEFAULT_STORE)
        self.outage = options.shared(
            ("outage", kind, name, store_name, settings.mode),
            lambda: Outage(
                kind,
                name,
                settings,
                options.reactor,
                lambda: self.store,  # type: ignore[attr-defined]
                self.now,  # type: ignore[attr-defined]
                getattr(self, "unit", ""),
            ),
        )

    def startService(self) -> None:
        super().startService()
        if self.outage is not None:
            self._outage_binding = self.outage.attach(
                self.outage_settings,
                lambda: self.store,  # type: ignore[attr-defined]
                self.now,  # type: ignore[attr-defined]
            )

    def stopService(self) -> Any:
        if self.outage is not None and self._outage_binding is not None:
            self.outage.detach(self._outage_binding)
            self._outage_binding = None
        return super().stopService()
