"""
Microseconds per counted message of the quota check on an SQLite (or
memory) store, in-process, on a L{Clock}: the check, its decided() call,
and the turn's commit every C{--turn} messages, as the reactor would.

    python3 bench/quota_micro.py [--store sqlite|memory] [--count 50000] [--turn 64]
        [--chain] [--prefill 100000]

C{--chain} counts as the benchmark's C{chain} scenario does: recipients at
RCPT, keyed on 5,000 senders. C{--prefill} counts that many messages first,
untimed, so that the file holds the marks of a daemon that has been busy
for a while.

Prints the best and the median of C{--repeat} runs (CPU time, robust on a
shared machine); compare two commits in one session.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from pfxpold.action import Action  # noqa: E402
from pfxpold.checks.quota import QuotaCheck  # noqa: E402
from pfxpold.config import CheckOptions  # noqa: E402
from pfxpold.request import PolicyRequest  # noqa: E402
from pfxpold.testing import make_request  # noqa: E402

OK = Action("OK")


def run(
    store: str,
    count: int,
    turn: int,
    directory: str,
    limits: list,
    chain: bool = False,
    prefill: int = 0,
) -> float:
    clock = Clock()
    clock.advance(1_700_000_000)
    table = {"type": store}
    if store == "sqlite":
        table["path"] = os.path.join(directory, f"state-{time.monotonic_ns()}.sqlite3")
    settings: dict = {"key": ["sasl_username"], "limits": limits}
    if chain:
        settings.update(key=["sender"], unit="recipients", stage="RCPT")
    options = CheckOptions(
        settings,
        name="bench",
        reactor=clock,
        document={"stores": {"default": table}},
        shared={},
    )
    check = QuotaCheck(options)
    check.store.startService()
    rng = random.Random(6)

    def request(number: int) -> PolicyRequest:
        if chain:
            sender, recipient = rng.randrange(5000), rng.randrange(3000)
            return make_request(
                "rcpt",
                sender=f"user{sender}@s{sender % 1000}.example.com",
                recipient=f"rcpt{recipient}@d{recipient % 200}.example.org",
                # Postfix's pid.seconds.microseconds.sequence: a message
                # arriving every 20 us.
                instance=f"{rng.getrandbits(16):x}.{6500000 + number // 50000:x}"
                f".{number % 50000 * 20:x}.0",
            )
        return make_request("eod", sasl_username=f"user{number % 50}", instance=f"bench.{number}")

    def count_all(requests: list[PolicyRequest]) -> None:
        for position, request in enumerate(requests):
            action = check.check(request)
            assert action.verb == "DUNNO", action
            check.decided(request, OK)
            if position % turn == turn - 1:
                clock.advance(0)
        clock.advance(0)

    count_all([request(number) for number in range(prefill)])
    requests = [request(number) for number in range(prefill, prefill + count)]
    started = time.process_time()
    count_all(requests)
    elapsed = time.process_time() - started
    check.store.stopService()
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite", choices=["sqlite", "memory"])
    parser.add_argument("--count", type=int, default=50000)
    parser.add_argument("--turn", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sliding", action="store_true", help="add a 600 s sliding window")
    parser.add_argument(
        "--chain", action="store_true", help="recipients at RCPT per sender, as the chain scenario"
    )
    parser.add_argument("--prefill", type=int, default=0, help="messages counted first, untimed")
    arguments = parser.parse_args()
    limits = [{"period": "hour", "max": 10**9}]
    if arguments.sliding:
        limits.append({"period": "sliding", "seconds": 600, "max": 10**9, "precision": 60})
    with tempfile.TemporaryDirectory() as directory:
        figures = [
            run(
                arguments.store,
                arguments.count,
                arguments.turn,
                directory,
                limits,
                arguments.chain,
                arguments.prefill,
            )
            for _ in range(arguments.repeat)
        ]
    print(
        f"{arguments.store}{' +sliding' if arguments.sliding else ''}"
        f"{' chain' if arguments.chain else ''} turn {arguments.turn}:"
        f" best {min(figures):.2f}, median {statistics.median(figures):.2f} us CPU per counted"
        " message"
        f" (runs: {', '.join(f'{f:.2f}' for f in figures)})"
    )


if __name__ == "__main__":
    main()
