"""
The benchmark's reference: the least a Twisted policy server can do.

A bare L{LineReceiver} that answers C{action=DUNNO} to every request (every
empty line) and looks at nothing else. pfxpold does far more per request
(parse, validate, run checks, log), so its throughput as a fraction of this
one, measured in the same run, says how much of Twisted's per-request cost
pfxpold adds.

Usage: C{python3 bench/reference_server.py PORT [asyncio|uvloop] [--count]}
(listens on 127.0.0.1; on Twisted's default reactor, epoll, or on its
asyncio reactor, over asyncio's own event loop or uvloop's; with
C{--count}, a bare L{Protocol} that finds the requests' ends with one
C{bytes.count} per read, as the bare asyncio server does).
"""

from __future__ import annotations

import sys

from twisted.internet import protocol
from twisted.protocols.basic import LineReceiver


class DunnoProtocol(LineReceiver):
    """
    Answers DUNNO at the end of every request.
    """

    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        if not line:
            self.transport.write(b"action=DUNNO\n\n")


class CountingProtocol(protocol.Protocol):
    """
    Answers DUNNO at the end of every request, finding the ends in each read
    with one C{bytes.count}, as C{bench/reference_asyncio.py} does: beside
    it, the difference is Twisted's reactor and transport alone.
    """

    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        ends = buffer.count(b"\n\n")
        if ends:
            self.transport.write(b"action=DUNNO\n\n" * ends)
            buffer = buffer[buffer.rindex(b"\n\n") + 2 :]
        self.buffer = buffer


def install_reactor(name: str) -> None:
    """
    Install Twisted's asyncio reactor (C{"asyncio"}), over uvloop's event
    loop for C{"uvloop"}; nothing for C{""} (the default reactor).
    """
    if not name:
        return
    if name == "uvloop":
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from twisted.internet import asyncioreactor

    asyncioreactor.install()


def main(port: int, reactor_name: str = "", counting: bool = False) -> None:
    """
    Serve on 127.0.0.1:C{port} until killed.

    @param counting: serve L{CountingProtocol}, not the L{LineReceiver}.
    """
    install_reactor(reactor_name)
    from twisted.internet import reactor

    factory = protocol.Factory.forProtocol(CountingProtocol if counting else DunnoProtocol)
    reactor.listenTCP(port, factory, backlog=4096, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    options = sys.argv[2:]
    main(
        int(sys.argv[1]),
        next((name for name in ("asyncio", "uvloop") if name in options), ""),
        "--count" in options,
    )
