"""
The SQLite state store: the embedded default. State survives a restart of
the daemon and needs no server.

All statements run on one connection in one thread of a private
single-thread pool, so this daemon is SQLite's only writer and never
blocks the reactor. Several processes may share the file (a busy timeout
makes them wait for each other instead of failing with C{database is
locked}).

Operations are committed in groups: those asked for while a group runs in
the store's thread go together into the next one (at most
L{MAX_BATCH}), which costs one thread hop and one C{BEGIN IMMEDIATE} ...
C{COMMIT} for all of them instead of one each. C{BEGIN IMMEDIATE} holds the
write lock from its first statement, so no other writer can slip in
between a limit check and its upserts; inside a group the operations run
one after the other, in the order they were asked for, each seeing the
ones before it. One that fails is rolled back alone and fails only its
own Deferred (the group then runs again with a C{SAVEPOINT} around each
operation; see L{run_batch}). Nothing is answered
before the group is committed: when the commit itself fails, every
operation of the group fails.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from pfxpold.config import CheckOptions
from pfxpold.interfaces import IStateStore
from pfxpold.state import (
    DEFAULT_SQLITE_PATH,
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
    StoreError,
    Triplet,
    WhitelistEntry,
)
from pfxpold.state.memory import ExpiringStore, matches

DEFAULT_BUSY_TIMEOUT = 5.0
#: The most operations committed together.
MAX_BATCH = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS triplets (
    key TEXT PRIMARY KEY, first_seen REAL NOT NULL, passes INTEGER NOT NULL,
    attempts INTEGER NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS clients (
    key TEXT PRIMARY KEY, passes INTEGER NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS counters_expires ON counters (expires);
CREATE INDEX IF NOT EXISTS triplets_expires ON triplets (expires);
CREATE INDEX IF NOT EXISTS clients_expires ON clients (expires);
CREATE TABLE IF NOT EXISTS whitelist (
    kind TEXT NOT NULL, value TEXT NOT NULL, added REAL NOT NULL, comment TEXT NOT NULL,
    PRIMARY KEY (kind, value)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marks (
    key TEXT NOT NULL, mark TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key, mark)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS marks_expires ON marks (expires);
"""

#: Columns added to the triplets table after its first release: the
#: triplet in clear, for pfxpold-admin. Not indexed: the daemon writes a
#: triplet far more often than an admin looks for one.
_CLEAR_COLUMNS = ("network", "sender", "recipient")

# Sets only the count of an existing row; the expiry is extended by
# _EXTEND when RETURNING shows it must be (see _CONSUME_ONE).
_ADD = """
INSERT INTO counters (key, count, expires) VALUES (:key, :amount, :expires)
ON CONFLICT (key) DO UPDATE SET
    count = CASE WHEN expires > :now THEN count + excluded.count ELSE excluded.count END
RETURNING expires
"""

# A counter that reads only its own key (a fixed window), checked and added
# to in one statement when it is new or live: the row is written only when
# the amount fits, and RETURNING gives the new total; no row back means
# over the limit, or an expired row, which the general path handles. Only
# the count is set on a live row: setting the expiry too (to the same
# value, every writer of a fixed window computing the same end) rewrites
# its index entry, which cost a third of the statement. The expiry is
# extended by a second statement in the rare case it must be.
_CONSUME_ONE = """
INSERT INTO counters (key, count, expires)
SELECT :key, :amount, :expires WHERE :amount <= :limit
ON CONFLICT (key) DO UPDATE SET count = count + excluded.count
WHERE expires > :now AND count + excluded.count <= :limit
RETURNING count, expires
"""

_EXTEND = "UPDATE counters SET expires = :expires WHERE key = :key AND expires < :expires"

_RELEASE = "UPDATE counters SET count = max(count - :amount, 0) WHERE key = :key"

_WHITELISTED = """
UPDATE clients SET expires = :now + :lifetime
WHERE key = :client AND expires > :now AND passes >= :whitelist_after
RETURNING passes
"""

# A triplet is stale (starts over) when it expired, or never passed and
# its retry window is over. Column names in DO UPDATE are the old values.
_STALE = "(expires <= :now OR (passes = 0 AND :now > first_seen + :retry_window))"
_PASSES = "(passes > 0 OR :now >= first_seen + :delay)"
_ATTEMPT = f"""
INSERT INTO triplets (key, first_seen, passes, attempts, expires, network, sender, recipient)
VALUES (:triplet, :now, 0, 1, :now + :retry_window, :network, :sender, :recipient)
ON CONFLICT (key) DO UPDATE SET
    first_seen = CASE WHEN {_STALE} THEN :now ELSE first_seen END,
    network = CASE WHEN {_STALE} THEN :network ELSE network END,
    sender = CASE WHEN {_STALE} THEN :sender ELSE sender END,
    recipient = CASE WHEN {_STALE} THEN :recipient ELSE recipient END,
    attempts = CASE WHEN {_STALE} THEN 1 ELSE attempts + 1 END,
    passes = CASE WHEN {_STALE} THEN 0 WHEN {_PASSES} THEN passes + 1 ELSE 0 END,
    expires = CASE WHEN {_STALE} THEN :now + :retry_window
                   WHEN {_PASSES} THEN :now + :lifetime ELSE expires END
RETURNING first_seen, passes, attempts
"""

_CLIENT_PASSED = """
INSERT INTO clients (key, passes, expires) VALUES (:client, 1, :now + :lifetime)
ON CONFLICT (key) DO UPDATE SET
    passes = CASE WHEN expires > :now THEN passes + 1 ELSE 1 END,
    expires = excluded.expires
"""


#: The summing query for each shape of counters (how many keys each reads).
_TOTAL_QUERIES: dict[tuple[int, ...], str] = {}


def _total_query(counters: Sequence[Counter]) -> tuple[str, list[Any]]:
    """
    One SELECT that sums each counter's live keys.
    """
    shape = tuple(len(counter.read_keys) for counter in counters)
    query = _TOTAL_QUERIES.get(shape)
    if query is None:
        parts = [
            "(SELECT COALESCE(SUM(count), 0) FROM counters"
            f" WHERE key IN ({', '.join('?' * size)}) AND expires > ?)"
            for size in shape
        ]
        query = "SELECT " + ", ".join(parts)
        # Shapes come from the configuration's windows: a handful.
        if len(_TOTAL_QUERIES) < 1024:
            _TOTAL_QUERIES[shape] = query
    parameters: list[Any] = []
    for counter in counters:
        parameters.extend(counter.read_keys)
        parameters.append(None)
    return query, parameters


def open_database(path: str, busy_timeout: float) -> sqlite3.Connection:
    """
    Open (and create) the state database at C{path}.
    """
    connection = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    # WAL lets readers in other processes go on while this one writes.
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(_SCHEMA)
    columns = {row[1] for row in connection.execute("PRAGMA table_info(triplets)")}
    for column in _CLEAR_COLUMNS:
        if column not in columns:
            connection.execute(f"ALTER TABLE triplets ADD COLUMN {column} TEXT")
    return connection


def consume_in(
    connection: sqlite3.Connection, counters: Sequence[Counter], amount: int, now: float
) -> Consumption:
    if len(counters) == 1:
        counter = counters[0]
        if counter.read_keys == (counter.key,):
            row = connection.execute(
                _CONSUME_ONE,
                {
                    "key": counter.key,
                    "amount": amount,
                    "expires": counter.expires_at,
                    "limit": counter.limit,
                    "now": now,
                },
            ).fetchone()
            if row is not None:
                if row[1] < counter.expires_at:
                    connection.execute(_EXTEND, {"key": counter.key, "expires": counter.expires_at})
                return Consumption(True, (int(row[0]),))
            # Over the limit, or an expired row to start over (both rare):
            # the general path, the failed statement having changed nothing.
    query, parameters = _total_query(counters)
    parameters = [now if p is None else p for p in parameters]
    totals = tuple(int(t) for t in connection.execute(query, parameters).fetchone())
    if any(total + amount > c.limit for total, c in zip(totals, counters, strict=True)):
        return Consumption(False, totals)
    for c in counters:
        (expires,) = connection.execute(
            _ADD, {"key": c.key, "amount": amount, "expires": c.expires_at, "now": now}
        ).fetchone()
        if expires < c.expires_at:
            connection.execute(_EXTEND, {"key": c.key, "expires": c.expires_at})
    return Consumption(True, tuple(total + amount for total in totals))


def release_in(
    connection: sqlite3.Connection, counters: Sequence[Counter], amount: int, now: float
) -> None:
    connection.executemany(_RELEASE, [{"key": c.key, "amount": amount} for c in counters])


def greylist_in(connection: sqlite3.Connection, **values: Any) -> GreylistState:
    if values["whitelist_after"]:
        if connection.execute(_WHITELISTED, values).fetchone() is not None:
            return GreylistState(WHITELISTED, 0.0)
    first_seen, passes, attempts = connection.execute(_ATTEMPT, values).fetchone()
    if passes == 0:
        return GreylistState(NEW if attempts == 1 else EARLY, float(first_seen))
    if passes > 1:
        return GreylistState(KNOWN, float(first_seen))
    if values["whitelist_after"]:
        connection.execute(_CLIENT_PASSED, values)
    return GreylistState(PASSED, float(first_seen))


def counters_in(
    connection: sqlite3.Connection, keys: Sequence[str], now: float
) -> dict[str, CounterValue]:
    found = {}
    for key in keys:
        row = connection.execute(
            "SELECT count, expires FROM counters WHERE key = ? AND expires > ?", (key, now)
        ).fetchone()
        if row is not None:
            found[key] = CounterValue(int(row[0]), float(row[1]))
    return found


def reset_in(connection: sqlite3.Connection, keys: Sequence[str]) -> int:
    return sum(
        connection.execute("DELETE FROM counters WHERE key = ?", (key,)).rowcount for key in keys
    )


def reset_prefix_in(connection: sqlite3.Connection, prefix: str) -> int:
    return connection.execute(
        "DELETE FROM counters WHERE key >= ? AND key < ?", (prefix, _after_prefix(prefix))
    ).rowcount


def _after_prefix(prefix: str) -> str:
    """
    A string above every key that starts with C{prefix}: a range on the
    primary key finds them through its index (LIKE would not, and a key
    may hold C{%} and C{_}).
    """
    return prefix + "\U0010ffff"


def greylist_entries_in(
    connection: sqlite3.Connection,
    prefix: str,
    now: float,
    network: Optional[str],
    sender: Optional[str],
    recipient: Optional[str],
) -> list[GreylistEntry]:
    rows = connection.execute(
        "SELECT key, first_seen, passes, expires, network, sender, recipient FROM triplets"
        " WHERE key >= ? AND key < ? AND expires > ? ORDER BY first_seen, key",
        (prefix, _after_prefix(prefix), now),
    )
    found = []
    for key, first_seen, passes, expires, *clear in rows:
        triplet = Triplet(*clear) if None not in clear else None
        entry = GreylistEntry(key, triplet, float(first_seen), int(passes), float(expires))
        if matches(entry, network, sender, recipient):
            found.append(entry)
    return found


def delete_greylist_in(connection: sqlite3.Connection, keys: Sequence[str]) -> int:
    removed = 0
    for key in keys:
        for table in ("triplets", "clients"):
            removed += connection.execute(f"DELETE FROM {table} WHERE key = ?", (key,)).rowcount
    return removed


def whitelist_add_in(connection: sqlite3.Connection, entry: WhitelistEntry) -> None:
    connection.execute(
        "INSERT OR REPLACE INTO whitelist (kind, value, added, comment) VALUES (?, ?, ?, ?)",
        (entry.kind, entry.value, entry.added, entry.comment),
    )


def whitelist_remove_in(connection: sqlite3.Connection, kind: str, value: str) -> bool:
    cursor = connection.execute("DELETE FROM whitelist WHERE kind = ? AND value = ?", (kind, value))
    return cursor.rowcount > 0


def whitelist_list_in(connection: sqlite3.Connection) -> list[WhitelistEntry]:
    rows = connection.execute(
        "SELECT kind, value, added, comment FROM whitelist ORDER BY kind, value"
    )
    return [
        WhitelistEntry(kind, value, float(added), comment) for kind, value, added, comment in rows
    ]


def expire_in(connection: sqlite3.Connection, now: float) -> int:
    removed = 0
    for table in ("counters", "triplets", "clients", "marks"):
        removed += connection.execute(f"DELETE FROM {table} WHERE expires <= ?", (now,)).rowcount
    return removed


def set_mark_in(connection: sqlite3.Connection, key: str, mark: str, expires_at: float) -> None:
    connection.execute(
        "INSERT INTO marks (key, mark, expires) VALUES (?, ?, ?)"
        " ON CONFLICT (key, mark) DO UPDATE SET expires = max(expires, excluded.expires)",
        (key, mark, expires_at),
    )


def marks_in(connection: sqlite3.Connection, key: str, now: float) -> frozenset[str]:
    rows = connection.execute("SELECT mark FROM marks WHERE key = ? AND expires > ?", (key, now))
    return frozenset(row[0] for row in rows)


#: One operation: the function, its arguments, and the Deferred to fire.
_Operation = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Deferred[Any]]


class _OperationFailed(Exception):
    """
    One operation of a batch failed and the batch's transaction was rolled
    back, the transaction itself being sound.
    """


def run_batch(
    connection: sqlite3.Connection, operations: Sequence[tuple[Callable[..., Any], tuple, dict]]
) -> list[Any]:
    """
    Run C{operations} (C{function(connection, *args, **kwargs)} each) in
    one C{BEGIN IMMEDIATE} transaction.

    They run first without savepoints: two statements fewer per operation,
    and every statement is a release and re-acquisition of the GIL that the
    reactor thread is competing for. Operations seldom fail alone (a full
    disk or a lost lock fails the transaction); when one does, the
    transaction is rolled back and the batch runs again with a savepoint
    around each operation, so that only the failing one fails. Nothing was
    committed in between, so each operation still takes effect once.

    @return: each operation's result, or the exception it raised (its
        savepoint rolled back), in order, once the transaction committed.
    @raise sqlite3.Error: when the transaction could not be begun or
        committed, or was lost (every operation then failed).
    """
    try:
        return _run_together(connection, operations)
    except _OperationFailed:
        return _run_isolated(connection, operations)


@contextmanager
def _immediate_transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """
    C{BEGIN IMMEDIATE} ... C{COMMIT}, rolled back when the block raises.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _run_together(
    connection: sqlite3.Connection, operations: Sequence[tuple[Callable[..., Any], tuple, dict]]
) -> list[Any]:
    outcomes: list[Any] = []
    with _immediate_transaction(connection):
        for function, args, kwargs in operations:
            try:
                outcomes.append(function(connection, *args, **kwargs))
            except Exception as e:
                if not connection.in_transaction:
                    # SQLite rolled the whole transaction back (a full
                    # disk, an I/O error): every operation failed.
                    raise
                raise _OperationFailed() from e
    return outcomes


def _run_isolated(
    connection: sqlite3.Connection, operations: Sequence[tuple[Callable[..., Any], tuple, dict]]
) -> list[Any]:
    outcomes: list[Any] = []
    with _immediate_transaction(connection):
        for function, args, kwargs in operations:
            connection.execute("SAVEPOINT operation")
            try:
                outcome = function(connection, *args, **kwargs)
            except Exception as e:
                if not connection.in_transaction:
                    raise
                connection.execute("ROLLBACK TO operation")
                outcome = e
            connection.execute("RELEASE operation")
            outcomes.append(outcome)
    return outcomes


@implementer(IStateStore)
class SQLiteStore(ExpiringStore):
    """
    State in an SQLite file, written by one connection in one thread.

    Settings of C{[stores.NAME]}: C{path} (relative to the configuration
    file; default C{pfxpold-state.sqlite3}), C{busy_timeout} (seconds to
    wait for another process's lock, default 5), C{expire_interval}.

    @param run: for tests: a callable C{run(function)} returning a
        Deferred of C{function()}, which runs one group of operations;
        without it, groups go to a one-thread pool started with the service.
    """

    def __init__(
        self,
        options: CheckOptions,
        run: Optional[Callable[..., Deferred[Any]]] = None,
    ) -> None:
        super().__init__(options)
        self.path = options.path("path", DEFAULT_SQLITE_PATH)
        self.busy_timeout = options.number("busy_timeout", DEFAULT_BUSY_TIMEOUT, positive=True)
        self._run_for_tests = run
        self._pool: Optional[ThreadPool] = None
        self._connection: Optional[sqlite3.Connection] = None
        self._queue: deque[_Operation] = deque()
        self._running = False
        self._idle_waiters: list[Deferred[None]] = []

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = open_database(self.path, self.busy_timeout)
        return self._connection

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Queue C{function(connection, *args, **kwargs)} for the next group.

        @return: a Deferred that fires with its result once its group is
            committed, or fails with L{StoreError}.
        """
        if self._run_for_tests is None and self._pool is None:
            return fail(StoreError(f"{self.name}: not started"))
        result: Deferred[Any] = Deferred()
        self._queue.append((function, args, kwargs, result))
        if not self._running:
            self._next_batch()
        return result

    def _next_batch(self) -> None:
        """
        Send the operations waiting (at most L{MAX_BATCH}) to the store's
        thread as one group.
        """
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
        if not batch:
            self._running = False
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        self._running = True
        operations = [(function, args, kwargs) for function, args, kwargs, _ in batch]

        def in_thread() -> list[Any]:
            try:
                return run_batch(self._connect(), operations)
            except sqlite3.Error as e:
                raise StoreError(f"{self.name}: {self.path}: {e}") from e

        if self._run_for_tests is not None:
            running = self._run_for_tests(in_thread)
        elif self._pool is not None:
            running = deferToThreadPool(self.reactor, self._pool, in_thread)
        else:
            running = fail(StoreError(f"{self.name}: not started"))
        running.addBoth(self._batch_done, batch)

    def _batch_done(self, outcomes: Any, batch: list[_Operation]) -> None:
        for index, (_, _, _, result) in enumerate(batch):
            if isinstance(outcomes, Failure):
                result.errback(outcomes)
                continue
            outcome = outcomes[index]
            if isinstance(outcome, sqlite3.Error):
                result.errback(StoreError(f"{self.name}: {self.path}: {outcome}"))
            elif isinstance(outcome, Exception):
                result.errback(outcome)
            else:
                result.callback(outcome)
        self._next_batch()

    def _drained(self) -> Deferred[None]:
        """
        @return: a Deferred that fires once no operation waits or runs.
        """
        if not self._running:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        if self._run_for_tests is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"pfxpold-{self.name}")
            self._pool.start()
        # Open (and create) the file now, so a bad path is logged at start.
        self._call(lambda connection: None).addErrback(
            lambda failure: self._log.error(
                "{store}: cannot open {path}: {reason}",
                store=self.name,
                path=self.path,
                reason=failure.getErrorMessage(),
            )
        )
        super().startService()

    def verify(self) -> Deferred[None]:
        """
        Open the file, once started: a reload swaps in a configuration
        only when this succeeds.

        @return: a Deferred that fails with L{StoreError} when the file
            cannot be opened.
        """
        return self._call(lambda connection: None)

    def stopService(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        await super().stopService()
        # Operations already asked for are committed before the file closes.
        await self._drained()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            if self._run_for_tests is None and self._pool is not None:
                await deferToThreadPool(self.reactor, self._pool, connection.close)
            else:
                connection.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()

    def consume(
        self, counters: Sequence[Counter], amount: int, now: float
    ) -> Deferred[Consumption]:
        return self._call(consume_in, counters, amount, now)

    def release(self, counters: Sequence[Counter], amount: int, now: float) -> Deferred[None]:
        return self._call(release_in, counters, amount, now)

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
        return self._call(
            greylist_in,
            triplet=triplet,
            client=client,
            now=now,
            delay=delay,
            retry_window=retry_window,
            lifetime=lifetime,
            whitelist_after=whitelist_after,
            network=clear.network if clear is not None else None,
            sender=clear.sender if clear is not None else None,
            recipient=clear.recipient if clear is not None else None,
        )

    def expire(self, now: float) -> Deferred[int]:
        return self._call(expire_in, now)

    def counters(self, keys: Sequence[str], now: float) -> Deferred[dict[str, CounterValue]]:
        return self._call(counters_in, tuple(keys), now)

    def reset(self, keys: Sequence[str]) -> Deferred[int]:
        return self._call(reset_in, tuple(keys))

    def reset_prefix(self, prefix: str) -> Deferred[int]:
        return self._call(reset_prefix_in, prefix)

    def greylist_entries(
        self,
        prefix: str,
        now: float,
        network: Optional[str] = None,
        sender: Optional[str] = None,
        recipient: Optional[str] = None,
    ) -> Deferred[list[GreylistEntry]]:
        return self._call(greylist_entries_in, prefix, now, network, sender, recipient)

    def delete_greylist(self, keys: Sequence[str]) -> Deferred[int]:
        return self._call(delete_greylist_in, tuple(keys))

    def whitelist_add(self, entry: WhitelistEntry) -> Deferred[None]:
        return self._call(whitelist_add_in, entry)

    def whitelist_remove(self, kind: str, value: str) -> Deferred[bool]:
        return self._call(whitelist_remove_in, kind, value)

    def whitelist_list(self) -> Deferred[list[WhitelistEntry]]:
        return self._call(whitelist_list_in)

    # Per-message marks of the rules check.

    def set_mark(self, key: str, mark: str, expires_at: float) -> Deferred[None]:
        return self._call(set_mark_in, key, mark, expires_at)

    def marks(self, key: str, now: float) -> Deferred[frozenset[str]]:
        return self._call(marks_in, key, now)
