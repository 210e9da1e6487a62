"""
What a daemon serving many Postfix connections needs from the system: open
files, a listen queue, and a log that stays readable when files run out.

Each smtpd process keeps one connection open, and busy relays run several
hundred; with the usual soft limit of 1024 open files, about a thousand
connections are the ceiling. L{raise_open_files_limit} raises the soft
limit to the hard one at start. L{with_backlog} asks for a longer listen
queue than Twisted's default of 50, which a thousand smtpd processes
connecting at once overflow. When files do run out anyway, Twisted logs
one line for every connection it cannot accept, in a loop;
L{AcceptErrorLog} keeps that to one line per interval and a count.
"""

from __future__ import annotations

import re
import resource
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from zope.interface import implementer

#: The listen queue asked for when the configuration does not say.
DEFAULT_BACKLOG = 1024

#: Endpoint types whose description takes C{backlog=N}.
_BACKLOG_TYPES = ("tcp", "tcp6", "unix")
_HAS_BACKLOG = re.compile(r"(?<!\\):backlog=")

#: Seconds during which accept errors after the first are only counted.
ACCEPT_ERROR_INTERVAL = 10.0

_log = Logger()


def raise_open_files_limit(resource_module: Any = resource) -> tuple[int, int]:
    """
    Raise the soft limit of open files to the hard limit, and log both.

    @param resource_module: the L{resource} module, or a stand-in (tests).
    @return: the soft limit before and after.
    """
    soft, hard = resource_module.getrlimit(resource_module.RLIMIT_NOFILE)
    if hard == resource_module.RLIM_INFINITY or soft == hard:
        # An unlimited hard limit cannot be a soft one (Linux refuses more
        # than fs.nr_open); leave it as the administrator set it.
        _log.info("open files limit: {soft}", soft=_show(soft, resource_module))
        return soft, soft
    try:
        resource_module.setrlimit(resource_module.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:
        _log.warn(
            "open files limit: {soft}; cannot raise it to {hard}: {reason}",
            soft=soft,
            hard=hard,
            reason=e,
        )
        return soft, soft
    _log.info("open files limit: {soft} -> {hard}", soft=soft, hard=hard)
    return soft, hard


def _show(limit: int, resource_module: Any) -> str:
    return "unlimited" if limit == resource_module.RLIM_INFINITY else str(limit)


def with_backlog(description: str, backlog: int) -> str:
    """
    @return: the server endpoint C{description} asking for a listen queue
        of C{backlog} connections, when it is a C{tcp:}, C{tcp6:} or
        C{unix:} endpoint that does not ask for one already; else
        unchanged (systemd's sockets come with their own).
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_TYPES or _HAS_BACKLOG.search(description):
        return description
    return f"{description}:backlog={backlog}"


#: How Twisted's tcp.Port words the events of a failed accept(2).
_ACCEPT_ERRORS = ("Could not accept new connection", "EMFILE", "Re-reserving EMFILE")


@implementer(ILogObserver)
class AcceptErrorLog:
    """
    Passes a listening port's log events on, but of the lines Twisted logs
    for connections it cannot accept (C{EMFILE}: out of open files), only
    the first in each C{interval} seconds; at the end of the interval, one
    line counts the others. Out of files, Twisted otherwise logs a line for
    every refused connection, as fast as the reactor loops.

    @ivar suppressed: accept errors not logged since the daemon started
        (for the metrics).
    """

    def __init__(
        self,
        clock: IReactorTime,
        observer: ILogObserver = globalLogPublisher,
        interval: float = ACCEPT_ERROR_INTERVAL,
    ) -> None:
        self._clock = clock
        self._observer = observer
        self._interval = interval
        self._timer: Optional[IDelayedCall] = None
        self._pending = 0
        self.suppressed = 0

    def __call__(self, event: dict[str, Any]) -> None:
        text = event.get("log_format") or ""
        if not text.startswith(_ACCEPT_ERRORS):
            self._observer(event)
            return
        if self._timer is None:
            self._observer(event)
            self._timer = self._clock.callLater(self._interval, self._report)
        else:
            self._pending += 1
            self.suppressed += 1

    def _report(self) -> None:
        self._timer = None
        if not self._pending:
            return
        count, self._pending = self._pending, 0
        Logger(namespace="pfxpold.resources", observer=self._observer).warn(
            "{count} more connections could not be accepted (or were closed at once)"
            " in the last {seconds}s: out of open files? (see LimitNOFILE)",
            count=count,
            seconds=self._interval,
        )
        # Quiet for another interval: the next error is counted too.
        self._timer = self._clock.callLater(self._interval, self._report)

    def stop(self) -> None:
        """
        Report what is counted and stop the timer (the daemon stops).
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None
            if self._pending:
                self._report()
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None


@implementer(IStreamServerEndpoint)
class AcceptErrorLogEndpoint:
    """
    Wraps a server endpoint so that the ports it listens on log accept
    errors through an L{AcceptErrorLog}.

    Twisted's C{tcp.Port} (and C{unix.Port}, its subclass) logs them
    through its C{_logger}, a L{Logger} shared by the class: the one hook
    there is, without a Port subclass of our own (which the endpoints would
    not build) or a filter in front of every observer of the process.
    Ports without it are left alone.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, accept_log: AcceptErrorLog) -> None:
        #: The endpoint wrapped.
        self.endpoint = endpoint
        self._accept_log = accept_log

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            logger = getattr(port, "_logger", None)
            if isinstance(logger, Logger):
                port._logger = Logger(  # type: ignore[attr-defined]
                    namespace=logger.namespace, source=port, observer=self._accept_log
                )
            return port

        listened: Deferred[IListeningPort] = self.endpoint.listen(factory)
        return listened.addCallback(listening)


__all__ = [
    "ACCEPT_ERROR_INTERVAL",
    "DEFAULT_BACKLOG",
    "AcceptErrorLog",
    "AcceptErrorLogEndpoint",
    "raise_open_files_limit",
    "with_backlog",
]
