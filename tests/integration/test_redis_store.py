"""
The Redis store in-process against a real redis-server: its Lua scripts
answer random operation sequences exactly as the in-memory model does, and
hundreds of concurrent operations on one key never pass its limit, and the
operations pfxpold-admin uses work on it.
"""

from __future__ import annotations

import os
import time

import pytest
import pytest_twisted
from twisted.internet import defer, task

from pfxpold.config import CheckOptions
from pfxpold.state import Counter, Triplet, WhitelistEntry
from pfxpold.state.memory import MemoryStore
from pfxpold.state.redis import RedisStore
from tests.integration.redis_server import running_redis
from tests.state_model import apply, operations


@pytest.fixture
def redis_server(tmp_path: os.PathLike):
    """A private redis-server for one test."""
    with running_redis(tmp_path) as server:
        yield server


async def started_store(reactor, endpoint: str, prefix: str) -> RedisStore:
    store = RedisStore(
        CheckOptions({"endpoint": endpoint, "prefix": prefix}, name="stores.test", reactor=reactor)
    )
    store.startService()
    deadline = time.monotonic() + 10
    while not store.client.connected:
        assert time.monotonic() < deadline, "no connection to Redis"
        await task.deferLater(reactor, 0.02, lambda: None)
    return store


@pytest_twisted.ensureDeferred
async def test_matches_model(redis_server) -> None:
    """
    50 random sequences of 40 operations on colliding keys: the Redis
    store's answers equal the in-memory store's. (Redis expires keys by its
    own clock, so the simulated clock stays within the keys' lifetimes.)
    """
    from twisted.internet import reactor

    for seed in range(50):
        clock = task.Clock()
        clock.advance(int(time.time()))
        start = clock.seconds()
        memory = MemoryStore(CheckOptions({}, name="m", reactor=clock))
        redis = await started_store(reactor, redis_server.endpoint, f"seed{seed}:")
        try:
            for number, operation in enumerate(operations(seed, 40, (1.0, 299.0, 301.0))):
                if operation[0] == "advance":
                    if clock.seconds() + operation[1] < start + 3000:
                        clock.advance(operation[1])
                    continue
                now = clock.seconds()
                expected = await apply(memory, operation, now, slack=86400)
                actual = await apply(redis, operation, now, slack=86400)
                assert actual == expected, (seed, number, operation)
        finally:
            await redis.stopService()


@pytest_twisted.ensureDeferred
async def test_concurrent_consume_exact(redis_server) -> None:
    """
    500 concurrent consume calls (pipelined on one connection) against a
    limit of 137 on two windows at once: exactly 137 are allowed, and the
    totals end at 137.
    """
    from twisted.internet import reactor

    store = await started_store(reactor, redis_server.endpoint, "concurrent:")
    try:
        now = time.time()
        counters = [
            Counter("{k}:hour", ("{k}:hour",), 137, now + 3600),
            Counter("{k}:day", ("{k}:day",), 1000, now + 86400),
        ]
        results = await defer.gatherResults([store.consume(counters, 1, now) for _ in range(500)])
        assert sum(result.allowed for result in results) == 137
        assert max(result.totals for result in results) == (137, 137)
        final = await store.consume(counters, 0, now)
        assert final.totals == (137, 137)
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_admin_operations(redis_server) -> None:
    """
    The operations pfxpold-admin uses, on real Redis: counters read with
    their expiry, reset by key and by prefix (taken literally, glob
    characters too), greylist entries listed with their clear triplet
    (filtered, and narrowed by key prefix), deleted, and the run-time
    whitelist added, listed and removed. Keys of another prefix (another
    pfxpold sharing the Redis) are never touched.
    """
    from twisted.internet import reactor

    store = await started_store(reactor, redis_server.endpoint, "admin:")
    other = await started_store(reactor, redis_server.endpoint, "other:")
    try:
        now = time.time()

        def counter(key: str) -> Counter:
            return Counter(key, (key,), 10, now + 3600)

        for key in ("q:{x:a}:h", "q:{x:b}:h", "q:{y:a}:h", "q:{x*:a}:h"):
            assert (await store.consume([counter(key)], 2, now)).allowed
        await other.consume([counter("q:{x:a}:h")], 5, now)
        found = await store.counters(["q:{x:a}:h", "q:{nothing}"], now)
        assert list(found) == ["q:{x:a}:h"]
        assert found["q:{x:a}:h"].count == 2
        assert now + 3590 < found["q:{x:a}:h"].expires_at <= now + 3601
        assert await store.reset(["q:{x:b}:h", "q:{nothing}"]) == 1
        assert await store.reset_prefix("q:{x") == 2
        left = await store.counters(["q:{x:a}:h", "q:{y:a}:h", "q:{x*:a}:h"], now)
        assert list(left) == ["q:{y:a}:h"]
        assert (await other.counters(["q:{x:a}:h"], now))["q:{x:a}:h"].count == 5

        one = Triplet("192.0.2.0/24", "a@example.com", "x@example.net")
        two = Triplet("192.0.2.0/24", "", "y@example.net")
        three = Triplet("198.51.100.0/24", "a@example.com", "y@example.net")
        for key, clear in (
            ("g:{n1}:t:1", one),
            ("g:{n1}:t:2", two),
            ("g:{n2}:t:3", three),
            ("g:{n1}:t:4", None),
        ):
            state = await store.greylist(key, "g:{n}:client", now, 300, 3600, 86400, 0, clear)
            assert state.verdict == "new"
        await store.greylist("g:{n1}:t:1", "g:{n}:client", now + 301, 300, 3600, 86400, 0, one)
        entries = await store.greylist_entries("g:", now)
        assert sorted(entry.key for entry in entries) == [
            "g:{n1}:t:1",
            "g:{n1}:t:2",
            "g:{n1}:t:4",
            "g:{n2}:t:3",
        ]
        first = next(entry for entry in entries if entry.key == "g:{n1}:t:1")
        assert (first.triplet, first.first_seen, first.passes) == (one, now, 1)
        assert now + 86600 < first.expires_at <= now + 86702
        by_client = await store.greylist_entries("g:{n1}", now, network="192.0.2.0/24")
        assert sorted(entry.key for entry in by_client) == ["g:{n1}:t:1", "g:{n1}:t:2"]
        by_sender = await store.greylist_entries("g:", now, sender="a@example.com")
        assert sorted(entry.key for entry in by_sender) == ["g:{n1}:t:1", "g:{n2}:t:3"]
        null_sender = await store.greylist_entries("g:", now, sender="")
        assert [entry.triplet for entry in null_sender] == [two]
        assert await store.delete_greylist(["g:{n1}:t:1", "g:{nothing}"]) == 1
        again = await store.greylist("g:{n1}:t:1", "g:{n}:client", now + 302, 300, 3600, 86400, 0)
        assert again.verdict == "new"

        entry = WhitelistEntry("client", "192.0.2.0/24", now, "ticket 7: with spaces")
        await store.whitelist_add(entry)
        await store.whitelist_add(WhitelistEntry("sender", "example.org", now, ""))
        assert await store.whitelist_list() == [
            entry,
            WhitelistEntry("sender", "example.org", now, ""),
        ]
        assert await other.whitelist_list() == []
        assert await store.whitelist_remove("sender", "example.org") is True
        assert await store.whitelist_remove("sender", "example.org") is False
        assert await store.whitelist_list() == [entry]
    finally:
        await store.stopService()
        await other.stopService()
