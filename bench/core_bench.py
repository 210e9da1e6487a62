"""
pfxpold's own CPU per request, without sockets: the protocol, the request
and the chain, fed whole Postfix requests in memory (StringTransport), with
a no-op check and the request log off. CPU time (not wall time), the best
of several rounds, so that it holds on a busy machine better than a socket
benchmark; compare two checkouts with PYTHONPATH:

    PYTHONPATH=. python3 bench/core_bench.py
    PYTHONPATH=/tmp/old python3 bench/core_bench.py

Modes: C{sync} (the check answers at once), C{async} (an C{async def} that
never waits: a warm cache), C{later} (a Deferred fired after 128
connections sent a request each: the asynchronous path, with a real
reactor's timers, never run). It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from pfxpold.action import DUNNO, Action
from pfxpold.chain import ChainEntry, CheckChain, ErrorPolicy
from pfxpold.interfaces import ICheck
from pfxpold.protocol import Limits, PolicyFactory
from pfxpold.request import PolicyRequest
from pfxpold.testing import fixture_bytes

CONNECTIONS = 128


def memory_connections(factory: PolicyFactory, count: int = CONNECTIONS) -> list[Any]:
    """
    C{count} connections of C{factory}'s protocol, each over a
    L{StringTransport} with a peer of its own: C{(protocol, transport)}.
    """
    connections = []
    for number in range(count):
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + number))
        protocol.makeConnection(transport)
        connections.append((protocol, transport))
    return connections


@implementer(ICheck)
class Sync:
    def check(self, request: PolicyRequest) -> Action:
        return DUNNO


@implementer(ICheck)
class Async:
    async def check(self, request: PolicyRequest) -> Action:
        return DUNNO


@implementer(ICheck)
class Later:
    def __init__(self) -> None:
        self.waiting: list[Deferred[Action]] = []

    def check(self, request: PolicyRequest) -> Deferred[Action]:
        answer: Deferred[Action] = Deferred()
        self.waiting.append(answer)
        return answer


def rounds(mode: str) -> tuple[Callable[[], None], int]:
    """
    @return: one round of requests, and how many requests it sends.
    """
    reactor: Any = EPollReactor()
    check = {"sync": Sync, "async": Async, "later": Later}[mode]()
    chain = CheckChain(
        [ChainEntry("noop", check, 10.0, ErrorPolicy.parse("skip"))],
        None,
        20.0,
        ErrorPolicy.parse("DEFER_IF_PERMIT busy"),
        reactor,
    )
    factory = PolicyFactory(chain, reactor, Limits(), log_requests=False)
    connections = memory_connections(factory)
    request = fixture_bytes("rcpt")
    requests = [request.replace(b"sender=", b"sender=u%d" % n, 1) for n in range(CONNECTIONS)]
    turns = 100

    def one_round() -> None:
        for _ in range(turns):
            for (protocol, _), data in zip(connections, requests, strict=True):
                protocol.dataReceived(data)
            if isinstance(check, Later):
                waiting, check.waiting = check.waiting, []
                for answer in waiting:
                    answer.callback(DUNNO)
            for _, transport in connections:
                transport.clear()
            reactor.runUntilCurrent()

    return one_round, turns * CONNECTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["sync", "async", "later"])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    for mode in args.modes:
        one_round, requests = rounds(mode)
        one_round()
        best = float("inf")
        for _ in range(args.rounds):
            started = time.process_time()
            one_round()
            best = min(best, time.process_time() - started)
        print(f"{mode:6s} {best / requests * 1e6:6.2f} us/request")


if __name__ == "__main__":
    main()
