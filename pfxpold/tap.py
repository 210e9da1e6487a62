"""
The twistd plugin's command line: C{twistd pfxpold [options]}.
"""

from __future__ import annotations

import codecs
import os
import sys
from typing import Any, Optional

from twisted.application.service import IService, MultiService
from twisted.internet import endpoints
from twisted.python import usage

from pfxpold import __version__, workers
from pfxpold.config import (
    DEFAULT_LISTEN,
    ConfigError,
    Configuration,
    default_configuration,
    load_configuration,
)


def endpoint_description(port: str) -> str:
    """
    Turn a C{--port} value into a server endpoint description: a bare port
    number listens on the loopback interface only (policy servers must not
    be open to the world), anything else is taken as an endpoint string.
    """
    if port.isdigit():
        return f"tcp:{int(port)}:interface=127.0.0.1"
    return port


def _global_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


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
        ["check-config", None, "Check the configuration, print a summary and exit."],
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

    def load(self, reactor: Any) -> Configuration:
        """
        Build the configuration these options name, with C{reactor}.

        @raise usage.UsageError: with a message naming what is wrong.
        """
        try:
            if self["config"]:
                configuration = load_configuration(self["config"], reactor)
            else:
                configuration = default_configuration(reactor)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["port"]:
            configuration.listen = list(self["port"])
        if configuration.metrics_listen is not None:
            try:
                endpoints.serverFromString(reactor, configuration.metrics_listen)
            except Exception as e:
                raise usage.UsageError(
                    f"{configuration.path or '<configuration>'}: [metrics] key 'listen':"
                    f" cannot listen on {configuration.metrics_listen!r}:"
                    f" {type(e).__name__}: {e or 'not an endpoint string'}"
                ) from None
        for description in configuration.listen:
            try:
                endpoints.serverFromString(reactor, description)
            except Exception as e:
                # Parsers raise what they like: IndexError for a systemd
                # socket that was not passed, OSError for a missing TLS
                # certificate. All of them are the admin's to fix.
                raise usage.UsageError(
                    f"cannot listen on {description!r}:"
                    f" {type(e).__name__}: {e or 'not an endpoint string'}"
                ) from None
        return configuration

    def postOptions(self) -> None:
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be 1 or more")
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
        self.configuration = self.load(self.reactor)
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


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the pfxpold service from parsed L{Options}.

    Check types are imported and constructed here, before twistd chroots or
    drops privileges; they connect to their backends when the service
    starts.
    """
    from pfxpold.service import CollectorTuning, PolicyService

    preload_lazy_imports()

    if reactor is None:
        reactor = options.reactor if options.reactor is not None else _global_reactor()
    configuration = options.configuration
    if configuration is None or options.reactor is not reactor:
        # Checks hold the reactor they were built with: build them again.
        configuration = options.load(reactor)
    if options["adopt"]:
        try:
            adopted = workers.adopted_endpoints(reactor, options["adopt"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        service = PolicyService(configuration, reactor, adopted=adopted)
        workers.ParentWatchService(reactor).setServiceParent(service)
        CollectorTuning().setServiceParent(service.backends)
        return service
    service = PolicyService(configuration, reactor)
    # The last backend: it starts once the checks have, and stops last.
    CollectorTuning().setServiceParent(service.backends)
    if options["workers"] <= 1:
        return service
    # The pool stops alongside the parent's own service: both answer what
    # is in flight within shutdown_grace.
    top = MultiService()
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
    )
    if service.metrics is not None:
        from pfxpold.metrics import WorkerSnapshots

        # Started before the pool: workers learn where to write from it.
        service.metrics.workers = WorkerSnapshots(pool)
        service.metrics.workers.setServiceParent(top)
    pool.setServiceParent(top)
    return top
