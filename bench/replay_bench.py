"""
How fast C{pfxpold-replay} is: write a capture of N requests as the
daemon would (bench/run.py's requests, the map-100k access map, answered
by the real chain and written by the real capture writer, one request
every C{--interval} seconds of captured time), then replay it through a
configuration with a greylist and a quota added (memory stores, clock
following the captured times) and print the replay's speed.

    PYTHONPATH=. python3 bench/replay_bench.py --requests 1000000

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCH)
sys.path.insert(0, REPOSITORY)
sys.path.insert(0, BENCH)

import run as bench  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from pfxpold.capture import CaptureWriter  # noqa: E402
from pfxpold.config import load_configuration  # noqa: E402
from pfxpold.request import PolicyRequest  # noqa: E402

CAPTURE = """
[server]
capture = "capture.jsonl"
capture_max_bytes = 10000000000
"""


STATEFUL = """
[[check]]
name = "greylist"
type = "greylist"
delay = 300
action = "DEFER_IF_PERMIT Greylisted"

[[check]]
name = "quota"
type = "quota"
key = ["sender"]
unit = "recipients"
stage = "RCPT"
limits = [{ period = "hour", max = 50 }]
action = "DEFER 4.7.1 Sending quota exceeded"
"""


def write_capture(directory: str, count: int, interval: float) -> str:
    """
    Capture C{count} requests answered by the map-100k chain.
    """
    bench.write_access_map(os.path.join(directory, "senders.map"), bench.Population())
    config = os.path.join(directory, "pfxpold.toml")
    with open(config, "w") as f:
        f.write(CAPTURE + bench.MAP_CHECK)
    clock = Clock()
    clock.advance(1_764_806_400)
    configuration = load_configuration(config, clock)
    for service in configuration.services:
        service.startService()
    assert configuration.capture is not None
    writer = CaptureWriter(configuration.capture, clock, checks=lambda: configuration)
    writer.startService()
    chain = configuration.chain
    requests = bench.make_requests(min(count, 100_000))
    for number in range(count):
        clock.advance(interval)
        request = PolicyRequest(requests[number % len(requests)])
        writer.record(request, chain.decide(request), clock.seconds())
    writer.stopService()
    return writer.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument(
        "--interval", type=float, default=0.0864, help="captured seconds between requests"
    )
    parser.add_argument("--directory", default=None, help="keep the files here")
    arguments = parser.parse_args()
    directory = arguments.directory or tempfile.mkdtemp(prefix="pfxpold-replay-bench-")
    os.makedirs(directory, exist_ok=True)
    started = time.perf_counter()
    capture = write_capture(directory, arguments.requests, arguments.interval)
    print(
        f"captured {arguments.requests} requests ({os.path.getsize(capture) / 1e6:.0f} MB)"
        f" in {time.perf_counter() - started:.1f}s"
    )
    stateful = os.path.join(directory, "stateful.toml")
    with open(stateful, "w") as f:
        f.write(bench.MAP_CHECK + STATEFUL)
    same = os.path.join(directory, "same.toml")
    with open(same, "w") as f:
        f.write(bench.MAP_CHECK)
    for name, config in (("same map", same), ("map + greylist + quota", stateful)):
        began = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "pfxpold.replay", "--config", config, "--timing",
             "--no-fail-on-refuse", capture],
            env={**os.environ, "PYTHONPATH": REPOSITORY},
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - began
        print(f"{name}: {result.stderr.strip()} (command: {wall:.1f}s wall)")
        print("  " + "\n  ".join(result.stdout.splitlines()[:2]))


if __name__ == "__main__":
    main()
