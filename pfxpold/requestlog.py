"""
Where the lines of answered requests go, and the one place they are
formatted.

Every answered request is one line: stage, client, HELO name, envelope,
C{instance}, queue id, the action, the check that decided and the time
taken (L{request_line}). At tens of thousands of requests a second, what
costs is not the line but handing it to a log one at a time: twistd's log
observer formats a timestamp and writes and flushes its file for every
event, which cost more than deciding the request. So the lines are kept
in memory and handed over in batches (L{RequestLines}): at least once a
second (L{FLUSH_INTERVAL}), whenever C{max_buffered} bytes wait, and when
the daemon stops, so a crash loses at most the last second's lines. Each
line keeps the second it was answered in, and is written with that
timestamp.

Two destinations take batches:

  - L{FileRequestLog}: C{request_log = "/var/log/pfxpold/requests.log"},
    a file of its own, the way twisted.web keeps its access log apart.
  - L{EventRequestLog}: the default, twistd's log. One log event carries a
    whole batch (L{BATCH_KEY}); the observers of L{pfxpold.logger} that
    pfxpold puts in twistd's place (its log file, standard output, syslog's
    C{mail} facility) write it as one classic line per request, exactly as
    if each had been an event of its own. Any other observer sees one event
    whose text is the lines.

The file is opened for appending when the daemon starts (as root, after
twistd's C{--chroot}: the path is inside the jail then). Once a second the
path is compared with the open file, so that after logrotate moved the file
away the next lines go to a new file at the path; the directory must then
be writable by the user twistd runs as (C{--uid}), or use logrotate's
C{copytruncate}. Worker processes (C{--workers}) append to the same file;
each write holds whole lines.

What a write loses (disk full, a read-only file system) is counted and
logged, and the daemon goes on answering.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pfxpold.appendfile import AppendedFile
from pfxpold.escape import escape, is_clean
from pfxpold.request import PolicyRequest

#: Seconds between writes of what is buffered.
FLUSH_INTERVAL = 1.0

#: Bytes buffered before they are written without waiting for the timer.
MAX_BUFFERED = 65536

#: The log event key holding a batch of request lines: a list of
#: C{(second, lines)}, the lines answered in that second (an C{int} of
#: the clock's seconds), oldest first.
BATCH_KEY = "pfxpold_request_lines"

#: The namespace of request line events: the protocol's, as when each
#: request was an event of its own, so the lines in twistd's log read
#: C{[pfxpold.protocol.PolicyProtocol#info]} as before and filters written
#: for them still match.
REQUEST_NAMESPACE = "pfxpold.protocol.PolicyProtocol"

#: A batch: C{(second, lines)} pairs.
Batch = list[tuple[int, list[str]]]


def _raw_line(request: PolicyRequest, decision: Any, elapsed_ms: float) -> str:
    """
    L{request_line} before escaping.
    """
    action = decision.action
    if action is None:
        answer = "no reply"
    else:
        # Action.__str__, without a Python call per request.
        text = action.text
        answer = f"{action.verb} {text}" if text else action.verb
    line = f"{request.summary()}: {answer} ({decision.decided_by}, {elapsed_ms:.1f} ms)"
    shadows = decision.shadows
    if shadows:
        line += " shadow " + " ".join(f"{name}={verdict}" for name, verdict in shadows)
    return line


def request_line(request: PolicyRequest, decision: Any, elapsed_ms: float) -> str:
    """
    The one log line of an answered request, without a timestamp, every
    value escaped (L{pfxpold.escape.escape}): e.g. C{RCPT
    mx.example.org[192.0.2.1] helo=<...> from=<...> to=<...> instance=...
    queue_id=...: OK (relay, 0.1 ms)}, followed by C{shadow NAME=VERDICT
    ...} when shadow checks ran (C{pending} for one still running when the
    answer went out: its verdict follows in an event of its own). Every
    destination writes this line.

    @param decision: the L{pfxpold.chain.Decision} answered.
    @param elapsed_ms: milliseconds from the request's last line to its
        answer.
    """
    line = _raw_line(request, decision, elapsed_ms)
    if is_clean(line):
        return line
    # A value with a CR, an escape sequence, U+2028...: the fixed parts of
    # the line need no escaping, so escaping the line escapes each value.
    return escape(line)


def escaped_lines(lines: list[str]) -> list[str]:
    """
    The lines, each escaped as L{request_line} escapes one.

    Nearly every line is clean, so all of them are tested at once (one
    join and one L{is_clean}, a pass in C over the batch: about a third of
    the cost of testing each) and the list is returned as it is when they
    are; a line that is not (a CR in a value, U+2028...) is then found and
    escaped alone.
    """
    if is_clean("".join(lines)):
        return lines
    return [line if is_clean(line) else escape(line) for line in lines]


def render(batch: Batch, prefix: Callable[[int], str]) -> str:
    """
    A batch as text: each line after the prefix of its second, and a
    newline.

    @param prefix: gives the text before each line answered in a second
        (a timestamp, twistd's C{[system]}); called once per second, not
        per line.
    """
    parts = []
    for second, lines in batch:
        start = prefix(second)
        parts.append(start + ("\n" + start).join(lines) + "\n")
    return "".join(parts)


class RequestLines(Service):
    """
    Keeps the lines of answered requests and hands them over in batches:
    on a timer every C{flush_interval} seconds, when C{max_buffered}
    characters wait, and when the service stops. Subclasses say where
    batches go (L{write}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        flush_interval: float = FLUSH_INTERVAL,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self._clock = clock
        self._flush_interval = flush_interval
        self._max_buffered = max_buffered
        self._batch: Batch = []
        self._lines: list[str] = []
        self._second = -1
        self._size = 0
        self._timer: Optional[IDelayedCall] = None

    def startService(self) -> None:
        super().startService()
        self._timer = self._clock.callLater(self._flush_interval, self._tick)

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.flush()

    def record(self, request: PolicyRequest, decision: Any, elapsed_ms: float, peer: str) -> None:
        """
        Keep the line of one answered request.

        @param decision: the L{pfxpold.chain.Decision} answered.
        @param elapsed_ms: milliseconds from the request's last line to its
            answer.
        @param peer: the connection's peer (not logged: the line is the
            same wherever it goes).
        """
        # Escaped when its batch is written (escaped_lines): testing a
        # batch's lines at once costs a third of testing each.
        line = _raw_line(request, decision, elapsed_ms)
        second = int(self._clock.seconds())
        if second != self._second:
            self._second = second
            self._lines = []
            self._batch.append((second, self._lines))
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= self._max_buffered:
            self.flush()

    def _tick(self) -> None:
        self._timer = self._clock.callLater(self._flush_interval, self._tick)
        self.flush()

    def flush(self) -> None:
        """
        Hand what waits to L{write}, in one batch.
        """
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        self._second = -1
        self._size = 0
        self.write([(second, escaped_lines(lines)) for second, lines in batch])

    def write(self, batch: Batch) -> None:
        """
        Write one batch where it goes.
        """
        raise NotImplementedError()


#: Not a class attribute: a Logger found through a class takes the class's
#: namespace, and request lines keep the protocol's.
_requests = Logger(namespace=REQUEST_NAMESPACE)


class EventRequestLog(RequestLines):
    """
    Request lines in twistd's log: one event per batch (L{BATCH_KEY}), at
    the info level, in the protocol's namespace (L{REQUEST_NAMESPACE}).
    """

    def write(self, batch: Batch) -> None:
        _requests.info(
            "{request_text}",
            request_text=render(batch, lambda second: "").rstrip("\n"),
            **{BATCH_KEY: batch},
        )


def _timestamp(second: int) -> str:
    """
    C{second} as twistd stamps its own log lines (local time with its UTC
    offset), so that both logs sort and grep alike.
    """
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))


def _file_prefix(second: int) -> str:
    return _timestamp(second) + " "


class FileRequestLog(RequestLines):
    """
    Writes one line per answered request to C{path}, each after its
    timestamp.

    @ivar output: the file (L{pfxpold.appendfile.AppendedFile}).
    """

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        flush_interval: float = FLUSH_INTERVAL,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        super().__init__(clock, flush_interval, max_buffered)
        self.output = AppendedFile(path, "request log", "lines")

    @property
    def path(self) -> str:
        return self.output.path

    @property
    def dropped(self) -> int:
        """Lines lost to failed writes since the daemon started."""
        return self.output.dropped

    # Service life

    def privilegedStartService(self) -> None:
        """
        Open the file while twistd still runs as root, so that a log
        directory only root may write to works as it does for twistd's
        own log file.
        """
        self.output.open()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.output.stream is None:
            # Started without privilegedStartService (a tac file's own
            # service tree, tests): open now.
            self.output.open()
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        self.output.close()

    # Lines

    def _tick(self) -> None:
        self.reopen_if_moved()
        super()._tick()

    def write(self, batch: Batch) -> None:
        """
        Write a batch, in one write.
        """
        self.output.write(render(batch, _file_prefix), sum(len(lines) for _, lines in batch))

    def reopen_if_moved(self) -> None:
        """
        Follow logrotate: when the path no longer names the open file,
        flush to the old file and continue in a new one at the path.
        """
        if self.output.moved():
            self.flush()
            self.output.reopen()
