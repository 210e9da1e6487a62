"""
Tests for L{pfxpold.service}: start-up order, and a graceful stop that
answers requests in flight before closing connections and stopping
backends.
"""

import os

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.config import load_document
from pfxpold.interfaces import ICheck
from pfxpold.requestlog import BATCH_KEY, EventRequestLog, FileRequestLog
from pfxpold.service import SERVING_GC_THRESHOLD, CollectorTuning, PolicyService

from .tempdir import temporary_directory
from .test_resources import FakeResource

#: What the checks and listeners did, in order, for the test running now.
EVENTS = []


@implementer(ICheck)
class BackendCheck(Service):
    """
    A check with a backend: records when it starts and stops, and answers
    with a Deferred the test fires when the request has C{wait=1}.
    """

    def __init__(self, options):
        self.reactor = options.reactor
        self.waiting = []
        self.tree = None

    def startService(self):
        EVENTS.append(("backend started", self.tree.listeners.running))
        Service.startService(self)

    def stopService(self):
        EVENTS.append(("backend stopped", self.tree.listeners.running))
        return Service.stopService(self)

    def check(self, request):
        if request.get("wait"):
            self.waiting.append(Deferred())
            return self.waiting[-1]
        return "OK"


class ServiceTests(SynchronousTestCase):
    """
    The service tree of a running daemon.
    """

    def setUp(self):
        del EVENTS[:]
        self.reactor = MemoryReactorClock()
        self.configuration = load_document(
            {
                "server": {
                    "listen": ["tcp:7101:interface=127.0.0.1", "unix:/tmp/pfxpold-svc.sock"],
                    "shutdown_grace": 5.0,
                    "log_requests": False,
                },
                "check": [{"name": "backend", "type": f"{__name__}.BackendCheck", "timeout": 30}],
            },
            self.reactor,
        )
        self.service = PolicyService(self.configuration, self.reactor)
        # Not the test process's own open-files limit (tests.unit.test_resources).
        self.service.resource_module = FakeResource(1024, 1024)
        self.check = self.configuration.chain.entries[0].check
        self.check.tree = self.service
        with capturedLogs():
            self.service.privilegedStartService()
            self.service.startService()

    def connect(self):
        protocol = self.service.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        protocol.makeConnection(transport)
        return transport, protocol

    def test_backends_start_before_listeners(self):
        """
        A check providing IService is started before the listeners. The
        ports are bound earlier, in privilegedStartService (before twistd
        drops privileges), but nothing is accepted until the reactor runs,
        after every startService.
        """
        self.assertEqual(EVENTS, [("backend started", False)])
        self.assertTrue(self.service.listeners.running)
        self.assertTrue(self.check.running)
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.assertEqual(len(self.reactor.unixServers), 1)

    def test_start_logged(self):
        """Start-up logs the listeners and the checks."""
        service = PolicyService(self.configuration, self.reactor)
        with capturedLogs() as events:
            service.startService()
        [event] = [e for e in events if "listen" in e]
        self.assertIn("tcp:7101:interface=127.0.0.1", event["listen"])
        self.assertEqual(event["checks"], "backend")

    def test_stop_idle(self):
        """
        With nothing in flight, stop closes the connections, waits until
        they are closed, then stops the backends.
        """
        transport, protocol = self.connect()
        with capturedLogs():
            stopped = self.service.stopService()
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(stopped)
        self.assertTrue(self.check.running)
        protocol.connectionLost(None)
        self.successResultOf(stopped)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(self.check.running)
        self.assertEqual(EVENTS[-1][0], "backend stopped")

    def test_graceful_stop(self):
        """
        On stop, listeners stop, a request in flight is still answered, then
        the connections close, then the backends stop.
        """
        transport, protocol = self.connect()
        idle_transport, _ = self.connect()
        protocol.dataReceived(b"wait=1\nsender=a@b\n\n")
        with capturedLogs() as events:
            stopped = self.service.stopService()
            self.assertNoResult(stopped)
            self.assertFalse(self.service.listeners.running)
            self.assertTrue(self.check.running)
            self.assertFalse(transport.disconnecting)
            self.reactor.advance(1)
            self.check.waiting[0].callback("REJECT late but answered")
            # The answer is written, the connections are closing; the stop
            # waits until they are closed so the answer leaves the process.
            self.assertNoResult(stopped)
            self.assertEqual(transport.value(), b"action=REJECT late but answered\n\n")
            self.assertTrue(transport.disconnecting)
            self.assertTrue(idle_transport.disconnecting)
            self.assertTrue(self.check.running)
            for connection in list(self.service.factory.connections):
                connection.connectionLost(None)
            self.successResultOf(stopped)
        self.assertFalse(self.check.running)
        self.assertEqual(EVENTS[-1], ("backend stopped", False))
        self.assertTrue([e for e in events if e.get("count") == 1])

    def test_grace_bounded(self):
        """A request still unanswered after shutdown_grace does not hold the stop."""
        transport, protocol = self.connect()
        protocol.dataReceived(b"wait=1\nsender=a@b\n\n")
        with capturedLogs() as events:
            stopped = self.service.stopService()
            self.reactor.advance(4.9)
            self.assertNoResult(stopped)
            self.reactor.advance(0.1)
            self.assertTrue(transport.disconnecting)
            self.assertNoResult(stopped)
            # The connection does not close (its peer reads nothing): it is
            # dropped after another grace period.
            self.reactor.advance(5)
            self.successResultOf(stopped)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected)
        self.assertTrue([e for e in events if "did not close" in e["log_format"]])
        self.assertFalse(self.check.running)
        self.assertTrue([e for e in events if "still unanswered" in e["log_format"]])
        # The check answering after all changes nothing and raises nothing.
        protocol.connectionLost(None)
        self.check.waiting[0].callback("OK")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.service.factory.in_flight, 0)


@implementer(ICheck)
class OKCheck:
    """
    Answers OK.
    """

    def __init__(self, options):
        pass

    def check(self, request):
        return "OK"


class RequestLogServiceTests(SynchronousTestCase):
    """
    C{request_log} gives the daemon a L{FileRequestLog} that the protocol
    writes to, started and stopped with the backends.
    """

    def make(self, request_batches=False, **server):
        reactor = MemoryReactorClock()
        server.setdefault("listen", ["tcp:7102:interface=127.0.0.1"])
        configuration = load_document(
            {"server": server, "check": [{"name": "c", "type": f"{__name__}.OKCheck"}]},
            reactor,
        )
        return reactor, PolicyService(configuration, reactor, request_batches=request_batches)

    def serve_one(self, service, before_stop=lambda events: None):
        """
        Start C{service}, answer one request on a connection, call
        C{before_stop} with the events so far, and stop the service.

        @return: the events logged.
        """
        with capturedLogs() as events:
            service.privilegedStartService()
            service.startService()
            protocol = service.factory.buildProtocol(None)
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
            protocol.makeConnection(transport)
            protocol.dataReceived(b"sender=a@example.com\nprotocol_state=RCPT\n\n")
            self.assertEqual(transport.value(), b"action=OK\n\n")
            before_stop(events)
            stopped = service.stopService()
            self.assertTrue(transport.disconnecting)
            protocol.connectionLost(None)
            self.successResultOf(stopped)
        return events

    def test_file_request_log(self):
        """
        Answered requests go to the file; stopping the daemon writes the
        last of them.
        """
        path = os.path.join(temporary_directory(self), "requests.log")
        reactor, service = self.make(request_log=path)
        self.assertIsInstance(service.factory.request_log, FileRequestLog)
        self.assertIs(service.factory.request_log.parent, service.backends)
        events = self.serve_one(service)
        with open(path) as f:
            [line] = f.read().splitlines()
        self.assertIn(" RCPT [] helo=<> from=<a@example.com> ", line)
        self.assertIn(": OK (c, ", line)
        self.assertFalse([e for e in events if "protocol_state" in e])

    def test_twistd_log(self):
        """
        Without request_log, and a twistd log that takes no batches, no
        request log is made: each request is an event of its own.
        """
        reactor, service = self.make()
        self.assertIsNone(service.factory.request_log)
        self.assertTrue(service.factory.log_requests)

    def test_batches(self):
        """
        When twistd's log takes batches, the lines go there as batches, from
        a backend that logs the last of them on stop.
        """
        reactor, service = self.make(request_batches=True)
        self.assertIsInstance(service.factory.request_log, EventRequestLog)
        self.assertIs(service.factory.request_log.parent, service.backends)
        events = self.serve_one(
            service,
            before_stop=lambda events: self.assertFalse([e for e in events if BATCH_KEY in e]),
        )
        [event] = [e for e in events if BATCH_KEY in e]
        [(_, [line])] = event[BATCH_KEY]
        self.assertIn("RCPT [] helo=<> from=<a@example.com> ", line)
        self.assertFalse([e for e in events if "protocol_state" in e])

    def test_file_over_batches(self):
        """A request_log file takes the lines even where twistd's log takes batches."""
        path = os.path.join(temporary_directory(self), "requests.log")
        reactor, service = self.make(request_batches=True, request_log=path)
        self.assertIsInstance(service.factory.request_log, FileRequestLog)
        self.assertEqual([b for b in service.backends if isinstance(b, EventRequestLog)], [])

    def test_batches_log_requests_off(self):
        """log_requests = false: no batches either."""
        reactor, service = self.make(request_batches=True, log_requests=False)
        self.assertIsNone(service.factory.request_log)

    def test_log_requests_off(self):
        """log_requests = false wins over request_log."""
        path = os.path.join(temporary_directory(self), "requests.log")
        reactor, service = self.make(request_log=path, log_requests=False)
        self.assertIsNone(service.factory.request_log)
        self.assertEqual([b for b in service.backends if isinstance(b, FileRequestLog)], [])


class CollectorTuningTests(SynchronousTestCase):
    """
    L{CollectorTuning} freezes what start-up loaded and raises the first
    generation's threshold while the daemon serves, and undoes both on stop.
    """

    def test_start_and_stop(self):
        """Start freezes and raises the threshold; stop restores both."""
        calls = []
        thresholds = [(700, 10, 10)]
        tuning = CollectorTuning(
            freeze=lambda: calls.append("freeze"),
            unfreeze=lambda: calls.append("unfreeze"),
            get_threshold=lambda: thresholds[-1],
            set_threshold=lambda *values: thresholds.append(values),
        )
        tuning.startService()
        self.assertEqual(calls, ["freeze"])
        self.assertEqual(thresholds[-1], (SERVING_GC_THRESHOLD, 10, 10))
        tuning.stopService()
        self.assertEqual(calls, ["freeze", "unfreeze"])
        self.assertEqual(thresholds[-1], (700, 10, 10))

    def test_higher_threshold_kept(self):
        """A first-generation threshold already above ours is left alone."""
        thresholds = [(50_000, 10, 10)]
        tuning = CollectorTuning(
            freeze=lambda: None,
            unfreeze=lambda: None,
            get_threshold=lambda: thresholds[-1],
            set_threshold=lambda *values: thresholds.append(values),
        )
        tuning.startService()
        self.assertEqual(thresholds[-1], (50_000, 10, 10))
        tuning.stopService()
