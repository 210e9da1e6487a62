"""
The configuration file: a TOML document with a C{[server]} table and a
list of C{[[check]]} tables, read into a ready-to-run check chain.

Every error names the file, the check and the key, so that
C{twistd pfxpold --check-config --config FILE} tells a mail admin exactly
what to fix.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.python.reflect import namedAny

from pfxpold.action import Action, ActionError
from pfxpold.chain import (
    ENFORCE,
    KNOWN,
    NOREPLY,
    SHADOW,
    SKIP,
    ChainEntry,
    CheckChain,
    ErrorPolicy,
)
from pfxpold.checks import BUILTIN_CHECKS, MissingExtraError, missing_extra
from pfxpold.interfaces import ICheck, IUsesChecks
from pfxpold.protocol import Limits
from pfxpold.resources import DEFAULT_BACKLOG
from pfxpold.stages import DEFAULT_POSTFIX, VersionError, parse_version

DEFAULT_LISTEN = "tcp:9998:interface=127.0.0.1"
DEFAULT_ON_ERROR = "DEFER_IF_PERMIT Service temporarily unavailable"
DEFAULT_CHECK_TIMEOUT = 10.0
DEFAULT_DEADLINE = 20.0
DEFAULT_SHUTDOWN_GRACE = 10.0
#: The size at which twistd's C{--logfile} is rotated: not twistd's 1 MB, which
#: a log of request lines reaches every few seconds on a busy relay, each
#: rotation renaming every file kept before it.
DEFAULT_LOG_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_METRICS_LISTEN = "tcp:9101:interface=127.0.0.1"

#: The top-level tables of a configuration file besides C{[server]} and
#: C{[[check]]}: checks read them with L{CheckOptions.section}.
#: C{[stores]}: state stores (pfxpold.state); C{[metrics]}: the metrics
#: endpoint (pfxpold.metrics).
SECTIONS = ("stores", "metrics")
_TABLES = ("server", "check", *SECTIONS)

#: Endpoint types whose first argument (or C{port=}) is a TCP port.
_PORT_ENDPOINTS = ("tcp", "tcp6", "ssl")

#: The keys of a [[check]] table the chain reads, not the check type.
_CHAIN_KEYS = ("name", "type", "timeout", "on_error", "shadow")

_T = TypeVar("_T")
_MISSING: Any = object()


class ConfigError(Exception):
    """
    The configuration cannot be used; the message says where and why.
    """


def _where(
    path: Optional[str], check: Optional[str], key: Optional[str], table: Optional[str] = None
) -> str:
    parts = [path or "<configuration>"]
    if check is not None:
        parts.append(f"check {check!r}")
    if table is not None:
        # "[server] key 'listen'": a key of a table is named with it.
        parts.append(f"[{table}]" if key is None else f"[{table}] key {key!r}")
    elif key is not None:
        parts.append(f"key {key!r}")
    return ": ".join(parts)


def server_error(path: Optional[str], key: str, message: str) -> ConfigError:
    """
    @return: a L{ConfigError} naming the file, the C{[server]} table and
        C{key}.
    """
    return ConfigError(f"{_where(path, None, key, 'server')}: {message}")


def endpoint_description(port: str) -> str:
    """
    Turn a C{--port} or C{listen} value into a server endpoint description:
    a bare port number listens on the loopback interface only (policy
    servers must not be open to the world), anything else is taken as an
    endpoint string.
    """
    if port.isdigit():
        return f"tcp:{int(port)}:interface=127.0.0.1"
    return port


def endpoint_fields(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split an endpoint description as Twisted does: C{:} separates
    arguments, C{name=value} ones are keywords, C{\\} escapes the next
    character.

    @return: the type (lowercase), the positional and the keyword arguments.
    """
    fields: list[tuple[str, Optional[str]]] = []
    name, value, current = "", None, ""
    escaped = False
    for character in description:
        if escaped:
            current += character
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == ":":
            fields.append((name, current) if value is not None else (current, None))
            name, value, current = "", None, ""
        elif character == "=" and value is None:
            name, value, current = current, "", ""
        else:
            current += character
    fields.append((name, current) if value is not None else (current, None))
    kind = fields[0][0].lower()
    positional = [field for field, value in fields[1:] if value is None]
    keywords = {field: value for field, value in fields[1:] if value is not None}
    return kind, positional, keywords


def socket_path(address: str, root: str, jail: Optional[str] = None) -> str:
    """
    Where the UNIX socket C{address} will be, seen from here.

    @param root: the directory relative addresses are resolved from when
        binding (twistd's run directory; inside the jail with C{jail}).
    @param jail: the directory twistd will C{chroot} to, if any.
    """
    path = os.path.join(root, address)
    if jail:
        path = os.path.join(jail, path.lstrip("/"))
    return path


def listen_problem(
    description: str, root: Optional[str] = None, jail: Optional[str] = None
) -> Optional[str]:
    """
    What would make listening on C{description} fail at start-up that can
    be known now: a TCP port out of range, or (with C{root}) a UNIX socket
    in a directory that does not exist.

    @param root: the directory relative socket paths are resolved from
        (twistd's run directory, inside its chroot); L{None} not to look at
        the file system.
    @param jail: twistd's C{--chroot} directory, if any.
    @return: what is wrong, or L{None}.
    """
    kind, positional, keywords = endpoint_fields(description)
    if kind in _PORT_ENDPOINTS:
        port = keywords.get("port", positional[0] if positional else None)
        if port is not None and port.strip().isdigit() and not 0 < int(port) < 65536:
            return f"port {int(port)} is out of range (1-65535)"
    elif kind == "unix" and root is not None:
        address = keywords.get("address", positional[0] if positional else None)
        if address and not address.startswith("@"):
            directory = os.path.dirname(socket_path(address, root, jail))
            if not os.path.isdir(directory):
                return f"the socket's directory {directory} does not exist"
    return None


class _Table:
    """
    Typed, error-reporting access to one TOML table; remembers which keys
    were read so that unknown (misspelt) keys can be reported.
    """

    def __init__(
        self,
        table: Mapping[str, Any],
        path: Optional[str],
        check: Optional[str],
        name: Optional[str] = None,
    ):
        """
        @param name: the table's name (C{"server"}) when it is a top-level
            table rather than a check.
        """
        self._table = table
        self._path = path
        self._check = check
        self._name = name
        self._read: set[str] = set()

    def error(self, key: Optional[str], message: str) -> ConfigError:
        """
        @return: a L{ConfigError} naming the file, the table or check and
            C{key}.
        """
        return ConfigError(f"{_where(self._path, self._check, key, self._name)}: {message}")

    def __contains__(self, key: str) -> bool:
        return key in self._table

    def keys(self) -> list[str]:
        return list(self._table)

    def unused(self) -> list[str]:
        """
        @return: the keys nobody asked for.
        """
        return sorted(set(self._table) - self._read)

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], kind_name: str) -> Any:
        self._read.add(key)
        if key not in self._table:
            if default is _MISSING:
                raise self.error(key, "is required")
            return default
        value = self._table[key]
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"must be {kind_name}, not {value!r}")
        if not isinstance(value, kinds):
            raise self.error(key, f"must be {kind_name}, not {value!r}")
        return value

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The value as TOML gave it."""
        self._read.add(key)
        if key not in self._table:
            if default is _MISSING:
                raise self.error(key, "is required")
            return default
        return self._table[key]

    def string(self, key: str, default: Any = _MISSING) -> str:
        return self._get(key, default, (str,), "a string")

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        return self._get(key, default, (bool,), "true or false")

    def integer(self, key: str, default: Any = _MISSING, minimum: Optional[int] = None) -> int:
        value = self._get(key, default, (int,), "a whole number")
        if minimum is not None and value is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value}")
        return value

    def number(self, key: str, default: Any = _MISSING, positive: bool = False) -> float:
        value = self._get(key, default, (int, float), "a number")
        if value is None:
            # TOML has no null: only a default of None gets here.
            return default
        if positive and not value > 0:
            raise self.error(key, f"must be greater than 0, not {value}")
        return float(value)

    def strings(self, key: str, default: Any = _MISSING) -> list[str]:
        value = self._get(key, default, (list, str), "a list of strings")
        if isinstance(value, str):
            value = [value]
        if value is not None and not all(isinstance(item, str) for item in value):
            raise self.error(key, f"must be a list of strings, not {value!r}")
        return value

    def table(self, key: str, default: Any = _MISSING) -> dict[str, Any]:
        return self._get(key, default, (dict,), "a table")

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return value


class CheckOptions(_Table):
    """
    What a check type is built from: its table from the configuration file
    (less the keys the chain itself reads: C{name}, C{type}, C{timeout},
    C{on_error}, C{mode = "shadow"} or C{"enforce"}, C{shadow}), typed getters that raise a L{ConfigError} naming the file,
    the check and the key, and what a check needs from the daemon.

    @ivar name: the check's name.
    @ivar reactor: the reactor; checks take time and network from it.
    @ivar base_directory: where relative paths in the file are resolved.
    @ivar restriction_classes: names that may be answered besides the
        access(5) actions.
    @ivar mode: C{"enforce"}, or C{"shadow"} for a check with
        C{shadow = true}; a shadow check's L{name} is C{"shadow:NAME"}, so that the state it keeps
        under its name (quota counters, greylisting triplets) is apart
        from an enforcing check's.
    """

    mode = ENFORCE

    def __init__(
        self,
        table: Mapping[str, Any],
        name: str,
        reactor: Any,
        path: Optional[str] = None,
        restriction_classes: tuple[str, ...] = (),
        document: Optional[Mapping[str, Any]] = None,
        shared: Optional[dict[Any, Any]] = None,
    ) -> None:
        super().__init__(table, path, name)
        self.name = name
        self.reactor = reactor
        self.config_path = path
        self.base_directory = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        self.restriction_classes = restriction_classes
        self._document = document if document is not None else {}
        self._shared = shared if shared is not None else {}
        #: The parts of the document's other top-level tables this check
        #: read, by path (C{("stores",)}, C{("stores", "main")}): a reload
        #: reuses the check only if they are unchanged.
        self.reads: dict[tuple[str, ...], Any] = {}
        #: The keys of the shared objects this check asked for.
        self.shared_keys: list[Any] = []
        #: Where L{shared} records what each shared object was made from.
        self.shared_reads: dict[Any, dict[tuple[str, ...], Any]] = {}
        #: Shared objects of the previous configuration, for a reload.
        self.previous_shared: dict[Any, SharedRecord] = {}
        self._recorders: list[dict[tuple[str, ...], Any]] = []

    def action(self, key: str, default: Any = _MISSING) -> Action:
        """An action string, validated as Postfix would read it."""
        value = self.string(key, default)
        if value is None or isinstance(value, Action):
            return value
        try:
            return Action.parse(value, self.restriction_classes)
        except ActionError as e:
            raise self.error(key, str(e)) from None

    def path(self, key: str, default: Any = _MISSING) -> str:
        """A file path, relative ones resolved from the configuration's folder."""
        value = self.string(key, default)
        if value is None:
            return value
        return os.path.join(self.base_directory, os.path.expanduser(value))

    def existing_path(self, key: str, default: Any = _MISSING) -> str:
        """
        A file path as L{path} gives it, which must name a file that can be
        read when the configuration gives it (a default need not exist):
        a missing map or database is reported by C{--check-config}, not at
        the first request. The file is opened for reading only, never
        created.
        """
        given = key in self
        value = self.path(key, default)
        if value is None or not given:
            return value
        try:
            with open(value, "rb"):
                pass
        except OSError as e:
            raise self.error(key, f"cannot open {value}: {e.strerror}") from None
        return value

    def secret(self, key: str, default: Any = _MISSING) -> Optional[str]:
        """
        A secret read from the file named by C{key} (its first line, so the
        secret never stands in the configuration nor in a log).
        """
        path = self.path(key, default)
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            raise self.error(key, f"cannot read {path}: {e.strerror}") from None

    def section(self, name: str) -> dict[str, Any]:
        """
        A top-level table of the configuration file other than C{server} and
        C{check}, e.g. the C{[stores]} that several checks share.
        """
        value = read_path(self._document, (name,))
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(self._path, None, name)}: must be a table")
        self._record((name,), value)
        return value

    def section_entry(self, name: str, key: str) -> Any:
        """
        C{section(name).get(key)}, remembered as a read of that entry only:
        a reload then reuses what was built from it (a store) while other
        entries of the section change.
        """
        section = read_path(self._document, (name,))
        if not isinstance(section, dict):
            raise ConfigError(f"{_where(self._path, None, name)}: must be a table")
        value = read_path(self._document, (name, key))
        self._record((name, key), value)
        return value

    def _record(self, path: tuple[str, ...], value: Any) -> None:
        self.reads[path] = value
        for recorder in self._recorders:
            recorder[path] = value

    def shared(self, key: Any, make: Callable[[], _T]) -> _T:
        """
        One object shared by every check of this configuration that asks
        for C{key} (a connection pool, a state store): made by C{make()} on
        the first call. A shared object that provides
        L{twisted.application.service.IService} is started and stopped with
        the daemon.

        On a reload, the previous configuration's object is reused when
        the parts of the document C{make()} read (through L{section} and
        L{section_entry}) are unchanged: a store's counters survive. An
        object made from nothing in the document is reused as long as its
        key is asked for, so such a key must hold its settings.
        """
        if key not in self.shared_keys:
            self.shared_keys.append(key)
        if key not in self._shared:
            previous = self.previous_shared.get(key)
            if previous is not None and previous.holds(self._document):
                self._shared[key] = previous.value
                self.shared_reads[key] = previous.reads
            else:
                recorder: dict[tuple[str, ...], Any] = {}
                self._recorders.append(recorder)
                try:
                    self._shared[key] = make()
                finally:
                    self._recorders.remove(recorder)
                self.shared_reads[key] = recorder
        for path, value in self.shared_reads.get(key, {}).items():
            self._record(path, value)
        return self._shared[key]


def read_path(document: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """
    The value at C{path} in C{document}'s top-level tables: C{{}} for an
    absent top-level table, L{None} for an absent entry of one.
    """
    value: Any = document.get(path[0], {})
    for part in path[1:]:
        value = value.get(part) if isinstance(value, dict) else None
    return value


@dataclass
class SharedRecord:
    """
    A shared object and the parts of the document it was made from.
    """

    value: Any
    reads: dict[tuple[str, ...], Any]

    def holds(self, document: Mapping[str, Any]) -> bool:
        """
        Whether C{document} still says what this object was made from.
        """
        return all(read_path(document, path) == value for path, value in self.reads.items())


@dataclass
class CheckRecord:
    """
    What a check was built from, so that a reload can tell whether it can
    keep the very same object.

    @ivar type_name: its C{type}.
    @ivar table: its table less the chain's keys (C{name}, C{type},
        C{timeout}, C{on_error}, C{shadow}).
    @ivar raw: its whole table.
    @ivar restriction_classes: the server's, which its actions were
        parsed with.
    @ivar reads: the parts of other top-level tables it read.
    @ivar shared_keys: the shared objects it uses.
    """

    check: Any
    type_name: str
    table: dict[str, Any]
    raw: dict[str, Any]
    restriction_classes: tuple[str, ...]
    reads: dict[tuple[str, ...], Any]
    shared_keys: list[Any]


@dataclass(frozen=True)
class CaptureSettings:
    """
    C{[server] capture} and its companions (see L{pfxpold.capture}).

    @ivar path: the capture file.
    @ivar max_bytes: the size at which it is rotated.
    @ivar keep: how many rotated files are kept.
    @ivar compress: whether rotated files are compressed with gzip.
    @ivar hash_local_parts: whether the local parts of addresses are
        replaced by a keyed hash.
    @ivar drop: attributes left out of the capture.
    @ivar process: whether a process of its own (forked at start) encodes
        and writes the capture, off the daemon's answering core.
    """

    path: str
    max_bytes: int = 100 * 1024 * 1024
    keep: int = 10
    compress: bool = False
    hash_local_parts: bool = False
    drop: tuple[str, ...] = ()
    process: bool = True


@dataclass
class Configuration:
    """
    A loaded configuration, ready to serve.

    @ivar services: checks and shared objects that must be started and
        stopped with the daemon.
    """

    path: Optional[str]
    listen: list[str]
    chain: CheckChain
    limits: Limits
    log_requests: bool
    shutdown_grace: float
    services: list[IService] = field(default_factory=list)
    #: The file the request log goes to, or L{None} for twistd's log.
    request_log: Optional[str] = None
    #: The listen queue asked of tcp, tcp6 and unix endpoints.
    backlog: int = DEFAULT_BACKLOG
    #: What each check was built from, by name (for a reload).
    checks: dict[str, CheckRecord] = field(default_factory=dict)
    #: The shared objects (stores, pools), by key, and what made them.
    shared: dict[Any, SharedRecord] = field(default_factory=dict)
    #: Where C{/metrics} is served (L{pfxpold.metrics}), or L{None}: off.
    metrics_listen: Optional[str] = None
    #: What is captured for C{pfxpold-replay}, or L{None}: nothing.
    capture: Optional[CaptureSettings] = None
    #: Whether each check's verdict is logged (at debug level).
    log_verdicts: bool = False
    #: The size at which twistd's C{--logfile} is rotated
    #: (L{pfxpold.logger.twistd_log_observer}).
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    #: How many rotated C{--logfile} files are kept: 0 keeps all.
    log_keep: int = 0


def resolve_check_type(name: str) -> Callable[[CheckOptions], Any]:
    """
    Find a check type by its built-in name (C{"file"}) or by the dotted path
    of a callable (C{"mycompany.policy:RelayCheck"} or
    C{"mycompany.policy.RelayCheck"}).

    @raise LookupError: when there is no such check type.
    """
    target = BUILTIN_CHECKS.get(name, name)
    if ":" in target:
        module, _, attribute = target.partition(":")
        target = f"{module}.{attribute}"
    if "." not in target:
        raise LookupError(
            f"{name!r} is neither a built-in check type"
            f" ({', '.join(sorted(BUILTIN_CHECKS))}) nor a dotted path"
        )
    try:
        found = namedAny(target)
    except ImportError as e:
        # An optional library (ldaptor, psycopg...) is not installed: say
        # which extra brings it.
        advice = missing_extra(e)
        if advice is not None:
            raise advice from None
        raise LookupError(f"cannot load {name!r}: {type(e).__name__}: {e}") from None
    except Exception as e:
        # A user's module may fail to import in any way (a syntax error, a
        # NameError at module level): report it as a configuration error
        # naming the check, not as a traceback.
        raise LookupError(f"cannot load {name!r}: {type(e).__name__}: {e}") from None
    if not callable(found):
        raise LookupError(f"{name!r} is not callable")
    return found


def _parse_policy(table: _Table, key: str, default: str, classes: tuple[str, ...]) -> ErrorPolicy:
    value = table.string(key, default)
    try:
        return ErrorPolicy.parse(value, classes)
    except ActionError as e:
        raise table.error(key, f"must be {SKIP!r}, {NOREPLY!r} or an action ({e})") from None


def _table_label(name: str) -> str:
    return "[[check]]" if name == "check" else f"[{name}]"


def metrics_listen(document: Mapping[str, Any], path: Optional[str]) -> Optional[str]:
    """
    Read the C{[metrics]} table: where to serve C{/metrics}, or L{None}
    without the table. Checks that C{prometheus_client} is installed
    without importing it.

    @raise ConfigError: naming the file, the table and the key.
    """
    if "metrics" not in document:
        return None
    where = f"{path or '<configuration>'}: [metrics]"
    table = document["metrics"]
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    for key in table:
        if key != "listen":
            raise ConfigError(f"{where} key {key!r}: is not a setting pfxpold knows")
    listen = table.get("listen", DEFAULT_METRICS_LISTEN)
    if not isinstance(listen, str) or not listen.strip():
        raise ConfigError(f"{where} key 'listen': must be an endpoint string, not {listen!r}")
    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(
            f"{where}: needs the prometheus_client package: pip install 'pfxpold[metrics]'"
        )
    # A bare port number, as in [server] listen: 127.0.0.1 only.
    return endpoint_description(listen)


def load_document(
    document: Mapping[str, Any],
    reactor: Any,
    path: Optional[str] = None,
    previous: Optional[Configuration] = None,
) -> Configuration:
    """
    Build a L{Configuration} from a parsed TOML document.

    Check types are imported and built here (before twistd chroots or drops
    privileges), but not started.

    @param previous: the configuration in force, on a reload: a check whose
        table, type, restriction classes and the parts of shared tables it
        read are unchanged is that configuration's very object (started,
        with its caches and connections), and so is a shared object (a
        store) whose settings are unchanged. Nothing of C{previous} is
        changed.
    @raise ConfigError: when anything in it cannot be used.
    """
    for table_name in sorted(set(document) - set(_TABLES)):
        # Misspelt, it would be silently ignored: [sever], [[chekc]].
        close = difflib.get_close_matches(table_name, _TABLES, n=1)
        known = ", ".join(_table_label(name) for name in _TABLES)
        hint = f"; did you mean {_table_label(close[0])}?" if close else f" ({known})"
        written = f"[{table_name}]" if isinstance(document[table_name], list) else table_name
        raise ConfigError(
            f"{_where(path, None, None, written)}: is not a table pfxpold knows{hint}"
        )
    server = _Table(document.get("server", {}), path, None, "server")
    if not isinstance(document.get("server", {}), dict):
        raise ConfigError(f"{_where(path, None, None, 'server')}: must be a table")

    classes = tuple(server.strings("restriction_classes", []))
    for name in classes:
        try:
            restriction = Action(name).is_restriction_class
        except ActionError:
            restriction = False
        if not restriction or name in (SKIP, NOREPLY, KNOWN):
            raise server.error(
                "restriction_classes",
                f"{name!r} is an access(5) verb, reserved or not a valid name",
            )

    listen = [endpoint_description(value) for value in server.strings("listen", [DEFAULT_LISTEN])]
    if not listen:
        raise server.error("listen", "must name at least one endpoint")
    for description in listen:
        problem = listen_problem(description)
        if problem is not None:
            raise server.error("listen", f"{description!r}: {problem}")
    default_action = None
    if "default_action" in server:
        try:
            default_action = Action.parse(server.string("default_action"), classes)
        except ActionError as e:
            raise server.error("default_action", str(e)) from None
    deadline = server.number("deadline", DEFAULT_DEADLINE, positive=True)
    on_deadline = server.string("on_deadline", KNOWN)
    try:
        # "skip" is refused: there is no next check to skip to once the
        # deadline has passed.
        deadline_policy = ErrorPolicy.parse_deadline(on_deadline, classes)
    except ActionError as e:
        raise server.error(
            "on_deadline", f"must be {KNOWN!r}, {NOREPLY!r} or an action ({e})"
        ) from None
    parallel = server.boolean("parallel", False)
    limits = Limits(
        max_line_length=server.integer("max_line_length", Limits.max_line_length, minimum=256),
        max_attributes=server.integer("max_attributes", Limits.max_attributes, minimum=30),
        max_request_size=server.integer("max_request_size", Limits.max_request_size, minimum=1024),
        idle_timeout=server.number("idle_timeout", Limits.idle_timeout, positive=True),
        request_timeout=server.number("request_timeout", Limits.request_timeout, positive=True),
        max_pipelined=server.integer("max_pipelined", Limits.max_pipelined, minimum=1),
    )
    if deadline >= limits.idle_timeout:
        raise server.error("deadline", "must be shorter than idle_timeout")
    log_requests = server.boolean("log_requests", True)
    request_log = server.string("request_log", None)
    if request_log is not None:
        if not request_log.strip():
            raise server.error("request_log", "must name a file (leave it out for twistd's log)")
        base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        request_log = os.path.join(base, os.path.expanduser(request_log))
        if not os.path.isdir(os.path.dirname(request_log)):
            raise server.error("request_log", f"{os.path.dirname(request_log)} is not a directory")
    log_verdicts = server.boolean("log_verdicts", False)
    log_max_bytes = server.integer("log_max_bytes", DEFAULT_LOG_MAX_BYTES, minimum=65536)
    log_keep = server.integer("log_keep", 0, minimum=0)
    capture = _capture_settings(server, path)
    shutdown_grace = server.number("shutdown_grace", DEFAULT_SHUTDOWN_GRACE, positive=True)
    backlog = server.integer("backlog", DEFAULT_BACKLOG, minimum=1)
    try:
        postfix_version = parse_version(server.raw("postfix_version", DEFAULT_POSTFIX))
    except VersionError as e:
        raise server.error("postfix_version", str(e)) from None
    if server.unused():
        raise server.error(server.unused()[0], "is not a setting pfxpold knows")
    metrics = metrics_listen(document, path)

    raw_checks = document.get("check", [])
    if not isinstance(raw_checks, list):
        raise ConfigError(f"{_where(path, None, 'check')}: use [[check]] tables, one per check")
    shared: dict[Any, Any] = {}
    shared_reads: dict[Any, dict[tuple[str, ...], Any]] = {}
    previous_shared = previous.shared if previous is not None else {}
    sections = {k: v for k, v in document.items() if k in SECTIONS}
    records: dict[str, CheckRecord] = {}
    entries: list[ChainEntry] = []
    services: list[IService] = []
    names: set[str] = set()
    for position, raw in enumerate(raw_checks, start=1):
        label = raw.get("name", f"#{position}") if isinstance(raw, dict) else f"#{position}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{_where(path, label, None)}: must be a table")
        outer = _Table(raw, path, str(label))
        name = outer.string("name", f"check{position}")
        if name in names:
            raise outer.error("name", f"{name!r} is used by another check")
        names.add(name)
        type_name = outer.string("type")
        timeout = outer.number("timeout", DEFAULT_CHECK_TIMEOUT, positive=True)
        on_error = _parse_policy(outer, "on_error", DEFAULT_ON_ERROR, classes)
        mode = _chain_mode(outer, raw)
        table = {
            k: v
            for k, v in raw.items()
            if k not in _CHAIN_KEYS and not (k == "mode" and v in _CHAIN_MODES)
        }
        kept = previous.checks.get(name) if previous is not None else None
        if (
            kept is not None
            and _chain_mode(_Table(kept.raw, path, str(label)), kept.raw) == mode
            and not (IUsesChecks.providedBy(kept.check) and kept.check.uses)
            and _reusable(kept, type_name, table, classes, sections, previous_shared)
        ):
            # Unchanged: the running object, caches, connections and all.
            check = kept.check
            for key in kept.shared_keys:
                shared.setdefault(key, previous_shared[key].value)
                shared_reads.setdefault(key, previous_shared[key].reads)
            records[name] = CheckRecord(
                check, type_name, table, dict(raw), classes, kept.reads, kept.shared_keys
            )
        else:
            options = CheckOptions(
                table,
                name=name,
                reactor=reactor,
                path=path,
                restriction_classes=classes,
                document=sections,
                shared=shared,
            )
            options.shared_reads = shared_reads
            options.previous_shared = previous_shared
            if mode == SHADOW:
                # Its state apart from an enforcing check's: quota and
                # greylist keys hold the check's name.
                options.mode = mode
                options.name = f"shadow:{name}"
            try:
                factory = resolve_check_type(type_name)
            except MissingExtraError as e:
                raise outer.error(None, str(e)) from None
            except LookupError as e:
                raise outer.error("type", str(e)) from None
            try:
                check = factory(options)
            except ConfigError:
                raise
            except MissingExtraError as e:
                raise outer.error(None, str(e)) from None
            except Exception as e:
                raise outer.error(None, f"cannot be set up: {e}") from None
            if not ICheck.providedBy(check):
                raise outer.error("type", f"{type_name!r} does not make an ICheck provider")
            if options.unused():
                unused = options.unused()[0]
                if unused == "mode":
                    raise options.error("mode", f"must be {ENFORCE!r} or {SHADOW!r}")
                raise options.error(unused, "is not a setting of this check type")
            records[name] = CheckRecord(
                check, type_name, table, dict(raw), classes, options.reads, options.shared_keys
            )
        entries.append(ChainEntry(name, check, timeout, on_error, mode))
        if IService.providedBy(check):
            services.append(check)
    services.extend(value for value in shared.values() if IService.providedBy(value))
    by_name = {entry.name: entry.check for entry in entries}
    for entry in entries:
        if IUsesChecks.providedBy(entry.check):
            entry.check.link(by_name)
    if not entries:
        raise ConfigError(f"{_where(path, None, 'check')}: at least one [[check]] is needed")

    chain = CheckChain(
        entries,
        default_action=default_action,
        deadline=deadline,
        deadline_policy=deadline_policy,
        clock=reactor,
        restriction_classes=classes,
        # The capture records each check's verdict.
        record_verdicts=log_verdicts or capture is not None,
        postfix_version=postfix_version,
        parallel=parallel,
    )
    return Configuration(
        path,
        listen,
        chain,
        limits,
        log_requests,
        shutdown_grace,
        services,
        request_log,
        backlog,
        checks=records,
        shared={
            key: SharedRecord(value, shared_reads.get(key, {})) for key, value in shared.items()
        },
        metrics_listen=metrics,
        capture=capture,
        log_verdicts=log_verdicts,
        log_max_bytes=log_max_bytes,
        log_keep=log_keep,
    )


#: The values of a check's C{mode} that the chain reads; any other value
#: is the check type's own (the http check's C{mode = "json"} of old).
_CHAIN_MODES = (ENFORCE, SHADOW)


def _chain_mode(outer: _Table, raw: Mapping[str, Any]) -> str:
    """
    Whether a check decides (C{"enforce"}) or only runs beside the chain
    (C{"shadow"}): its C{mode}, or C{shadow = true}, the older spelling.
    A C{mode} of another value is left to the check type (the http check
    named its encoding C{mode} before it had C{encoding}).
    """
    shadow = outer.boolean("shadow", False)
    mode = raw.get("mode")
    if mode not in _CHAIN_MODES:
        return SHADOW if shadow else ENFORCE
    outer.string("mode")
    if "shadow" in raw and shadow != (mode == SHADOW):
        raise outer.error("shadow", f"contradicts mode = {mode!r}: leave one out")
    return str(mode)


def _capture_settings(server: _Table, path: Optional[str]) -> Optional[CaptureSettings]:
    """
    Read C{capture} and its companions from C{[server]}: L{None} without
    C{capture}, when the others are not allowed either.
    """
    defaults = CaptureSettings("")
    keys = (
        "capture_max_bytes",
        "capture_keep",
        "capture_compress",
        "capture_hash_local_parts",
        "capture_drop",
        "capture_process",
    )
    capture = server.string("capture", None)
    if capture is None:
        for key in keys:
            if key in server:
                raise server.error(key, "needs capture (the file to capture requests in)")
        return None
    if not capture.strip():
        raise server.error("capture", "must name a file (leave it out for no capture)")
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    capture = os.path.join(base, os.path.expanduser(capture))
    if not os.path.isdir(os.path.dirname(capture)):
        raise server.error("capture", f"{os.path.dirname(capture)} is not a directory")
    drop = tuple(server.strings("capture_drop", []))
    if any(not name or "=" in name or "\n" in name for name in drop):
        raise server.error("capture_drop", "must list attribute names")
    return CaptureSettings(
        capture,
        max_bytes=server.integer("capture_max_bytes", defaults.max_bytes, minimum=65536),
        keep=server.integer("capture_keep", defaults.keep, minimum=1),
        compress=server.boolean("capture_compress", defaults.compress),
        hash_local_parts=server.boolean("capture_hash_local_parts", defaults.hash_local_parts),
        drop=drop,
        process=server.boolean("capture_process", defaults.process),
    )


def _reusable(
    kept: CheckRecord,
    type_name: str,
    table: dict[str, Any],
    classes: tuple[str, ...],
    sections: Mapping[str, Any],
    previous_shared: Mapping[Any, SharedRecord],
) -> bool:
    """
    Whether a reload may keep the check L{CheckRecord} C{kept} describes:
    its settings, and everything it was built from, are unchanged.
    """
    return (
        kept.type_name == type_name
        and kept.table == table
        and kept.restriction_classes == classes
        and all(read_path(sections, p) == value for p, value in kept.reads.items())
        and all(
            key in previous_shared and previous_shared[key].holds(sections)
            for key in kept.shared_keys
        )
    )


def load_configuration(
    path: str, reactor: IReactorTime, previous: Optional[Configuration] = None
) -> Configuration:
    """
    Read and build the configuration in the TOML file at C{path}.

    @param previous: the configuration in force, on a reload (see
        L{load_document}).
    @raise ConfigError: when the file cannot be read or used.
    """
    return load_document(read_document(path), reactor, path, previous)


def read_document(path: str) -> dict[str, Any]:
    """
    Read the TOML file at C{path}, unchecked (see L{load_document}).

    @raise ConfigError: when it cannot be read or is not TOML.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        # TOML files are UTF-8; an editor saving Latin-1 is a common slip.
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 at byte {e.start}") from None


def default_configuration(
    reactor: IReactorTime, previous: Optional[Configuration] = None
) -> Configuration:
    """
    The configuration with no file: the demo check on the default port.

    @param previous: as for L{load_document}: on a reload, the demo check
        in force is kept.
    """
    return load_document({"check": [{"name": "demo", "type": "demo"}]}, reactor, None, previous)
