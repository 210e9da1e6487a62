"""
A private redis-server for integration tests: started on a free loopback
port with no persistence, stopped (or restarted on the same port) by PID;
over TLS only when given L{RedisTLS}.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from tests.integration.certificates import TLSFiles, make_tls_files
from tests.integration.support import free_port, require_program, stop_process, wait_for_port


@dataclass(frozen=True)
class RedisTLS:
    """
    TLS for test Redis servers and sentinels (L{make_tls_files}): TLS only,
    no plain port; replication, a sentinel's connections and a cluster's
    bus over TLS too; clients must show a certificate of the test CA
    (Redis's default) unless C{client_certificates} is false.

    @ivar server_name: the one name the servers' certificate carries.
    """

    files: TLSFiles
    server_name: str = "127.0.0.1"
    client_certificates: bool = True

    @classmethod
    def make(cls, directory: str, server_name: str = "127.0.0.1", **options: bool) -> RedisTLS:
        """New certificates in C{directory}, for servers named C{server_name}."""
        return cls(make_tls_files(directory, server_name), server_name, **options)

    def directives(self, port: int) -> list[tuple[str, str]]:
        """The configuration of a server or sentinel listening on C{port}."""
        return [
            ("port", "0"),
            ("tls-port", str(port)),
            ("tls-cert-file", self.files.server_certificate),
            ("tls-key-file", self.files.server_key),
            ("tls-ca-cert-file", self.files.ca),
            ("tls-auth-clients", "yes" if self.client_certificates else "no"),
            ("tls-replication", "yes"),
        ]

    def server_arguments(self, port: int) -> tuple[str, ...]:
        """L{directives} as redis-server's command line."""
        return tuple(part for name, value in self.directives(port) for part in (f"--{name}", value))

    def config_lines(self, port: int) -> str:
        """L{directives} as lines of a configuration file (a sentinel's)."""
        return "".join(f"{name} {value}\n" for name, value in self.directives(port))

    def cli_arguments(self) -> tuple[str, ...]:
        """redis-cli's options to reach the servers."""
        return (
            "--tls",
            "--cacert", self.files.ca,
            "--cert", self.files.client_certificate,
            "--key", self.files.client_key,
        )  # fmt: skip

    def store_lines(self, ca_file: Optional[str] = None) -> str:
        """
        The keys of a pfxpold Redis store that reaches the servers,
        trusting C{ca_file} (the test CA by default).
        """
        lines = f'tls = true\ntls_ca_file = "{ca_file or self.files.ca}"\n'
        if self.client_certificates:
            lines += f'tls_certificate = "{self.files.client_pem}"\n'
        if self.server_name != "127.0.0.1":
            # The servers' addresses are IPs (the sentinels and the
            # cluster give no names): the name to verify is this one.
            lines += f'tls_server_name = "{self.server_name}"\n'
        return lines


class RedisServer:
    """
    One redis-server process we started.

    @ivar port: its port on 127.0.0.1.
    """

    def __init__(
        self,
        directory: str,
        port: Optional[int] = None,
        extra_args: tuple[str, ...] = (),
        tls: Optional[RedisTLS] = None,
    ) -> None:
        self.program = require_program("/usr/bin/redis-server", "redis-server")
        self.directory = directory
        self.port = port or free_port()
        self.extra_args = extra_args
        self.tls = tls
        self.process: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        """
        The Twisted client endpoint string of this server (TCP: a store
        adds TLS with C{tls = true}).
        """
        return f"tcp:host=127.0.0.1:port={self.port}"

    def start(self) -> None:
        listening = (
            ("--port", str(self.port)) if self.tls is None else self.tls.server_arguments(self.port)
        )
        log = open(os.path.join(self.directory, f"redis-{self.port}.log"), "ab")
        self.process = subprocess.Popen(
            [
                self.program,
                "--save",
                "",
                "--appendonly",
                "no",
                *listening,
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "no",
                "--dir",
                self.directory,
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(self.port, process=self.process)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts nothing and answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a frozen server go on (SIGCONT)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, 10, wake=True)


@contextmanager
def running_redis(
    directory: os.PathLike, extra_args: tuple[str, ...] = (), tls: Optional[RedisTLS] = None
) -> Iterator[RedisServer]:
    """
    A redis-server for the duration of the block.
    """
    server = RedisServer(os.fspath(directory), extra_args=extra_args, tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
