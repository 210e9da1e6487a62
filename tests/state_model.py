"""
Random operation sequences for comparing state stores: the in-memory store
is the model, and every other store must answer the same sequence
identically. Used by the unit tests (SQLite) and the integration tests
(a real Redis).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred

from pfxpold.state import Counter, Once, Triplet

#: Window length of the generated counters.
WINDOW = 600
#: Greylist timings of the generated attempts.
DELAY, RETRY_WINDOW, LIFETIME = 300.0, 3600.0, 7200.0


def counter(name: str, limit: int, now: float, slack: float, own_key: bool = False) -> Counter:
    """
    A fixed-window counter as the quota check makes them: the key names
    its window, whose end (plus C{slack}) is its expiry; it also reads the
    previous window, as a sliding window would.

    @param own_key: instead, one key for every window that reads only
        itself, so that a later window finds the row of an earlier one,
        expired or (with C{slack}) still live with an earlier expiry.
    """
    bucket = int(now // WINDOW)
    if own_key:
        key = f"{{model}}:{name}"
        return Counter(key, (key,), limit, (bucket + 1) * WINDOW + slack)
    key = f"{{model}}:{name}:{bucket}"
    return Counter(
        key, (key, f"{{model}}:{name}:{bucket - 1}"), limit, (bucket + 1) * WINDOW + slack
    )


def operations(seed: int, count: int, steps: tuple[float, ...]) -> Iterator[tuple[str, Any]]:
    """
    C{count} random operations on a few keys, so that they collide:
    C{("advance", seconds)}, C{("consume", ((name, limit), ...), amount)},
    C{("release", name, amount)}, C{("counted", name, limit, amount,
    mark)} and C{("uncount", name, amount, mark)} (a message counted once
    by its mark, and taken back by it), C{("greylist", triplet, client,
    whitelist_after)}, C{("expire",)}, and what pfxpold-admin does:
    C{("reset", name)}, C{("forget", triplet)}, C{("entries", sender)},
    C{("read", name)}.
    """
    rng = random.Random(seed)
    for _ in range(count):
        roll = rng.random()
        if roll < 0.15:
            yield ("advance", rng.choice(steps))
        elif roll < 0.6:
            names = rng.sample(["a", "b", "c"], rng.randint(1, 2))
            limits = tuple((name, rng.randint(0, 6)) for name in names)
            yield ("consume", limits, rng.randint(1, 3))
        elif roll < 0.7:
            yield ("release", rng.choice("abc"), rng.randint(1, 3))
        elif roll < 0.78:
            mark = f"m{rng.randint(1, 4)}"
            yield ("counted", rng.choice("abc"), rng.randint(0, 6), rng.randint(1, 3), mark)
        elif roll < 0.82:
            yield ("uncount", rng.choice("abc"), rng.randint(1, 3), f"m{rng.randint(1, 4)}")
        elif roll < 0.95:
            yield (
                "greylist",
                f"{{model}}:t{rng.randint(1, 3)}",
                f"{{model}}:c{rng.randint(1, 2)}",
                rng.choice([0, 2]),
            )
        elif roll < 0.96:
            yield ("reset", rng.choice("abc"))
        elif roll < 0.97:
            yield ("forget", f"{{model}}:t{rng.randint(1, 3)}")
        elif roll < 0.98:
            yield ("entries", rng.choice([None, "s1", "s2"]))
        elif roll < 0.99:
            yield ("read", rng.choice("abc"))
        else:
            yield ("expire",)


def apply(
    store: Any, operation: tuple[Any, ...], now: float, slack: float = 0.0, own_key: bool = False
) -> Deferred[Any]:
    """
    Run one (non-advance) operation on C{store}, its counters made by
    L{counter} with C{slack} and C{own_key}.

    @return: a Deferred that fires with a comparable result (L{None} for
        C{expire}, whose count differs between stores by design).
    """
    kind = operation[0]
    if kind == "consume":
        counters = [counter(name, limit, now, slack, own_key) for name, limit in operation[1]]
        d = store.consume(counters, operation[2], now)
        return d.addCallback(lambda result: (result.allowed, tuple(result.totals)))
    if kind == "release":
        return store.release([counter(operation[1], 0, now, slack, own_key)], operation[2], now)
    if kind == "counted":
        _, name, limit, amount, mark = operation
        once = Once(f"{{model}}:once:{mark}", now + WINDOW / 2 + slack)
        d = store.consume([counter(name, limit, now, slack, own_key)], amount, now, once)
        return d.addCallback(lambda result: (result.allowed, tuple(result.totals), result.repeated))
    if kind == "uncount":
        _, name, amount, mark = operation
        once = Once(f"{{model}}:once:{mark}", now + WINDOW / 2 + slack)
        return store.release([counter(name, 0, now, slack, own_key)], amount, now, once)
    if kind == "greylist":
        _, triplet, client, after = operation
        # The clear triplet of t1 and t2 share a sender, t3 has none kept.
        clear = None if triplet.endswith("t3") else Triplet("n", f"s{triplet[-1]}", "r")
        d = store.greylist(triplet, client, now, DELAY, RETRY_WINDOW, LIFETIME, after, clear)
        return d.addCallback(lambda state: (state.verdict, state.first_seen))
    # Removal counts are not compared (stores differ in when they drop an
    # expired entry, as for expire); their effect shows in later answers.
    if kind == "reset":
        keys = counter(operation[1], 0, now, slack, own_key).read_keys
        return store.reset(keys).addCallback(lambda count: None)
    if kind == "forget":
        return store.delete_greylist([operation[1]]).addCallback(lambda count: None)
    if kind == "entries":
        d = store.greylist_entries("{model}:", now, sender=operation[1])
        return d.addCallback(
            lambda entries: sorted((e.key, e.triplet, e.first_seen, e.passes) for e in entries)
        )
    if kind == "read":
        keys = counter(operation[1], 0, now, slack, own_key).read_keys
        d = store.counters(keys, now)
        # Redis reads expiry back through PTTL, in milliseconds: counts only.
        return d.addCallback(lambda found: {key: value.count for key, value in found.items()})
    if kind == "expire":
        return store.expire(now).addCallback(lambda count: None)
    raise ValueError(operation)
