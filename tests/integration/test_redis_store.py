"""
The Redis store in-process against a real redis-server: its Lua scripts
answer random operation sequences exactly as the in-memory model does, and
hundreds of concurrent operations on one key never pass its limit.
"""

from __future__ import annotations

import os
import time

import pytest
import pytest_twisted
from twisted.internet import defer, task

from pfxpold.config import CheckOptions
from pfxpold.state import Counter
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
