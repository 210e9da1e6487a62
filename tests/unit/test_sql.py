"""
Tests for L{pfxpold.checks.sql} and L{pfxpold.sql}: parameter translation, result mapping,
the cache (with a L{Clock}), settings, and the SQLite driver's binding of
hostile values (run synchronously, without the thread pool).
"""

from __future__ import annotations

import os
import sqlite3

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from pfxpold.checks.sql import ResultError, SQLCheck
from pfxpold.config import ConfigError, load_configuration
from pfxpold.interfaces import ICheck
from pfxpold.sql.drivers import PostgreSQLDriver, SQLiteDriver
from pfxpold.sql.params import QueryError, translate_query
from pfxpold.sql.pool import Database, DatabaseBusy, DatabaseUnavailable
from pfxpold.testing import CheckTestCase, make_options, make_request, run_check
from tests.unit.tempdir import examples_copy, sqlite_database, temporary_path

HOSTILE = [
    "x'; DROP TABLE acl; --@example.com",
    "' OR '1'='1",
    "\\'; DELETE FROM acl; --",
    '"; DROP TABLE acl; --',
    "%s %(sender)s %%",
    ":sender ? $1",
    "a\x00b@example.com",
    "ünï©ødé@exämple.com 🙂",
]


class TranslateQueryTests(CheckTestCase):
    """
    C{:name} parameters become the driver's placeholders; nothing else
    changes meaning.
    """

    def test_sqlite(self):
        """Parameters become ?, in order, repeated names repeated."""
        sql, names = translate_query(
            "SELECT a FROM t WHERE x = :sender OR y = :sender AND z=:client_ip", "?", False
        )
        self.assertEqual(sql, "SELECT a FROM t WHERE x = ? OR y = ? AND z=?")
        self.assertEqual(names, ["sender", "sender", "client_ip"])

    def test_psycopg(self):
        """Parameters become %s and literal % doubles, in literals too."""
        sql, names = translate_query("SELECT '100%' FROM t WHERE x LIKE :sender || '%'", "%s", True)
        self.assertEqual(sql, "SELECT '100%%' FROM t WHERE x LIKE %s || '%%'")
        self.assertEqual(names, ["sender"])

    def test_quoted_text_untouched(self):
        """:name inside strings, quoted identifiers and comments is not a parameter."""
        query = (
            "SELECT ':a', 'it''s :b', \"col:c\", E'\\' :d' -- :e\n"
            "/* :f */ $$ :g $$, $tag$ :h $tag$ FROM t WHERE x = :sender"
        )
        sql, names = translate_query(query, "?", False)
        self.assertEqual(names, ["sender"])
        self.assertEqual(sql, query.replace(":sender", "?"))

    def test_casts(self):
        """A PostgreSQL :: cast is not a parameter, also right after one."""
        sql, names = translate_query("SELECT 1 WHERE :client_ip::inet <<= net::inet", "%s", True)
        self.assertEqual(sql, "SELECT 1 WHERE %s::inet <<= net::inet")
        self.assertEqual(names, ["client_ip"])

    def test_lone_colon(self):
        """A colon not followed by a name stays (array slices)."""
        sql, names = translate_query("SELECT a[1:2] FROM t", "?", False)
        self.assertEqual((sql, names), ("SELECT a[1:2] FROM t", []))

    def test_errors(self):
        """Unterminated quotes and other parameter syntaxes are errors."""
        for query in ("SELECT 'x", 'SELECT "x', "SELECT /* x", "SELECT $a$ x", "SELECT E'\\'"):
            self.assertRaises(QueryError, translate_query, query, "?", False)
        self.assertRaises(QueryError, translate_query, "SELECT ?", "?", False)
        self.assertRaises(QueryError, translate_query, "SELECT $1", "%s", True)


class FakeDatabase:
    """
    Records lookups and answers them with Deferreds the test fires.
    """

    def __init__(self) -> None:
        self.lookups: list[tuple[str, list]] = []
        self.pending: list[Deferred] = []
        self.cancelled: list[Deferred] = []

    def lookup(self, sql, values):
        self.lookups.append((sql, list(values)))
        d: Deferred = Deferred(self.cancelled.append)
        self.pending.append(d)
        return d


RELAY_QUERY = """
    SELECT 1 FROM relay_acl
     WHERE origin IN (:client_ip, lower(:client_name))
       AND address IN (lower(:sender), :sender_at_domain)
"""


class SQLCheckTests(CheckTestCase):
    """
    The check binds values, maps results and caches them.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.database = FakeDatabase()

    def make_check(self, **table) -> SQLCheck:
        settings = {"database": "acl.sqlite", "query": RELAY_QUERY, "found": "OK", **table}
        return SQLCheck(make_options(reactor=self.clock, **settings), database=self.database)

    def test_interfaces(self):
        """The check provides ICheck and IService."""
        database = sqlite_database(temporary_path(self, "x.sqlite"))
        check = SQLCheck(make_options(database=database, query="SELECT 1"))
        verifyObject(ICheck, check)
        verifyObject(IService, check)

    def test_values_bound(self):
        """Values, derived ones included, go to the driver apart from the SQL."""
        check = self.make_check()
        request = make_request(
            client_address="::ffff:192.0.2.10",
            client_name="Scan.example.com",
            sender="Joe@Example.COM",
        )
        run_check(check, request)
        sql, values = self.database.lookups[0]
        self.assertEqual(sql.count("?"), 4)
        self.assertEqual(
            values, ["192.0.2.10", "Scan.example.com", "Joe@Example.COM", "@example.com"]
        )

    def test_hostile_values_stay_values(self):
        """Hostile senders never reach the SQL text; they are bound exactly as sent."""
        check = self.make_check()
        # A NUL is not looked up at all (test_control_characters_not_looked_up).
        hostile = [sender for sender in HOSTILE if "\x00" not in sender]
        for sender in hostile:
            run_check(check, make_request(sender=sender))
        for (sql, values), sender in zip(self.database.lookups, hostile, strict=True):
            self.assertEqual(sql, self.database.lookups[0][0])
            self.assertEqual(values[2], sender)

    def test_control_characters_not_looked_up(self):
        """
        A value with a control character (PostgreSQL refuses a NUL, SQLite
        compares it) is not looked up: not_found answers, logged escaped and
        counted; a NULL (not an address) is no reason to refuse.
        """
        check = self.make_check(not_found="REJECT not allowed")
        with capturedLogs() as events:
            for sender in ["a\x00@example.com", "a\r@example.com", "a\x9b@example.com"]:
                self.assertAction(check, make_request(sender=sender), "REJECT not allowed")
        self.assertEqual(self.database.lookups, [])
        self.assertEqual(check.guard.refused, 3)
        texts = [formatEvent(event) for event in events]
        self.assertIn("a\\x00@example.com", texts[0])
        self.assertTrue(all(text.isprintable() for text in texts))
        run_check(check, make_request(client_address="unknown"))
        self.assertEqual(len(self.database.lookups), 1)

    def test_cache_read_before_guard(self):
        """
        A cached answer is given at once, before the guard; a value the
        guard refuses is never cached, so it is refused every time.
        """
        check = self.make_check(not_found="REJECT not allowed", cache_negative_ttl=60)
        request = make_request(sender="a@example.com")
        pending = run_check(check, request)
        self.database.pending[0].callback(None)
        self.assertEqual(str(self.successResultOf(pending)), "REJECT not allowed")
        self.assertAction(check, request, "REJECT not allowed")
        self.assertEqual((len(self.database.lookups), check.guard.refused), (1, 0))
        for _ in range(2):
            self.assertAction(check, make_request(sender="a\x00@example.com"), "REJECT not allowed")
        self.assertEqual((len(self.database.lookups), check.guard.refused), (1, 2))

    def test_found_not_found(self):
        """found answers a row, not_found no row."""
        check = self.make_check(not_found="REJECT no")
        first = run_check(check, make_request())
        second = run_check(check, make_request())
        self.database.pending[0].callback((1,))
        self.database.pending[1].callback(None)
        self.assertEqual(str(self.successResultOf(first)), "OK")
        self.assertEqual(str(self.successResultOf(second)), "REJECT no")

    def test_first_column_is_the_action(self):
        """Without found, the first column is the action; NULL or no row is not_found."""
        check = SQLCheck(
            make_options(
                reactor=self.clock,
                database="a.sqlite",
                query="SELECT action FROM t WHERE s = :sender",
            ),
            database=self.database,
        )
        results = [run_check(check, make_request()) for _ in range(4)]
        self.database.pending[0].callback(("REJECT  Go away ",))
        self.database.pending[1].callback((b"DEFER_IF_PERMIT later", 2))
        self.database.pending[2].callback((None,))
        self.database.pending[3].callback(None)
        self.assertEqual(
            [str(self.successResultOf(result)) for result in results],
            ["REJECT Go away", "DEFER_IF_PERMIT later", "DUNNO", "DUNNO"],
        )

    def test_invalid_action(self):
        """A first column that is not an action fails the lookup (the chain's on_error)."""
        check = SQLCheck(
            make_options(reactor=self.clock, database="a.sqlite", query="SELECT a FROM t"),
            database=self.database,
        )
        result = run_check(check, make_request())
        self.database.pending[0].callback(("FROBNICATE",))
        self.failureResultOf(result, ResultError)

    def test_database_error_fails(self):
        """A database error fails the check's Deferred, for the chain's on_error."""
        check = self.make_check()
        result = run_check(check, make_request())
        self.database.pending[0].errback(sqlite3.OperationalError("disk I/O error"))
        self.failureResultOf(result, sqlite3.OperationalError)

    def test_cache_ttls(self):
        """Found results are kept for the positive TTL, not-found ones for the negative TTL."""
        check = self.make_check(not_found="REJECT no", cache_positive_ttl=60, cache_negative_ttl=10)
        allowed = make_request(sender="a@example.com")
        denied = make_request(sender="b@example.com")
        run_check(check, allowed)
        self.database.pending[-1].callback((1,))
        run_check(check, denied)
        self.database.pending[-1].callback(None)
        self.assertEqual(len(self.database.lookups), 2)
        self.clock.advance(9)
        self.assertAction(check, allowed, "OK")
        self.assertAction(check, denied, "REJECT no")
        self.assertEqual(len(self.database.lookups), 2)
        self.clock.advance(1)
        self.assertAction(check, allowed, "OK")
        self.assertIsInstance(check.check(denied), Deferred)
        self.assertEqual(len(self.database.lookups), 3)
        self.clock.advance(50)
        self.assertIsInstance(check.check(allowed), Deferred)
        self.assertEqual(len(self.database.lookups), 4)

    def test_huge_values_not_cached(self):
        """Results for huge values are not cached, so they cannot fill memory."""
        check = self.make_check(cache_positive_ttl=60, cache_negative_ttl=60)
        huge = make_request(sender="x" * 2000 + "@example.com")
        run_check(check, huge)
        self.database.pending[-1].callback(None)
        run_check(check, huge)
        self.assertEqual(len(self.database.lookups), 2)
        self.assertEqual(len(check.cache), 0)

    def test_errors_not_cached(self):
        """A failed lookup is asked again next time."""
        check = self.make_check(cache_positive_ttl=60, cache_negative_ttl=60)
        run_check(check, make_request()).addErrback(lambda failure: None)
        self.database.pending[0].errback(RuntimeError("down"))
        run_check(check, make_request())
        self.assertEqual(len(self.database.lookups), 2)

    def test_concurrent_misses_share_one_lookup(self):
        """With a cache, requests missing on the same values wait for one lookup."""
        check = self.make_check(cache_positive_ttl=60, cache_negative_ttl=60, not_found="REJECT no")
        same = [check.check(make_request(sender="a@example.com")) for _ in range(3)]
        other = check.check(make_request(sender="b@example.com"))
        self.assertEqual(len(self.database.lookups), 2)
        self.database.pending[0].callback((1,))
        self.database.pending[1].callback(None)
        self.assertEqual([str(self.successResultOf(each)) for each in same], ["OK"] * 3)
        self.assertEqual(str(self.successResultOf(other)), "REJECT no")
        self.assertAction(check, make_request(sender="a@example.com"), "OK")
        self.assertEqual(len(self.database.lookups), 2)
        self.assertEqual(len(check.in_flight), 0)

    def test_shared_lookup_failure_goes_to_every_waiter(self):
        """A shared lookup's failure fails every waiting request and is not cached."""
        check = self.make_check(cache_positive_ttl=60, cache_negative_ttl=60)
        waiting = [check.check(make_request()) for _ in range(2)]
        self.database.pending[0].errback(sqlite3.OperationalError("disk I/O error"))
        for each in waiting:
            self.failureResultOf(each, sqlite3.OperationalError)
        check.check(make_request())
        self.assertEqual(len(self.database.lookups), 2)

    def test_one_waiter_giving_up_leaves_the_others(self):
        """Cancelling one request's wait does not cancel the lookup the others share."""
        from twisted.internet.defer import CancelledError

        check = self.make_check(cache_positive_ttl=60, cache_negative_ttl=60)
        first, second = (check.check(make_request()) for _ in range(2))
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(self.database.cancelled, [])
        self.database.pending[0].callback((1,))
        self.assertEqual(str(self.successResultOf(second)), "OK")

    def test_lookup_cancelled_when_every_waiter_gave_up(self):
        """When every request waiting for a lookup gave up, the lookup is cancelled."""
        from twisted.internet.defer import CancelledError

        check = self.make_check(cache_positive_ttl=60, cache_negative_ttl=60)
        waiting = [check.check(make_request()) for _ in range(2)]
        for each in waiting:
            each.cancel()
            self.failureResultOf(each, CancelledError)
        self.assertEqual(self.database.cancelled, self.database.pending[:1])
        self.assertEqual(len(check.in_flight), 0)
        later = check.check(make_request())
        self.assertEqual(len(self.database.lookups), 2)
        self.database.pending[1].callback((1,))
        self.assertEqual(str(self.successResultOf(later)), "OK")

    def test_huge_values_not_shared(self):
        """Requests with huge values (never cached) are not shared either."""
        check = self.make_check(cache_positive_ttl=60, cache_negative_ttl=60)
        huge = make_request(sender="x" * 2000 + "@example.com")
        check.check(huge)
        check.check(huge)
        self.assertEqual(len(self.database.lookups), 2)
        self.assertEqual(len(check.in_flight), 0)

    def test_burst_from_one_client_not_refused(self):
        """
        A burst of requests for one client, more than the pool's queue
        holds, costs one query and none is refused as DatabaseBusy.
        """
        clock = ImmediateClock()
        driver = FakeDriver([("REJECT blocked",)])
        database = Database(driver, clock, pool_size=1, max_waiting=1, query_timeout=2.0)
        database.pool = pool = FakePool()
        check = SQLCheck(
            make_options(
                reactor=clock,
                database="a.sqlite",
                query="SELECT action FROM t WHERE c = :client_address",
                cache_positive_ttl=60,
                cache_negative_ttl=60,
            ),
            database=database,
        )
        burst = [check.check(make_request(client_address="192.0.2.9")) for _ in range(50)]
        pool.threadpool.run()
        self.assertEqual({str(self.successResultOf(each)) for each in burst}, {"REJECT blocked"})
        self.assertEqual(len(driver.seen), 1)

    def test_no_cache_by_default(self):
        """Without TTLs there is no cache."""
        self.assertIsNone(self.make_check().cache)

    def test_settings_errors(self):
        """Bad settings are ConfigErrors naming the key."""
        cases = [
            ({"query": "SELECT 1 WHERE x = :sendr"}, "key 'query'"),
            ({"query": "SELECT 'x"}, "key 'query'"),
            ({"query": "SELECT ?"}, "key 'query'"),
            ({"found": "FROBNICATE"}, "key 'found'"),
            ({"driver": "oracle"}, "key 'driver'"),
            ({"cache_negative_ttl": -1}, "key 'cache_negative_ttl'"),
            ({"pool_size": 0}, "key 'pool_size'"),
            ({"driver": "postgresql", "conninfo": "host 127.0.0.1"}, "key 'conninfo'"),
            ({"driver": "postgresql"}, "key 'conninfo'"),
        ]
        for settings, expected in cases:
            error = self.assertRaises(ConfigError, self.make_check, **settings)
            self.assertIn(expected, str(error), settings)

    def test_missing_database(self):
        """
        A SQLite database that does not exist is a configuration error
        naming the file, check and key, and it is not created.
        """
        directory = os.path.dirname(temporary_path(self))
        config = self.write_config(directory, "missing.sqlite")
        error = self.assertRaises(ConfigError, load_configuration, config, Clock())
        missing = os.path.join(directory, "missing.sqlite")
        self.assertEqual(
            str(error),
            f"{config}: check 'acl': key 'database': {missing} does not exist",
        )
        self.assertFalse(os.path.exists(missing))

    def test_database_cannot_be_opened(self):
        """A file that is not an SQLite database, or a directory, is reported."""
        directory = os.path.dirname(temporary_path(self))
        with open(os.path.join(directory, "garbage.sqlite"), "wb") as f:
            f.write(b"not a database" * 100)
        os.mkdir(os.path.join(directory, "folder.sqlite"))
        for name in ("garbage.sqlite", "folder.sqlite"):
            config = self.write_config(directory, name)
            error = self.assertRaises(ConfigError, load_configuration, config, Clock())
            self.assertIn("check 'acl': key 'database': cannot open", str(error))
            self.assertIn(name, str(error))

    def write_config(self, directory, database):
        path = os.path.join(directory, "pfxpold.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                f'[[check]]\nname = "acl"\ntype = "sql"\ndatabase = "{database}"\n'
                'query = "SELECT 1"\nfound = "OK"\n'
            )
        return path

    def test_examples_load(self):
        """
        The SQLite, PostgreSQL and MySQL samples load (the SQLite file is
        only opened; the MySQL one reads its placeholder password file).
        """
        examples = examples_copy(self)
        for name in ("relay-acl-sqlite.toml", "relay-acl-postgresql.toml", "relay-acl-mysql.toml"):
            configuration = load_configuration(os.path.join(examples, name), Clock())
            entry = configuration.chain.entries[0]
            self.assertIsInstance(entry.check, SQLCheck)
            self.assertEqual(
                str(entry.on_error), "DEFER Transient internal error. Please try again later."
            )
            self.assertEqual(str(entry.check.found), "OK")
        self.assertIsNotNone(entry.check.cache)


class SQLiteDriverTests(CheckTestCase):
    """
    The SQLite driver on a real database file, run in the test's thread.
    """

    def setUp(self) -> None:
        self.path = temporary_path(self)
        setup = sqlite3.connect(self.path)
        setup.executescript(
            "CREATE TABLE acl (address TEXT); INSERT INTO acl VALUES ('ok@example.com');"
        )
        setup.close()
        self.driver = SQLiteDriver(self.path, busy_timeout=1.0)
        self.connection = sqlite3.connect(*self.driver.connect_args, **self.driver.connect_keywords)
        self.addCleanup(self.connection.close)

    def test_hostile_values(self):
        """Hostile values are compared as values and the table is intact."""
        sql, _ = translate_query("SELECT address FROM acl WHERE address = :sender", "?", False)
        for value in HOSTILE:
            self.assertIsNone(self.driver.fetch_one(self.connection, sql, [value], lambda: False))
        self.assertEqual(
            self.driver.fetch_one(self.connection, sql, ["ok@example.com"], lambda: False),
            ("ok@example.com",),
        )
        self.assertEqual(self.connection.execute("SELECT count(*) FROM acl").fetchone(), (1,))

    def test_abandoned_query_stops(self):
        """A query nobody waits for any more stops, even one that would run for ever."""
        endless = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        )
        self.assertRaises(
            sqlite3.OperationalError,
            self.driver.fetch_one,
            self.connection,
            endless,
            [],
            lambda: True,
        )
        self.assertEqual(
            self.driver.fetch_one(self.connection, "SELECT 1", [], lambda: False), (1,)
        )

    def test_read_only(self):
        """The database is opened read-only."""
        self.assertRaises(sqlite3.OperationalError, self.connection.execute, "DELETE FROM acl")

    def test_missing_file_not_created(self):
        """A missing database file is an error, not a new empty database."""
        path = temporary_path(self)
        driver = SQLiteDriver(path, busy_timeout=1.0)
        self.assertRaises(
            sqlite3.OperationalError,
            sqlite3.connect,
            *driver.connect_args,
            **driver.connect_keywords,
        )
        self.assertFalse(os.path.exists(path))

    def test_one_connection(self):
        """SQLite always gets one pooled connection."""
        database = Database(self.driver, Clock(), pool_size=8, max_waiting=10, query_timeout=1.0)
        self.assertEqual(database.pool_size, 1)
        self.assertEqual(database.max_in_flight, 11)

    def test_not_started(self):
        """A lookup before the pool started fails rather than waits."""
        database = Database(self.driver, Clock(), pool_size=1, max_waiting=10, query_timeout=1.0)
        self.failureResultOf(database.lookup("SELECT 1", []), RuntimeError)


class PostgreSQLDriverTests(CheckTestCase):
    """
    The PostgreSQL driver's connection settings.
    """

    def test_timeouts(self):
        """Statement and connect timeouts are passed to libpq (whole seconds, at least 2)."""
        driver = PostgreSQLDriver(
            "host=127.0.0.1 dbname=x", "secret", connect_timeout=0.5, query_timeout=1.5
        )
        self.assertEqual(driver.connect_keywords["connect_timeout"], 2)
        self.assertEqual(driver.connect_keywords["options"], "-c statement_timeout=1500")
        self.assertTrue(driver.connect_keywords["autocommit"])
        self.assertEqual(driver.connect_keywords["password"], "secret")
        self.assertEqual(driver.placeholder, "%s")

    def test_password_file(self):
        """The password is read from password_file, never from the configuration."""
        path = temporary_path(self)
        with open(path, "w") as f:
            f.write("s3cret\nignored\n")
        check = SQLCheck(
            make_options(
                driver="postgresql", conninfo="host=127.0.0.1", password_file=path, query="SELECT 1"
            ),
            database=FakeDatabase(),
        )
        self.assertIsInstance(check, SQLCheck)
        driver_check = SQLCheck(
            make_options(
                driver="postgresql", conninfo="host=127.0.0.1", password_file=path, query="SELECT 1"
            )
        )
        self.assertEqual(driver_check.database.driver.connect_keywords["password"], "s3cret")


class ImmediateClock(Clock):
    """
    A Clock that runs callFromThread calls at once, as the reactor would
    from its thread.
    """

    def callFromThread(self, function, *args, **keywords):
        function(*args, **keywords)


class FakeThreadPool:
    """
    Holds the work deferToThreadPool gives it until the test runs it.
    """

    def __init__(self) -> None:
        self.work: list = []

    def callInThreadWithCallback(self, on_result, function, *args, **keywords):
        self.work.append((on_result, function, args, keywords))

    def run(self, index: int = 0) -> None:
        on_result, function, args, keywords = self.work.pop(index)
        try:
            result = function(*args, **keywords)
        except BaseException:
            from twisted.python.failure import Failure

            on_result(False, Failure())
        else:
            on_result(True, result)


class FakePool:
    """
    The parts of adbapi's ConnectionPool the Database uses.
    """

    def __init__(self) -> None:
        self.threadpool = FakeThreadPool()
        self.connected = 0
        self.disconnected: list = []

    def connect(self):
        self.connected += 1
        return f"connection {self.connected}"

    def disconnect(self, connection) -> None:
        self.disconnected.append(connection)


class FakeDriver:
    """
    A driver whose queries answer, fail or call back into the test.
    """

    max_connections = None

    def __init__(self, outcomes) -> None:
        self.outcomes = list(outcomes)
        self.broken: set = set()
        self.interrupted: list = []
        self.seen: list = []

    def describe(self) -> str:
        return "fake"

    def fetch_one(self, connection, sql, values, abandoned):
        self.seen.append(connection)
        outcome = self.outcomes.pop(0)
        if callable(outcome):
            outcome = outcome(connection)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def is_broken(self, connection) -> bool:
        return connection in self.broken

    def interrupt(self, connection) -> None:
        self.interrupted.append(connection)


class DatabaseTests(CheckTestCase):
    """
    The pool's bound, interruption and retry-once logic, with the thread
    pool's work run by the test.
    """

    def make(self, outcomes, pool_size=2, max_waiting=1) -> Database:
        self.clock = ImmediateClock()
        self.driver = FakeDriver(outcomes)
        database = Database(self.driver, self.clock, pool_size, max_waiting, query_timeout=2.0)
        database.pool = self.pool = FakePool()
        return database

    def test_row(self):
        """A query's first row is the result; the pool slot is freed."""
        database = self.make([("OK",)])
        result = database.lookup("SELECT", ["x"])
        self.pool.threadpool.run()
        self.assertEqual(self.successResultOf(result), ("OK",))
        self.assertEqual(database._in_flight, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bounded(self):
        """Past pool_size + max_waiting lookups in flight, more fail at once."""

        database = self.make([None, None, None], pool_size=1, max_waiting=1)
        first = database.lookup("SELECT", [])
        second = database.lookup("SELECT", [])
        self.failureResultOf(database.lookup("SELECT", []), DatabaseBusy)
        self.pool.threadpool.run()
        self.successResultOf(first)
        third = database.lookup("SELECT", [])
        self.assertNoResult(second)
        self.assertNoResult(third)

    def test_retry_once_on_broken_connection(self):
        """A connection that broke is replaced and the query retried once, with a log line."""
        from twisted.logger import capturedLogs

        def restart(connection):
            self.driver.broken.add(connection)
            return RuntimeError("terminating connection due to administrator command")

        database = self.make([restart, ("OK",)])
        result = database.lookup("SELECT", [])
        with capturedLogs() as events:
            self.pool.threadpool.run()
        self.assertEqual(self.successResultOf(result), ("OK",))
        self.assertEqual(self.pool.disconnected, ["connection 1"])
        self.assertEqual(self.driver.seen, ["connection 1", "connection 2"])
        self.assertTrue(any("reconnected" in event.get("log_format", "") for event in events))

    def test_retry_only_once(self):
        """A second broken connection in a row fails the lookup."""

        def broken(connection):
            self.driver.broken.add(connection)
            return RuntimeError("server closed the connection")

        database = self.make([broken, broken, ("never",)])
        result = database.lookup("SELECT", [])
        self.pool.threadpool.run()
        self.failureResultOf(result, RuntimeError)
        self.assertEqual(len(self.driver.seen), 2)

    def test_connect_failure_is_unavailable(self):
        """
        A connection that cannot be made (a refused login, a failed TLS
        handshake, a server that is down) fails the lookup with
        L{DatabaseUnavailable}: one line naming the database and the
        driver's reason, in the driver's words when it has some.
        """

        def refused():
            raise ConnectionRefusedError("connection refused\n\tis the server running?")

        database = self.make([("never",)])
        self.pool.connect = refused
        result = database.lookup("SELECT", [])
        self.pool.threadpool.run()
        failure = self.failureResultOf(result, DatabaseUnavailable)
        self.assertEqual(
            failure.getErrorMessage(),
            "cannot connect to fake: ConnectionRefusedError: connection refused"
            " is the server running?",
        )
        self.assertEqual(self.driver.seen, [])
        self.assertEqual(database._in_flight, set())

        self.driver.error_text = lambda error: f"in other words: {error}"
        result = database.lookup("SELECT", [])
        self.pool.threadpool.run()
        failure = self.failureResultOf(result, DatabaseUnavailable)
        self.assertEqual(
            failure.getErrorMessage(),
            "cannot connect to fake: in other words: connection refused is the server running?",
        )

    def test_no_retry_for_query_errors(self):
        """An error that leaves the connection usable is not retried."""
        database = self.make([ValueError("no such table"), ("never",)])
        result = database.lookup("SELECT", [])
        self.pool.threadpool.run()
        self.failureResultOf(result, ValueError)
        self.assertEqual(self.pool.disconnected, [])
        self.assertEqual(len(self.driver.seen), 1)

    def test_timeout_interrupts_running_query(self):
        """A query running past query_timeout is interrupted on its connection and not retried."""
        from twisted.internet.defer import TimeoutError

        results = []

        def hangs(connection):
            # The reactor's timer fires while the query runs.
            self.clock.advance(2.0)
            results.append(self.failureResultOf(result, TimeoutError))
            self.driver.broken.add(connection)
            return RuntimeError("connection shut down")

        database = self.make([hangs, ("never",)])
        result = database.lookup("SELECT", [])
        self.pool.threadpool.run()
        self.assertEqual(len(results), 1)
        self.assertEqual(self.driver.interrupted, ["connection 1"])
        self.assertEqual(self.pool.disconnected, ["connection 1"])
        self.assertEqual(len(self.driver.seen), 1)
        self.assertEqual(database._in_flight, set())

    def test_cancelled_before_running(self):
        """A lookup cancelled while it waits for a thread never runs its query."""
        from twisted.internet.defer import CancelledError

        database = self.make([("never",)])
        result = database.lookup("SELECT", [])
        result.cancel()
        self.failureResultOf(result, CancelledError)
        self.pool.threadpool.run()
        self.assertEqual(self.driver.seen, [])
        self.assertEqual(self.pool.connected, 0)
        self.assertEqual(database._in_flight, set())

    def test_stop_interrupts(self):
        """Stopping the database interrupts queries in flight."""

        def during_stop(connection):
            database.stop()
            return RuntimeError("interrupted")

        database = self.make([during_stop])
        pool = self.pool
        pool.close = lambda: None
        result = database.lookup("SELECT", [])
        pool.threadpool.run()
        self.assertEqual(self.driver.interrupted, ["connection 1"])
        self.failureResultOf(result)
