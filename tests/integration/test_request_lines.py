"""
The request lines of the default configuration (no C{request_log}) where
admins read them, for real: C{twistd -n pfxpold} subprocesses logging with
C{--logfile}, to standard output (as under systemd), and to syslog's mail
facility through a private socket (C{PFXPOLD_SYSLOG_SOCKET}), never the
machine's syslog. The lines are written in batches; these tests check that
every line arrives once, whole, escaped, in twistd's classic format, and
that stopping the daemon right after the last answer loses none.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import pytest

from tests.integration.support import (
    PolicyClient,
    daemon_environment,
    free_port,
    stop_process,
    wait_for_port,
)

CONFIG = """
[server]
listen = ["tcp:{port}:interface=127.0.0.1"]

[[check]]
name = "senders"
type = "file"
lookup = ["sender"]
map = "{map}"
"""

#: twistd's classic line for a request: its timestamp, the protocol's
#: system, the line.
CLASSIC = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[pfxpold\.protocol\.PolicyProtocol#info\] "
    r"(?P<line>RCPT .*)$"
)

#: <PRI>Mmm dd hh:mm:ss TAG[PID]: message, as syslog(3) sends it.
SYSLOG = re.compile(
    r"^<(?P<pri>\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d pfxpold\[(?P<pid>\d+)\]: (?P<m>.*)$"
)

#: Requests sent per test: several batches' worth of lines would need more
#: than a second; these arrive within one, so the last batch is the one
#: written when the daemon stops.
COUNT = 300


def _config(directory: str, port: int) -> str:
    map_path = os.path.join(directory, "senders.map")
    with open(map_path, "w") as f:
        f.write("blocked@example.com REJECT blocked\n")
    path = os.path.join(directory, "pfxpold.toml")
    with open(path, "w") as f:
        f.write(CONFIG.format(port=port, map=map_path))
    return path


@contextmanager
def _daemon(
    directory: str,
    log_arguments: list[str],
    stdout,
    environment: Optional[dict] = None,
    pfxpold_arguments: tuple[str, ...] = (),
) -> Iterator[tuple[subprocess.Popen, int]]:
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        *log_arguments,
        "pfxpold",
        "--config",
        _config(directory, port),
        *pfxpold_arguments,
    ]
    process = subprocess.Popen(
        command,
        cwd=directory,
        env={**daemon_environment(), **(environment or {})},
        stdout=stdout,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process=process)
        yield process, port
    finally:
        stop_process(process)


def _send(port: int, connections: int = 3) -> list[str]:
    """
    Send L{COUNT} requests over C{connections} connections, the first with a sender
    that would forge a log line and colour a terminal, and check the
    answers.

    @return: the line each request must have, after its timestamp and
        system, up to its answer.
    """
    expected = []
    clients = []
    for _ in range(connections):
        clients.append(PolicyClient(port))
        # Answered at once, so that the next connection may find another
        # process (with --workers) waiting to accept it.
        assert clients[-1].ask({"request": "smtpd_access_policy"}) == "DUNNO"
    try:
        for number in range(COUNT):
            sender = f"user{number}@example.org"
            if number == 0:
                sender = "evil\r2026-01-01T00:00:00+0000 forged\x1b[31m\u2028\x0b@example.org"
            answer = clients[number % connections].ask(
                {
                    "request": "smtpd_access_policy",
                    "protocol_state": "RCPT",
                    "client_address": "192.0.2.7",
                    "client_name": "mx.example.net",
                    "sender": sender,
                    "recipient": "bob@example.com",
                    "instance": f"i{number}",
                }
            )
            assert answer == "DUNNO"
            shown = sender
            if number == 0:
                shown = "evil\\x0d2026-01-01T00:00:00+0000 forged\\x1b[31m\\u2028\\x0b@example.org"
            expected.append(
                f"RCPT mx.example.net[192.0.2.7] helo=<> from=<{shown}> to=<bob@example.com>"
                f" instance=i{number} queue_id=: DUNNO (default, "
            )
    finally:
        for client in clients:
            client.close()
    return expected


def _check_lines(lines: list[str], expected: list[str]) -> None:
    """
    Every expected line is there exactly once, whole (it ends with its
    time taken), in the order the requests were answered.
    """
    request_lines = [line for line in lines if "instance=i" in line]
    assert len(request_lines) == len(expected), request_lines[:5]
    for line, start in zip(request_lines, expected, strict=True):
        assert line.startswith(start), (line, start)
        assert re.search(r" ms\)$", line), line
    # Nothing forged a line of its own.
    assert not [line for line in lines if "forged" in line and "instance=i0" not in line]


def _classic(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        match = CLASSIC.match(line)
        if match:
            lines.append(match.group("line"))
    return lines


@pytest.mark.parametrize("destination", ["logfile", "stdout"])
def test_text_log(tmp_path, destination):
    """
    With --logfile, or with -n and no log file (a supervisor's journal
    reads standard output), the request lines are in twistd's log, one
    classic line each (timestamp, [pfxpold.protocol.PolicyProtocol#info]),
    escaped; SIGTERM right after the last answer writes the last batch,
    before twistd's last line.
    """
    directory = os.fspath(tmp_path)
    output = os.path.join(directory, "output.txt")
    log = os.path.join(directory, "twistd.log")
    arguments = ["--logfile", log] if destination == "logfile" else []
    with open(output, "w") as stdout:
        with _daemon(directory, arguments, stdout) as (process, port):
            expected = _send(port)
            assert stop_process(process) in (0, -signal.SIGTERM)
    text = _read(log if destination == "logfile" else output)
    _check_lines(_classic(text), expected)
    assert text.index("instance=i299") < text.index("Server Shut Down.")
    assert text.index("pfxpold serving on") < text.index("instance=i0")


def test_mail_syslog(tmp_path):
    """
    With --logger pfxpold.logger.mail_syslog and PFXPOLD_SYSLOG_SOCKET
    naming a private socket, each request line is one message in the mail
    facility at info (PRI 22), tagged pfxpold[PID], escaped, and the last
    batch arrives on stop.
    """
    directory = os.fspath(tmp_path)
    path = os.path.join(directory, "log.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    receiver.bind(path)
    receiver.settimeout(0.2)
    messages: list[str] = []
    stopped = threading.Event()

    def drain() -> None:
        # Concurrently, as syslog does: a full queue blocks the sender.
        while True:
            try:
                messages.append(receiver.recv(65536).decode("utf-8"))
            except TimeoutError:
                if stopped.is_set():
                    return

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        with _daemon(
            directory,
            ["--logger", "pfxpold.logger.mail_syslog"],
            subprocess.DEVNULL,
            {"PFXPOLD_SYSLOG_SOCKET": path},
        ) as (process, port):
            expected = _send(port)
            pid = process.pid
            assert stop_process(process) in (0, -signal.SIGTERM)
    finally:
        stopped.set()
        reader.join()
        receiver.close()
    parsed = [SYSLOG.match(message) for message in messages]
    assert all(parsed), [m for m, p in zip(messages, parsed, strict=True) if not p][:3]
    requests = [match for match in parsed if match and "instance=i" in match.group("m")]
    assert {int(match.group("pri")) for match in requests} == {2 * 8 + 6}
    assert {int(match.group("pid")) for match in requests} == {pid}
    _check_lines([match.group("m") for match in parsed if match], expected)
    assert any("pfxpold serving on" in message for message in messages)


def test_workers_on_standard_output(tmp_path):
    """
    With --workers 2 in the foreground without a log file, both processes'
    request lines reach standard output (the worker's through its parent),
    every one once.
    """
    directory = os.fspath(tmp_path)
    output = os.path.join(directory, "output.txt")
    with open(output, "w") as stdout:
        with _daemon(directory, [], stdout, pfxpold_arguments=("--workers", "2")) as (
            process,
            port,
        ):
            deadline = time.monotonic() + 30
            while _read(output).count("pfxpold serving on") < 2:
                assert time.monotonic() < deadline, _read(output)
                time.sleep(0.1)
            # Enough connections that the kernel gives both processes some.
            expected = _send(port, connections=12)
            assert stop_process(process) in (0, -signal.SIGTERM)
    text = _read(output)
    seen = [line for line in expected if line in text]
    assert len(seen) == COUNT
    for number in range(COUNT):
        assert text.count(f" instance=i{number} ") == 1


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def test_syslog_stream_socket(tmp_path):
    """
    Where syslog listens on a stream socket, the observer connects with a
    stream socket and ends each message with a NUL, as syslog(3) does.
    """
    from twisted.logger import LogLevel

    from pfxpold.logger import SyslogMailObserver, connect_syslog

    path = os.path.join(os.fspath(tmp_path), "stream.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        connection = connect_syslog(path)
        assert connection.type == socket.SOCK_STREAM
        connection.close()
        listener.accept()[0].close()
        observer = SyslogMailObserver(address=path)
        accepted, _ = listener.accept()
        with accepted:
            observer({"log_level": LogLevel.info, "log_format": "one\ntwo", "log_time": 0})
            accepted.settimeout(5)
            received = b""
            while received.count(b"\0") < 2:
                chunk = accepted.recv(4096)
                assert chunk
                received += chunk
        observer._socket.close()
        messages = received.split(b"\0")[:2]
        assert [m.decode().split(": ", 1)[1] for m in messages] == ["one", "two"]
        assert all(SYSLOG.match(m.decode()) for m in messages)
    finally:
        listener.close()
