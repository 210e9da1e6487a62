"""
Log observers for twistd's C{--logger} option.

twistd's own C{--syslog} always logs to the C{user} facility; Postfix
admins look in C{mail}. Run::

    twistd --logger pfxpold.logger.mail_syslog pfxpold ...

to send pfxpold's log to syslog's C{mail} facility, tagged C{pfxpold}.
"""

import syslog as _syslog
from collections.abc import Callable

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

_PRIORITIES = {
    LogLevel.debug: _syslog.LOG_DEBUG,
    LogLevel.info: _syslog.LOG_INFO,
    LogLevel.warn: _syslog.LOG_WARNING,
    LogLevel.error: _syslog.LOG_ERR,
    LogLevel.critical: _syslog.LOG_CRIT,
}


@implementer(ILogObserver)
class SyslogMailObserver:
    """
    Writes each event to syslog at the priority of its level, one line per
    event line, in the facility given (C{mail} by default).
    """

    def __init__(
        self,
        prefix: str = "pfxpold",
        facility: int = _syslog.LOG_MAIL,
        openlog: Callable[..., None] = _syslog.openlog,
        write: Callable[[int, str], None] = _syslog.syslog,
    ) -> None:
        self.facility = facility
        # LOG_NDELAY connects to /dev/log now, before twistd chroots.
        openlog(prefix, _syslog.LOG_PID | _syslog.LOG_NDELAY, facility)
        self._write = write

    def __call__(self, event: dict) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        if not text:
            return
        priority = _PRIORITIES.get(event.get("log_level"), _syslog.LOG_INFO)
        for line in text.splitlines():
            self._write(priority | self.facility, line)


def mail_syslog() -> SyslogMailObserver:
    """
    The observer factory for C{twistd --logger pfxpold.logger.mail_syslog}.
    """
    return SyslogMailObserver()


__all__ = ["SyslogMailObserver", "mail_syslog"]
