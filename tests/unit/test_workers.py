"""
Tests for L{pfxpold.workers}: passing listening sockets to worker processes,
starting, restarting and stopping them.
"""

from __future__ import annotations

import os
import signal
import socket

from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pfxpold import tap, workers


class FakePort:
    """
    A listening port with a file descriptor and an address family.
    """

    def __init__(self, fd: int, family: int = socket.AF_INET) -> None:
        self._fd = fd
        self.addressFamily = family

    def fileno(self) -> int:
        return self._fd

    def getHost(self):
        return IPv6Address("TCP", "::1", 9998)


class FakeEndpoint:
    """
    An endpoint that listens at once on a L{FakePort}.
    """

    def __init__(self, port: FakePort) -> None:
        self.port = port
        self.factories = []

    def listen(self, factory):
        self.factories.append(factory)
        return succeed(self.port)


class FakeProcess:
    """
    The transport of a spawned process: records signals.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, number) -> None:
        self.signals.append(number)


class ProcessReactor(MemoryReactorClock):
    """
    A memory reactor that records spawnProcess calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None, **kwargs):
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, executable, args, env, childFDs, process))
        protocol.makeConnection(process)
        return process


class RecordingEndpointTests(SynchronousTestCase):
    """
    L{workers.RecordingEndpoint} keeps the ports it listens on.
    """

    def test_interface(self):
        """It provides IStreamServerEndpoint."""
        verifyObject(IStreamServerEndpoint, workers.RecordingEndpoint(FakeEndpoint(FakePort(5))))

    def test_records_port(self):
        """Listening passes the factory on and remembers the port."""
        port = FakePort(5)
        inner = FakeEndpoint(port)
        recorder = workers.RecordingEndpoint(inner)
        factory = object()
        self.assertIs(self.successResultOf(recorder.listen(factory)), port)
        self.assertEqual(recorder.ports, [port])
        self.assertEqual(inner.factories, [factory])


class AdoptedEndpointTests(SynchronousTestCase):
    """
    L{workers.adopted_endpoints} reads C{--adopt FD:FAMILY} values.
    """

    def test_families(self):
        """Each specification becomes an adopted endpoint of its family."""
        reactor = MemoryReactorClock()
        [inet, inet6, unix] = workers.adopted_endpoints(reactor, ["3:INET", "4:INET6", "5:UNIX"])
        for endpoint, fd, family in (
            (inet, 3, socket.AF_INET),
            (inet6, 4, socket.AF_INET6),
            (unix, 5, socket.AF_UNIX),
        ):
            self.assertIsInstance(endpoint, endpoints.AdoptedStreamServerEndpoint)
            self.assertEqual((endpoint.fileno, endpoint.addressFamily), (fd, family))

    def test_malformed(self):
        """A specification that is not FD:FAMILY is refused."""
        for bad in ("3", "x:INET", "3:IPX", ""):
            self.assertRaises(ValueError, workers.adopted_endpoints, MemoryReactorClock(), [bad])


class WorkerPoolTests(SynchronousTestCase):
    """
    L{workers.WorkerPool} starts N-1 workers on the parent's sockets, starts
    a crashed one again and stops them all with the parent.
    """

    def make_pool(self, count=3):
        self.reactor = ProcessReactor()
        recorder = workers.RecordingEndpoint(FakeEndpoint(FakePort(7, socket.AF_INET6)))
        self.successResultOf(recorder.listen(object()))
        pool = workers.WorkerPool(
            self.reactor, count, [recorder], ["--config", "/etc/p.toml"], stop_timeout=15.0
        )
        return pool

    def test_spawns_workers_with_sockets(self):
        """N-1 workers get the listening socket as fd 3 and --adopt 3:INET6."""
        pool = self.make_pool(3)
        pool.startService()
        self.assertEqual(len(self.reactor.spawned), 2)
        for _protocol, _executable, args, env, child_fds, _process in self.reactor.spawned:
            self.assertEqual(child_fds, {0: "w", 1: "r", 2: "r", 3: 7})
            self.assertEqual(
                args[args.index("pfxpold") :],
                [
                    "pfxpold",
                    "--config",
                    "/etc/p.toml",
                    "--adopt",
                    "3:INET6",
                ],
            )
            self.assertIn("--pidfile=", args)
            self.assertEqual(env["PYTHONUNBUFFERED"], "1")
        self.assertEqual(sorted(pool.workers), [1, 2])

    def test_one_worker_spawns_nothing(self):
        """With --workers 1 the parent serves alone."""
        pool = self.make_pool(1)
        pool.startService()
        self.assertEqual(self.reactor.spawned, [])

    def test_restart_after_crash(self):
        """A worker that exits unexpectedly is started again after a delay."""
        pool = self.make_pool(2)
        pool.startService()
        protocol = self.reactor.spawned[0][0]
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertEqual(pool.workers, {})
        self.reactor.advance(workers.RESTART_DELAY)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(list(pool.workers), [1])

    def test_restart_backs_off_while_it_fails_at_start(self):
        """
        A worker that keeps ending within seconds of its start (a
        configuration its user cannot read) is started again after 1, 2,
        4, ... seconds, at most a minute apart; after it ran a while, after
        a second again.
        """
        pool = self.make_pool(2)
        pool.startService()
        delays = []
        for _ in range(8):
            started = self.reactor.seconds()
            count = len(self.reactor.spawned)
            self.reactor.spawned[-1][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
            while len(self.reactor.spawned) == count:
                self.reactor.advance(0.5)
            delays.append(self.reactor.seconds() - started)
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60])
        self.reactor.advance(workers.QUICK_END)
        self.reactor.spawned[-1][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.reactor.advance(workers.RESTART_DELAY)
        self.assertEqual(len(self.reactor.spawned), 10)

    def test_stop_terminates_workers(self):
        """Stopping sends SIGTERM and waits for every worker to end."""
        pool = self.make_pool(3)
        pool.startService()
        stopped = pool.stopService()
        processes = [spawned[5] for spawned in self.reactor.spawned]
        self.assertEqual([p.signals for p in processes], [[signal.SIGTERM]] * 2)
        self.assertNoResult(stopped)
        for spawned in self.reactor.spawned:
            spawned[0].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        # Stopping is not a crash: nothing is started again.
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def own_sockets(self, made=None):
        """
        Have the pool's own sockets be fakes (fds 20, 21, ...), or raise
        C{made} when it is an exception.

        @return: the list of the fakes made, and their closes.
        """
        fakes = []

        class FakeSocket:
            def __init__(self, fd):
                self.fd = fd
                self.closed = False

            def fileno(self):
                return self.fd

            def close(self):
                self.closed = True

        def reuseport_sockets(fd, family, count, backlog):
            self.asked = (fd, family, count, backlog)
            if made is not None:
                raise made
            new = [FakeSocket(20 + len(fakes) + number) for number in range(count)]
            fakes.extend(new)
            return new

        self.patch(workers, "reuseport_sockets", reuseport_sockets)
        return fakes

    def test_own_socket_per_worker(self):
        """
        For a TCP listener, each worker gets a socket of its own, made
        before privileges go; the others are closed once the workers
        stopped.
        """
        fakes = self.own_sockets()
        pool = self.make_pool(3)
        pool.privilegedStartService()
        self.assertEqual(self.asked, (7, socket.AF_INET6, 2, 50))
        pool.startService()
        self.assertEqual([spawned[4][3] for spawned in self.reactor.spawned], [20, 21])
        stopped = pool.stopService()
        self.assertEqual([fake.closed for fake in fakes], [False, False])
        for spawned in self.reactor.spawned:
            spawned[0].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.assertEqual([fake.closed for fake in fakes], [True, True])

    def test_own_sockets_bound_again_replace_the_old(self):
        """
        Started again, the pool closes the sockets it bound before, so none
        stays in the group with nobody accepting on it.
        """
        fakes = self.own_sockets()
        pool = self.make_pool(3)
        pool.privilegedStartService()
        pool.privilegedStartService()
        self.assertEqual([fake.closed for fake in fakes], [True, True, False, False])
        pool.startService()
        self.assertEqual([spawned[4][3] for spawned in self.reactor.spawned], [22, 23])

    def test_crashed_worker_loses_its_socket(self):
        """
        A worker that ends unexpectedly has its own socket closed at once
        (nobody accepts on it meanwhile, and a worker failing at every
        start never would), and is started again on the parent's.
        """
        fakes = self.own_sockets()
        pool = self.make_pool(3)
        pool.privilegedStartService()
        pool.startService()
        with capturedLogs() as events:
            self.reactor.spawned[0][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertEqual([fake.closed for fake in fakes], [True, False])
        [event] = [e for e in events if e.get("log_level").name == "error"]
        self.assertIn(
            "starting it again in 1 s, sharing the parent's listening sockets",
            event["log_format"].format(**event),
        )
        self.reactor.advance(workers.RESTART_DELAY)
        self.assertEqual(self.reactor.spawned[2][4][3], 7)

    def test_shared_when_own_cannot_be_bound(self):
        """
        When a worker's own socket cannot be bound (a socket from systemd,
        bound by another user), the workers share the parent's, and a
        warning names the address.
        """
        self.own_sockets(OSError(98, "Address already in use"))
        pool = self.make_pool(2)
        with capturedLogs() as events:
            pool.privilegedStartService()
        [event] = [e for e in events if e.get("log_level").name == "warn"]
        self.assertEqual(
            event["log_format"].format(**event),
            "the workers share the listening socket of tcp6:9998:interface=\\:\\:1:"
            " one per worker could not be bound (Address already in use)",
        )
        pool.startService()
        self.assertEqual(self.reactor.spawned[0][4][3], 7)

    def test_unix_sockets_shared(self):
        """A Unix listener is shared: SO_REUSEPORT does not spread them."""
        self.own_sockets()
        self.reactor = ProcessReactor()
        recorder = workers.RecordingEndpoint(FakeEndpoint(FakePort(9, socket.AF_UNIX)))
        self.successResultOf(recorder.listen(object()))
        pool = workers.WorkerPool(self.reactor, 2, [recorder], [], stop_timeout=15.0)
        pool.privilegedStartService()
        self.assertFalse(hasattr(self, "asked"))
        pool.startService()
        self.assertEqual(self.reactor.spawned[0][4][3], 9)

    def test_no_workers_when_the_directory_is_closed(self):
        """
        When the user the parent now runs as may not enter its directory
        (twistd's run directory, which each worker enters too), no worker
        is started, and one error says why, instead of a worker failing
        every second; their sockets are closed, so the kernel gives every
        connection to the parent.
        """
        fakes = self.own_sockets()
        self.patch(os, "access", lambda path, mode: False)
        pool = self.make_pool(3)
        pool.privilegedStartService()
        with capturedLogs() as events:
            pool.startService()
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual([fake.closed for fake in fakes], [True, True])
        [event] = [e for e in events if e.get("log_level").name == "error"]
        self.assertIn("cannot start the workers", event["log_format"].format(**event))
        self.assertIn("serving without them", event["log_format"].format(**event))

    def test_stop_kills_stragglers(self):
        """A worker still running after stop_timeout gets SIGKILL."""
        pool = self.make_pool(2)
        pool.startService()
        stopped = pool.stopService()
        self.reactor.advance(15.0)
        process = self.reactor.spawned[0][5]
        self.assertEqual(process.signals, [signal.SIGTERM, signal.SIGKILL])
        self.reactor.spawned[0][0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(stopped)

    def test_output_logged_by_whole_lines(self):
        """Worker output reaches the parent's log in whole lines, batched."""
        from twisted.logger import capturedLogs

        pool = self.make_pool(2)
        pool.startService()
        protocol = self.reactor.spawned[0][0]
        with capturedLogs() as events:
            protocol.outReceived(b"line one\nline t")
            protocol.outReceived(b"wo\n")
        outputs = [e["worker_output"] for e in events if "worker_output" in e]
        self.assertEqual(outputs, ["line one", "line two"])
        self.assertEqual(events[0]["pid"], 1000)


class LogArgumentTests(SynchronousTestCase):
    """
    L{workers.worker_log_arguments}: workers log the way the parent does.
    """

    def test_log_file(self):
        """A parent's log file gives each worker a file beside it."""
        make = workers.worker_log_arguments({"logfile": "/var/log/pfxpold/pfxpold.log"})
        self.assertEqual(make(2), ["--logfile", "/var/log/pfxpold/pfxpold.worker2.log"])

    def test_daemon_default(self):
        """A daemon without --logfile logs to twistd.log: workers beside it."""
        make = workers.worker_log_arguments({"logfile": None, "nodaemon": False})
        self.assertEqual(make(1)[1], os.path.abspath("twistd.worker1.log"))

    def test_stdout(self):
        """In the foreground without a file, worker output goes through the parent."""
        self.assertIsNone(workers.worker_log_arguments({"logfile": None, "nodaemon": True}))
        self.assertIsNone(workers.worker_log_arguments({"logfile": "-", "nodaemon": True}))
        self.assertIsNone(workers.worker_log_arguments(None))

    def test_syslog(self):
        """--syslog and its prefix are passed on."""
        make = workers.worker_log_arguments({"syslog": True, "prefix": "pfxpold"})
        self.assertEqual(make(1), ["--syslog", "--prefix", "pfxpold"])

    def test_logger(self):
        """A --logger observer factory (already imported by twistd) is named again."""
        from pfxpold.logger import mail_syslog

        make = workers.worker_log_arguments({"logger": mail_syslog, "syslog": False})
        self.assertEqual(make(1), ["--logger", "pfxpold.logger.mail_syslog"])

    def test_pool_uses_them(self):
        """The pool puts the logging arguments on the worker's command line."""
        reactor = ProcessReactor()
        pool = workers.WorkerPool(
            reactor, 2, [], [], 15.0, log_arguments=lambda number: ["--logfile", f"w{number}"]
        )
        pool.startService()
        args = reactor.spawned[0][2]
        self.assertEqual(args[args.index("--logfile") : args.index("pfxpold")], ["--logfile", "w1"])


class OptionsTests(SynchronousTestCase):
    """
    C{--workers} and the internal C{--adopt} on the command line.
    """

    def parse(self, *argv):
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_workers_default(self):
        """One process unless asked for more."""
        self.assertEqual(self.parse()["workers"], 1)

    def test_workers_zero(self):
        """--workers 0 is refused in one line."""
        error = self.assertRaises(SystemExit, self.parse, "--workers", "0")
        self.assertEqual(error.code, "pfxpold: --workers must be 1 or more, not 0")

    def test_worker_cannot_start_workers(self):
        """--adopt and --workers 2 together are refused."""
        self.assertRaises(usage.UsageError, self.parse, "--workers", "2", "--adopt", "3:INET")

    def test_parent_service(self):
        """--workers 2 builds the policy service and a pool beside it."""
        reactor = ProcessReactor()
        options = self.parse("--workers", "2")
        top = tap.makeService(options, reactor)
        services = list(top)
        self.assertEqual(
            [type(s).__name__ for s in services], ["PolicyService", "WorkerPool", "SignalService"]
        )
        self.assertEqual(services[1].recorders, services[0].recorders)

    def test_worker_service(self):
        """--adopt builds a policy service on the inherited socket, watching its parent."""
        reactor = ProcessReactor()
        options = self.parse("--adopt", "3:INET")
        service = tap.makeService(options, reactor)
        self.assertEqual(service.recorders, [])
        [listener] = list(service.listeners)
        self.assertEqual(service.adopted, [listener.endpoint])
        # Wrapped to keep its accept errors (out of open files) to a few lines.
        self.assertIsInstance(
            listener.endpoint._endpoint.endpoint, endpoints.AdoptedStreamServerEndpoint
        )
        self.assertTrue([s for s in service if isinstance(s, workers.ParentWatchService)])

    def test_worker_logs_adopted_sockets(self):
        """
        A worker logs the endpoints it really serves, the adopted sockets'
        addresses, not the configuration's listen (which only its parent
        binds).
        """
        reactor = ProcessReactor()
        # Adopting closes the descriptor: give it one of its own.
        fd = os.open(os.devnull, os.O_RDONLY)
        options = self.parse("--port", "tcp:7201:interface=127.0.0.1", "--adopt", f"{fd}:INET6")
        service = tap.makeService(options, reactor)
        [watch] = [s for s in service if isinstance(s, workers.ParentWatchService)]
        watch.disownServiceParent()
        with capturedLogs() as events:
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.backends.stopService)
        self.assertEqual([adopted[:2] for adopted in reactor.adoptedPorts], [(fd, socket.AF_INET6)])
        [event] = [e for e in events if "listen" in e]
        self.assertEqual(event["listen"], "tcp6:1234:interface=\\:\\: (adopted)")
        self.assertNotIn("7201", event["listen"])


class DescribeAddressTests(SynchronousTestCase):
    """
    describe_address names a listening address as an endpoint description.
    """

    def test_families(self):
        """IPv4, IPv6 (colons escaped) and UNIX addresses."""
        self.assertEqual(
            workers.describe_address(IPv4Address("TCP", "127.0.0.1", 9998)),
            "tcp:9998:interface=127.0.0.1",
        )
        self.assertEqual(
            workers.describe_address(IPv6Address("TCP", "::1", 9998)),
            "tcp6:9998:interface=\\:\\:1",
        )
        self.assertEqual(
            workers.describe_address(UNIXAddress(b"/run/pfxpold.sock")), "unix:/run/pfxpold.sock"
        )
