"""
Benchmark for access maps: generates a map of N entries (100,000 by
default) of every key kind, times loading it, and measures lookups per
second for hits and misses of each kind.

    PYTHONPATH=. python3 bench/map_bench.py [--entries 100000] [--lookups 20000]

It prints figures; it asserts nothing (the machine may be busy).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import tempfile
import time

from pfxpold.accessmap import AccessMap, lookup_key
from pfxpold.testing import make_request


def write_map(path: str, entries: int, rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """
    Write a map with C{entries} lines, a fifth of each kind, and return
    requests that hit each kind.
    """
    hits: dict[str, list[dict[str, str]]] = {
        "ipv4": [],
        "ipv4 cidr": [],
        "ipv6 cidr": [],
        "sender": [],
        "domain": [],
    }
    share = entries // 5
    with open(path, "w", encoding="utf-8") as f:
        for i in range(share):
            address = ipaddress.IPv4Address(0x0A000000 + i)  # 10.0.0.0 and up
            f.write(f"{address} OK\n")
            if i % 97 == 0:
                hits["ipv4"].append({"client_address": str(address)})
        for i in range(share):
            network = ipaddress.IPv4Network((0x64000000 + (i << 8), 24))  # 100.0.0.0/24 and up
            if i % 3 == 0:
                network = ipaddress.IPv4Network((0x64000000 + (i << 8), 25))
            f.write(f"{network} REJECT network {i}\n")
            if i % 97 == 0:
                hits["ipv4 cidr"].append({"client_address": str(network.network_address + 7)})
        for i in range(share):
            length = rng.choice((48, 56, 64))
            # 2001:db8::/32, then i in the next bits: unique per length.
            network = ipaddress.IPv6Network(((0x20010DB8 << 96) + (i << (128 - length)), length))
            f.write(f"{network} OK\n")
            if i % 97 == 0:
                hits["ipv6 cidr"].append({"client_address": str(network.network_address + 5)})
        for i in range(share):
            f.write(f"user{i}@sender{i % 1000}.example REJECT no\n")
            if i % 97 == 0:
                hits["sender"].append({"sender": f"User{i}@Sender{i % 1000}.example"})
        for i in range(entries - 4 * share):
            f.write(f".domain{i}.example OK\n")
            if i % 97 == 0:
                hits["domain"].append({"sender": f"someone@host.sub.domain{i}.example"})
    return hits


MISSES = {
    "ipv4": {"client_address": "198.51.100.7"},
    "ipv4 cidr": {"client_address": "203.0.113.99"},
    "ipv6 cidr": {"client_address": "2001:db9::1"},
    "sender": {"sender": "nobody@nowhere.invalid"},
    "domain": {"sender": "someone@a.b.c.d.e.invalid"},
}


def rate(check_map: AccessMap, requests: list, rounds: int) -> float:
    lookups = ["client_address", "sender"]
    prepared = [make_request(**attributes) for attributes in requests]
    started = time.perf_counter()
    done = 0
    while done < rounds:
        for request in prepared:
            keys = [lookup_key(request, name) for name in lookups]
            check_map.lookup(keys)
            done += 1
    return done / (time.perf_counter() - started)


def pair_bench(directory: str, entries: int, rounds: int) -> None:
    """
    A relay ACL of C{entries} pairs: origins (addresses, /24 networks and
    host names) times ten senders each, looked up as the relay-ACL check
    does (client_address, client_name) x (sender).
    """
    path = os.path.join(directory, "pairs.map")
    origins = entries // 10
    with open(path, "w", encoding="utf-8") as f:
        for i in range(origins):
            if i % 3 == 0:
                origin = str(ipaddress.IPv4Address(0x0A000000 + i))
            elif i % 3 == 1:
                origin = str(ipaddress.IPv4Network((0x64000000 + (i << 8), 24)))
            else:
                origin = f"host{i}.apps.example"
            for j in range(10):
                f.write(f"{origin} sender{j}@dept{i % 100}.example OK\n")
    started = time.perf_counter()
    loaded = AccessMap.load(path, pairs=True)
    load_time = time.perf_counter() - started
    print(f"pair map: {loaded.entries} pairs ({origins} origins x 10 senders)")
    print(f"load: {load_time:.2f} s ({loaded.entries / load_time:,.0f} lines/s)")
    cases = {
        "address": [
            {
                "client_address": str(ipaddress.IPv4Address(0x0A000000 + i)),
                "client_name": "unknown",
                "sender": f"sender{i % 10}@dept{i % 100}.example",
            }
            for i in range(0, origins, 3 * 97)
        ],
        "network": [
            {
                "client_address": str(ipaddress.IPv4Address(0x64000000 + (i << 8) + 9)),
                "client_name": "unknown",
                "sender": f"sender{i % 10}@dept{i % 100}.example",
            }
            for i in range(1, origins, 3 * 97)
        ],
        "name": [
            {
                "client_address": "198.51.100.1",
                "client_name": f"host{i}.apps.example",
                "sender": f"sender{i % 10}@dept{i % 100}.example",
            }
            for i in range(2, origins, 3 * 97)
        ],
    }
    misses = {
        "address": [
            {
                "client_address": "10.0.0.0",
                "client_name": "unknown",
                "sender": "nobody@dept0.example",
            }
        ],
        "network": [
            {
                "client_address": "203.0.113.1",
                "client_name": "unknown",
                "sender": "sender1@dept1.example",
            }
        ],
        "name": [
            {
                "client_address": "198.51.100.1",
                "client_name": "nohost.apps.example",
                "sender": "sender1@dept1.example",
            }
        ],
    }
    print("relay-ACL lookups per second ((client_address, client_name) x sender):")
    for kind, requests in cases.items():
        hit = pair_rate(loaded, requests, rounds)
        miss = pair_rate(loaded, misses[kind], rounds)
        print(f"  {kind:10s} hit {hit:>10,.0f}/s   miss {miss:>10,.0f}/s")
    os.unlink(path)


def pair_rate(pair_map: AccessMap, requests: list, rounds: int) -> float:
    prepared = [make_request(**attributes) for attributes in requests]
    started = time.perf_counter()
    done = 0
    while done < rounds:
        for request in prepared:
            keys = [lookup_key(request, "client_address"), lookup_key(request, "client_name")]
            pair_map.lookup(keys, [lookup_key(request, "sender")])
            done += 1
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    arguments = parser.parse_args()
    rng = random.Random(1)
    directory = tempfile.mkdtemp(prefix="pfxpold-bench-")
    path = os.path.join(directory, "big.map")
    hits = write_map(path, arguments.entries, rng)
    started = time.perf_counter()
    loaded = AccessMap.load(path)
    load_time = time.perf_counter() - started
    print(f"map: {loaded.entries} entries, {os.path.getsize(path) / 1e6:.1f} MB")
    print(f"load: {load_time:.2f} s ({loaded.entries / load_time:,.0f} lines/s)")
    print("lookups per second (one request = client_address then sender, as a check does):")
    for kind, requests in hits.items():
        hit = rate(loaded, requests, arguments.lookups)
        miss = rate(loaded, [MISSES[kind]], arguments.lookups)
        print(f"  {kind:10s} hit {hit:>10,.0f}/s   miss {miss:>10,.0f}/s")
    os.unlink(path)
    pair_bench(directory, arguments.entries, arguments.lookups)
    os.rmdir(directory)


if __name__ == "__main__":
    main()
