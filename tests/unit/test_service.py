"""
Tests for L{pfxpold.service}: start-up order, and a graceful stop that
answers requests in flight before closing connections and stopping
backends.
"""

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.config import load_document
from pfxpold.interfaces import ICheck
from pfxpold.service import PolicyService

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
