"""
Tests for shadow checks (C{shadow = true}) in L{pfxpold.chain}: their
verdicts are logged and counted beside the real answer, never change it,
never delay it, and keep their state apart.
"""

import tomllib

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.chain import SHADOW, ChainEntry, CheckChain, Decision, ErrorPolicy
from pfxpold.config import ConfigError, load_document
from pfxpold.interfaces import ICheck
from pfxpold.metrics import Metrics
from pfxpold.testing import make_request
from tests.unit.test_chain import Answer, Raises


@implementer(ICheck)
class Waiting:
    """A check answering with a Deferred the test fires, one per call."""

    def __init__(self):
        self.calls = []

    def check(self, request):
        cancelled = []
        waiting = Deferred(lambda d: cancelled.append(True))
        self.calls.append((waiting, cancelled))
        return waiting


def shadow_chain(*checks, clock=None, on_deadline="known", parallel=False):
    """
    A chain of C{(name, check, mode)} or C{(name, check, mode, timeout)}
    tuples, every on_error skip.
    """
    entries = []
    for item in checks:
        name, check, mode = item[:3]
        timeout = item[3] if len(item) > 3 else 10.0
        entries.append(ChainEntry(name, check, timeout, ErrorPolicy.parse("skip"), mode))
    return CheckChain(
        entries,
        default_action=None,
        deadline=20.0,
        deadline_policy=ErrorPolicy.parse_deadline(on_deadline),
        clock=clock if clock is not None else Clock(),
        parallel=parallel,
    )


def messages(events):
    return [formatEvent(event) for event in events]


class ShadowVerdictTests(SynchronousTestCase):
    """
    What a shadow check's verdict does: nothing to the answer, a log event
    and a count.
    """

    def test_would_have_answered(self):
        """
        A decisive shadow verdict different from the answer is logged as
        "would have answered X, answered Y", and the answer is the
        enforcing checks'.
        """
        chain = shadow_chain(
            ("first", Answer("DUNNO"), "enforce"),
            ("new", Answer("REJECT new rule"), SHADOW),
            ("last", Answer("OK"), "enforce"),
        )
        with capturedLogs() as events:
            decision = chain.decide(make_request(client_address="192.0.2.7"))
        self.assertIsInstance(decision, Decision)
        self.assertEqual(str(decision.action), "OK")
        self.assertEqual(decision.decided_by, "last")
        self.assertEqual(decision.shadows, [("new", "REJECT new rule")])
        [line] = [m for m in messages(events) if "shadow" in m]
        self.assertIn("shadow check new would have answered REJECT new rule, answered OK", line)
        self.assertIn("192.0.2.7", line)
        [event] = [e for e in events if e.get("shadow") == "new"]
        self.assertTrue(event["differs"])

    def test_agreeing_verdicts(self):
        """
        A DUNNO, or the very answer, is logged without "would have
        answered": grepping for it finds only the changes.
        """
        chain = shadow_chain(
            ("watch", Answer("DUNNO"), SHADOW),
            ("same", Answer("OK"), SHADOW),
            ("last", Answer("OK"), "enforce"),
        )
        with capturedLogs() as events:
            decision = chain.decide(make_request())
        self.assertEqual(str(decision.action), "OK")
        logged = [m for m in messages(events) if "shadow" in m]
        self.assertEqual(len(logged), 2)
        self.assertFalse([m for m in logged if "would have answered" in m])
        self.assertIn("shadow check watch answered DUNNO, no change to OK", logged[0])

    def test_answer_unchanged_by_shadow(self):
        """
        The same chain with and without a refusing shadow check answers
        the same to every request.
        """
        plain = shadow_chain(("a", Answer("DUNNO"), "enforce"), ("b", Answer("OK"), "enforce"))
        shadowed = shadow_chain(
            ("s1", Answer("REJECT no"), SHADOW),
            ("a", Answer("DUNNO"), "enforce"),
            ("s2", Answer("DEFER later"), SHADOW),
            ("b", Answer("OK"), "enforce"),
            ("s3", Raises(), SHADOW),
        )
        with capturedLogs():
            for state in ("RCPT", "END-OF-MESSAGE"):
                request = make_request(protocol_state=state)
                self.assertEqual(
                    str(shadowed.decide(request).action), str(plain.decide(request).action)
                )

    def test_not_reached(self):
        """
        A shadow check after the deciding check is not run (it would not
        have run deciding); one before it is.
        """
        before, after = Answer("DUNNO"), Answer("DUNNO")
        chain = shadow_chain(
            ("before", before, SHADOW),
            ("refuse", Answer("REJECT no"), "enforce"),
            ("after", after, SHADOW),
        )
        with capturedLogs():
            decision = chain.decide(make_request())
        self.assertEqual(str(decision.action), "REJECT no")
        self.assertEqual((before.calls, after.calls), (1, 0))
        self.assertEqual(decision.shadows, [("before", "DUNNO")])

    def test_every_shadow_without_decider(self):
        """
        Without a decisive check, every shadow check runs, the last ones
        too.
        """
        last = Answer("DUNNO")
        chain = shadow_chain(("a", Answer("DUNNO"), "enforce"), ("last", last, SHADOW))
        with capturedLogs():
            chain.decide(make_request())
        self.assertEqual(last.calls, 1)

    def test_error_never_affects(self):
        """
        A shadow check that raises or returns an invalid action is logged
        and counted; the answer is the enforcing checks'.
        """
        chain = shadow_chain(
            ("broken", Raises(), SHADOW),
            ("invalid", Answer("NOT AN ACTION\x00"), SHADOW),
            ("last", Answer("OK"), "enforce"),
        )
        chain.observer = Metrics(Clock())
        with capturedLogs() as events:
            decision = chain.decide(make_request())
        self.assertEqual(str(decision.action), "OK")
        self.assertEqual(decision.shadows, [("broken", "error"), ("invalid", "error")])
        logged = [m for m in messages(events) if "shadow check" in m]
        self.assertEqual(len(logged), 2)
        self.assertIn("shadow check broken failed (RuntimeError: backend down)", logged[0])
        self.assertIn("the answer OK is unaffected", logged[0])
        self.assertEqual(chain.observer.shadow_verdicts[("broken", "error", "false")], 1)

    def test_escaped(self):
        """
        What the client sent is escaped in the shadow log event.
        """
        chain = shadow_chain(("s", Answer("REJECT x"), SHADOW), ("a", Answer("OK"), "enforce"))
        with capturedLogs() as events:
            chain.decide(make_request(sender="evil\x1b[31m\nx@example.com"))
        [line] = [m for m in messages(events) if "shadow" in m]
        self.assertNotIn("\x1b", line)
        self.assertNotIn("\n", line)

    def test_counted(self):
        """
        Shadow verdicts are counted by check, verb and whether they would
        have changed the answer, apart from the real verdicts.
        """
        chain = shadow_chain(("s", Answer("REJECT x"), SHADOW), ("a", Answer("OK"), "enforce"))
        metrics = Metrics(Clock())
        chain.observer = metrics
        with capturedLogs():
            chain.decide(make_request())
            chain.decide(make_request())
        self.assertEqual(metrics.shadow_verdicts, {("s", "REJECT", "true"): 2})
        self.assertNotIn("s", metrics.checks)
        counters = metrics.snapshot()["counters"]
        self.assertIn(("pfxpold_shadow_verdicts", ("s", "REJECT", "true"), 2), counters)


class ShadowTimingTests(SynchronousTestCase):
    """
    A shadow check never holds the request: the answer is sent while it
    runs, and it is bounded by its own timeout.
    """

    def test_never_delays(self):
        """
        The decision is there at once while the shadow check's Deferred
        is still waiting; its verdict is logged when it comes, beside the
        answer already given.
        """
        slow = Waiting()
        chain = shadow_chain(("slow", slow, SHADOW), ("a", Answer("OK"), "enforce"))
        with capturedLogs() as events:
            decision = chain.decide(make_request())
            self.assertIsInstance(decision, Decision)
            self.assertEqual(str(decision.action), "OK")
            self.assertEqual(decision.shadows, [("slow", "pending")])
            self.assertEqual(chain.shadows_running, 1)
            self.assertFalse([m for m in messages(events) if "shadow" in m])
            slow.calls[0][0].callback("REJECT slow")
        self.assertEqual(chain.shadows_running, 0)
        [line] = [m for m in messages(events) if "shadow" in m]
        self.assertIn("would have answered REJECT slow, answered OK", line)

    def test_after_asynchronous_decision(self):
        """
        When the enforcing checks answer late, the shadow checks start once
        the request is decided, and the decision does not wait for them.
        """
        clock = Clock()
        enforcing, shadow = Waiting(), Waiting()
        chain = shadow_chain(("s", shadow, SHADOW), ("a", enforcing, "enforce"), clock=clock)
        decided = chain.decide(make_request())
        results = []
        decided.addCallback(results.append)
        self.assertEqual(shadow.calls, [])
        enforcing.calls[0][0].callback("OK")
        [decision] = results
        self.assertEqual(str(decision.action), "OK")
        self.assertEqual(len(shadow.calls), 1)
        self.assertEqual(decision.shadows, [("s", "pending")])

    def test_own_timeout(self):
        """
        A shadow check is cancelled after its own timeout, and its timeout
        is logged and counted; the answer was given long before.
        """
        clock = Clock()
        slow = Waiting()
        chain = shadow_chain(
            ("slow", slow, SHADOW, 2.0), ("a", Answer("OK"), "enforce"), clock=clock
        )
        metrics = Metrics(clock)
        chain.observer = metrics
        with capturedLogs() as events:
            chain.decide(make_request())
            clock.advance(1.9)
            self.assertEqual(slow.calls[0][1], [])
            clock.advance(0.1)
        self.assertEqual(slow.calls[0][1], [True])
        self.assertEqual(chain.shadows_running, 0)
        [line] = [m for m in messages(events) if "shadow" in m]
        self.assertIn("shadow check slow failed (TimeoutError", line)
        self.assertEqual(metrics.shadow_verdicts, {("slow", "timeout", "false"): 1})

    def test_late_failure(self):
        """
        A shadow check that fails after the answer is logged, never raised
        as an unhandled error.
        """
        slow = Waiting()
        chain = shadow_chain(("slow", slow, SHADOW), ("a", Answer("OK"), "enforce"))
        with capturedLogs() as events:
            chain.decide(make_request())
            slow.calls[0][0].errback(RuntimeError("late"))
        [line] = [m for m in messages(events) if "shadow" in m]
        self.assertIn("RuntimeError: late", line)

    def test_cancelled_at_stop(self):
        """
        L{CheckChain.cancel_shadows} (called when the daemon stops)
        cancels the shadow checks still running, quietly.
        """
        slow = Waiting()
        chain = shadow_chain(("slow", slow, SHADOW), ("a", Answer("OK"), "enforce"))
        with capturedLogs() as events:
            chain.decide(make_request())
            chain.decide(make_request())
            self.assertEqual(chain.cancel_shadows(), 2)
        self.assertEqual([cancelled for _, cancelled in slow.calls], [[True], [True]])
        self.assertEqual(chain.shadows_running, 0)
        self.assertFalse([m for m in messages(events) if "shadow" in m])
        self.assertFalse(chain._expiries)

    def test_cancellation_of_the_check(self):
        """
        A shadow check whose own Deferred is cancelled by someone else is
        logged as cancelled.
        """
        slow = Waiting()
        chain = shadow_chain(("slow", slow, SHADOW), ("a", Answer("OK"), "enforce"))
        with capturedLogs() as events:
            chain.decide(make_request())
            slow.calls[0][0].errback(CancelledError())
        self.assertIn("CancelledError", [m for m in messages(events) if "shadow" in m][0])


QUOTA = """
[stores.default]
type = "memory"

[[check]]
name = "q"
type = "quota"
shadow = {shadow}
key = ["sasl_username"]
limits = [{{ period = "hour", max = 1 }}]
action = "DEFER over quota"
"""


class ShadowConfigurationTests(SynchronousTestCase):
    """
    C{mode} in the configuration, and the state of shadow checks.
    """

    def load(self, text, previous=None):
        return load_document(tomllib.loads(text), Clock(), "pfxpold.toml", previous)

    def test_mode(self):
        """
        C{shadow = true} makes a shadow entry; enforce is the default.
        """
        configuration = self.load(
            '[[check]]\nname = "a"\ntype = "demo"\n'
            '[[check]]\nname = "b"\ntype = "demo"\nshadow = true\n'
        )
        self.assertEqual([entry.mode for entry in configuration.chain.entries], ["enforce", SHADOW])

    def test_mode_key(self):
        """
        C{mode = "shadow"} makes a shadow entry and C{mode = "enforce"} an
        enforcing one; the check type never sees the key.
        """
        configuration = self.load(
            '[[check]]\nname = "a"\ntype = "demo"\nmode = "enforce"\n'
            '[[check]]\nname = "b"\ntype = "demo"\nmode = "shadow"\n'
            '[[check]]\nname = "c"\ntype = "demo"\nmode = "shadow"\nshadow = true\n'
        )
        self.assertEqual(
            [entry.mode for entry in configuration.chain.entries], ["enforce", SHADOW, SHADOW]
        )

    def test_mode_contradicted(self):
        """
        C{mode} and C{shadow} saying different things is an error naming
        the key, not a guess.
        """
        with self.assertRaises(ConfigError) as raised:
            self.load('[[check]]\nname = "a"\ntype = "demo"\nmode = "shadow"\nshadow = false\n')
        message = str(raised.exception)
        self.assertIn("check 'a': key 'shadow'", message)
        self.assertIn("contradicts mode = 'shadow'", message)

    def test_misspelt_mode(self):
        """
        A C{mode} the chain does not know, on a check type without a mode
        of its own, says what the chain's values are.
        """
        with self.assertRaises(ConfigError) as raised:
            self.load('[[check]]\nname = "a"\ntype = "demo"\nmode = "shadw"\n')
        message = str(raised.exception)
        self.assertIn("check 'a': key 'mode'", message)
        self.assertIn("must be 'enforce' or 'shadow'", message)
        self.assertNotIn("\n", message)

    def test_bad_mode(self):
        """
        Anything but a boolean is a one-line error naming the file, the
        check and the key.
        """
        with self.assertRaises(ConfigError) as raised:
            self.load('[[check]]\nname = "a"\ntype = "demo"\nshadow = "yes"\n')
        message = str(raised.exception)
        self.assertIn("pfxpold.toml: check 'a': key 'shadow'", message)
        self.assertIn("true or false", message)
        self.assertNotIn("\n", message)

    def test_state_apart(self):
        """
        A shadow quota counts under keys that say so, and its counts are
        not the enforcing check's: switching it to enforce (one word)
        starts from nothing, on the very same store.
        """
        shadow = self.load(QUOTA.format(shadow="true"))
        [entry] = shadow.chain.entries
        self.assertTrue(entry.check.key_prefix().startswith("quota:{shadow:q:"))
        requests = [make_request("eod", sasl_username="alice", instance=f"m{n}") for n in range(4)]
        with capturedLogs() as events:
            for request in requests[:2]:
                self.assertEqual(str(shadow.chain.decide(request).action), "DUNNO")
        logged = [m for m in messages(events) if "would have answered" in m]
        self.assertEqual(len(logged), 1)
        self.assertIn("would have answered DEFER over quota, answered DUNNO", logged[0])
        enforcing = self.load(QUOTA.format(shadow="false"), previous=shadow)
        [entry] = enforcing.chain.entries
        self.assertIsNot(entry.check, shadow.chain.entries[0].check)
        self.assertIs(entry.check.store, shadow.chain.entries[0].check.store)
        self.assertEqual(entry.check.key_prefix(), "quota:{q:")
        self.assertEqual(str(enforcing.chain.decide(requests[2]).action), "DUNNO")
        self.assertEqual(str(enforcing.chain.decide(requests[3]).action), "DEFER over quota")

    def test_rules_marks_apart(self):
        """
        A shadow rules check keeps its marks under another key than an
        enforcing one's.
        """
        text = (
            '[[check]]\nname = "r"\ntype = "rules"\nshadow = {shadow}\n'
            '[[check.rule]]\nname = "m"\nif = {{ sender = "a@example.com" }}\nmark = "seen"\n'
        )
        try:
            shadow = self.load(text.format(shadow="true"))
        except ConfigError as e:
            self.fail(str(e))
        enforcing = self.load(text.format(shadow="false"))
        self.assertEqual(shadow.chain.entries[0].check.mark_prefix, "shadow:")
        self.assertEqual(enforcing.chain.entries[0].check.mark_prefix, "")
        self.assertTrue(shadow.chain.entries[0].check.writes_state)

    def test_on_deadline(self):
        """
        C{on_deadline} is C{"known"} unless set; an action or noreply keeps
        the old behaviour; skip is refused naming the key.
        """
        check = '[[check]]\nname = "a"\ntype = "demo"\n'
        self.assertEqual(self.load(check).chain.deadline_policy.kind, "known")
        old = self.load('[server]\non_deadline = "DEFER late"\n' + check)
        self.assertEqual(str(old.chain.deadline_policy.action), "DEFER late")
        with self.assertRaises(ConfigError) as raised:
            self.load('[server]\non_deadline = "skip"\n' + check)
        self.assertIn("[server] key 'on_deadline'", str(raised.exception))

    def test_parallel(self):
        """
        C{[server] parallel} is off unless set, and must be a boolean.
        """
        check = '[[check]]\nname = "a"\ntype = "demo"\n'
        self.assertFalse(self.load(check).chain.parallel)
        self.assertTrue(self.load("[server]\nparallel = true\n" + check).chain.parallel)
        with self.assertRaises(ConfigError) as raised:
            self.load('[server]\nparallel = "yes"\n' + check)
        self.assertIn("[server] key 'parallel'", str(raised.exception))


#: The Deferreds of L{PendingShadow} checks, with whether each was cancelled.
PENDING = []


@implementer(ICheck)
class PendingShadow:
    """A check type answering with a Deferred nobody fires."""

    def __init__(self, options):
        pass

    def check(self, request):
        cancelled = []
        PENDING.append((Deferred(lambda d: cancelled.append(True)), cancelled))
        return PENDING[-1][0]


class ShadowStopTests(SynchronousTestCase):
    """
    The daemon's stop cancels the shadow work still running.
    """

    def test_cancelled_when_stopping(self):
        """
        A request answered while its shadow check runs; stopping the daemon
        cancels the shadow check and says so, and the stop completes.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from pfxpold.service import PolicyService
        from tests.unit.test_service import FakeResource

        del PENDING[:]
        reactor = MemoryReactorClock()
        configuration = load_document(
            {
                "server": {"listen": ["tcp:7102:interface=127.0.0.1"], "log_requests": False},
                "check": [
                    {"name": "watch", "type": f"{__name__}.PendingShadow", "shadow": True},
                    {"name": "demo", "type": "demo"},
                ],
            },
            reactor,
        )
        service = PolicyService(configuration, reactor)
        service.resource_module = FakeResource(1024, 1024)
        with capturedLogs() as events:
            service.privilegedStartService()
            service.startService()
            protocol = service.factory.buildProtocol(None)
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
            protocol.makeConnection(transport)
            protocol.dataReceived(b"request=smtpd_access_policy\nsender=a@b\n\n")
            self.assertIn(b"action=", transport.value())
            [(_, cancelled)] = PENDING
            self.assertEqual(cancelled, [])
            stopped = service.stopService()
            protocol.connectionLost(None)
            self.successResultOf(stopped)
        self.assertEqual(cancelled, [True])
        self.assertTrue([e for e in events if "cancelled the shadow checks" in formatEvent(e)])
