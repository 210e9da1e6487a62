"""
Hostile clients against a real C{twistd -n pfxpold} over real sockets: log
injection, a violation right after a valid request, a pipelined request
answered before the violation closes its connection, and a daemon out of
open files that must not flood its log.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import time

from tests.integration.support import (
    encode_request,
    read_reply,
    require_program,
    running_daemon,
)

CONFIG = """
[server]
request_timeout = 5.0

[[check]]
name = "script"
type = "tests.integration.daemon_checks.ScriptCheck"
timeout = 10
"""


def read_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """
    @return: what the server sent until it closed the connection, and
        whether it closed it gracefully (a FIN, not a reset).
    """
    received = b""
    sock.settimeout(15)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received, False
        if not chunk:
            return received, True
        received += chunk


def wait_for_log(daemon, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = daemon.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged within {timeout}s")


def test_answer_before_violation_sent(tmp_path):
    """
    A valid request and a malformed one in the same write: the valid one
    is answered, then the connection is closed gracefully; a request still
    waiting for its check when the violation arrives is answered first.
    """
    with running_daemon(tmp_path, CONFIG) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
            sock.sendall(encode_request({"answer": "OK"}) + b"garbage\n\n")
            assert read_until_closed(sock) == (b"action=OK\n\n", True)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
            sock.sendall(
                encode_request({"answer": "HOLD", "delay": "0.5"})
                + b"sender=a\nsender=b\n\n"
                + encode_request({"answer": "REJECT never"})
            )
            assert read_until_closed(sock) == (b"action=HOLD\n\n", True)
        wait_for_log(daemon, "a bad or repeated attribute name 'sender'")


def test_log_injection(tmp_path):
    """
    A CR, an escape sequence, C{\\\\x0b}, C{\\\\x85}, U+2028 or a NUL in a
    value neither forges nor corrupts a line of twistd's log.
    """
    sender = "evil\rFORGED RCPT x[192.0.2.66] from=<a@b> OK\x1b[2J\x0b\x85\u2028\x00@x.test"
    with running_daemon(tmp_path, CONFIG) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
            sock.sendall(encode_request({"answer": "DUNNO", "sender": sender}))
            assert read_reply(sock) == b"action=DUNNO\n\n"
        log = wait_for_log(
            daemon,
            "from=<evil\\x0dFORGED RCPT x[192.0.2.66] from=<a@b> OK"
            "\\x1b[2J\\x0b\\x85\\u2028\\x00@x.test>",
        )
    with open(daemon.log_path, "rb") as f:
        raw = f.read()
    for forbidden in [b"\r", b"\x1b", b"\x0b", b"\xc2\x85", b"\xe2\x80\xa8", b"\x00"]:
        assert forbidden not in raw
    assert "FORGED" not in "".join(line for line in log.splitlines() if "evil" not in line)


def test_out_of_open_files_logs_few_lines(tmp_path):
    """
    A daemon limited to 64 open files, sent 300 connections at once,
    refuses most of them with EMFILE but logs only a line or two about it,
    and serves again once they are gone.
    """
    prlimit = require_program("prlimit", "util-linux")
    wrapper = tmp_path / "python-64-files"
    wrapper.write_text(f'#!/bin/sh\nexec {prlimit} --nofile=64:64 {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    with running_daemon(tmp_path, CONFIG, python=os.fspath(wrapper)) as daemon:
        clients = []
        try:
            for _ in range(300):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", daemon.port))
                clients.append(sock)
            wait_for_log(daemon, "EMFILE")
            time.sleep(2)
            log = daemon.log()
        finally:
            for sock in clients:
                sock.close()
        lines = [line for line in log.splitlines() if "EMFILE" in line or "accept" in line]
        assert 1 <= len(lines) <= 3, lines
        assert "open files limit: 64" in log
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
                    sock.sendall(encode_request({"answer": "OK"}))
                    if read_reply(sock) == b"action=OK\n\n":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not served again"
            time.sleep(0.2)
