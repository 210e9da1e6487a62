"""
Tests for L{pfxpold.logger}: the observers twistd's log is made of, and
how they write batches of request lines.
"""

import io
import os
import signal
import socket
import syslog
import time

from twisted.application.service import Application, IServiceCollection, MultiService, Service
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pfxpold import logger
from pfxpold.logger import (
    SYSLOG_SOCKET_VARIABLE,
    WRITE_SIZE,
    OffersLogObserver,
    SyslogMailObserver,
    TextLogObserver,
    mail_syslog,
    takes_request_batches,
    twistd_log_observer,
)
from pfxpold.requestlog import BATCH_KEY, REQUEST_NAMESPACE
from tests.unit.tempdir import temporary_directory

#: A moment to log at, and the next second.
WHEN = 1764864000
PID = 4321


def syslog_stamp(when):
    """The timestamp syslog(3) writes for C{when} (the C locale's month names)."""
    return time.strftime("%b %e %H:%M:%S", time.localtime(when))


class FakeSocket:
    """
    A connected syslog socket: keeps what is sent, or fails as told.
    """

    def __init__(self, kind=socket.SOCK_DGRAM, fail=0):
        self.type = kind
        self.sent = []
        self.fail = fail
        self.closed = False

    def send(self, data):
        if self.fail:
            self.fail -= 1
            raise OSError(111, "Connection refused")
        self.sent.append(data)
        return len(data)

    def close(self):
        self.closed = True


class SyslogMailObserverTests(SynchronousTestCase):
    """
    Events go to syslog's mail facility, one message per line, as syslog(3)
    sends them.
    """

    def setUp(self):
        self.connected = []
        self.sockets = [FakeSocket()]
        self.observer = self.make()

    def make(self, **arguments):
        def connect(address):
            self.connected.append(address)
            if not self.sockets:
                raise OSError(2, "No such file or directory")
            return self.sockets.pop(0)

        arguments.setdefault("address", "/dev/log")
        return SyslogMailObserver(connect=connect, getpid=lambda: PID, **arguments)

    def sent(self, connection=None):
        """The messages sent, decoded."""
        return [data.decode("utf-8") for data in (connection or self.socket).sent]

    def event(self, level, text, **fields):
        event = dict(
            log_level=level, log_format=text, log_namespace="test", log_time=WHEN, **fields
        )
        self.observer(event)

    def test_verify(self):
        """It is an ILogObserver."""
        self.assertTrue(verifyObject(ILogObserver, self.observer))

    def test_connects_at_once(self):
        """
        The socket is connected when the observer is made: before twistd
        changes root or drops privileges.
        """
        self.assertEqual(self.connected, ["/dev/log"])

    def test_address_from_environment(self):
        """Without an address, $PFXPOLD_SYSLOG_SOCKET names the socket."""
        self.patch(os, "environ", {SYSLOG_SOCKET_VARIABLE: "/run/private.sock"})
        self.sockets = [FakeSocket()]
        observer = self.make(address=None)
        self.assertEqual(observer.address, "/run/private.sock")
        self.assertEqual(self.connected[-1], "/run/private.sock")

    def test_default_address(self):
        """Without either, it is /dev/log."""
        self.patch(os, "environ", {})
        self.sockets = [FakeSocket()]
        self.assertEqual(self.make(address=None).address, "/dev/log")

    def test_message(self):
        """
        A message is <PRI>, the event's time as syslog(3) writes it, the tag
        pfxpold[PID] and the text.
        """
        self.socket = self.observer._socket
        self.event(LogLevel.info, "hello {who}", who="postfix")
        self.assertEqual(
            self.sent(),
            [
                f"<{syslog.LOG_MAIL | syslog.LOG_INFO}>{syslog_stamp(WHEN)} pfxpold[{PID}]: hello postfix"
            ],
        )

    def test_priorities(self):
        """Each level maps to its syslog priority, in the mail facility."""
        self.socket = self.observer._socket
        for level, priority in (
            (LogLevel.debug, syslog.LOG_DEBUG),
            (LogLevel.info, syslog.LOG_INFO),
            (LogLevel.warn, syslog.LOG_WARNING),
            (LogLevel.error, syslog.LOG_ERR),
            (LogLevel.critical, syslog.LOG_CRIT),
        ):
            del self.socket.sent[:]
            self.event(level, "x")
            [message] = self.sent()
            self.assertTrue(message.startswith(f"<{syslog.LOG_MAIL | priority}>"), message)

    def test_no_level(self):
        """An event without a level is logged at info."""
        self.socket = self.observer._socket
        self.observer({"log_format": "old style", "log_time": WHEN})
        [message] = self.sent()
        self.assertTrue(message.startswith(f"<{syslog.LOG_MAIL | syslog.LOG_INFO}>"))
        self.assertTrue(message.endswith(": old style"))

    def test_multiline(self):
        """A multi-line event becomes one message per line."""
        self.socket = self.observer._socket
        self.event(LogLevel.info, "one\ntwo\nthree")
        self.assertEqual([m.split(": ", 1)[1] for m in self.sent()], ["one", "two", "three"])

    def test_failure(self):
        """A failure's traceback follows its message, one line each."""
        self.socket = self.observer._socket
        try:
            raise ValueError("boom")
        except ValueError:
            failure = Failure()
        self.event(LogLevel.critical, "check failed", log_failure=failure)
        lines = [m.split(": ", 1)[1] for m in self.sent()]
        self.assertEqual(lines[0], "check failed")
        self.assertIn("ValueError: boom", lines[-1])
        self.assertGreater(len(lines), 2)
        self.assertTrue(all("\n" not in message for message in self.sent()))
        self.assertEqual(
            {m.split(">")[0] for m in self.sent()}, {f"<{syslog.LOG_MAIL | syslog.LOG_CRIT}"}
        )

    def test_empty(self):
        """An event with no text sends nothing."""
        self.socket = self.observer._socket
        self.observer({"log_level": LogLevel.info})
        self.assertEqual(self.sent(), [])

    def test_other_facility(self):
        """Another facility can be given."""
        self.sockets = [FakeSocket()]
        observer = self.make(facility=syslog.LOG_LOCAL0)
        connection = observer._socket
        observer({"log_level": LogLevel.error, "log_format": "x", "log_time": WHEN})
        [message] = self.sent(connection)
        self.assertTrue(message.startswith(f"<{syslog.LOG_LOCAL0 | syslog.LOG_ERR}>"))

    def test_batch(self):
        """
        A batch of request lines is one info message per line, each with
        the time of its own second, in order.
        """
        self.socket = self.observer._socket
        batch = [(WHEN, ["first", "second"]), (WHEN + 1, ["third"])]
        self.observer(
            {
                "log_level": LogLevel.info,
                "log_format": "{request_text}",
                "request_text": "first\nsecond\nthird",
                "log_time": WHEN + 2,
                BATCH_KEY: batch,
            }
        )
        info = syslog.LOG_MAIL | syslog.LOG_INFO
        self.assertEqual(
            self.sent(),
            [
                f"<{info}>{syslog_stamp(WHEN)} pfxpold[{PID}]: first",
                f"<{info}>{syslog_stamp(WHEN)} pfxpold[{PID}]: second",
                f"<{info}>{syslog_stamp(WHEN + 1)} pfxpold[{PID}]: third",
            ],
        )

    def test_reconnects(self):
        """
        A message that cannot be sent (syslog restarted) is sent again on a
        new connection, and the next go there too.
        """
        first = self.observer._socket
        first.fail = 1
        second = FakeSocket()
        self.sockets = [second]
        self.event(LogLevel.info, "one")
        self.event(LogLevel.info, "two")
        self.assertTrue(first.closed)
        self.assertEqual([m.split(": ", 1)[1] for m in self.sent(second)], ["one", "two"])
        self.assertEqual(self.observer.lost, 0)

    def test_lost(self):
        """
        When syslog cannot be reached again, the messages are counted as
        lost, and the next message tries again.
        """
        self.observer._socket.fail = 1
        self.sockets = []
        self.event(LogLevel.info, "one\ntwo")
        self.assertEqual(self.observer.lost, 2)
        later = FakeSocket()
        self.sockets = [later]
        self.event(LogLevel.info, "three")
        self.assertEqual([m.split(": ", 1)[1] for m in self.sent(later)], ["three"])
        self.assertEqual(self.observer.lost, 2)

    def test_no_syslog_at_start(self):
        """A syslog socket missing at start is connected to when there is one."""
        self.sockets = []
        observer = self.make()
        self.assertIsNone(observer._socket)
        later = FakeSocket()
        self.sockets = [later]
        observer({"log_level": LogLevel.info, "log_format": "x", "log_time": WHEN})
        self.assertEqual(len(later.sent), 1)

    def test_stream(self):
        """On a stream socket, each message ends with a NUL, as syslog(3) sends it."""
        self.sockets = [FakeSocket(kind=socket.SOCK_STREAM)]
        observer = self.make()
        connection = observer._socket
        observer({"log_level": LogLevel.info, "log_format": "x", "log_time": WHEN})
        [data] = connection.sent
        self.assertTrue(data.endswith(b": x\0"))


class MailSyslogTests(SynchronousTestCase):
    """
    The factory named on twistd's command line.
    """

    def test_mail_syslog(self):
        """mail_syslog() returns an observer in the mail facility, on the configured socket."""
        connected = []
        self.patch(
            logger, "connect_syslog", lambda address: connected.append(address) or FakeSocket()
        )
        self.patch(os, "environ", {SYSLOG_SOCKET_VARIABLE: "/tmp/bench.sock"})
        observer = mail_syslog()
        self.assertIsInstance(observer, SyslogMailObserver)
        self.assertEqual(observer.facility, syslog.LOG_MAIL)
        self.assertEqual(connected, ["/tmp/bench.sock"])

    def test_takes_batches(self):
        """The factory says its observer takes batches of request lines."""
        self.assertTrue(takes_request_batches({"logger": mail_syslog}))


def request_event(line, when, **extra):
    """An event as the protocol logged each request before batches."""
    return dict(
        log_format="{request_text}",
        request_text=line,
        log_level=LogLevel.info,
        log_namespace=REQUEST_NAMESPACE,
        log_time=when,
        **extra,
    )


class RecordingFile:
    """
    A text file that keeps each write and counts flushes.
    """

    def __init__(self):
        self.writes = []
        self.flushes = 0

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        self.flushes += 1


class TextLogObserverTests(SynchronousTestCase):
    """
    L{TextLogObserver} writes events as twistd's text log does, and a batch
    as the lines its requests would have had as events of their own.
    """

    def setUp(self):
        self.output = RecordingFile()
        self.observer = TextLogObserver(self.output)

    def test_verify(self):
        """It is an ILogObserver."""
        self.assertTrue(verifyObject(ILogObserver, self.observer))

    def test_event(self):
        """An ordinary event is Twisted's classic text, written and flushed."""
        event = dict(
            log_format="hello {x}",
            x="there",
            log_level=LogLevel.warn,
            log_namespace="a.b",
            log_time=WHEN + 0.5,
        )
        self.observer(event)
        self.assertEqual(self.output.writes, [formatEventAsClassicLogText(event)])
        self.assertEqual(self.output.flushes, 1)

    def test_empty_event(self):
        """An event with no text writes nothing."""
        self.observer({"log_level": LogLevel.info})
        self.assertEqual(self.output.writes, [])

    def test_batch_as_single_events(self):
        """
        A batch is written exactly as its lines were, one event each, by
        twistd's observer: timestamp of its second, the protocol's system;
        flushed once.
        """
        batch = [(WHEN, ["one", "two"]), (WHEN + 61, ["three"])]
        self.observer(request_event("one\ntwo\nthree", WHEN + 62, **{BATCH_KEY: batch}))
        expected = "".join(
            formatEventAsClassicLogText(request_event(line, when))
            for when, line in ((WHEN, "one"), (WHEN, "two"), (WHEN + 61, "three"))
        )
        self.assertEqual("".join(self.output.writes), expected)
        self.assertIn(" [pfxpold.protocol.PolicyProtocol#info] one\n", expected)
        self.assertEqual(self.output.flushes, 1)

    def test_batch_system(self):
        """An event's own log_system is kept, as Twisted's formatter keeps it."""
        self.observer(
            request_event("one", WHEN, log_system="worker", **{BATCH_KEY: [(WHEN, ["one"])]})
        )
        self.assertEqual(
            self.output.writes,
            [formatEventAsClassicLogText(request_event("one", WHEN, log_system="worker"))],
        )

    def test_batch_in_pieces(self):
        """
        A large batch is written a few KiB at a time, whole lines each, so
        that twistd's LogFile, which decides to rotate before each write,
        rotates close to its size.
        """
        lines = [f"line {number} " + "x" * 190 for number in range(1000)]
        self.observer(request_event("", WHEN, **{BATCH_KEY: [(WHEN, lines)]}))
        self.assertGreater(len(self.output.writes), 5)
        for text in self.output.writes:
            self.assertTrue(text.endswith("\n"))
            self.assertLess(len(text), WRITE_SIZE + 300)
        written = "".join(self.output.writes).splitlines()
        self.assertEqual([line.split("] ", 1)[1] for line in written], lines)
        self.assertEqual(self.output.flushes, 1)

    def test_long_lines_among_short(self):
        """
        A few very long lines among many short ones do not make a write
        far longer than the others: each piece stays near the write size,
        and every line is written once, in order.
        """
        lines = [f"short {number}" for number in range(2000)]
        for number in range(0, 2000, 200):
            lines[number] = f"long {number} " + "y" * 8000
        self.observer(request_event("", WHEN, **{BATCH_KEY: [(WHEN, lines)]}))
        for text in self.output.writes:
            self.assertTrue(text.endswith("\n"))
            self.assertLess(len(text), 2 * WRITE_SIZE + 300)
        written = "".join(self.output.writes).splitlines()
        self.assertEqual([line.split("] ", 1)[1] for line in written], lines)
        self.assertEqual(self.output.flushes, 1)


class TwistdLogObserverTests(SynchronousTestCase):
    """
    L{twistd_log_observer} makes the observer twistd would make for a log
    file or standard output, and none where twistd's own stays.
    """

    def setUp(self):
        self.installed = {}
        self.handler = signal.SIG_DFL
        self.patch(signal, "getsignal", lambda number: self.handler)
        self.patch(
            signal, "signal", lambda number, handler: self.installed.update({number: handler})
        )

    def test_not_twistd(self):
        """
        Outside twistd (no options), with --syslog or another --logger:
        twistd's own observer stays, and takes no batches.
        """
        for options in (None, {}, {"syslog": True}, {"logger": FileLogObserver}):
            self.assertIsNone(twistd_log_observer(options, None), options)
            self.assertFalse(takes_request_batches(options), options)

    def test_mail_syslog_logger(self):
        """With --logger pfxpold.logger.mail_syslog, twistd makes that one: it takes batches."""
        options = {"logger": mail_syslog, "logfile": None}
        self.assertIsNone(twistd_log_observer(options, None))
        self.assertTrue(takes_request_batches(options))

    def test_daemon_to_standard_output(self):
        """A daemon asked to log to standard output: none (twistd refuses)."""
        options = {"logfile": "-", "nodaemon": False}
        self.assertIsNone(twistd_log_observer(options, None))
        self.assertFalse(takes_request_batches(options))

    def test_standard_output(self):
        """-n without a log file, or --logfile -: standard output."""
        for options in ({"nodaemon": True, "logfile": None}, {"nodaemon": True, "logfile": "-"}):
            output = io.StringIO()
            self.patch(logger.sys, "stdout", output)
            observer = twistd_log_observer(options, None)
            self.assertIsInstance(observer, TextLogObserver)
            self.assertTrue(takes_request_batches(options))
            batch = [(WHEN, ["a line"])]
            observer(request_event("a line", WHEN, **{BATCH_KEY: batch}))
            self.assertEqual(
                output.getvalue(), formatEventAsClassicLogText(request_event("a line", WHEN))
            )
        self.assertEqual(self.installed, {})

    def test_log_file(self):
        """
        --logfile FILE: a twistd LogFile there, rotated on SIGUSR1 (in the
        reactor thread) when nothing else handles it.
        """
        path = os.path.join(temporary_directory(self), "pfxpold.log")
        rotations = []

        class Reactor:
            def callFromThread(self, function, *arguments):
                rotations.append(function)

        observer = twistd_log_observer({"logfile": path, "nodaemon": False}, Reactor())
        self.assertTrue(takes_request_batches({"logfile": path}))
        observer(request_event("x", WHEN, **{BATCH_KEY: [(WHEN, ["one", "two"])]}))
        with open(path) as f:
            self.assertEqual(f.read().count("[pfxpold.protocol.PolicyProtocol#info] "), 2)
        handler = self.installed[signal.SIGUSR1]
        handler(signal.SIGUSR1, None)
        [rotate] = rotations
        self.assertIsInstance(rotate.__self__, LogFile)
        self.assertEqual(rotate.__name__, "rotate")
        rotate.__self__.close()

    def test_log_file_rotation_settings(self):
        """
        The LogFile rotates at log_max_bytes (100 MiB by default, not
        twistd's 1 MB) and keeps log_keep rotated files (all by default).
        """
        path = os.path.join(temporary_directory(self), "pfxpold.log")
        observer = twistd_log_observer({"logfile": path}, None)
        self.addCleanup(observer.output.close)
        self.assertEqual(
            (observer.output.rotateLength, observer.output.maxRotatedFiles),
            (100 * 1024 * 1024, None),
        )
        other = os.path.join(temporary_directory(self), "small.log")
        observer = twistd_log_observer({"logfile": other}, None, max_bytes=65536, keep=2)
        self.addCleanup(observer.output.close)
        for _ in range(4):
            observer({"log_format": "{text}", "text": "x" * 70000, "log_time": WHEN})
        self.assertEqual(
            sorted(os.listdir(os.path.dirname(other))), ["small.log", "small.log.1", "small.log.2"]
        )

    def test_daemon_default_log_file(self):
        """Daemonized without --logfile, the file is twistd.log, as twistd's."""
        directory = temporary_directory(self)
        self.patch(logger.LogFile, "fromFullPath", classmethod(lambda cls, path, **how: io.StringIO(path)))
        cwd = os.getcwd()
        os.chdir(directory)
        self.addCleanup(os.chdir, cwd)
        observer = twistd_log_observer({"logfile": None, "nodaemon": False}, None)
        self.assertEqual(observer.output.getvalue(), "twistd.log")

    def test_sigusr1_kept(self):
        """A SIGUSR1 handler already there is left alone."""
        self.handler = lambda *a: None
        path = os.path.join(temporary_directory(self), "pfxpold.log")
        observer = twistd_log_observer({"logfile": path}, None)
        self.assertEqual(self.installed, {})
        observer.output.close()


class Offering(OffersLogObserver, MultiService):
    pass


class OffersLogObserverTests(SynchronousTestCase):
    """
    A plugin's service offers twistd its observer through the application,
    and makes it only then.
    """

    def setUp(self):
        self.made = []
        self.observer = TextLogObserver(io.StringIO())

        def factory():
            self.made.append(True)
            return self.observer

        self.service = Offering()
        self.service.log_observer_factory = factory

    def test_application(self):
        """Given the application as parent, it sets the ILogObserver component."""
        application = Application("pfxpold")
        self.service.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), self.observer)
        self.assertIn(self.service, list(IServiceCollection(application)))

    def test_already_set(self):
        """An observer the application has already is kept."""
        application = Application("pfxpold")
        other = TextLogObserver(io.StringIO())
        application.setComponent(ILogObserver, other)
        self.service.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), other)
        self.assertEqual(self.made, [])

    def test_service_parent(self):
        """Under another service, nothing is made or offered."""
        self.service.setServiceParent(MultiService())
        self.assertEqual(self.made, [])

    def test_none(self):
        """A factory that gives none leaves twistd its own."""
        self.service.log_observer_factory = lambda: None
        application = Application("pfxpold")
        self.service.setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))

    def test_plain_service(self):
        """The mixin also works for a leaf service."""

        class Leaf(OffersLogObserver, Service):
            pass

        leaf = Leaf()
        leaf.log_observer_factory = lambda: self.observer
        application = Application("pfxpold")
        leaf.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), self.observer)
