"""
The service tree of a running daemon: listeners, and the checks and shared
backends that need starting and stopping.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any, Optional

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from pfxpold.config import Configuration
from pfxpold.protocol import PolicyFactory
from pfxpold.requestlog import FileRequestLog
from pfxpold.workers import RecordingEndpoint


class PolicyService(MultiService):
    """
    Serves the policy protocol with one configuration, on the listeners it
    configures, or on C{adopted} endpoints (in a worker process, see
    L{pfxpold.workers}).

    Backends start first and listeners last, so no request arrives before
    the checks can answer it. On stop (SIGTERM), listeners stop accepting,
    requests in flight are answered for up to C{shutdown_grace} seconds,
    connections are closed, and then the backends stop.
    """

    _log = Logger()

    def __init__(
        self,
        configuration: Configuration,
        reactor: Any,
        adopted: Optional[list[IStreamServerEndpoint]] = None,
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
        if configuration.log_requests and configuration.request_log is not None:
            # A backend: it starts before the listeners and stops after
            # the last answer, flushing it.
            request_log = FileRequestLog(configuration.request_log, reactor)
            request_log.setServiceParent(self.backends)
            self.factory.request_log = request_log
        for backend in configuration.services:
            IService(backend).setServiceParent(self.backends)
        self.listeners = MultiService()
        self.listeners.setServiceParent(self)
        #: The L{pfxpold.metrics.Metrics} counting this process's work, or
        #: L{None} without a [metrics] table (nothing imported, nothing
        #: counted).
        self.metrics: Optional[Any] = None
        if configuration.metrics_listen is not None:
            self._start_metrics(configuration.metrics_listen, bool(adopted))
        #: The listening endpoints, which keep their ports for worker processes.
        self.recorders: list[RecordingEndpoint] = []
        if adopted:
            # A worker process serves the sockets its parent passed it.
            for endpoint in adopted:
                StreamServerEndpointService(endpoint, self.factory).setServiceParent(self.listeners)
            return
        for description in configuration.listen:
            listener = strports.service(description, self.factory, reactor=reactor)
            recorder = RecordingEndpoint(listener.endpoint)
            listener.endpoint = recorder
            self.recorders.append(recorder)
            listener.setServiceParent(self.listeners)

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
        super().startService()
        self._log.info(
            "pfxpold serving on {listen} with checks {checks}",
            listen=", ".join(self.configuration.listen),
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
