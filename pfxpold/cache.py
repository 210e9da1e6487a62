"""
The one cache and the one in-flight coalescer that every check uses (SQL,
LDAP, DNS lists, greylisting's run-time whitelist).

L{ExpiringCache} keeps each result for its own number of seconds (an SQL
result for its positive or negative TTL, a DNS answer for its record's
TTL), read from the reactor's clock (so tests drive it with a
L{twisted.internet.task.Clock}), and at its cap drops the least recently
used entry, never the whole cache: a full cache costs one miss, not a
cliff of them.

L{Memo} remembers the answers of a table that changes only when it is
replaced (an access map, until its file is read again): bounded the same
way, with no clock, and emptied when the table goes.

L{Coalescer} shares one lookup among the requests that ask the same
question while it runs: a burst of requests from one client (a cold cache
after a restart, many recipients at once) costs one lookup, not one each.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, Optional, TypeVar

from cachetools import LRUCache
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    """
    Recent results, each kept for the seconds given when it was put, at
    most C{max_entries} of them; past that, the least recently used goes
    (cachetools' L{LRUCache}).

    An entry past its time is dropped when it is next read; one that is
    never read again moves to the least recently used end, so it is the
    next to go when room is needed. A hit costs one dictionary lookup,
    one reordering and one reading of the clock: the checks' warm path.

    Values are never L{None}: L{get} answers L{None} for a miss.
    """

    def __init__(self, clock: IReactorTime, max_entries: int) -> None:
        """
        @param clock: the reactor whose C{seconds()} times the entries.
        @param max_entries: how many entries are kept; C{0} keeps none.
        """
        self.max_entries = max_entries
        self._seconds = clock.seconds
        # (value, expires): get_until hands the entry itself out.
        self._entries: LRUCache[K, tuple[V, float]] = LRUCache(max(1, max_entries))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> Optional[V]:
        """
        @return: the value for C{key} while its time lasts, else L{None}.
        """
        entry = self.get_until(key)
        return None if entry is None else entry[0]

    def get_until(self, key: K) -> Optional[tuple[V, float]]:
        """
        Like L{get}, with the time (on the clock's C{seconds()}) the value
        lasts until: for a result derived from several entries, which
        holds only as long as the first of them to expire.

        @return: C{(value, expires)} while its time lasts, else L{None}.
        """
        try:
            entry = self._entries[key]
        except KeyError:
            return None
        if entry[1] <= self._seconds():
            del self._entries[key]
            return None
        return entry

    def put(self, key: K, value: V, ttl: float) -> None:
        """
        Keep C{value} for C{key} for C{ttl} seconds; nothing is kept when
        C{ttl} is 0 or less (or the cache holds no entries at all).
        """
        if ttl <= 0 or self.max_entries <= 0:
            return
        self._entries[key] = (value, self._seconds() + ttl)

    def clear(self) -> None:
        """
        Forget every entry (what they were derived from no longer holds).
        """
        self._entries.clear()


class Memo(Generic[K, V]):
    """
    The answers of a lookup in a table that does not change while it is
    in force, at most C{max_entries} of them; past that, the least recently
    used goes (the same L{LRUCache} as L{ExpiringCache}, without a clock:
    an answer holds until the table is replaced).

    The table is named on every call, and the memo empties itself when it
    is another one than the answers came from: a reload can never leave a
    stale answer behind, whoever swapped the table in.

    Values are never L{None}: L{get} answers L{None} for a miss.
    """

    def __init__(self, max_entries: int) -> None:
        """
        @param max_entries: how many answers are kept; C{0} keeps none.
        """
        self.max_entries = max_entries
        self._entries: LRUCache[K, V] = LRUCache(max(1, max_entries))
        self._table: object = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, table: object, key: K) -> Optional[V]:
        """
        @param table: the table in force now.
        @return: the answer remembered for C{key} from C{table}, else
            L{None}.
        """
        if table is not self._table:
            self._entries.clear()
            self._table = table
            return None
        try:
            return self._entries[key]
        except KeyError:
            return None

    def put(self, table: object, key: K, value: V) -> None:
        """
        Remember C{value} as C{table}'s answer for C{key}.
        """
        if self.max_entries <= 0:
            return
        if table is not self._table:
            self._entries.clear()
            self._table = table
        self._entries[key] = value


class _Shared(Generic[V]):
    """
    One lookup in flight and the Deferreds of the requests waiting for it.
    """

    __slots__ = ("cancel_abandoned", "lookup", "waiters")

    def __init__(self, cancel_abandoned: bool) -> None:
        self.cancel_abandoned = cancel_abandoned
        self.lookup: Optional[Deferred[V]] = None
        self.waiters: list[Deferred[V]] = []

    def wait(self) -> Deferred[V]:
        waiter: Deferred[V] = Deferred(self._give_up)
        self.waiters.append(waiter)
        return waiter

    def _give_up(self, waiter: Deferred[V]) -> None:
        self.waiters.remove(waiter)
        lookup = self.lookup
        if self.cancel_abandoned and not self.waiters and lookup is not None and not lookup.called:
            lookup.cancel()

    def deliver(self, outcome: Any) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)


class Coalescer(Generic[K, V]):
    """
    Runs one lookup per key at a time: requests that ask for a key whose
    lookup is in flight wait for that lookup's result (or failure).

    Each request gets a Deferred of its own, so cancelling one (the
    chain's timeout) never cancels the lookup the others wait for. When
    every request waiting for a lookup has given up, the lookup itself is
    cancelled if C{cancel_abandoned} (an SQL query is interrupted, so
    that it frees its pool thread); otherwise it runs on, and requests
    that come meanwhile still share it (a DNS query ends by its own
    timeout, and its answer is worth caching).
    """

    def __init__(self, cancel_abandoned: bool = True) -> None:
        self.cancel_abandoned = cancel_abandoned
        self._pending: dict[K, _Shared[V]] = {}

    def __len__(self) -> int:
        """
        @return: the number of lookups in flight.
        """
        return len(self._pending)

    def run(self, key: K, start: Callable[[], Deferred[V]]) -> Deferred[V]:
        """
        @param start: starts the lookup for C{key}; called only when none
            is in flight. Its result goes to every waiting request, and
            whatever it raises fails them.
        @return: a Deferred of the lookup's result for this one request.
        """
        shared = self._pending.get(key)
        if shared is not None:
            return shared.wait()
        shared = _Shared(self.cancel_abandoned)
        waiter = shared.wait()
        # Registered before the lookup starts, which may answer at once.
        self._pending[key] = shared
        lookup = shared.lookup = maybeDeferred(start)
        lookup.addBoth(self._deliver, key, shared)
        return waiter

    def _deliver(self, outcome: Any, key: K, shared: _Shared[V]) -> None:
        if self._pending.get(key) is shared:
            del self._pending[key]
        shared.deliver(outcome)
