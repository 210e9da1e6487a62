"""
Tests for L{pfxpold.cache}: the checks' one cache (LRU at its cap, each
entry's time on a L{Clock}) and the one in-flight coalescer.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.cache import Coalescer, ExpiringCache, Memo


class ExpiringCacheTests(SynchronousTestCase):
    """
    L{ExpiringCache} keeps each entry for its own time and, when full,
    drops the least recently used one.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def test_lru_at_cap(self) -> None:
        """Past max_entries, the least recently used entry goes, not the oldest put."""
        cache: ExpiringCache[str, int] = ExpiringCache(self.clock, 2)
        cache.put("a", 1, 60)
        cache.put("b", 2, 60)
        self.assertEqual(cache.get("a"), 1)
        cache.put("c", 3, 60)
        self.assertEqual(len(cache), 2)
        self.assertIsNone(cache.get("b"))
        self.assertEqual((cache.get("a"), cache.get("c")), (1, 3))

    def test_no_cliff(self) -> None:
        """A full cache loses one entry per new one, never all of them."""
        cache: ExpiringCache[int, int] = ExpiringCache(self.clock, 100)
        for number in range(100):
            cache.put(number, number, 60)
        cache.put(100, 100, 60)
        self.assertEqual(len(cache), 100)
        self.assertIsNone(cache.get(0))
        self.assertEqual([cache.get(number) for number in range(1, 101)], list(range(1, 101)))

    def test_ttl_on_the_clock(self) -> None:
        """An entry is there until its own TTL has passed on the reactor's clock."""
        cache: ExpiringCache[str, str] = ExpiringCache(self.clock, 10)
        cache.put("short", "s", 10)
        cache.put("long", "l", 60)
        self.clock.advance(9.9)
        self.assertEqual((cache.get("short"), cache.get("long")), ("s", "l"))
        self.clock.advance(0.1)
        self.assertIsNone(cache.get("short"))
        self.assertEqual(cache.get("long"), "l")
        self.clock.advance(50)
        self.assertIsNone(cache.get("long"))

    def test_put_again_renews(self) -> None:
        """Putting a key again replaces its value and its time."""
        cache: ExpiringCache[str, str] = ExpiringCache(self.clock, 10)
        cache.put("key", "old", 10)
        self.clock.advance(5)
        cache.put("key", "new", 10)
        self.clock.advance(9)
        self.assertEqual(cache.get("key"), "new")
        self.assertEqual(len(cache), 1)

    def test_expired_entry_dropped_when_read(self) -> None:
        """An entry read past its time is dropped, making room."""
        cache: ExpiringCache[str, int] = ExpiringCache(self.clock, 2)
        cache.put("brief", 1, 1)
        self.clock.advance(1)
        self.assertIsNone(cache.get("brief"))
        self.assertEqual(len(cache), 0)

    def test_unread_expired_entries_go_first(self) -> None:
        """
        Entries nobody reads any more (expired ones) go before those that
        are read when room is needed.
        """
        cache: ExpiringCache[str, int] = ExpiringCache(self.clock, 3)
        cache.put("read", 1, 60)
        cache.put("brief", 2, 1)
        cache.put("other", 3, 60)
        self.clock.advance(2)
        self.assertEqual(cache.get("read"), 1)
        cache.put("new", 4, 60)
        cache.put("newer", 5, 60)
        self.assertEqual(len(cache), 3)
        self.assertEqual([cache.get(key) for key in ("read", "new", "newer")], [1, 4, 5])

    def test_nothing_kept(self) -> None:
        """A TTL of 0 (or less), or a cache of 0 entries, keeps nothing."""
        cache: ExpiringCache[str, int] = ExpiringCache(self.clock, 10)
        cache.put("zero", 1, 0)
        cache.put("negative", 1, -5)
        self.assertEqual(len(cache), 0)
        empty: ExpiringCache[str, int] = ExpiringCache(self.clock, 0)
        empty.put("key", 1, 60)
        self.assertIsNone(empty.get("key"))

    def test_get_until(self) -> None:
        """get_until answers the value with the time it lasts until, and misses after it."""
        cache: ExpiringCache[str, str] = ExpiringCache(self.clock, 10)
        self.clock.advance(100)
        cache.put("key", "value", 30)
        self.assertIsNone(cache.get_until("other"))
        self.assertEqual(cache.get_until("key"), ("value", 130.0))
        self.clock.advance(30)
        self.assertIsNone(cache.get_until("key"))
        self.assertEqual(len(cache), 0)

    def test_clear(self) -> None:
        """clear forgets every entry."""
        cache: ExpiringCache[str, int] = ExpiringCache(self.clock, 10)
        cache.put("a", 1, 60)
        cache.put("b", 2, 60)
        cache.clear()
        self.assertEqual(len(cache), 0)
        self.assertIsNone(cache.get("a"))


class MemoTests(SynchronousTestCase):
    """
    L{Memo} remembers a table's answers, at most C{max_entries} of them,
    until the table is replaced.
    """

    def test_remembers_for_the_table(self) -> None:
        """An answer put for a table is got back for that table."""
        table = object()
        memo: Memo[str, str] = Memo(10)
        self.assertIsNone(memo.get(table, "key"))
        memo.put(table, "key", "answer")
        self.assertEqual(memo.get(table, "key"), "answer")
        self.assertIsNone(memo.get(table, "other"))

    def test_another_table_empties_it(self) -> None:
        """Asking with another table (a reload) forgets every answer of the old one."""
        old, new = object(), object()
        memo: Memo[str, str] = Memo(10)
        memo.put(old, "a", "1")
        memo.put(old, "b", "2")
        self.assertIsNone(memo.get(new, "a"))
        self.assertEqual(len(memo), 0)
        self.assertIsNone(memo.get(old, "b"))
        memo.put(new, "a", "3")
        memo.put(old, "a", "4")
        self.assertEqual(len(memo), 1)
        self.assertIsNone(memo.get(new, "a"))

    def test_bounded_lru(self) -> None:
        """Past max_entries the least recently used answer goes, one at a time."""
        table = object()
        memo: Memo[int, int] = Memo(3)
        for number in range(3):
            memo.put(table, number, number)
        self.assertEqual(memo.get(table, 0), 0)
        memo.put(table, 3, 3)
        self.assertEqual(len(memo), 3)
        self.assertIsNone(memo.get(table, 1))
        self.assertEqual([memo.get(table, key) for key in (0, 2, 3)], [0, 2, 3])

    def test_nothing_kept(self) -> None:
        """A memo of 0 entries keeps nothing."""
        table = object()
        memo: Memo[str, int] = Memo(0)
        memo.put(table, "key", 1)
        self.assertIsNone(memo.get(table, "key"))


class CoalescerTests(SynchronousTestCase):
    """
    L{Coalescer} runs one lookup per key at a time and gives its result to
    every request that waits for it.
    """

    def setUp(self) -> None:
        self.started: list[Deferred[str]] = []
        self.cancelled: list[Deferred[str]] = []

    def start(self) -> Deferred[str]:
        lookup: Deferred[str] = Deferred(self.cancelled.append)
        self.started.append(lookup)
        return lookup

    def test_shared(self) -> None:
        """Requests for a key in flight share its lookup; other keys get their own."""
        coalescer: Coalescer[str, str] = Coalescer()
        same = [coalescer.run("a", self.start) for _ in range(3)]
        other = coalescer.run("b", self.start)
        self.assertEqual(len(self.started), 2)
        self.assertEqual(len(coalescer), 2)
        self.started[0].callback("answer a")
        self.started[1].callback("answer b")
        self.assertEqual([self.successResultOf(each) for each in same], ["answer a"] * 3)
        self.assertEqual(self.successResultOf(other), "answer b")
        self.assertEqual(len(coalescer), 0)

    def test_next_request_after_the_answer_asks_again(self) -> None:
        """Once a lookup answered, the next request for its key starts a new one."""
        coalescer: Coalescer[str, str] = Coalescer()
        coalescer.run("a", self.start)
        self.started[0].callback("first")
        later = coalescer.run("a", self.start)
        self.assertEqual(len(self.started), 2)
        self.started[1].callback("second")
        self.assertEqual(self.successResultOf(later), "second")

    def test_failure_to_every_waiter(self) -> None:
        """A lookup's failure fails every waiting request, and is not kept."""
        coalescer: Coalescer[str, str] = Coalescer()
        waiting = [coalescer.run("a", self.start) for _ in range(2)]
        self.started[0].errback(RuntimeError("down"))
        for each in waiting:
            self.failureResultOf(each, RuntimeError)
        self.assertEqual(len(coalescer), 0)

    def test_start_raises(self) -> None:
        """A lookup that cannot even start fails its request and leaves nothing in flight."""
        coalescer: Coalescer[str, str] = Coalescer()

        def broken() -> Deferred[str]:
            raise ValueError("no pool")

        self.failureResultOf(coalescer.run("a", broken), ValueError)
        self.assertEqual(len(coalescer), 0)

    def test_answer_at_once(self) -> None:
        """A lookup that answers synchronously answers its request and leaves nothing in flight."""
        coalescer: Coalescer[str, str] = Coalescer()
        self.assertEqual(self.successResultOf(coalescer.run("a", lambda: succeed("now"))), "now")
        self.assertEqual(len(coalescer), 0)

    def test_one_waiter_cancelling(self) -> None:
        """One request giving up does not cancel the lookup the others wait for."""
        coalescer: Coalescer[str, str] = Coalescer(cancel_abandoned=True)
        first, second = (coalescer.run("a", self.start) for _ in range(2))
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(self.cancelled, [])
        self.started[0].callback("answer")
        self.assertEqual(self.successResultOf(second), "answer")

    def test_every_waiter_cancelling(self) -> None:
        """
        With cancel_abandoned, the lookup is cancelled once every request
        gave up, and the next request starts a new one.
        """
        coalescer: Coalescer[str, str] = Coalescer(cancel_abandoned=True)
        waiting = [coalescer.run("a", self.start) for _ in range(2)]
        for each in waiting:
            each.cancel()
            self.failureResultOf(each, CancelledError)
        self.assertEqual(self.cancelled, self.started)
        self.assertEqual(len(coalescer), 0)
        later = coalescer.run("a", self.start)
        self.assertEqual(len(self.started), 2)
        self.started[1].callback("answer")
        self.assertEqual(self.successResultOf(later), "answer")

    def test_abandoned_lookup_runs_on(self) -> None:
        """
        Without cancel_abandoned, a lookup nobody waits for runs on, and a
        request that comes meanwhile shares it.
        """
        coalescer: Coalescer[str, str] = Coalescer(cancel_abandoned=False)
        abandoned = coalescer.run("a", self.start)
        abandoned.cancel()
        self.failureResultOf(abandoned, CancelledError)
        self.assertEqual(self.cancelled, [])
        later = coalescer.run("a", self.start)
        self.assertEqual(len(self.started), 1)
        self.started[0].callback("answer")
        self.assertEqual(self.successResultOf(later), "answer")
