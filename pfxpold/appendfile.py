"""
A file a service appends batches of lines to: the request log and the
capture.

Both open their file before twistd drops privileges, follow it when
logrotate (or an admin) moves it away, and survive failing writes (a full
disk, a read-only file system): what is lost is counted and logged once
per outage, and the daemon goes on answering.
"""

from __future__ import annotations

import os
from typing import IO, Any, Optional, Union

from twisted.logger import Logger


class AppendedFile:
    """
    One file opened for appending.

    @ivar path: the file.
    @ivar what: what it holds, for the log (C{"request log"}, C{"capture"}).
    @ivar unit: what a lost write loses, in the plural (C{"lines"},
        C{"requests"}).
    @ivar dropped: units lost to failed writes since the daemon started.
    @ivar stream: the open file, or L{None}.
    """

    _log = Logger()

    def __init__(self, path: str, what: str, unit: str, encoding: Optional[str] = "utf-8") -> None:
        """
        @param encoding: the text's encoding; L{None} for a file written
            bytes (the caller encodes).
        """
        self.path = path
        self.what = what
        self.unit = unit
        self.dropped = 0
        self.stream: Optional[IO[Any]] = None
        self._encoding = encoding
        self._identity: Optional[tuple[int, int]] = None
        self._failing = False
        self._reopen_failed = False

    def open(self) -> int:
        """
        Open the file for appending.

        @return: its size.
        @raise OSError: when it cannot be opened (at start, the caller
            stops the daemon: requests would otherwise go unrecorded without
            anyone noticing).
        """
        self.stream = self._opened()
        stat = os.fstat(self.stream.fileno())
        self._identity = (stat.st_dev, stat.st_ino)
        return stat.st_size

    def _opened(self) -> IO[Any]:
        if self._encoding is None:
            return open(self.path, "ab")
        return open(self.path, "a", encoding=self._encoding, errors="replace")

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def write(self, text: Union[str, bytes, list[bytes]], count: int) -> bool:
        """
        Write C{text} (C{count} units) in one write, and flush it: bytes
        for a file opened without an encoding, or a list of them, written
        one after the other rather than joined first.

        @return: whether it was written; when not, the loss is counted and
            logged (once per outage).
        """
        if self.stream is None:
            self.lost(count, f"the {self.what} is not open")
            return False
        try:
            if type(text) is list:
                self.stream.writelines(text)
            else:
                self.stream.write(text)
            self.stream.flush()
        except OSError as e:
            self.lost(count, e.strerror or str(e))
            return False
        if self._failing:
            self._failing = False
            self._log.info(
                "{what} {path} is written again; {dropped} {unit} were lost",
                what=self.what,
                path=self.path,
                dropped=self.dropped,
                unit=self.unit,
            )
        return True

    def lost(self, count: int, reason: str) -> None:
        """
        Count C{count} units lost for C{reason}, logged once per outage: a
        full disk would otherwise add a line to twistd's log every flush.
        """
        self.dropped += count
        if not self._failing:
            self._failing = True
            self._log.error(
                "cannot write the {what} {path}: {reason}; {unit} are lost until it works",
                what=self.what,
                path=self.path,
                reason=reason,
                unit=self.unit,
            )

    def moved(self) -> bool:
        """
        Whether the path no longer names the open file (logrotate moved it).
        """
        try:
            stat = os.stat(self.path)
        except OSError:
            return True
        return (stat.st_dev, stat.st_ino) != self._identity

    def reopen(self) -> Optional[int]:
        """
        Go on in a new file at the path; when it cannot be opened, keep
        writing to the moved one (and say so once).

        @return: the new file's size, or L{None} when it was not opened.
        """
        try:
            replacement = self._opened()
        except OSError as e:
            if not self._reopen_failed:
                self._reopen_failed = True
                self._log.error(
                    "{what} {path} was moved and cannot be opened again ({reason});"
                    " still writing to the moved file",
                    what=self.what,
                    path=self.path,
                    reason=e.strerror,
                )
            return None
        self._reopen_failed = False
        self.close()
        self.stream = replacement
        stat = os.fstat(replacement.fileno())
        self._identity = (stat.st_dev, stat.st_ino)
        self._log.info("{what} {path} reopened", what=self.what, path=self.path)
        return stat.st_size


__all__ = ["AppendedFile"]
