"""
Microseconds per request of the C{rules} check of the C{rules-1000}
benchmark scenario (bench/rules_bench.py), in-process: the same 1,000
rules and the same request mix as bench/run.py, every answer checked
against the plain first-match scan.

    python3 bench/rules_micro.py [--count 20000] [--repeat 7]

Prints the best of C{--repeat} rounds (CPU time) of the whole check, and of the
index lookup alone; compare two commits in one session.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import rules_bench  # noqa: E402
import run as bench_run  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from pfxpold.config import load_configuration  # noqa: E402
from pfxpold.request import PolicyRequest  # noqa: E402
from pfxpold.rules.conditions import Facts  # noqa: E402


def load(directory: str):  # type: ignore[no-untyped-def]
    population = bench_run.Population()
    rules = rules_bench.build_rules(
        population.senders, population.sender_domains, population.clients, population.recipients
    )
    path = os.path.join(directory, "pfxpold.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write('[server]\ndefault_action = "DUNNO"\n')
    rules_bench.write_rules(path, rules)
    check = load_configuration(path, Clock()).chain.entries[-1].check
    return check, rules_bench.expectation(rules)


def parse(text: bytes) -> PolicyRequest:
    """
    A request parsed as the protocol parses it: new strings, whose hashes
    are not yet known, hot in the CPU's caches, as in the daemon.
    """
    return PolicyRequest.adopt(dict(line.split("=", 1) for line in text.decode().split("\n")))


def _round(function, texts: list[bytes]) -> float:  # type: ignore[no-untyped-def]
    started = time.process_time()
    for text in texts:
        function(parse(text))
    return time.process_time() - started


def timed(function, texts: list[bytes], repeat: int) -> float:  # type: ignore[no-untyped-def]
    """
    CPU microseconds per request (the machine is shared) of C{function},
    less the parsing: the best of C{repeat} rounds of each.
    """
    parsing = min(_round(lambda request: None, texts) for _ in range(repeat))
    both = min(_round(function, texts) for _ in range(repeat))
    return (both - parsing) / len(texts) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        check, expect = load(directory)
    mix = bench_run.make_requests(arguments.count)
    for attributes in mix:
        # Each request is a new message: the stamp the load generator
        # replaces only makes instances unique.
        attributes["instance"] = attributes["instance"].replace(bench_run.STAMP, "0")
    texts = [
        "\n".join(f"{name}={value}" for name, value in attributes.items()).encode()
        for attributes in mix
    ]
    requests = [parse(text) for text in texts]
    wrong = 0
    answered = 0
    for attributes, request in zip(mix, requests, strict=True):
        answer = str(check.check(request))
        if answer != "DUNNO":
            answered += 1
        if [answer] != expect(attributes):
            wrong += 1
    main_set = check.program.main
    candidates = getattr(main_set, "candidates_of", None)
    if candidates is None:
        def candidates(request: PolicyRequest) -> int:
            return main_set.candidates(Facts(request))  # type: ignore[no-any-return]
    whole = timed(check.check, texts, arguments.repeat)
    index = timed(candidates, texts, arguments.repeat)
    print(
        f"rules-1000 check: {whole:.3f} us/request; index lookup: {index:.3f} us/request;"
        f" {answered} of {len(requests)} answered by a rule; {wrong} wrong"
    )
    if wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
