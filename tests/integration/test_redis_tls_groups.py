"""
The Redis store over TLS to a Sentinel group and to a Cluster whose every
server and sentinel speaks only TLS (no plain port; replication, the
sentinels' own links and the cluster bus over TLS too) and wants a client
certificate: pfxpold with C{tls = true} counts through the sentinels'
master and follows a failover, counts on every cluster node (learnt from
C{CLUSTER SLOTS}) and follows a C{MOVED}; trusting another CA, it answers
the check's C{on_error} and logs the problem once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Optional

import pytest

from pfxpold.state.cluster import key_slot
from tests.integration.certificates import make_certificates
from tests.integration.redis_groups import (
    MASTER_NAME,
    Cluster,
    SentinelGroup,
    counted,
    running_cluster,
    running_sentinel_group,
)
from tests.integration.redis_server import RedisTLS
from tests.integration.support import running_daemon
from tests.integration.test_state_stores import ask, poll, quota_config, unique

ON_ERROR = "451 4.3.0 quota store unavailable"
LIMIT = 3
REFUSED = f"REJECT 5.7.1 quota day of {LIMIT} reached"
#: The name on the Sentinel group's certificate. The sentinels give the
#: master's address as an IP, which the certificate does not carry: only
#: tls_server_name lets pfxpold verify the master (and the sentinels).
SENTINEL_SERVER_NAME = "redis.test"


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A TLS-only Sentinel group shared by the tests of this module."""
    directory = tmp_path_factory.mktemp("sentinel-tls")
    tls = RedisTLS.make(os.fspath(directory), SENTINEL_SERVER_NAME)
    with running_sentinel_group(directory, tls=tls) as group:
        yield group


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A TLS-only Cluster (its certificate names 127.0.0.1) for this module."""
    directory = tmp_path_factory.mktemp("cluster-tls")
    with running_cluster(directory, tls=RedisTLS.make(os.fspath(directory))) as running:
        yield running


def sentinel_store(group: SentinelGroup, ca_file: Optional[str] = None) -> str:
    assert group.tls is not None
    listed = ", ".join(f'"{address}"' for address in group.sentinel_addresses)
    return (
        f'[stores.main]\ntype = "redis"\nsentinels = [{listed}]\n'
        f'master_name = "{MASTER_NAME}"\ntimeout = 1.0\n' + group.tls.store_lines(ca_file)
    )


def cluster_store(cluster: Cluster, ca_file: Optional[str] = None) -> str:
    assert cluster.tls is not None
    # One node only: the others are learnt from CLUSTER SLOTS.
    return (
        f'[stores.main]\ntype = "redis"\ncluster_nodes = ["{cluster.addresses[0]}"]\n'
        "timeout = 1.0\n" + cluster.tls.store_lines(ca_file)
    )


def uses_master(log: str, port: int) -> bool:
    """
    Whether a daemon's log says it is connected to the master on C{port}:
    the sentinels named it, and a connection was confirmed (by C{ROLE})
    after that.
    """
    named = log.rfind(f"the sentinels name 127.0.0.1:{port} as the master")
    return (
        named >= 0
        and re.search(rf"master {MASTER_NAME}\): (re)?connected$", log[named:], re.M) is not None
    )


def test_sentinel_count_and_failover(sentinel_group: SentinelGroup, tmp_path: os.PathLike) -> None:
    """
    Through TLS to the sentinels and to the master they name (verified as
    C{tls_server_name}), a quota counts; after C{SENTINEL FAILOVER} the
    daemon hears of it on its TLS subscription to the sentinels and follows
    the new master, where the count goes on to the limit.
    """
    group = sentinel_group
    user = unique("tls-sentinel")
    old = group.master_port()
    with running_daemon(tmp_path, quota_config(sentinel_store(group), LIMIT)) as daemon:
        assert [ask(daemon, user) for _ in range(LIMIT - 1)] == ["OK"] * (LIMIT - 1)
        assert uses_master(daemon.log(), old)
        assert counted(old, user, tls=group.tls) == LIMIT - 1
        # The replica has both counts before the failover: none is in its
        # window.
        assert group.cli(old, "WAIT", "1", "5000") == "1"
        group.cli(group.sentinels[0].port, "SENTINEL", "FAILOVER", MASTER_NAME)
        assert poll(lambda: group.master_port() != old, 20), "no failover"
        new = group.master_port()
        assert poll(lambda: uses_master(daemon.log(), new), 20), daemon.log()
        assert [ask(daemon, user) for _ in range(2)] == ["OK", REFUSED]
        log = daemon.log()
    assert counted(new, user, tls=group.tls) == LIMIT
    # Heard on a subscription to a sentinel, over TLS too.
    assert f"the sentinels switched the master to 127.0.0.1:{new}" in log, log
    group.wait_healthy()


def test_cluster_count_on_every_node_and_moved(cluster: Cluster, tmp_path: os.PathLike) -> None:
    """
    Through TLS to a cluster named by one node, quotas whose keys live on
    each of the three masters count to their limit (the other nodes were
    learnt from C{CLUSTER SLOTS}, over TLS too); once a user's slot has
    moved to another master, the daemon follows C{MOVED} there and the
    count goes on.
    """
    users: dict[int, str] = {}
    for _ in range(1000):
        user = unique("tls-cluster")
        users.setdefault(cluster.slot_owner(key_slot(f"quota:{user}")), user)
        if len(users) == len(cluster.servers):
            break
    assert len(users) == 3, users
    with running_daemon(tmp_path, quota_config(cluster_store(cluster), LIMIT)) as daemon:
        for user in users.values():
            assert [ask(daemon, user) for _ in range(LIMIT - 1)] == ["OK"] * (LIMIT - 1), user
        for port, user in users.items():
            assert counted(port, user, tls=cluster.tls) == LIMIT - 1, (port, user)
        source, moving = next(iter(users.items()))
        slot = key_slot(f"quota:{moving}")
        target = next(port for port in users if port != source)
        assert cluster.migrate_slot(slot, target)
        assert [ask(daemon, moving) for _ in range(2)] == ["OK", REFUSED]
        log = daemon.log()
    assert counted(target, moving, tls=cluster.tls) == LIMIT
    assert f"slot {slot} moved to 127.0.0.1:{target}" in log, log


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CA that signed none of the servers' certificates."""
    ca, _ = make_certificates(tmp_path_factory.mktemp("other-ca"))
    return ca


@pytest.mark.parametrize("topology", ["sentinel_group", "cluster"])
def test_wrong_ca(
    topology: str, other_ca: str, request: pytest.FixtureRequest, tmp_path: os.PathLike
) -> None:
    """
    Trusting a CA that signed none of the servers' certificates, the
    handshakes fail: the check answers its on_error (not a hang: the
    request is answered), and the failure is logged once, saying that the
    certificate could not be verified (on a cluster, the slot map that no
    node could give is logged once too, not at every failed request).
    """
    group = request.getfixturevalue(topology)
    store = (
        sentinel_store(group, other_ca)
        if topology == "sentinel_group"
        else cluster_store(group, other_ca)
    )
    with running_daemon(tmp_path, quota_config(store, LIMIT)) as daemon:
        assert poll(lambda: "certificate verify failed" in daemon.log(), 10), daemon.log()
        for _ in range(3):
            assert ask(daemon, unique("wrong-ca")) == ON_ERROR
        log = daemon.log()
    failures = [line for line in log.splitlines() if "certificate verify failed" in line]
    assert len(failures) == 1, log
    assert log.count("no node gave the slot map") <= 1, log
