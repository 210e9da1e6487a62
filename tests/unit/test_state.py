"""
Tests for the state stores (pfxpold.state): the same behaviour from the
in-memory store and the SQLite store (run synchronously here), their
expiry timer, and the configuration of stores.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pfxpold.config import CheckOptions, ConfigError
from pfxpold.interfaces import IStateStore
from pfxpold.state import (
    EARLY,
    KNOWN,
    NEW,
    PASSED,
    WHITELISTED,
    Counter,
    CounterValue,
    GreylistEntry,
    Once,
    StoreError,
    Triplet,
    WhitelistEntry,
    make_store,
    store_for,
    store_options,
)
from pfxpold.state.memory import MemoryStore
from pfxpold.state.redis import RedisStore
from pfxpold.state.sqlite import LOCK_RETRY, SHARED_FOR, SQLiteStore, arrival_of
from tests.unit.tempdir import temporary_path

START = 1_800_000_000.0


def counter(key: str, limit: int, expires_at: float = START + 3600, *older: str) -> Counter:
    return Counter(key, (key, *older), limit, expires_at)


class StoreTestsMixin:
    """
    What every store must do; subclasses make the store.
    """

    clock: Clock

    def make_store(self) -> Any:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = self.make_store()

    def consume(self, counters: list[Counter], amount: int = 1) -> Any:
        result = self.successResultOf(self.store.consume(counters, amount, self.clock.seconds()))
        return (result.allowed, result.totals)

    def greylist(self, triplet: str = "t", **kwargs: Any) -> Any:
        values: dict[str, Any] = dict(
            delay=300, retry_window=3600, lifetime=86400, whitelist_after=0
        )
        values.update(kwargs)
        return self.successResultOf(
            self.store.greylist(triplet, "client", self.clock.seconds(), **values)
        )

    def test_interface(self) -> None:
        """
        The store provides IStateStore.
        """
        self.assertTrue(verifyObject(IStateStore, self.store))

    def test_consume_up_to_limit(self) -> None:
        """
        Amounts are added until the next one would pass the limit; a
        refused amount changes nothing.
        """
        self.assertEqual(self.consume([counter("a", 3)], 2), (True, (2,)))
        self.assertEqual(self.consume([counter("a", 3)], 2), (False, (2,)))
        self.assertEqual(self.consume([counter("a", 3)], 1), (True, (3,)))
        self.assertEqual(self.consume([counter("a", 3)], 1), (False, (3,)))

    def test_consume_all_or_nothing(self) -> None:
        """
        When one of several counters is full, none is added to.
        """
        self.assertEqual(self.consume([counter("a", 10), counter("b", 1)]), (True, (1, 1)))
        self.assertEqual(self.consume([counter("a", 10), counter("b", 1)]), (False, (1, 1)))
        self.assertEqual(self.consume([counter("a", 10)]), (True, (2,)))

    def test_consume_sums_read_keys(self) -> None:
        """
        A counter's total is the sum of its read keys (a sliding window's
        buckets); the amount goes to its first key only.
        """
        self.consume([counter("old", 10)], 4)
        self.assertEqual(self.consume([counter("new", 5, START + 3600, "old")]), (True, (5,)))
        self.assertEqual(self.consume([counter("new", 5, START + 3600, "old")]), (False, (5,)))
        self.assertEqual(self.consume([counter("new", 10)]), (True, (2,)))

    def test_expired_counter_starts_over(self) -> None:
        """
        A counter whose expiry passed counts from zero again, even before
        the sweep removes it.
        """
        self.consume([counter("a", 1, START + 10)])
        self.assertEqual(self.consume([counter("a", 1, START + 10)]), (False, (1,)))
        self.clock.advance(10)
        self.assertEqual(self.consume([counter("a", 1, START + 20)]), (True, (1,)))

    def test_consume_nothing(self) -> None:
        """
        An amount of 0 (refuse_early's look) is allowed while the total is
        within the limit, and adds nothing; a limit below 0 refuses it.
        """
        self.assertEqual(self.consume([counter("a", 0)], 0), (True, (0,)))
        self.assertEqual(self.consume([counter("a", -1)], 0), (False, (0,)))
        self.assertEqual(self.consume([counter("a", 2)], 2), (True, (2,)))
        self.assertEqual(self.consume([counter("a", 2)], 0), (True, (2,)))
        self.assertEqual(self.consume([counter("a", 1)], 0), (False, (2,)))

    def test_live_counter_expiry_extended(self) -> None:
        """
        Adding to a live counter with a later expiry keeps the later one:
        the count survives until then.
        """
        self.consume([counter("a", 5, START + 10)])
        self.consume([counter("a", 5, START + 100)])
        self.clock.advance(50)
        self.assertEqual(self.consume([counter("a", 5, START + 10)]), (True, (3,)))
        self.clock.advance(50)
        self.assertEqual(self.consume([counter("a", 5, START + 200)]), (True, (1,)))

    def test_release(self) -> None:
        """
        Releasing takes an amount back, never below zero.
        """
        self.consume([counter("a", 3)], 3)
        self.successResultOf(self.store.release([counter("a", 3)], 2, self.clock.seconds()))
        self.assertEqual(self.consume([counter("a", 3)], 2), (True, (3,)))
        self.successResultOf(self.store.release([counter("a", 3)], 10, self.clock.seconds()))
        self.assertEqual(self.consume([counter("a", 3)], 3), (True, (3,)))

    def consume_once(self, counters: list[Counter], mark: str, amount: int = 1) -> Any:
        once = Once(mark, self.clock.seconds() + 600)
        result = self.successResultOf(
            self.store.consume(counters, amount, self.clock.seconds(), once)
        )
        return (result.allowed, result.totals, result.repeated)

    def release_once(self, counters: list[Counter], mark: str, amount: int = 1) -> None:
        once = Once(mark, self.clock.seconds() + 600)
        self.successResultOf(self.store.release(counters, amount, self.clock.seconds(), once))

    def test_counted_once(self) -> None:
        """
        A message with a mark is counted once: a second consume with the
        same live mark adds nothing and says it was counted before;
        another mark counts.
        """
        self.assertEqual(self.consume_once([counter("{a}", 5)], "{a}:m1"), (True, (1,), False))
        self.assertEqual(self.consume_once([counter("{a}", 5)], "{a}:m1"), (True, (), True))
        self.assertEqual(self.consume_once([counter("{a}", 5)], "{a}:m2"), (True, (2,), False))
        self.assertEqual(self.consume([counter("{a}", 5)], 0), (True, (2,)))

    def test_counted_once_refused_leaves_no_mark(self) -> None:
        """
        A message refused for its limit is not marked: asked again once
        there is room, it is counted.
        """
        self.consume([counter("{a}", 1)])
        self.assertEqual(self.consume_once([counter("{a}", 1)], "{a}:m"), (False, (1,), False))
        self.assertEqual(self.consume_once([counter("{a}", 2)], "{a}:m"), (True, (2,), False))

    def test_counted_once_mark_expires(self) -> None:
        """
        A mark is forgotten at its expiry: the same mark counts again.
        """
        self.consume_once([counter("{a}", 5)], "{a}:m")
        self.clock.advance(601)
        self.assertEqual(self.consume_once([counter("{a}", 5)], "{a}:m"), (True, (2,), False))

    def test_release_once(self) -> None:
        """
        Releasing with a mark takes the count back once, however many
        times it is asked (two daemons refusing the same message), and
        removes the mark, so the message counts again when it comes back.
        A mark never set takes nothing back.
        """
        self.consume_once([counter("{a}", 5)], "{a}:m", 2)
        self.consume([counter("{a}", 5)], 1)
        self.release_once([counter("{a}", 5)], "{a}:m", 2)
        self.release_once([counter("{a}", 5)], "{a}:m", 2)
        self.release_once([counter("{a}", 5)], "{a}:never", 2)
        self.assertEqual(self.consume([counter("{a}", 5)], 0), (True, (1,)))
        self.assertEqual(self.consume_once([counter("{a}", 5)], "{a}:m", 2), (True, (3,), False))

    def test_release_unknown(self) -> None:
        """
        Releasing a counter that does not exist does nothing.
        """
        self.successResultOf(self.store.release([counter("nothing", 3)], 2, self.clock.seconds()))
        self.assertEqual(self.consume([counter("nothing", 3)], 3), (True, (3,)))

    def test_greylist_delay(self) -> None:
        """
        A new triplet, then an early retry, then a retry after the delay
        passes, then it is known.
        """
        self.assertEqual(self.greylist().verdict, NEW)
        self.clock.advance(299)
        state = self.greylist()
        self.assertEqual((state.verdict, state.first_seen), (EARLY, START))
        self.clock.advance(1)
        self.assertEqual(self.greylist().verdict, PASSED)
        self.clock.advance(5000)
        self.assertEqual(self.greylist().verdict, KNOWN)

    def test_greylist_retry_window(self) -> None:
        """
        A retry after the retry window starts over.
        """
        self.greylist()
        self.clock.advance(3601)
        state = self.greylist()
        self.assertEqual((state.verdict, state.first_seen), (NEW, START + 3601))

    def test_greylist_lifetime(self) -> None:
        """
        A passed triplet is forgotten a lifetime after its last attempt.
        """
        self.greylist()
        self.clock.advance(300)
        self.greylist()
        self.clock.advance(86399)
        self.assertEqual(self.greylist().verdict, KNOWN)
        self.clock.advance(86400)
        self.assertEqual(self.greylist().verdict, NEW)

    def test_auto_whitelist(self) -> None:
        """
        After N passed triplets, the client is whitelisted.
        """
        for name in ("t1", "t2"):
            self.assertEqual(self.greylist(name, whitelist_after=2).verdict, NEW)
        self.clock.advance(300)
        self.assertEqual(self.greylist("t1", whitelist_after=2).verdict, PASSED)
        self.assertEqual(self.greylist("t3", whitelist_after=2).verdict, NEW)
        self.assertEqual(self.greylist("t2", whitelist_after=2).verdict, PASSED)
        self.assertEqual(self.greylist("t4", whitelist_after=2).verdict, WHITELISTED)
        self.assertEqual(self.greylist("t4", whitelist_after=0).verdict, NEW)

    def test_expire(self) -> None:
        """
        expire() removes what expired, and only that.
        """
        self.consume([counter("a", 5, START + 10)])
        self.consume([counter("b", 5, START + 100)])
        self.greylist()
        self.clock.advance(50)
        self.assertEqual(self.successResultOf(self.store.expire(self.clock.seconds())), 1)
        self.assertEqual(self.consume([counter("b", 5, START + 100)]), (True, (2,)))

    def test_expiry_timer(self) -> None:
        """
        While the store runs, a timer sweeps expired entries every
        expire_interval seconds, without being asked.
        """
        self.consume([counter("a", 5, START + 10)])
        self.store.startService()
        self.addCleanup(self.store.stopService)
        self.assertEqual(self.entries(), 1)
        self.clock.advance(299)
        self.assertEqual(self.entries(), 1)
        self.clock.advance(1)
        self.assertEqual(self.entries(), 0)

    # The operations pfxpold-admin uses.

    def test_counters(self) -> None:
        """
        counters() reads the live keys asked for, with their expiry; a
        missing or expired key is left out.
        """
        self.consume([counter("a", 5, START + 10)], 2)
        self.consume([counter("b", 5, START + 100)], 3)
        found = self.successResultOf(self.store.counters(["a", "b", "c"], START))
        self.assertEqual(
            found, {"a": CounterValue(2, START + 10), "b": CounterValue(3, START + 100)}
        )
        found = self.successResultOf(self.store.counters(["a", "b"], START + 10))
        self.assertEqual(list(found), ["b"])

    def test_reset(self) -> None:
        """
        reset() forgets the keys given, and only those: the next
        consumption starts from zero.
        """
        self.consume([counter("a", 3)], 3)
        self.consume([counter("b", 3)], 3)
        self.assertEqual(self.successResultOf(self.store.reset(["a", "zzz"])), 1)
        self.assertEqual(self.consume([counter("a", 3)], 1), (True, (1,)))
        self.assertEqual(self.consume([counter("b", 3)], 1), (False, (3,)))

    def test_reset_prefix(self) -> None:
        """
        reset_prefix() forgets every counter whose key starts with the
        prefix, taken literally (SQL wildcards, glob characters).
        """
        for key in ("q:{x:a}:h", "q:{x:b}:h", "q:{y:a}:h", "q:{x%:a}:h", "q:{x_a}:h"):
            self.consume([counter(key, 3)], 1)
        self.assertEqual(self.successResultOf(self.store.reset_prefix("q:{x:")), 2)
        left = self.successResultOf(
            self.store.counters(["q:{x:a}:h", "q:{y:a}:h", "q:{x%:a}:h", "q:{x_a}:h"], START)
        )
        self.assertEqual(sorted(left), ["q:{x%:a}:h", "q:{x_a}:h", "q:{y:a}:h"])

    def test_greylist_entries(self) -> None:
        """
        greylist_entries() lists the live triplets under a key prefix with
        their clear parts, filtered by any of them; an entry recorded
        without its clear triplet is listed only unfiltered.
        """
        one = Triplet("192.0.2.0/24", "a@example.com", "x@example.net")
        two = Triplet("192.0.2.0/24", "b@example.com", "x@example.net")
        self.greylist("g:n1:t1", clear=one)
        self.clock.advance(10)
        self.greylist("g:n1:t2", clear=two)
        self.greylist("g:n1:t3")
        self.greylist("other:t4", clear=one)
        self.clock.advance(300)
        self.greylist("g:n1:t1")
        now = self.clock.seconds()
        entries = self.successResultOf(self.store.greylist_entries("g:", now))
        self.assertEqual([e.key for e in entries], ["g:n1:t1", "g:n1:t2", "g:n1:t3"])
        self.assertEqual(entries[0], GreylistEntry("g:n1:t1", one, START, 1, now + 86400))
        self.assertEqual(entries[1], GreylistEntry("g:n1:t2", two, START + 10, 0, START + 3610))
        self.assertIsNone(entries[2].triplet)
        by_sender = self.successResultOf(
            self.store.greylist_entries("g:", now, sender="b@example.com")
        )
        self.assertEqual([e.key for e in by_sender], ["g:n1:t2"])
        by_all = self.successResultOf(
            self.store.greylist_entries(
                "g:", now, network="192.0.2.0/24", recipient="x@example.net", sender="a@example.com"
            )
        )
        self.assertEqual([e.key for e in by_all], ["g:n1:t1"])
        later = self.successResultOf(self.store.greylist_entries("g:", START + 3611))
        self.assertEqual([e.key for e in later], ["g:n1:t1"])

    def test_delete_greylist(self) -> None:
        """
        delete_greylist() forgets a triplet: its next attempt is new again.
        """
        self.greylist("t1")
        self.clock.advance(300)
        self.assertEqual(self.greylist("t1").verdict, PASSED)
        self.assertEqual(self.successResultOf(self.store.delete_greylist(["t1", "nope"])), 1)
        self.assertEqual(self.greylist("t1").verdict, NEW)

    def test_whitelist(self) -> None:
        """
        Run-time whitelist entries are added (replacing one of the same
        kind and value), listed by kind and value, and removed.
        """
        self.assertEqual(self.successResultOf(self.store.whitelist_list()), [])
        first = WhitelistEntry("sender", "example.org", START, "ticket 1")
        network = WhitelistEntry("client", "192.0.2.0/24", START, "")
        again = WhitelistEntry("sender", "example.org", START + 5, "ticket 2")
        for entry in (first, network, again):
            self.successResultOf(self.store.whitelist_add(entry))
        self.assertEqual(self.successResultOf(self.store.whitelist_list()), [network, again])
        self.assertTrue(self.successResultOf(self.store.whitelist_remove("sender", "example.org")))
        self.assertFalse(self.successResultOf(self.store.whitelist_remove("sender", "example.org")))
        self.assertEqual(self.successResultOf(self.store.whitelist_list()), [network])


class MemoryStoreTests(StoreTestsMixin, SynchronousTestCase):
    """
    The in-memory store.
    """

    def make_store(self) -> MemoryStore:
        return MemoryStore(CheckOptions({}, name="stores.memory", reactor=self.clock))

    def entries(self) -> int:
        return len(self.store.counts)


class SQLiteStoreTests(StoreTestsMixin, SynchronousTestCase):
    """
    The SQLite store.
    """

    def make_store(self) -> SQLiteStore:
        path = temporary_path(self)
        store = SQLiteStore(CheckOptions({"path": path}, name="stores.sqlite", reactor=self.clock))
        self.addCleanup(lambda: store._connection and store._connection.close())
        return store

    def entries(self) -> int:
        connection = self.store._connect()
        return connection.execute("SELECT COUNT(*) FROM counters").fetchone()[0]

    def test_survives_reopening(self) -> None:
        """
        Counts are in the file once the turn is over: a new store on it
        sees them.
        """
        self.consume([counter("a", 3)], 2)
        self.clock.advance(0)
        again = SQLiteStore(
            CheckOptions({"path": self.store.path}, name="stores.sqlite", reactor=self.clock)
        )
        result = self.successResultOf(again.consume([counter("a", 3)], 2, self.clock.seconds()))
        self.clock.advance(0)
        again._connection.close()
        self.assertEqual((result.allowed, result.totals), (False, (2,)))

    def test_arrival_of(self) -> None:
        """
        A Postfix instance (pid.seconds.microseconds.sequence, hexadecimal)
        tells when its message arrived, in microseconds; anything else
        tells 0, or a number in the same range, and never fails.
        """
        self.assertEqual(arrival_of("7ee1.6b05ccb5.7a08.0"), 0x6B05CCB5 * 1_000_000 + 0x7A08)
        self.assertEqual(arrival_of("7ee1.6b05ccb5.f423f.0"), 0x6B05CCB5 * 1_000_000 + 999999)
        for instance in (
            "",
            "abc",
            "1.2",
            "1.2.3",
            "1.zz.3.4",
            "1..3.4",
            "1.2.123456.0",
            "1.2.3.4.5",
        ):
            self.assertEqual(arrival_of(instance), 0, instance)
        for instance in ("1." + "f" * 12 + ".f.0", "1.-3.-4.0", "1.2_0.3.4"):
            self.assertTrue(0 <= arrival_of(instance) < 2**63, instance)

    def test_marks_kept_by_arrival(self) -> None:
        """
        A mark's row is keyed by the message's arrival first, so a turn's
        marks are written in order, together: marks of messages that
        arrived in order are in the table in that order, whatever their
        digests.
        """
        for seconds in (30, 10, 20):
            once = Once(f"{{a}}:m{seconds}", START + 600, f"7ee1.{seconds:x}.5.0")
            self.successResultOf(self.store.consume([counter("{a}", 5)], 1, START, once))
        connection = self.store._connect()
        keys = [row[0] for row in connection.execute("SELECT key FROM counted_by_arrival")]
        self.assertEqual(
            [int.from_bytes(key[:8], "big") for key in keys],
            [seconds * 1_000_000 + 5 for seconds in (10, 20, 30)],
        )
        # The arrival is not the mark's identity: the same key and
        # instance is the same message.
        again = Once("{a}:m10", START + 600, "7ee1.a.5.0")
        result = self.successResultOf(self.store.consume([counter("{a}", 5)], 1, START, again))
        self.assertTrue(result.repeated)

    def test_marks_of_an_older_file(self) -> None:
        """
        A file written before marks were kept by arrival keeps its marks in
        the table C{counted}, keyed by a digest alone: a message marked
        there is not counted again, until its mark expires; once the sweep
        has removed them all, that table is no longer read.
        """
        path = self.store.path
        old = sqlite3.connect(path)
        old.executescript(
            "CREATE TABLE counted (key BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;"
        )
        once = Once("{a}:m", START + 600, "7ee1.6b05ccb5.7a08.0")
        old.execute(
            "INSERT INTO counted VALUES (?, ?)",
            (hashlib.blake2b(b"{a}:m", digest_size=16).digest(), START + 600),
        )
        old.commit()
        old.close()
        store = self.store
        repeated = self.successResultOf(store.consume([counter("{a}", 5)], 1, START, once))
        self.assertEqual((repeated.allowed, repeated.repeated), (True, True))
        other = Once("{a}:other", START + 600, "7ee1.6b05ccb5.7a08.0")
        counted = self.successResultOf(store.consume([counter("{a}", 5)], 1, START, other))
        self.assertEqual((counted.totals, counted.repeated), ((1,), False))
        self.assertTrue(store._legacy_marks)
        self.clock.advance(0)
        self.clock.advance(601)
        self.successResultOf(store.expire(self.clock.seconds()))
        self.assertFalse(store._legacy_marks)
        fresh = Once("{a}:m", self.clock.seconds() + 600, "7ee1.6b05ccb5.7a08.0")
        later = self.successResultOf(
            store.consume([counter("{a}", 5)], 1, self.clock.seconds(), fresh)
        )
        self.assertFalse(later.repeated)

    def test_bad_path(self) -> None:
        """
        A database that cannot be opened fails the operation with a
        StoreError naming the path, and fails verify().
        """
        store = SQLiteStore(
            CheckOptions({"path": "/nonexistent/dir/x.db"}, name="s", reactor=self.clock)
        )
        failure = self.failureResultOf(store.consume([counter("a", 1)], 1, START))
        self.assertIn("/nonexistent/dir/x.db", failure.getErrorMessage())
        self.failureResultOf(store.verify(), StoreError)

    def test_stopped(self) -> None:
        """
        Once the store stopped (its file closed), operations fail at once.
        """
        self.store.startService()
        self.successResultOf(self.store.stopService())
        self.failureResultOf(self.store.consume([counter("a", 1)], 1, START), StoreError)


class FailingCommit:
    """
    A connection whose COMMIT fails, as on a full disk.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def execute(self, statement: str, *args: Any) -> Any:
        if statement == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.connection.execute(statement, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)


class SQLiteTurnCommitTests(SynchronousTestCase):
    """
    Operations run at once on the reactor thread, in one transaction per
    reactor turn, committed once when the turn is over.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.path = temporary_path(self)
        self.store = self.make_store()
        self.statements: list[str] = []
        self.store._connect().set_trace_callback(self.statements.append)
        self.logged: list[dict[str, Any]] = []
        self.store._log = Logger(observer=self.logged.append)

    def make_store(self, busy_timeout: float = 5.0) -> SQLiteStore:
        store = SQLiteStore(
            CheckOptions(
                {"path": self.path, "busy_timeout": busy_timeout},
                name="stores.sqlite",
                reactor=self.clock,
            )
        )
        self.addCleanup(lambda: store._connection and store._connection.close())
        return store

    def consume(self, key: str = "a", limit: int = 3) -> Deferred[Any]:
        return self.store.consume([counter(key, limit)], 1, START)

    def committed(self, key: str) -> Any:
        """The count of C{key} another connection sees: only what was committed."""
        other = sqlite3.connect(self.path)
        try:
            row = other.execute("SELECT count FROM counters WHERE key = ?", (key,)).fetchone()
        finally:
            other.close()
        return row and row[0]

    def other_writer(self) -> sqlite3.Connection:
        """Another process's connection, holding the write lock."""
        other = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        return other

    def test_answered_at_once_committed_once_per_turn(self) -> None:
        """
        Every operation of a turn is answered at once, in one BEGIN
        IMMEDIATE transaction committed once the turn is over; the next
        turn begins another.
        """
        results = [self.consume(f"k{number}") for number in range(5)]
        for each in results:
            self.assertTrue(self.successResultOf(each).allowed)
        self.assertEqual(self.statements.count("BEGIN IMMEDIATE"), 1)
        self.assertEqual(self.statements.count("COMMIT"), 0)
        self.assertIsNone(self.committed("k0"))
        self.clock.advance(0)
        self.assertEqual(self.statements.count("COMMIT"), 1)
        self.assertEqual([self.committed(f"k{number}") for number in range(5)], [1] * 5)
        self.successResultOf(self.consume("k0"))
        self.clock.advance(0)
        self.assertEqual(self.statements.count("BEGIN IMMEDIATE"), 2)
        self.assertEqual(self.committed("k0"), 2)

    def test_fixed_window_consume_is_two_statements(self) -> None:
        """
        A counter reading only its own key is read by its key, then, live
        and with room (the common case), added to by one UPDATE that
        checks the limit again; a new one is inserted instead; a refusal
        reads the total by the general query, and writes nothing.
        """
        self.consume("first")
        groups = []
        for _ in range(3):
            del self.statements[:]
            self.consume("a", 2)
            groups.append(self.statements[:])
        self.assertEqual([len(group) for group in groups], [2, 2, 2])
        self.assertTrue(all(group[0].startswith("SELECT count, expires") for group in groups))
        self.assertIn("INSERT INTO counters", groups[0][1])
        self.assertIn("UPDATE counters", groups[1][1])
        self.assertIn("SELECT COALESCE(SUM(count)", groups[2][1])
        self.assertEqual(self.committed("a"), None)
        self.clock.advance(0)
        self.assertEqual(self.committed("a"), 2)

    def test_order_and_exact_limits(self) -> None:
        """
        Inside a turn operations run in the order asked, each seeing the
        ones before: a limit of 3 lets exactly the first 3 of 5 through.
        """
        answers = [self.successResultOf(self.consume("a", 3)) for _ in range(5)]
        self.clock.advance(0)
        self.assertEqual([each.allowed for each in answers], [True, True, True, False, False])
        self.assertEqual([each.totals for each in answers], [(1,), (2,), (3,), (3,), (3,)])
        self.assertEqual(self.committed("a"), 3)

    def test_failing_operation_fails_alone(self) -> None:
        """
        An operation that fails is rolled back alone (the turn rolled back
        and its earlier operations run again) and fails only its own
        Deferred; the others are committed, each once.
        """

        def writes_then_fails(connection: Any) -> None:
            connection.execute("INSERT INTO counters VALUES ('bad', 1, ?)", (START + 60,))
            raise sqlite3.IntegrityError("constraint failed")

        def bug(connection: Any) -> None:
            raise ValueError("a bug")

        before = self.consume("a")
        failing = self.store._call(writes_then_fails)
        buggy = self.store._call(bug)
        after = self.consume("b")
        self.clock.advance(0)
        self.assertTrue(self.successResultOf(before).allowed)
        self.assertTrue(self.successResultOf(after).allowed)
        failure = self.failureResultOf(failing, StoreError)
        self.assertIn("constraint failed", failure.getErrorMessage())
        self.failureResultOf(buggy, ValueError)
        self.assertEqual((self.committed("a"), self.committed("b"), self.committed("bad")), (1, 1, None))

    def test_lost_transaction_is_logged(self) -> None:
        """
        When SQLite rolls the whole transaction back (an I/O error), the
        operations answered before it in the turn are lost, which is
        logged as critical with their number; the next operation begins a
        new transaction.
        """

        def rolled_back(connection: Any) -> None:
            connection.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")

        self.assertTrue(self.successResultOf(self.consume("a")).allowed)
        self.assertTrue(self.successResultOf(self.consume("b")).allowed)
        self.failureResultOf(self.store._call(rolled_back), StoreError)
        self.assertEqual([event["count"] for event in self.logged], [2])
        self.assertEqual(self.logged[0]["log_level"], LogLevel.critical)
        self.assertTrue(self.successResultOf(self.consume("c")).allowed)
        self.clock.advance(0)
        self.assertEqual((self.committed("a"), self.committed("c")), (None, 1))

    def test_failing_commit_is_logged(self) -> None:
        """
        A COMMIT that fails (a full disk) rolls the turn back and logs, as
        critical, how many answered operations were not stored; the store
        goes on with the next turn.
        """
        real = self.store._connect()
        self.store._connection = FailingCommit(real)  # type: ignore[assignment]
        for key in ("a", "b", "c"):
            self.assertTrue(self.successResultOf(self.consume(key)).allowed)
        self.clock.advance(0)
        self.assertEqual([event["count"] for event in self.logged], [3])
        self.assertIn("disk is full", self.logged[0]["reason"])
        self.assertFalse(real.in_transaction)
        self.store._connection = real
        self.assertEqual(self.successResultOf(self.consume("a")).totals, (1,))
        self.clock.advance(0)
        self.assertEqual(self.committed("a"), 1)

    def test_busy_database_waits_on_a_timer(self) -> None:
        """
        While another process holds the lock, operations wait (in order)
        for a retry from the reactor's timer instead of blocking it, and
        run once the lock is free.
        """
        other = self.other_writer()
        first = self.consume("a", 1)
        second = self.consume("a", 1)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.clock.advance(LOCK_RETRY)
        self.assertNoResult(first)
        other.execute("COMMIT")
        self.clock.advance(LOCK_RETRY)
        self.assertTrue(self.successResultOf(first).allowed)
        self.assertFalse(self.successResultOf(second).allowed)
        self.clock.advance(0)
        self.assertEqual(self.committed("a"), 1)

    def test_busy_database_fails_after_busy_timeout(self) -> None:
        """
        Operations that waited C{busy_timeout} for the lock fail with a
        StoreError saying the database is locked; the store then works
        again once the lock is free.
        """
        self.store = self.make_store(busy_timeout=0.01)
        self.store.verify()
        other = self.other_writer()
        waiting = self.consume("a")
        self.clock.pump([LOCK_RETRY] * 10)
        failure = self.failureResultOf(waiting, StoreError)
        self.assertIn("locked", failure.getErrorMessage())
        other.execute("ROLLBACK")
        waiting = self.consume("a")
        self.clock.advance(0)
        self.assertTrue(self.successResultOf(waiting).allowed)

    def test_shared_file_answers_after_commit(self) -> None:
        """
        Once another process held the lock, the store holds it as briefly
        as it can for SHARED_FOR seconds: a turn's operations run together
        at its end and are answered after their commit; then operations
        run at once again.
        """
        other = self.other_writer()
        first = self.consume("a")
        other.execute("COMMIT")
        self.clock.advance(LOCK_RETRY)
        self.successResultOf(first)
        turn = [self.consume("a"), self.consume("b")]
        self.assertNoResult(turn[0])
        self.clock.advance(0)
        self.assertEqual([self.successResultOf(each).totals for each in turn], [(2,), (1,)])
        self.assertEqual((self.committed("a"), self.committed("b")), (2, 1))
        self.clock.advance(SHARED_FOR)
        self.assertEqual(self.successResultOf(self.consume("a")).totals, (3,))

    def test_shared_file_failing_commit_fails(self) -> None:
        """
        While the file is shared, operations answer after their commit: a
        commit that fails fails them, and nothing is lost unsaid.
        """
        other = self.other_writer()
        first = self.consume("a")
        other.execute("COMMIT")
        self.clock.advance(LOCK_RETRY)
        self.successResultOf(first)
        real = self.store._connect()
        self.store._connection = FailingCommit(real)  # type: ignore[assignment]
        waiting = self.consume("b")
        self.clock.advance(0)
        failure = self.failureResultOf(waiting, StoreError)
        self.assertIn("disk is full", failure.getErrorMessage())
        self.assertEqual(self.logged, [])
        self.assertIsNone(self.committed("b"))
        self.assertFalse(real.in_transaction)

    def test_two_stores_count_a_message_once(self) -> None:
        """
        Two stores on one file (two daemons, two workers) count a message
        with the same mark once, and take it back once.
        """
        other = self.make_store()
        once = Once("{a}:m", START + 600)
        first = self.successResultOf(self.store.consume([counter("{a}", 5)], 1, START, once))
        self.clock.advance(0)
        second = self.successResultOf(other.consume([counter("{a}", 5)], 1, START, once))
        self.clock.advance(0)
        self.assertEqual((first.repeated, second.repeated), (False, True))
        self.successResultOf(other.release([counter("{a}", 5)], 1, START, once))
        self.clock.advance(0)
        self.successResultOf(self.store.release([counter("{a}", 5)], 1, START, once))
        self.clock.advance(0)
        self.assertEqual(self.committed("{a}"), 0)

    def test_two_stores_share_a_file_exactly(self) -> None:
        """
        Two stores (two processes) writing one file take turns with the
        lock: none of their operations fails, and a limit holds exactly
        across both.
        """
        other = self.make_store()
        results = []
        for _ in range(6):
            for store in (self.store, other):
                for _ in range(3):
                    results.append(store.consume([counter("a", 10)], 1, START))
            self.clock.pump([0, LOCK_RETRY, LOCK_RETRY])
        self.clock.pump([LOCK_RETRY] * 5)
        answers = [self.successResultOf(each) for each in results]
        self.assertEqual(sum(each.allowed for each in answers), 10)
        self.assertEqual(self.committed("a"), 10)
        # They did meet the lock taken, and waited for it.
        self.assertTrue(self.store._shared_until or other._shared_until)

    def test_stop_commits(self) -> None:
        """Stopping the store commits the turn's operations and closes the file."""
        self.store.startService()
        self.successResultOf(self.consume("a"))
        self.successResultOf(self.store.stopService())
        self.assertEqual(self.committed("a"), 1)
        self.assertIsNone(self.store._connection)

    def test_stop_waits_for_the_lock(self) -> None:
        """Stopping the store waits for the operations waiting for the lock."""
        self.store.startService()
        self.clock.advance(0)
        other = self.other_writer()
        waiting = self.consume("a")
        stopped = self.store.stopService()
        self.assertNoResult(stopped)
        other.execute("COMMIT")
        self.clock.advance(LOCK_RETRY)
        self.assertTrue(self.successResultOf(waiting).allowed)
        self.successResultOf(stopped)
        self.assertEqual(self.committed("a"), 1)


class MemoryOneKeyTests(SynchronousTestCase):
    """
    The memory store's shortcut for one counter reading one key answers
    as its general path does.
    """

    def test_matches_general_path(self) -> None:
        """
        Random consumes (amount 0 to 3, limits -1 to 5), releases and clock
        steps across expiries: a counter reading only its key, and the same
        counter also reading a key nobody writes (the general path), give
        the same answers.
        """
        import random

        rng = random.Random(12)
        clock = Clock()
        clock.advance(START)
        short = MemoryStore(CheckOptions({}, name="a", reactor=clock))
        general = MemoryStore(CheckOptions({}, name="b", reactor=clock))
        for step in range(3000):
            roll = rng.random()
            now = clock.seconds()
            expires = now + rng.choice((5.0, 50.0))
            limit = rng.randint(-1, 5)
            key = rng.choice("ab")
            if roll < 0.1:
                clock.advance(rng.choice((1.0, 10.0, 60.0)))
            elif roll < 0.2:
                for store in (short, general):
                    store.release([Counter(key, (key,), limit, expires)], 1, now)
            else:
                amount = rng.randint(0, 3)
                one = self.successResultOf(
                    short.consume([Counter(key, (key,), limit, expires)], amount, now)
                )
                other = self.successResultOf(
                    general.consume([Counter(key, (key, "unused"), limit, expires)], amount, now)
                )
                self.assertEqual(one, other, step)
        self.assertEqual(short.counts, general.counts)


class StoreConfigurationTests(SynchronousTestCase):
    """
    [stores.NAME] tables and the default store.
    """

    def options(self, document: dict[str, Any], **table: Any) -> CheckOptions:
        return CheckOptions(
            table,
            name="q",
            reactor=Clock(),
            path="/etc/pfxpold/pfxpold.toml",
            document=document,
            shared={},
        )

    def test_default_is_sqlite_beside_configuration(self) -> None:
        """
        Without a store named, the default store is an SQLite file beside
        the configuration file.
        """
        store = store_for(self.options({}))
        self.assertIsInstance(store, SQLiteStore)
        self.assertEqual(store.path, "/etc/pfxpold/pfxpold-state.sqlite3")

    def test_named_store_shared(self) -> None:
        """
        Two checks naming one store get the same object.
        """
        shared: dict[Any, Any] = {}
        document = {"stores": {"main": {"type": "redis", "endpoint": "tcp:host=127.0.0.1:port=1"}}}
        first = CheckOptions(
            {"store": "main"}, name="a", reactor=Clock(), document=document, shared=shared
        )
        second = CheckOptions(
            {"store": "main"}, name="b", reactor=Clock(), document=document, shared=shared
        )
        self.assertIs(store_for(first), store_for(second))
        self.assertIsInstance(store_for(first), RedisStore)
        self.assertTrue(verifyObject(IStateStore, store_for(first)))

    def test_unknown_store(self) -> None:
        """
        Naming a store that is not configured is an error naming the key.
        """
        error = self.assertRaises(ConfigError, store_for, self.options({}, store="nope"))
        self.assertIn("key 'store'", str(error))

    def test_unknown_setting(self) -> None:
        """
        A misspelt store setting is reported.
        """
        options = self.options({"stores": {"x": {"type": "memory", "expire_intreval": 5}}})
        error = self.assertRaises(ConfigError, make_store, store_options(options, "x"))
        self.assertIn("expire_intreval", str(error))

    def test_bad_type(self) -> None:
        """
        An unknown store type is reported with the choices.
        """
        options = self.options({"stores": {"x": {"type": "mongodb"}}})
        error = self.assertRaises(ConfigError, make_store, store_options(options, "x"))
        self.assertIn("memory, sqlite, redis", str(error))

    def test_bad_endpoint(self) -> None:
        """
        A Redis endpoint that is not an endpoint string is reported.
        """
        options = self.options({"stores": {"x": {"type": "redis", "endpoint": "nonsense:"}}})
        error = self.assertRaises(ConfigError, make_store, store_options(options, "x"))
        self.assertIn("endpoint", str(error))


class SQLiteMatchesModelTests(SynchronousTestCase):
    """
    The SQLite store answers random operation sequences exactly as the
    in-memory store does, expiry and windows included.
    """

    def test_random_sequences(self) -> None:
        """
        200 sequences of 60 operations on colliding keys, with clock steps
        across delays, windows and lifetimes: identical answers.
        """
        self.compare(range(200))

    def test_random_sequences_own_keys(self) -> None:
        """
        The same with counters reading only their own key (the one-statement
        path), one key across windows, so that rows are found live, expired,
        or (with slack) live with an earlier expiry: identical answers.
        """
        self.compare(range(200, 300), own_key=True)
        self.compare(range(300, 400), slack=200.0, own_key=True)

    def compare(self, seeds: range, slack: float = 0.0, own_key: bool = False) -> None:
        from tests.state_model import apply, operations

        directory = os.path.dirname(temporary_path(self))
        for seed in seeds:
            clock = Clock()
            clock.advance(START)
            memory = MemoryStore(CheckOptions({}, name="m", reactor=clock))
            sqlite = SQLiteStore(
                CheckOptions(
                    {"path": os.path.join(directory, f"{seed}.db")}, name="s", reactor=clock
                )
            )
            try:
                for number, operation in enumerate(
                    operations(seed, 60, (1.0, 299.0, 301.0, 600.0, 3601.0, 7300.0))
                ):
                    if operation[0] == "advance":
                        clock.advance(operation[1])
                        continue
                    now = clock.seconds()
                    expected = self.successResultOf(apply(memory, operation, now, slack, own_key))
                    actual = self.successResultOf(apply(sqlite, operation, now, slack, own_key))
                    self.assertEqual(actual, expected, (seed, number, operation))
            finally:
                sqlite._connection.close()
