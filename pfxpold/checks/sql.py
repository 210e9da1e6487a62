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

from collections.abc import Sequence
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from pfxpold.accessmap import attribute_value, check_attribute
from pfxpold.action import Action, ActionError
from pfxpold.cache import Coalescer, ExpiringCache
from pfxpold.checks import MissingExtraError, extra_advice
from pfxpold.checks._values import ControlCharacterGuard
from pfxpold.config import CheckOptions
from pfxpold.interfaces import ICheck
from pfxpold.request import PolicyRequest
from pfxpold.sql.drivers import (
    MySQLDriver,
    PostgreSQLDriver,
    SQLiteDriver,
    URLError,
    psycopg,
    pymysql,
)
from pfxpold.sql.keys import KEY_LISTS, LIST_SUFFIX, check_key_list
from pfxpold.sql.params import parse_query
from pfxpold.sql.pool import Database

DRIVERS = ("sqlite", "postgresql", "mysql", "mariadb")
DEFAULT_POOL_SIZE = 4
DEFAULT_MAX_WAITING = 100
DEFAULT_QUERY_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_CACHE_SIZE = 10000

#: Results for longer parameter values (in characters, all together) are
#: not cached: real addresses are far shorter, and a client sending huge
#: values could otherwise fill the cache's memory.
MAX_CACHED_KEY_LENGTH = 1024


class ResultError(ValueError):
    """
    A query answered something that is not an action.
    """


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
        elif driver_name in ("mysql", "mariadb"):
            url = options.string("url")
            password = options.secret("password_file", None)
            if pymysql is None:
                raise MissingExtraError(extra_advice("pymysql"))
            try:
                driver = MySQLDriver(url, password, connect_timeout, query_timeout)
            except URLError as e:
                raise options.error("url", str(e)) from None
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
            self.query = parse_query(
                options.string("query"), driver.placeholder, driver.escape_percent, driver.dialect
            )
            #: Each value name once: a key list's values come from its
            #: attribute, which the guard and the cache key see.
            self.parameters = list(dict.fromkeys(self.query.names))
            for name in self.parameters:
                if name.endswith(LIST_SUFFIX):
                    check_key_list(name)
                else:
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
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.cache: Optional[ExpiringCache[tuple, Action]] = None
        if cache_size and (positive_ttl > 0 or negative_ttl > 0):
            self.cache = ExpiringCache(options.reactor, cache_size)
        self._own_database = database is None
        if database is None:
            database = Database(driver, options.reactor, pool_size, max_waiting, query_timeout)
        self.database = database
        #: The lookups in flight, shared by requests with the same values.
        self.in_flight: Coalescer[tuple, Action] = Coalescer(cancel_abandoned=True)
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
        sources = [KEY_LISTS[name][0] if name in KEY_LISTS else name for name in self.parameters]
        values = [attribute_value(request, name) for name in sources]
        key = tuple(values)
        cache = self.cache
        if cache is not None:
            # First, so that a warm cache costs one lookup: values the
            # guard refuses are never looked up, so never cached either.
            action = cache.get(key)
            if action is not None:
                return action
        if self.guard.refuses(zip(sources, values, strict=True)):
            # PostgreSQL refuses a NUL in text, SQLite compares it: either
            # way no row holds such a value, so: not found.
            return self.not_found
        sql, values = self.query.bind(
            {
                name: KEY_LISTS[name][1](request) if name in KEY_LISTS else value
                for name, value in zip(self.parameters, values, strict=True)
            }
        )
        if cache is None:
            return self.database.lookup(sql, values).addCallback(self._to_action, key)
        if sum(len(value or "") for value in key) > MAX_CACHED_KEY_LENGTH:
            # Not cached, so not shared either: no memory for huge keys.
            return self.database.lookup(sql, values).addCallback(self._to_action, key)
        # Each request gets its own Deferred: cancelling one (the chain's
        # timeout) leaves the others waiting; the query is interrupted
        # only when every request waiting for it gave up.
        return self.in_flight.run(
            key, lambda: self.database.lookup(sql, values).addCallback(self._to_action, key)
        )

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
            self.cache.put(key, action, self.positive_ttl if found else self.negative_ttl)
        return action
