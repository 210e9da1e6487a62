"""
Shared helpers for integration tests: free loopback ports, a pfxpold
daemon run as a real twistd subprocess, and a blocking policy client.

Tests here talk to real processes over real sockets; they stop only the
processes they started, by PID.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Optional

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_program(path_or_name: str, package: str) -> str:
    """
    The path of a program a test needs. Missing: a failure in CI (where
    scripts/setup-test-env must have installed it), a skip elsewhere.
    """
    found = (
        path_or_name
        if os.path.isabs(path_or_name) and os.access(path_or_name, os.X_OK)
        else shutil.which(path_or_name)
    )
    if found:
        return found
    message = f"{path_or_name} not found: install Debian's {package} (scripts/setup-test-env)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def stop_process(
    process: subprocess.Popen, timeout: float = 15.0, wake: bool = False
) -> Optional[int]:
    """
    Stop a process this test run started, by its PID: SIGTERM (after
    SIGCONT when C{wake}, for one a test froze), then SIGKILL when it does
    not exit within C{timeout}.

    @return: its exit status.
    """
    if process.poll() is None:
        if wake:
            process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nobody listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(
    port: int,
    host: str = "127.0.0.1",
    timeout: float = 15.0,
    process: Optional[subprocess.Popen] = None,
) -> None:
    """
    Wait until something accepts connections on C{host:port}.

    @raise RuntimeError: when nothing does within C{timeout}, or
        C{process} exits first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode} before listening on {port}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def encode_request(attributes: Mapping[str, str]) -> bytes:
    return ("".join(f"{name}={value}\n" for name, value in attributes.items()) + "\n").encode()


def read_reply(sock: socket.socket) -> Optional[bytes]:
    """
    Read one reply (up to and including its empty line); L{None} if the
    server closed the connection first.
    """
    reply = b""
    while not reply.endswith(b"\n\n"):
        chunk = sock.recv(1)
        if not chunk:
            return None
        reply += chunk
    return reply


class PolicyClient:
    """
    A blocking policy client on one persistent connection, like Postfix.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)

    def ask(self, attributes: Mapping[str, str]) -> Optional[str]:
        """
        @return: the action value, or L{None} when the server closed the
            connection without an answer.
        """
        self.sock.sendall(encode_request(attributes))
        reply = read_reply(self.sock)
        if reply is None:
            return None
        assert reply.startswith(b"action=") and reply.count(b"\n") == 2, reply
        return reply[len(b"action=") : -2].decode()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Daemon:
    """
    A pfxpold run as C{twistd -n pfxpold} in a subprocess.

    @ivar port: the TCP port it listens on (127.0.0.1).
    @ivar log_path: its log file.
    """

    def __init__(self, process: subprocess.Popen, port: int, log_path: str) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path

    def log(self) -> str:
        """
        Everything the daemon logged: twistd rotates its log at 1 MB, so
        the rotated files come first, oldest first. A file renamed while
        we read is skipped; callers poll for what they wait for.
        """
        rotated = [
            path
            for path in glob.glob(glob.escape(self.log_path) + ".*")
            if path.rsplit(".", 1)[1].isdigit()
        ]
        rotated.sort(key=lambda path: int(path.rsplit(".", 1)[1]), reverse=True)
        parts = []
        for path in rotated + [self.log_path]:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    parts.append(f.read())
            except FileNotFoundError:
                continue
        return "".join(parts)

    def client(self) -> PolicyClient:
        return PolicyClient(self.port)

    def stop(self, timeout: float = 15.0) -> int:
        """
        SIGTERM the daemon (only this PID) and wait for it.

        @return: its exit status.
        """
        return stop_process(self.process, timeout)


def daemon_environment(extra_path: str = "") -> dict[str, str]:
    environment = dict(os.environ)
    paths = [REPOSITORY] + ([extra_path] if extra_path else [])
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


@contextmanager
def running_daemon(
    tmp_path: os.PathLike,
    config: Optional[str] = None,
    port: Optional[int] = None,
    extra_args: tuple[str, ...] = (),
    extra_path: str = "",
    python: str = sys.executable,
) -> Iterator[Daemon]:
    """
    Run pfxpold (with the TOML text C{config}, if given) on a free port of
    127.0.0.1 for the duration of the block, then stop it.
    """
    directory = os.fspath(tmp_path)
    port = port or free_port()
    log_path = os.path.join(directory, f"pfxpold-{port}.log")
    command = [
        python,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        f"--logfile={log_path}",
        "pfxpold",
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
    ]
    if config is not None:
        config_path = os.path.join(directory, f"pfxpold-{port}.toml")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(config)
        command += ["--config", config_path]
    command += list(extra_args)
    process = subprocess.Popen(
        command,
        env=daemon_environment(extra_path),
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    daemon = Daemon(process, port, log_path)
    try:
        try:
            wait_for_port(port, process=process)
        except RuntimeError:
            stderr = (
                process.stderr.read().decode(errors="replace") if process.poll() is not None else ""
            )
            log = daemon.log() if os.path.exists(log_path) else ""
            daemon.stop()
            raise RuntimeError(f"pfxpold did not start:\n{stderr}\n{log}") from None
        yield daemon
    finally:
        daemon.stop()
