"""
What C{[server] capture} costs per request, in process: CPU time (not wall
time), the best of several rounds, so that it holds on a busy machine.

The measures:

 - C{record}: L{CaptureWriter.record} over bench/run.py's requests (the
   real Postfix 3.7 fixtures, 29 attributes; 64 distinct ones, in the
   processor's cache as a request just parsed is) and the decisions of a
   real chain (the map-100k access map): what C{record} itself costs (the
   answer's path), the batches' encoding, the write of 2048 requests (one
   flush), and all of it with the writer's defaults, in microseconds per
   request; C{redacted}: the same with C{capture_hash_local_parts};
 - C{protocol}: whole requests fed to the protocol in memory
   (StringTransport, 128 connections, the request log off, the map-100k
   chain), with and without a capture writer, rounds interleaved: the
   difference is what the capture costs, flushes included; C{logged}: the
   same with the request log written to a file, as bench/run.py's
   map-100k scenarios have it.

    PYTHONPATH=. python3 bench/capture_micro.py
    PYTHONPATH=/tmp/old python3 bench/capture_micro.py   # another checkout

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run as bench  # noqa: E402
from core_bench import CONNECTIONS, memory_connections  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from pfxpold.capture import CaptureWriter  # noqa: E402
from pfxpold.config import CaptureSettings, Configuration, load_configuration  # noqa: E402
from pfxpold.protocol import Limits, PolicyFactory  # noqa: E402
from pfxpold.request import PolicyRequest  # noqa: E402
from pfxpold.requestlog import FileRequestLog  # noqa: E402

#: Distinct requests in the record measure.
DISTINCT = 64



def configuration(directory: str, clock: Clock) -> Configuration:
    """
    The map-100k chain, loaded as the daemon loads it.
    """
    bench.write_access_map(os.path.join(directory, "senders.map"), bench.Population())
    path = os.path.join(directory, "pfxpold.toml")
    with open(path, "w") as f:
        f.write(bench.MAP_CHECK)
    loaded = load_configuration(path, clock)
    for service in loaded.services:
        service.startService()
    return loaded


def best_of(rounds: int, work: Any) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best


def measure_record(
    loaded: Configuration, directory: str, clock: Clock, count: int, rounds: int, **settings: Any
) -> dict[str, float]:
    """
    @return: microseconds per request: C{record} alone (what the answer's
        path pays; with an older writer that encodes in C{record}, the
        encoding too), C{encode} (the batches' encoding, when the writer
        has one), C{write} (the write of C{count} requests: one flush of
        C{MAX_BUFFERED}), and C{total}: C{count} requests recorded and
        flushed by a writer with its defaults.
    """
    chain = loaded.chain
    chain.record_verdicts = True
    # 64 distinct requests, over and over: in the daemon a request is
    # captured just after it was parsed, in the processor's cache; thousands
    # of distinct requests here would measure the cache misses instead.
    distinct = [PolicyRequest(attributes) for attributes in bench.make_requests(DISTINCT)]
    requests = [distinct[number % DISTINCT] for number in range(count)]
    decisions = [chain.decide(request) for request in requests]
    pairs = list(zip(requests, decisions, strict=True))
    now = clock.seconds()

    def writer(**more: Any) -> CaptureWriter:
        made = CaptureWriter(
            CaptureSettings(os.path.join(directory, "record.jsonl"), max_bytes=1 << 40, **settings),
            clock,
            checks=lambda: loaded,
            key=b"k" * 32,
            **more,
        )
        made.startService()
        return made

    try:
        apart = writer(max_buffered=1 << 30, batch=1 << 30)
    except TypeError:
        # A writer without batches.
        apart = writer(max_buffered=1 << 30)
    default = writer()
    best = {"record": float("inf"), "encode": float("inf"), "write": float("inf")}
    best["total"] = float("inf")
    for _ in range(rounds + 1):
        started = time.process_time()
        for request, decision in pairs:
            apart.record(request, decision, now)
        best["record"] = min(best["record"], time.process_time() - started)
        started = time.process_time()
        if hasattr(apart, "_encode_batch"):
            apart._encode_batch()
        best["encode"] = min(best["encode"], time.process_time() - started)
        started = time.process_time()
        apart.flush()
        best["write"] = min(best["write"], time.process_time() - started)
        started = time.process_time()
        for request, decision in pairs:
            default.record(request, decision, now)
        default.flush()
        best["total"] = min(best["total"], time.process_time() - started)
        # Keep the files small between rounds.
        for each in (apart, default):
            each.output.stream.truncate(0)  # type: ignore[union-attr]
    apart.stopService()
    default.stopService()
    return {name: value / count * 1e6 for name, value in best.items()}


def protocol_rounds(
    loaded: Configuration, directory: str, clock: Clock, capture: bool, request_log: bool = False
) -> tuple[Any, int, Any]:
    """
    @param request_log: whether requests are logged to a file too, as in
        bench/run.py's map-100k scenarios.
    @return: one round of requests through the protocol, how many requests
        it sends, and what stops it all.
    """
    chain = loaded.chain
    factory = PolicyFactory(chain, clock, Limits(), log_requests=request_log)
    log = None
    if request_log:
        log = FileRequestLog(os.path.join(directory, f"requests-{capture}.log"), clock)
        log.startService()
        factory.request_log = log
    writer = None
    if capture:
        writer = CaptureWriter(
            CaptureSettings(os.path.join(directory, "protocol.jsonl"), max_bytes=1 << 40),
            clock,
            checks=lambda: loaded,
        )
        writer.startService()
        factory.capture = writer
        factory.log_verdicts = False
    connections = memory_connections(factory)
    blocks = [
        b"".join(b"%s=%s\n" % (name.encode(), value.encode()) for name, value in request.items())
        + b"\n"
        for request in bench.make_requests(CONNECTIONS * 20)
    ]
    turns = len(blocks) // CONNECTIONS

    def one_round() -> None:
        # The chain records verdicts only for the capture, as the daemon's.
        chain.record_verdicts = capture
        for turn in range(turns):
            for (protocol, _), data in zip(
                connections, blocks[turn * CONNECTIONS : (turn + 1) * CONNECTIONS], strict=True
            ):
                protocol.dataReceived(data)
            for _, transport in connections:
                transport.clear()
            # The flush timer, once a "second": here once per 1,280 requests.
            if turn % 10 == 9:
                clock.advance(1.0)
        if writer is not None:
            writer.flush()
            writer.output.stream.truncate(0)  # type: ignore[union-attr]
        if log is not None:
            log.flush()
            log.output.stream.truncate(0)  # type: ignore[union-attr]

    def stop() -> None:
        if writer is not None:
            writer.stopService()
        if log is not None:
            log.stopService()
        for protocol, _ in connections:
            protocol.connectionLost(None)

    return one_round, turns * CONNECTIONS, stop


def measure_protocol(
    loaded: Configuration, directory: str, clock: Clock, rounds: int, request_log: bool = False
) -> tuple[float, float]:
    """
    @return: microseconds of CPU per request through the protocol without
        and with a capture, rounds of each interleaved.
    """
    without, count, stop_without = protocol_rounds(loaded, directory, clock, False, request_log)
    with_capture, _, stop_with = protocol_rounds(loaded, directory, clock, True, request_log)
    without()
    with_capture()
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for index, one_round in enumerate((without, with_capture)):
            best[index] = min(best[index], best_of(1, one_round))
    stop_without()
    stop_with()
    return best[0] / count * 1e6, best[1] / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--measures", nargs="+", default=["record", "redacted", "protocol", "logged"]
    )
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="pfxpold-capture-micro-")
    clock = Clock()
    clock.advance(1_764_806_400.125)
    loaded = configuration(directory, clock)
    for measure, settings in (("record", {}), ("redacted", {"hash_local_parts": True})):
        if measure in args.measures:
            figures = measure_record(
                loaded, directory, clock, args.requests, args.rounds, **settings
            )
            print(
                f"{measure:9s} record {figures['record']:5.2f} us/request, encode"
                f" {figures['encode']:5.2f}, write {figures['write']:5.2f};"
                f" with the defaults, all told {figures['total']:5.2f}"
            )
    for measure, request_log in (("protocol", False), ("logged", True)):
        if measure in args.measures:
            without, with_capture = measure_protocol(
                loaded, directory, clock, 3 * args.rounds, request_log
            )
            print(
                f"{measure:9s} {without:6.2f} us/request without capture, {with_capture:6.2f}"
                f" with: capture costs {with_capture - without:5.2f}"
            )


if __name__ == "__main__":
    main()
