"""
The C{sql} check: looks a request up in a database with a query the
administrator writes, through L{twisted.enterprise.adbapi}'s bounded pool
of threads and connections.

SQLite (a database file is all it needs) and PostgreSQL (through psycopg
3) are supported. The query names its parameters as C{:sender},
C{:client_address}, C{:sender_domain}...; they are translated to the
driver's placeholders and the values are always bound by the driver, never
put into the SQL text.

A query that does not answer within C{query_timeout}, or that the chain's
C{timeout} gives up on, is interrupted (SQLite's C{interrupt()}, or the
PostgreSQL connection's socket shut down) so that pool threads never stay
stuck on a database that does not answer; the connection is then replaced.
A connection that the server closed (after a restart) is replaced and the
query retried once on a fresh one.
"""

from __future__ import annotations

import math
import os
import re
import socket

# adbapi imports the driver module by name when the pool starts, which is
# after twistd chroots: import it now, while the standard library is there.
import sqlite3  # noqa: F401
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Optional

from twisted.application.service import Service
from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.accessmap import attribute_value, check_attribute
from pfxpold.action import Action, ActionError
from pfxpold.checks import MissingExtraError, extra_advice
from pfxpold.checks._values import ControlCharacterGuard
from pfxpold.config import CheckOptions
from pfxpold.escape import escape
from pfxpold.interfaces import ICheck
from pfxpold.request import PolicyRequest

psycopg: Any
try:
    import psycopg
except ImportError:  # pragma: no cover - the postgresql extra is not installed
    psycopg = None

DRIVERS = ("sqlite", "postgresql")
DEFAULT_POOL_SIZE = 4
DEFAULT_MAX_WAITING = 100
DEFAULT_QUERY_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_CACHE_SIZE = 10000

#: Results for longer parameter values (in characters, all together) are
#: not cached: real addresses are far shorter, and a client sending huge
#: values could otherwise fill the cache's memory.
MAX_CACHED_KEY_LENGTH = 1024

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


class QueryError(ValueError):
    """
    A query's text cannot be used.
    """


class ResultError(ValueError):
    """
    A query answered something that is not an action.
    """


class DatabaseBusy(RuntimeError):
    """
    Too many lookups are waiting for the database already.
    """


def translate_query(query: str, placeholder: str, escape_percent: bool) -> tuple[str, list[str]]:
    """
    Translate a query written with C{:name} parameters to a driver's
    positional placeholders.

    Quoted strings (C{'...'}, C{E'...'}, C{$tag$...$tag$}), quoted
    identifiers and comments are copied as they are; C{::} (a PostgreSQL
    cast) is not a parameter.

    @param placeholder: C{"?"} (SQLite) or C{"%s"} (psycopg).
    @param escape_percent: whether a literal C{%} must be written C{%%}
        (psycopg, whose placeholders start with C{%}).
    @return: the translated query and the parameter names, in the order
        of their placeholders (a name used twice appears twice).
    @raise QueryError: for unterminated quotes or comments, or another
        parameter syntax (C{?}, C{$1}).
    """
    parts: list[str] = []
    names: list[str] = []
    length = len(query)

    def copy(text: str) -> None:
        parts.append(text.replace("%", "%%") if escape_percent else text)

    index = 0
    while index < length:
        char = query[index]
        if char in "'\"":
            backslashes = (
                char == "'"
                and index > 0
                and query[index - 1] in "eE"
                and (index < 2 or not (query[index - 2].isalnum() or query[index - 2] == "_"))
            )
            end = index + 1
            while True:
                if end >= length:
                    raise QueryError(f"unterminated {char} quote at character {index + 1}")
                if backslashes and query[end] == "\\":
                    end += 2
                    continue
                if query[end] == char:
                    if end + 1 < length and query[end + 1] == char:
                        end += 2
                        continue
                    break
                end += 1
            copy(query[index : end + 1])
            index = end + 1
        elif query.startswith("--", index):
            end = query.find("\n", index)
            end = length if end < 0 else end
            copy(query[index:end])
            index = end
        elif query.startswith("/*", index):
            end = query.find("*/", index + 2)
            if end < 0:
                raise QueryError(f"unterminated comment at character {index + 1}")
            copy(query[index : end + 2])
            index = end + 2
        elif char == "$":
            tag = _DOLLAR_TAG.match(query, index)
            if tag:
                end = query.find(tag.group(), tag.end())
                if end < 0:
                    raise QueryError(f"unterminated {tag.group()} quote at character {index + 1}")
                copy(query[index : end + len(tag.group())])
                index = end + len(tag.group())
            elif index + 1 < length and query[index + 1].isdigit():
                raise QueryError("write parameters as :name, not $1")
            else:
                copy(char)
                index += 1
        elif char == ":":
            if query.startswith("::", index):
                copy("::")
                index += 2
                continue
            name = _IDENTIFIER.match(query, index + 1)
            if name is None:
                copy(char)
                index += 1
                continue
            names.append(name.group())
            parts.append(placeholder)
            index = name.end()
        elif char == "?" and placeholder == "?":
            raise QueryError("write parameters as :name, not ?")
        else:
            copy(char)
            index += 1
    return "".join(parts), names


class LookupCache:
    """
    Results of recent lookups, found ones kept for C{positive_ttl} seconds
    and not-found ones for C{negative_ttl} seconds, at most C{max_entries}
    of them (the least recently used go first).
    """

    def __init__(
        self, clock: IReactorTime, positive_ttl: float, negative_ttl: float, max_entries: int
    ) -> None:
        self._clock = clock
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> tuple[bool, Any]:
        """
        @return: C{(True, value)} for a fresh entry, C{(False, None)} else.
        """
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        expires, value = entry
        if self._clock.seconds() >= expires:
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, value

    def put(self, key: Hashable, value: Any, found: bool) -> None:
        """
        Remember C{value} for C{key} (if its TTL is not 0).
        """
        ttl = self.positive_ttl if found else self.negative_ttl
        if ttl <= 0:
            return
        self._entries[key] = (self._clock.seconds() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class SQLiteDriver:
    """
    SQLite through the standard library's C{sqlite3}: one connection (a
    second one would only wait for the first), opened read-only so that a
    mistyped path is an error rather than a new empty database.
    """

    module = "sqlite3"
    placeholder = "?"
    escape_percent = False
    max_connections = 1

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.connect_args = (f"file:{urllib.parse.quote(path)}?mode=ro",)
        self.connect_keywords = {
            "uri": True,
            "check_same_thread": False,
            "timeout": busy_timeout,
            "isolation_level": None,
        }

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def probe(self) -> Optional[str]:
        """
        Open the database as the pool will (read-only: never created) and
        read its schema.

        @return: what is wrong with it, or L{None}.
        """
        if not os.path.exists(self.path):
            return f"{self.path} does not exist"
        try:
            connection = sqlite3.connect(*self.connect_args, uri=True, timeout=1.0)
            try:
                connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                connection.close()
        except sqlite3.Error as e:
            return f"cannot open {self.path}: {e}"
        return None

    def fetch_one(
        self, connection: Any, sql: str, values: Sequence[Any], abandoned: Callable[[], bool]
    ) -> Optional[tuple]:
        """
        Run the query; in a pool thread.

        @param abandoned: tells whether nobody waits for the answer any
            more; SQLite asks it every few thousand steps of the query, so a
            runaway query stops even if C{interrupt} came before it started.
        """
        connection.set_progress_handler(abandoned, 10000)
        cursor = connection.cursor()
        try:
            cursor.execute(sql, values)
            return cursor.fetchone()
        finally:
            cursor.close()
            connection.set_progress_handler(None, 0)

    def is_broken(self, connection: Any) -> bool:
        return False

    def interrupt(self, connection: Any) -> None:
        """
        Stop the query running on C{connection}; from the reactor thread.
        """
        connection.interrupt()


class PostgreSQLDriver:
    """
    PostgreSQL through psycopg 3, in autocommit mode (lookups need no
    transaction), with a server-side statement timeout and libpq's connect
    timeout.
    """

    module = "psycopg"
    placeholder = "%s"
    escape_percent = True
    max_connections: Optional[int] = None

    def __init__(
        self,
        conninfo: str,
        password: Optional[str],
        connect_timeout: float,
        query_timeout: float,
    ) -> None:
        if psycopg is None:
            raise MissingExtraError(extra_advice("psycopg"))
        self.conninfo = conninfo
        self.connect_args = (conninfo,)
        self.connect_keywords: dict[str, Any] = {
            "autocommit": True,
            # libpq counts whole seconds and takes nothing under 2.
            "connect_timeout": max(2, math.ceil(connect_timeout)),
            "options": f"-c statement_timeout={max(1, int(query_timeout * 1000))}",
            "application_name": "pfxpold",
        }
        if password is not None:
            self.connect_keywords["password"] = password

    def describe(self) -> str:
        try:
            parts = psycopg.conninfo.conninfo_to_dict(self.conninfo)
        except Exception:
            return "PostgreSQL"
        return (
            f"PostgreSQL {parts.get('host', '')}:{parts.get('port', '')}/{parts.get('dbname', '')}"
        )

    def fetch_one(
        self, connection: Any, sql: str, values: Sequence[Any], abandoned: Callable[[], bool]
    ) -> Optional[tuple]:
        """
        Run the query; in a pool thread. (An abandoned query is stopped by
        L{interrupt}, which breaks the connection even between queries.)
        """
        with connection.cursor() as cursor:
            cursor.execute(sql, values)
            return cursor.fetchone()

    def is_broken(self, connection: Any) -> bool:
        return bool(connection.closed or connection.broken)

    def interrupt(self, connection: Any) -> None:
        # A cancel request would go to the postmaster, which may be the one
        # not answering; shutting the socket down wakes the blocked thread
        # at once, and the connection is then replaced.
        try:
            descriptor = connection.pgconn.socket
        except Exception:
            return
        duplicate = socket.socket(fileno=os.dup(descriptor))
        try:
            duplicate.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            duplicate.close()


class _Lookup:
    """
    One lookup in flight: whether it was abandoned, and the connection it
    runs on (so the reactor thread can interrupt it).
    """

    __slots__ = ("cancelled", "connection", "lock")

    def __init__(self) -> None:
        self.cancelled = False
        self.connection: Any = None
        self.lock = threading.Lock()


class Database:
    """
    A bounded pool of connections to one database, each used by one thread
    of the pool's bounded thread pool.
    """

    _log = Logger()

    def __init__(
        self,
        driver: Any,
        reactor: Any,
        pool_size: int,
        max_waiting: int,
        query_timeout: float,
    ) -> None:
        self.driver = driver
        self.reactor = reactor
        self.pool_size = min(pool_size, driver.max_connections or pool_size)
        self.max_in_flight = self.pool_size + max_waiting
        self.query_timeout = query_timeout
        self.pool: Optional[ConnectionPool] = None
        self._in_flight: set[_Lookup] = set()

    def start(self) -> None:
        self.pool = ConnectionPool(
            self.driver.module,
            *self.driver.connect_args,
            cp_min=1,
            cp_max=self.pool_size,
            cp_noisy=False,
            cp_reactor=self.reactor,
            **self.driver.connect_keywords,
        )

    def stop(self) -> None:
        for lookup in list(self._in_flight):
            self._interrupt(lookup)
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def lookup(self, sql: str, values: Sequence[Any]) -> Deferred[Optional[tuple]]:
        """
        Run C{sql} with C{values} bound.

        @return: a Deferred that fires with the first row or L{None}; it
            fails with L{DatabaseBusy} at once when too many lookups wait,
            with L{TimeoutError} after C{query_timeout}, or with the
            driver's error. Cancelling it interrupts the query.
        """
        if self.pool is None:
            return fail(RuntimeError("the database pool is not running"))
        if len(self._in_flight) >= self.max_in_flight:
            return fail(
                DatabaseBusy(f"{len(self._in_flight)} lookups already wait for the database")
            )
        lookup = _Lookup()
        self._in_flight.add(lookup)
        result: Deferred[Optional[tuple]] = Deferred(lambda _: self._interrupt(lookup))
        running = deferToThreadPool(
            self.reactor, self.pool.threadpool, self._run, self.pool, lookup, sql, values
        )

        def finished(outcome: Any) -> None:
            self._in_flight.discard(lookup)
            if result.called:
                return None
            if isinstance(outcome, Failure):
                result.errback(outcome)
                return None
            row, retried_after = outcome
            if retried_after is not None:
                self._log.info(
                    "{database}: a connection had failed ({error}); reconnected",
                    database=self.driver.describe(),
                    error=escape(str(retried_after)),
                )
            result.callback(row)
            return None

        running.addBoth(finished)
        result.addTimeout(self.query_timeout, self.reactor)
        return result

    def _run(
        self, pool: ConnectionPool, lookup: _Lookup, sql: str, values: Sequence[Any]
    ) -> tuple[Optional[tuple], Optional[str]]:
        """
        Run the query on this thread's connection; in a pool thread.
        """
        driver = self.driver
        retried_after: Optional[str] = None
        while True:
            if lookup.cancelled:
                raise CancelledError()
            connection = pool.connect()
            with lookup.lock:
                if lookup.cancelled:
                    raise CancelledError()
                lookup.connection = connection
            try:
                row = driver.fetch_one(connection, sql, values, lambda: lookup.cancelled)
                return row, retried_after
            except Exception as e:
                broken = driver.is_broken(connection)
                if broken:
                    pool.disconnect(connection)
                # A connection the server closed (a restart) fails once:
                # retry on a fresh one, once.
                if not broken or retried_after is not None or lookup.cancelled:
                    raise
                # libpq's messages span lines; the log line should not.
                retried_after = " ".join(f"{type(e).__name__}: {e}".split())
            finally:
                with lookup.lock:
                    lookup.connection = None

    def _interrupt(self, lookup: _Lookup) -> None:
        with lookup.lock:
            lookup.cancelled = True
            if lookup.connection is not None:
                try:
                    self.driver.interrupt(lookup.connection)
                except Exception:
                    self._log.failure("cannot interrupt a query")


class _SharedLookup:
    """
    One lookup in flight and the requests waiting for its answer.
    """

    __slots__ = ("lookup", "waiters")

    def __init__(self) -> None:
        # The database's Deferred, kept only to cancel it: its callbacks
        # turn the row into an action and hand it to the waiters.
        self.lookup: Optional[Deferred[Any]] = None
        self.waiters: list[Deferred[Action]] = []

    def wait(self) -> Deferred[Action]:
        """
        @return: a Deferred of the lookup's action for one more request.
        """
        waiter: Deferred[Action] = Deferred(self._give_up)
        self.waiters.append(waiter)
        return waiter

    def _give_up(self, waiter: Deferred[Action]) -> None:
        self.waiters.remove(waiter)
        if not self.waiters and self.lookup is not None and not self.lookup.called:
            self.lookup.cancel()

    def deliver(self, outcome: Any) -> None:
        """
        Give every waiting request the lookup's action or failure.
        """
        for waiter in tuple(self.waiters):
            if waiter.called:
                continue
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)
        self.waiters.clear()


@implementer(ICheck)
class SQLCheck(Service):
    """
    Looks a request up with an SQL query. With C{found}, a row answers
    C{found} and no row C{not_found}; without it, the first column of the
    first row is the action, and no row (or NULL) answers C{not_found}.
    """

    _log = Logger()

    def __init__(self, options: CheckOptions, database: Optional[Any] = None) -> None:
        """
        @param database: what runs the queries (tests give a fake); by
            default a L{Database} for the configured driver, started with
            the service.
        """
        self.check_name = options.name
        self._restriction_classes = options.restriction_classes
        driver_name = options.choice("driver", DRIVERS, "sqlite")
        query_timeout = options.number("query_timeout", DEFAULT_QUERY_TIMEOUT, positive=True)
        connect_timeout = options.number("connect_timeout", DEFAULT_CONNECT_TIMEOUT, positive=True)
        pool_size = options.integer("pool_size", DEFAULT_POOL_SIZE, minimum=1)
        max_waiting = options.integer("max_waiting", DEFAULT_MAX_WAITING, minimum=0)
        driver: Any
        if driver_name == "sqlite":
            driver = SQLiteDriver(options.path("database"), busy_timeout=query_timeout)
            if database is None:
                # Opened now, so that --check-config reports a missing or
                # unreadable file, not the first request.
                problem = driver.probe()
                if problem is not None:
                    raise options.error("database", problem)
        else:
            conninfo = options.string("conninfo")
            password = options.secret("password_file", None)
            if psycopg is None:
                # config.py reports it as one line naming the check.
                raise MissingExtraError(extra_advice("psycopg"))
            try:
                psycopg.conninfo.conninfo_to_dict(conninfo)
            except psycopg.ProgrammingError as e:
                raise options.error("conninfo", f"is not a libpq connection string: {e}") from None
            driver = PostgreSQLDriver(conninfo, password, connect_timeout, query_timeout)
        try:
            self.sql, self.parameters = translate_query(
                options.string("query"), driver.placeholder, driver.escape_percent
            )
            for name in self.parameters:
                check_attribute(name)
        except ValueError as e:
            raise options.error("query", str(e)) from None
        self.found = options.action("found", None)
        self.not_found = options.action("not_found", "DUNNO")
        cache_size = options.integer("cache_size", DEFAULT_CACHE_SIZE, minimum=0)
        positive_ttl = options.number("cache_positive_ttl", 0.0)
        negative_ttl = options.number("cache_negative_ttl", 0.0)
        for key, ttl in (
            ("cache_positive_ttl", positive_ttl),
            ("cache_negative_ttl", negative_ttl),
        ):
            if ttl < 0:
                raise options.error(key, "must be 0 (no caching) or more seconds")
        self.cache: Optional[LookupCache] = None
        if cache_size and (positive_ttl > 0 or negative_ttl > 0):
            self.cache = LookupCache(options.reactor, positive_ttl, negative_ttl, cache_size)
        self._own_database = database is None
        if database is None:
            database = Database(driver, options.reactor, pool_size, max_waiting, query_timeout)
        self.database = database
        self._waiting: dict[tuple, _SharedLookup] = {}
        self.guard = ControlCharacterGuard(self.check_name)

    def startService(self) -> None:
        super().startService()
        if self._own_database:
            self.database.start()

    def stopService(self) -> None:
        super().stopService()
        if self._own_database:
            self.database.stop()

    def verify(self) -> Deferred[None]:
        """
        Open a connection to the database, once started: a reload swaps in
        a configuration only when this succeeds (a missing SQLite file, a
        refused login).
        """
        pool = getattr(self.database, "pool", None)
        if pool is None:
            return succeed(None)
        return pool.runWithConnection(lambda connection: None)

    def check(self, request: PolicyRequest) -> Any:
        """
        The action from the cache, or a Deferred that fires with it once the
        database answered.

        With a cache, requests that miss on the same values while their
        lookup runs wait for that one lookup instead of asking again: a
        burst of requests from one client (a cold cache after a restart,
        or many recipients at once) then costs one query, not one each,
        and cannot fill the pool's queue until lookups are refused.
        """
        values = [attribute_value(request, name) for name in self.parameters]
        if self.guard.refuses(zip(self.parameters, values, strict=True)):
            # PostgreSQL refuses a NUL in text, SQLite compares it: either
            # way no row holds such a value, so: not found.
            return self.not_found
        key = tuple(values)
        cache = self.cache
        if cache is None:
            return self.database.lookup(self.sql, values).addCallback(self._to_action, key)
        hit, action = cache.get(key)
        if hit:
            return action
        if sum(len(value or "") for value in key) > MAX_CACHED_KEY_LENGTH:
            # Not cached, so not shared either: no memory for huge keys.
            return self.database.lookup(self.sql, values).addCallback(self._to_action, key)
        return self._shared_lookup(key, values)

    def _shared_lookup(self, key: tuple, values: list[Any]) -> Deferred[Action]:
        """
        A Deferred of the action for C{key}, from the lookup already in
        flight for it or from a new one.

        Each request gets its own Deferred: cancelling one (the chain's
        timeout) leaves the others waiting; the lookup itself is cancelled
        (interrupted) only when every request waiting for it gave up.
        """
        shared = self._waiting.get(key)
        if shared is not None:
            return shared.wait()
        shared = _SharedLookup()
        waiter = shared.wait()
        # Registered before the lookup starts, which may answer at once.
        self._waiting[key] = shared
        try:
            lookup = shared.lookup = self.database.lookup(self.sql, values)
        except BaseException:
            del self._waiting[key]
            raise
        lookup.addCallback(self._to_action, key).addBoth(self._deliver, key, shared)
        return waiter

    def _deliver(self, outcome: Any, key: tuple, shared: _SharedLookup) -> None:
        if self._waiting.get(key) is shared:
            del self._waiting[key]
        shared.deliver(outcome)

    def _to_action(self, row: Optional[Sequence[Any]], key: tuple) -> Action:
        found = row is not None and (self.found is not None or row[0] is not None)
        if not found:
            action = self.not_found
        elif self.found is not None:
            action = self.found
        else:
            value = row[0]
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            try:
                action = Action.parse(str(value).strip(), self._restriction_classes)
            except ActionError as e:
                raise ResultError(f"the query answered {str(value)[:100]!r}: {e}") from None
        if (
            self.cache is not None
            and sum(len(value or "") for value in key) <= MAX_CACHED_KEY_LENGTH
        ):
            self.cache.put(key, action, found)
        return action
