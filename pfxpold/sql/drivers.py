"""
The database drivers the C{sql} check speaks: SQLite (the standard
library's C{sqlite3}), PostgreSQL (psycopg 3) and MySQL/MariaDB (PyMySQL).
Each says how
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
import ssl
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, Optional

psycopg: Any
try:
    import psycopg
except ImportError:  # pragma: no cover - the postgresql extra is not installed
    psycopg = None

pymysql: Any
try:
    import pymysql  # type: ignore[no-redef]
except ImportError:  # pragma: no cover - the mysql extra is not installed
    pymysql = None

#: The URL schemes of the MySQL driver (MariaDB speaks the same protocol).
MYSQL_SCHEMES = ("mysql", "mariadb")
#: What a MySQL URL's query string may say.
MYSQL_URL_OPTIONS = ("unix_socket", "ssl_ca", "ssl_cert", "ssl_key")


class SQLiteDriver:
    """
    SQLite through the standard library's C{sqlite3}: one connection (a
    second one would only wait for the first), opened read-only so that a
    mistyped path is an error rather than a new empty database.
    """

    module = "sqlite3"
    placeholder = "?"
    dialect = "standard"
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
    dialect = "standard"
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


class URLError(ValueError):
    """
    A MySQL URL that cannot be used; the message says why.
    """


def parse_mysql_url(url: str) -> dict[str, Any]:
    """
    Read a C{mysql://user@host:port/database?option=value} URL (or
    C{mariadb://}) into PyMySQL's connection keywords.

    Options: C{unix_socket} (the server's socket; the host is then only a
    name), C{ssl_ca} (TLS, the server's certificate and host name checked
    against this CA file), C{ssl_cert} and C{ssl_key} (a client
    certificate). A password in the URL is refused: it belongs in
    C{password_file}, which is not shown by C{--check-config} or in logs.

    @raise URLError: when the URL is not one.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise URLError(f"is not a MySQL URL: {e}") from None
    if parts.scheme not in MYSQL_SCHEMES:
        raise URLError("must start with mysql:// or mariadb:// (mysql://user@host:3306/database)")
    if parts.password is not None:
        raise URLError("holds a password: put it in password_file instead")
    if not parts.username:
        raise URLError("names no user (mysql://user@host/database)")
    database = urllib.parse.unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise URLError("names no database (mysql://user@host/database)")
    if parts.fragment:
        raise URLError("has a #fragment")
    keywords: dict[str, Any] = {
        "user": urllib.parse.unquote(parts.username),
        "database": database,
        "host": parts.hostname or "localhost",
        "port": port or 3306,
    }
    try:
        options = urllib.parse.parse_qsl(
            parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)
        )
    except ValueError as e:
        raise URLError(f"has a bad query string: {e}") from None
    for name, value in options:
        if name not in MYSQL_URL_OPTIONS:
            raise URLError(
                f"has an unknown option {name!r} (known: {', '.join(MYSQL_URL_OPTIONS)})"
            )
        if name in keywords:
            raise URLError(f"gives {name} twice")
        if not value:
            raise URLError(f"gives an empty {name}")
        keywords[name] = value
    if ("ssl_cert" in keywords or "ssl_key" in keywords) and "ssl_ca" not in keywords:
        raise URLError("gives a client certificate without ssl_ca")
    if "ssl_key" in keywords and "ssl_cert" not in keywords:
        raise URLError("gives ssl_key without ssl_cert")
    if "ssl_ca" in keywords:
        # Verified like any TLS client should: the chain and the name.
        keywords["ssl_verify_cert"] = True
        keywords["ssl_verify_identity"] = "unix_socket" not in keywords
    return keywords


#: The first PyMySQL that refuses a server not offering TLS when TLS is
#: configured; older ones silently go on in clear text.
PYMYSQL_TLS_REQUIRED = (1, 2)


def tls_context(keywords: dict[str, Any]) -> ssl.SSLContext:
    """
    Take the C{ssl_*} keywords of L{parse_mysql_url} out of C{keywords} and
    make the TLS context they describe, now: the files are read while the
    configuration is (before twistd chroots or drops privileges, so a key
    only root can read works), and a file that cannot be used is a
    configuration error rather than a failure of every lookup.

    @raise URLError: when a file cannot be used, or when PyMySQL is too old
        to insist on TLS.
    """
    if pymysql is not None and tuple(pymysql.VERSION[:2]) < PYMYSQL_TLS_REQUIRED:
        raise URLError(
            "gives ssl_ca, which needs PyMySQL 1.2 or later (this is "
            f"{'.'.join(map(str, pymysql.VERSION[:3]))}; older ones fall back to clear text"
            " when the server does not offer TLS)"
        )
    ca = keywords.pop("ssl_ca")
    certificate = keywords.pop("ssl_cert", None)
    key = keywords.pop("ssl_key", None)
    keywords.pop("ssl_verify_cert", None)
    check_hostname = keywords.pop("ssl_verify_identity", True)
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ValueError) as e:
        raise URLError(f"ssl_ca {ca}: {tls_file_error(e, 'holds no PEM certificate')}") from None
    context.check_hostname = check_hostname
    # As PyMySQL's own context: MySQL's self-made CA certificates lack
    # extensions that Python's strict X.509 checks want.
    context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    if certificate is not None:
        try:
            # Without ssl_key, the key is in the certificate's file. An
            # encrypted key is refused rather than asked for on a terminal.
            context.load_cert_chain(certificate, key, password=_no_key_password)
        except (OSError, ValueError) as e:
            reason = tls_file_error(e, "not a PEM certificate and its unencrypted private key")
            raise URLError(
                f"ssl_cert {certificate}, ssl_key {key or certificate}: {reason}"
            ) from None
    return context


def _no_key_password() -> str:
    raise ValueError("the private key is encrypted")


def tls_file_error(error: Exception, unusable: str) -> str:
    """
    Why a TLS file cannot be used, in one line: the system's reason when
    it cannot be read, else C{unusable} (OpenSSL's own words say little).
    """
    if isinstance(error, ssl.SSLError):
        return unusable
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return " ".join(str(error).split()) or unusable


class MySQLDriver:
    """
    MySQL and MariaDB through PyMySQL (pure Python), in autocommit mode so
    that every lookup sees the table as it is now (InnoDB's repeatable
    reads would otherwise keep the first lookup's snapshot for ever), with
    connect and read timeouts, and the server's own statement timeout
    (MariaDB's C{max_statement_time}, MySQL's C{max_execution_time}).

    PyMySQL puts the escaped values into the statement it sends (MySQL's
    text protocol), so the query's text must be lexed as MySQL reads it:
    L{pfxpold.sql.params} does that for the C{mysql} dialect.
    """

    module = "pymysql"
    placeholder = "%s"
    escape_percent = True
    dialect = "mysql"
    max_connections: Optional[int] = None

    def __init__(
        self,
        url: str,
        password: Optional[str],
        connect_timeout: float,
        query_timeout: float,
    ) -> None:
        if pymysql is None:
            # The sql check says which extra to install before it gets here.
            raise ImportError("the MySQL driver needs PyMySQL")
        keywords = parse_mysql_url(url)
        self.location = (
            keywords.get("unix_socket") or f"{keywords['host']}:{keywords['port']}"
        ) + f"/{keywords['database']}"
        self.query_timeout = query_timeout
        # A backstop only: the pool interrupts a query at query_timeout.
        socket_timeout = max(query_timeout * 2, query_timeout + 5.0)
        keywords.update(
            {
                "charset": "utf8mb4",
                "autocommit": True,
                "connect_timeout": connect_timeout,
                "read_timeout": socket_timeout,
                "write_timeout": socket_timeout,
                "program_name": "pfxpold",
            }
        )
        if password is not None:
            keywords["password"] = password
        if "ssl_ca" in keywords:
            keywords["ssl"] = tls_context(keywords)
        self.connect_args = ()
        self.connect_keywords = keywords

    def describe(self) -> str:
        return f"MySQL {self.location}"

    def error_text(self, error: Exception) -> str:
        """
        What a PyMySQL exception says: its C{(code, message)} arguments
        read as the message and the client's or server's error number.
        """
        arguments = error.args
        if len(arguments) == 2 and isinstance(arguments[0], int):
            return f"{arguments[1]} (error {arguments[0]})"
        return f"{type(error).__name__}: {error}"

    def on_connect(self, connection: Any) -> None:
        """
        Set the server's statement timeout on a new connection; in a pool
        thread.
        """
        with connection.cursor() as cursor:
            if "mariadb" in connection.get_server_info().lower():
                cursor.execute(
                    "SET SESSION max_statement_time = %s", (round(self.query_timeout, 3),)
                )
            else:
                # MySQL 5.7.8+: read-only SELECTs only, in milliseconds.
                cursor.execute(
                    "SET SESSION max_execution_time = %s",
                    (max(1, int(self.query_timeout * 1000)),),
                )

    def fetch_one(
        self, connection: Any, sql: str, values: Sequence[Any], abandoned: Callable[[], bool]
    ) -> Optional[tuple]:
        """
        Run the query; in a pool thread. (An abandoned query is stopped by
        L{interrupt}, which breaks the connection.)
        """
        with connection.cursor() as cursor:
            # PyMySQL formats with %: always pass a tuple, so a literal
            # %% in the query means one % even without parameters.
            cursor.execute(sql, tuple(values))
            return cursor.fetchone()

    def is_broken(self, connection: Any) -> bool:
        return not connection.open

    def interrupt(self, connection: Any) -> None:
        # KILL QUERY would need a second connection to a server that may be
        # the one not answering; shutting the socket down wakes the blocked
        # thread at once, and the connection is then replaced. PyMySQL
        # keeps its socket in _sock and offers no public way to reach it.
        sock = getattr(connection, "_sock", None)
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
