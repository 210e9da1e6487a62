"""
A private redis-server for integration tests: started on a free loopback
port with no persistence, stopped (or restarted on the same port) by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

from tests.integration.support import free_port, require_program, stop_process, wait_for_port


class RedisServer:
    """
    One redis-server process we started.

    @ivar port: its port on 127.0.0.1.
    """

    def __init__(
        self, directory: str, port: Optional[int] = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.program = require_program("/usr/bin/redis-server", "redis-server")
        self.directory = directory
        self.port = port or free_port()
        self.extra_args = extra_args
        self.process: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        """The Twisted client endpoint string of this server."""
        return f"tcp:host=127.0.0.1:port={self.port}"

    def start(self) -> None:
        log = open(os.path.join(self.directory, f"redis-{self.port}.log"), "ab")
        self.process = subprocess.Popen(
            [
                self.program,
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
                str(self.port),
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
    directory: os.PathLike, extra_args: tuple[str, ...] = ()
) -> Iterator[RedisServer]:
    """
    A redis-server for the duration of the block.
    """
    server = RedisServer(os.fspath(directory), extra_args=extra_args)
    server.start()
    try:
        yield server
    finally:
        server.stop()
