"""
An authoritative DNS server for the SPF test suite, run as its own
process: C{python spf_dns_server.py CONFIG.json}.

The JSON file gives C{suite} (the path of a test suite in the YAML format
of the SPF council's RFC 7208 suite) and C{ports}: one port per scenario
(YAML document) of the suite, in order, on which that scenario's
C{zonedata} is served (UDP and TCP on 127.0.0.1), so that the scenarios'
zones, which reuse the same names, never meet; C{0} (or C{ports} left out):
a port free for both, picked by L{dns_ports.listen_udp_and_tcp}. Once
listening it prints C{READY} and the ports, in the scenarios' order.

The zone data is served as pyspf's own suite driver (test/testspf.py)
serves it:
  - C{TXT} and C{SPF} values are one string or a list of strings (one
    record of several character strings), encoded as UTF-8;
  - a name with C{SPF} records and no C{TXT} record gets the same values
    as C{TXT} records too (RFC 7208 dropped type SPF; the suite relies on
    drivers copying it);
  - C{NONE} as a record value: no record of that type (a C{TXT: NONE}
    keeps the C{SPF} values from being copied);
  - C{TIMEOUT} as a record value: questions for that type are never
    answered; C{TIMEOUT} as an entry of a name: questions for types the
    name has no record of are never answered;
  - a C{CNAME} is answered with the records of its target, if served, for
    the type asked;
  - a name that is not served is NXDOMAIN (with an SOA, so negative
    answers have a TTL), except under C{error.}, which never answers;
    a served name without the type asked is NODATA.
"""

import json
import sys

import yaml
from dns_ports import listen_udp_and_tcp, ready_line  # this directory: run as a script
from twisted.internet import defer, reactor
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError

TTL = 300


def _strings(value):
    if isinstance(value, str):
        value = [value]
    return [item.encode("utf-8") for item in value]


class ScenarioResolver(ResolverBase):
    """
    Answers from one scenario's C{zonedata}.
    """

    def __init__(self, zonedata):
        super().__init__()
        self.zone = {}
        self.timeouts = set()
        for name, entries in (zonedata or {}).items():
            records = self.zone.setdefault(name.lower().rstrip("."), [])
            for entry in entries:
                if entry == "TIMEOUT":
                    self.timeouts.add(name.lower().rstrip("."))
                    continue
                for kind, value in entry.items():
                    records.append((kind, value))
        for records in self.zone.values():
            # "TXT: NONE" says: no TXT record, and none copied from SPF.
            if not any(kind == "TXT" for kind, _ in records):
                copies = [("TXT", value) for kind, value in records if kind == "SPF"]
                records.extend(copies)
            records[:] = [(kind, value) for kind, value in records if value != "NONE"]

    def _lookup(self, name, cls, type, timeout):
        name = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        name = name.lower().rstrip(".")
        kind = dns.QUERY_TYPES.get(type, str(type))
        records = self.zone.get(name)
        if records is None:
            if name.startswith("error."):
                return defer.Deferred()
            message = dns.Message(rCode=dns.ENAME)
            message.authority = [
                dns.RRHeader(
                    name,
                    dns.SOA,
                    ttl=TTL,
                    payload=dns.Record_SOA(minimum=TTL, ttl=TTL),
                    auth=True,
                )
            ]
            return defer.fail(DNSNameError(message))
        answers = self._records(name, records, kind)
        if answers is None:
            return defer.Deferred()
        if not answers:
            if name in self.timeouts:
                return defer.Deferred()
            cnames = [value for k, value in records if k == "CNAME"]
            for target in cnames:
                target = target.lower().rstrip(".")
                answers.append(
                    dns.RRHeader(
                        name, dns.CNAME, ttl=TTL, payload=dns.Record_CNAME(target), auth=True
                    )
                )
                more = self._records(target, self.zone.get(target, []), kind)
                answers.extend(more or [])
        return defer.succeed((answers, [], []))

    def _records(self, name, records, kind):
        """
        @return: the records of C{kind} at C{name}, or L{None} when that
            type times out.
        """
        answers = []
        for record_kind, value in records:
            if record_kind != kind:
                continue
            if value == "TIMEOUT":
                return None
            if kind == "A":
                payload = dns.Record_A(value, ttl=TTL)
            elif kind == "AAAA":
                payload = dns.Record_AAAA(value, ttl=TTL)
            elif kind == "MX":
                payload = dns.Record_MX(int(value[0]), value[1], ttl=TTL)
            elif kind == "PTR":
                payload = dns.Record_PTR(value, ttl=TTL)
            elif kind == "CNAME":
                payload = dns.Record_CNAME(value, ttl=TTL)
            elif kind == "TXT":
                payload = dns.Record_TXT(*_strings(value), ttl=TTL)
            elif kind == "SPF":
                payload = dns.Record_SPF(*_strings(value), ttl=TTL)
            else:
                continue
            answers.append(dns.RRHeader(name, payload.TYPE, ttl=TTL, payload=payload, auth=True))
        return answers


def main(path):
    with open(path) as f:
        config = json.load(f)
    with open(config["suite"], "rb") as f:
        scenarios = list(yaml.safe_load_all(f))
    ports = config.get("ports") or [0] * len(scenarios)
    if len(scenarios) != len(ports):
        raise SystemExit(f"{len(scenarios)} scenarios, {len(ports)} ports")
    listening = []
    for scenario, port in zip(scenarios, ports, strict=True):
        factory = server.DNSServerFactory(authorities=[ScenarioResolver(scenario.get("zonedata"))])
        factory.noisy = False
        listening.append(listen_udp_and_tcp(reactor, factory, port))
    print(ready_line(listening), flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
