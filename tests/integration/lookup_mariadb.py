"""
A private MariaDB server for the lookup tests: Debian's mariadb-server,
its data directory made with grant tables in a temporary directory by
mariadb-install-db, run on a free port of 127.0.0.1 and on a unix socket in
that directory. Nothing outside the directory is touched (no system service,
no /var/lib/mysql, no option files: C{--no-defaults}).

Accounts are real, as in production: the tests administer the server as the
operating-system user running them, over the unix socket (MariaDB's
C{unix_socket} authentication, which mariadb-install-db gives that user),
and pfxpold logs in as C{pfxpold} with a password read from
L{MariaDBServer.password_file}, allowed only to read the C{pfxpold}
database. With C{tls=True} the server has a certificate signed by a CA made
here and refuses TCP connections without TLS (C{require_secure_transport}).

Only the process started here is signalled, by PID.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import pymysql

from tests.integration.certificates import make_client_certificates, split_certificate
from tests.integration.support import REPOSITORY, free_port, require_program

#: The account pfxpold logs in with.
USER = "pfxpold"
#: With TLS, an account that also needs the client certificate.
CERTIFICATE_USER = "pfxpold-x509"
#: That certificate's subject.
CLIENT_SUBJECT = "/CN=pfxpold-client"

#: How examples/relay-acl-mysql.toml (and the README) make the database:
#: a binary collation, so that lookups match exactly, as on SQLite and
#: PostgreSQL.
CREATE_DATABASE = "CREATE DATABASE pfxpold CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"

#: Server options for both the bootstrap and the server: a small redo log
#: (the default is 96 MB), no durability a throwaway server needs, and no
#: resolver.
COMMON_OPTIONS = [
    "--skip-name-resolve",
    "--innodb-log-file-size=4M",
    "--innodb-buffer-pool-size=16M",
    "--innodb-doublewrite=0",
    "--innodb-flush-log-at-trx-commit=0",
]


class MariaDBServer:
    """
    One MariaDB server in a temporary directory.

    @ivar password: the C{pfxpold} account's password (with quotes and
        other characters a careless client would mangle).
    @ivar password_file: a file holding it, for the sql check's
        C{password_file}.
    @ivar ca: with TLS, the PEM file of the CA that signed the server's
        certificate (for C{127.0.0.1}) and a client certificate; else
        L{None}.
    @ivar client_certificate: with TLS, that client certificate's file, for
        the L{CERTIFICATE_USER} account; its key is in C{client_key}.

    With C{accounts=False}, the server has none but the administrator's:
    for a test that makes C{pfxpold}'s as an admin would.
    """

    def __init__(self, tls: bool = False, accounts: bool = True) -> None:
        self.install = require_program("/usr/bin/mariadb-install-db", "mariadb-server")
        self.mariadbd = require_program("/usr/sbin/mariadbd", "mariadb-server")
        self.directory = tempfile.mkdtemp(prefix="pfxpold-mariadb-")
        os.chmod(self.directory, 0o755)
        self.data = os.path.join(self.directory, "data")
        self.socket = os.path.join(self.directory, "mariadb.sock")
        self.port = free_port()
        #: The administrator: the operating-system user running the tests,
        #: over the socket (root in CI, where mariadbd then needs
        #: --user=root to agree to run).
        self.admin = getpass.getuser()
        self.password = f"pfx-{secrets.token_hex(8)}-'\"\\%:@/ ;"
        self.password_file = os.path.join(self.directory, "password")
        with open(os.open(self.password_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(self.password + "\n")
        self.process: Optional[subprocess.Popen] = None
        self.tls_options: list[str] = []
        self.ca: Optional[str] = None
        self.client_certificate: Optional[str] = None
        self.client_key: Optional[str] = None
        if tls:
            self.ca, server, self.client_certificate, self.client_key = make_client_certificates(
                self.directory
            )
            certificate, key = split_certificate(server, self.directory)
            self.tls_options = [
                f"--ssl-ca={self.ca}",
                f"--ssl-cert={certificate}",
                f"--ssl-key={key}",
                "--require-secure-transport=ON",
            ]
        # Without accounts, whoever uses the server makes its own.
        self._provisioned = not accounts
        subprocess.run(
            # --force: no check that this host's name resolves.
            [self.install, "--no-defaults", "--auth-root-authentication-method=socket"]
            + [f"--datadir={self.data}", f"--user={self.admin}", "--skip-test-db", "--force"]
            + COMMON_OPTIONS,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.directory,
        )

    def url(
        self,
        database: str = "pfxpold",
        port: Optional[int] = None,
        user: str = USER,
        **options: str,
    ) -> str:
        """
        A URL for the sql check's C{url}: TCP to 127.0.0.1, with the query
        C{options} (C{unix_socket}, C{ssl_ca}, ...).
        """
        query = f"?{urllib.parse.urlencode(options)}" if options else ""
        return f"mysql://{user}@127.0.0.1:{port or self.port}/{database}{query}"

    def settings(self, port: Optional[int] = None, user: str = USER, **options: str) -> str:
        """
        The sql check's TOML settings to reach this server as C{user}:
        driver, URL and password file.
        """
        return (
            f'driver = "mysql"\nurl = "{self.url(port=port, user=user, **options)}"\n'
            f'password_file = "{self.password_file}"\n'
        )

    def start(self, timeout: float = 30.0) -> None:
        log = open(os.path.join(self.directory, "mariadb.log"), "ab")
        self.process = subprocess.Popen(
            [self.mariadbd, "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}"]
            + [f"--port={self.port}", "--bind-address=127.0.0.1", f"--user={self.admin}"]
            + [f"--pid-file={os.path.join(self.directory, 'mariadb.pid')}"]
            + COMMON_OPTIONS
            + self.tls_options,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited: {self.log()[-2000:]}")
            try:
                self.connect(None).close()
                break
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mariadbd did not start: {self.log()[-2000:]}") from None
                time.sleep(0.05)
        if not self._provisioned:
            self._provision()
            self._provisioned = True

    def _provision(self) -> None:
        """
        The C{pfxpold} account, for TCP (C{127.0.0.1}: names are not
        resolved) and the socket (C{localhost}), allowed to read the
        C{pfxpold} database (made by whoever fills it) and nothing else;
        with TLS, L{CERTIFICATE_USER} too, for TCP only.
        """
        accounts = [(USER, "127.0.0.1", ""), (USER, "localhost", "")]
        if self.ca is not None:
            accounts.append((CERTIFICATE_USER, "127.0.0.1", " REQUIRE SUBJECT %s"))
        connection = self.connect(None)
        try:
            with connection.cursor() as cursor:
                for user, host, require in accounts:
                    cursor.execute(
                        f"CREATE USER %s@%s IDENTIFIED BY %s{require}",
                        (user, host, self.password) + ((CLIENT_SUBJECT,) if require else ()),
                    )
                    cursor.execute("GRANT SELECT ON pfxpold.* TO %s@%s", (user, host))
        finally:
            connection.close()

    def load_relay_acl(self) -> None:
        """
        Make the C{pfxpold} database with the relay-ACL table of
        examples/relay-acl.sql, as examples/relay-acl-mysql.toml says: with
        the C{mariadb} client, the file as shipped.
        """
        self.client("-e", CREATE_DATABASE)
        with open(os.path.join(REPOSITORY, "examples", "relay-acl.sql"), "rb") as script:
            self.client("pfxpold", stdin=script)

    def client(self, *arguments: str, stdin: Any = None) -> str:
        """
        Run Debian's C{mariadb} client as the administrator, over the
        socket, with C{arguments}.

        @return: what it printed.
        """
        program = require_program("/usr/bin/mariadb", "mariadb-client")
        finished = subprocess.run(
            [program, "--no-defaults", f"--socket={self.socket}", f"--user={self.admin}"]
            + list(arguments),
            stdin=stdin,
            capture_output=True,
            timeout=30,
        )
        if finished.returncode != 0:
            raise RuntimeError(f"mariadb {' '.join(arguments)}: {finished.stderr.decode()}")
        return finished.stdout.decode()

    def connect(self, database: Optional[str] = "pfxpold") -> Any:
        """
        An administrator's connection, over the unix socket.
        """
        return pymysql.connect(
            unix_socket=self.socket,
            user=self.admin,
            database=database,
            autocommit=True,
            connect_timeout=2,
            charset="utf8mb4",
        )

    def connect_tcp(self, **keywords: Any) -> Any:
        """
        A connection as C{pfxpold} over TCP, with PyMySQL's C{keywords}.
        """
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user=USER,
            password=self.password,
            database="pfxpold",
            connect_timeout=2,
            **keywords,
        )

    def execute(self, sql: str, database: Optional[str] = "pfxpold", params: Any = None) -> list:
        connection = self.connect(database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        try:
            with open(os.path.join(self.directory, "mariadb.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextmanager
def running_relay_acl(tls: bool = False) -> Iterator[MariaDBServer]:
    """
    A private MariaDB server (with TLS required, when C{tls}),
    holding the relay-ACL table, stopped and removed at the end of the block.
    """
    server = MariaDBServer(tls)
    try:
        server.start()
        server.load_relay_acl()
        yield server
    finally:
        server.cleanup()
