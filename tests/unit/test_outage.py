"""
Tests for degraded mode (pfxpold.state.outage): quota and greylist checks
whose shared store is down, on a Clock, with a store that fails as told.
"""

from __future__ import annotations

import copy
import datetime
import os
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.action import Action
from pfxpold.checks.greylist import GreylistCheck
from pfxpold.checks.quota import QuotaCheck
from pfxpold.config import (
    CheckOptions,
    ConfigError,
    load_configuration,
    load_document,
    read_document,
)
from pfxpold.explain import explain, private_stores
from pfxpold.reload import Reloader
from pfxpold.service import PolicyService
from pfxpold.state import Counter, Once, StoreError
from pfxpold.state.memory import MemoryStore
from pfxpold.state.outage import Outage, OutageSettings, Pending, read_outage_settings
from pfxpold.testing import CheckTestCase, make_request, run_check
from tests.unit.test_metrics import Served, make_chain, samples, value
from tests.unit.test_reload import document
from tests.unit.test_replay import GREYLIST_CONFIG, Harness

# Tue 2027-01-05 10:00:00 UTC
START = datetime.datetime(2027, 1, 5, 10, 0, tzinfo=datetime.UTC).timestamp()


class Flaky:
    """
    A shared store (a L{MemoryStore}) that is up, or fails as told.

    @ivar mode: C{"up"}; C{"down"} (fails at once); C{"slow"} (fails after
        2 s, as a Redis command timing out); C{"lost"} (does the work, then
        fails: the reply was lost); C{"hang"} (does the work and never
        answers).
    @ivar budget: when set, operations left before the store goes down
        (a failure half-way through a reconciliation).
    @ivar calls: the operations asked for, by name.
    """

    name = "stores.default"

    def __init__(self, store: MemoryStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.mode = "up"
        self.budget: Any = None
        self.calls: list[str] = []
        self.read_keys: list[str] = []

    def _run(self, operation: str, *arguments: Any) -> Deferred[Any]:
        self.calls.append(operation)
        if self.budget is not None:
            if self.budget <= 0:
                return fail(StoreError("connection lost half-way"))
            self.budget -= 1
        if self.mode == "down":
            return fail(StoreError("connection refused\nINJECTED line"))
        if self.mode == "slow":
            d: Deferred[Any] = Deferred()
            self.clock.callLater(2.0, d.errback, StoreError("timed out"))
            return d
        result = getattr(self.store, operation)(*arguments)
        if self.mode == "lost":
            return fail(StoreError("reply lost"))
        if self.mode == "hang":
            return Deferred()
        return result  # type: ignore[no-any-return]

    def consume(self, *arguments: Any) -> Deferred[Any]:
        return self._run("consume", *arguments)

    def release(self, *arguments: Any) -> Deferred[Any]:
        return self._run("release", *arguments)

    def greylist(self, *arguments: Any) -> Deferred[Any]:
        return self._run("greylist", *arguments)

    def counters(self, keys: Any, now: float) -> Deferred[Any]:
        self.read_keys.extend(keys)
        return self._run("counters", keys, now)

    def whitelist_list(self) -> Deferred[Any]:
        return self._run("whitelist_list")


def options(clock: Clock, name: str, **table: Any) -> CheckOptions:
    return CheckOptions(
        table,
        name=name,
        reactor=clock,
        document={"stores": {"default": {"type": "memory"}}},
        shared={},
    )


class QuotaOutageTests(CheckTestCase):
    """
    A quota check with C{on_store_down = "local"}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.messages = 0

    def make(self, **table: Any) -> QuotaCheck:
        table.setdefault("key", ["sasl_username"])
        table.setdefault("limits", [{"period": "hour", "max": 4}])
        table.setdefault("on_store_down", "local")
        if table["on_store_down"] == "local":
            table.setdefault("probe_interval", 5)
        check_options = options(self.clock, "quota", **table)
        check = QuotaCheck(check_options)
        self.assertEqual(check_options.unused(), [])
        self.shared: MemoryStore = check.store  # type: ignore[assignment]
        self.flaky = Flaky(self.shared, self.clock)
        check.store = self.flaky  # type: ignore[assignment]
        check.startService()
        self.addCleanup(check.stopService)
        return check

    def message(self, **changes: str) -> Any:
        self.messages += 1
        changes.setdefault("sasl_username", "alice")
        changes.setdefault("instance", f"message.{self.messages}")
        return make_request("eod", **changes)

    def send(self, check: QuotaCheck, request: Any = None, final: Any = None) -> str:
        """
        Run the check on C{request} (a new message) as the chain does, tell
        it the final answer (its own unless C{final}), return its verb.
        """
        request = request if request is not None else self.message()
        action = self.successResultOf(run_check(check, request))
        decided = action if final is None else Action.parse(final)
        check.decided(request, decided)
        return str(action.verb)

    def shared_count(self, check: QuotaCheck, identity: str = "alice", at: Any = None) -> int:
        now = START if at is None else at
        [counter] = check.counters_for(identity, now)
        entry = self.shared.counts.get(counter.key)
        return 0 if entry is None else int(entry[0])

    def test_default_unchanged(self) -> None:
        """
        Without on_store_down, a down store fails the check (its on_error
        applies) at every request: no degraded mode, nothing counted.
        """
        check = self.make(on_store_down="on_error")
        self.assertIsNone(check.outage)
        self.flaky.mode = "down"
        for _ in range(3):
            self.failureResultOf(run_check(check, self.message()), StoreError)
        self.assertEqual(self.flaky.calls, ["consume"] * 3)

    def test_enter_and_refuse_at_divided_share(self) -> None:
        """
        The first failure enters degraded mode (one warning, the reason
        escaped); then requests are counted locally without asking the
        store, and refused at the limit divided by the hosts: 4 / 2 = 2.
        """
        check = self.make(local_share="divided", hosts=2)
        self.flaky.mode = "down"
        with capturedLogs() as events:
            verbs = [self.send(check) for _ in range(3)]
        self.assertEqual(verbs, ["DUNNO", "DUNNO", "DEFER"])
        self.assertEqual(self.flaky.calls, ["consume"])
        assert check.outage is not None
        self.assertTrue(check.outage.active)
        entered = [e for e in events if e.get("degraded") is True]
        self.assertEqual(len(entered), 1)
        self.assertNotIn("\n", entered[0]["reason"])
        self.assertIn("connection refused\\x0aINJECTED line", entered[0]["reason"])
        self.assertIn("divided by 2 hosts", entered[0]["share"])
        over = [e for e in events if "limit" in e and e.get("local")]
        self.assertEqual(over[0]["max"], 2)

    def test_full_share(self) -> None:
        """
        With local_share = "full" (the default), each process enforces the
        whole limit locally.
        """
        check = self.make()
        self.flaky.mode = "down"
        self.assertEqual([self.send(check) for _ in range(5)], ["DUNNO"] * 4 + ["DEFER"])

    def test_divided_rounds_down(self) -> None:
        """
        A divided limit is rounded down, so the hosts together never pass
        the limit.
        """
        self.assertEqual(OutageSettings("local", "divided", 3).local_limit(100), 33)
        self.assertEqual(OutageSettings("local", "full", 1).local_limit(100), 100)

    def test_slow_store_then_no_wait(self) -> None:
        """
        A store that times out makes the requests in flight wait for its
        timeout once; after that no request waits for the store.
        """
        check = self.make()
        self.flaky.mode = "slow"
        first = run_check(check, self.message())
        self.assertNoResult(first)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(first), Action.parse("DUNNO"))
        # Answered at once, without the store.
        self.assertEqual(self.send(check), "DUNNO")
        self.assertEqual(self.flaky.calls, ["consume"])

    def test_chain_gave_up_first(self) -> None:
        """
        When the chain stops waiting (the check's timeout, shorter than the
        store's) and answers on_error, the store's later failure still
        enters degraded mode; the message is counted locally if the final
        answer accepted it, and not if it refused it.
        """
        check = self.make()
        self.flaky.mode = "slow"
        accepted, refused = self.message(), self.message()
        for request, final in ((accepted, "OK"), (refused, "451 4.3.0 store down")):
            pending = run_check(check, request)
            pending.cancel()
            self.failureResultOf(pending)
            check.decided(request, Action.parse(final))
        self.clock.advance(2.0)
        assert check.outage is not None
        self.assertTrue(check.outage.active)
        self.assertEqual(len(check.outage.journal), 1)
        [counter] = check.counters_for("alice", START)
        assert check.outage.local is not None
        self.assertEqual(check.outage.local.counts[counter.key][0], 1)
        self.flaky.mode = "up"
        self.clock.advance(5)
        self.assertEqual(self.shared_count(check), 1)

    def test_probe_interval(self) -> None:
        """
        While degraded, the store is tried every probe_interval seconds of
        the clock, once each time; when it answers, the check leaves
        degraded mode and asks the store again.
        """
        check = self.make(probe_interval=5)
        self.flaky.mode = "down"
        self.send(check)
        self.flaky.calls.clear()
        self.clock.advance(4.9)
        self.assertEqual(self.flaky.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.flaky.calls, ["consume"])
        self.clock.advance(4.9)
        self.assertEqual(self.flaky.calls, ["consume"])
        self.flaky.mode = "up"
        with capturedLogs() as events:
            self.clock.advance(0.1)
        assert check.outage is not None
        self.assertFalse(check.outage.active)
        [left] = [e for e in events if e.get("degraded") is False]
        self.assertEqual(left["seconds"], 10.0)
        self.assertEqual(left["amount"], 1)
        self.flaky.calls.clear()
        self.send(check)
        self.assertEqual(self.flaky.calls, ["consume"])
        # No more probes once up.
        self.clock.advance(60)
        self.assertEqual(self.flaky.calls, ["consume"])

    def test_probe_without_counts_reads(self) -> None:
        """
        With nothing to reconcile (all refused), the probe reads from the
        store.
        """
        check = self.make(limits=[{"period": "hour", "max": 0}])
        self.flaky.mode = "down"
        self.assertEqual(self.send(check), "DEFER")
        self.flaky.mode = "up"
        self.flaky.calls.clear()
        self.clock.advance(5)
        self.assertEqual(self.flaky.calls, ["counters"])
        # The key of the operation that failed: on a cluster, its master.
        [counter] = check.counters_for("alice", self.clock.seconds())
        self.assertEqual(self.flaky.read_keys, [counter.key])
        assert check.outage is not None
        self.assertFalse(check.outage.active)

    def test_reconciled_amounts(self) -> None:
        """
        What was counted locally is added to the shared counter once, on
        top of what it held, in the check's unit; the log line says how
        much.
        """
        check = self.make(unit="recipients", limits=[{"period": "hour", "max": 100}])
        self.send(check, self.message(recipient_count="3"))
        self.flaky.mode = "down"
        self.send(check, self.message(recipient_count="5"))
        self.send(check, self.message(recipient_count="7"))
        self.assertEqual(self.shared_count(check), 3)
        self.flaky.mode = "up"
        with capturedLogs() as events:
            self.clock.advance(5)
        self.assertEqual(self.shared_count(check), 15)
        [left] = [e for e in events if e.get("degraded") is False]
        self.assertEqual((left["amount"], left["counts"], left["already"]), (12, 2, 0))
        self.assertEqual(left["unit"], "recipients")
        assert check.outage is not None
        self.assertEqual(check.outage.reconciled, 12)
        self.assertEqual(check.outage.journal, {})
        # Nothing is added again by a later probe or outage.
        self.clock.advance(60)
        self.assertEqual(self.shared_count(check), 15)

    def test_retry_after_half_failed_reconcile(self) -> None:
        """
        A reconciliation that fails half-way keeps the counts not added,
        tries again at the next probe, and adds each count once.
        """
        check = self.make(limits=[{"period": "hour", "max": 100}])
        self.flaky.mode = "down"
        for _ in range(5):
            self.send(check)
        self.flaky.mode = "up"
        self.flaky.budget = 2
        with capturedLogs() as events:
            self.clock.advance(5)
        assert check.outage is not None
        self.assertTrue(check.outage.active)
        self.assertEqual(self.shared_count(check), 2)
        self.assertEqual(len(check.outage.journal), 3)
        [stopped] = [e for e in events if "left" in e]
        self.assertEqual(stopped["left"], 3)
        self.flaky.budget = None
        self.clock.advance(5)
        self.assertFalse(check.outage.active)
        self.assertEqual(self.shared_count(check), 5)

    def test_retry_after_lost_reply(self) -> None:
        """
        A reconciliation the store did but whose reply was lost is tried
        again; the counted-once marks keep it from being added twice.
        """
        check = self.make(limits=[{"period": "hour", "max": 100}])
        self.flaky.mode = "down"
        for _ in range(3):
            self.send(check)
        self.flaky.mode = "lost"
        self.clock.advance(5)
        self.assertEqual(self.shared_count(check), 3)
        assert check.outage is not None
        self.assertTrue(check.outage.active)
        self.flaky.mode = "up"
        with capturedLogs() as events:
            self.clock.advance(5)
        self.assertFalse(check.outage.active)
        self.assertEqual(self.shared_count(check), 3)
        [left] = [e for e in events if e.get("degraded") is False]
        self.assertEqual((left["amount"], left["already"]), (0, 3))

    def test_reconcile_timeout_retried(self) -> None:
        """
        A reconciliation the store never answers is given up after
        probe_interval and tried again; what the store did meanwhile is not
        added twice.
        """
        check = self.make(limits=[{"period": "hour", "max": 100}])
        self.flaky.mode = "down"
        for _ in range(2):
            self.send(check)
        self.flaky.mode = "hang"
        self.clock.advance(5)
        assert check.outage is not None
        self.assertTrue(check.outage.active)
        self.clock.advance(5)
        self.assertTrue(check.outage.active)
        self.flaky.mode = "up"
        self.clock.advance(5)
        self.assertFalse(check.outage.active)
        self.assertEqual(self.shared_count(check), 2)

    def test_message_counted_locally_not_again_after_recovery(self) -> None:
        """
        A message counted during the outage and asked about again after the
        store is back (another check line, another daemon) is found by its
        mark in the shared store: not counted twice.
        """
        check = self.make()
        self.flaky.mode = "down"
        request = self.message(instance="ABC123")
        self.send(check, request)
        self.flaky.mode = "up"
        self.clock.advance(5)
        self.assertEqual(self.shared_count(check), 1)
        self.assertEqual(self.send(check, self.message(instance="ABC123")), "DUNNO")
        self.assertEqual(self.shared_count(check), 1)

    def test_recipient_counted_at_rcpt_not_again_after_recovery(self) -> None:
        """
        At stage RCPT, a recipient counted during the outage and asked about
        again for the same message after the store is back is not counted
        twice; another recipient of the message is counted.
        """
        check = self.make(stage="RCPT", unit="recipients")
        self.flaky.mode = "down"

        def rcpt(recipient: str) -> Any:
            return make_request("rcpt", sasl_username="alice", instance="R1", recipient=recipient)

        self.send(check, rcpt("bob@example.net"))
        self.flaky.mode = "up"
        self.clock.advance(5)
        self.assertEqual(self.shared_count(check), 1)
        self.assertEqual(self.send(check, rcpt("bob@example.net")), "DUNNO")
        self.assertEqual(self.shared_count(check), 1)
        self.send(check, rcpt("carol@example.net"))
        self.assertEqual(self.shared_count(check), 2)

    def test_message_counted_before_outage_not_again(self) -> None:
        """
        A message counted in the shared store before the outage and asked
        about again during it is counted locally, but its reconciliation
        finds its mark: the shared count is not added to.
        """
        check = self.make()
        self.send(check, self.message(instance="XYZ"))
        self.flaky.mode = "down"
        self.send(check, self.message(instance="XYZ"))
        self.flaky.mode = "up"
        with capturedLogs() as events:
            self.clock.advance(5)
        self.assertEqual(self.shared_count(check), 1)
        [left] = [e for e in events if e.get("degraded") is False]
        self.assertEqual(left["already"], 1)

    def test_refused_locally_counted_message_taken_back(self) -> None:
        """
        A message counted locally and then refused by the chain is taken
        back locally and never reconciled.
        """
        check = self.make(limits=[{"period": "hour", "max": 1}])
        self.flaky.mode = "down"
        self.send(check, final="REJECT spam")
        # Its count is back: the next one fits.
        self.assertEqual(self.send(check), "DUNNO")
        self.flaky.mode = "up"
        self.clock.advance(5)
        self.assertEqual(self.shared_count(check), 1)

    def test_refused_after_reconcile_taken_back_in_store(self) -> None:
        """
        A message counted locally whose refusal arrives after it was
        reconciled is taken back in the shared store.
        """
        check = self.make()
        self.flaky.mode = "down"
        request = self.message()
        self.successResultOf(run_check(check, request))
        self.flaky.mode = "up"
        self.clock.advance(5)
        self.assertEqual(self.shared_count(check), 1)
        check.decided(request, Action.parse("REJECT no"))
        self.assertEqual(self.shared_count(check), 0)

    def test_window_over_during_outage(self) -> None:
        """
        A count whose window ended during the outage is not added to any
        window; its mark still is, so the message is not counted again.
        """
        check = self.make()
        self.clock.advance(3590)
        self.flaky.mode = "down"
        self.send(check, self.message(instance="LATE"))
        # 11:02: the 10:00 window (kept to 11:01) is over.
        self.clock.advance(130)
        self.flaky.mode = "up"
        self.clock.advance(5)
        assert check.outage is not None
        self.assertFalse(check.outage.active)
        self.assertEqual(self.shared.counts, {})
        self.assertEqual(self.send(check, self.message(instance="LATE")), "DUNNO")
        self.assertEqual(self.shared.counts, {})
        self.assertEqual(len(self.shared.counted), 1)

    def test_without_instance(self) -> None:
        """
        Mail without an instance is journalled under marks of its own, one
        per count: every count is reconciled.
        """
        check = self.make()
        self.flaky.mode = "down"
        for _ in range(3):
            self.send(check, self.message(instance=""))
        self.flaky.mode = "up"
        self.clock.advance(5)
        self.assertEqual(self.shared_count(check), 3)

    def test_refuse_early_locally(self) -> None:
        """
        refuse_early answers from the local share while degraded.
        """
        check = self.make(refuse_early=True, local_share="divided", hosts=2)
        self.flaky.mode = "down"
        self.send(check)
        self.send(check)
        rcpt = make_request("rcpt", sasl_username="alice")
        self.assertEqual(str(self.successResultOf(run_check(check, rcpt)).verb), "DEFER")

    def test_stopped_while_degraded_logs_dropped(self) -> None:
        """
        A check stopped (a reload replacing it, or the daemon stopping)
        with counts not reconciled says how much is dropped, and stops
        probing.
        """
        check = self.make()
        self.flaky.mode = "down"
        self.send(check)
        self.send(check)
        with capturedLogs() as events:
            check.stopService()
        [dropped] = [e for e in events if "stopped while degraded" in e["log_format"]]
        self.assertEqual((dropped["amount"], dropped["count"]), (2, 2))
        self.flaky.mode = "up"
        self.flaky.calls.clear()
        self.clock.advance(60)
        self.assertEqual(self.flaky.calls, [])

    def test_not_a_down_store(self) -> None:
        """
        A failure that is not the store's (a bug) fails the check as
        before: degraded mode is for a store that cannot be used.
        """
        check = self.make()
        self.flaky.consume = lambda *a: fail(ValueError("bug"))  # type: ignore[method-assign]
        self.failureResultOf(run_check(check, self.message()), ValueError)
        assert check.outage is not None
        self.assertFalse(check.outage.active)

    def test_metrics(self) -> None:
        """
        The degraded gauge shows the check's state at scrape time; the
        reconciled counter what it added to the store.
        """
        check = self.make(unit="recipients", limits=[{"period": "hour", "max": 100}])
        served = Served(make_chain(("quota", check, 10.0, "skip"), clock=self.clock), self.clock)
        found = samples(served.metrics)
        self.assertEqual(value(found, "pfxpold_check_degraded", check="quota"), 0)
        self.flaky.mode = "down"
        self.send(check, self.message(recipient_count="4"))
        found = samples(served.metrics)
        self.assertEqual(value(found, "pfxpold_check_degraded", check="quota"), 1)
        self.flaky.mode = "up"
        self.clock.advance(5)
        found = samples(served.metrics)
        self.assertEqual(value(found, "pfxpold_check_degraded", check="quota"), 0)
        self.assertEqual(value(found, "pfxpold_check_reconciled_total", check="quota"), 4)


class ConfigurationTests(SynchronousTestCase):
    """
    Bad degraded-mode settings are one line naming the check and the key.
    """

    def error(self, kind: type, key: str, **table: Any) -> None:
        table.setdefault("limits", [{"period": "hour", "max": 4}])
        error = self.assertRaises(ConfigError, kind, options(Clock(), "q", **table))
        text = str(error)
        self.assertNotIn("\n", text)
        self.assertIn("q", text)
        self.assertIn(f"'{key}'", text)

    def test_errors(self) -> None:
        """
        Unknown modes and shares, hosts without a divided share (or
        missing with one), settings for local mode without it, a
        probe_interval that is not positive.
        """
        self.error(QuotaCheck, "on_store_down", on_store_down="pass")
        self.error(QuotaCheck, "local_share", on_store_down="local", local_share="half")
        self.error(QuotaCheck, "hosts", on_store_down="local", local_share="divided")
        self.error(QuotaCheck, "hosts", on_store_down="local", hosts=2)
        self.error(QuotaCheck, "hosts", on_store_down="local", local_share="divided", hosts=0)
        self.error(QuotaCheck, "local_share", local_share="divided", hosts=2)
        self.error(QuotaCheck, "probe_interval", on_store_down="local", probe_interval=0)
        self.error(QuotaCheck, "probe_interval", probe_interval=5)
        self.error(GreylistCheck, "on_store_down", on_store_down="divided")

    def test_greylist_has_no_share(self) -> None:
        """
        A greylist check does not read local_share: it is left unused (the
        configuration reports it as not a setting).
        """
        check_options = options(Clock(), "g", on_store_down="local", local_share="full")
        settings = read_outage_settings(check_options, ("on_error", "pass", "local"))
        self.assertEqual(settings.mode, "local")
        self.assertEqual(check_options.unused(), ["local_share"])


class GreylistOutageTests(CheckTestCase):
    """
    A greylist check with on_store_down = "pass" or "local".
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)

    def make(self, **table: Any) -> GreylistCheck:
        table.setdefault("delay", 60)
        check = GreylistCheck(options(self.clock, "greylist", **table))
        self.flaky = Flaky(check.store, self.clock)  # type: ignore[arg-type]
        check.store = self.flaky  # type: ignore[assignment]
        check.startService()
        self.addCleanup(check.stopService)
        return check

    def answer(self, check: GreylistCheck, **changes: str) -> str:
        changes.setdefault("client_address", "192.0.2.10")
        changes.setdefault("sender", "alice@example.com")
        changes.setdefault("recipient", "bob@example.net")
        return str(self.successResultOf(run_check(check, make_request("rcpt", **changes))).verb)

    def test_default_fails(self) -> None:
        """
        Without on_store_down a down store fails the check, every time.
        """
        check = self.make()
        self.flaky.mode = "down"
        self.failureResultOf(run_check(check, make_request("rcpt")), StoreError)
        self.failureResultOf(run_check(check, make_request("rcpt")), StoreError)

    def test_pass(self) -> None:
        """
        With "pass", mail passes without asking the store while it is down;
        the store is tried every probe_interval and used again when up.
        """
        check = self.make(on_store_down="pass", probe_interval=10)
        self.flaky.mode = "down"
        with capturedLogs() as events:
            self.assertEqual(self.answer(check), "DUNNO")
            self.assertEqual(self.answer(check), "DUNNO")
        self.assertEqual(self.flaky.calls, ["whitelist_list"])
        [entered] = [e for e in events if e.get("degraded") is True]
        self.assertEqual(entered["doing"], "passing mail unchecked")
        self.flaky.mode = "up"
        with capturedLogs() as events:
            self.clock.advance(10)
        [left] = [e for e in events if e.get("degraded") is False]
        self.assertTrue(left["log_format"].endswith("degraded mode left"), left["log_format"])
        self.assertEqual(self.flaky.calls[-1], "counters")
        self.assertEqual(self.flaky.read_keys, ["greylist:{greylist:192.0.2.0/24}:client"])
        self.assertEqual(self.answer(check), "DEFER_IF_PERMIT")

    def test_local(self) -> None:
        """
        With "local", a private greylist answers while the store is down: a
        first attempt is deferred, a retry after the delay to the same
        host passes.
        """
        check = self.make(on_store_down="local", probe_interval=600)
        self.flaky.mode = "down"
        self.assertEqual(self.answer(check), "DEFER_IF_PERMIT")
        self.assertEqual(self.answer(check), "DEFER_IF_PERMIT")
        self.clock.advance(61)
        self.assertEqual(self.answer(check), "DUNNO")
        self.assertEqual(self.flaky.calls, ["whitelist_list"])

    def test_local_store_failure_on_greylist_call(self) -> None:
        """
        A failure of the greylist operation itself (the whitelist read
        from before still fresh) enters degraded mode too.
        """
        check = self.make(on_store_down="local")
        self.assertEqual(self.answer(check), "DEFER_IF_PERMIT")
        self.flaky.mode = "down"
        self.assertEqual(self.answer(check, recipient="carol@example.net"), "DEFER_IF_PERMIT")
        assert check.outage is not None
        self.assertTrue(check.outage.active)


class OutageUnitTests(SynchronousTestCase):
    """
    The journal on its own.
    """

    def test_taken_back_while_sending(self) -> None:
        """
        A count taken back while its reconciliation is on its way is
        reported as not only local (the caller takes it back in the store
        too), and is not tallied as reconciled.
        """
        clock = Clock()
        store = Flaky(MemoryStore(options(clock, "s")), clock)
        store.mode = "hang"
        outage = Outage(
            "quota",
            "q",
            OutageSettings("local", probe_interval=5),
            clock,
            lambda: store,
            clock.seconds,
        )
        binding = outage.attach(outage.settings, lambda: store, clock.seconds)
        outage.enter(Failure(StoreError("x")))

        pending = Pending((Counter("k", ("k",), 9, 100.0),), 1, Once("m", 100.0))
        outage.record(pending)
        clock.advance(5)
        self.assertFalse(outage.forget(pending.once))
        self.assertEqual(outage.reconciled, 0)
        outage.detach(binding)


class ReplayTests(SynchronousTestCase):
    """
    pfxpold-replay (private memory stores) with degraded-mode settings.
    """

    def test_replay(self) -> None:
        """
        A configuration with on_store_down settings replays with the same
        answers.
        """
        config = GREYLIST_CONFIG.replace(
            'action = "DEFER_IF_PERMIT Greylisted"',
            'action = "DEFER_IF_PERMIT Greylisted"\non_store_down = "local"',
        ).replace(
            'action = "DEFER 4.7.1 Sending quota exceeded"',
            'action = "DEFER 4.7.1 Sending quota exceeded"\non_store_down = "local"\n'
            'local_share = "divided"\nhosts = 2\nprobe_interval = 2',
        )
        self.assertIn("hosts = 2", config)
        harness = Harness(self, config)
        for at, recipient in [(0, "r1@example.net"), (400, "r1@example.net")]:
            harness.send(
                at, sender="alice@example.com", recipient=recipient, client_address="192.0.2.7"
            )
        report, _ = harness.replay()
        self.assertEqual(report.requests, 2)
        self.assertEqual(report.changed, 0, report.samples)


class ExampleTests(SynchronousTestCase):
    """
    examples/quota-redis-degraded.toml builds what it says.
    """

    def test_example(self) -> None:
        """
        Its greylist is degraded locally, its quota on half of each limit
        (two hosts), both trying Redis every 5 s.
        """
        examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
        configuration = load_configuration(
            os.path.join(examples, "quota-redis-degraded.toml"), Clock()
        )
        greylist, quota = (entry.check for entry in configuration.chain.entries)
        self.assertEqual(greylist.outage.settings, OutageSettings("local", "full", 1, 5.0))
        self.assertEqual(quota.outage.settings, OutageSettings("local", "divided", 2, 5.0))
        [counter, _] = quota.counters_for("alice", 0.0)
        self.assertEqual(quota._local_counters((counter,))[0].limit, 100)


class ReloadTests(SynchronousTestCase):
    """
    A reload while a quota check is degraded (pfxpold.reload).
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(START)
        self.next = self.document(4)
        self.configuration = self.load(None)
        self.service = PolicyService(self.configuration, self.reactor)
        self.reloader = Reloader(self.service, self.load, self.reactor)
        self.service.reloader = self.reloader
        with capturedLogs():
            self.service.privilegedStartService()
            self.service.startService()
        self.addCleanup(self.service.stopService)

    def document(self, limit: int, on_store_down: str = "local") -> dict[str, Any]:
        return document(
            {
                "name": "quota",
                "type": "quota",
                "limits": [{"period": "hour", "max": limit}],
                "on_store_down": on_store_down,
            },
            stores={"default": {"type": "memory"}},
        )

    def load(self, previous: Any) -> Any:
        return load_document(copy.deepcopy(self.next), self.reactor, "/p.toml", previous)

    def reload(self, limit: int, on_store_down: str = "local") -> list[dict[str, Any]]:
        self.next = self.document(limit, on_store_down)
        with capturedLogs() as events:
            self.assertTrue(self.successResultOf(self.reloader.reload()))
        return events  # type: ignore[return-value]

    def degrade(self) -> QuotaCheck:
        [entry] = self.service.configuration.chain.entries
        check: QuotaCheck = entry.check
        flaky = Flaky(check.store, self.reactor)  # type: ignore[arg-type]
        flaky.mode = "down"
        check.store = flaky  # type: ignore[assignment]
        for number in range(3):
            request = make_request("eod", sasl_username="alice", instance=f"m{number}")
            self.successResultOf(run_check(check, request))
            check.decided(request, Action.parse("DUNNO"))
        return check

    def test_unchanged_check_stays_degraded(self) -> None:
        """
        A reload that leaves the check unchanged keeps it, its degraded mode
        and its local counts.
        """
        check = self.degrade()
        events = self.reload(4)
        [entry] = self.service.configuration.chain.entries
        self.assertIs(entry.check, check)
        assert check.outage is not None
        self.assertTrue(check.outage.active)
        self.assertEqual(len(check.outage.journal), 3)
        self.assertEqual([e for e in events if "dropped" in e.get("log_format", "")], [])

    def test_replaced_check_hands_over(self) -> None:
        """
        A reload that replaces the degraded check (its limit changed) hands
        its degraded mode and local counts to the successor, which counts
        on under the new limit and reconciles them when the store answers:
        nothing is dropped.
        """
        old = self.degrade()
        events = self.reload(6)
        [entry] = self.service.configuration.chain.entries
        new: QuotaCheck = entry.check
        self.assertIsNot(new, old)
        self.assertFalse(old.running)
        self.assertIs(new.outage, old.outage)
        assert new.outage is not None
        self.assertTrue(new.outage.active)
        self.assertEqual([e for e in events if "are dropped" in e.get("log_format", "")], [])
        # The successor's store (the shared memory store) answers.
        with capturedLogs() as events:
            self.reactor.advance(5)
        self.assertFalse(new.outage.active)
        [counter] = new.counters_for("alice", new.now())
        values = self.successResultOf(new.store.counters([counter.key], new.now()))
        self.assertEqual(values[counter.key].count, 3)

    def test_replaced_without_degraded_mode_logs_what_is_dropped(self) -> None:
        """
        A reload that takes degraded mode away from a degraded check says
        how much counted locally is dropped, once the old check stops.
        """
        self.degrade()
        events = self.reload(4, on_store_down="on_error")
        [dropped] = [e for e in events if "are dropped" in e.get("log_format", "")]
        self.assertEqual((dropped["check"], dropped["amount"], dropped["count"]), ("quota", 3, 3))


class ExplainTests(SynchronousTestCase):
    """
    pfxpold-explain (private memory stores) with degraded-mode settings.
    """

    def test_explain(self) -> None:
        """
        The example with degraded mode on explains a request: the quota
        counts it in its private store, without degraded mode.
        """
        examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
        clock = Clock()
        clock.advance(START)
        document = private_stores(
            read_document(os.path.join(examples, "quota-redis-degraded.toml"))
        )
        configuration = load_document(document, clock, os.path.join(examples, "x.toml"))
        request = make_request("eod", sasl_username="alice", instance="E1")
        explanation = self.successResultOf(
            Deferred.fromCoroutine(explain(configuration, request, clock))
        )
        self.assertEqual(str(explanation.answer), "DUNNO")
        greylist, quota = (entry.check for entry in configuration.chain.entries)
        self.assertFalse(quota.outage.active)
        self.assertIsInstance(quota.store, MemoryStore)
        self.assertEqual(len(quota.store.counted), 1)
