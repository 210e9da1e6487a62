"""
The service tree of a running daemon: listeners, and the checks and shared
backends that need starting and stopping.
"""

from __future__ import annotations

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
