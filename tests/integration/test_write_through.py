"""
Answers sent straight to the socket at the end of the reactor's turn (the
protocol's write-through), over real TCP and Unix sockets: every answer
arrives, once, in request order, whether the peer reads as it goes or
stops reading until the daemon's socket buffer is full and the
transport's buffer takes over; a turn's answers leave in one send, and a
close sends them first.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from twisted.internet import unix
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure

from pfxpold.protocol import Limits, PolicyFactory
from tests.integration.support import encode_request, running_daemon
from tests.unit.test_protocol import ScriptedDecider, request_bytes

CONFIG = """
[server]
log_requests = false
max_pipelined = 100000

[[check]]
name = "script"
type = "tests.integration.daemon_checks.ScriptCheck"
"""

#: Requests sent before the first answer is read: with long answers and
#: small socket buffers, far more than the kernel holds.
COUNT = 4000


def requests_and_answers() -> tuple[bytes, bytes]:
    """
    C{COUNT} requests, each asking for an answer naming its number, and
    the answers in order.
    """
    requests = b"".join(
        encode_request({"answer": f"REJECT {number} " + "x" * 200}) for number in range(COUNT)
    )
    answers = b"".join(
        f"action=REJECT {number} {'x' * 200}\n\n".encode() for number in range(COUNT)
    )
    return requests, answers


def exchange(sock: socket.socket, requests: bytes, expected: int) -> bytes:
    """
    Send C{requests} from a thread while this one reads nothing until
    they are all sent (or the daemon stops reading them), then read
    C{expected} bytes.
    """
    sent = threading.Event()

    def send() -> None:
        try:
            sock.sendall(requests)
        finally:
            sent.set()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    # The daemon's answers fill our small receive buffer and its send
    # buffer: its sends come up short, and the rest waits in Twisted's
    # transport, which pauses reading until we read.
    sent.wait(2.0)
    received = b""
    while len(received) < expected:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sender.join(30)
    return received


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_unread_answers_arrive_in_order(tmp_path, family):
    """
    A peer that sends thousands of requests before it reads an answer
    gets every answer, once, in request order, over TCP and Unix sockets.
    """
    path = os.path.join(tmp_path, "policy.sock")
    requests, answers = requests_and_answers()
    with running_daemon(tmp_path, CONFIG, extra_args=("--port", f"unix:{path}")) as daemon:
        if family == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", daemon.port))
        sock.settimeout(30)
        with sock:
            received = exchange(sock, requests, len(answers))
    assert received == answers


def test_answers_as_they_go(tmp_path):
    """
    A peer that reads each answer before its next request (as Postfix
    does) gets each at once, on one connection, many times over.
    """
    with running_daemon(tmp_path, CONFIG) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
            for number in range(500):
                sock.sendall(encode_request({"answer": f"REJECT {number}"}))
                received = b""
                while not received.endswith(b"\n\n"):
                    chunk = sock.recv(4096)
                    assert chunk, "the daemon closed the connection"
                    received += chunk
                assert received == f"action=REJECT {number}\n\n".encode()


def test_waiting_answers_keep_their_order():
    """
    Once a send comes up short, later answers wait behind the rest in the
    transport's buffer even when the socket has room again: the peer gets
    every answer in order. Driven by hand over a socket pair (a
    L{MemoryReactor}, no event loop): the daemon's side is Twisted's own
    Unix transport.
    """
    server_socket, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server_socket.setblocking(False)
    server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.setblocking(False)
    clock = Clock()
    factory = PolicyFactory(ScriptedDecider(), clock, Limits(max_pipelined=100000), False)
    protocol = factory.buildProtocol(None)
    transport = unix.Server(server_socket, protocol, "peer", None, 1, MemoryReactor())
    protocol.makeConnection(transport)
    received = []
    try:
        _answers_in_order(protocol, transport, peer, received, clock)
    finally:
        transport.connectionLost(Failure(ConnectionDone()))
        peer.close()


@contextmanager
def connected_pair() -> Iterator[tuple[Any, Any, socket.socket, Clock, list[int]]]:
    """
    A protocol on Twisted's Unix transport over a socket pair, driven by
    hand (a L{MemoryReactor} and the factory's L{Clock}): the protocol,
    its transport, the peer's socket, the clock, and the sizes of the
    protocol's sends on the socket, as they are made.
    """
    server_socket, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server_socket.setblocking(False)
    peer.setblocking(False)
    clock = Clock()
    factory = PolicyFactory(ScriptedDecider(), clock, Limits(), False)
    protocol = factory.buildProtocol(None)
    transport = unix.Server(server_socket, protocol, "peer", None, 1, MemoryReactor())
    protocol.makeConnection(transport)
    sends: list[int] = []
    send = protocol._send

    def counted(data: bytes) -> int:
        sends.append(len(data))
        return send(data)

    protocol._send = counted
    try:
        yield protocol, transport, peer, clock, sends
    finally:
        if not transport.disconnected:
            transport.connectionLost(Failure(ConnectionDone()))
        peer.close()


def available(peer: socket.socket) -> bytes:
    """
    What the peer can read now, without waiting.
    """
    chunks = []
    while True:
        try:
            chunk = peer.recv(65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_turns_answers_leave_together():
    """
    The answers of one turn of the reactor wait for its end (the factory's
    timer), then leave in one send: the peer has none before, all after.
    """
    with connected_pair() as (protocol, _, peer, clock, sends):
        protocol.dataReceived(b"".join(request_bytes(answer=f"REJECT {n}") for n in range(3)))
        assert available(peer) == b""
        assert sends == []
        clock.advance(0)
        expected = b"".join(f"action=REJECT {n}\n\n".encode() for n in range(3))
        assert available(peer) == expected
        assert sends == [len(expected)]
        protocol.dataReceived(request_bytes(answer="REJECT 3"))
        clock.advance(0)
        assert available(peer) == b"action=REJECT 3\n\n"
        assert sends == [len(expected), len(b"action=REJECT 3\n\n")]


def test_close_sends_the_turns_answers_first():
    """
    A client that half-closes after its requests gets their answers before
    the close, though the turn has not ended: closing sends them first.
    """
    with connected_pair() as (protocol, transport, peer, clock, sends):
        protocol.dataReceived(b"".join(request_bytes(answer=f"REJECT {n}") for n in range(2)))
        protocol.readConnectionLost()
        assert transport.disconnecting
        expected = b"".join(f"action=REJECT {n}\n\n".encode() for n in range(2))
        assert available(peer) == expected
        assert sends == [len(expected)]
        clock.advance(0)
        assert sends == [len(expected)]


def _answers_in_order(protocol, transport, peer, received, clock) -> None:
    """
    The body of L{test_waiting_answers_keep_their_order}: every answer
    reaches the peer, in order, within a bounded number of writes.
    """

    def read_available() -> None:
        while True:
            try:
                chunk = peer.recv(65536)
            except BlockingIOError:
                return
            assert chunk
            received.append(chunk)

    def ask(numbers: range) -> bytes:
        protocol.dataReceived(
            b"".join(request_bytes(answer=f"REJECT {n} {'x' * 200}") for n in numbers)
        )
        # The turn ends: its answers are sent.
        clock.advance(0)
        return b"".join(f"action=REJECT {n} {'x' * 200}\n\n".encode() for n in numbers)

    expected = ask(range(0, 300))
    # More than both socket buffers hold: some answers wait in the
    # transport. Reading makes room in the socket; the next answers must
    # still wait behind them.
    read_available()
    assert 0 < len(b"".join(received)) < len(expected)
    expected += ask(range(300, 310))
    # Each write moves at least a socket buffer's worth: far fewer than
    # this many writes empty the transport, unless answers were lost.
    for _ in range(1000):
        if len(b"".join(received)) >= len(expected):
            break
        transport.doWrite()
        read_available()
    assert b"".join(received) == expected
