"""
The in-memory state store: for tests and a single daemon that may forget
its counters when it restarts.

Every operation runs to completion inside one reactor turn, so it is atomic
without locks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    GreylistState,
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
        self.counters: dict[str, list[float]] = {}
        #: triplet -> [first_seen, passes, expires_at]
        self.triplets: dict[str, list[float]] = {}
        #: client -> [passes, expires_at]
        self.clients: dict[str, list[float]] = {}

    def _count(self, key: str, now: float) -> int:
        entry = self.counters.get(key)
        if entry is None or entry[1] <= now:
            return 0
        return int(entry[0])

    def consume(
        self, counters: Sequence[Counter], amount: int, now: float
    ) -> Deferred[Consumption]:
        totals = [sum(self._count(key, now) for key in c.read_keys) for c in counters]
        if any(total + amount > c.limit for total, c in zip(totals, counters, strict=True)):
            return succeed(Consumption(False, tuple(totals)))
        for c in counters:
            entry = self.counters.get(c.key)
            if entry is None or entry[1] <= now:
                self.counters[c.key] = [amount, c.expires_at]
            else:
                entry[0] += amount
                entry[1] = max(entry[1], c.expires_at)
        return succeed(Consumption(True, tuple(total + amount for total in totals)))

    def release(self, counters: Sequence[Counter], amount: int, now: float) -> Deferred[None]:
        for c in counters:
            entry = self.counters.get(c.key)
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
    ) -> Deferred[GreylistState]:
        if whitelist_after:
            seen = self.clients.get(client)
            if seen is not None and seen[1] > now and seen[0] >= whitelist_after:
                seen[1] = now + lifetime
                return succeed(GreylistState(WHITELISTED, 0.0))
        entry = self.triplets.get(triplet)
        if entry is None or entry[2] <= now or (entry[1] == 0 and now > entry[0] + retry_window):
            self.triplets[triplet] = [now, 0, now + retry_window]
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
        for table, position in ((self.counters, 1), (self.triplets, 2), (self.clients, 1)):
            expired = [key for key, entry in table.items() if entry[position] <= now]
            for key in expired:
                del table[key]
            removed += len(expired)
        return succeed(removed)
