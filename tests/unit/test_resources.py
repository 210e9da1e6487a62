"""
Tests for L{pfxpold.resources}: the open-files limit, the listen backlog,
and accept errors kept to a few log lines.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pfxpold.config import ConfigError, load_document
from pfxpold.resources import (
    ACCEPT_ERROR_INTERVAL,
    AcceptErrorLog,
    AcceptErrorLogEndpoint,
    raise_open_files_limit,
    with_backlog,
)
from pfxpold.service import PolicyService


class FakeResource:
    """
    The parts of the L{resource} module that matter, with limits the test
    sets and a C{setrlimit} that may fail.
    """

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, error: Exception | None = None) -> None:
        self.limits = (soft, hard)
        self.error = error
        self.set: list[tuple[int, tuple[int, int]]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.error is not None:
            raise self.error
        self.set.append((which, limits))
        self.limits = limits


class OpenFilesLimitTests(SynchronousTestCase):
    """
    The soft limit of open files is raised to the hard one, and logged.
    """

    def test_raised(self) -> None:
        """1024 soft, 524288 hard: raised to 524288, and the log says so."""
        fake = FakeResource(1024, 524288)
        with capturedLogs() as events:
            self.assertEqual(raise_open_files_limit(fake), (1024, 524288))
        self.assertEqual(fake.set, [(7, (524288, 524288))])
        self.assertEqual(
            [formatEvent(event) for event in events], ["open files limit: 1024 -> 524288"]
        )

    def test_already_at_hard_or_unlimited(self) -> None:
        """At the hard limit, or with no hard limit, nothing is changed."""
        for soft, hard, shown in [(4096, 4096, "4096"), (1024, -1, "1024")]:
            fake = FakeResource(soft, hard)
            with capturedLogs() as events:
                self.assertEqual(raise_open_files_limit(fake), (soft, soft))
            self.assertEqual(fake.set, [])
            self.assertEqual([formatEvent(e) for e in events], [f"open files limit: {shown}"])

    def test_cannot_raise(self) -> None:
        """A refusal is a warning, not a failure to start."""
        fake = FakeResource(1024, 4096, OSError(1, "Operation not permitted"))
        with capturedLogs() as events:
            self.assertEqual(raise_open_files_limit(fake), (1024, 1024))
        [text] = [formatEvent(event) for event in events]
        self.assertIn("cannot raise it to 4096", text)


class BacklogTests(SynchronousTestCase):
    """
    tcp, tcp6 and unix endpoints ask for the configured listen queue.
    """

    def test_descriptions(self) -> None:
        """backlog=N is added where it applies and is not given already."""
        cases = {
            "tcp:9998:interface=127.0.0.1": "tcp:9998:interface=127.0.0.1:backlog=1024",
            "tcp6:9998:interface=\\:\\:1": "tcp6:9998:interface=\\:\\:1:backlog=1024",
            "unix:/run/pfxpold.sock": "unix:/run/pfxpold.sock:backlog=1024",
            "tcp:9998:backlog=10": "tcp:9998:backlog=10",
            "systemd:domain=INET:index=0": "systemd:domain=INET:index=0",
        }
        for description, expected in cases.items():
            self.assertEqual(with_backlog(description, 1024), expected)

    def service(self, server: dict[str, Any]) -> MemoryReactorClock:
        reactor = MemoryReactorClock()
        configuration = load_document(
            {"server": server, "check": [{"name": "demo", "type": "demo"}]}, reactor
        )
        service = PolicyService(configuration, reactor)
        service.resource_module = FakeResource(1024, 1024)
        with capturedLogs():
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.stopService)
        return reactor

    def test_default(self) -> None:
        """Listeners ask for 1024 by default (Twisted's own is 50)."""
        reactor = self.service(
            {"listen": ["tcp:7102:interface=127.0.0.1", "unix:/tmp/pfxpold-backlog.sock"]}
        )
        self.assertEqual([server[2] for server in reactor.tcpServers], [1024])
        self.assertEqual([server[2] for server in reactor.unixServers], [1024])

    def test_configured(self) -> None:
        """[server] backlog sets it; an endpoint's own backlog= wins."""
        reactor = self.service(
            {"listen": ["tcp:7103", "tcp:7104:backlog=10"], "backlog": 4096}
        )
        self.assertEqual([server[2] for server in reactor.tcpServers], [4096, 10])

    def test_invalid(self) -> None:
        """A backlog that is not a positive whole number is a configuration error."""
        for bad in [0, "many", 1.5]:
            self.assertRaises(
                ConfigError,
                load_document,
                {"server": {"backlog": bad}, "check": [{"name": "d", "type": "demo"}]},
                Clock(),
            )

    def test_limit_raised_before_listening(self) -> None:
        """The service raises the open-files limit before its listeners bind."""
        reactor = MemoryReactorClock()
        configuration = load_document({"check": [{"name": "demo", "type": "demo"}]}, reactor)
        service = PolicyService(configuration, reactor)
        seen = []

        class Watching(FakeResource):
            def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
                seen.append(list(reactor.tcpServers))
                super().setrlimit(which, limits)

        service.resource_module = Watching(1024, 65536)
        with capturedLogs():
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(seen, [[]])
        self.assertEqual(len(reactor.tcpServers), 1)


ACCEPT_ERROR = {
    "log_format": "Could not accept new connection ({acceptError})",
    "acceptError": "EMFILE",
}


class AcceptErrorLogTests(SynchronousTestCase):
    """
    Accept errors: the first line in each interval, then a count.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.accept_log = AcceptErrorLog(self.clock, self.events.append)

    def texts(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def test_first_then_count(self) -> None:
        """
        Of a thousand accept errors, the first is logged, the others are
        counted in one line at the end of the interval.
        """
        for _ in range(1000):
            self.accept_log(dict(ACCEPT_ERROR))
        self.assertEqual(self.texts(), ["Could not accept new connection (EMFILE)"])
        self.clock.advance(ACCEPT_ERROR_INTERVAL)
        self.assertEqual(len(self.events), 2)
        self.assertIn("999 more connections could not be accepted", self.texts()[1])
        self.assertEqual(self.accept_log.suppressed, 999)

    def test_quiet_after_interval(self) -> None:
        """After an interval without errors, the next one is logged at once again."""
        self.accept_log(dict(ACCEPT_ERROR))
        self.clock.advance(ACCEPT_ERROR_INTERVAL)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.accept_log({"log_format": "EMFILE recovery: Closed socket from {address}"})
        self.assertEqual(len(self.events), 2)

    def test_other_events_pass(self) -> None:
        """A port's other events are passed on untouched."""
        self.accept_log(dict(ACCEPT_ERROR))
        event = {"log_format": "pfxpold.protocol.PolicyFactory starting on 9998"}
        self.accept_log(event)
        self.assertIs(self.events[-1], event)

    def test_stop_reports_and_cancels(self) -> None:
        """Stopping logs the count pending and leaves no timer behind."""
        for _ in range(3):
            self.accept_log(dict(ACCEPT_ERROR))
        self.accept_log.stop()
        self.assertIn("2 more connections", self.texts()[-1])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class AcceptErrorLogEndpointTests(SynchronousTestCase):
    """
    The endpoint wrapper routes a port's log through the limiter.
    """

    def test_port_logger_replaced(self) -> None:
        """A port with Twisted's C{_logger} logs through the limiter, in its namespace."""

        class Port:
            _logger = Logger(namespace="twisted.internet.tcp.Port")

        class Endpoint:
            def listen(self, factory: Any) -> Any:
                return succeed(Port())

        accept_log = AcceptErrorLog(Clock())
        wrapped = AcceptErrorLogEndpoint(Endpoint(), accept_log)  # type: ignore[arg-type]
        verifyObject(IStreamServerEndpoint, wrapped)
        port = self.successResultOf(wrapped.listen(None))
        self.assertIs(port._logger.observer, accept_log)
        # Logger is a descriptor: seen from the port, it names the class.
        self.assertEqual(port._logger.namespace, f"{__name__}.Port")
        self.assertIsNot(Port._logger.observer, accept_log)
