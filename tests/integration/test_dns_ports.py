"""
The tests' DNS servers listen on one port number for UDP and TCP, picked
free for both (tests/integration/dns_ports.py).
"""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet.error import CannotListenError
from twisted.names import dns

from tests.integration.dns_ports import listen_udp_and_tcp, running_dns_server


class _Port:
    def __init__(self, number: int) -> None:
        self.number = number
        self.stopped = False

    def getHost(self):
        return type("Address", (), {"port": self.number})()

    def stopListening(self) -> None:
        self.stopped = True


class TakenForTCPReactor:
    """
    Hands out UDP ports from C{numbers}; TCP on the numbers in C{taken}
    fails as a port another process holds does.
    """

    def __init__(self, numbers: list[int], taken: set[int]) -> None:
        self.numbers = list(numbers)
        self.taken = taken
        self.udp: list[_Port] = []
        self.tcp: list[int] = []

    def listenUDP(self, port, protocol, interface=""):
        udp = _Port(port or self.numbers.pop(0))
        self.udp.append(udp)
        return udp

    def listenTCP(self, port, factory, interface=""):
        if port in self.taken:
            raise CannotListenError(interface, port, OSError("Address already in use"))
        self.tcp.append(port)


def test_picks_a_number_free_for_tcp_too():
    """
    When the number UDP got is taken for TCP, that UDP port is closed and
    another number tried: the one returned listens on both.
    """
    reactor = TakenForTCPReactor([40001, 40002], taken={40001})
    assert listen_udp_and_tcp(reactor, object()) == 40002
    assert [(udp.number, udp.stopped) for udp in reactor.udp] == [(40001, True), (40002, False)]
    assert reactor.tcp == [40002]


def test_a_given_port_taken_is_an_error():
    """A port given, but taken for TCP, fails at once: no other is tried."""
    reactor = TakenForTCPReactor([], taken={40003})
    with pytest.raises(CannotListenError):
        listen_udp_and_tcp(reactor, object(), 40003)
    assert [(udp.number, udp.stopped) for udp in reactor.udp] == [(40003, True)]


def _question(name: str) -> bytes:
    message = dns.Message(id=4711, recDes=False)
    message.queries = [dns.Query(name, dns.A)]
    return message.toStr()


def _answer(data: bytes) -> list[str]:
    message = dns.Message()
    message.fromStr(data)
    assert message.id == 4711
    return [answer.payload.dottedQuad() for answer in message.answers]


def test_dns_server_answers_on_both(tmp_path):
    """
    dns_server.py, asked for no port, reports one on its READY line and
    answers there over UDP and over TCP; it reports the silent port it
    opened, another one.
    """
    zones = {"records": {"a.test": {"A": ["192.0.2.1"]}}, "silent_port": 0}
    with running_dns_server("dns_server.py", zones, str(tmp_path / "zones.json")) as server:
        port, silent_port = server.ports
        assert port and silent_port and port != silent_port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(10)
            udp.sendto(_question("a.test"), ("127.0.0.1", port))
            assert _answer(udp.recv(4096)) == ["192.0.2.1"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as tcp:
            question = _question("a.test")
            tcp.sendall(struct.pack("!H", len(question)) + question)
            length = struct.unpack("!H", tcp.recv(2, socket.MSG_WAITALL))[0]
            assert _answer(tcp.recv(length, socket.MSG_WAITALL)) == ["192.0.2.1"]
