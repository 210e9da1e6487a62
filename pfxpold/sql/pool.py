"""
A bounded pool of connections to one database, through
L{twisted.enterprise.adbapi}'s bounded pool of threads: lookups that wait
too long, or that nobody waits for any more, are interrupted so that pool
threads never stay stuck on a database that does not answer, and a
connection the server closed is replaced and the query retried once.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Optional

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfxpold.chain import CheckUnavailable
from pfxpold.escape import escape


class DatabaseBusy(RuntimeError):
    """
    Too many lookups are waiting for the database already.
    """


class DatabaseUnavailable(CheckUnavailable):
    """
    No connection to the database could be made (the server is down, or
    refused the login or the TLS handshake); the message says why, in one
    line.
    """


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
            cp_openfun=getattr(self.driver, "on_connect", None),
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
            try:
                connection = pool.connect()
            except Exception as e:
                raise DatabaseUnavailable(
                    f"cannot connect to {driver.describe()}: {self._error_text(e)}"
                ) from e
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

    def _error_text(self, error: Exception) -> str:
        """
        What a driver's exception says, in one line.
        """
        explain = getattr(self.driver, "error_text", None)
        text = explain(error) if explain is not None else f"{type(error).__name__}: {error}"
        # libpq's messages span lines; the log line should not.
        return " ".join(text.split())

    def _interrupt(self, lookup: _Lookup) -> None:
        with lookup.lock:
            lookup.cancelled = True
            if lookup.connection is not None:
                try:
                    self.driver.interrupt(lookup.connection)
                except Exception:
                    self._log.failure("cannot interrupt a query")
