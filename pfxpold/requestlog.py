"""
The request log in a file of its own.

By default every answered request is one event in twistd's log, which is
where an admin looks first, but twistd's log observer formats a timestamp
and writes and flushes the file for every event: at tens of thousands of
requests a second that costs more than deciding them. With
C{request_log = "/var/log/pfxpold/requests.log"} the lines go to that file
instead, the way twisted.web keeps its access log apart: the timestamp is
formatted once a second, and lines are written in batches, at least once a
second and whenever C{max_buffered} bytes are waiting, and when the daemon
stops.

The file is opened for appending when the daemon starts (as root, after
twistd's C{--chroot}: the path is inside the jail then). Once a second the
path is compared with the open file, so that after logrotate moved the file
away the next lines go to a new file at the path; the directory must then
be writable by the user twistd runs as (C{--uid}), or use logrotate's
C{copytruncate}. Worker processes (C{--workers}) append to the same file;
each write holds whole lines.

What a write loses (disk full, a read-only file system) is counted and
logged, and the daemon goes on answering; a crash loses at most the last
second's lines.
"""

from __future__ import annotations

import os
import time
from typing import IO, Any, Optional

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pfxpold.escape import escape, is_clean
from pfxpold.request import PolicyRequest

#: Seconds between writes of what is buffered.
FLUSH_INTERVAL = 1.0

#: Bytes buffered before they are written without waiting for the timer.
MAX_BUFFERED = 65536


def _timestamp(second: int) -> str:
    """
    C{second} as twistd stamps its own log lines (local time with its UTC
    offset), so that both logs sort and grep alike.
    """
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))


class FileRequestLog(Service):
    """
    Writes one line per answered request to C{path}.

    @ivar path: the file.
    @ivar dropped: lines lost to failed writes since the daemon started.
    """

    _log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        flush_interval: float = FLUSH_INTERVAL,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self.path = path
        self.dropped = 0
        self._clock = clock
        self._flush_interval = flush_interval
        self._max_buffered = max_buffered
        self._file: Optional[IO[str]] = None
        self._identity: Optional[tuple[int, int]] = None
        self._lines: list[str] = []
        self._size = 0
        self._second = -1
        self._stamp = ""
        self._timer: Optional[IDelayedCall] = None
        self._failing = False
        self._reopen_failed = False

    # Service life

    def privilegedStartService(self) -> None:
        """
        Open the file while twistd still runs as root, so that a log
        directory only root may write to works as it does for twistd's
        own log file.
        """
        self._open()
        super().privilegedStartService()

    def startService(self) -> None:
        if self._file is None:
            # Started without privilegedStartService (a tac file's own
            # service tree, tests): open now.
            self._open()
        super().startService()
        self._timer = self._clock.callLater(self._flush_interval, self._tick)

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> None:
        """
        Open the file for appending. A file that cannot be opened stops the
        daemon at start, like a bad configuration: requests would otherwise
        go unlogged without anyone noticing.
        """
        self._file = open(self.path, "a", encoding="utf-8", errors="replace")
        stat = os.fstat(self._file.fileno())
        self._identity = (stat.st_dev, stat.st_ino)

    # Lines

    def record(self, request: PolicyRequest, decision: Any, elapsed_ms: float, peer: str) -> None:
        """
        Buffer the line for one answered request.

        @param decision: the L{pfxpold.chain.Decision} answered.
        @param elapsed_ms: milliseconds from the request's last line to its
            answer.
        @param peer: the connection's peer (not logged: the line is the
            same as twistd's log would show).
        """
        second = int(self._clock.seconds())
        if second != self._second:
            self._second = second
            self._stamp = _timestamp(second)
        action = decision.action
        line = (
            f"{self._stamp} {request.summary()}: {'no reply' if action is None else action}"
            f" ({decision.decided_by}, {elapsed_ms:.1f} ms)"
        )
        if not is_clean(line):
            # A value with a CR, an escape sequence, U+2028...: the fixed
            # parts of the line need no escaping, so escaping the line
            # escapes each value.
            line = escape(line)
        line += "\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self._max_buffered:
            self.flush()

    def _tick(self) -> None:
        self._timer = self._clock.callLater(self._flush_interval, self._tick)
        self._reopen_if_moved()
        self.flush()

    def flush(self) -> None:
        """
        Write what is buffered, in one write.
        """
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        self._size = 0
        if self._file is None:
            self._lost(len(lines), "the request log is not open")
            return
        try:
            self._file.write("".join(lines))
            self._file.flush()
        except OSError as e:
            self._lost(len(lines), e.strerror or str(e))
            return
        if self._failing:
            self._failing = False
            self._log.info(
                "request log {path} is written again; {dropped} lines were lost",
                path=self.path,
                dropped=self.dropped,
            )

    def _lost(self, count: int, reason: str) -> None:
        self.dropped += count
        if not self._failing:
            # Once per outage: a full disk would otherwise add a line to
            # twistd's log for every flush.
            self._failing = True
            self._log.error(
                "cannot write the request log {path}: {reason}; lines are lost until it works",
                path=self.path,
                reason=reason,
            )

    def _reopen_if_moved(self) -> None:
        """
        Follow logrotate: when the path no longer names the open file,
        flush to the old file and continue in a new one at the path.
        """
        try:
            stat = os.stat(self.path)
            if (stat.st_dev, stat.st_ino) == self._identity:
                return
        except OSError:
            pass
        self.flush()
        try:
            replacement = open(self.path, "a", encoding="utf-8", errors="replace")
        except OSError as e:
            if not self._reopen_failed:
                self._reopen_failed = True
                self._log.error(
                    "request log {path} was moved and cannot be opened again ({reason});"
                    " still writing to the moved file",
                    path=self.path,
                    reason=e.strerror,
                )
            return
        self._reopen_failed = False
        if self._file is not None:
            self._file.close()
        self._file = replacement
        stat = os.fstat(replacement.fileno())
        self._identity = (stat.st_dev, stat.st_ino)
        self._log.info("request log {path} reopened", path=self.path)
