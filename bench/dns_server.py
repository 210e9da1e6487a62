"""
A DNS list for the benchmark's realistic chain: answers A 127.0.0.2 for the
listed clients' reversed addresses under C{ZONE}, NXDOMAIN (with an SOA, so
the negative answer is cached) for everything else.

Usage: C{python3 bench/dns_server.py PORT LISTED_FILE} where LISTED_FILE
has one IPv4 address per line. Listens on 127.0.0.1 (UDP and TCP).
"""

from __future__ import annotations

import sys

from twisted.internet import defer, reactor
from twisted.names import dns, error, server
from twisted.names.common import ResolverBase

ZONE = "bl.bench.test"
TTL = 3600


class ListResolver(ResolverBase):
    """
    Answers from a set of listed names.
    """

    def __init__(self, listed: set[str]) -> None:
        super().__init__()
        self.listed = listed
        self.soa = dns.RRHeader(
            ZONE,
            dns.SOA,
            ttl=TTL,
            payload=dns.Record_SOA(
                mname=f"ns.{ZONE}", rname=f"hostmaster.{ZONE}", minimum=TTL, ttl=TTL
            ),
            auth=True,
        )

    def _lookup(self, name, cls, type, timeout):
        name = name.decode() if isinstance(name, bytes) else name
        if name.lower() in self.listed:
            if type in (dns.A, dns.ALL_RECORDS):
                answer = dns.RRHeader(
                    name, dns.A, ttl=TTL, payload=dns.Record_A("127.0.0.2", ttl=TTL), auth=True
                )
                return defer.succeed(([answer], [], []))
            return defer.succeed(([], [self.soa], []))
        return defer.fail(error.AuthoritativeDomainError(([], [self.soa], [])))


def main(port: int, listed_path: str) -> None:
    listed = set()
    with open(listed_path) as f:
        for line in f:
            address = line.strip()
            if address:
                listed.add(".".join(reversed(address.split("."))) + "." + ZONE)
    factory = server.DNSServerFactory(authorities=[ListResolver(listed)])
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
