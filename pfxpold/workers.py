"""
Worker processes: all cores serving the same listening ports.

One pfxpold process runs on one core. With C{twistd pfxpold --workers N}
the process twistd starts (the parent) binds the listening ports as usual,
serves them itself, and starts N-1 worker processes that adopt listening
sockets from it (L{AdoptedStreamServerEndpoint}, i.e.
C{reactor.adoptStreamPort}). For a TCP port, each worker gets a socket of
its own, bound to the same address with C{SO_REUSEPORT} while the parent
still has its privileges (L{WorkerPool.privilegedStartService}): the kernel
spreads new connections over the processes by their addresses. On one
shared socket, the process that wakes first takes up to a hundred waiting
connections at once, so that after a burst (Postfix restarting) one
process served nearly all of them for as long as they lasted. Unix
sockets, and TCP sockets that cannot be given one per worker (one from
systemd, bound by another user), are shared. A worker that ends
unexpectedly loses its own socket (nobody would accept on it) and is
started again on the parent's, shared. Each process runs its own copy of
the configured checks, so state that must be exact across processes
(quotas, greylisting) has to live in the store (SQLite, Redis, SQL), never
in memory.

Workers are started after twistd has dropped privileges, as the same user.
They stop with the parent: on SIGTERM the parent sends them SIGTERM and
waits for them (each answers its requests in flight first), and a worker
whose parent dies anyhow sees its stdin pipe close and stops itself. A
worker that exits unexpectedly is started again after a second, or, while
it keeps ending within seconds of its start, after twice as long as the
last time, up to a minute. Workers
log the way the parent does (the same C{--logger} or C{--syslog}), or to a
file of their own beside the parent's log file; when the parent logs to
stdout, their lines go through the parent's log. Every process writes its
request lines in batches (L{pfxpold.logger}), so a worker's output reaches
its parent in large reads, each relayed as one event.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.reflect import fullyQualifiedName
from zope.interface import implementer

from pfxpold.escape import escape

#: The names C{--adopt FD:FAMILY} uses for address families.
FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}
_FAMILY_NAMES = {value: name for name, value in FAMILIES.items()}

#: File descriptors in a worker where the listening sockets are passed.
FIRST_LISTENER_FD = 3

#: Seconds before a worker that exited unexpectedly is started again.
RESTART_DELAY = 1.0
#: A worker that ends sooner than this after it was started (it fails at
#: start: a configuration its user cannot read, ...) waits twice as long as
#: the last time before it is started again, up to L{MAX_RESTART_DELAY}.
QUICK_END = 10.0
MAX_RESTART_DELAY = 60.0


@implementer(IStreamServerEndpoint)
class RecordingEndpoint:
    """
    Wraps a server endpoint and keeps the ports it listens on, so that the
    parent can hand their sockets to its workers.

    @ivar ports: the L{IListeningPort}s, once listening.
    """

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint
        # tcp.Port or unix.Port: the parent needs their fileno() and
        # addressFamily, which IListeningPort does not declare.
        self.ports: list[Any] = []

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            self.ports.append(port)
            return port

        return self._endpoint.listen(factory).addCallback(listening)


def describe_address(address: Any) -> str:
    """
    The endpoint description of the address a port really listens on
    (its C{getHost()}), e.g. C{tcp:9998:interface=127.0.0.1}: what a worker
    logs for the socket it adopted.
    """
    if isinstance(address, IPv4Address):
        return f"tcp:{address.port}:interface={address.host}"
    if isinstance(address, IPv6Address):
        return f"tcp6:{address.port}:interface={address.host.replace(':', chr(92) + ':')}"
    if isinstance(address, UNIXAddress):
        raw = address.name
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return f"unix:{name}"
    return str(address)


def adopted_endpoints(reactor: Any, specifications: list[str]) -> list[IStreamServerEndpoint]:
    """
    Endpoints for the sockets a worker inherited, from C{--adopt FD:FAMILY}
    values.

    @raise ValueError: for a malformed specification.
    """
    result: list[IStreamServerEndpoint] = []
    for specification in specifications:
        fd, _, family = specification.partition(":")
        if not fd.isdigit() or family not in FAMILIES:
            raise ValueError(f"--adopt wants FD:INET, FD:INET6 or FD:UNIX, not {specification!r}")
        result.append(endpoints.AdoptedStreamServerEndpoint(reactor, int(fd), FAMILIES[family]))
    return result


class _ParentWatch(Protocol):
    """
    A worker's stdin, a pipe from its parent: when it closes, the parent is
    gone and the worker stops.
    """

    _log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._reactor.running:
            self._log.warn("the parent process is gone: stopping this worker")
            self._reactor.stop()


class ParentWatchService(Service):
    """
    Runs in a worker: stops the worker's reactor when its parent's pipe on
    stdin closes, so that no worker outlives its parent.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        from twisted.internet.stdio import StandardIO

        # mypy reads twisted.internet.stdio's Windows branch, whose
        # StandardIO takes no stdout; the POSIX one (used here) does.
        StandardIO(  # type: ignore[call-arg]
            _ParentWatch(self._reactor),
            stdout=os.open(os.devnull, os.O_WRONLY),
            reactor=self._reactor,
        )


def worker_log_arguments(
    twistd_options: Optional[Mapping[str, Any]],
) -> Optional[Callable[[int], list[str]]]:
    """
    How workers log, following the parent's twistd options: the same
    C{--logger} or C{--syslog}, or a log file of their own beside the
    parent's (C{pfxpold.log}: C{pfxpold.worker1.log}, ...), so that no
    process has to format and write the others' request logs.

    @param twistd_options: twistd's own options (the parent of pfxpold's).
    @return: a function giving worker N's twistd logging arguments, or
        L{None} when the parent logs to stdout: worker output then goes
        through the parent's log.
    """
    if not twistd_options:
        return None
    logger = twistd_options.get("logger")
    if logger is not None:
        name = logger if isinstance(logger, str) else fullyQualifiedName(logger)
        return lambda number: ["--logger", name]
    if twistd_options.get("syslog"):
        prefix = twistd_options.get("prefix") or "twisted"
        return lambda number: ["--syslog", "--prefix", prefix]
    logfile = twistd_options.get("logfile")
    if not logfile and not twistd_options.get("nodaemon"):
        logfile = "twistd.log"
    if not logfile or logfile == "-":
        return None
    # Made absolute now: twistd changes to --rundir before workers start.
    root, extension = os.path.splitext(os.path.abspath(logfile))
    return lambda number: ["--logfile", f"{root}.worker{number}{extension}"]


class _WorkerProtocol(ProcessProtocol):
    """
    One worker process as the parent sees it: its output goes to the
    parent's log, and its end is reported to the pool.
    """

    _log = Logger()

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.ended: Deferred[None] = Deferred()
        self.pid: Optional[int] = None
        #: When it was started (the pool's reactor's time).
        self.started = 0.0
        self._partial = b""

    def connectionMade(self) -> None:
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        # One event per batch of whole lines: under load a read holds many,
        # and the parent must not pay a log event per worker request.
        data = self._partial + data
        end = data.rfind(b"\n") + 1
        self._partial = data[end:]
        if end:
            self._emit(data[:end])

    errReceived = outReceived

    def _emit(self, output: bytes) -> None:
        self._log.info(
            "worker {worker} (pid {pid}):\n{worker_output}",
            worker=self.number,
            pid=self.pid,
            worker_output=output.decode("utf-8", "replace").rstrip("\n"),
        )

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        self.pool.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Starts and supervises the worker processes of a parent.

    @ivar recorders: the L{RecordingEndpoint}s of the parent's listeners;
        their sockets are passed to every worker.
    @ivar arguments: the pfxpold options a worker gets (C{--config ...}),
        before its C{--adopt} options.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        recorders: list[RecordingEndpoint],
        arguments: list[str],
        stop_timeout: float,
        executable: str = sys.executable,
        log_arguments: Optional[Callable[[int], list[str]]] = None,
        backlog: int = 50,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.recorders = recorders
        self.arguments = arguments
        self.stop_timeout = stop_timeout
        self.executable = executable
        self.log_arguments = log_arguments
        self.backlog = backlog
        self.workers: dict[int, _WorkerProtocol] = {}
        self._stopping = False
        #: Worker number -> the delay before it was last started again.
        self._restart_delays: dict[int, float] = {}
        #: (worker number, listener index) -> that worker's own socket,
        #: until the worker ends unexpectedly (L{worker_ended}).
        self._own_sockets: dict[tuple[int, int], socket.socket] = {}

    def _listeners(self) -> list[Any]:
        """
        The parent's listening ports (tcp.Port or unix.Port: with
        C{fileno()}, C{addressFamily} and C{getHost()}).
        """
        return [port for recorder in self.recorders for port in recorder.ports]

    def privilegedStartService(self) -> None:
        """
        Give each worker a socket of its own for every TCP listener, bound
        now, before twistd drops privileges (a port below 1024 needs them,
        and the kernel groups C{SO_REUSEPORT} sockets of one user only).
        """
        super().privilegedStartService()
        # Started again, the sockets bound before would be left in the
        # group, taking their share of connections with nobody accepting.
        self._close_own_sockets()
        for index, port in enumerate(self._listeners()):
            family = port.addressFamily
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                sockets = reuseport_sockets(port.fileno(), family, self.count - 1, self.backlog)
            except OSError as e:
                self._log.warn(
                    "the workers share the listening socket of {address}: one per worker"
                    " could not be bound ({reason})",
                    address=describe_address(port.getHost()),
                    reason=e.strerror or str(e),
                )
                continue
            for number, own in enumerate(sockets, start=1):
                self._own_sockets[(number, index)] = own

    def _close_own_sockets(self) -> None:
        for own in self._own_sockets.values():
            own.close()
        self._own_sockets = {}

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if self.count > 1 and not os.access(os.curdir, os.X_OK):
            # twistd in each worker enters its run directory, this one, as
            # the user it now runs as: it would fail, and again every second.
            self._log.error(
                "cannot start the workers: uid {uid} may not enter this process's"
                " directory {directory} (twistd's --rundir); serving without them",
                uid=os.getuid(),
                directory=escape(os.getcwd()),
            )
            # Their sockets too: the connections the kernel gave them would
            # wait for nobody.
            self._close_own_sockets()
            return
        for number in range(1, self.count):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        if self._stopping:
            return
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        adopt = []
        for index, port in enumerate(self._listeners()):
            own = self._own_sockets.get((number, index))
            child_fds[FIRST_LISTENER_FD + index] = (own or port).fileno()
            adopt += [
                "--adopt",
                f"{FIRST_LISTENER_FD + index}:{_FAMILY_NAMES[port.addressFamily]}",
            ]
        arguments = [
            self.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            *(self.log_arguments(number) if self.log_arguments else ["--logfile=-"]),
            "pfxpold",
            *self.arguments,
            *adopt,
        ]
        worker = _WorkerProtocol(self, number)
        env = os.environ.copy()
        # Log lines reach the parent as they are written, not at exit; under
        # load the parent still reads them in large batches.
        env["PYTHONUNBUFFERED"] = "1"
        # Which worker it is: its capture file is named for it.
        env["PFXPOLD_WORKER"] = str(number)
        transport = self.reactor.spawnProcess(
            worker, self.executable, arguments, env=env, childFDs=child_fds
        )
        worker.pid = transport.pid
        worker.started = self.reactor.seconds()
        self.workers[number] = worker
        self._log.info("started worker {worker} (pid {pid})", worker=number, pid=worker.pid)

    def worker_ended(self, worker: _WorkerProtocol, reason: Failure) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if self._stopping:
            return
        # Nobody accepts on its own sockets now, and a worker that keeps
        # failing would never again: closed, the kernel gives their new
        # connections to the other processes' (the few waiting on them are
        # reset). It is started again on the parent's sockets, shared.
        own = [key for key in self._own_sockets if key[0] == worker.number]
        for key in own:
            self._own_sockets.pop(key).close()
        delay = RESTART_DELAY
        if self.reactor.seconds() - worker.started < QUICK_END:
            previous = self._restart_delays.get(worker.number)
            if previous is not None:
                delay = min(previous * 2, MAX_RESTART_DELAY)
        self._restart_delays[worker.number] = delay
        self._log.error(
            "worker {worker} ended unexpectedly ({reason}); starting it again in {delay:g} s"
            "{shared}",
            worker=worker.number,
            reason=reason.getErrorMessage(),
            delay=delay,
            shared=", sharing the parent's listening sockets" if own else "",
        )
        self.reactor.callLater(delay, self._spawn, worker.number)

    def signal_workers(self, number: int) -> int:
        """
        Send signal C{number} to every running worker (SIGHUP: reload).

        @return: how many workers were signalled.
        """
        workers = list(self.workers.values())
        for worker in workers:
            _signal(worker, number)
        return len(workers)

    def stopService(self) -> Optional[Deferred[Any]]:
        """
        SIGTERM every worker and wait for them to exit; SIGKILL those still
        running after C{stop_timeout} seconds.
        """
        super().stopService()
        self._stopping = True
        workers = list(self.workers.values())
        for worker in workers:
            _signal(worker, signal.SIGTERM)

        def kill_stragglers() -> None:
            for worker in workers:
                if not worker.ended.called:
                    self._log.warn("worker {worker} did not stop: killing it", worker=worker.number)
                    _signal(worker, signal.SIGKILL)

        killer = self.reactor.callLater(self.stop_timeout, kill_stragglers)
        done = DeferredList([worker.ended for worker in workers])

        def stopped(result: Any) -> None:
            if killer.active():
                killer.cancel()
            self._close_own_sockets()

        return done.addCallback(stopped)


def reuseport_sockets(
    fd: int, family: socket.AddressFamily, count: int, backlog: int
) -> list[socket.socket]:
    """
    C{count} new listening sockets on the address of the TCP listening
    socket C{fd}, which joins them in one C{SO_REUSEPORT} group.

    @raise OSError: when they cannot be made: none is left open, and C{fd}
        is as it was (no other socket can join it).
    """
    made: list[socket.socket] = []
    with socket.socket(family, socket.SOCK_STREAM, fileno=os.dup(fd)) as listening:
        address = listening.getsockname()
        v6only = (
            listening.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            if family == socket.AF_INET6
            else None
        )
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            for _ in range(count):
                own = socket.socket(family, socket.SOCK_STREAM)
                made.append(own)
                own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if v6only is not None:
                    own.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
                own.bind(address)
                own.listen(backlog)
                own.setblocking(False)
        except OSError:
            for own in made:
                own.close()
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
            raise
    return made


def _signal(worker: _WorkerProtocol, number: int) -> None:
    if worker.transport is None:
        # Not started (spawnProcess failed): nothing to signal.
        return
    try:
        worker.transport.signalProcess(number)
    except Exception:
        # ProcessExitedAlready: it is gone, which is what we want.
        pass
