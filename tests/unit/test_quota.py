"""
Tests for the quota check (pfxpold.checks.quota) on the in-memory store,
with a Clock for every window.
"""

from __future__ import annotations

import datetime
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from pfxpold.action import Action
from pfxpold.checks.quota import QuotaCheck, Window, refuses
from pfxpold.config import CheckOptions, ConfigError
from pfxpold.interfaces import ICheck, IDecisionListener
from pfxpold.request import PolicyRequest
from pfxpold.state import Consumption, StoreError
from pfxpold.testing import CheckTestCase, make_request, run_check
from tests.unit.tempdir import temporary_path

# Tue 2027-01-05 10:00:00 UTC
START = datetime.datetime(2027, 1, 5, 10, 0, tzinfo=datetime.UTC).timestamp()
OVER = "DEFER 4.7.1 Sending quota exceeded ({limit}: {max} {unit})"


class QuotaTests(CheckTestCase):
    """
    The quota check on the in-memory store.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.messages = 0

    def make(self, **table: Any) -> QuotaCheck:
        table.setdefault("key", ["sasl_username"])
        table.setdefault("limits", [{"period": "hour", "max": 2}])
        self.options = CheckOptions(
            table,
            name="quota",
            reactor=self.clock,
            document={"stores": {"default": {"type": "memory"}}},
            shared={},
        )
        check = QuotaCheck(self.options)
        self.assertEqual(self.options.unused(), [])
        return check

    def message(self, fixture: str = "eod", **changes: str) -> PolicyRequest:
        self.messages += 1
        changes.setdefault("sasl_username", "alice")
        changes.setdefault("instance", f"message.{self.messages}")
        return make_request(fixture, **changes)

    def send(self, check: QuotaCheck, request: PolicyRequest, chain_answer: Any = None) -> Action:
        """
        Run the check as the chain does, then tell it the final answer (its
        own, unless the chain answered something else).
        """
        action = self.successResultOf(run_check(check, request))
        final = action if chain_answer is None else chain_answer
        check.decided(request, final if isinstance(final, Action) else Action.parse(final))
        return action

    def verbs(self, check: QuotaCheck, count: int, **changes: str) -> list[str]:
        return [self.send(check, self.message(**changes)).verb for _ in range(count)]

    def test_interfaces(self) -> None:
        """
        The check provides ICheck and IDecisionListener.
        """
        check = self.make()
        self.assertTrue(verifyObject(ICheck, check))
        self.assertTrue(verifyObject(IDecisionListener, check))

    def test_hour_window(self) -> None:
        """
        An hour window admits its maximum, refuses the next, and starts
        over at the next full hour.
        """
        check = self.make()
        self.assertEqual(self.verbs(check, 3), ["DUNNO", "DUNNO", "DEFER"])
        self.clock.advance(3599)
        self.assertEqual(self.verbs(check, 1), ["DEFER"])
        self.clock.advance(1)
        self.assertEqual(self.verbs(check, 3), ["DUNNO", "DUNNO", "DEFER"])

    def test_over_limit_text_and_log(self) -> None:
        """
        The over-limit answer names the limit hit; a warning logs the key
        and the counts.
        """
        check = self.make(
            limits=[{"period": "hour", "max": 5}, {"name": "daily", "period": "day", "max": 1}]
        )
        self.send(check, self.message())
        with capturedLogs() as events:
            action = self.send(check, self.message())
        self.assertEqual(str(action), "DEFER 4.7.1 Sending quota exceeded (daily: 1 messages)")
        [event] = [e for e in events if e.get("log_level").name == "warn"]
        self.assertEqual(event["key"], "alice")
        self.assertEqual(event["counts"], {"hour": 1, "daily": 1})
        self.assertEqual(event["limit"], "daily")

    def test_day_window_reset_time_zone(self) -> None:
        """
        A day window resets at the configured local time of the configured
        zone: 04:00 in Europe/Berlin is 03:00 UTC in January.
        """
        check = self.make(
            limits=[{"period": "day", "max": 1, "reset": "04:00"}], timezone="Europe/Berlin"
        )
        self.assertEqual(self.verbs(check, 2), ["DUNNO", "DEFER"])
        # 2027-01-06 02:59:59 UTC: still the same day window.
        self.clock.advance(16 * 3600 + 59 * 60 + 59)
        self.assertEqual(self.verbs(check, 1), ["DEFER"])
        self.clock.advance(1)
        self.assertEqual(self.verbs(check, 2), ["DUNNO", "DEFER"])

    def test_day_window_before_reset(self) -> None:
        """
        Before the reset time, the window is the one that began the day
        before.
        """
        window = Window("day", "day", 5, datetime.UTC, reset=12 * 3600)
        ident, end = window.bounds(START)
        self.assertEqual(ident, "20270104")
        self.assertEqual(end, START + 2 * 3600)

    def test_sliding_window(self) -> None:
        """
        A sliding window counts what was sent in the last N seconds: old
        messages leave it bucket by bucket, never all at once.
        """
        check = self.make(limits=[{"period": "sliding", "seconds": 600, "max": 2, "precision": 60}])
        self.assertEqual(self.verbs(check, 1), ["DUNNO"])
        self.clock.advance(300)
        self.assertEqual(self.verbs(check, 2), ["DUNNO", "DEFER"])
        # The first message is older than 600 s only once its whole
        # bucket has left the window.
        self.clock.advance(300)
        self.assertEqual(self.verbs(check, 1), ["DEFER"])
        self.clock.advance(60)
        self.assertEqual(self.verbs(check, 2), ["DUNNO", "DEFER"])

    def test_several_limits(self) -> None:
        """
        100/hour and 3/day both hold: the day limit refuses in the second
        hour.
        """
        check = self.make(limits=[{"period": "hour", "max": 2}, {"period": "day", "max": 3}])
        self.assertEqual(self.verbs(check, 3), ["DUNNO", "DUNNO", "DEFER"])
        self.clock.advance(3600)
        self.assertEqual(self.verbs(check, 2), ["DUNNO", "DEFER"])

    def test_counted_once(self) -> None:
        """
        A message counts once at its stage, whatever requests come at other
        stages or again for the same instance.
        """
        check = self.make(limits=[{"period": "hour", "max": 1}])
        request = self.message()
        self.send(check, self.message("rcpt", instance=request.instance))
        self.send(check, self.message("data", instance=request.instance))
        self.assertEqual(self.send(check, request).verb, "DUNNO")
        self.assertEqual(self.send(check, request).verb, "DUNNO")
        self.assertEqual(self.verbs(check, 1), ["DEFER"])

    def sharing(self, **table: Any) -> tuple[QuotaCheck, QuotaCheck]:
        """
        Two quota checks (two daemons) sharing one store.
        """
        table.setdefault("key", ["sasl_username"])
        shared: dict[Any, Any] = {}
        first, second = (
            QuotaCheck(
                CheckOptions(
                    dict(table),
                    name="quota",
                    reactor=self.clock,
                    document={"stores": {"default": {"type": "memory"}}},
                    shared=shared,
                )
            )
            for _ in range(2)
        )
        self.assertIs(second.store, first.store)
        return first, second

    def test_counted_once_across_daemons(self) -> None:
        """
        The same message (same instance) through two daemons sharing a
        store is counted once; the daemon that did not count it has
        nothing to take back when its chain refuses the message.
        """
        first, second = self.sharing(limits=[{"period": "hour", "max": 2}])
        request = self.message()
        self.assertEqual(self.send(first, request).verb, "DUNNO")
        self.assertEqual(self.send(second, request, chain_answer="REJECT no").verb, "DUNNO")
        self.assertEqual(self.verbs(second, 2), ["DUNNO", "DEFER"])

    def test_release_across_daemons(self) -> None:
        """
        A message counted by one daemon and refused there is taken back
        once; then the other daemon, asked about it again, counts it.
        """
        first, second = self.sharing(limits=[{"period": "hour", "max": 1}])
        request = self.message()
        self.assertEqual(self.send(first, request, chain_answer="REJECT no").verb, "DUNNO")
        self.assertEqual(self.send(second, request).verb, "DUNNO")
        self.assertEqual(self.verbs(first, 1), ["DEFER"])

    def test_mark_shares_the_hash_tag(self) -> None:
        """
        A message's mark carries the hash tag of its identity's counters
        (one Redis Cluster slot), and no counter key starts like it.
        """
        check = self.make()
        once = check.once("alice", ("instance", "192.0.2.1"), START)
        tag = check.key_prefix("alice")[len("quota") :]
        self.assertTrue(once.key.startswith("counted" + tag + ":"))
        self.assertFalse(once.key.startswith(check.key_prefix()))
        self.assertEqual(once.expires_at, START + 3600)

    def test_recipients_unit(self) -> None:
        """
        Counting recipients, an 11-recipient message counts 11.
        """
        check = self.make(unit="recipients", limits=[{"period": "hour", "max": 12}])
        self.assertEqual(self.send(check, self.message(recipient_count="11")).verb, "DUNNO")
        self.assertEqual(self.send(check, self.message(recipient_count="2")).verb, "DEFER")
        self.assertEqual(self.send(check, self.message(recipient_count="1")).verb, "DUNNO")

    def test_messages_unit_multi_recipient(self) -> None:
        """
        Counting messages, an 11-recipient message counts 1.
        """
        check = self.make(limits=[{"period": "hour", "max": 2}])
        self.assertEqual(self.send(check, self.message(recipient_count="11")).verb, "DUNNO")
        self.assertEqual(self.send(check, self.message(recipient_count="11")).verb, "DUNNO")
        self.assertEqual(self.send(check, self.message(recipient_count="11")).verb, "DEFER")

    def test_bytes_unit(self) -> None:
        """
        Counting bytes, the END-OF-MESSAGE size counts.
        """
        check = self.make(unit="bytes", limits=[{"period": "hour", "max": 1000}])
        self.assertEqual(self.send(check, self.message(size="600")).verb, "DUNNO")
        self.assertEqual(self.send(check, self.message(size="600")).verb, "DEFER")
        self.assertEqual(self.send(check, self.message(size="400")).verb, "DUNNO")

    def test_data_stage(self) -> None:
        """
        stage = "DATA" counts at DATA, not at END-OF-MESSAGE.
        """
        check = self.make(stage="DATA", limits=[{"period": "hour", "max": 1}])
        self.assertEqual(self.send(check, self.message("eod")).verb, "DUNNO")
        self.assertEqual(self.send(check, self.message("data")).verb, "DUNNO")
        self.assertEqual(self.send(check, self.message("data")).verb, "DEFER")

    def test_rcpt_stage_recipient_domain(self) -> None:
        """
        At RCPT, recipients count one by one, per recipient domain.
        """
        check = self.make(
            stage="RCPT",
            unit="recipients",
            key=["sasl_username", "recipient_domain"],
            limits=[{"period": "hour", "max": 1}],
        )
        self.assertEqual(
            self.send(check, self.message("rcpt", recipient="a@x.example")).verb, "DUNNO"
        )
        self.assertEqual(
            self.send(check, self.message("rcpt", recipient="b@X.example")).verb, "DEFER"
        )
        self.assertEqual(
            self.send(check, self.message("rcpt", recipient="a@y.example")).verb, "DUNNO"
        )

    def test_refused_mail_not_counted(self) -> None:
        """
        A message that another check (or Postfix's policy answer) refused
        is taken back off the count; one that passed stays counted.
        """
        check = self.make(limits=[{"period": "hour", "max": 2}])
        for answer in ("REJECT spam", "DEFER later", "554 5.7.1 no", "DISCARD"):
            self.assertEqual(self.send(check, self.message(), chain_answer=answer).verb, "DUNNO")
        self.assertEqual(self.send(check, self.message(), chain_answer="OK").verb, "DUNNO")
        self.assertEqual(self.send(check, self.message(), chain_answer="HOLD review").verb, "DUNNO")
        self.assertEqual(self.verbs(check, 1), ["DEFER"])

    def test_refuses(self) -> None:
        """
        Which final answers count as refusing the mail.
        """
        self.assertTrue(refuses(None))
        for value in ("REJECT", "DEFER x", "DEFER_IF_PERMIT x", "450 no", "DISCARD"):
            self.assertTrue(refuses(Action.parse(value)), value)
        for value in ("OK", "DUNNO", "HOLD", "PREPEND X-A: b", "DEFER_IF_REJECT x", "WARN x"):
            self.assertFalse(refuses(Action.parse(value)), value)

    def test_mark_carries_instance(self) -> None:
        """
        The mark of a message carries its Postfix instance (where the
        SQLite store keeps it), and the same message always the same mark.
        """
        check = self.make(key=["sender"], stage="RCPT", unit="recipients")
        token = ("7ee1.6b05ccb5.7a08.0", "192.0.2.1", "bob@example.com")
        first = check.once("alice@example.com", token, START)
        self.assertEqual(first.instance, token[0])
        self.assertEqual(first, check.once("alice@example.com", token, START))

    def test_key_parts(self) -> None:
        """
        The key can be any of the request parts or a combination; the
        client network uses the configured prefixes.
        """
        check = self.make(key=["sender", "client_network"], ipv6_prefix=48)
        request = self.message(sender="Bob@EXAMPLE.com", client_address="2001:db8:1:2::7")
        self.assertEqual(check.identity(request), "Bob@example.com,2001:db8:1::/48")
        request = self.message(client_address="192.0.2.77")
        check = self.make(key=["client_network", "sender_domain"])
        self.assertEqual(check.identity(request), "192.0.2.0/24,example.com")
        check = self.make(key=["client_address"])
        self.assertEqual(
            check.identity(self.message(client_address="::ffff:192.0.2.1")), "192.0.2.1"
        )

    def test_empty_key_not_counted(self) -> None:
        """
        Mail without the key (no SASL login) is not counted.
        """
        check = self.make(limits=[{"period": "hour", "max": 0}])
        self.assertEqual(self.send(check, self.message(sasl_username="")).verb, "DUNNO")
        self.assertEqual(self.send(check, self.message()).verb, "DEFER")

    def test_overrides_and_unlimited(self) -> None:
        """
        Per-identity limits from the overrides file, and unlimited
        identities from the file and the unlimited list.
        """
        path = temporary_path(self)
        with open(path, "w") as f:
            f.write("# who  limits\nbig hour=3\nfree unlimited\n")
        check = self.make(overrides=path, unlimited=["root"])
        self.assertEqual(self.verbs(check, 4, sasl_username="big"), ["DUNNO"] * 3 + ["DEFER"])
        self.assertEqual(self.verbs(check, 5, sasl_username="free"), ["DUNNO"] * 5)
        self.assertEqual(self.verbs(check, 5, sasl_username="root"), ["DUNNO"] * 5)
        self.assertEqual(self.verbs(check, 3), ["DUNNO", "DUNNO", "DEFER"])

    def test_override_text_names_override(self) -> None:
        """
        The over-limit text gives the identity's own maximum.
        """
        path = temporary_path(self)
        with open(path, "w") as f:
            f.write("big hour=1\n")
        check = self.make(overrides=path, action="REJECT {key}: {limit} {max}")
        self.verbs(check, 1, sasl_username="big")
        action = self.send(check, self.message(sasl_username="big"))
        self.assertEqual(str(action), "REJECT big: hour 1")

    def test_overrides_reload(self) -> None:
        """
        While the check runs, a changed overrides file is read again every
        overrides_reload seconds; a broken one is logged and the limits in
        force are kept.
        """
        path = temporary_path(self)
        with open(path, "w") as f:
            f.write("big hour=3\n")
        check = self.make(overrides=path, overrides_reload=30.0)
        check.startService()
        self.addCleanup(check.stopService)
        self.assertEqual(check.overrides, {"big": {"hour": 3}})
        with open(path, "w") as f:
            f.write("big unlimited\nsmall hour=1\n")
        self.clock.advance(29)
        self.assertEqual(check.overrides, {"big": {"hour": 3}})
        self.clock.advance(1)
        self.assertEqual(check.overrides, {"big": None, "small": {"hour": 1}})
        with open(path, "w") as f:
            f.write("big nonsense=1\n")
        with capturedLogs() as events:
            self.clock.advance(30)
            self.clock.advance(30)
        self.assertEqual(check.overrides, {"big": None, "small": {"hour": 1}})
        errors = [e for e in events if e.get("log_level").name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("nonsense=1", errors[0]["reason"])

    def test_reloaded_limits_apply_at_once(self) -> None:
        """
        Counters built under the old limits are not reused after a reload,
        even within the same minute.
        """
        path = temporary_path(self)
        with open(path, "w") as f:
            f.write("big hour=1\n")
        check = self.make(overrides=path)
        self.assertEqual(self.verbs(check, 2, sasl_username="big"), ["DUNNO", "DEFER"])
        with open(path, "w") as f:
            f.write("big hour=3\n")
        check.reload_overrides()
        self.assertEqual(self.verbs(check, 3, sasl_username="big"), ["DUNNO", "DUNNO", "DEFER"])

    def test_counters_follow_the_window(self) -> None:
        """
        An identity's counters reused within a minute still move to the
        next window when it starts: a full hour does not refuse the next.
        """
        check = self.make(limits=[{"period": "hour", "max": 1}])
        self.clock.advance(3600 - 30)
        self.assertEqual(self.verbs(check, 2), ["DUNNO", "DEFER"])
        self.clock.advance(29)
        self.assertEqual(self.verbs(check, 1), ["DEFER"])
        self.clock.advance(1)
        self.assertEqual(self.verbs(check, 2), ["DUNNO", "DEFER"])

    def test_overrides_reload_off(self) -> None:
        """
        overrides_reload = 0 reads the file only at start.
        """
        path = temporary_path(self)
        with open(path, "w") as f:
            f.write("big hour=3\n")
        check = self.make(overrides=path, overrides_reload=0.0)
        self.assertEqual(list(check), [])

    def test_hold_action(self) -> None:
        """
        The over-limit action may be HOLD, so the mail waits in the hold
        queue for review.
        """
        check = self.make(action="HOLD over quota {limit}", limits=[{"period": "hour", "max": 0}])
        self.assertEqual(str(self.send(check, self.message())), "HOLD over quota hour")

    def test_store_failure(self) -> None:
        """
        A store failure fails the check (its on_error applies) and counts
        nothing.
        """
        check = self.make()
        check.store = FakeStore(fail(StoreError("down")))
        request = self.message()
        self.failureResultOf(run_check(check, request), StoreError)
        check.decided(request, None)
        self.assertEqual(check.store.released, [])

    def test_answers_at_once_when_the_store_did(self) -> None:
        """
        On a store that answers inside consume() (the memory store), the
        check returns the action itself, not a Deferred: the chain stays on
        its synchronous path.
        """
        check = self.make(limits=[{"period": "hour", "max": 1}])
        first = self.message()
        self.assertEqual(check.check(first), Action("DUNNO"))
        check.decided(first, Action("DUNNO"))
        over = check.check(self.message())
        self.assertIsInstance(over, Action)
        self.assertEqual(over.verb, "DEFER")

    def test_store_failing_at_once_raises(self) -> None:
        """
        A store that failed inside consume() makes the check raise its
        error, which the chain handles as any failure (on_error).
        """
        check = self.make()
        check.store = FakeStore(fail(StoreError("down")))
        self.assertRaises(StoreError, check.check, self.message())

    def test_answers_later_when_the_store_does(self) -> None:
        """
        On a store that answers later, the check returns a Deferred (not
        the store's) that fires with the action once the store answered.
        """
        check = self.make()
        pending: Deferred[Consumption] = Deferred()
        check.store = FakeStore(pending)
        answer = check.check(self.message())
        self.assertIsInstance(answer, Deferred)
        self.assertIsNot(answer, pending)
        self.assertNoResult(answer)
        pending.callback(Consumption(False, (2,)))
        self.assertEqual(self.successResultOf(answer).verb, "DEFER")

    def test_late_store_answer_after_refusal(self) -> None:
        """
        When the chain gave up on the check (timeout) and refused the mail,
        a count that lands afterwards is taken back.
        """
        check = self.make()
        pending: Deferred[Consumption] = Deferred()
        check.store = FakeStore(pending)
        request = self.message()
        answer = run_check(check, request)
        answer.cancel()
        self.failureResultOf(answer)
        check.decided(request, Action.parse("DEFER_IF_PERMIT Service temporarily unavailable"))
        self.assertEqual(check.store.released, [])
        pending.callback(Consumption(True, (1,)))
        self.assertEqual(len(check.store.released), 1)

    def test_refuse_early(self) -> None:
        """
        With refuse_early, a sender whose window is already full is refused
        at RCPT (before sending the message); RCPT never counts anything.
        """
        check = self.make(refuse_early=True, limits=[{"period": "hour", "max": 2}])
        for _ in range(3):
            self.assertEqual(self.send(check, self.message("rcpt")).verb, "DUNNO")
        self.assertEqual(self.verbs(check, 2), ["DUNNO", "DUNNO"])
        with capturedLogs() as events:
            action = self.send(check, self.message("rcpt"))
        self.assertEqual(str(action), "DEFER 4.7.1 Sending quota exceeded (hour: 2 messages)")
        [event] = [e for e in events if e.get("log_level").name == "warn"]
        self.assertEqual((event["count"], event["amount"], event["max"]), (2, 1, 2))
        self.assertEqual(self.send(check, self.message("rcpt", sasl_username="bob")).verb, "DUNNO")

    def test_refuse_early_off(self) -> None:
        """
        Without refuse_early, RCPT passes even when the window is full.
        """
        check = self.make(limits=[{"period": "hour", "max": 0}])
        self.assertEqual(self.send(check, self.message("rcpt")).verb, "DUNNO")

    def test_time_offset(self) -> None:
        """
        time_offset moves the clock the windows use.
        """
        check = self.make(time_offset=86400.0)
        self.assertEqual(check.now(), START + 86400)

    def test_configuration_errors(self) -> None:
        """
        Mistakes in the table are reported with the key.
        """
        cases = [
            ({"key": ["nobody"]}, "key"),
            ({"unit": "furlongs"}, "unit"),
            ({"limits": []}, "limits"),
            ({"limits": [{"period": "week", "max": 1}]}, "limits"),
            ({"limits": [{"period": "day", "max": 1, "reset": "25:00"}]}, "limits"),
            ({"limits": [{"period": "sliding", "max": 1}]}, "limits"),
            ({"limits": [{"period": "hour", "max": 1}, {"period": "hour", "max": 2}]}, "limits"),
            ({"limits": [{"period": "hour", "max": 1, "bogus": 1}]}, "limits"),
            ({"timezone": "Mars/Olympus"}, "timezone"),
            ({"stage": "RCPT"}, "stage"),
            ({"key": ["recipient_domain"]}, "key"),
            ({"action": "DEFER {nope}"}, "action"),
            ({"action": "FROB"}, "action"),
            ({"overrides": "/nonexistent/overrides"}, "overrides"),
            ({"refuse_early": True, "stage": "RCPT", "unit": "recipients"}, "refuse_early"),
        ]
        for table, key in cases:
            error = self.assertRaises(ConfigError, self.make, **table)
            self.assertIn(f"key '{key}'", str(error), table)


class FakeStore:
    """
    A store whose consume answers with a given Deferred, recording
    releases.
    """

    name = "fake"

    def __init__(self, result: Deferred[Consumption]) -> None:
        self.result = result
        self.released: list[Any] = []

    def consume(
        self, counters: Any, amount: int, now: float, once: Any = None
    ) -> Deferred[Consumption]:
        return self.result

    def release(self, counters: Any, amount: int, now: float, once: Any = None) -> Deferred[None]:
        self.released.append((counters, amount))
        return succeed(None)


class WindowMemoTests(CheckTestCase):
    """
    A window reuses the span or buckets it computed last while the time
    stays in them; the keys are exactly those computed afresh.
    """

    def test_memo_matches_fresh_computation(self) -> None:
        """
        Across DST changes (whole-hour, half-hour and Lord Howe's 30-minute
        one), every 7 minutes for two days, forwards and then at random
        times: the memoized counter equals a fresh window's.
        """
        import random
        from zoneinfo import ZoneInfo

        # Around 2026-03-29 (Europe), 2026-04-05 (Lord Howe), 2026-03-08
        # (Newfoundland) and 2026-10-25 (Europe, back).
        moments = [1774742400.0, 1775311200.0, 1772928000.0, 1792886400.0]
        zones = ["UTC", "Europe/Berlin", "Australia/Lord_Howe", "America/St_Johns"]
        rng = random.Random(6)
        for zone_name in zones:
            zone = ZoneInfo(zone_name)
            windows = [
                Window("hour", "hour", 10, zone),
                Window("day", "day", 10, zone, reset=2 * 3600 + 30 * 60),
                Window("10m", "sliding", 10, zone, seconds=600, precision=7),
            ]
            for moment in moments:
                times = [moment - 86400 + step * 420.0 for step in range(412)]
                times += rng.sample(times, 100)
                for window in windows:
                    for now in times:
                        fresh = Window(
                            window.name,
                            window.period,
                            window.maximum,
                            window.zone,
                            window.reset,
                            window.seconds,
                            window.precision,
                        )
                        self.assertEqual(
                            window.counter("q:{x}", now, 5),
                            fresh.counter("q:{x}", now, 5),
                            (zone_name, window.name, now),
                        )
