"""
The in-memory state store: for tests and a single daemon that may forget
its counters when it restarts.

Every operation runs to completion inside one reactor turn, so it is atomic
without locks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from pfxpold.config import CheckOptions
from pfxpold.interfaces import IStateStore
from pfxpold.state import (
    EARLY,
    KNOWN,
    NEW,
    PASSED,
    WHITELISTED,
    Consumption,
    Counter,
    CounterValue,
    GreylistEntry,
    GreylistState,
    Once,
    Triplet,
    WhitelistEntry,
)

#: Seconds between two sweeps of expired entries, by default.
DEFAULT_EXPIRE_INTERVAL = 300.0


class ExpiringStore(MultiService):
    """
    A store whose expired entries are swept by a timer while the daemon
    runs (every C{expire_interval} seconds, on the configured reactor).
    """

    _log = Logger()

    def __init__(self, options: CheckOptions) -> None:
        super().__init__()
        self.name: str = options.name  # type: ignore[assignment]
        self.reactor = options.reactor
        interval = options.number("expire_interval", DEFAULT_EXPIRE_INTERVAL, positive=True)
        self.sweeper = TimerService(interval, self._sweep)
        self.sweeper.clock = options.reactor
        self.sweeper.setServiceParent(self)

    def _sweep(self) -> Deferred[Any]:
        d = self.expire(self.reactor.seconds())

        def swept(count: int) -> None:
            if count:
                self._log.debug(
                    "{store}: {count} expired entries removed", store=self.name, count=count
                )

        def failed(failure: Any) -> None:
            # The next sweep tries again; a sweep never stops the timer.
            self._log.failure("{store}: removing expired entries failed", failure, store=self.name)

        return d.addCallbacks(swept, failed)

    def expire(self, now: float) -> Deferred[int]:
        raise NotImplementedError()


@implementer(IStateStore)
class MemoryStore(ExpiringStore):
    """
    Counters and greylist triplets in dictionaries of this process.
    """

    def __init__(self, options: CheckOptions) -> None:
        super().__init__(options)
        #: key -> [count, expires_at]
        self.counts: dict[str, list[float]] = {}
        #: triplet -> [first_seen, passes, expires_at]
        self.triplets: dict[str, list[float]] = {}
        #: triplet -> the triplet in clear, for listing
        self.clear: dict[str, Triplet] = {}
        #: (kind, value) -> the run-time whitelist entry
        self.whitelist: dict[tuple[str, str], WhitelistEntry] = {}
        #: client -> [passes, expires_at]
        self.clients: dict[str, list[float]] = {}
        #: message key -> {mark: expires_at}, for the rules check
        self.marks_by_key: dict[str, dict[str, float]] = {}
        #: counted-once mark -> expires_at
        self.counted: dict[str, float] = {}

    def _count(self, key: str, now: float) -> int:
        entry = self.counts.get(key)
        if entry is None or entry[1] <= now:
            return 0
        return int(entry[0])

    def consume(
        self, counters: Sequence[Counter], amount: int, now: float, once: Optional[Once] = None
    ) -> Deferred[Consumption]:
        if once is None:
            return succeed(self._consume(counters, amount, now))
        if self.counted.get(once.key, 0.0) > now:
            return succeed(Consumption(True, (), repeated=True))
        result = self._consume(counters, amount, now)
        if result.allowed:
            self.counted[once.key] = once.expires_at
        return succeed(result)

    def _consume(self, counters: Sequence[Counter], amount: int, now: float) -> Consumption:
        if len(counters) == 1 and len(counters[0].read_keys) == 1:
            # One fixed window, the common case: without the general sums,
            # which cost more than the rest of the quota check.
            c = counters[0]
            entry = self.counts.get(c.key)
            if entry is None or entry[1] <= now:
                if amount > c.limit:
                    return Consumption(False, (0,))
                self.counts[c.key] = [amount, c.expires_at]
                return Consumption(True, (amount,))
            total = int(entry[0])
            if total + amount > c.limit:
                return Consumption(False, (total,))
            entry[0] += amount
            entry[1] = max(entry[1], c.expires_at)
            return Consumption(True, (total + amount,))
        totals = [sum(self._count(key, now) for key in c.read_keys) for c in counters]
        if any(total + amount > c.limit for total, c in zip(totals, counters, strict=True)):
            return Consumption(False, tuple(totals))
        for c in counters:
            entry = self.counts.get(c.key)
            if entry is None or entry[1] <= now:
                self.counts[c.key] = [amount, c.expires_at]
            else:
                entry[0] += amount
                entry[1] = max(entry[1], c.expires_at)
        return Consumption(True, tuple(total + amount for total in totals))

    def release(
        self, counters: Sequence[Counter], amount: int, now: float, once: Optional[Once] = None
    ) -> Deferred[None]:
        if once is not None and self.counted.pop(once.key, 0.0) <= now:
            # Not counted (or released already, here or by another process).
            return succeed(None)
        for c in counters:
            entry = self.counts.get(c.key)
            if entry is not None:
                entry[0] = max(0, entry[0] - amount)
        return succeed(None)

    def greylist(
        self,
        triplet: str,
        client: str,
        now: float,
        delay: float,
        retry_window: float,
        lifetime: float,
        whitelist_after: int,
        clear: Optional[Triplet] = None,
    ) -> Deferred[GreylistState]:
        if whitelist_after:
            seen = self.clients.get(client)
            if seen is not None and seen[1] > now and seen[0] >= whitelist_after:
                seen[1] = now + lifetime
                return succeed(GreylistState(WHITELISTED, 0.0))
        entry = self.triplets.get(triplet)
        if entry is None or entry[2] <= now or (entry[1] == 0 and now > entry[0] + retry_window):
            self.triplets[triplet] = [now, 0, now + retry_window]
            if clear is not None:
                self.clear[triplet] = clear
            else:
                self.clear.pop(triplet, None)
            return succeed(GreylistState(NEW, now))
        first_seen, passes, _ = entry
        if passes == 0 and now < first_seen + delay:
            return succeed(GreylistState(EARLY, first_seen))
        entry[1] = passes + 1
        entry[2] = now + lifetime
        if passes:
            return succeed(GreylistState(KNOWN, first_seen))
        if whitelist_after:
            seen = self.clients.get(client)
            if seen is None or seen[1] <= now:
                self.clients[client] = [1, now + lifetime]
            else:
                seen[0] += 1
                seen[1] = now + lifetime
        return succeed(GreylistState(PASSED, first_seen))

    def expire(self, now: float) -> Deferred[int]:
        removed = 0
        for table, position in ((self.counts, 1), (self.triplets, 2), (self.clients, 1)):
            expired = [key for key, entry in table.items() if entry[position] <= now]
            for key in expired:
                del table[key]
                if table is self.triplets:
                    self.clear.pop(key, None)
            removed += len(expired)
        expired = [key for key, expires in self.counted.items() if expires <= now]
        for key in expired:
            del self.counted[key]
        return succeed(removed + len(expired) + self._expire_marks(now))

    def counters(self, keys: Sequence[str], now: float) -> Deferred[dict[str, CounterValue]]:
        found = {}
        for key in keys:
            entry = self.counts.get(key)
            if entry is not None and entry[1] > now:
                found[key] = CounterValue(int(entry[0]), entry[1])
        return succeed(found)

    def reset(self, keys: Sequence[str]) -> Deferred[int]:
        removed = 0
        for key in keys:
            if self.counts.pop(key, None) is not None:
                removed += 1
        return succeed(removed)

    def reset_prefix(self, prefix: str) -> Deferred[int]:
        return self.reset([key for key in self.counts if key.startswith(prefix)])

    def greylist_entries(
        self,
        prefix: str,
        now: float,
        network: Optional[str] = None,
        sender: Optional[str] = None,
        recipient: Optional[str] = None,
    ) -> Deferred[list[GreylistEntry]]:
        found = []
        for key, (first_seen, passes, expires_at) in self.triplets.items():
            if not key.startswith(prefix) or expires_at <= now:
                continue
            entry = GreylistEntry(key, self.clear.get(key), first_seen, int(passes), expires_at)
            if matches(entry, network, sender, recipient):
                found.append(entry)
        found.sort(key=lambda entry: (entry.first_seen, entry.key))
        return succeed(found)

    def delete_greylist(self, keys: Sequence[str]) -> Deferred[int]:
        removed = 0
        for key in keys:
            self.clear.pop(key, None)
            if self.triplets.pop(key, None) is not None or self.clients.pop(key, None) is not None:
                removed += 1
        return succeed(removed)

    def whitelist_add(self, entry: WhitelistEntry) -> Deferred[None]:
        self.whitelist[(entry.kind, entry.value)] = entry
        return succeed(None)

    def whitelist_remove(self, kind: str, value: str) -> Deferred[bool]:
        return succeed(self.whitelist.pop((kind, value), None) is not None)

    def whitelist_list(self) -> Deferred[list[WhitelistEntry]]:
        return succeed([self.whitelist[key] for key in sorted(self.whitelist)])

    # Per-message marks of the rules check.

    def set_mark(self, key: str, mark: str, expires_at: float) -> Deferred[None]:
        entry = self.marks_by_key.setdefault(key, {})
        entry[mark] = max(entry.get(mark, 0.0), expires_at)
        return succeed(None)

    def marks(self, key: str, now: float) -> Deferred[frozenset[str]]:
        entry = self.marks_by_key.get(key, {})
        return succeed(frozenset(mark for mark, expires in entry.items() if expires > now))

    def _expire_marks(self, now: float) -> int:
        marks = self.marks_by_key
        removed = 0
        for key in list(marks):
            entry = marks[key]
            for mark in [mark for mark, expires in entry.items() if expires <= now]:
                del entry[mark]
                removed += 1
            if not entry:
                del marks[key]
        return removed


def matches(
    entry: GreylistEntry,
    network: Optional[str],
    sender: Optional[str],
    recipient: Optional[str],
) -> bool:
    """
    Whether C{entry}'s clear triplet has the parts given (L{None}: any).
    """
    if network is None and sender is None and recipient is None:
        return True
    clear = entry.triplet
    if clear is None:
        return False
    return (
        (network is None or clear.network == network)
        and (sender is None or clear.sender == sender)
        and (recipient is None or clear.recipient == recipient)
    )
