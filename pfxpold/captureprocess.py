"""
The capture written by a process of its own, off the answering core.

Encoding a request as a JSON line costs the daemon's one core about a
tenth of what answering it does (L{pfxpold.capture}). With C{[server]
capture_process = true}, the default, the daemon only keeps each
answered request's lines as they came, the time and which decision it
got, and hands them, a batch at a time, to a process forked when the
daemon starts. That process runs the same L{CaptureWriter}: the file, its
format, its rotation and redaction are the same as without it.

The two talk over a pair of Unix sockets, each message a length and a
pickle (the other end is this program's own fork, never anyone else):

 - daemon to writer: C{("checks", fingerprints)} when the configuration
   in force changes (the next header line describes it), and C{("batch",
   definitions, times, numbers, blocks)}: the requests' times, the
   numbers of their decisions (each defined once, in C{definitions}, as
   the answer, the deciding check and the verdicts) and their lines;
 - writer to daemon: C{("dropped", count)}, the requests it lost, and
   C{("log", level, text)}, what it has to say, which the daemon logs.

Nothing waits on the writer. When it falls behind by more than
C{MAX_BACKLOG} bytes, batches are dropped, counted and logged once per
outage. When it ends unexpectedly, the daemon logs it, counts what it
records meanwhile as lost, and forks a new one C{RESTART_INTERVAL}
seconds later. The writer ignores the signals an admin's tools send
(HUP, USR1, TERM to the whole group): it ends when the daemon closes its
socket, after writing everything it was given, and the daemon waits for
that (at most C{STOP_TIMEOUT} seconds) before it exits.
"""

from __future__ import annotations

import errno
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReadWriteDescriptor
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.capture import (
    BATCH,
    FLUSH_INTERVAL,
    CaptureWriter,
    check_fingerprints,
)
from pfxpold.config import CaptureSettings
from pfxpold.escape import escape
from pfxpold.request import PolicyRequest

#: A message's length, before it.
FRAME = struct.Struct("!I")

#: Bytes waiting for the writer beyond which batches are dropped.
MAX_BACKLOG = 64 * 1024 * 1024

#: Seconds between a writer's unexpected end and the next one's start.
RESTART_INTERVAL = 10.0

#: Seconds the daemon waits at stop for the writer to write what it has.
STOP_TIMEOUT = 30.0

#: How often, and how many times, the daemon looks for the writer's exit
#: status once its socket is closed, before it kills it.
REAP_INTERVAL = 0.01
REAP_TRIES = 500

#: Distinct decisions numbered before the numbering starts again.
MAX_DECISIONS = 65536

#: The socket buffers asked for (the kernel may give less).
SOCKET_BUFFER = 4 * 1024 * 1024

#: The signals the writer ignores: it ends when the daemon says so.
IGNORED_SIGNALS = ("SIGHUP", "SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGPIPE")


def encode_message(message: tuple[Any, ...]) -> bytes:
    """
    One message as it goes over the socket: its length and its pickle.
    """
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(payload)) + payload


class MessageReader:
    """
    Cuts the bytes received into messages (L{encode_message}).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        buffer = self._buffer
        buffer += data
        messages = []
        start = 0
        while len(buffer) - start >= FRAME.size:
            (length,) = FRAME.unpack_from(buffer, start)
            end = start + FRAME.size + length
            if len(buffer) < end:
                break
            # Our own fork's pickles, from a socket pair nobody else holds.
            messages.append(pickle.loads(memoryview(buffer)[start + FRAME.size : end]))
            start = end
        del buffer[:start]
        return messages


def request_block(request: Mapping[str, str]) -> bytes:
    """
    The lines of a request that was not parsed whole (it came in several
    reads): C{name=value} lines, as Postfix sends them.
    """
    return "".join(f"{name}={value}\n" for name, value in request.items()).encode(
        "utf-8", "surrogatepass"
    )


def parse_block(block: bytes) -> dict[str, str]:
    """
    The attributes of a request's lines, read as the protocol reads them.

    @raise ValueError: for a line without C{=} (never one the protocol
        took).
    """
    lines = block.decode("utf-8", "replace").split("\n")
    if lines and not lines[-1]:
        lines.pop()
    attributes = {}
    for line in lines:
        name, value = line.split("=", 1)
        attributes[name] = value
    return attributes


class _Answer:
    """
    An answer as the writer sees it: its text, and a key for it.
    """

    __slots__ = ("line", "_text")

    def __init__(self, text: str) -> None:
        self._text = text
        self.line = text.encode("utf-8", "surrogatepass")

    def __str__(self) -> str:
        return self._text


class _Decided:
    """
    A decision as the writer sees it (L{pfxpold.chain.Decision}'s fields
    that the capture reads).
    """

    __slots__ = ("action", "decided_by", "verdicts")

    def __init__(self, answer: Optional[str], decided_by: str, verdicts: list) -> None:
        self.action = None if answer is None else _Answer(answer)
        self.decided_by = decided_by
        self.verdicts = [tuple(verdict) for verdict in verdicts]


class CaptureSink:
    """
    The writer's side: the messages the daemon sends, written by a
    L{CaptureWriter}.

    @ivar writer: the L{CaptureWriter} writing the file.
    """

    def __init__(self, writer: CaptureWriter, send: Callable[[tuple[Any, ...]], None]) -> None:
        """
        @param send: sends a message back to the daemon.
        """
        self.writer = writer
        self._send = send
        self._reader = MessageReader()
        self._decisions: dict[int, _Decided] = {}
        self._fingerprints: Optional[dict[str, Any]] = None
        self._reported = 0
        writer._checks = lambda: self._fingerprints
        writer._describe = lambda fingerprints: fingerprints

    def receive(self, data: bytes) -> None:
        for message in self._reader.feed(data):
            self.handle(message)

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "batch":
            _, definitions, times, numbers, blocks = message
            if definitions:
                for number, (answer, decided_by, verdicts) in definitions.items():
                    self._decisions[number] = _Decided(answer, decided_by, verdicts)
            writer = self.writer
            decisions = self._decisions
            for started, number, block in zip(times, numbers, blocks, strict=True):
                try:
                    request = PolicyRequest.adopt(parse_block(block))
                except ValueError:
                    writer._unencodable_request()
                    continue
                writer.record(request, decisions[number], started)
        elif kind == "checks":
            # What was recorded before goes under the header that described
            # its checks.
            self.writer.flush()
            self._fingerprints = message[1]

    def tick(self) -> None:
        """
        The writer's timer: follow a file moved away, write what is kept.
        """
        self.writer._reopen_if_moved()
        self.writer.flush()
        self.report()

    def finish(self) -> None:
        """
        The daemon is stopping: write everything and close the file.
        """
        self.writer.flush()
        self.writer.output.close()
        self.report()

    def report(self) -> None:
        dropped = self.writer.dropped
        if dropped != self._reported:
            self._reported = dropped
            self._send(("dropped", dropped))


class _Completion:
    """
    Work run in a thread of the writer process, whose result the writer's
    loop delivers as a Deferred's (L{CaptureWriter} compresses rotated
    files that way).
    """

    def __init__(self, done: list[tuple[Deferred[None], Optional[BaseException]]]) -> None:
        self._done = done
        self.threads: list[threading.Thread] = []

    def __call__(self, work: Callable[[], None]) -> Deferred[None]:
        finished: Deferred[None] = Deferred()

        def run() -> None:
            try:
                work()
            except BaseException as e:
                self._done.append((finished, e))
            else:
                self._done.append((finished, None))

        thread = threading.Thread(target=run, name="capture compression", daemon=True)
        self.threads.append(thread)
        thread.start()
        return finished

    def deliver(self) -> None:
        while self._done:
            finished, error = self._done.pop(0)
            if error is None:
                finished.callback(None)
            else:
                finished.errback(Failure(error))


@implementer(ILogObserver)
class _Forwarding:
    """
    The writer process's log observer: each event goes to the daemon,
    which logs it (the writer never writes the daemon's log itself).
    """

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send = send

    def __call__(self, event: dict) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}: {failure.getErrorMessage()}"
        level = event.get("log_level", LogLevel.info)
        try:
            self._send(("log", level.name, text))
        except OSError:
            pass


def serve(sock: socket.socket, writer: CaptureWriter, flush_interval: float) -> None:
    """
    The writer process's loop: read the daemon's messages, write them,
    write what is kept every C{flush_interval} seconds, and finish when
    the daemon closes its end.
    """
    sending = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        data = encode_message(message)
        with sending:
            sock.sendall(data)

    observer = _Forwarding(send)
    writer._log = Logger(namespace="pfxpold.capture", observer=observer)
    writer.output._log = Logger(namespace="pfxpold.appendfile", observer=observer)
    done: list[tuple[Deferred[None], Optional[BaseException]]] = []
    completion = _Completion(done)
    writer._in_thread = completion
    sink = CaptureSink(writer, send)
    if writer.output.stream is None:
        # A writer started again after the first ended: the file as it is
        # now at the path.
        writer._open()
    next_tick = time.monotonic() + flush_interval
    while True:
        timeout = max(0.0, next_tick - time.monotonic())
        readable, _, _ = select.select([sock], [], [], timeout)
        if readable:
            try:
                data = sock.recv(1 << 20)
            except InterruptedError:
                continue
            if not data:
                break
            sink.receive(data)
        completion.deliver()
        if time.monotonic() >= next_tick:
            sink.tick()
            next_tick = time.monotonic() + flush_interval
    sink.finish()
    for thread in completion.threads:
        thread.join(STOP_TIMEOUT)
    completion.deliver()
    sink.report()


def _child(sock: socket.socket, writer: CaptureWriter, flush_interval: float) -> None:
    """
    Run in the forked process: never returns.
    """
    status = 1
    try:
        for name in IGNORED_SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        warnings.simplefilter("ignore")
        keep = {0, 1, 2, sock.fileno()}
        if writer.output.stream is not None:
            keep.add(writer.output.stream.fileno())
        _close_other_files(keep)
        serve(sock, writer, flush_interval)
        status = 0
    except BaseException as e:
        try:
            sock.sendall(encode_message(("log", "critical", f"capture writer failed: {e!r}")))
        except BaseException:
            pass
    finally:
        os._exit(status)


def _close_other_files(keep: set[int]) -> None:
    """
    Close what the daemon had open (its listening sockets, its log): the
    writer needs its socket and its file alone.
    """
    start = 0
    for fd in sorted(keep):
        # Never an empty range: Python 3.11's closerange(0, 0) asks
        # close_range(2) for every descriptor.
        if fd > start:
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, max(start + 1, os.sysconf("SC_OPEN_MAX")))


@implementer(IReadWriteDescriptor)
class _Channel:
    """
    The daemon's end of the writer's socket, watched by the reactor.
    """

    def __init__(self, owner: CaptureProcess, sock: socket.socket) -> None:
        self.owner = owner
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "capture writer"

    def doRead(self) -> None:
        self.owner._read(self)

    def doWrite(self) -> None:
        self.owner._send_pending(self)

    def connectionLost(self, reason: Failure) -> None:
        self.owner._ended(self)


class CaptureProcess(Service):
    """
    Captures answered requests through a writer process (see the module).
    It offers L{CaptureWriter}'s C{record}, C{path} and C{dropped}.
    """

    _log = Logger()

    def __init__(
        self,
        settings: CaptureSettings,
        reactor: Any,
        checks: Callable[[], Any] = lambda: None,
        path: Optional[str] = None,
        key: Optional[bytes] = None,
        batch: int = BATCH,
        flush_interval: float = FLUSH_INTERVAL,
        fork: Callable[[], int] = os.fork,
        socketpair: Callable[..., tuple[Any, Any]] = socket.socketpair,
        kill: Callable[[int, int], None] = os.kill,
        describe: Callable[[Any], dict[str, dict[str, str]]] = check_fingerprints,
    ) -> None:
        """
        @param checks: gives the configuration in force, as for
            L{CaptureWriter}.
        @param path: the file, when not C{settings.path} (a worker's).
        @param key: the redaction key (default: L{pfxpold.capture.redaction_key}).
        @param fork: forks the writer process; C{socketpair} makes the
            sockets between the two; C{kill} signals the writer (tests
            pass stand-ins).
        @param describe: gives the header's C{checks} from what C{checks}
            returned.
        """
        self.settings = settings
        self._reactor = reactor
        self._checks = checks
        # Made here, opened before privileges are dropped, and used by the
        # writer process only.
        self.writer = CaptureWriter(settings, reactor, path=path, key=key)
        self._batch = max(1, batch)
        self._flush_interval = flush_interval
        self._fork = fork
        self._socketpair = socketpair
        self._kill = kill
        self._describe = describe
        self._times: list[float] = []
        self._numbers: list[int] = []
        self._blocks: list[bytes] = []
        self._decisions: dict[Any, int] = {}
        self._definitions: dict[int, tuple[Optional[str], str, list]] = {}
        self._described: Any = object()
        self._outgoing: deque[memoryview] = deque()
        self._backlog = 0
        self._channel: Optional[_Channel] = None
        self._reader = MessageReader()
        self._writing = False
        #: The writer process's PID while it runs.
        self.pid: Optional[int] = None
        self._timer: Optional[IDelayedCall] = None
        self._restart_at = 0.0
        self._stopping: Optional[Deferred[None]] = None
        self._stop_timer: Optional[IDelayedCall] = None
        #: Requests lost here (no writer, or one too far behind).
        self._lost = 0
        self._behind = 0
        #: Requests the writers lost: those that ended, the one running.
        self._writers_lost = 0
        self._writer_lost = 0

    @property
    def path(self) -> str:
        return self.writer.path

    @property
    def dropped(self) -> int:
        """Requests lost (failed writes, a writer behind or gone) since the daemon started."""
        return self._lost + self._writers_lost + self._writer_lost

    # Service life

    def privilegedStartService(self) -> None:
        self.writer._open()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.writer.output.stream is None:
            self.writer._open()
        super().startService()
        self._start_writer()
        self._timer = self._reactor.callLater(self._flush_interval, self._tick)

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._send_batch()
        if self._channel is None:
            return None
        stopping = self._stopping = Deferred()
        self._stop_timer = self._reactor.callLater(STOP_TIMEOUT, self._stop_timed_out)
        self._close_when_sent()
        return stopping

    def _start_writer(self) -> None:
        """
        Fork the writer process; on failure, log it and try again later.
        """
        parent, child = self._socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock, option in ((parent, socket.SO_SNDBUF), (child, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
        try:
            pid = self._fork()
        except OSError as e:
            parent.close()
            child.close()
            self._restart_at = self._reactor.seconds() + RESTART_INTERVAL
            self._log.error(
                "cannot start the capture writer process: {reason}; requests are not"
                " captured until it starts (next try in {interval:.0f} s)",
                reason=e.strerror,
                interval=RESTART_INTERVAL,
            )
            return
        if pid == 0:
            parent.close()
            _child(child, self.writer, self._flush_interval)
        child.close()
        # The writer has the file; this process writes nothing to it.
        self.writer.output.close()
        parent.setblocking(False)
        self.pid = pid
        self._channel = _Channel(self, parent)
        self._reader = MessageReader()
        self._writer_lost = 0
        # The new writer knows no decision, and writes a new header.
        self._decisions.clear()
        self._definitions.clear()
        self._described = object()
        self._reactor.addReader(self._channel)
        self._log.info(
            "capture writer process {pid} writes {path}", pid=pid, path=escape(self.path)
        )

    # Requests

    def record(
        self, request: PolicyRequest, decision: Any, started: float, block: bytes = b""
    ) -> None:
        """
        Keep an answered request for the writer: its lines as they came,
        when it was complete, and its decision's number. The protocol calls
        this after the answer is written.
        """
        try:
            if not block:
                block = request_block(request)
            action = decision.action
            key = (
                None if action is None else action.line,
                decision.decided_by,
                tuple(decision.verdicts),
            )
            number = self._decisions.get(key)
            if number is None:
                number = self._define(key, decision)
        except Exception:
            # Never a request the protocol parsed.
            self._lost += 1
            return
        self._blocks.append(block)
        self._numbers.append(number)
        times = self._times
        times.append(started)
        if len(times) >= self._batch:
            self._send_batch()

    def _define(self, key: Any, decision: Any) -> int:
        if len(self._decisions) >= MAX_DECISIONS:
            # Numbers are used again from 0: each is defined anew, in the
            # batch that first uses it, before the requests that do.
            self._send_batch()
            self._decisions.clear()
        number = self._decisions[key] = len(self._decisions)
        action = decision.action
        self._definitions[number] = (
            None if action is None else str(action),
            decision.decided_by,
            list(decision.verdicts),
        )
        return number

    def _tick(self) -> None:
        self._timer = self._reactor.callLater(self._flush_interval, self._tick)
        if self._channel is None and self._reactor.seconds() >= self._restart_at:
            self._start_writer()
        self._send_batch()

    def _send_batch(self) -> None:
        """
        Hand the requests kept to the writer (with the configuration in
        force when it changed).
        """
        times = self._times
        if not times:
            return
        count = len(times)
        message = ("batch", self._definitions, times, self._numbers, self._blocks)
        self._times, self._numbers, self._blocks = [], [], []
        self._definitions = {}
        if self._channel is None:
            self._lost += count
            # Numbers defined in this batch are known to no writer.
            self._decisions.clear()
            return
        if self._backlog > MAX_BACKLOG:
            self._lost += count
            self._behind += count
            if self._behind == count:
                self._log.warn(
                    "the capture writer process is behind by {size} bytes: requests are"
                    " not captured until it catches up",
                    size=self._backlog,
                )
            self._decisions.clear()
            return
        configuration = self._checks()
        if configuration is not self._described:
            self._described = configuration
            fingerprints = self._describe(configuration) if configuration is not None else {}
            self._queue(encode_message(("checks", fingerprints)))
        self._queue(encode_message(message))
        self._send_pending(self._channel)

    def _queue(self, data: bytes) -> None:
        self._outgoing.append(memoryview(data))
        self._backlog += len(data)

    def _send_pending(self, channel: _Channel) -> None:
        if channel is not self._channel:
            return
        outgoing = self._outgoing
        sock = channel.sock
        try:
            while outgoing:
                head = outgoing[0]
                sent = sock.send(head)
                self._backlog -= sent
                if sent < len(head):
                    outgoing[0] = head[sent:]
                    break
                outgoing.popleft()
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                self._log.error("cannot write to the capture writer: {reason}", reason=e.strerror)
            self._ended(channel)
            return
        if outgoing and not self._writing:
            self._writing = True
            self._reactor.addWriter(channel)
        elif not outgoing:
            if self._writing:
                self._writing = False
                self._reactor.removeWriter(channel)
            if self._behind:
                self._log.info(
                    "the capture writer process caught up; {count} requests were not captured",
                    count=self._behind,
                )
                self._behind = 0
            if self._stopping is not None:
                self._close_when_sent()

    def _close_when_sent(self) -> None:
        channel = self._channel
        if channel is not None and not self._outgoing:
            try:
                channel.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    # What the writer says

    def _read(self, channel: _Channel) -> None:
        try:
            data = channel.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._ended(channel)
            return
        for message in self._reader.feed(data):
            kind = message[0]
            if kind == "dropped":
                self._writer_lost = int(message[1])
            elif kind == "log":
                level = LogLevel.levelWithName(message[1])
                self._log.emit(level, "capture writer: {text}", text=escape(str(message[2])))

    def _ended(self, channel: _Channel) -> None:
        """
        The writer closed its end: it finished, or it died.
        """
        if channel is not self._channel:
            return
        self._channel = None
        self._reactor.removeReader(channel)
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(channel)
        channel.sock.close()
        lost = self._backlog
        self._outgoing.clear()
        self._backlog = 0
        self._writers_lost += self._writer_lost
        self._writer_lost = 0
        pid, self.pid = self.pid, None
        self._restart_at = self._reactor.seconds() + RESTART_INTERVAL
        self._reap(pid, lost, REAP_TRIES)

    def _reap(self, pid: Optional[int], lost: int, tries: int) -> None:
        """
        Collect the writer's exit status (it closes its socket as it
        exits: the status follows at once), then finish the stop, or log
        the unexpected end and plan the next writer.
        """
        status = "unknown"
        if pid is not None:
            try:
                done, code = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, code = pid, 0
                status = "reaped elsewhere"
            if not done:
                if tries > 0:
                    self._reactor.callLater(REAP_INTERVAL, self._reap, pid, lost, tries - 1)
                    return
                try:
                    self._kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except OSError:
                    pass
                status = "killed: it did not exit after closing its socket"
            elif status == "unknown":
                if os.WIFSIGNALED(code):
                    status = f"signal {os.WTERMSIG(code)}"
                else:
                    status = f"exit status {os.WEXITSTATUS(code)}"
        if self._stopping is not None:
            stopping, self._stopping = self._stopping, None
            if self._stop_timer is not None and self._stop_timer.active():
                self._stop_timer.cancel()
            stopping.callback(None)
            return
        self._log.error(
            "the capture writer process {pid} ended unexpectedly ({status}); {lost} bytes of"
            " requests were not written, and requests are not captured until a new one"
            " starts in {interval:.0f} s",
            pid=pid,
            status=status,
            lost=lost,
            interval=RESTART_INTERVAL,
        )

    def _stop_timed_out(self) -> None:
        self._stop_timer = None
        channel = self._channel
        if channel is None or self.pid is None:
            return
        self._log.error(
            "the capture writer process {pid} did not finish in {timeout:.0f} s; it is killed,"
            " and what it had not written is lost",
            pid=self.pid,
            timeout=STOP_TIMEOUT,
        )
        try:
            self._kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        self._ended(channel)
