"""
The capture: every answered request, written to a file of JSON lines so
that C{pfxpold-replay} can run it through another configuration.

With C{[server] capture = "/var/lib/pfxpold/capture.jsonl"}, each answered
request becomes one line::

    {"t":1764868800.250,"values":["smtpd_access_policy","RCPT",...],
     "answer":"REJECT blocked","by":"senders",
     "verdicts":[["senders","REJECT blocked"]]}

C{values} are the request's attributes, in the order of the C{names} that
the file's header line lists (a request with other attributes has them
as a C{"request"} object of names and values instead). C{t} is when the
request was complete (the time the checks saw), C{answer}
the action sent (L{None}: no reply), C{by} the deciding check (C{default},
C{deadline}, C{error}), C{verdicts} each check's verdict in chain order
(C{error}, C{timeout}, C{invalid action} when it failed; a check after the
deciding one is absent). Each file starts with a header line,
C{{"pfxpold_capture": 1, ...}}, naming every check with its type and a
fingerprint of its settings, and a new header follows a reload that
changed the checks: replay reuses a recorded lookup verdict only for a
check whose fingerprint is unchanged.

The design is the request log's (L{pfxpold.requestlog}), its work done
after the answer is written and kept small: L{CaptureWriter.record} keeps
strings only (the request's values joined with C{","} and checked in two
C passes: clean ASCII, nearly every request, needs no escaping; the
answer, deciding check and verdicts encoded once per distinct decision),
lines are made C{BATCH} requests at a time (the time's text once per
millisecond, one join for the batch) and written once a second, whenever
C{MAX_BUFFERED} requests wait, and when the daemon stops. A write that
fails (disk full) is counted and logged once per outage. A file moved
away by someone else is followed by a new one at the path.

By default (C{capture_process = true}) this writer does not run in the
daemon: L{pfxpold.captureprocess} forks a writer process at start, and
the daemon only hands it each request's raw lines, time and decision.

The capture is bounded: when the file reaches C{capture_max_bytes} it is
renamed with a UTC time stamp (C{capture.jsonl.20261204T174500Z}),
optionally compressed to C{.gz} in a thread, and only the newest
C{capture_keep} rotated files are kept.

Privacy: C{capture_hash_local_parts} replaces the local part of every
address attribute (L{ADDRESS_ATTRIBUTES}) by a keyed hash, the same for
the same local part for as long as the daemon runs (workers share the
key), so replay still groups quotas and greylisting by sender; the key is
never written. C{capture_drop} drops named attributes altogether.

Workers (C{--workers N}) each write a file of their own beside the
parent's, C{capture.worker1.jsonl}, ..., each rotated on its own: no two
processes append to or rotate one file. Replay merges them by time.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from itertools import chain
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pfxpold.appendfile import AppendedFile
from pfxpold.config import CaptureSettings, Configuration
from pfxpold.request import PolicyRequest

#: The format version written in each header line.
FORMAT = 1

#: Seconds between writes of what is buffered.
FLUSH_INTERVAL = 1.0

#: Requests buffered before they are written without waiting for the timer.
MAX_BUFFERED = 2048

#: Requests kept as they came before they are encoded together.
BATCH = 256

#: The attributes holding addresses whose local part is hashed.
ADDRESS_ATTRIBUTES = ("sender", "recipient", "original_recipient", "sasl_sender", "sasl_username")

#: The environment variable that hands the redaction key to worker
#: processes, and their number.
KEY_VARIABLE = "PFXPOLD_CAPTURE_KEY"
WORKER_VARIABLE = "PFXPOLD_WORKER"

#: The check types whose verdicts replay may reuse (C{--lookups recorded}).
LOOKUP_TYPES = frozenset(("sql", "ldap", "dnsbl", "http", "spf"))

#: What the header last described before the first header is written.
_NOTHING = object()

_encode = json.JSONEncoder(ensure_ascii=True, check_circular=False, separators=(",", ":")).encode

#: One string as JSON, non-ASCII and control characters escaped (C).
_string = encode_basestring_ascii

#: The C encoder itself, for the verdicts' list of pairs.
_encode_list = (
    c_make_encoder(None, None, encode_basestring_ascii, None, ":", ",", False, False, True)
    if c_make_encoder is not None
    else lambda value, level: [_encode(value)]
)

#: The characters written in a string as they are: printable ASCII but the
#: quote and the backslash (DEL is escaped, as the C encoder does).
_PLAIN = bytes(range(0x20, 0x7F)).replace(b'"', b"").replace(b"\\", b"")

#: A line's start, before its values: its time.
_HEAD = b'{"t":%.3f,"values":["'

#: A line's end after its values: the decision (C{_decision_text}).
_DECIDED = '"],"answer":%s,"by":%s,"verdicts":%s}\n'


def _unplain(text: str) -> Optional[bytes]:
    """
    The characters of C{text} that JSON does not take as they are in a
    string (quotes, backslashes, line feeds and other control characters),
    in order, in two passes in C; L{None} when C{text} is not ASCII.

    Values joined with C{","} are JSON as they are when this is their
    separators' quotes alone.
    """
    if not text.isascii():
        return None
    return text.encode("ascii").translate(None, _PLAIN)


def _values_text(values: Any, count: int) -> str:
    """
    Strings as the inside of a JSON array: C{"a","b"}.

    Most requests hold printable ASCII without quotes or backslashes,
    which JSON takes as it is: joined with C{","} and checked in a few
    C calls, they need no escaping. Any other request is joined with NUL,
    escaped in one call and the separators turned into C{","}, unless a
    value holds a NUL or the text C{\\u0000} (which would read as a
    separator once escaped): then each value is escaped on its own.
    """
    joined = '","'.join(values)
    if _unplain(joined) == b'"' * (2 * (count - 1)):
        return f'"{joined}"'
    joined = "\x00".join(values)
    if joined.count("\x00") == count - 1 and "\\u0000" not in joined:
        return _string(joined).replace("\\u0000", '","')
    return ",".join(map(_string, values))


def check_fingerprints(configuration: Configuration) -> dict[str, dict[str, str]]:
    """
    Each check's type and a fingerprint of what it was built from (its
    table, and the parts of shared tables it read), by name, in chain
    order: replay compares them to tell an unchanged check.
    """
    checks: dict[str, dict[str, str]] = {}
    for entry in configuration.chain.entries:
        record = configuration.checks.get(entry.name)
        if record is None:
            checks[entry.name] = {"type": type(entry.check).__name__, "fingerprint": ""}
            continue
        material = _encode(
            [
                record.type_name,
                record.table,
                sorted(["/".join(path), value] for path, value in record.reads.items()),
                list(record.restriction_classes),
            ]
            if _jsonable(record.table)
            else repr((record.type_name, record.table, sorted(record.reads.items(), key=str)))
        )
        digest = hashlib.sha256(material.encode("utf-8", "replace")).hexdigest()[:16]
        checks[entry.name] = {"type": record.type_name, "fingerprint": digest}
    return checks


def _jsonable(value: Any) -> bool:
    try:
        _encode(value)
    except (TypeError, ValueError):
        # TOML dates and times.
        return False
    return True


def worker_path(path: str, number: Optional[str]) -> str:
    """
    The file worker C{number} writes: C{capture.jsonl} -> C{capture.worker1.jsonl};
    C{path} itself for the parent (L{None}).
    """
    if not number:
        return path
    root, extension = os.path.splitext(path)
    return f"{root}.worker{number}{extension}"


class Redactor:
    """
    Hashes the local parts of address attributes with a key, and drops
    named attributes.

    @ivar key: the hash key (never written anywhere).
    """

    def __init__(self, key: bytes, hash_local_parts: bool, drop: tuple[str, ...]) -> None:
        self.key = key
        self.hash_local_parts = hash_local_parts
        self.drop = drop
        self._hashed: dict[str, str] = {}

    def local_part(self, local: str) -> str:
        hashed = self._hashed.get(local)
        if hashed is None:
            digest = hashlib.blake2b(local.encode("utf-8", "surrogatepass"), key=self.key)
            hashed = "h-" + digest.hexdigest()[:16]
            if len(self._hashed) < 65536:
                self._hashed[local] = hashed
        return hashed

    def __call__(self, attributes: Mapping[str, str]) -> Mapping[str, str]:
        """
        @return: a redacted copy of C{attributes} (C{attributes} itself
            when nothing applies).
        """
        if not self.hash_local_parts and not self.drop:
            return attributes
        # items(): dict() of a mapping that is not a dictionary reads each
        # value through __getitem__, in Python.
        redacted = dict(attributes.items())
        for name in self.drop:
            redacted.pop(name, None)
        if self.hash_local_parts:
            for name in ADDRESS_ATTRIBUTES:
                address = redacted.get(name)
                if address:
                    at = address.rfind("@")
                    if at < 0:
                        redacted[name] = self.local_part(address)
                    else:
                        redacted[name] = self.local_part(address[:at]) + address[at:]
        return redacted


def redaction_key(environ: Any = os.environ) -> bytes:
    """
    The redaction key this process uses: the parent's, handed down in
    the environment, or a new random one that the workers it starts
    inherit.
    """
    value = environ.get(KEY_VARIABLE)
    if value:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    key = os.urandom(32)
    environ[KEY_VARIABLE] = key.hex()
    return key


def gzip_file(path: str) -> None:
    """
    Compress C{path} to C{path.gz} and remove C{path}.
    """
    with open(path, "rb") as source, gzip.open(path + ".gz.tmp", "wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)
    os.replace(path + ".gz.tmp", path + ".gz")
    os.unlink(path)


def _in_thread(reactor: Any) -> Callable[[Callable[[], None]], Any]:
    def run(work: Callable[[], None]) -> Any:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    return run


class CaptureWriter(Service):
    """
    Writes one JSON line per answered request to C{path}, rotating it by
    size.

    @ivar path: the file.
    @ivar dropped: requests lost to failed writes (or that could not be
        encoded) since the daemon started.
    @ivar rotated: the rotated files written since the daemon started.
    """

    _log = Logger()

    def __init__(
        self,
        settings: CaptureSettings,
        clock: IReactorTime,
        checks: Callable[[], Any] = lambda: None,
        path: Optional[str] = None,
        key: Optional[bytes] = None,
        in_thread: Optional[Callable[[Callable[[], None]], Any]] = None,
        flush_interval: float = FLUSH_INTERVAL,
        max_buffered: int = MAX_BUFFERED,
        batch: int = BATCH,
        describe: Callable[[Any], dict[str, dict[str, str]]] = check_fingerprints,
    ) -> None:
        """
        @param checks: gives the configuration in force (read at each
            flush: after a reload, a new header line describes its checks),
            or L{None}.
        @param path: the file, when not C{settings.path} (a worker's).
        @param key: the redaction key (default: L{redaction_key}).
        @param in_thread: runs the compression of a rotated file off the
            reactor thread (default: the reactor's thread pool); tests
            pass a function that runs it at once.
        @param batch: how many requests are kept as they came before they
            are encoded together (at most C{max_buffered}).
        @param describe: gives the header's C{checks} from what C{checks}
            returned (the writer process is handed them ready made).
        """
        self.settings = settings
        # Written as bytes: the values' check encodes them anyway, and a text
        # file would encode every line again.
        self.output = AppendedFile(path or settings.path, "capture", "requests", encoding=None)
        self.rotated: list[str] = []
        self._clock = clock
        self._checks = checks
        self._describe = describe
        if key is None and settings.hash_local_parts:
            key = redaction_key()
        self._redact = Redactor(key or b"", settings.hash_local_parts, settings.drop)
        self._redacting = settings.hash_local_parts or bool(settings.drop)
        # Most requests go through the chain alike: the end of their
        # lines (answer, deciding check, verdicts), encoded, by decision.
        self._decisions: dict[tuple[Optional[bytes], str, tuple[tuple[str, str], ...]], bytes] = {}
        self._in_thread = in_thread or _in_thread(clock)
        self._flush_interval = flush_interval
        self._max_buffered = max_buffered
        self._batch = max(1, min(batch, max_buffered))
        #: The requests kept, not encoded yet: their times, their values'
        #: text (empty for one written whole), the ends of their lines (or
        #: their whole lines; empty when lost), and which are written whole.
        self._times: list[float] = []
        self._texts: list[bytes] = []
        self._decided: list[bytes] = []
        self._whole: list[int] = []
        #: How many requests are kept when they are encoded.
        self._encode_at = self._batch
        self._size = 0
        #: Encoded lines waiting to be written, and how many requests they hold.
        self._pending: list[bytes] = []
        self._pending_count = 0
        self._unencodable = 0
        #: The attribute names, in order, of the first request: the header
        #: declares them, and requests with the same names (L{_usual}, their
        #: hash; none when the first had no attributes) are written as their
        #: values alone.
        self._names: Optional[tuple[str, ...]] = None
        self._usual: Optional[int] = None
        #: The quotes of the separators of the values' text (C{_PLAIN}).
        self._quotes = b""
        self._described: Any = _NOTHING
        self._timer: Optional[IDelayedCall] = None

    @property
    def path(self) -> str:
        return self.output.path

    @property
    def dropped(self) -> int:
        """Requests lost to failed writes, or not encoded, since the daemon started."""
        return self.output.dropped

    # Service life

    def privilegedStartService(self) -> None:
        self._open()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.output.stream is None:
            self._open()
        super().startService()
        self._timer = self._clock.callLater(self._flush_interval, self._tick)

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.flush()
        self.output.close()

    def _open(self) -> None:
        """
        Open the file for appending; a file that cannot be opened stops
        the daemon at start, like a bad configuration.
        """
        self._size = self.output.open()
        self._described = _NOTHING

    # Requests

    def record(
        self, request: PolicyRequest, decision: Any, started: float, block: bytes = b""
    ) -> None:
        """
        Keep an answered request for the next write. The protocol calls
        this after the answer is written to the connection.

        Only strings are kept, nothing the garbage collector visits, and the
        request is read once, while its memory is still in the cache: its
        values joined with C{","} (checked in two passes in C: clean ASCII
        without quotes, backslashes or control characters, nearly every
        request, is JSON as it is; any other is escaped value by value),
        and the end of its line, its decision, encoded once per distinct
        decision. Lines are made for a batch of requests at once
        (L{_encode_batch}).

        @param decision: the L{pfxpold.chain.Decision} answered.
        @param started: when the request was complete.
        @param block: the request's lines as they came (not used here: the
            writer process, L{pfxpold.captureprocess}, takes them).
        """
        try:
            attributes: Mapping[str, str] = self._redact(request) if self._redacting else request
            # The names checked by their hash (a tuple's, from its strings'
            # cached hashes): comparing 29 strings costs three times as
            # much, and a collision of 64-bit keyed hashes is no risk.
            if hash(tuple(attributes.keys())) == self._usual:
                joined = '","'.join(attributes.values())
                text = joined.encode("ascii") if joined.isascii() else None
                if text is None or text.translate(None, _PLAIN) != self._quotes:
                    escaped = _values_text(attributes.values(), len(attributes))
                    text = escaped[1:-1].encode("ascii")
                action = decision.action
                key = (
                    None if action is None else action.line,
                    decision.decided_by,
                    tuple(decision.verdicts),
                )
                decided = self._decisions.get(key)
                if decided is None:
                    decided = self._decision_text(decision, key)
            else:
                text, decided = self._unusual(attributes, decision, started)
        except Exception:
            # Never a request the protocol parsed: capturing must not
            # break the connection that answered it.
            self._unencodable_request()
            return
        self._texts.append(text)
        self._decided.append(decided)
        times = self._times
        times.append(started)
        if len(times) >= self._encode_at:
            self._batch_full()

    def _unusual(
        self, attributes: Mapping[str, str], decision: Any, started: float
    ) -> tuple[bytes, bytes]:
        """
        A request that does not have the header's attribute names in their
        order: the first request (whose names the header then declares), or
        one written whole, names and values.

        @return: its values' text and the end of its line, or C{b""} and its
            whole line (C{b""} and C{b""} when it cannot be encoded).
        """
        try:
            if self._names is None:
                names = self._names = tuple(attributes.keys())
                if names:
                    # A request without attributes has no values to join:
                    # such requests are written whole.
                    self._usual = hash(names)
                    self._quotes = b'"' * (2 * (len(names) - 1))
                    action = decision.action
                    key = (
                        None if action is None else action.line,
                        decision.decided_by,
                        tuple(decision.verdicts),
                    )
                    return (
                        _values_text(attributes.values(), len(names))[1:-1].encode("ascii"),
                        self._decision_text(decision, key),
                    )
            line = self._whole_line(attributes, decision, started).encode("ascii")
        except Exception:
            self._unencodable_request()
            line = b""
        self._whole.append(len(self._texts))
        return b"", line

    def _batch_full(self) -> None:
        self._encode_batch()
        if self._pending_count >= self._max_buffered:
            self.flush()
        self._encode_at = min(self._batch, self._max_buffered - self._pending_count)

    def _encode_batch(self) -> None:
        """
        Make the lines of the requests kept: each is its time, its values
        and its decision, three strings joined with all the others at once.
        """
        times, texts, decided, whole = self._times, self._texts, self._decided, self._whole
        if not times:
            return
        self._times, self._texts, self._decided, self._whole = [], [], [], []
        heads: list[bytes] = []
        add = heads.append
        last_ms = -1
        head = b""
        for started in times:
            # Requests of one millisecond share their time's text.
            ms = int(started * 1000.0 + 0.5)
            if ms != last_ms:
                last_ms = ms
                head = _HEAD % started
            add(head)
        for index in whole:
            heads[index] = b""
        lost = decided.count(b"")
        if lost < len(texts):
            self._pending.append(
                b"".join(chain.from_iterable(zip(heads, texts, decided, strict=True)))
            )
            self._pending_count += len(texts) - lost

    def _whole_line(self, attributes: Mapping[str, str], decision: Any, started: float) -> str:
        """
        The line of a request whose attributes are not the header's: its
        names and values.
        """
        action = decision.action
        return (
            _encode(
                {
                    "t": round(started, 3),
                    "request": dict(attributes),
                    "answer": None if action is None else str(action),
                    "by": decision.decided_by,
                    "verdicts": decision.verdicts,
                }
            )
            + "\n"
        )

    def _decision_text(self, decision: Any, key: Any) -> bytes:
        """
        The end of a request's line, after its values: its answer, its
        deciding check and its verdicts, encoded once per distinct decision
        (C{key}).
        """
        action = decision.action
        text = (
            _DECIDED
            % (
                "null" if action is None else _string(str(action)),
                _string(decision.decided_by),
                "".join(_encode_list(decision.verdicts, 0)),
            )
        ).encode("ascii")
        if len(self._decisions) < 4096:
            self._decisions[key] = text
        return text

    def _unencodable_request(self) -> None:
        """
        A request that could not be encoded (never one the protocol parsed)
        is lost, counted, and logged the first time.
        """
        self.output.dropped += 1
        self._unencodable += 1
        if self._unencodable == 1:
            self._log.failure("cannot encode a request for the capture; it is not captured")

    def _tick(self) -> None:
        self._timer = self._clock.callLater(self._flush_interval, self._tick)
        self._reopen_if_moved()
        self.flush()

    def _header(self) -> str:
        configuration = self._checks()
        self._described = configuration
        header: dict[str, Any] = {
            "pfxpold_capture": FORMAT,
            "t": round(self._clock.seconds(), 3),
            "checks": self._describe(configuration) if configuration is not None else {},
            "names": list(self._names or ()),
            "redacted": {
                "hash_local_parts": self.settings.hash_local_parts,
                "dropped": list(self.settings.drop),
            },
        }
        return _encode(header) + "\n"

    def flush(self) -> None:
        """
        Encode and write what is buffered, in one write, rotating the file
        first when it would grow past C{max_bytes}.
        """
        if self._times:
            self._encode_batch()
            self._encode_at = self._batch
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        count, self._pending_count = self._pending_count, 0
        # Batches are written one after the other, not joined: a megabyte
        # copied once more, for nothing.
        size = sum(map(len, pending))
        if (
            self.output.stream is not None
            and self._size
            and self._size + size > self.settings.max_bytes
        ):
            self._rotate()
        if self.output.stream is not None and self._checks() is not self._described:
            header = self._header().encode("ascii")
            pending.insert(0, header)
            size += len(header)
        if self.output.write(pending, count):
            self._size += size

    # Rotation

    def _rotate(self) -> None:
        """
        Rename the full file with a time stamp, start a new one, compress
        the old one if asked, and remove the oldest beyond C{keep}.
        """
        assert self.output.stream is not None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock.seconds()))
        target = f"{self.path}.{stamp}"
        serial = 1
        while os.path.exists(target) or os.path.exists(target + ".gz"):
            target = f"{self.path}.{stamp}-{serial}"
            serial += 1
        self.output.close()
        try:
            os.rename(self.path, target)
            self._open()
        except OSError as e:
            self._log.error(
                "cannot rotate the capture {path}: {reason}", path=self.path, reason=e.strerror
            )
            try:
                self._open()
            except OSError:
                self.output.stream = None
            return
        self.rotated.append(target)
        if self.settings.compress:
            compressing = self._in_thread(lambda: gzip_file(target))
            if hasattr(compressing, "addCallbacks"):
                compressing.addCallbacks(lambda _: self._prune(), self._compress_failed)
                return
        self._prune()

    def _compress_failed(self, failure: Any) -> None:
        self._log.error(
            "cannot compress a rotated capture file: {reason}", reason=failure.getErrorMessage()
        )
        self._prune()

    def rotated_files(self) -> list[str]:
        """
        The rotated files of this capture on disk, oldest first.
        """
        directory = os.path.dirname(self.path) or "."
        prefix = os.path.basename(self.path) + "."
        names = [
            name
            for name in os.listdir(directory)
            if name.startswith(prefix)
            and name[len(prefix) : len(prefix) + 1].isdigit()
            and not name.endswith(".tmp")
        ]

        def order(name: str) -> tuple[str, int]:
            stem = name[len(prefix) :].removesuffix(".gz")
            stamp, _, serial = stem.partition("-")
            return stamp, int(serial) if serial.isdigit() else 0

        return [os.path.join(directory, name) for name in sorted(names, key=order)]

    def _prune(self) -> None:
        files = self.rotated_files()
        for old in files[: max(0, len(files) - self.settings.keep)]:
            try:
                os.unlink(old)
            except OSError as e:
                self._log.warn(
                    "cannot remove the old capture {file}: {reason}", file=old, reason=e.strerror
                )

    def _reopen_if_moved(self) -> None:
        """
        When the path no longer names the open file (moved away by hand),
        flush to the old file and go on in a new one at the path.
        """
        if self.output.moved():
            self.flush()
            size = self.output.reopen()
            if size is not None:
                self._size = size
                self._described = _NOTHING
