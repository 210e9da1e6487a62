#!/usr/bin/env python3
"""
What a request line costs pfxpold, without sockets: keeping it
(C{RequestLines.record}, per request) and writing it (C{flush}, per batch)
to each destination: a C{request_log} file, twistd's log file through
pfxpold's observer, standard output, and the syslog observer (to a
datagram socket nobody reads). The best CPU time (of this thread) of several rounds, in
microseconds per line, which holds on a busy machine.

Run from the repository: C{PYTHONPATH=. python3 bench/requestlog_bench.py},
and with C{PYTHONPATH} set to another checkout to compare.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402
from twisted.logger import LogPublisher  # noqa: E402

from pfxpold import requestlog  # noqa: E402
from pfxpold.action import Action  # noqa: E402
from pfxpold.chain import Decision  # noqa: E402
from pfxpold.logger import SyslogMailObserver, TextLogObserver  # noqa: E402
from pfxpold.request import PolicyRequest  # noqa: E402

LINES = 100_000
ROUNDS = 5


class WallClock:
    """
    The reactor's clock as the daemon has it: C{seconds} is C{time.time}.
    """

    seconds = staticmethod(time.time)


class Discarded(requestlog.RequestLines):
    """
    Keeps lines and drops each batch: what recording alone costs.
    """

    def write(self, batch: requestlog.Batch) -> None:
        pass


def per_line(log: requestlog.RequestLines, requests: list[PolicyRequest]) -> float:
    """
    The best CPU time, in microseconds, of recording and flushing one line.
    """
    decision = Decision(Action.parse("DUNNO"), "senders")
    count = len(requests)
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.thread_time()
        record = log.record
        for number in range(LINES):
            record(requests[number % count], decision, 0.123, "peer")
        log.flush()
        best = min(best, time.thread_time() - started)
    return best / LINES * 1e6


def through_events(observer: Callable) -> requestlog.EventRequestLog:
    """
    An L{requestlog.EventRequestLog} whose events go to C{observer} alone.
    """
    requestlog._requests.observer = LogPublisher(observer)
    return requestlog.EventRequestLog(WallClock())


def main() -> None:
    requests = [PolicyRequest.adopt(dict(r)) for r in run.make_requests(5000)]
    directory = tempfile.mkdtemp(prefix="pfxpold-requestlog-bench-")
    file_log = requestlog.FileRequestLog(os.path.join(directory, "requests.log"), WallClock())
    file_log.output.open()
    twistd_file = open(os.path.join(directory, "twistd.log"), "a")
    stdout_file = open(os.path.join(directory, "stdout.txt"), "a")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink_path = os.path.join(directory, "syslog.sock")
    sink.bind(sink_path)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    syslog = SyslogMailObserver(address=sink_path)

    def drain() -> None:
        while True:
            sink.recv(65536)

    cases: list[tuple[str, Callable[[], requestlog.RequestLines]]] = [
        ("record only (batches dropped)", lambda: Discarded(WallClock())),
        ("request_log file", lambda: file_log),
        (
            "twistd's log file (pfxpold's observer)",
            lambda: through_events(TextLogObserver(twistd_file)),
        ),
        (
            "standard output (pfxpold's observer)",
            lambda: through_events(TextLogObserver(stdout_file)),
        ),
    ]
    for name, make in cases:
        print(f"{name:45} {per_line(make(), requests):6.2f} µs/line")
    # The socket queues a handful of datagrams (net.unix.max_dgram_qlen):
    # a thread reads them, and only this thread's CPU time is counted.
    threading.Thread(target=drain, daemon=True).start()
    print(
        f"{'syslog mail (pfxpold observer, a datagram each)':45} {per_line(through_events(syslog), requests):6.2f} µs/line"
    )
    file_log.output.close()
    for path in os.listdir(directory):
        os.unlink(os.path.join(directory, path))
    os.rmdir(directory)


if __name__ == "__main__":
    main()
