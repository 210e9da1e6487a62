"""
The database drivers the C{sql} check speaks: SQLite (the standard
library's C{sqlite3}) and PostgreSQL (psycopg 3). Each says how
L{twisted.enterprise.adbapi} connects, which placeholder it takes, how a
query runs on a pool thread, and how a running query is interrupted.
"""

from __future__ import annotations

import math
import os
import socket

# adbapi imports the driver module by name when the pool starts, which is
# after twistd chroots: import it now, while the standard library is there.
import sqlite3
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, Optional

psycopg: Any
try:
    import psycopg
except ImportError:  # pragma: no cover - the postgresql extra is not installed
    psycopg = None


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
            # The sql check says which extra to install before it gets here.
            raise ImportError("the PostgreSQL driver needs psycopg")
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
