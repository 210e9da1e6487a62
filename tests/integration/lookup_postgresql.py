"""
A private PostgreSQL server for the lookup tests: Debian's PostgreSQL 15
initialised in a temporary directory and run as the C{postgres} user (it
refuses to run as root) on a free port of 127.0.0.1, with its socket in
that directory. Only the processes started here are signalled, by PID.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Optional

import psycopg

from tests.integration.support import free_port, require_program

BINARIES = "/usr/lib/postgresql/15/bin"


class PostgreSQLServer:
    """
    One PostgreSQL cluster in a temporary directory.

    @ivar port: the TCP port on 127.0.0.1.
    @ivar process: the postmaster while it runs.
    """

    def __init__(self) -> None:
        self.initdb = require_program(os.path.join(BINARIES, "initdb"), "postgresql")
        self.postgres = require_program(os.path.join(BINARIES, "postgres"), "postgresql")
        self.directory = tempfile.mkdtemp(prefix="pfxpold-postgresql-")
        self.data = os.path.join(self.directory, "data")
        self.port = free_port()
        self.process: Optional[subprocess.Popen] = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            self._user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        subprocess.run(
            [self.initdb, "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8"]
            + ["--locale=C", "--no-sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.directory,
            **self._user,
        )

    def conninfo(self, dbname: str = "pfxpold", port: Optional[int] = None) -> str:
        return f"host=127.0.0.1 port={port or self.port} dbname={dbname} user=postgres"

    def start(self, timeout: float = 30.0) -> None:
        """
        Start the postmaster and wait until it accepts connections.
        """
        log = open(os.path.join(self.directory, "postgresql.log"), "ab")
        self.process = subprocess.Popen(
            [self.postgres, "-D", self.data, "-p", str(self.port), "-k", self.directory]
            + ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=40"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            **self._user,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log()[-2000:]}")
            try:
                psycopg.connect(self.conninfo("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {self.log()[-2000:]}") from None
                time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """
        Stop the postmaster (fast shutdown: sessions are ended).
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        """
        Stop and start the same cluster on the same port.
        """
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            with open(os.path.join(self.directory, "postgresql.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def execute(self, sql: str, dbname: str = "pfxpold", params: Any = None) -> list[tuple]:
        """
        Run one statement as the superuser and return its rows.
        """
        with psycopg.connect(self.conninfo(dbname), autocommit=True, connect_timeout=5) as c:
            cursor = c.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def backend_pids(self, application_name: str = "pfxpold") -> list[int]:
        """
        The server processes serving connections of C{application_name}.
        """
        rows = self.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            "postgres",
            (application_name,),
        )
        return [row[0] for row in rows]

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
