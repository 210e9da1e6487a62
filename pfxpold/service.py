"""
The service tree of a running daemon: listeners, and the checks and shared
backends that need starting and stopping.
"""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Callable
from typing import Any, Optional

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from pfxpold.config import Configuration
from pfxpold.logger import OffersLogObserver
from pfxpold.protocol import PolicyFactory
from pfxpold.reload import ServiceSet
from pfxpold.requestlog import EventRequestLog, FileRequestLog
from pfxpold.resources import (
    AcceptErrorLog,
    AcceptErrorLogEndpoint,
    raise_open_files_limit,
    with_backlog,
)
from pfxpold.workers import RecordingEndpoint, describe_address


class PolicyService(OffersLogObserver, MultiService):
    """
    Serves the policy protocol with one configuration, on the listeners it
    configures, or on C{adopted} endpoints (in a worker process, see
    L{pfxpold.workers}).

    Backends start first and listeners last, so no request arrives before
    the checks can answer it. On stop (SIGTERM), listeners stop accepting,
    requests in flight are answered for up to C{shutdown_grace} seconds,
    connections are closed, and then the backends stop.

    Before listening, the soft limit of open files is raised to the hard
    one (each Postfix connection is one), and listeners ask for a listen
    queue of C{backlog} connections.

    @ivar resource_module: the L{resource} module (tests set a stand-in).
    @ivar accept_log: what keeps accept errors (out of open files) to a
        line per interval; counts the others in C{suppressed}.

    With C{request_batches}, twistd's log takes request lines in batches
    (L{pfxpold.logger}): without a C{request_log} file, they go there so.
    """

    _log = Logger()
    resource_module: Any = resource

    def __init__(
        self,
        configuration: Configuration,
        reactor: Any,
        adopted: Optional[list[IStreamServerEndpoint]] = None,
        request_batches: bool = False,
    ) -> None:
        super().__init__()
        self.configuration = configuration
        self.reactor = reactor
        self.factory = PolicyFactory(
            configuration.chain,
            clock=reactor,
            limits=configuration.limits,
            log_requests=configuration.log_requests,
        )
        self.backends = MultiService()
        self.backends.setServiceParent(self)
        #: The L{pfxpold.reload.Reloader} that SIGHUP runs (set by
        #: L{pfxpold.tap.makeService}); its counters are the reload metrics.
        self.reloader: Optional[Any] = None
        if configuration.log_requests and configuration.request_log is not None:
            # A backend: it starts before the listeners and stops after
            # the last answer, flushing it.
            request_log = FileRequestLog(configuration.request_log, reactor)
            request_log.setServiceParent(self.backends)
            self.factory.request_log = request_log
        elif configuration.log_requests and request_batches:
            batches = EventRequestLog(reactor)
            batches.setServiceParent(self.backends)
            self.factory.request_log = batches
        self.factory.log_verdicts = configuration.log_verdicts
        if configuration.capture is not None:
            self._start_capture(configuration, bool(adopted))
        #: The checks and shared objects of the configuration in force,
        #: which a reload changes while they run (L{pfxpold.reload}).
        self.checks = ServiceSet(IService(backend) for backend in configuration.services)
        self.checks.setServiceParent(self.backends)
        self.listeners = MultiService()
        self.listeners.setServiceParent(self)
        self.accept_log = AcceptErrorLog(reactor)
        self._limit_raised = False
        #: The L{pfxpold.metrics.Metrics} counting this process's work, or
        #: L{None} without a [metrics] table (nothing imported, nothing
        #: counted).
        self.metrics: Optional[Any] = None
        if configuration.metrics_listen is not None:
            self._start_metrics(configuration.metrics_listen, bool(adopted))
        #: The listening endpoints, which keep their ports for worker processes.
        self.recorders: list[RecordingEndpoint] = []
        #: A worker's adopted sockets, recorded to log what it really serves.
        self.adopted: list[RecordingEndpoint] = []
        #: The listener of each C{listen} endpoint string (none when adopted).
        self.listening: dict[str, IService] = {}
        if adopted:
            # A worker process serves the sockets its parent passed it.
            for endpoint in adopted:
                recorder = RecordingEndpoint(AcceptErrorLogEndpoint(endpoint, self.accept_log))
                self.adopted.append(recorder)
                StreamServerEndpointService(recorder, self.factory).setServiceParent(self.listeners)
            return
        for description in configuration.listen:
            listener = strports.service(
                with_backlog(description, configuration.backlog), self.factory, reactor=reactor
            )
            recorder = RecordingEndpoint(AcceptErrorLogEndpoint(listener.endpoint, self.accept_log))
            listener.endpoint = recorder
            self.recorders.append(recorder)
            listener.setServiceParent(self.listeners)
            self.listening[description] = listener

    def _start_capture(self, configuration: Configuration, worker: bool) -> None:
        """
        Capture answered requests for C{pfxpold-replay}: a backend, like
        the request log; a worker writes a file of its own.
        """
        from pfxpold import capture

        assert configuration.capture is not None
        number = os.environ.get(capture.WORKER_VARIABLE) if worker else None
        kind: Any = capture.CaptureWriter
        if configuration.capture.process:
            from pfxpold.captureprocess import CaptureProcess

            kind = CaptureProcess
        writer = kind(
            configuration.capture,
            self.reactor,
            checks=lambda: self.configuration,
            path=capture.worker_path(configuration.capture.path, number),
        )
        writer.setServiceParent(self.backends)
        self.factory.capture = writer

    def privilegedStartService(self) -> None:
        self._raise_open_files_limit()
        super().privilegedStartService()

    def _raise_open_files_limit(self) -> None:
        if not self._limit_raised:
            self._limit_raised = True
            raise_open_files_limit(self.resource_module)

    def _start_metrics(self, listen: str, worker: bool) -> None:
        """
        Count this process's work: served on C{listen} by the parent, or, in
        a worker, written for the parent to add up (nothing when the parent
        named no directory for it).
        """
        from pfxpold import metrics

        if worker:
            directory = os.environ.get(metrics.WORKERS_DIRECTORY)
            if not directory:
                return
            self.metrics = metrics.Metrics(self.reactor)
            metrics.SnapshotWriter(self.metrics, directory, self.reactor).setServiceParent(
                self.backends
            )
        else:
            self.metrics = metrics.Metrics(self.reactor)
            metrics.exporter(self.metrics, listen, self.reactor).setServiceParent(self.listeners)
        self.metrics.attach(self.factory)

    def startService(self) -> None:
        # Started without privilegedStartService (a tac file's own service
        # tree): raise it now, still before listening.
        self._raise_open_files_limit()
        super().startService()
        listen = self.configuration.listen
        if self.adopted:
            # Not the configuration's listen, which a worker does not bind:
            # the sockets it adopted, as they really are.
            listen = [
                f"{describe_address(port.getHost())} (adopted)"
                for recorder in self.adopted
                for port in recorder.ports
            ]
        self._log.info(
            "pfxpold serving on {listen} with checks {checks}",
            listen=", ".join(listen),
            checks=", ".join(entry.name for entry in self.configuration.chain.entries),
        )

    async def _stop(self) -> None:
        await self.listeners.stopService()
        if self.factory.in_flight:
            self._log.info(
                "stopping: answering {count} requests in flight",
                count=self.factory.in_flight,
            )
            drained = self.factory.drained()
            drained.addTimeout(self.configuration.shutdown_grace, self.reactor)
            try:
                await drained
            except Exception:
                self._log.warn(
                    "stopping: {count} requests still unanswered after {grace}s",
                    count=self.factory.in_flight,
                    grace=self.configuration.shutdown_grace,
                )
        # Wait until the connections are really closed: the answers just
        # written are still in the transports' buffers, and stopping the
        # reactor now would drop them.
        closed = self.factory.close_connections()
        closed.addTimeout(self.configuration.shutdown_grace, self.reactor)
        try:
            await closed
        except Exception:
            self._log.warn(
                "stopping: {count} connections did not close within {grace}s; dropping them",
                count=len(self.factory.connections),
                grace=self.configuration.shutdown_grace,
            )
            # Not awaited: an aborted connection is gone when the reactor
            # stops, whatever its protocol hears.
            self.factory.close_connections(abort=True)
        self.accept_log.stop()
        # Shadow checks still running decide nothing: cancelled rather than
        # awaited, before their backends go.
        cancel_shadows = getattr(self.factory.decider, "cancel_shadows", None)
        if cancel_shadows is not None and cancel_shadows():
            self._log.info("stopping: cancelled the shadow checks still running")
        await self.backends.stopService()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())


#: The first generation's collection threshold while serving (Python's
#: default is 700 allocations of container objects).
SERVING_GC_THRESHOLD = 10_000


class CollectorTuning(Service):
    """
    Keeps Python's cyclic garbage collector out of the way of a busy daemon.

    What is loaded by the time the daemon starts (Twisted, the checks, maps
    of 100,000 entries) lives as long as the process, but every full
    collection traversed all of it: 20-40 ms during which no request was
    answered, the p99 latency of a chain waiting on a backend. On start,
    C{gc.freeze()} moves those objects out of the collector's sight, and
    the first generation is collected every L{SERVING_GC_THRESHOLD} new
    containers instead of 700 (an asynchronous answer allocates a few
    dozen). On stop, both are undone.
    """

    def __init__(
        self,
        freeze: Callable[[], None] = gc.freeze,
        unfreeze: Callable[[], None] = gc.unfreeze,
        get_threshold: Callable[[], tuple[int, ...]] = gc.get_threshold,
        set_threshold: Callable[..., None] = gc.set_threshold,
    ) -> None:
        self._freeze = freeze
        self._unfreeze = unfreeze
        self._get_threshold = get_threshold
        self._set_threshold = set_threshold
        self._previous: Optional[tuple[int, ...]] = None

    def startService(self) -> None:
        super().startService()
        self._previous = self._get_threshold()
        self._set_threshold(max(SERVING_GC_THRESHOLD, self._previous[0]), *self._previous[1:])
        self._freeze()

    def stopService(self) -> None:
        super().stopService()
        self._unfreeze()
        if self._previous is not None:
            self._set_threshold(*self._previous)
            self._previous = None
