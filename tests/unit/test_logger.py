"""
Tests for L{pfxpold.logger}: syslog's mail facility for twistd's --logger.
"""

import syslog

from twisted.logger import ILogObserver, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pfxpold import logger
from pfxpold.logger import SyslogMailObserver, mail_syslog


class SyslogMailObserverTests(SynchronousTestCase):
    """
    Events go to syslog's mail facility, one line at a time.
    """

    def setUp(self):
        self.opened = []
        self.written = []
        self.observer = SyslogMailObserver(
            openlog=lambda *a: self.opened.append(a),
            write=lambda priority, line: self.written.append((priority, line)),
        )

    def event(self, level, text, **fields):
        event = dict(log_level=level, log_format=text, log_namespace="test", **fields)
        self.observer(event)

    def test_verify(self):
        """It is an ILogObserver."""
        self.assertTrue(verifyObject(ILogObserver, self.observer))

    def test_openlog(self):
        """syslog is opened at once (before a chroot), tagged pfxpold, in LOG_MAIL."""
        [(prefix, options, facility)] = self.opened
        self.assertEqual(prefix, "pfxpold")
        self.assertEqual(facility, syslog.LOG_MAIL)
        self.assertTrue(options & syslog.LOG_NDELAY)
        self.assertTrue(options & syslog.LOG_PID)

    def test_priorities(self):
        """Each level maps to its syslog priority, in the mail facility."""
        for level, priority in (
            (LogLevel.debug, syslog.LOG_DEBUG),
            (LogLevel.info, syslog.LOG_INFO),
            (LogLevel.warn, syslog.LOG_WARNING),
            (LogLevel.error, syslog.LOG_ERR),
            (LogLevel.critical, syslog.LOG_CRIT),
        ):
            del self.written[:]
            self.event(level, "hello {who}", who="postfix")
            self.assertEqual(self.written, [(syslog.LOG_MAIL | priority, "hello postfix")])

    def test_no_level(self):
        """An event without a level is logged at info."""
        self.observer({"log_format": "old style"})
        self.assertEqual(self.written, [(syslog.LOG_MAIL | syslog.LOG_INFO, "old style")])

    def test_multiline(self):
        """A multi-line event becomes one syslog line per line."""
        self.event(LogLevel.info, "one\ntwo\nthree")
        self.assertEqual([line for _, line in self.written], ["one", "two", "three"])

    def test_failure(self):
        """A failure's traceback follows its message, one line each."""
        try:
            raise ValueError("boom")
        except ValueError:
            failure = Failure()
        self.event(LogLevel.critical, "check failed", log_failure=failure)
        lines = [line for _, line in self.written]
        self.assertEqual(lines[0], "check failed")
        self.assertIn("ValueError: boom", lines[-1])
        self.assertGreater(len(lines), 2)
        self.assertTrue(all("\n" not in line for line in lines))
        priorities = {priority for priority, _ in self.written}
        self.assertEqual(priorities, {syslog.LOG_MAIL | syslog.LOG_CRIT})

    def test_empty(self):
        """An event with no text writes nothing."""
        self.observer({"log_level": LogLevel.info})
        self.assertEqual(self.written, [])

    def test_other_facility(self):
        """Another facility can be given."""
        observer = SyslogMailObserver(
            facility=syslog.LOG_LOCAL0,
            openlog=lambda *a: None,
            write=lambda priority, line: self.written.append(priority),
        )
        observer({"log_level": LogLevel.error, "log_format": "x"})
        self.assertEqual(self.written, [syslog.LOG_LOCAL0 | syslog.LOG_ERR])


class MailSyslogTests(SynchronousTestCase):
    """
    The factory named on twistd's command line.
    """

    def test_mail_syslog(self):
        """mail_syslog() returns an observer in the mail facility."""
        opened = []
        self.patch(logger._syslog, "openlog", lambda *a: opened.append(a))
        self.patch(
            SyslogMailObserver.__init__,
            "__defaults__",
            ("pfxpold", syslog.LOG_MAIL, lambda *a: opened.append(a), syslog.syslog),
        )
        observer = mail_syslog()
        self.assertIsInstance(observer, SyslogMailObserver)
        self.assertEqual(observer.facility, syslog.LOG_MAIL)
        self.assertEqual(opened[0][2], syslog.LOG_MAIL)
