"""
The benchmark's reference: the least a Twisted policy server can do.

A bare L{LineReceiver} that answers C{action=DUNNO} to every request (every
empty line) and looks at nothing else. pfxpold does far more per request
(parse, validate, run checks, log), so its throughput as a fraction of this
one, measured in the same run, says how much of Twisted's per-request cost
pfxpold adds.

Usage: C{python3 bench/reference_server.py PORT} (listens on 127.0.0.1).
"""

from __future__ import annotations

import sys

from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver


class DunnoProtocol(LineReceiver):
    """
    Answers DUNNO at the end of every request.
    """

    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        if not line:
            self.transport.write(b"action=DUNNO\n\n")


def main(port: int) -> None:
    """
    Serve on 127.0.0.1:C{port} until killed.
    """
    factory = protocol.Factory.forProtocol(DunnoProtocol)
    reactor.listenTCP(port, factory, backlog=4096, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
