"""
A small authoritative DNS server for the dnsbl integration tests, run as
its own process: C{python dns_server.py ZONES.json}.

The JSON file gives C{port} (UDP and TCP on 127.0.0.1; C{0} or left out:
a port free for both, picked by L{dns_ports.listen_udp_and_tcp}), C{records}
(C{{name: {"A": [...], "TXT": [...]}}}; other names are NXDOMAIN, a
known name without the asked type is NODATA), C{ttl}, C{slow}
(C{{suffix: seconds}}: names under the suffix are answered that late),
C{silent} (suffixes never answered), C{silent_port} (a UDP port that reads
and never replies, like a resolver that is gone; C{0}: a free one) and
C{query_log} (a file that gets one line per query received: C{TYPE name}).
Once listening it prints C{READY}, the port, and the silent port (C{0}
without one).

Zones are served from Python data, not BIND zone files: Twisted's zone
file loader mangles TXT records with spaces.
"""

import json
import socket
import sys

from dns_ports import listen_udp_and_tcp, ready_line  # this directory: run as a script
from twisted.internet import defer, reactor
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError


class DataResolver(ResolverBase):
    """
    Answers from the JSON data.
    """

    def __init__(self, data):
        super().__init__()
        self.records = {name.lower(): value for name, value in data.get("records", {}).items()}
        self.ttl = data.get("ttl", 300)
        self.slow = data.get("slow", {})
        self.silent = data.get("silent", [])
        self.log = open(data["query_log"], "a", buffering=1) if data.get("query_log") else None

    def _lookup(self, name, cls, type, timeout):
        name = name.decode() if isinstance(name, bytes) else name
        name = name.lower()
        if self.log is not None:
            self.log.write(f"{dns.QUERY_TYPES.get(type, type)} {name}\n")
        if any(name.endswith(suffix) for suffix in self.silent):
            return defer.Deferred()
        for suffix, delay in self.slow.items():
            if name.endswith(suffix):
                late = defer.Deferred()
                reactor.callLater(delay, late.callback, None)
                return late.addCallback(lambda _: self._answer(name, type))
        return defer.maybeDeferred(self._answer, name, type)

    def _answer(self, name, type):
        entry = self.records.get(name)
        if entry is None:
            soa = dns.RRHeader(
                ".".join(name.split(".")[-2:]),
                dns.SOA,
                ttl=self.ttl,
                payload=dns.Record_SOA(minimum=self.ttl, ttl=self.ttl),
                auth=True,
            )
            message = dns.Message(rCode=dns.ENAME)
            message.authority = [soa]
            raise DNSNameError(message)
        answers = []
        if type in (dns.A, dns.ALL_RECORDS):
            for address in entry.get("A", []):
                answers.append(
                    dns.RRHeader(
                        name, dns.A, ttl=self.ttl, payload=dns.Record_A(address), auth=True
                    )
                )
        if type in (dns.TXT, dns.ALL_RECORDS):
            for text in entry.get("TXT", []):
                answers.append(
                    dns.RRHeader(
                        name,
                        dns.TXT,
                        ttl=self.ttl,
                        payload=dns.Record_TXT(text.encode()),
                        auth=True,
                    )
                )
        return answers, [], []


def main(path):
    with open(path) as f:
        data = json.load(f)
    factory = server.DNSServerFactory(authorities=[DataResolver(data)])
    factory.noisy = False
    port = listen_udp_and_tcp(reactor, factory, data.get("port", 0))
    silent = None
    if data.get("silent_port") is not None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", data["silent_port"]))
    print(ready_line([port, silent.getsockname()[1] if silent else 0]), flush=True)
    reactor.run()
    if silent is not None:
        silent.close()


if __name__ == "__main__":
    main(sys.argv[1])
