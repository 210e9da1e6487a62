"""
The Redis store on a three-master Redis Cluster, with real daemons: the
quota and greylist behaviour of test_state_stores, and a slot resharded
while traffic runs (ASK while its keys move, MOVED once it has moved),
the count exact throughout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from pfxpold.state.cluster import key_slot
from tests.integration.redis_groups import Cluster, counted, redis_cli, running_cluster
from tests.integration.support import running_daemon
from tests.integration.test_redis_sentinel import Traffic
from tests.integration.test_state_stores import (
    EOM,
    blast,
    greylist_config,
    poll,
    quota_config,
    unique,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Redis Cluster shared by the tests of this module."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


def cluster_store(cluster: Cluster) -> str:
    nodes = ", ".join(f'"{address}"' for address in cluster.addresses[:2])
    return f'[stores.main]\ntype = "redis"\ncluster_nodes = [{nodes}]\ntimeout = 2.0\n'


def test_concurrent_requests_never_pass_limit(cluster: Cluster, tmp_path: os.PathLike) -> None:
    """
    300 requests for one key over 10 connections, limit 100: exactly 100
    pass, on a cluster too.
    """
    with running_daemon(tmp_path, quota_config(cluster_store(cluster), 100)) as daemon:
        answers = blast(daemon.port, unique("cluster"), 10, 30)
    assert answers.count("OK") == 100, answers
    assert answers.count("REJECT 5.7.1 quota day of 100 reached") == 200


def test_two_daemons_many_users(cluster: Cluster, tmp_path: os.PathLike) -> None:
    """
    Two daemons, users whose keys fall on every master: each user's limit
    holds exactly.
    """
    config = quota_config(cluster_store(cluster), 40)
    users = [unique("spread") for _ in range(6)]
    owners = {cluster.slot_owner(key_slot(f"quota:{user}")) for user in users}
    assert len(owners) >= 2, owners
    with ExitStack() as stack:
        daemons = [stack.enter_context(running_daemon(tmp_path, config)) for _ in range(2)]
        with ThreadPoolExecutor(4) as pool:
            loads = {
                user: [pool.submit(blast, daemon.port, user, 2, 20) for daemon in daemons]
                for user in users
            }
            for user, load in loads.items():
                answers = [answer for part in load for answer in part.result()]
                assert answers.count("OK") == 40, (user, answers)


def test_same_message_through_two_daemons_counted_once(
    cluster: Cluster, tmp_path: os.PathLike
) -> None:
    """
    Two daemons on the cluster each asked about the same messages (the
    same C{instance}): each is counted once (its counted-once mark is in
    its counters' slot, written in the same script), so the 3 messages of
    a limit of 3 pass at both, a 4th is refused by either, and the
    counters' master holds 3.
    """
    config = quota_config(cluster_store(cluster), 3)
    user = unique("once")
    with ExitStack() as stack:
        first, second = (stack.enter_context(running_daemon(tmp_path, config)) for _ in range(2))
        for number in range(3):
            request = dict(EOM, sasl_username=user, instance=f"{user}.{number}")
            for daemon in (first, second, first):
                with daemon.client() as client:
                    assert client.ask(request) == "OK", (number, daemon)
        for daemon in (second, first):
            with daemon.client() as client:
                request = dict(EOM, sasl_username=user, instance=unique(user))
                assert client.ask(request) == "REJECT 5.7.1 quota day of 3 reached"
    assert counted(cluster.slot_owner(key_slot(f"quota:{user}")), user) == 3


def test_greylist_retry_on_another_daemon(cluster: Cluster, tmp_path: os.PathLike) -> None:
    """
    A triplet deferred by one daemon passes at the other after the delay.
    """
    config = greylist_config(cluster_store(cluster), 1.0)
    rcpt = dict(
        EOM,
        protocol_state="RCPT",
        recipient=f"{unique('rcpt')}@example.net",
        recipient_count="0",
        instance="g.1",
    )
    with ExitStack() as stack:
        first = stack.enter_context(running_daemon(tmp_path, config))
        second = stack.enter_context(running_daemon(tmp_path, config))
        with first.client() as client:
            assert client.ask(rcpt).startswith("DEFER_IF_PERMIT Greylisted")

        def passed() -> bool:
            with second.client() as client:
                return client.ask(rcpt).startswith("PREPEND X-Greylist:")

        assert poll(passed)
        with first.client() as client:
            assert client.ask(rcpt) == "OK"


def test_reshard_under_traffic(cluster: Cluster, tmp_path: os.PathLike) -> None:
    """
    The slot of a user's counters moves to another master while two daemons
    count for that user: commands follow ASK while the keys move and MOVED
    once the slot has, every answer is OK, and the count is exact.
    """
    user = unique("reshard")
    slot = key_slot(f"quota:{user}")
    config = quota_config(cluster_store(cluster), 1_000_000)
    ids = cluster.node_ids()
    with ExitStack() as stack:
        daemons = [stack.enter_context(running_daemon(tmp_path, config)) for _ in range(2)]
        with Traffic(daemons, user) as traffic:
            time.sleep(0.5)
            source = cluster.slot_owner(slot)
            target = next(s.port for s in cluster.servers if s.port != source)
            redis_cli(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[source])
            redis_cli(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target])
            time.sleep(0.3)
            # Every message leaves a counted-once mark in the slot too, so
            # move keys in batches until none is left, as redis-cli's
            # reshard does; new ones are made on the target (ASK) meanwhile.
            moved = 0
            for _ in range(1000):
                keys = redis_cli(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
                if not keys:
                    break
                redis_cli(
                    source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys
                )
                moved += len(keys)
            assert moved
            # The keys are on the target, the slot still on the source: ASK.
            time.sleep(0.5)
            for server in cluster.servers:
                redis_cli(server.port, "CLUSTER", "SETSLOT", str(slot), "NODE", ids[target])
            time.sleep(0.5)
        answers = traffic.snapshot()
    assert len(answers) > 100
    logs = "".join(daemon.log() for daemon in daemons)
    assert {answer for _, _, answer in answers} == {"OK"}, logs[-3000:]
    assert counted(target, user) == len(answers)
    assert redis_cli(source, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == "0"
    logs = "".join(daemon.log() for daemon in daemons)
    assert f"slot {slot} is migrating to 127.0.0.1:{target}" in logs
    assert f"slot {slot} moved to 127.0.0.1:{target}" in logs
