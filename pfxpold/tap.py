"""
The twistd plugin's command line: C{twistd pfxpold [options]}.
"""

from __future__ import annotations

import codecs
import os
import signal
import socket
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Any, NoReturn, Optional

from twisted.application.service import IService, MultiService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from pfxpold import __version__, logger, workers
from pfxpold.config import (
    DEFAULT_LISTEN,
    ConfigError,
    Configuration,
    default_configuration,
    endpoint_description,
    endpoint_fields,
    listen_problem,
    load_configuration,
    server_error,
    socket_path,
)
from pfxpold.interfaces import IConfigWarnings
from pfxpold.stages import chain_warnings

__all__ = ["Options", "endpoint_description", "makeService"]

#: Options only pfxpold itself passes (to worker processes): not in --help.
_HIDDEN_OPTIONS = ("adopt=",)

_log = Logger()


def fail(message: str) -> NoReturn:
    """
    Stop with a configuration or start-up error for a mail admin: one line
    on stderr, exit status 1, without twistd's usage text or a traceback.
    """
    raise SystemExit(" ".join(message.splitlines()))


def _socket_root(twistd_options: Optional[Mapping[str, Any]]) -> tuple[str, Optional[str]]:
    """
    Where twistd will bind UNIX sockets: the directory relative paths are
    resolved from (C{--rundir}; C{/} inside the jail with C{--chroot}), and
    the jail.
    """
    options = twistd_options or {}
    rundir = options.get("rundir") or "."
    chroot = options.get("chroot")
    if chroot:
        return ("/" if rundir == "." else os.path.join("/", rundir)), os.path.abspath(chroot)
    return os.path.abspath(rundir), None


def _strerror(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    return str(error) or type(error).__name__


def probe_listen(description: str, root: str, jail: Optional[str] = None) -> Optional[str]:
    """
    Try whether a TCP port can be bound now, or a UNIX socket's path is
    free, so that a port in use is reported in one line before twistd
    daemonizes (a failure after that reaches the admin only as twistd's
    "An error has occurred" and the log). The probe socket is closed at
    once; what listens is made later, by the listeners as usual.

    @return: what is wrong, or L{None} (also for endpoint types not probed).
    """
    kind, positional, keywords = endpoint_fields(description)
    if kind in ("tcp", "tcp6", "ssl"):
        port = keywords.get("port", positional[0] if positional else None)
        if port is None or not port.strip().isdigit():
            return None
        interface = keywords.get("interface", "::" if kind == "tcp6" else "")
        family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            # As Twisted's listening ports do: TIME_WAIT connections of an
            # earlier run must not count as "in use".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((interface, int(port)))
        except (OSError, OverflowError) as e:
            return f"cannot listen on {description}: {_strerror(e)}"
        finally:
            probe.close()
    elif kind == "unix":
        address = keywords.get("address", positional[0] if positional else None)
        if not address or address.startswith("@"):
            return None
        path = socket_path(address, root, jail)
        if keywords.get("lockfile", "1") in ("0", ""):
            # Without its lock file, Twisted binds where a file is: in use.
            if os.path.lexists(path):
                return f"cannot listen on {description}: address already in use ({path} exists)"
        else:
            # With it (the default), Twisted replaces a socket left behind
            # unless a live process holds the lock: look, but never take
            # the lock, which would make the stale socket look clean.
            owner = _lock_owner(path + ".lock")
            if owner is not None:
                return f"cannot listen on {description}: address already in use (by pid {owner})"
    return None


def _lock_owner(lock: str) -> Optional[int]:
    """
    The live process holding a Twisted L{FilesystemLock} (a symbolic link
    to its PID), or L{None}.
    """
    try:
        pid = int(os.readlink(lock))
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _describe_listen_error(error: CannotListenError, listen: list[str]) -> str:
    """
    The endpoint description C{error} is about, as the admin wrote it.
    """
    for description in listen:
        kind, positional, keywords = endpoint_fields(description)
        key = "address" if kind == "unix" else "port"
        value = keywords.get(key, positional[0] if positional else None)
        if value is not None and value.strip() == str(error.port):
            return description
    return f"{error.interface or ''}:{error.port}"


def install_startup_error_hook(listen: list[str]) -> None:
    """
    Make a listener that cannot bind when twistd starts the service (the
    rare port taken between the probe and the start) end the process with
    one line on the real stderr instead of a traceback, which twistd would
    send to the log file; the exit status stays 1. Any other exception is
    left to the hook there was.
    """
    previous = sys.excepthook

    def hook(
        kind: type[BaseException], value: BaseException, traceback: Optional[TracebackType]
    ) -> None:
        if not isinstance(value, CannotListenError):
            previous(kind, value, traceback)
            return
        line = (
            f"pfxpold: cannot listen on {_describe_listen_error(value, listen)}:"
            f" {_strerror(value.socketError)}"
        )
        _log.critical("{startup_error}", startup_error=line)
        stderr = sys.__stderr__
        if stderr is not None:
            stderr.write(line + "\n")
            stderr.flush()

    sys.excepthook = hook


def _global_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def endpoint_problem(reactor: Any, description: str) -> Optional[str]:
    """
    What keeps Twisted from making an endpoint of C{description}, in words
    for a mail admin, or L{None}.
    """
    try:
        endpoints.serverFromString(reactor, description)
    except IndexError:
        if description.startswith("systemd:"):
            return (
                "systemd passed no socket at that index (LISTEN_FDS, LISTEN_FDNAMES):"
                " start pfxpold through its .socket unit, or listen on another endpoint"
            )
        return "IndexError: not an endpoint string"
    except Exception as e:
        # Parsers raise what they like: OSError for a missing TLS
        # certificate, ValueError for an unknown type. All of them are the
        # admin's to fix.
        return f"{type(e).__name__}: {e or 'not an endpoint string'}"
    return None


def configuration_warnings(configuration: Configuration) -> list[str]:
    """
    What the checks providing L{IConfigWarnings} find doubtful in their own
    settings (a rule no request reaches), and the answers checks can give
    at a stage where Postfix would not honour them (L{pfxpold.stages}),
    one C{warning: CHECK: ...} line each. Warnings never fail
    C{--check-config}.
    """
    lines: list[str] = []
    for entry in configuration.chain.entries:
        if not IConfigWarnings.providedBy(entry.check):
            continue
        try:
            warnings = list(entry.check.config_warnings())
        except Exception as e:
            warnings = [f"could not look for warnings: {type(e).__name__}: {e}"]
        lines.extend(f"warning: {entry.name}: {' '.join(str(w).splitlines())}" for w in warnings)
    # Answers Postfix would not honour where a check can give them.
    chain = configuration.chain
    lines.extend(
        f"warning: {line}"
        for line in chain_warnings(chain.entries, chain.postfix_version, chain.default_action)
    )
    return lines


class Options(usage.Options):
    """
    Options for C{twistd pfxpold}.
    """

    synopsis = "[--port ENDPOINT]... [--config FILE] [--workers N] [--check-config]"
    longdesc = (
        "pfxpold answers Postfix SMTPD policy requests by running the chain of "
        "checks in its configuration file. Without --config it runs the demo "
        f"check on {DEFAULT_LISTEN}. --port takes a port number (listens on "
        "127.0.0.1) or a Twisted endpoint string such as unix:/run/pfxpold.sock "
        "or tcp6:9998:interface=\\:\\:1, and may be given more than once; it "
        "replaces the configuration's server.listen. The configuration file "
        "may also be given in the PFXPOLD_CONFIG environment variable."
    )

    optFlags = [
        [
            "check-config",
            None,
            "Check the configuration, print a summary (and the checks' warnings, on"
            " stderr) and exit.",
        ],
    ]
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: $PFXPOLD_CONFIG)."],
        [
            "workers",
            None,
            1,
            "Processes serving the listening ports: this one and N-1 workers"
            " (one per core; state shared between them must live in the store).",
            int,
        ],
    ]
    compData = usage.Completions(optActions={"config": usage.CompleteFiles("*.toml")})

    def __init__(self, reactor: Any = None) -> None:
        """
        @param reactor: the reactor checks are built with; the global one
            (imported only then) when L{None}, as under twistd.
        """
        super().__init__()
        self["port"] = []
        self["adopt"] = []
        self.reactor = reactor
        self.configuration: Optional[Configuration] = None

    def opt_port(self, port: str) -> None:
        """
        Listen on this endpoint; a bare number means 127.0.0.1:number. Repeat for more listeners.
        """
        self["port"].append(endpoint_description(port))

    opt_p = opt_port

    def getUsage(self, width: Optional[int] = None) -> str:
        # --adopt is for worker processes only; it still works, unlisted.
        shown = self.longOpt
        self.longOpt = [option for option in shown if option not in _HIDDEN_OPTIONS]
        try:
            return super().getUsage(width)
        finally:
            self.longOpt = shown

    def opt_adopt(self, specification: str) -> None:
        """
        Internal, for worker processes: serve the inherited listening socket FD:FAMILY.
        """
        self["adopt"].append(specification)

    def opt_version(self) -> None:
        """
        Print pfxpold's version and exit.
        """
        print(f"pfxpold {__version__}")
        sys.exit(0)

    def load(self, reactor: Any, previous: Optional[Configuration] = None) -> Configuration:
        """
        Build the configuration these options name, with C{reactor}.

        @param previous: the configuration in force, on a reload: what is
            unchanged is kept (see L{pfxpold.config.load_document}).
        @raise usage.UsageError: with one line naming what is wrong (file,
            table or check, and key; or C{--port}). An exception, not a
            L{SystemExit}, so that a caller may survive it (a reload); only
            L{postOptions} and L{makeService} turn it into L{fail}.
        """
        try:
            if self["config"]:
                configuration = load_configuration(self["config"], reactor, previous)
            else:
                configuration = default_configuration(reactor, previous)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["port"]:
            configuration.listen = list(self["port"])
        root, jail = _socket_root(getattr(self, "parent", None))
        if configuration.metrics_listen is not None:
            problem = endpoint_problem(reactor, configuration.metrics_listen)
            if problem is not None:
                raise usage.UsageError(
                    f"{configuration.path or '<configuration>'}: [metrics] key 'listen':"
                    f" cannot listen on {configuration.metrics_listen!r}: {problem}"
                )
        for description in configuration.listen:
            problem = endpoint_problem(reactor, description)
            if problem is None:
                problem = listen_problem(description, root, jail)
            if problem is None:
                continue
            if self["port"] or not configuration.path:
                raise usage.UsageError(f"pfxpold: --port {description!r}: {problem}")
            raise usage.UsageError(
                str(server_error(configuration.path, "listen", f"{description!r}: {problem}"))
            )
        return configuration

    def load_or_fail(self, reactor: Any) -> Configuration:
        """
        L{load}, stopping with one line on stderr when it fails: twistd
        would print a L{usage.UsageError} after the whole of --help.
        """
        try:
            return self.load(reactor)
        except usage.UsageError as e:
            fail(str(e))

    def postOptions(self) -> None:
        if self["workers"] < 1:
            fail(f"pfxpold: --workers must be 1 or more, not {self['workers']}")
        if self["workers"] > 1 and self["adopt"]:
            raise usage.UsageError("a worker (--adopt) cannot start workers")
        if not self["config"]:
            # Read when the options are parsed, not when this module is
            # imported, so a tac file or a test can set it.
            self["config"] = os.environ.get("PFXPOLD_CONFIG") or None
        if self["config"]:
            # Workers load the same file whatever directory they start in.
            self["config"] = os.path.abspath(self["config"])
        if self.reactor is None:
            self.reactor = _global_reactor()
        self.configuration = self.load_or_fail(self.reactor)
        if self["check-config"]:
            configuration = self.configuration
            print(f"{configuration.path or '(no file: demo check)'}: OK")
            print(f"  listen: {', '.join(configuration.listen)}")
            if configuration.metrics_listen is not None:
                print(f"  metrics: {configuration.metrics_listen} (/metrics)")
            for entry in configuration.chain.entries:
                print(
                    f"  check {entry.name}: {type(entry.check).__name__},"
                    f" timeout {entry.timeout:g}s, on_error {entry.on_error}"
                )
            default = configuration.chain.default_action
            print(f"  default action: {default if default else 'the last DUNNO'}")
            for warning in configuration_warnings(configuration):
                print(warning, file=sys.stderr)
            sys.exit(0)


#: The codecs Twisted and its TLS stack encode and decode with while
#: serving (twisted.names: idna; twisted.web.client: charmap; headers:
#: iso-8859-1; ...). A codec is imported on first use, which fails inside a
#: chroot jail.
_SERVING_CODECS = ("ascii", "utf-8", "utf-16", "charmap", "idna", "iso-8859-1", "cp437")


def preload_lazy_imports() -> None:
    """
    Load what Twisted itself would import only when it first needs it while
    serving, so that it is loaded before twistd chroots: inside a jail
    those imports fail ("unknown encoding: idna" from the dnsbl check,
    "unknown encoding: charmap" from the http check, found by
    tests/integration/test_chroot.py). Looking a codec up once keeps it in
    the codec registry's cache.
    """
    for name in _SERVING_CODECS:
        codecs.lookup(name)
    try:
        # Preferred by twisted.internet._idna for host names when installed.
        import idna  # noqa: F401
    except ImportError:
        pass


def ignore_hangup_until_served() -> None:
    """
    Under twistd, from now until the service installs its own handler: a
    SIGHUP (C{systemctl reload}, logrotate) that comes while a large map
    loads would otherwise kill the daemon before it serves (its default
    action). SIGUSR1 is left as it is: twistd, which installs its log
    rotation handler after this, installs it only over the default action.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class _ParentService(logger.OffersLogObserver, MultiService):
    """
    A parent of workers: its own policy service and the pool, which gives
    twistd its log observer as L{pfxpold.service.PolicyService} does.
    """


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the pfxpold service from parsed L{Options}.

    Check types are imported and constructed here, before twistd chroots or
    drops privileges; they connect to their backends when the service
    starts.
    """
    from pfxpold.reload import Reloader, SignalService
    from pfxpold.service import CollectorTuning, PolicyService

    preload_lazy_imports()

    if reactor is None:
        reactor = options.reactor if options.reactor is not None else _global_reactor()
    configuration = options.configuration
    if configuration is None or options.reactor is not reactor:
        # Checks hold the reactor they were built with: build them again.
        configuration = options.load_or_fail(reactor)

    def reload(previous: Configuration) -> Configuration:
        return options.load(reactor, previous)

    def reloading(service: PolicyService, parent: MultiService, **how: Any) -> None:
        # SIGHUP reloads, SIGUSR1 never stops the daemon; the metrics show
        # how the reloads went.
        service.reloader = Reloader(service, reload, reactor, **how)
        if service.metrics is not None:
            service.metrics.watch_reloads(service.reloader)
        SignalService(
            reactor, service.reloader, lambda: service.factory.request_log
        ).setServiceParent(parent)

    if getattr(options, "parent", None) is not None:
        ignore_hangup_until_served()
    # Under twistd, its log takes request lines in batches where it can
    # (pfxpold.logger): one event per request costs more than the request.
    twistd_options = getattr(options, "parent", None)
    request_batches = logger.takes_request_batches(twistd_options)

    def log_observer() -> Any:
        return logger.twistd_log_observer(
            twistd_options,
            reactor,
            max_bytes=configuration.log_max_bytes,
            keep=configuration.log_keep,
        )

    if options["adopt"]:
        try:
            adopted = workers.adopted_endpoints(reactor, options["adopt"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        service = PolicyService(
            configuration, reactor, adopted=adopted, request_batches=request_batches
        )
        service.log_observer_factory = log_observer
        workers.ParentWatchService(reactor).setServiceParent(service)
        CollectorTuning().setServiceParent(service.backends)
        # The parent validated the file before it sent this worker SIGHUP.
        reloading(service, service, adopted=True)
        return service
    if twistd_options is not None:
        # Under twistd, before it daemonizes: a port in use is one line on
        # stderr and exit status 1 in either mode.
        root, jail = _socket_root(twistd_options)
        for description in [*configuration.listen, *filter(None, [configuration.metrics_listen])]:
            problem = probe_listen(description, root, jail)
            if problem is not None:
                fail(f"pfxpold: {problem}")
        install_startup_error_hook(configuration.listen)
    service = PolicyService(configuration, reactor, request_batches=request_batches)
    # The last backend: it starts once the checks have, and stops last.
    CollectorTuning().setServiceParent(service.backends)
    if options["workers"] <= 1:
        service.log_observer_factory = log_observer
        reloading(service, service)
        return service
    # The pool stops alongside the parent's own service: both answer what
    # is in flight within shutdown_grace.
    top = _ParentService()
    top.log_observer_factory = log_observer
    service.setServiceParent(top)
    arguments = ["--config", options["config"]] if options["config"] else []
    pool = workers.WorkerPool(
        reactor,
        options["workers"],
        service.recorders,
        arguments,
        stop_timeout=configuration.shutdown_grace + 5.0,
        # twistd's own options: workers log the way the parent does.
        log_arguments=workers.worker_log_arguments(getattr(options, "parent", None)),
        backlog=configuration.backlog,
    )
    if service.metrics is not None:
        from pfxpold.metrics import WorkerSnapshots

        # Started before the pool: workers learn where to write from it.
        service.metrics.workers = WorkerSnapshots(pool)
        service.metrics.workers.setServiceParent(top)
    pool.setServiceParent(top)
    # The parent reloads first, and tells the workers only if it could.
    reloading(service, top, pool=pool)
    return top
