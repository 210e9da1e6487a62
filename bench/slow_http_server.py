"""
A slow web service for the benchmark's C{slow3} scenarios: answers every
POST with the plain-text action C{DUNNO} after a fixed delay, as a lookup
backend a few milliseconds away would.

Usage: C{python3 bench/slow_http_server.py PORT DELAY_MS}. Listens on
127.0.0.1.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.web import resource, server


class Slow(resource.Resource):
    """
    Answers C{DUNNO} C{delay} seconds after each request.
    """

    isLeaf = True

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def render_POST(self, request: server.Request) -> object:
        request.setHeader(b"content-type", b"text/plain")

        def answer() -> None:
            if not request.finished and not request._disconnected:
                request.write(b"DUNNO")
                request.finish()

        call = reactor.callLater(self.delay, answer)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return server.NOT_DONE_YET


def main(port: int, delay_ms: float) -> None:
    site = server.Site(Slow(delay_ms / 1000.0))
    site.noisy = False
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
