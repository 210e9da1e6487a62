"""
SIGHUP: validate the new configuration, diff it, swap it in.

C{kill -HUP} (and C{systemctl reload pfxpold}) makes a L{Reloader} read the
configuration file again. It is built in full first, through the same
L{pfxpold.config.load_configuration} that C{--check-config} uses, with the
configuration in force as C{previous}: checks whose settings did not change
are kept as the very objects that run (caches, connections, timers), and so
are shared stores whose settings did not change (in-memory quota counters
and greylist entries survive). The new checks and stores are started and
the files and databases they name opened (their optional C{verify()}
method); only then does the listeners' factory get the new chain. A file
that cannot be used, or a new check that cannot start, changes nothing:
the error is logged on one line and the old configuration keeps serving.

Requests that started on the old chain finish on it. The checks and stores
the new configuration no longer uses are stopped once those requests are
answered (at most the old chain's deadline, or C{shutdown_grace}).

SIGUSR1 is twistd's: with C{--logfile} it rotates the log. Where twistd
does not handle it (logging to stdout, syslog or a C{--logger}), the
default action would kill the daemon; L{SignalService} then handles it by
reopening the request log file if it was moved.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any, Optional

from twisted.application.service import IService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from pfxpold.config import Configuration
from pfxpold.escape import escape
from pfxpold.resources import AcceptErrorLogEndpoint, with_backlog

#: Seconds a new check's or store's C{verify()} may take before the reload
#: is given up.
VERIFY_TIMEOUT = 30.0


def _contains(items: Iterable[Any], item: Any) -> bool:
    return any(candidate is item for candidate in items)


class ServiceSet(Service):
    """
    The checks and shared objects of the configuration in force, started
    and stopped with the daemon.

    Unlike a L{twisted.application.service.MultiService}, it takes members
    that are already running (a reload starts them before it swaps them in)
    and lets two members share a service name (a changed check and its
    successor, while requests on the old chain finish).
    """

    def __init__(self, members: Iterable[IService] = ()) -> None:
        self.members: list[IService] = list(members)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for member in self.members:
            member.privilegedStartService()

    def startService(self) -> None:
        super().startService()
        for member in self.members:
            member.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stopping = [maybeDeferred(member.stopService) for member in reversed(self.members)]
        return DeferredList(stopping, consumeErrors=True).addCallback(lambda _: None)

    def adopt(self, member: IService) -> None:
        """
        Add a member that is already running.
        """
        self.members.append(member)

    def retire(self, member: IService) -> Deferred[None]:
        """
        Remove a member and stop it (if it is still a member: a daemon
        stopping meanwhile has stopped it already).
        """
        if not _contains(self.members, member):
            return succeed(None)
        self.members = [m for m in self.members if m is not member]
        return maybeDeferred(member.stopService)


@implementer(IStreamServerEndpoint)
class _Listening:
    """
    An endpoint whose port is already listening: lets a reload bind a new
    port first (and give up if it cannot) before a listener service owns it.
    """

    def __init__(self, port: IListeningPort) -> None:
        self._port = port

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        return succeed(self._port)


class ReloadFailed(Exception):
    """
    A new check or store could not start; the message names it.
    """


def check_changes(old: Configuration, new: Configuration) -> dict[str, list[str]]:
    """
    What a reload changes in the checks.

    @return: C{added}, C{removed}, C{changed} (rebuilt and restarted),
        C{retuned} (the same running object, with another C{timeout},
        C{on_error} or place in the chain) and C{unchanged} check names.
    """
    old_names = [entry.name for entry in old.chain.entries]
    new_names = [entry.name for entry in new.chain.entries]
    result: dict[str, list[str]] = {
        "added": [name for name in new_names if name not in old_names],
        "removed": [name for name in old_names if name not in new_names],
        "changed": [],
        "retuned": [],
        "unchanged": [],
    }
    old_entries = {entry.name: entry for entry in old.chain.entries}
    for position, entry in enumerate(new.chain.entries):
        previous = old_entries.get(entry.name)
        if previous is None:
            continue
        if previous.check is not entry.check:
            result["changed"].append(entry.name)
        elif (
            previous.timeout != entry.timeout
            or previous.on_error != entry.on_error
            or old_names.index(entry.name) != position
        ):
            result["retuned"].append(entry.name)
        else:
            result["unchanged"].append(entry.name)
    return result


def _server_changed(old: Configuration, new: Configuration) -> bool:
    return (
        old.limits != new.limits
        or old.log_requests != new.log_requests
        or old.shutdown_grace != new.shutdown_grace
        or old.chain.default_action != new.chain.default_action
        or old.chain.deadline != new.chain.deadline
        or old.chain.deadline_policy != new.chain.deadline_policy
        or old.chain.restriction_classes != new.chain.restriction_classes
        or old.chain.record_verdicts != new.chain.record_verdicts
        or old.chain.postfix_version != new.chain.postfix_version
        or old.chain.parallel != new.chain.parallel
    )


def _names(values: list[str]) -> str:
    return ", ".join(values) if values else "none"


class Reloader:
    """
    Reloads a L{pfxpold.service.PolicyService}'s configuration.

    @ivar reloads_succeeded: reloads swapped in since start.
    @ivar reloads_failed: reloads that changed nothing because the file or
        a new check could not be used.
    @ivar last_reload_time: when the last reload ended (the reactor's
        time), or L{None} before the first.
    @ivar last_reload_ok: whether it succeeded, or L{None} before the first.
    @ivar retiring: a Deferred that fires once the checks and stores the
        last reload replaced are stopped.
    """

    _log = Logger()

    def __init__(
        self,
        service: Any,
        load: Callable[[Configuration], Configuration],
        reactor: Any,
        pool: Any = None,
        adopted: bool = False,
    ) -> None:
        """
        @param service: the L{pfxpold.service.PolicyService}.
        @param load: builds the configuration from the file, given the one
            in force; raises an exception whose message is the one-line
            error (L{pfxpold.config.ConfigError}, C{usage.UsageError}).
        @param pool: the L{pfxpold.workers.WorkerPool} of a parent, told to
            reload its workers after the parent did.
        @param adopted: whether this is a worker, serving its parent's
            sockets (C{listen} changes are then the parent's to report).
        """
        self.service = service
        self.load = load
        self.reactor = reactor
        self.pool = pool
        self.adopted = adopted
        self.reloads_succeeded = 0
        self.reloads_failed = 0
        self.last_reload_time: Optional[float] = None
        self.last_reload_ok: Optional[bool] = None
        self.retiring: Deferred[None] = succeed(None)
        self._busy = False
        self._again = False
        self._waiters: list[Deferred[bool]] = []

    def reload(self) -> Deferred[bool]:
        """
        Reload now; a reload asked for while one runs runs after it (once,
        however many were asked for).

        @return: a Deferred that fires with whether the reload succeeded;
            it never fails.
        """
        waiter: Deferred[bool] = Deferred()
        self._waiters.append(waiter)
        if self._busy:
            self._again = True
        else:
            self._cycle()
        return waiter

    def _cycle(self) -> None:
        self._busy = True
        self._again = False
        waiters, self._waiters = self._waiters, []

        def done(ok: bool) -> None:
            self._busy = False
            for waiter in waiters:
                waiter.callback(ok)
            if self._again:
                self._cycle()

        def broke(failure: Any) -> bool:
            # A bug, not a bad file: still never leave the reloader busy.
            self._log.failure("reload failed unexpectedly", failure)
            self.reloads_failed += 1
            self.last_reload_ok = False
            self.last_reload_time = self.reactor.seconds()
            return False

        Deferred.fromCoroutine(self._reload()).addErrback(broke).addCallback(done)

    def _failed(self, message: str) -> bool:
        self.reloads_failed += 1
        self.last_reload_ok = False
        self.last_reload_time = self.reactor.seconds()
        self._log.error(
            "reload failed; still serving the previous configuration: {error}",
            error=escape(message),
        )
        return False

    async def _reload(self) -> bool:
        service = self.service
        old: Configuration = service.configuration
        self._log.info(
            "SIGHUP: reloading {path}", path=old.path or "(no file: the demo configuration)"
        )
        try:
            new = self.load(old)
        except Exception as e:
            return self._failed(str(e) or type(e).__name__)
        added = [IService(s) for s in new.services if not _contains(old.services, s)]
        retired = [IService(s) for s in old.services if not _contains(new.services, s)]
        try:
            await self._start(old, new, added)
        except ReloadFailed as e:
            return self._failed(str(e))
        except Exception as e:
            # A check type's own start broke in a way of its own.
            return self._failed(f"{new.path}: {type(e).__name__}: {e}")
        self._swap(old, new, added)
        await self._listen(old, new)
        changes = check_changes(old, new)
        self.reloads_succeeded += 1
        self.last_reload_ok = True
        self.last_reload_time = self.reactor.seconds()
        self._log.info(
            "reloaded {path}: checks added: {added}; removed: {removed}; changed: {changed};"
            " unchanged: {unchanged}; server settings {server}",
            path=new.path or "(no file)",
            added=_names(changes["added"]),
            removed=_names(changes["removed"]),
            changed=_names(
                changes["changed"]
                + [f"{name} (timeout, on_error or order)" for name in changes["retuned"]]
            ),
            unchanged=_names(changes["unchanged"]),
            server="changed" if _server_changed(old, new) else "unchanged",
            changes=changes,
        )
        if self.pool is not None:
            count = self.pool.signal_workers(signal.SIGHUP)
            self._log.info("reload: told {count} workers to reload", count=count)
        self.retiring = self._retire(old, new, retired)
        return True

    async def _start(self, old: Configuration, new: Configuration, added: list[IService]) -> None:
        """
        Start what the new configuration adds and open what it names.

        @raise ReloadFailed: naming the check or store that failed; what was
            started is stopped again.
        """
        names = _object_names(new)
        started: list[IService] = []
        try:
            for member in added:
                try:
                    member.startService()
                except Exception as e:
                    raise ReloadFailed(
                        f"{new.path}: {names.get(id(member), 'a check')}: cannot start:"
                        f" {type(e).__name__}: {e}"
                    ) from None
                started.append(member)
            old_objects = [entry.check for entry in old.chain.entries] + [
                record.value for record in old.shared.values()
            ]
            new_objects = [entry.check for entry in new.chain.entries] + [
                record.value for record in new.shared.values()
            ]
            for thing in new_objects:
                verify = getattr(thing, "verify", None)
                if verify is None or _contains(old_objects, thing):
                    continue
                checking = maybeDeferred(verify)
                checking.addTimeout(VERIFY_TIMEOUT, self.reactor)
                try:
                    await checking
                except Exception as e:
                    raise ReloadFailed(
                        f"{new.path}: {names.get(id(thing), 'a check')}: cannot be opened:"
                        f" {e or type(e).__name__}"
                    ) from None
        except ReloadFailed:
            for member in reversed(started):
                try:
                    await maybeDeferred(member.stopService)
                except Exception:
                    self._log.failure("reload: stopping a check that did not start failed")
            raise

    def _swap(self, old: Configuration, new: Configuration, added: list[IService]) -> None:
        """
        New requests go to the new chain from now on; connections and
        requests in flight stay as they are.
        """
        service = self.service
        factory = service.factory
        for member in added:
            service.checks.adopt(member)
        metrics = getattr(service, "metrics", None)
        if metrics is not None:
            # The figures go on under the same check and store names.
            metrics.instrument(new.chain)
        factory.decider = new.chain
        # Read per request by open connections too, except the longest
        # line, which a connection takes when it opens.
        factory.limits = new.limits
        factory.log_requests = new.log_requests
        if new.request_log != old.request_log:
            self._log.warn(
                "reload: server.request_log changed; it takes effect when pfxpold is"
                " restarted (still writing to {path})",
                path=old.request_log or "twistd's log",
            )
            new.request_log = old.request_log
        if new.metrics_listen != old.metrics_listen:
            self._log.warn(
                "reload: [metrics] changed; it takes effect when pfxpold is restarted"
                " ({endpoint})",
                endpoint=(
                    f"still serving /metrics on {old.metrics_listen}"
                    if old.metrics_listen
                    else "metrics stay off"
                ),
            )
            new.metrics_listen = old.metrics_listen
        factory.log_verdicts = new.log_verdicts
        if (new.log_max_bytes, new.log_keep) != (old.log_max_bytes, old.log_keep):
            self._log.warn(
                "reload: server.log_max_bytes or server.log_keep changed; it takes effect"
                " when pfxpold is restarted (still {max_bytes} bytes, keeping {keep})",
                max_bytes=old.log_max_bytes,
                keep=old.log_keep or "all",
            )
            new.log_max_bytes, new.log_keep = old.log_max_bytes, old.log_keep
        if new.capture != old.capture:
            self._log.warn(
                "reload: server.capture changed; it takes effect when pfxpold is restarted"
                " ({capture})",
                capture=f"still capturing to {old.capture.path}" if old.capture else "no capture",
            )
            new.capture = old.capture
            # The capture goes on recording each check's verdict.
            new.chain.record_verdicts = new.log_verdicts or old.capture is not None
        service.configuration = new

    async def _listen(self, old: Configuration, new: Configuration) -> None:
        """
        Open the endpoints C{listen} adds and close those it removes; when
        one cannot be opened (a privileged port after C{--uid}), keep the
        listeners as they are.
        """
        if new.listen == old.listen:
            return
        if self.adopted:
            # A worker serves its parent's sockets; the parent reports.
            new.listen = old.listen
            return
        if self.pool is not None:
            self._log.warn(
                "reload: server.listen changed; with --workers the listening sockets are"
                " shared with the worker processes: restart pfxpold to apply it (still"
                " listening on {listen})",
                listen=", ".join(old.listen),
            )
            new.listen = old.listen
            return
        service = self.service
        opened: list[tuple[str, IListeningPort]] = []
        for description in new.listen:
            if description in service.listening:
                continue
            try:
                # Like the listeners made at start: the backlog asked for,
                # and accept errors (out of open files) kept to a few lines.
                endpoint = AcceptErrorLogEndpoint(
                    endpoints.serverFromString(
                        self.reactor, with_backlog(description, new.backlog)
                    ),
                    service.accept_log,
                )
                port = await endpoint.listen(service.factory)
            except Exception as e:
                for _, port in opened:
                    await maybeDeferred(port.stopListening)
                reason = getattr(e, "socketError", None) or e
                self._log.error(
                    "reload: cannot listen on {endpoint}: {reason}; keeping the listeners"
                    " as they are ({listen}); restart pfxpold to apply server.listen",
                    endpoint=description,
                    reason=escape(str(reason)),
                    listen=", ".join(old.listen),
                )
                new.listen = old.listen
                return
            opened.append((description, port))
        for description, port in opened:
            listener = endpoints_service(_Listening(port), service.factory)
            listener.setServiceParent(service.listeners)
            service.listening[description] = listener
        closing = []
        for description in list(service.listening):
            if description not in new.listen:
                listener = service.listening.pop(description)
                closing.append(maybeDeferred(service.listeners.removeService, listener))
        await DeferredList(closing, consumeErrors=True)
        self._log.info(
            "reload: listening on {listen} (was {previous})",
            listen=", ".join(new.listen),
            previous=", ".join(old.listen),
        )

    async def _retire_now(
        self, old: Configuration, new: Configuration, retired: list[IService]
    ) -> None:
        factory = self.service.factory
        if factory.in_flight:
            # Requests on the old chain are answered within its deadline.
            drained = factory.drained()
            drained.addTimeout(min(old.chain.deadline, new.shutdown_grace), self.reactor)
            try:
                await drained
            except Exception:
                self._log.warn(
                    "reload: stopping the replaced checks with {count} requests still in flight",
                    count=factory.in_flight,
                )
        for member in reversed(retired):
            try:
                await self.service.checks.retire(member)
            except Exception:
                self._log.failure("reload: stopping a replaced check failed")

    def _retire(
        self, old: Configuration, new: Configuration, retired: list[IService]
    ) -> Deferred[None]:
        if not retired:
            return succeed(None)
        return Deferred.fromCoroutine(self._retire_now(old, new, retired))


def endpoints_service(endpoint: IStreamServerEndpoint, factory: Any) -> IService:
    """
    A listener service for C{endpoint}, as C{strports.service} makes them.
    """
    from twisted.application.internet import StreamServerEndpointService

    return StreamServerEndpointService(endpoint, factory)


def _object_names(configuration: Configuration) -> dict[int, str]:
    """
    How an error names each check and shared object, by C{id()}.
    """
    names: dict[int, str] = {}
    for key, record in configuration.shared.items():
        label = " ".join(str(part) for part in key) if isinstance(key, tuple) else str(key)
        names[id(record.value)] = label
    for entry in configuration.chain.entries:
        names[id(entry.check)] = f"check {entry.name!r}"
    return names


class SignalService(Service):
    """
    While running: SIGHUP reloads the configuration; SIGUSR1, where twistd
    does not rotate its log file on it (it logs to stdout, syslog or a
    C{--logger}), reopens the request log file if it was moved, instead of
    killing the daemon. The handlers only hand the work to the reactor
    thread; they are restored on stop.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        reloader: Reloader,
        request_log: Callable[[], Any] = lambda: None,
        install: Callable[[int, Any], Any] = signal.signal,
        getsignal: Callable[[int], Any] = signal.getsignal,
    ) -> None:
        """
        @param request_log: gives the request log in use (a
            L{pfxpold.requestlog.FileRequestLog}) or L{None}.
        @param install: C{signal.signal}, or a fake in tests.
        @param getsignal: C{signal.getsignal}, or a fake in tests.
        """
        self.reactor = reactor
        self.reloader = reloader
        self.request_log = request_log
        self._install = install
        self._getsignal = getsignal
        self._saved: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        self._saved[signal.SIGHUP] = self._getsignal(signal.SIGHUP)
        self._install(signal.SIGHUP, self._hangup)
        previous = self._getsignal(signal.SIGUSR1)
        # twistd installs its own handler when it logs to a file (it
        # rotates the file): that one stays.
        if previous is None or previous == signal.SIG_DFL:
            self._saved[signal.SIGUSR1] = previous
            self._install(signal.SIGUSR1, self._user1)

    def stopService(self) -> None:
        super().stopService()
        saved, self._saved = self._saved, {}
        for number, previous in saved.items():
            self._install(number, signal.SIG_DFL if previous is None else previous)

    def _hangup(self, number: int, frame: Any) -> None:
        # In a signal handler: only hand over to the reactor thread.
        self.reactor.callFromThread(self.reloader.reload)

    def _user1(self, number: int, frame: Any) -> None:
        self.reactor.callFromThread(self.user1)

    def user1(self) -> None:
        """
        What SIGUSR1 does when twistd does not rotate a log file on it.
        """
        request_log = self.request_log()
        reopen = getattr(request_log, "reopen_if_moved", None)
        if reopen is None:
            self._log.info(
                "SIGUSR1: twistd's log is not a file here and there is no request log file:"
                " nothing to rotate"
            )
            return
        self._log.info(
            "SIGUSR1: reopening the request log {path} if it was moved", path=request_log.path
        )
        reopen()
