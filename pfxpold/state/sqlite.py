"""
The SQLite state store: the embedded default. State survives a restart of
the daemon and needs no server.

All statements run on one connection, on the reactor thread: an
operation's statements are cheaper than a hop to another thread and back
(and the two threads' fight for the GIL), so an operation is run at once
and its Deferred has fired when it is returned, keeping the checks on their
synchronous path.

Operations are committed once per reactor turn: the first operation of a
turn begins a C{BEGIN IMMEDIATE} transaction and schedules its C{COMMIT}
(C{callLater(0)}, which runs once the turn's network input is handled), so
a busy daemon pays one commit for all the messages of a turn. C{BEGIN
IMMEDIATE} holds the write lock from the start, so no other writer can
slip in between a limit check and its upserts; operations run one after
the other, in the order they were asked for, each seeing the ones before
it. One that fails is rolled back alone and fails only its own Deferred
(see L{SQLiteStore._run}).

Operations are answered before their turn's commit. When the commit fails
(a full disk, an I/O error), that turn's operations were answered but are
not stored: at most one turn's quota counts or greylist entries are lost,
and this is logged as critical with their number. A crash loses what
C{synchronous=NORMAL} in WAL mode may lose: the last commits before a power
failure, never the file's consistency.

Several processes may share the file (C{--workers}, or C{pfxpold-admin}):
an operation that finds the lock taken never blocks the reactor; it waits,
with those asked for after it, for a retry from a timer, and fails with
L{StoreError} (C{database is locked}) after C{busy_timeout}. Once another
process has held the lock, and for L{SHARED_FOR} seconds since it last
did, the store holds the lock as briefly as it can: the operations of a
turn run together at its end, in one transaction, and are answered after
its commit.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
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
    Once,
    StoreError,
    Triplet,
    WhitelistEntry,
)
from pfxpold.state.memory import ExpiringStore, matches

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
CREATE TABLE IF NOT EXISTS whitelist (
    kind TEXT NOT NULL, value TEXT NOT NULL, added REAL NOT NULL, comment TEXT NOT NULL,
    PRIMARY KEY (kind, value)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marks (
    key TEXT NOT NULL, mark TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key, mark)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS marks_expires ON marks (expires);
CREATE TABLE IF NOT EXISTS counted (
    key BLOB PRIMARY KEY, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counted_by_arrival (
    key BLOB PRIMARY KEY, expires REAL NOT NULL
) WITHOUT ROWID;
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

# The common case of _CONSUME_ONE first: a live row with room, read
# (_READ_ONE), then added to by an UPDATE by primary key that checks the
# same conditions again, inside the turn's write transaction: cheaper than
# the upsert, which is run only when there is no row (a new window; an
# expired row, or one without room, goes to the general path), and than
# the same UPDATE with RETURNING (SQLite runs RETURNING as a trigger into
# a temporary table: 4.1 us against 1.6 + 1.8).
_READ_ONE = "SELECT count, expires FROM counters WHERE key = ?1"
_ADD_ONE = """
UPDATE counters SET count = count + ?1
WHERE key = ?2 AND expires > ?3 AND count + ?1 <= ?4
"""

# A counted-once mark, set unless a live one is there: no row changed
# means the message was counted before. A mark is a new row per message,
# and what it costs is the pages each commit writes. Marks are keyed by the
# message's arrival (Postfix's instance tells it: L{arrival_of}), then a
# 16-byte digest of their key (L{_mark_key}), so that the marks of a turn,
# arriving together, land on the last page or two of the tree instead of
# one page each at random places; and they have no index on their expiry
# (the sweep scans them).
_MARK = """
INSERT INTO counted_by_arrival (key, expires) VALUES (?1, ?2)
ON CONFLICT (key) DO UPDATE SET expires = excluded.expires WHERE expires <= ?3
"""
_UNMARK = "DELETE FROM counted_by_arrival WHERE key = ?1 AND expires > ?2"
_FORGET_MARK = "DELETE FROM counted_by_arrival WHERE key = ?1"

# The marks of a file written before marks were kept by arrival, in the
# table C{counted}, keyed by the digest alone (L{_legacy_mark_key}): looked
# up too while it holds any (at most an hour, L{COUNTED_FOR}, after the
# upgrade), so that a message counted before it is not counted again.
_LEGACY_MARKED = "SELECT 1 FROM counted WHERE key = ?1 AND expires > ?2"
_LEGACY_MARKS = "SELECT EXISTS (SELECT 1 FROM counted)"

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
    connection.execute("PRAGMA temp_store=MEMORY")
    connection.executescript(_SCHEMA)
    columns = {row[1] for row in connection.execute("PRAGMA table_info(triplets)")}
    for column in _CLEAR_COLUMNS:
        if column not in columns:
            connection.execute(f"ALTER TABLE triplets ADD COLUMN {column} TEXT")
    return connection


def arrival_of(instance: str) -> int:
    """
    When the message of Postfix's C{instance} arrived, in microseconds,
    from 0 to 2 ** 63 - 1: smtpd makes it C{pid.seconds.microseconds.sequence}
    in hexadecimal at MAIL FROM. Only where the message's mark is kept
    depends on it (L{_mark_key}), never whether the message is counted: any
    other C{instance} gives 0 (or, when it looks enough like one, some
    other number).
    """
    try:
        _, seconds, microseconds, _ = instance.split(".")
        if len(seconds) <= 12 and len(microseconds) <= 5:
            return (int(seconds, 16) * 1_000_000 + int(microseconds, 16)) & _ARRIVAL_MASK
    except ValueError:
        pass
    return 0


_ARRIVAL_MASK = 2**63 - 1


def _legacy_mark_key(once: Once) -> bytes:
    return hashlib.blake2b(once.key.encode("utf-8"), digest_size=16).digest()


def _mark_key(once: Once) -> bytes:
    return arrival_of(once.instance).to_bytes(8, "big") + _legacy_mark_key(once)


def has_legacy_marks(connection: sqlite3.Connection) -> bool:
    """
    Whether the file holds marks kept before marks were kept by arrival.
    """
    return bool(connection.execute(_LEGACY_MARKS).fetchone()[0])


def consume_in(
    connection: sqlite3.Connection,
    counters: Sequence[Counter],
    amount: int,
    now: float,
    once: Optional[Once] = None,
    legacy_marks: bool = False,
) -> Consumption:
    if once is None:
        return _consume_in(connection, counters, amount, now)
    if (
        legacy_marks
        and connection.execute(_LEGACY_MARKED, (_legacy_mark_key(once), now)).fetchone()
    ):
        return Consumption(True, (), repeated=True)
    key = _mark_key(once)
    if not connection.execute(_MARK, (key, once.expires_at, now)).rowcount:
        return Consumption(True, (), repeated=True)
    result = _consume_in(connection, counters, amount, now)
    if not result.allowed:
        connection.execute(_FORGET_MARK, (key,))
    return result


def _consume_in(
    connection: sqlite3.Connection, counters: Sequence[Counter], amount: int, now: float
) -> Consumption:
    if len(counters) == 1:
        counter = counters[0]
        if counter.read_keys == (counter.key,):
            key, limit = counter.key, counter.limit
            row = connection.execute(_READ_ONE, (key,)).fetchone()
            if row is not None:
                # With room, add; else (expired, or no room) the general
                # path. The write lock is held: nothing changed it since.
                count, expires = row
                if (
                    expires > now
                    and count + amount <= limit
                    and connection.execute(_ADD_ONE, (amount, key, now, limit)).rowcount
                ):
                    row = (count + amount, expires)
                else:
                    row = None
            else:
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
    connection: sqlite3.Connection,
    counters: Sequence[Counter],
    amount: int,
    now: float,
    once: Optional[Once] = None,
) -> None:
    if once is not None and not connection.execute(_UNMARK, (_mark_key(once), now)).rowcount:
        # Not counted, or taken back already (by this process or another).
        return
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
    for table in ("counters", "triplets", "clients", "marks", "counted", "counted_by_arrival"):
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


#: One operation waiting for the lock: the function, its arguments, and
#: the Deferred to fire.
_Operation = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Deferred[Any]]

#: Seconds between two attempts at a lock another process holds (an
#: attempt never waits: SQLite's busy timeout is 0 once the file is open).
LOCK_RETRY = 0.002
#: Seconds the file counts as shared after another process last held the
#: lock: meanwhile operations are run at the end of each reactor turn, all
#: of the turn's in one short transaction, and answered after its commit,
#: instead of in a transaction held for the whole turn, which would keep
#: the other processes out.
SHARED_FOR = 10.0

_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def is_busy(error: sqlite3.Error) -> bool:
    """
    Whether C{error} is SQLite's C{database is locked}: another process
    holds the lock, and trying again later may succeed.
    """
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    return "locked" in str(error) or "busy" in str(error)


@implementer(IStateStore)
class SQLiteStore(ExpiringStore):
    """
    State in an SQLite file, written by one connection on the reactor
    thread, one transaction per reactor turn.

    Settings of C{[stores.NAME]}: C{path} (relative to the configuration
    file; default C{pfxpold-state.sqlite3}), C{busy_timeout} (seconds an
    operation waits for another process's lock before it fails, default
    5), C{expire_interval}.
    """

    def __init__(self, options: CheckOptions) -> None:
        super().__init__(options)
        self.path = options.path("path", DEFAULT_SQLITE_PATH)
        self.busy_timeout = options.number("busy_timeout", DEFAULT_BUSY_TIMEOUT, positive=True)
        self._connection: Optional[sqlite3.Connection] = None
        self._stopped = False
        #: The operations run in the transaction not yet committed.
        self._turn: list[tuple[Callable[..., Any], tuple, dict]] = []
        self._commit_call: Optional[IDelayedCall] = None
        #: Operations waiting for a lock another process holds, in order.
        self._waiting: deque[_Operation] = deque()
        self._waiting_since = 0.0
        #: Until when another process counts as writing the file too.
        self._shared_until = 0.0
        self._retry_call: Optional[IDelayedCall] = None
        self._idle_waiters: list[Deferred[None]] = []
        #: Whether the file still holds marks of the table C{counted}
        #: (written before marks were kept by arrival): until the sweep
        #: has removed them all, a consume looks them up too.
        self._legacy_marks = False

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = open_database(self.path, self.busy_timeout)
            # Opening may wait for the lock (once); from now on a statement
            # never blocks the reactor: the wait is retries from a timer.
            connection.execute("PRAGMA busy_timeout = 0")
            self._legacy_marks = has_legacy_marks(connection)
            self._connection = connection
        return self._connection

    def _error(self, error: BaseException) -> BaseException:
        if isinstance(error, sqlite3.Error):
            return StoreError(f"{self.name}: {self.path}: {error}")
        return error

    def _begin(self) -> sqlite3.Connection:
        """
        The connection, inside this turn's write transaction: begun by the
        first operation of a turn, committed once when the turn is over.

        @raise sqlite3.Error: when the file cannot be opened or the lock
            taken (L{is_busy}: another process holds it).
        """
        connection = self._connect()
        if not connection.in_transaction:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("SAVEPOINT turn")
            if self._commit_call is None:
                self._commit_call = self.reactor.callLater(0, self._commit)
        return connection

    def _run(self, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """
        Run one operation in this turn's transaction.

        Operations run without a savepoint each (two statements fewer per
        operation). One that fails is undone alone all the same: the turn
        is rolled back to its start (C{SAVEPOINT turn}, the lock still
        held, so nothing else wrote meanwhile) and the turn's earlier
        operations run again, to the same outcomes, as they answered.
        """
        connection = self._begin()
        try:
            outcome = function(connection, *args, **kwargs)
        except Exception:
            if connection.in_transaction:
                self._undo_last(connection)
            else:
                # SQLite rolled the whole transaction back (a full disk,
                # an I/O error): the operations answered before it in this
                # turn are lost too.
                self._lost("the transaction was rolled back")
            raise
        self._turn.append((function, args, kwargs))
        return outcome

    def _undo_last(self, connection: sqlite3.Connection) -> None:
        """
        Undo what a failed operation wrote: back to the turn's start, then
        the turn's earlier operations again.
        """
        connection.execute("ROLLBACK TO turn")
        for function, args, kwargs in self._turn:
            try:
                function(connection, *args, **kwargs)
            except Exception:
                # Not expected (the same statements on the same state): the
                # turn's answers can no longer be trusted to be stored.
                connection.execute("ROLLBACK")
                self._lost("running the turn again after a failed operation failed")
                return

    def _lost(self, reason: str) -> None:
        count = len(self._turn)
        self._turn = []
        if count:
            self._log.critical(
                "{store}: {path}: {reason}: {count} operations already answered are NOT"
                " stored (quota counts or greylist entries lost)",
                store=self.name,
                path=self.path,
                reason=reason,
                count=count,
            )

    def _commit(self) -> None:
        """
        Commit this turn's transaction.
        """
        self._commit_call = None
        connection = self._connection
        if connection is None or not connection.in_transaction:
            self._turn = []
            return
        try:
            connection.execute("COMMIT")
        except sqlite3.Error as e:
            if connection.in_transaction:
                try:
                    connection.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self._lost(f"commit failed: {e}")
        else:
            self._turn = []

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Run C{function(connection, *args, **kwargs)} now, in this turn's
        transaction; while the file is shared (L{SHARED_FOR}), at the end
        of the turn, with the turn's others, in a short transaction.

        @return: a Deferred that has fired with its result (or failed with
            L{StoreError}); while the file is shared, one that fires once
            the turn's operations are committed, or fails after
            C{busy_timeout} when the lock could not be taken.
        """
        if self._stopped:
            return fail(StoreError(f"{self.name}: stopped"))
        if not self._waiting and not (
            self._shared_until and self.reactor.seconds() < self._shared_until
        ):
            try:
                return succeed(self._run(function, args, kwargs))
            except sqlite3.Error as e:
                connection = self._connection
                if not is_busy(e) or connection is None or connection.in_transaction:
                    # Busy inside the transaction is not expected with
                    # BEGIN IMMEDIATE in WAL mode: not worth waiting for.
                    return fail(self._error(e))
                self._shared_until = self.reactor.seconds() + SHARED_FOR
            except Exception as e:
                return fail(e)
        result: Deferred[Any] = Deferred()
        if not self._waiting:
            self._waiting_since = self.reactor.seconds()
        self._waiting.append((function, args, kwargs, result))
        if self._retry_call is None:
            self._retry_call = self.reactor.callLater(0, self._retry)
        return result

    def _retry(self) -> None:
        """
        Run the operations waiting, in order, in one transaction committed
        at once, then answer them; while another process holds the lock,
        try again from a timer, and fail them once C{busy_timeout} is over.
        """
        self._retry_call = None
        if not self._waiting:
            return
        try:
            connection = self._begin()
        except sqlite3.Error as e:
            waited = self.reactor.seconds() - self._waiting_since
            if is_busy(e):
                self._shared_until = self.reactor.seconds() + SHARED_FOR
                if waited < self.busy_timeout:
                    self._retry_call = self.reactor.callLater(LOCK_RETRY, self._retry)
                    return
            waiting, self._waiting = self._waiting, deque()
            for _, _, _, result in waiting:
                result.errback(self._error(e))
            self._idle()
            return
        waiting, self._waiting = self._waiting, deque()
        outcomes: list[tuple[Deferred[Any], bool, Any]] = []
        for function, args, kwargs, result in waiting:
            try:
                outcomes.append((result, True, self._run(function, args, kwargs)))
            except Exception as e:
                outcomes.append((result, False, self._error(e)))
        # Committed now, not at the end of the turn: the lock is held as
        # briefly as can be for the other processes, and these operations,
        # not yet answered, fail if the commit does.
        if self._commit_call is not None:
            self._commit_call.cancel()
            self._commit_call = None
        try:
            if connection.in_transaction:
                connection.execute("COMMIT")
        except sqlite3.Error as e:
            if connection.in_transaction:
                try:
                    connection.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            failed = self._error(e)
            outcomes = [(result, False, failed) for result, _, _ in outcomes]
        self._turn = []
        # Answered once all ran, so that an operation a callback asks for
        # comes after them.
        for result, succeeded, outcome in outcomes:
            if succeeded:
                result.callback(outcome)
            else:
                result.errback(outcome)
        self._idle()

    def _idle(self) -> None:
        if not self._waiting:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _drained(self) -> Deferred[None]:
        """
        @return: a Deferred that fires once no operation waits for the lock.
        """
        if not self._waiting:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        # Open (and create) the file now, so a bad path is logged at start.
        try:
            self._connect()
        except sqlite3.Error as e:
            self._log.error(
                "{store}: cannot open {path}: {reason}", store=self.name, path=self.path, reason=e
            )
        super().startService()

    def verify(self) -> Deferred[None]:
        """
        Open the file: a reload swaps in a configuration only when this
        succeeds.

        @return: a Deferred that fails with L{StoreError} when the file
            cannot be opened.
        """
        try:
            self._connect()
        except sqlite3.Error as e:
            return fail(self._error(e))
        return succeed(None)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        # Operations already asked for are committed before the file closes.
        await self._drained()
        self._stopped = True
        if self._commit_call is not None:
            self._commit_call.cancel()
            self._commit()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()

    def consume(
        self, counters: Sequence[Counter], amount: int, now: float, once: Optional[Once] = None
    ) -> Deferred[Consumption]:
        return self._call(self._consume_in, counters, amount, now, once)

    def _consume_in(
        self,
        connection: sqlite3.Connection,
        counters: Sequence[Counter],
        amount: int,
        now: float,
        once: Optional[Once],
    ) -> Consumption:
        # The file is opened by the operation: only then is it known
        # whether it holds marks of the older table.
        return consume_in(connection, counters, amount, now, once, self._legacy_marks)

    def release(
        self, counters: Sequence[Counter], amount: int, now: float, once: Optional[Once] = None
    ) -> Deferred[None]:
        return self._call(release_in, counters, amount, now, once)

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
        return self._call(self._expire_in, now)

    def _expire_in(self, connection: sqlite3.Connection, now: float) -> int:
        removed = expire_in(connection, now)
        if self._legacy_marks:
            self._legacy_marks = has_legacy_marks(connection)
        return removed

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
