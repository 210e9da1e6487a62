"""
Microseconds per counted message of the quota check on an SQLite (or
memory) store, in-process, on a L{Clock}: the check, its decided() call,
and the turn's commit every C{--turn} messages, as the reactor would.

    python3 bench/quota_micro.py [--store sqlite|memory] [--count 50000] [--turn 64]

Prints the median of C{--repeat} runs; compare two commits in one session.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from pfxpold.action import Action  # noqa: E402
from pfxpold.checks.quota import QuotaCheck  # noqa: E402
from pfxpold.config import CheckOptions  # noqa: E402
from pfxpold.testing import make_request  # noqa: E402

OK = Action("OK")


def run(store: str, count: int, turn: int, directory: str, limits: list) -> float:
    clock = Clock()
    clock.advance(1_700_000_000)
    table = {"type": store}
    if store == "sqlite":
        table["path"] = os.path.join(directory, f"state-{time.monotonic_ns()}.sqlite3")
    options = CheckOptions(
        {"key": ["sasl_username"], "limits": limits},
        name="bench",
        reactor=clock,
        document={"stores": {"default": table}},
        shared={},
    )
    check = QuotaCheck(options)
    check.store.startService()
    requests = [
        make_request("eod", sasl_username=f"user{i % 50}", instance=f"bench.{i}")
        for i in range(count)
    ]
    started = time.perf_counter()
    for position, request in enumerate(requests):
        action = check.check(request)
        assert action.verb == "DUNNO", action
        check.decided(request, OK)
        if position % turn == turn - 1:
            clock.advance(0)
    clock.advance(0)
    elapsed = time.perf_counter() - started
    check.store.stopService()
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite", choices=["sqlite", "memory"])
    parser.add_argument("--count", type=int, default=50000)
    parser.add_argument("--turn", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sliding", action="store_true", help="add a 600 s sliding window")
    arguments = parser.parse_args()
    limits = [{"period": "hour", "max": 10**9}]
    if arguments.sliding:
        limits.append({"period": "sliding", "seconds": 600, "max": 10**9, "precision": 60})
    with tempfile.TemporaryDirectory() as directory:
        figures = [
            run(arguments.store, arguments.count, arguments.turn, directory, limits)
            for _ in range(arguments.repeat)
        ]
    print(
        f"{arguments.store}{' +sliding' if arguments.sliding else ''}:"
        f" {statistics.median(figures):.2f} us per counted message"
        f" (runs: {', '.join(f'{f:.2f}' for f in figures)})"
    )


if __name__ == "__main__":
    main()
