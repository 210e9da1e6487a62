"""
The shipped Redis examples work as pasted: examples/quota-redis-sentinel.toml
and examples/quota-redis-cluster.toml, with only their addresses changed to
a real loopback Sentinel group and Cluster, run by two twistd daemons (two
MX hosts): the quota they share holds its limit with the example's
over-limit action, and the greylist they share defers a new triplet.
"""

from __future__ import annotations

import os
import re
from contextlib import ExitStack

from tests.integration.redis_groups import running_cluster, running_sentinel_group
from tests.integration.support import REPOSITORY, running_daemon
from tests.integration.test_state_stores import EOM, unique

EXAMPLES = os.path.join(REPOSITORY, "examples")
#: The over-limit action both examples give their quota (hour: 200
#: recipients).
HOLD = "HOLD over the hour quota of 200 recipients"


def example_at(name: str, key: str, addresses: list[str]) -> str:
    """
    The text of C{examples/NAME} with the addresses of its C{key} line
    replaced by C{addresses}, and nothing else changed.
    """
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
        text = f.read()
    listed = ", ".join(f'"{address}"' for address in addresses)
    changed, count = re.subn(rf"(?m)^{key} = \[[^\]\n]*\]$", f"{key} = [{listed}]", text)
    assert count == 1, f"{name} has no single {key} line"
    before, after = text.splitlines(), changed.splitlines()
    assert [line for line, new in zip(before, after, strict=True) if line != new] == [
        line for line in before if line.startswith(f"{key} = ")
    ]
    return changed


def shows_example_at_work(tmp_path: os.PathLike, config: str) -> None:
    """
    Two daemons with C{config}: 100 recipients pass at each, the next 100
    get the example's HOLD from either (the hour's 200 are used up), and a
    new triplet is greylisted at one and still at the other.
    """
    user = unique("example")
    with ExitStack() as stack:
        first, second = (stack.enter_context(running_daemon(tmp_path, config)) for _ in range(2))

        def message(daemon, number: int) -> str:
            with daemon.client() as client:
                request = dict(
                    EOM, sasl_username=user, recipient_count="100", instance=f"{user}.{number}"
                )
                return str(client.ask(request))

        assert message(first, 1) == "DUNNO"
        assert message(second, 2) == "DUNNO"
        assert message(first, 3) == HOLD
        assert message(second, 4) == HOLD
        rcpt = dict(
            EOM,
            protocol_state="RCPT",
            recipient=f"{unique('rcpt')}@example.net",
            recipient_count="0",
            instance=f"{user}.rcpt",
        )
        for daemon in (first, second):
            with daemon.client() as client:
                answer = str(client.ask(rcpt))
            assert answer.startswith("DEFER_IF_PERMIT Greylisted, please try again in "), answer
        for daemon in (first, second):
            log = daemon.log()
            assert "Traceback" not in log, log[-3000:]


def test_sentinel_example(tmp_path: os.PathLike) -> None:
    """
    examples/quota-redis-sentinel.toml with the sentinels' addresses of a
    real master, replica and three sentinels: the master is found, the
    quota holds across two daemons with the example's HOLD, and the
    greylist is shared.
    """
    with running_sentinel_group(tmp_path) as group:
        config = example_at("quota-redis-sentinel.toml", "sentinels", group.sentinel_addresses)
        shows_example_at_work(tmp_path, config)
        master = group.master_port()
        keys = group.cli(master, "--scan", "--pattern", "pfxpold:*")
        assert "pfxpold:quota:" in keys and "pfxpold:greylist:" in keys, keys


def test_cluster_example(tmp_path: os.PathLike) -> None:
    """
    examples/quota-redis-cluster.toml with the nodes' addresses of a real
    three-master Cluster: the quota holds across two daemons with the
    example's HOLD, and the greylist is shared.
    """
    with running_cluster(tmp_path) as cluster:
        config = example_at("quota-redis-cluster.toml", "cluster_nodes", cluster.addresses)
        shows_example_at_work(tmp_path, config)
