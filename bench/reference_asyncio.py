"""
The benchmark's other reference: the least a bare asyncio policy server does.

An C{asyncio.Protocol} that answers C{action=DUNNO} at the end of every
request (every empty line) and looks at nothing else, like
C{bench/reference_server.py} does on Twisted. It finds the ends of the
requests in each read with one C{bytes.count}, where Twisted's
C{LineReceiver} calls a method per line; it is the floor the issue's
moonshot names (pfxpold's file map at or below this server's CPU per
request).

Usage: C{python3 bench/reference_asyncio.py PORT [--uvloop]} (listens on
127.0.0.1; with C{--uvloop}, on uvloop's event loop).
"""

from __future__ import annotations

import asyncio
import sys

ANSWER = b"action=DUNNO\n\n"


class DunnoProtocol(asyncio.Protocol):
    """
    Answers DUNNO at the end of every request, a request's lines being
    kept until its empty line arrives.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        ends = buffer.count(b"\n\n")
        if ends:
            self.transport.write(ANSWER * ends)
            buffer = buffer[buffer.rindex(b"\n\n") + 2 :]
        self.buffer = buffer


async def serve(port: int) -> None:
    """
    Serve on 127.0.0.1:C{port} until killed.
    """
    loop = asyncio.get_running_loop()
    server = await loop.create_server(DunnoProtocol, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(port: int, use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(port))


if __name__ == "__main__":
    main(int(sys.argv[1]), "--uvloop" in sys.argv[2:])
