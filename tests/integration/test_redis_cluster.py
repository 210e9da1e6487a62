"""
The Redis store on a three-master Redis Cluster, with real daemons: the
quota and greylist behaviour of test_state_stores, and a slot resharded
while traffic runs (ASK while its keys move, MOVED once it has moved),
the count exact throughout, and greylisting while its entries' slot is
resharded, nothing lost.
"""

from __future__ import annotations

import os
import time
from collections import deque
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
    with ExitStack() as stack:
        daemons = [stack.enter_context(running_daemon(tmp_path, config)) for _ in range(2)]
        with Traffic(daemons, user) as traffic:
            time.sleep(0.5)
            source = cluster.slot_owner(slot)
            target = next(s.port for s in cluster.servers if s.port != source)
            # Every message leaves a counted-once mark in the slot too, so
            # there are keys to move while new ones are made on the target.
            pauses = {"migrating": 0.3, "keys moved": 0.5, "moved": 0.5}
            moved = cluster.migrate_slot(slot, target, lambda phase: time.sleep(pauses[phase]))
            assert moved
        answers = traffic.snapshot()
    assert len(answers) > 100
    logs = "".join(daemon.log() for daemon in daemons)
    assert {answer for _, _, answer in answers} == {"OK"}, logs[-3000:]
    assert counted(target, user) == len(answers)
    assert redis_cli(source, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == "0"
    logs = "".join(daemon.log() for daemon in daemons)
    assert f"slot {slot} is migrating to 127.0.0.1:{target}" in logs
    assert f"slot {slot} moved to 127.0.0.1:{target}" in logs


GREYLIST_ON_ERROR = "451 4.3.0 greylist store unavailable"
#: The greylist's delay, and how long after a first attempt its retry
#: comes (the delay and a margin: a retry is never early).
GREYLIST_DELAY = 1.0
RETRY_AFTER = 1.5


def greylist_cluster_config(cluster: Cluster) -> str:
    # Auto-whitelisting that never comes: every pass still writes the
    # client network's counter, so each script has two keys in the slot
    # (TRYAGAIN while one has moved and the other not).
    return f"""
[server]
default_action = "OK"
log_requests = false

{cluster_store(cluster)}
[[check]]
name = "greylist"
type = "greylist"
store = "main"
delay = {GREYLIST_DELAY}
auto_whitelist_after = 1000000
header = true
on_error = "{GREYLIST_ON_ERROR}"
"""


class GreylistTraffic(Traffic):
    """
    Steady greylisting from one client network: a thread per daemon asks
    about new triplets there and retries each, once its delay has passed,
    at the other daemon.

    @ivar answers: C{(kind, recipient, answer)}, C{kind} being C{"first"}
        or C{"retry"}.
    """

    def __init__(self, daemons: list, client_address: str) -> None:
        super().__init__(daemons, unique("grey"))
        self.daemons = daemons
        self.client_address = client_address
        self.left: list[tuple[float, dict[str, str]]] = []

    def _request(self, number: int, serial: int) -> dict[str, str]:
        return dict(
            EOM,
            protocol_state="RCPT",
            client_address=self.client_address,
            recipient=f"{self.user}-{number}-{serial}@example.net",
            recipient_count="0",
            instance=f"{self.user}.{number}.{serial}",
        )

    def _record(self, kind: str, request: dict[str, str], answer: object) -> None:
        with self._lock:
            self.answers.append((kind, request["recipient"], str(answer)))

    def _run(self, daemon, number: int) -> None:
        retry_at = self.daemons[1 - number]
        waiting: deque[tuple[float, dict[str, str]]] = deque()
        with daemon.client() as first, retry_at.client() as retry:
            serial = 0
            while not self._stop.is_set():
                serial += 1
                request = self._request(number, serial)
                self._record("first", request, first.ask(request))
                waiting.append((time.monotonic(), request))
                while waiting and time.monotonic() - waiting[0][0] >= RETRY_AFTER:
                    _, old = waiting.popleft()
                    self._record("retry", old, retry.ask(old))
                time.sleep(0.005)
        with self._lock:
            self.left.extend(waiting)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def passed(self) -> int:
        with self._lock:
            return sum(kind == "retry" for kind, _, _ in self.answers)

    def retry_the_rest(self) -> None:
        """
        Once the traffic stopped: retry every triplet not retried yet, at
        the first daemon, when its delay has passed.
        """
        for asked, request in sorted(self.left, key=lambda item: item[0]):
            # Waiting out the greylist's delay, not timing anything.
            time.sleep(max(0.0, asked + RETRY_AFTER - time.monotonic()))
            with self.daemons[0].client() as client:
                self._record("retry", request, client.ask(request))


@pytest.mark.parametrize("pace", ["reshard", "held"])
def test_greylist_reshard_under_traffic(pace: str, cluster: Cluster, tmp_path: os.PathLike) -> None:
    """
    The slot of a client network's greylist entries moves to another
    master while two daemons greylist new triplets from it and pass their
    retries, through TRYAGAIN and ASK while the keys move and MOVED once
    the slot has. No entry is lost: every triplet greylisted passes its
    retry after the delay.

    At C{redis-cli --cluster reshard}'s pace (C{"reshard"}) nothing is
    answered on_error. With the slot C{"held"} after its keys moved and
    before it is handed over (longer than the store's timeout), a new
    triplet cannot be written anywhere meanwhile (TRYAGAIN: the network's
    counter has moved, the triplet's key is not there yet), so first
    attempts are answered on_error after the timeout, as the README says;
    retries of greylisted triplets still pass, and a triplet answered
    on_error is new at its retry (nothing half-written).
    """
    network = "198.51.100.0/24"
    slot = key_slot(f"greylist:{network}")
    config = greylist_cluster_config(cluster)
    with ExitStack() as stack:
        daemons = [stack.enter_context(running_daemon(tmp_path, config)) for _ in range(2)]

        def logged(text: str) -> bool:
            return any(text in daemon.log() for daemon in daemons)

        with GreylistTraffic(daemons, "198.51.100.7") as traffic:
            # Entries on the source, some of them passed already.
            assert poll(lambda: traffic.passed() >= 20, 30)
            source = cluster.slot_owner(slot)
            assert int(redis_cli(source, "CLUSTER", "COUNTKEYSINSLOT", str(slot))) > 20
            target = next(s.port for s in cluster.servers if s.port != source)

            def errors() -> int:
                return sum(answer == GREYLIST_ON_ERROR for _, _, answer in traffic.snapshot())

            def meet(phase: str) -> None:
                if phase == "moved":
                    seen = traffic.count()
                    assert poll(lambda: logged(f"slot {slot} moved to 127.0.0.1:{target}"), 30)
                    assert poll(lambda: traffic.count() >= seen + 20, 30)
                elif phase == "keys moved" and pace == "held":
                    assert poll(lambda: errors() >= 2, 30)
                else:
                    # Traffic meets the migration (TRYAGAIN retried every
                    # 50 ms meanwhile): a pause well within the store's
                    # timeout.
                    time.sleep(0.3)

            assert cluster.migrate_slot(slot, target, meet) > 20
        traffic.retry_the_rest()
        logs = "".join(daemon.log() for daemon in daemons)
    assert f"slot {slot} is migrating to 127.0.0.1:{target}" in logs
    answers = traffic.snapshot()
    firsts = {recipient: answer for kind, recipient, answer in answers if kind == "first"}
    retries = {recipient: answer for kind, recipient, answer in answers if kind == "retry"}
    assert len(firsts) > 100
    assert sorted(recipient for kind, recipient, _ in answers if kind == "retry") == sorted(firsts)
    failed = {recipient for recipient, answer in firsts.items() if answer == GREYLIST_ON_ERROR}
    wrong = [
        (recipient, answer, retries[recipient])
        for recipient, answer in firsts.items()
        if recipient not in failed
        and not (
            answer.startswith("DEFER_IF_PERMIT Greylisted")
            and retries[recipient].startswith("PREPEND X-Greylist: delayed ")
        )
    ] + [
        (recipient, GREYLIST_ON_ERROR, retries[recipient])
        for recipient in failed
        if not retries[recipient].startswith("DEFER_IF_PERMIT Greylisted")
    ]
    assert not wrong, (wrong[:10], logs[-3000:])
    if pace == "reshard":
        assert not failed, logs[-3000:]
    else:
        assert failed
        assert "TRYAGAIN" in logs
    assert redis_cli(source, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == "0"
    assert int(redis_cli(target, "CLUSTER", "COUNTKEYSINSLOT", str(slot))) > 20
