"""
Tests for L{pfxpold.metrics}: what is counted on the way through the
protocol and the chain, how processes add up, and what a scrape shows.
Every registry here is a fresh one, never prometheus_client's global one.
"""

from __future__ import annotations

import json
import os

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pfxpold import config, metrics
from pfxpold.action import Action
from pfxpold.chain import ChainEntry, CheckChain, Decision, ErrorPolicy
from pfxpold.config import ConfigError, load_document
from pfxpold.interfaces import ICheck, IStateStore
from pfxpold.protocol import PolicyFactory
from pfxpold.service import PolicyService
from pfxpold.state import Consumption
from pfxpold.tap import Options
from pfxpold.testing import make_request
from tests.unit.tempdir import temporary_directory

DEFER = "DEFER_IF_PERMIT Service temporarily unavailable"


@implementer(ICheck)
class Answer:
    """Answers what it is given; C{seconds} of the clock pass while it runs."""

    def __init__(self, result, clock=None, seconds=0.0):
        self.result = result
        self.clock = clock
        self.seconds = seconds

    def check(self, request):
        if self.clock is not None:
            self.clock.advance(self.seconds)
        result = self.result
        if isinstance(result, Exception):
            raise result
        return result() if callable(result) else result


@implementer(IStateStore)
class FakeStore:
    """A store whose operations answer with what the test gives."""

    name = "stores.main"

    def __init__(self):
        self.outcome = succeed(Consumption(True, (1,)))

    def consume(self, counters, amount, now):
        return self.outcome

    def release(self, counters, amount, now):
        return succeed(None)

    def greylist(self, triplet, client, now, delay, retry_window, lifetime, whitelist_after):
        return succeed(None)

    def expire(self, now):
        return succeed(0)

    # What pfxpold-admin asks of a store: not timed, passed through.

    def counters(self, keys, now):
        return succeed({})

    def reset(self, keys):
        return succeed(0)

    def reset_prefix(self, prefix):
        return succeed(0)

    def greylist_entries(self, prefix, now, network=None, sender=None, recipient=None):
        return succeed([])

    def delete_greylist(self, keys):
        return succeed(0)

    def whitelist_add(self, entry):
        return succeed(None)

    def whitelist_remove(self, kind, value):
        return succeed(False)

    def whitelist_list(self):
        return succeed([])

    def set_mark(self, key, mark, expires_at):
        return succeed(None)

    def marks(self, key, now):
        return succeed(frozenset())


@implementer(ICheck)
class StoreCheck:
    """Uses a store, as the quota and greylist checks do."""

    def __init__(self, store):
        self.store = store

    def check(self, request):
        return self.store.consume((), 1, 0.0).addCallback(lambda consumption: "DUNNO")


def make_chain(*checks, clock, deadline=20.0):
    """
    A chain of (name, check, timeout, on_error) tuples.
    """
    return CheckChain(
        [
            ChainEntry(name, check, timeout, ErrorPolicy.parse(on_error))
            for name, check, timeout, on_error in checks
        ],
        default_action=None,
        deadline=deadline,
        deadline_policy=ErrorPolicy.parse(DEFER),
        clock=clock,
    )


def samples(counted):
    """
    What a scrape of a fresh registry over C{counted} shows, parsed by
    prometheus_client's parser: C{{(sample name, frozenset(labels)): value}}.
    """
    text = generate_latest(metrics.registry(counted)).decode("utf-8")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found, name, **labels):
    return found.get((name, frozenset(labels.items())))


class Served:
    """
    A factory with metrics attached, and a connection to it.
    """

    def __init__(self, chain, clock):
        self.clock = clock
        self.factory = PolicyFactory(chain, clock, log_requests=False)
        self.metrics = metrics.Metrics(clock)
        self.metrics.attach(self.factory)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        self.protocol = self.factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def send(self, **attributes):
        request = make_request(**attributes)
        self.protocol.dataReceived(
            b"".join(f"{k}={v}\n".encode() for k, v in request.items()) + b"\n"
        )


class CountingTests(SynchronousTestCase):
    """
    What the protocol and the chain count.
    """

    def setUp(self):
        self.clock = Clock()

    def test_requests_by_stage_action_and_check(self):
        """
        Answers are counted by SMTP stage, action verb and deciding check,
        and their latency observed.
        """
        senders = {"good@example.com": "OK", "bad@example.com": "REJECT no"}
        check = Answer(lambda: senders.get(self.current, "DUNNO"), self.clock, 0.002)
        served = Served(make_chain(("map", check, 10.0, "skip"), clock=self.clock), self.clock)
        for sender, times in (("good@example.com", 4), ("bad@example.com", 2), ("x@y", 1)):
            for _ in range(times):
                self.current = sender
                served.send(sender=sender)
        self.current = "good@example.com"
        served.send(protocol_state="data")
        found = samples(served.metrics)
        self.assertEqual(
            value(found, "pfxpold_requests_total", protocol_state="RCPT", action="OK", check="map"),
            4,
        )
        self.assertEqual(
            value(
                found, "pfxpold_requests_total", protocol_state="RCPT", action="REJECT", check="map"
            ),
            2,
        )
        self.assertEqual(
            value(
                found,
                "pfxpold_requests_total",
                protocol_state="RCPT",
                action="DUNNO",
                check="default",
            ),
            1,
        )
        self.assertEqual(
            value(found, "pfxpold_requests_total", protocol_state="DATA", action="OK", check="map"),
            1,
        )
        self.assertEqual(value(found, "pfxpold_request_duration_seconds_count"), 8)
        self.assertAlmostEqual(value(found, "pfxpold_request_duration_seconds_sum"), 0.016)
        # 2 ms: above the 1 ms bucket, within the 2.5 ms one.
        self.assertEqual(value(found, "pfxpold_request_duration_seconds_bucket", le="0.001"), 0)
        self.assertEqual(value(found, "pfxpold_request_duration_seconds_bucket", le="0.0025"), 8)
        self.assertEqual(value(found, "pfxpold_check_duration_seconds_count", check="map"), 8)
        self.assertEqual(value(found, "pfxpold_check_verdicts_total", check="map", verdict="OK"), 5)
        self.assertEqual(
            value(found, "pfxpold_check_verdicts_total", check="map", verdict="DUNNO"), 1
        )
        self.assertEqual(value(found, "pfxpold_connections"), 1)
        self.assertEqual(value(found, "pfxpold_requests_in_flight"), 0)

    def test_unknown_stage_and_noreply(self):
        """
        A protocol_state Postfix never sends is counted as "other" (a client
        cannot make up label values), and an answer without a reply as
        "noreply".
        """
        check = Answer(ValueError("broken"))
        served = Served(make_chain(("c", check, 10.0, "noreply"), clock=self.clock), self.clock)
        with capturedLogs():
            served.send(protocol_state="made-up-" + "x" * 50)
        self.flushLoggedErrors(ValueError)
        found = samples(served.metrics)
        self.assertEqual(
            value(
                found, "pfxpold_requests_total", protocol_state="other", action="noreply", check="c"
            ),
            1,
        )
        self.assertEqual(
            value(found, "pfxpold_check_errors_total", check="c", kind="ValueError"), 1
        )
        self.assertEqual(
            value(found, "pfxpold_check_on_error_total", check="c", applied="noreply"), 1
        )

    def test_errors_and_on_error(self):
        """
        A failing check is counted by its exception's class and the on_error
        applied (skip, or the answer's verb); an invalid action by its kind.
        """
        chain = make_chain(
            ("first", Answer(RuntimeError("down")), 10.0, "skip"),
            ("second", Answer("NOT AN ACTION!"), 10.0, "skip"),
            ("third", Answer(KeyError("k")), 10.0, DEFER),
            clock=self.clock,
        )
        served = Served(chain, self.clock)
        with capturedLogs():
            served.send()
        self.flushLoggedErrors(RuntimeError, KeyError)
        found = samples(served.metrics)
        self.assertEqual(
            value(found, "pfxpold_check_errors_total", check="first", kind="RuntimeError"), 1
        )
        self.assertEqual(
            value(found, "pfxpold_check_on_error_total", check="first", applied="skip"), 1
        )
        self.assertEqual(
            value(found, "pfxpold_check_errors_total", check="second", kind="invalid_action"), 1
        )
        self.assertEqual(
            value(found, "pfxpold_check_errors_total", check="third", kind="KeyError"), 1
        )
        self.assertEqual(
            value(found, "pfxpold_check_on_error_total", check="third", applied="DEFER_IF_PERMIT"),
            1,
        )
        self.assertEqual(
            value(
                found,
                "pfxpold_requests_total",
                protocol_state="RCPT",
                action="DEFER_IF_PERMIT",
                check="third",
            ),
            1,
        )
        for name in ("first", "second", "third"):
            self.assertEqual(value(found, "pfxpold_check_duration_seconds_count", check=name), 1)

    def test_timeout_and_deadline(self):
        """
        A check that does not answer within its timeout is counted as a
        timeout, with its on_error; one still waited for when the request's
        deadline passes, as "deadline", and its latency is observed either
        way.
        """
        slow = Answer(lambda: Deferred())
        chain = make_chain(
            ("slow", slow, 1.0, "skip"),
            ("slower", slow, 10.0, "skip"),
            clock=self.clock,
            deadline=3.0,
        )
        served = Served(chain, self.clock)
        with capturedLogs():
            served.send()
            self.clock.advance(1.0)
            self.clock.advance(2.0)
        found = samples(served.metrics)
        self.assertEqual(
            value(found, "pfxpold_check_errors_total", check="slow", kind="timeout"), 1
        )
        self.assertEqual(
            value(found, "pfxpold_check_on_error_total", check="slow", applied="skip"), 1
        )
        self.assertEqual(
            value(found, "pfxpold_check_errors_total", check="slower", kind="deadline"), 1
        )
        self.assertIsNone(
            value(found, "pfxpold_check_on_error_total", check="slower", applied="skip")
        )
        self.assertEqual(value(found, "pfxpold_check_duration_seconds_sum", check="slow"), 1.0)
        self.assertEqual(value(found, "pfxpold_check_duration_seconds_sum", check="slower"), 2.0)
        self.assertEqual(
            value(
                found,
                "pfxpold_requests_total",
                protocol_state="RCPT",
                action="DEFER_IF_PERMIT",
                check="deadline",
            ),
            1,
        )

    def test_asynchronous_answer(self):
        """
        A check answering later is timed from its start to its answer.
        """
        waiting = Deferred()
        chain = make_chain(("later", Answer(lambda: waiting), 10.0, "skip"), clock=self.clock)
        served = Served(chain, self.clock)
        served.send()
        self.assertEqual(samples(served.metrics)[("pfxpold_requests_in_flight", frozenset())], 1)
        self.clock.advance(0.25)
        waiting.callback("REJECT later")
        found = samples(served.metrics)
        self.assertEqual(
            value(found, "pfxpold_check_verdicts_total", check="later", verdict="REJECT"), 1
        )
        self.assertEqual(value(found, "pfxpold_check_duration_seconds_sum", check="later"), 0.25)
        self.assertEqual(value(found, "pfxpold_request_duration_seconds_sum"), 0.25)
        self.assertEqual(value(found, "pfxpold_requests_in_flight"), 0)

    def test_violations(self):
        """
        A connection closed for breaking a limit is counted by the limit's
        kind, a request timeout included.
        """
        chain = make_chain(("c", Answer("OK"), 10.0, "skip"), clock=self.clock)
        served = Served(chain, self.clock)
        with capturedLogs():
            served.protocol.dataReceived(b"not a name value line\n")
            # What the reactor does once the aborted connection is gone.
            served.protocol.connectionLost(None)
            second = served.factory.buildProtocol(None)
            second.makeConnection(StringTransport())
            second.dataReceived(b"sender=a@b\n")
            self.clock.advance(60)
        found = samples(served.metrics)
        self.assertEqual(value(found, "pfxpold_limit_violations_total", kind="not_name_value"), 1)
        self.assertEqual(value(found, "pfxpold_limit_violations_total", kind="request_timeout"), 1)

    def test_off_calls_nothing(self):
        """
        Without metrics, neither the factory nor the chain has anything to
        call, and the chain reads no clock for checks.
        """
        clock = Clock()
        seconds = []
        clock.seconds = lambda: seconds.append(1) or 0.0
        chain = make_chain(("c", Answer("OK"), 10.0, "skip"), clock=clock)
        factory = PolicyFactory(chain, clock, log_requests=False)
        self.assertIsNone(factory.metrics)
        self.assertIsNone(chain.observer)
        self.assertEqual(chain.decide(make_request()).action, Action("OK"))
        self.assertEqual(seconds, [])

    def test_reload_keeps_figures(self):
        """
        Figures are kept by check name: after a new chain is instrumented
        and swapped in, its checks count on where the old ones stopped.
        """
        served = Served(make_chain(("c", Answer("OK"), 10.0, "skip"), clock=self.clock), self.clock)
        served.send()
        new_chain = make_chain(("c", Answer("OK"), 10.0, "skip"), clock=self.clock)
        served.metrics.instrument(new_chain)
        served.factory.decider = new_chain
        served.send()
        found = samples(served.metrics)
        self.assertEqual(value(found, "pfxpold_check_verdicts_total", check="c", verdict="OK"), 2)
        self.assertIs(new_chain.observer, served.metrics)


class StoreTests(SynchronousTestCase):
    """
    Store operations, timed through L{metrics.TimedStore}.
    """

    def test_timed(self):
        """
        The checks' store is wrapped once per store; its operations are
        timed and their failures counted by class, and the wrapper is still
        a store with the store's name.
        """
        clock = Clock()
        store = FakeStore()
        first, second = StoreCheck(store), StoreCheck(store)
        chain = make_chain(
            ("quota", first, 10.0, "skip"), ("greylist", second, 10.0, "skip"), clock=clock
        )
        counted = metrics.Metrics(clock)
        counted.instrument(chain)
        self.assertIsInstance(first.store, metrics.TimedStore)
        self.assertIs(first.store, second.store)
        self.assertTrue(verifyObject(IStateStore, first.store))
        self.assertEqual(first.store.name, "stores.main")
        later = Deferred()
        store.outcome = later
        result = first.store.consume((), 1, 0.0)
        clock.advance(0.5)
        later.callback(Consumption(True, (1,)))
        self.assertEqual(self.successResultOf(result), Consumption(True, (1,)))
        store.outcome = fail(ConnectionError("gone"))
        self.failureResultOf(first.store.consume((), 1, 0.0), ConnectionError)
        found = samples(counted)
        self.assertEqual(
            value(
                found,
                "pfxpold_store_operation_duration_seconds_count",
                store="stores.main",
                operation="consume",
            ),
            2,
        )
        self.assertEqual(
            value(
                found,
                "pfxpold_store_operation_duration_seconds_sum",
                store="stores.main",
                operation="consume",
            ),
            0.5,
        )
        self.assertEqual(
            value(
                found,
                "pfxpold_store_errors_total",
                store="stores.main",
                operation="consume",
                kind="ConnectionError",
            ),
            1,
        )
        # Instrumenting again does not wrap twice.
        counted.instrument(chain)
        self.assertIs(first.store.store, store)


class Client:
    """A store client that is connected or not."""

    connected = True


class DNSList:
    """What the dnsbl check's lists look like to metrics."""

    def __init__(self, zone, skip_until):
        self.zone = zone
        self.skip_until = skip_until


@implementer(ICheck)
class Backends:
    """A check with a connection, a store with a client and DNS lists."""

    def __init__(self, store):
        self.connected = False
        self.store = store
        self.lists = [DNSList("a.example", 0.0), DNSList("b.example", 100.0)]

    def check(self, request):
        return "DUNNO"


class GaugeTests(SynchronousTestCase):
    """
    Gauges read when scraped.
    """

    def test_backends(self):
        """
        A check's connection, its store's connection and its DNS lists'
        circuit breakers are shown as they are at scrape time.
        """
        clock = Clock()
        clock.advance(50)
        store = FakeStore()
        store.client = Client()
        check = Backends(store)
        served = Served(make_chain(("dir", check, 10.0, "skip"), clock=clock), clock)
        found = samples(served.metrics)
        self.assertEqual(value(found, "pfxpold_backend_connected", backend="dir"), 0)
        self.assertEqual(value(found, "pfxpold_backend_connected", backend="stores.main"), 1)
        self.assertEqual(
            value(found, "pfxpold_circuit_breaker_open", check="dir", target="a.example"), 0
        )
        self.assertEqual(
            value(found, "pfxpold_circuit_breaker_open", check="dir", target="b.example"), 1
        )
        check.connected = True
        clock.advance(100)
        found = samples(served.metrics)
        self.assertEqual(value(found, "pfxpold_backend_connected", backend="dir"), 1)
        self.assertEqual(
            value(found, "pfxpold_circuit_breaker_open", check="dir", target="b.example"), 0
        )

    def test_ldap_connected(self):
        """
        The ldap check says whether its directory connection is bound.
        """
        from tests.unit.test_ldap import make_check

        check, _ = make_check()
        self.assertIs(check.connected, False)
        with capturedLogs():
            check._bound(None)
            self.assertIs(check.connected, True)
            check._lost(Failure(ConnectionError("gone")))
        self.assertIs(check.connected, False)

    def test_request_log_lost(self):
        """
        The request log's lost lines are shown.
        """
        clock = Clock()
        served = Served(make_chain(("c", Answer("OK"), 10.0, "skip"), clock=clock), clock)
        self.assertIsNone(value(samples(served.metrics), "pfxpold_request_log_lost_lines_total"))

        class RequestLog:
            dropped = 17

        served.factory.request_log = RequestLog()
        self.assertEqual(value(samples(served.metrics), "pfxpold_request_log_lost_lines_total"), 17)

    def test_reloads_and_build_info(self):
        """
        A watched reload object's counts and time are read at each scrape,
        missing attributes as none; the version is in the build info.
        """
        counted = metrics.Metrics(Clock())
        self.assertIsNone(value(samples(counted), "pfxpold_reloads_total", result="succeeded"))

        class Reloads:
            reloads_succeeded = 3

        reloads = Reloads()
        counted.watch_reloads(reloads)
        found = samples(counted)
        self.assertEqual(value(found, "pfxpold_reloads_total", result="succeeded"), 3)
        self.assertEqual(value(found, "pfxpold_reloads_total", result="failed"), 0)
        self.assertNotIn(("pfxpold_last_reload_timestamp_seconds", frozenset()), found)
        reloads.reloads_failed = 1
        reloads.last_reload_time = 1700000000.5
        found = samples(counted)
        self.assertEqual(value(found, "pfxpold_reloads_total", result="failed"), 1)
        self.assertEqual(value(found, "pfxpold_last_reload_timestamp_seconds"), 1700000000.5)
        [(labels, one)] = [
            (labels, v) for (name, labels), v in found.items() if name == "pfxpold_build_info"
        ]
        self.assertEqual(one, 1)
        self.assertIn(("version", metrics.__version__), labels)


class MergeTests(SynchronousTestCase):
    """
    Adding up the processes' snapshots.
    """

    def test_merge(self):
        """
        Counters and histograms of every snapshot add up, those of exited
        workers included; gauges only of live ones, by their family's rule.
        """
        histogram = [1] + [0] * len(metrics.DURATION_BUCKETS)
        snapshots = [
            {
                "pid": 1,
                "counters": [["pfxpold_requests", ["RCPT", "OK", "map"], 5]],
                "histograms": [["pfxpold_request_duration_seconds", [], histogram, 0.5]],
                "gauges": [
                    ["pfxpold_connections", [], 3],
                    ["pfxpold_backend_connected", ["stores.main"], 1],
                    ["pfxpold_circuit_breaker_open", ["bl", "z"], 0],
                ],
            },
            {
                "pid": 2,
                "counters": [["pfxpold_requests", ["RCPT", "OK", "map"], 7]],
                "histograms": [["pfxpold_request_duration_seconds", [], histogram, 0.25]],
                "gauges": [
                    ["pfxpold_connections", [], 4],
                    ["pfxpold_backend_connected", ["stores.main"], 0],
                    ["pfxpold_circuit_breaker_open", ["bl", "z"], 1],
                ],
            },
            {
                "pid": 3,
                "counters": [["pfxpold_requests", ["RCPT", "OK", "map"], 11]],
                "gauges": [["pfxpold_connections", [], 100]],
            },
        ]
        merged = metrics.merge(snapshots, live=lambda pid: pid in (1, 2))
        self.assertEqual(merged["pfxpold_requests"], {("RCPT", "OK", "map"): 23})
        self.assertEqual(
            merged["pfxpold_request_duration_seconds"][()], [[2] + histogram[1:], 0.75]
        )
        self.assertEqual(merged["pfxpold_connections"], {(): 7})
        self.assertEqual(merged["pfxpold_backend_connected"], {("stores.main",): 0})
        self.assertEqual(merged["pfxpold_circuit_breaker_open"], {("bl", "z"): 1})

    def test_snapshot_is_json(self):
        """
        A snapshot survives JSON (how workers hand theirs to the parent)
        and merges to the same figures.
        """
        clock = Clock()
        served = Served(make_chain(("c", Answer("OK"), 10.0, "skip"), clock=clock), clock)
        served.send()
        snapshot = served.metrics.snapshot()
        again = json.loads(json.dumps(snapshot))
        everyone = lambda pid: True  # noqa: E731
        self.assertEqual(metrics.merge([snapshot], everyone), metrics.merge([again], everyone))


class WorkerTests(SynchronousTestCase):
    """
    Workers' snapshots, written and read back.
    """

    def test_written_and_read(self):
        """
        A worker writes its snapshot every second and when it stops; the
        parent's directory reads it, and its gauges count while the worker
        runs.
        """

        class Worker:
            pid = 4242
            ended = Deferred()

        class Pool:
            workers = {1: Worker()}

        self.patch(os, "environ", {})
        gathered = metrics.WorkerSnapshots(Pool())
        gathered.startService()
        directory = gathered.directory
        self.assertEqual(os.environ[metrics.WORKERS_DIRECTORY], directory)
        clock = Clock()
        served = Served(make_chain(("c", Answer("OK"), 10.0, "skip"), clock=clock), clock)
        writer = metrics.SnapshotWriter(served.metrics, directory, clock)
        writer.startService()
        served.send()
        self.assertEqual(len(gathered.read()), 1)
        self.assertEqual(gathered.read()[0]["counters"], [])
        clock.advance(metrics.SNAPSHOT_INTERVAL)
        [snapshot] = gathered.read()
        self.assertIn(["pfxpold_requests", ["RCPT", "OK", "c"], 1], snapshot["counters"])
        served.send()
        writer.stopService()
        [snapshot] = gathered.read()
        self.assertIn(["pfxpold_requests", ["RCPT", "OK", "c"], 2], snapshot["counters"])
        live = gathered.live_with(os.getpid())
        self.assertTrue(live(4242))
        self.assertTrue(live(os.getpid()))
        self.assertFalse(live(4243))
        stopped = gathered.stopService()
        self.assertNotIn(metrics.WORKERS_DIRECTORY, os.environ)
        # Removed only once the workers have ended.
        self.assertTrue(os.path.isdir(directory))
        self.assertNoResult(stopped)
        Worker.ended.callback(None)
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(directory))
        self.assertEqual(gathered.read(), [])

    def test_worker_service(self):
        """
        A worker (adopted sockets) with [metrics] does not listen for
        scrapes: it writes snapshots where its parent said, or counts
        nothing when its parent named no directory.
        """
        reactor = MemoryReactorClock()
        configuration = load_document(
            {
                "metrics": {"listen": "tcp:9101:interface=127.0.0.1"},
                "check": [{"name": "demo", "type": "demo"}],
            },
            reactor,
        )
        adopted = [TCP4ServerEndpoint(reactor, 0)]
        self.patch(os, "environ", {})
        service = PolicyService(configuration, reactor, adopted=adopted)
        self.assertIsNone(service.metrics)
        directory = temporary_directory(self)
        self.patch(os, "environ", {metrics.WORKERS_DIRECTORY: directory})
        service = PolicyService(configuration, reactor, adopted=adopted)
        self.assertIs(service.factory.metrics, service.metrics)
        self.assertIs(configuration.chain.observer, service.metrics)
        [writer] = [s for s in service.backends if isinstance(s, metrics.SnapshotWriter)]
        self.assertEqual(os.path.dirname(writer.path), directory)
        [listener] = service.listeners
        # Recorded, and wrapped to keep accept errors to a few lines.
        self.assertIs(listener.endpoint._endpoint.endpoint, adopted[0])


class ConfigurationTests(SynchronousTestCase):
    """
    The [metrics] table.
    """

    def load(self, table):
        return load_document(
            {"metrics": table, "check": [{"name": "demo", "type": "demo"}]},
            Clock(),
            "/etc/pfxpold.toml",
        )

    def test_off_without_table(self):
        """
        Without a [metrics] table metrics are off.
        """
        configuration = load_document({"check": [{"name": "demo", "type": "demo"}]}, Clock())
        self.assertIsNone(configuration.metrics_listen)

    def test_listen(self):
        """
        listen is any endpoint string; loopback port 9101 by default.
        """
        self.assertEqual(
            self.load({"listen": "unix:/run/m.sock"}).metrics_listen, "unix:/run/m.sock"
        )
        self.assertEqual(self.load({}).metrics_listen, "tcp:9101:interface=127.0.0.1")

    def test_errors(self):
        """
        Errors name the file, the table and the key.
        """
        for table, message in (
            (
                {"lisen": "tcp:1"},
                "/etc/pfxpold.toml: [metrics] key 'lisen': is not a setting pfxpold knows",
            ),
            (
                {"listen": 9101},
                "/etc/pfxpold.toml: [metrics] key 'listen': must be an endpoint string,"
                " not 9101",
            ),
            ("on", "/etc/pfxpold.toml: [metrics]: must be a table"),
        ):
            error = self.assertRaises(ConfigError, self.load, table)
            self.assertEqual(str(error), message)

    def test_library_missing(self):
        """
        Without prometheus_client, [metrics] is a one-line error naming the
        extra to install.
        """
        self.patch(config.importlib.util, "find_spec", lambda name: None)
        error = self.assertRaises(ConfigError, self.load, {})
        self.assertEqual(
            str(error),
            "/etc/pfxpold.toml: [metrics]: needs the prometheus_client package:"
            " pip install 'pfxpold[metrics]'",
        )

    def test_bad_endpoint(self):
        """
        An endpoint string twistd cannot listen on is a usage error naming
        the table and key.
        """
        path = os.path.join(temporary_directory(self), "p.toml")
        with open(path, "w") as f:
            f.write('[metrics]\nlisten = "nonsense:1"\n[[check]]\nname = "d"\ntype = "demo"\n')
        options = Options(reactor=MemoryReactorClock())
        # One line, as every configuration error: no usage text before it.
        error = self.assertRaises(SystemExit, options.parseOptions, ["--config", path])
        self.assertIn("[metrics] key 'listen': cannot listen on 'nonsense:1'", str(error))
        self.assertNotIn("\n", str(error))


class DecisionTests(SynchronousTestCase):
    """
    L{metrics.Metrics.answered} on its own.
    """

    def test_answered(self):
        """
        The deciding check of a decision is its label, whatever it is.
        """
        clock = Clock()
        counted = metrics.Metrics(clock)
        counted.answered(make_request(), Decision(Action("OK"), "error"), 0.0)
        counted.answered(make_request(), Decision(None, "deadline"), 0.0)
        self.assertEqual(
            counted.requests, {("RCPT", "OK", "error"): 1, ("RCPT", "noreply", "deadline"): 1}
        )


class DocumentationTests(SynchronousTestCase):
    """
    The README's list of series.
    """

    def test_every_family_documented(self):
        """
        Every family pfxpold shows is in the README's Metrics table, with
        the name a scrape shows.
        """
        readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("### Metrics") : text.index("## Configuration")]
        for name, family in metrics.FAMILIES.items():
            shown = name + "_total" if family.kind == "counter" else name
            self.assertIn(f"| `{shown}` |", section)
