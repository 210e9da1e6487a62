"""
A private MariaDB server for the lookup tests: Debian's mariadb-server,
its data directory made in a temporary directory by mariadb-install-db,
run on a free port of 127.0.0.1 with --skip-grant-tables (any user, no
password). Only the process started here is signalled, by PID.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Optional

import pymysql

from tests.integration.support import free_port, require_program


class MariaDBServer:
    """
    One MariaDB server in a temporary directory.
    """

    def __init__(self) -> None:
        self.install = require_program("/usr/bin/mariadb-install-db", "mariadb-server")
        self.mariadbd = require_program("/usr/sbin/mariadbd", "mariadb-server")
        self.directory = tempfile.mkdtemp(prefix="pfxpold-mariadb-")
        os.chmod(self.directory, 0o755)
        self.data = os.path.join(self.directory, "data")
        self.socket = os.path.join(self.directory, "mariadb.sock")
        self.port = free_port()
        self.user = getpass.getuser()
        self.process: Optional[subprocess.Popen] = None
        subprocess.run(
            [self.install, "--no-defaults", "--auth-root-authentication-method=normal"]
            + [f"--datadir={self.data}", f"--user={self.user}", "--skip-test-db"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.directory,
        )

    def url(self, database: str = "pfxpold", port: Optional[int] = None) -> str:
        return f"mysql://root@127.0.0.1:{port or self.port}/{database}"

    def start(self, timeout: float = 30.0) -> None:
        log = open(os.path.join(self.directory, "mariadb.log"), "ab")
        self.process = subprocess.Popen(
            [self.mariadbd, "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}"]
            + [f"--port={self.port}", "--bind-address=127.0.0.1", f"--user={self.user}"]
            + ["--skip-grant-tables", "--skip-name-resolve", "--innodb-flush-log-at-trx-commit=0"],
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
                return
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mariadbd did not start: {self.log()[-2000:]}") from None
                time.sleep(0.1)

    def connect(self, database: Optional[str] = "pfxpold") -> Any:
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user="root",
            database=database,
            autocommit=True,
            connect_timeout=2,
            charset="utf8mb4",
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
