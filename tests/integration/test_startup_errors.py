"""
Configuration and start-up errors as a mail admin sees them from the real
C{twistd}: exactly one line on stderr naming the file, table or check, and
key (or the endpoint), no traceback, no usage text, and a non-zero exit
status, in the foreground (C{-n}) and in daemon mode, where the process
that was started must exit non-zero itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.integration.support import daemon_environment, free_port, stop_process

#: Seconds a failing start may take (loading Twisted and the checks).
TIMEOUT = 60

GOOD = """
[server]
listen = ["{listen}"]

[[check]]
name = "demo"
type = "demo"
"""

MISSING_SQLITE = """
[[check]]
name = "relay-acl"
type = "sql"
database = "relay-acl.sqlite"
query = "SELECT 1 FROM relay_acl WHERE origin = :client_address"
found = "OK"
"""


def twistd(directory: str, twistd_arguments: list[str], pfxpold_arguments: list[str]):
    """
    Run C{twistd TWISTD_ARGUMENTS pfxpold PFXPOLD_ARGUMENTS} in C{directory}
    until it exits; stopped (by its PID) if it has not within L{TIMEOUT}.

    @return: its exit status and stderr.
    """
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            *twistd_arguments,
            "pfxpold",
            *pfxpold_arguments,
        ],
        env=daemon_environment(),
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_process(process)
        process.communicate()
        pytest.fail(f"twistd pfxpold {pfxpold_arguments} did not exit within {TIMEOUT}s")
    return process.returncode, stderr.decode("utf-8", "replace")


@pytest.fixture(params=["foreground", "daemon"])
def mode(request, tmp_path) -> Iterator[list[str]]:
    """
    twistd's own arguments: C{-n} with a log file, or daemon mode. A daemon
    that started after all (the test then fails) is stopped by the PID in
    its pidfile.
    """
    log = os.path.join(tmp_path, "twistd.log")
    if request.param == "foreground":
        yield ["-n", "--pidfile=", f"--logfile={log}"]
        return
    pidfile = os.path.join(tmp_path, "twistd.pid")
    yield [f"--pidfile={pidfile}", f"--logfile={log}"]
    try:
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    os.kill(pid, signal.SIGTERM)


def assert_one_line(status: int, stderr: str, *parts: str) -> str:
    """
    The exit status is not 0 and stderr is one line holding every part,
    without a traceback or twistd's usage text.
    """
    assert status != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "Usage:" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], stderr
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port this test listens on itself."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_port_in_use(tmp_path, mode, taken_port):
    """A port another process listens on: one line naming the endpoint."""
    status, stderr = twistd(str(tmp_path), mode, ["--port", str(taken_port)])
    line = assert_one_line(
        status,
        stderr,
        f"cannot listen on tcp:{taken_port}:interface=127.0.0.1",
        "address already in use",
    )
    assert line.startswith("pfxpold: "), line
    assert not os.path.exists(os.path.join(tmp_path, "twistd.pid"))


def test_port_in_use_from_config(tmp_path, mode, taken_port):
    """The same for a port in the configuration's listen."""
    config = os.path.join(tmp_path, "pfxpold.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(GOOD.format(listen=f"tcp:{taken_port}:interface=127.0.0.1"))
    status, stderr = twistd(str(tmp_path), mode, ["--config", config])
    assert_one_line(status, stderr, f"tcp:{taken_port}:interface=127.0.0.1", "in use")


def test_port_out_of_range(tmp_path, mode):
    """--port 99999: one line naming --port, before anything starts."""
    status, stderr = twistd(str(tmp_path), mode, ["--port", "99999"])
    assert_one_line(status, stderr, "--port", "99999", "out of range")


def test_port_out_of_range_in_config_check(tmp_path):
    """--check-config with listen = ["99999"]: file, [server], key and port."""
    config = os.path.join(tmp_path, "pfxpold.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(GOOD.format(listen="99999"))
    status, stderr = twistd(str(tmp_path), ["-n"], ["--check-config", "--config", config])
    assert_one_line(status, stderr, config, "[server] key 'listen'", "99999", "out of range")


def test_unix_socket_in_missing_directory(tmp_path, mode):
    """A UNIX socket in a directory that does not exist: one line naming it."""
    missing = os.path.join(tmp_path, "missing")
    status, stderr = twistd(str(tmp_path), mode, ["--port", f"unix:{missing}/pfxpold.sock"])
    assert_one_line(status, stderr, f"unix:{missing}/pfxpold.sock", missing, "does not exist")


def test_misspelt_table(tmp_path):
    """--check-config with [sever]: one line, file and table, with a suggestion."""
    config = os.path.join(tmp_path, "pfxpold.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(GOOD.format(listen=f"{free_port()}").replace("[server]", "[sever]"))
    status, stderr = twistd(str(tmp_path), ["-n"], ["--check-config", "--config", config])
    line = assert_one_line(status, stderr, config, "[sever]", "did you mean [server]?")
    assert line.startswith(f"{config}: "), line


def test_misspelt_table_when_starting(tmp_path, mode):
    """Starting with [[chekc]] is the same one line, in either mode."""
    config = os.path.join(tmp_path, "pfxpold.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(GOOD.format(listen=f"{free_port()}") + "[[chekc]]\nname = 'x'\n")
    status, stderr = twistd(str(tmp_path), mode, ["--config", config])
    assert_one_line(status, stderr, config, "[[chekc]]", "did you mean [[check]]?")


def test_missing_sqlite_database(tmp_path):
    """
    --check-config with an sql check whose SQLite file is missing: one
    line naming file, check and key; the database is not created.
    """
    config = os.path.join(tmp_path, "pfxpold.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(MISSING_SQLITE)
    status, stderr = twistd(str(tmp_path), ["-n"], ["--check-config", "--config", config])
    database = os.path.join(tmp_path, "relay-acl.sqlite")
    assert_one_line(
        status, stderr, config, "check 'relay-acl'", "key 'database'", f"{database} does not exist"
    )
    assert not os.path.exists(database)


def test_unknown_option_still_shows_usage(tmp_path):
    """A genuine command-line mistake is still twistd's usage error."""
    status, stderr = twistd(str(tmp_path), ["-n"], ["--no-such-option"])
    assert status != 0
    assert "Traceback" not in stderr


def test_adopt_hidden_from_help(tmp_path):
    """--help lists the options an admin uses, not the internal --adopt."""
    process = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "pfxpold", "--help"],
        env=daemon_environment(),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert "--check-config" in process.stdout
    assert "--workers" in process.stdout
    assert "adopt" not in process.stdout
