"""
L{pfxpold.query.query} against tiny in-process socket servers: the
address forms it accepts and the replies it refuses; and what importing
the command costs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from pfxpold.query import query
from tests.integration.support import REPOSITORY


def serve_once(server: socket.socket, reply: bytes, received: list[bytes]) -> threading.Thread:
    """Accept one connection, read one request, send C{reply}, close."""

    def run() -> None:
        connection, _ = server.accept()
        with connection:
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = connection.recv(4096)
                if not chunk:
                    break
                data += chunk
            received.append(data)
            connection.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def tcp_server():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(15)
        yield server


def test_tcp(tcp_server):
    """host:port: the request is sent as is and the action returned."""
    received = []
    thread = serve_once(tcp_server, b"action=REJECT no\n\n", received)
    port = tcp_server.getsockname()[1]
    assert query(f"127.0.0.1:{port}", b"sender=a@b\n\n", timeout=15) == "REJECT no"
    thread.join(15)
    assert received == [b"sender=a@b\n\n"]


def test_inet_prefix_and_reply_in_pieces(tcp_server):
    """inet:host:port (Postfix's spelling) works, and only the first line counts."""
    received = []
    serve_once(tcp_server, b"action=OK\n\n", received)
    port = tcp_server.getsockname()[1]
    assert query(f"inet:127.0.0.1:{port}", b"x=1\n\n", timeout=15) == "OK"


def test_ipv6():
    """[::1]:port reaches an IPv6 server."""
    with socket.socket(socket.AF_INET6) as server:
        server.bind(("::1", 0))
        server.listen(1)
        server.settimeout(15)
        serve_once(server, b"action=HOLD v6\n\n", [])
        assert query(f"[::1]:{server.getsockname()[1]}", b"x=1\n\n", timeout=15) == "HOLD v6"


def test_unix(tmp_path):
    """unix:/path reaches a unix socket server."""
    path = str(tmp_path / "policy.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        server.settimeout(15)
        serve_once(server, b"action=DUNNO\n\n", [])
        assert query(f"unix:{path}", b"x=1\n\n", timeout=15) == "DUNNO"


def test_closed_without_answer(tcp_server):
    """A server that closes without answering gives None."""
    serve_once(tcp_server, b"", [])
    assert query(f"127.0.0.1:{tcp_server.getsockname()[1]}", b"x=1\n\n", timeout=15) is None


def test_not_an_action(tcp_server):
    """A reply that is not action=... is an error."""
    serve_once(tcp_server, b"result=OK\n\n", [])
    with pytest.raises(ValueError):
        query(f"127.0.0.1:{tcp_server.getsockname()[1]}", b"x=1\n\n", timeout=15)


def test_imports_little():
    """
    Importing pfxpold.query (what the pfxpold-query script does first)
    imports neither Twisted's trial nor pfxpold's chain and configuration
    (nor any of Twisted): a one-shot command starts at once.
    """
    code = (
        "import sys, pfxpold.query\n"
        "heavy = ('twisted', 'pfxpold.testing', 'pfxpold.chain', 'pfxpold.config')\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'"
        " or m in heavy)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": REPOSITORY},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
