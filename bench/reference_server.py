"""
The benchmark's reference: the least a Twisted policy server can do.

A bare L{LineReceiver} that answers C{action=DUNNO} to every request (every
empty line) and looks at nothing else. pfxpold does far more per request
(parse, validate, run checks, log), so its throughput as a fraction of this
one, measured in the same run, says how much of Twisted's per-request cost
pfxpold adds.

Usage: C{python3 bench/reference_server.py PORT [asyncio|uvloop] [--count|--direct]}
(listens on 127.0.0.1; on Twisted's default reactor, epoll, or on its
asyncio reactor, over asyncio's own event loop or uvloop's; with
C{--count}, a bare L{Protocol} that finds the requests' ends with one
C{bytes.count} per read, as the bare asyncio server does; with C{--direct},
the same, sending each answer at once, as asyncio does).
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


class DirectProtocol(CountingProtocol):
    """
    L{CountingProtocol}, sending each answer at once with the socket's
    C{send} (C{transport.getHandle()}) as asyncio's transports do, rather
    than through the transport's buffer, which Twisted writes out on a
    later turn of the reactor (watching the socket for writability with
    two C{epoll_ctl} calls). A measurement of what that costs, not a
    server to copy: once a send is short, everything goes through the
    transport.
    """

    buffered = False

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        ends = buffer.count(b"\n\n")
        if ends:
            answer = b"action=DUNNO\n\n" * ends
            if not self.buffered:
                try:
                    sent = self.transport.getHandle().send(answer)
                except BlockingIOError:
                    sent = 0
                answer = answer[sent:]
            if answer:
                self.buffered = True
                self.transport.write(answer)
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


def main(port: int, reactor_name: str = "", served: str = "") -> None:
    """
    Serve on 127.0.0.1:C{port} until killed.

    @param served: C{"--count"} for L{CountingProtocol}, C{"--direct"} for
        L{DirectProtocol}, C{""} for the L{LineReceiver}.
    """
    install_reactor(reactor_name)
    from twisted.internet import reactor

    served_protocol = {"--count": CountingProtocol, "--direct": DirectProtocol}.get(
        served, DunnoProtocol
    )
    factory = protocol.Factory.forProtocol(served_protocol)
    reactor.listenTCP(port, factory, backlog=4096, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    options = sys.argv[2:]
    main(
        int(sys.argv[1]),
        next((name for name in ("asyncio", "uvloop") if name in options), ""),
        next((name for name in ("--count", "--direct") if name in options), ""),
    )
