"""
The SQLite state store: the embedded default. State survives a restart of
the daemon and needs no server.

All statements run on one connection in one thread of a private
single-thread pool, so this daemon is SQLite's only writer and never
blocks the reactor. Several processes may share the file (a busy timeout
makes them wait for each other instead of failing with C{database is
locked}). Every update is one upsert statement; a limit check and its
upserts run in one C{BEGIN IMMEDIATE} transaction, which holds the write
lock from its first statement, so no other writer can slip in between.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
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
    GreylistState,
    StoreError,
)
from pfxpold.state.memory import ExpiringStore

DEFAULT_BUSY_TIMEOUT = 5.0

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
"""

_ADD = """
INSERT INTO counters (key, count, expires) VALUES (:key, :amount, :expires)
ON CONFLICT (key) DO UPDATE SET
    count = CASE WHEN expires > :now THEN count + excluded.count ELSE excluded.count END,
    expires = max(expires, excluded.expires)
"""

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
INSERT INTO triplets (key, first_seen, passes, attempts, expires)
VALUES (:triplet, :now, 0, 1, :now + :retry_window)
ON CONFLICT (key) DO UPDATE SET
    first_seen = CASE WHEN {_STALE} THEN :now ELSE first_seen END,
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


def _total_query(counters: Sequence[Counter]) -> tuple[str, list[Any]]:
    """
    One SELECT that sums each counter's live keys.
    """
    parts = []
    parameters: list[Any] = []
    for counter in counters:
        marks = ", ".join("?" for _ in counter.read_keys)
        parts.append(
            f"(SELECT COALESCE(SUM(count), 0) FROM counters WHERE key IN ({marks}) AND expires > ?)"
        )
        parameters.extend(counter.read_keys)
        parameters.append(None)
    return "SELECT " + ", ".join(parts), parameters


class _Transaction:
    """
    C{BEGIN IMMEDIATE} ... C{COMMIT}, rolled back on any error.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> sqlite3.Connection:
        self.connection.execute("BEGIN IMMEDIATE")
        return self.connection

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.connection.execute("COMMIT")
        else:
            self.connection.execute("ROLLBACK")


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
    return connection


def consume_in(
    connection: sqlite3.Connection, counters: Sequence[Counter], amount: int, now: float
) -> Consumption:
    query, parameters = _total_query(counters)
    parameters = [now if p is None else p for p in parameters]
    with _Transaction(connection):
        totals = tuple(int(t) for t in connection.execute(query, parameters).fetchone())
        if any(total + amount > c.limit for total, c in zip(totals, counters, strict=True)):
            return Consumption(False, totals)
        for c in counters:
            connection.execute(
                _ADD, {"key": c.key, "amount": amount, "expires": c.expires_at, "now": now}
            )
    return Consumption(True, tuple(total + amount for total in totals))


def release_in(
    connection: sqlite3.Connection, counters: Sequence[Counter], amount: int, now: float
) -> None:
    with _Transaction(connection):
        connection.executemany(_RELEASE, [{"key": c.key, "amount": amount} for c in counters])


def greylist_in(connection: sqlite3.Connection, **values: Any) -> GreylistState:
    with _Transaction(connection):
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


def expire_in(connection: sqlite3.Connection, now: float) -> int:
    removed = 0
    with _Transaction(connection):
        for table in ("counters", "triplets", "clients"):
            removed += connection.execute(
                f"DELETE FROM {table} WHERE expires <= ?", (now,)
            ).rowcount
    return removed


@implementer(IStateStore)
class SQLiteStore(ExpiringStore):
    """
    State in an SQLite file, written by one connection in one thread.

    Settings of C{[stores.NAME]}: C{path} (relative to the configuration
    file; default C{pfxpold-state.sqlite3}), C{busy_timeout} (seconds to
    wait for another process's lock, default 5), C{expire_interval}.

    @param run: for tests: a callable C{run(function, *args)} returning a
        Deferred of C{function(connection, *args)}; without it, calls go to a
        one-thread pool started with the service.
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

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = open_database(self.path, self.busy_timeout)
        return self._connection

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        def in_thread() -> Any:
            try:
                return function(self._connect(), *args, **kwargs)
            except sqlite3.Error as e:
                raise StoreError(f"{self.name}: {self.path}: {e}") from e

        if self._run_for_tests is not None:
            return self._run_for_tests(in_thread)
        if self._pool is None:
            return fail(StoreError(f"{self.name}: not started"))
        return deferToThreadPool(self.reactor, self._pool, in_thread)

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

    def stopService(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        await super().stopService()
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
        )

    def expire(self, now: float) -> Deferred[int]:
        return self._call(expire_in, now)
