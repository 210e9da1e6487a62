"""
Log observers for twistd: where pfxpold's log goes, and how the request
lines (L{pfxpold.requestlog}) get there in batches.

Under twistd, a busy relay's log is mostly request lines, one per answered
request. twistd's own observers take one event at a time, and format a
timestamp and write and flush their output for each, which costs more than
deciding the request. So by default pfxpold hands twistd's log one event
per batch of request lines (L{pfxpold.requestlog.EventRequestLog}), and puts
observers in twistd's place that write such an event as one classic line
per request, the same lines, each with its own timestamp, in one write:

  - L{twistd_log_observer}: the observer twistd would make for
    C{--logfile FILE} (rotated by twistd's rules, at 1 MB and on SIGUSR1)
    or for standard output (C{-n} without a log file, under a
    supervisor), offered to twistd as the application's C{ILogObserver}
    (L{OffersLogObserver}), the way a C{.tac} file sets one.
  - L{SyslogMailObserver}, for C{twistd --logger pfxpold.logger.mail_syslog}:
    syslog's C{mail} facility.

With twistd's C{--syslog}, another C{--logger}, or outside twistd, the
request lines stay one event each, as any observer understands.

twistd's own C{--syslog} always logs to the C{user} facility; Postfix
admins look in C{mail}. Run::

    twistd --logger pfxpold.logger.mail_syslog pfxpold ...

to send pfxpold's log to syslog's C{mail} facility, tagged C{pfxpold}.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import syslog as _syslog
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

from twisted.logger import (
    ILogObserver,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from zope.interface import implementer

from pfxpold.config import DEFAULT_LOG_MAX_BYTES
from pfxpold.requestlog import BATCH_KEY, Batch

#: The environment variable naming the syslog socket of
#: L{SyslogMailObserver} (by default C{/dev/log}).
SYSLOG_SOCKET_VARIABLE = "PFXPOLD_SYSLOG_SOCKET"

_PRIORITIES = {
    LogLevel.debug: _syslog.LOG_DEBUG,
    LogLevel.info: _syslog.LOG_INFO,
    LogLevel.warn: _syslog.LOG_WARNING,
    LogLevel.error: _syslog.LOG_ERR,
    LogLevel.critical: _syslog.LOG_CRIT,
}


def _classic_prefix(event: Mapping[str, Any], second: int) -> str:
    """
    What twistd writes before the text of C{event} had it been logged in
    C{second}: its timestamp and C{[system]}. Made by Twisted's own
    formatter, so that batched lines read exactly as lines of their own.
    """
    probe = {
        "log_time": float(second),
        "log_format": "-",
        "log_namespace": event.get("log_namespace"),
        "log_level": event.get("log_level"),
    }
    if "log_system" in event:
        probe["log_system"] = event["log_system"]
    text = formatEventAsClassicLogText(probe) or "- \n"
    return text[:-2]


#: Characters of a batch written at a time to a text log: twistd's LogFile
#: checks whether to rotate before each write, so a batch must not push the
#: file far past its size (C{log_max_bytes}, at least 64 KiB); each write
#: also takes LogFile's lock and asks whether to rotate, so fewer is cheaper.
WRITE_SIZE = 16384


@implementer(ILogObserver)
class TextLogObserver:
    """
    Writes events to a text file as twistd's C{textFileLogObserver} does
    (Twisted's C{formatEventAsClassicLogText}), and a batch of request
    lines as one such line per request, as if each had been an event of its
    own, in writes of about L{WRITE_SIZE} characters and one flush.

    @ivar output: the file: a L{LogFile} or standard output.
    """

    def __init__(self, output: Any) -> None:
        self.output = output

    def __call__(self, event: dict[str, Any]) -> None:
        batch: Optional[Batch] = event.get(BATCH_KEY)
        if batch is None:
            text = formatEventAsClassicLogText(event)
            if text:
                self.output.write(text)
                self.output.flush()
            return
        write = self.output.write
        for second, lines in batch:
            prefix = _classic_prefix(event, second)
            separator = "\n" + prefix
            # As many lines a write as make about WRITE_SIZE, from their
            # average length: no Python step per line. A write that comes
            # out much longer (a few very long lines among short ones) is
            # written a line at a time instead.
            characters = sum(map(len, lines)) + len(separator) * len(lines)
            step = max(1, len(lines) * WRITE_SIZE // max(1, characters))
            for start in range(0, len(lines), step):
                chunk = lines[start : start + step]
                text = prefix + separator.join(chunk) + "\n"
                if len(text) <= 2 * WRITE_SIZE or len(chunk) == 1:
                    write(text)
                else:
                    for line in chunk:
                        write(prefix + line + "\n")
        self.output.flush()


def _twistd_output(twistd_options: Optional[Mapping[str, Any]]) -> Optional[str]:
    """
    Where twistd's own text log goes by its options: C{"-"} for standard
    output, a file's path, or L{None} where it is not a text log of
    twistd's (C{--syslog}, C{--logger}, outside twistd) or twistd refuses
    the options (a daemon logging to standard output).
    """
    if not twistd_options or twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    logfile = twistd_options.get("logfile") or ""
    nodaemon = bool(twistd_options.get("nodaemon"))
    if logfile == "-" or (nodaemon and not logfile):
        return "-" if nodaemon else None
    return logfile or "twistd.log"


def twistd_log_observer(
    twistd_options: Optional[Mapping[str, Any]],
    reactor: Any,
    max_bytes: int = DEFAULT_LOG_MAX_BYTES,
    keep: int = 0,
) -> Optional[ILogObserver]:
    """
    The observer twistd would make from its options for a log file or for
    standard output, writing batches of request lines
    (L{TextLogObserver}).

    As twistd does: C{--logfile FILE} (C{twistd.log} by default when
    daemonized) is Twisted's L{LogFile}, rotated by size and, unless
    something already handles SIGUSR1, on SIGUSR1; C{-n} without a log
    file, or C{--logfile -} with C{-n}, is standard output. Unlike twistd,
    the size is C{max_bytes}, not 1 MB: request lines reach 1 MB every few
    seconds on a busy relay, and each rotation renames every older file
    (C{.1} to C{.2}, ...), so it grew slower the more files were kept.

    @param twistd_options: twistd's own options (the parent of pfxpold's).
    @param max_bytes: the size at which the log file is rotated
        (C{log_max_bytes}).
    @param keep: how many rotated files are kept (C{log_keep}); 0 keeps
        them all, as twistd does.
    @return: the observer, or L{None} where twistd's own stays: with
        C{--syslog} or C{--logger}, outside twistd, or for a daemon told to
        log to standard output (which twistd refuses).
    """
    destination = _twistd_output(twistd_options)
    if destination is None:
        return None
    output: Any
    if destination == "-":
        output = sys.stdout
    else:
        output = LogFile.fromFullPath(
            destination, rotateLength=max_bytes, maxRotatedFiles=keep or None
        )
        if not signal.getsignal(signal.SIGUSR1):

            def rotate(number: int, frame: Any) -> None:
                reactor.callFromThread(output.rotate)

            signal.signal(signal.SIGUSR1, rotate)
    return TextLogObserver(output)


def takes_request_batches(twistd_options: Optional[Mapping[str, Any]]) -> bool:
    """
    Whether twistd's log, as its options make it, understands batches of
    request lines: L{twistd_log_observer}'s, or a C{--logger} factory that
    says so (C{takes_request_batches}, as L{mail_syslog}).
    """
    if not twistd_options:
        return False
    factory = twistd_options.get("logger")
    if factory is not None:
        return bool(getattr(factory, "takes_request_batches", False))
    return _twistd_output(twistd_options) is not None


class OffersLogObserver:
    """
    A service that, made by a twistd plugin, gives twistd its log observer.

    twistd looks for an C{ILogObserver} component on the application before
    it makes its own from C{--logfile}; a C{.tac} file sets one with
    C{application.setComponent}. A plugin's service is given the
    application as its parent (C{setServiceParent}), before twistd starts
    logging, and offers the observer there, unless one is set already. It
    is made only then: a service that never runs under twistd opens no
    log file.

    @ivar log_observer_factory: makes the observer to offer (or L{None}
        for twistd's own), or L{None}.
    """

    log_observer_factory: Optional[Callable[[], Optional[ILogObserver]]] = None

    def setServiceParent(self, parent: Any) -> None:
        if (
            self.log_observer_factory is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver, None) is None
        ):
            observer = self.log_observer_factory()
            if observer is not None:
                parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)  # type: ignore[misc]


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _syslog_time(when: float) -> str:
    """
    C{when} as syslog(3) stamps a message: C{Dec  4 16:54:06}, local time,
    English month names whatever the locale.
    """
    moment = time.localtime(when)
    return (
        f"{_MONTHS[moment.tm_mon - 1]} {moment.tm_mday:2d}"
        f" {moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d}"
    )


def connect_syslog(address: str) -> socket.socket:
    """
    A socket connected to the syslog socket at C{address}: a datagram one,
    as C{/dev/log} is under journald and rsyslog, or a stream one where
    the daemon listens so.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        connection.connect(address)
        return connection
    except OSError as e:
        connection.close()
        if e.errno != errno.EPROTOTYPE:
            raise
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(address)
    except OSError:
        connection.close()
        raise
    return connection


@implementer(ILogObserver)
class SyslogMailObserver:
    """
    Writes each event to syslog at the priority of its level, one message
    per event line, in the facility given (C{mail} by default), tagged
    C{prefix[PID]}; a batch of request lines (L{pfxpold.requestlog}) as one
    C{info} message per request, sent in one go.

    The messages are those syslog(3) sends (C{<PRI>Mmm dd hh:mm:ss
    TAG[PID]: text}), sent by this observer itself to a socket it connects
    when it is made, before twistd changes root or drops privileges:
    C{/dev/log}, or the path in C{$PFXPOLD_SYSLOG_SOCKET}. A message that
    cannot be sent is sent again on a new connection, if the path can be
    connected to again, and is otherwise lost (and counted in C{lost}).

    @ivar facility: the syslog facility.
    @ivar address: the socket's path.
    @ivar lost: messages that could not be sent.
    """

    def __init__(
        self,
        prefix: str = "pfxpold",
        facility: int = _syslog.LOG_MAIL,
        address: Optional[str] = None,
        connect: Optional[Callable[[str], Any]] = None,
        getpid: Callable[[], int] = os.getpid,
    ) -> None:
        """
        @param address: the socket's path; by default
            C{$PFXPOLD_SYSLOG_SOCKET}, or C{/dev/log}.
        @param connect: gives a connected socket for a path
            (L{connect_syslog}; tests pass a fake).
        """
        self.facility = facility
        self.address = address or os.environ.get(SYSLOG_SOCKET_VARIABLE) or "/dev/log"
        self.lost = 0
        self._prefix = prefix
        self._connect = connect or connect_syslog
        self._getpid = getpid
        self._stream = False
        self._socket: Any = None
        try:
            self._open()
        except OSError:
            # No syslog yet: each message tries again.
            self._socket = None

    def _open(self) -> None:
        self._socket = self._connect(self.address)
        self._stream = getattr(self._socket, "type", socket.SOCK_DGRAM) == socket.SOCK_STREAM

    def _header(self, priority: int, when: float) -> str:
        return f"<{priority | self.facility}>{_syslog_time(when)} {self._prefix}[{self._getpid()}]: "

    def _send_all(self, messages: list[str]) -> None:
        """
        Send each message as one datagram (on a stream socket, ended by a
        NUL, as syslog(3) does). When a send fails (syslog restarted, or
        was not there), connect again once and go on; when that fails too,
        the rest are lost, and the next call tries again.
        """
        terminator = "\0" if self._stream else ""
        data = [(message + terminator).encode("utf-8", "replace") for message in messages]
        sent = 0
        reconnected = False
        while sent < len(data):
            try:
                if self._socket is None:
                    reconnected = True
                    self._open()
                send = self._socket.send
                for datagram in data[sent:] if sent else data:
                    send(datagram)
                    sent += 1
            except OSError:
                if self._socket is not None:
                    self._socket.close()
                    self._socket = None
                if reconnected:
                    self.lost += len(data) - sent
                    return

    def __call__(self, event: dict) -> None:
        batch = event.get(BATCH_KEY)
        if batch is not None:
            self._send_batch(batch, _PRIORITIES.get(event.get("log_level"), _syslog.LOG_INFO))
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        if not text:
            return
        priority = _PRIORITIES.get(event.get("log_level"), _syslog.LOG_INFO)
        header = self._header(priority, event.get("log_time") or time.time())
        self._send_all([header + line for line in text.splitlines()])

    def _send_batch(self, batch: Batch, priority: int) -> None:
        messages = []
        for second, lines in batch:
            header = self._header(priority, second)
            messages += [header + line for line in lines]
        self._send_all(messages)


def mail_syslog() -> SyslogMailObserver:
    """
    The observer factory for C{twistd --logger pfxpold.logger.mail_syslog}.
    """
    return SyslogMailObserver()


#: twistd's log then understands batches of request lines.
mail_syslog.takes_request_batches = True  # type: ignore[attr-defined]


__all__ = [
    "OffersLogObserver",
    "SyslogMailObserver",
    "TextLogObserver",
    "mail_syslog",
    "takes_request_batches",
    "twistd_log_observer",
]
