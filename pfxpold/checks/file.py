"""
The C{file} check: Postfix-style access maps, or Postfix regexp and pcre
tables (L{pfxpold.regexptable}), read from a text file and re-read when
the file changes.

A map is read in full before it replaces the one in force, so requests are
answered from the old table until the new one is ready, and a file with an
error leaves the old table in force (the error is logged with the file,
the line and the reason).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional, Union

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold import regexptable
from pfxpold.accessmap import (
    PARENT_STYLES,
    AccessMap,
    MapError,
    attribute_value,
    check_attribute,
    lookup_key,
)
from pfxpold.action import Action
from pfxpold.cache import Memo
from pfxpold.config import CheckOptions
from pfxpold.interfaces import ICheck, IConfigWarnings, IExplainable, IPossibleActions
from pfxpold.request import PolicyRequest
from pfxpold.stages import Possible, possible

#: The C{format} setting: an access(5) map, or a Postfix regexp_table(5)
#: or pcre_table(5) file.
ACCESS = "access"
FORMATS = (ACCESS, *regexptable.FORMATS)

#: Settings that only mean something for an access map.
_ACCESS_ONLY = ("pair_with", "parent_domains", "case_sensitive_local_part")

DEFAULT_RELOAD_INTERVAL = 5.0

#: Answers remembered per check, by the values looked up: a relay sees the
#: same senders and clients again and again, and a remembered answer costs
#: one dictionary lookup instead of deriving the keys and matching them.
MEMO_SIZE = 10_000
#: Values longer than this (in characters, all together) are looked up
#: each time, never remembered: real addresses are far shorter, and a
#: client sending huge values could otherwise fill the memo's memory.
MAX_MEMO_KEY_LENGTH = 1024

#: Derived values meant for SQL parameters, and what to look up instead.
_NOT_FOR_MAPS = {
    "client_network": "look up client_address; CIDR keys match networks",
    "sender_at_domain": "look up sender; @domain keys match its domain",
    "recipient_at_domain": "look up recipient; @domain keys match its domain",
}


def _signature(path: str) -> tuple[int, int, int, int]:
    """
    What tells a changed file from an unchanged one: the file (device,
    inode: a new file renamed into place), its size and its modification
    time in nanoseconds.

    @raise OSError: when the file cannot be examined.
    """
    status = os.stat(path)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def table_value(request: PolicyRequest, attribute: str) -> str:
    """
    The text a regexp or pcre table matches for C{attribute}: the value as
    Postfix sent it (no parent domains, no C{user@} split, case kept), the
    null sender as C{<>} (Postfix's C{smtpd_null_access_lookup_key}), or
    C{""} when there is nothing to look up.
    """
    value = attribute_value(request, attribute) or ""
    if not value and attribute == "sender":
        return "<>"
    return value



def file_loader(reactor: Any) -> Callable[..., Deferred[Any]]:
    """
    How a check reads its files at a reload: in the reactor's thread pool,
    so that a large map or a slow disk never stalls the answers, or at once
    with a reactor that has no threads (a test's Clock).

    @return: a function that calls C{function(*args)} and returns a
        Deferred with its result.
    """
    if IReactorThreads.providedBy(reactor):

        def in_thread(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)

        return in_thread
    return maybeDeferred


@implementer(ICheck, IConfigWarnings, IExplainable, IPossibleActions)
class FileCheck(Service):
    """
    Looks request attributes up in an access map; with C{pair_with}, looks
    up every combination of the C{lookup} attributes (first column) and the
    C{pair_with} attributes (second column) in a pair table. With C{format
    = "regexp"} or C{"pcre"}, matches each attribute's value against the
    rules of a Postfix regexp or pcre table instead.
    """

    _log = Logger()

    def __init__(
        self,
        options: CheckOptions,
        run: Optional[Callable[..., Deferred[Any]]] = None,
    ) -> None:
        """
        Read the settings and the map (so that C{--check-config} reports
        errors in it).

        @param run: how to call the map loader; by default in the reactor's
            thread pool when it has one (a large map then never stalls
            requests), else at once.
        """
        self.check_name = options.name
        self.path = options.path("map")
        self.format = options.choice("format", FORMATS, ACCESS)
        if self.format != ACCESS:
            for key in _ACCESS_ONLY:
                if key in options:
                    raise options.error(
                        key, f"is for access maps only, not for format = {self.format!r}"
                    )
        self.lookups = options.strings("lookup")
        self.pair_with = options.strings("pair_with", [])
        for key, attributes in (("lookup", self.lookups), ("pair_with", self.pair_with)):
            for attribute in attributes:
                try:
                    check_attribute(attribute)
                except ValueError as e:
                    raise options.error(key, str(e)) from None
        for key, attributes in (("lookup", self.lookups), ("pair_with", self.pair_with)):
            for attribute in attributes:
                if attribute in _NOT_FOR_MAPS and self.format == ACCESS:
                    raise options.error(
                        key, f"{attribute!r} cannot match a map key: {_NOT_FOR_MAPS[attribute]}"
                    )
        if not self.lookups:
            raise options.error("lookup", "must name at least one attribute")
        self.parent_style = options.choice("parent_domains", PARENT_STYLES, "dot")
        self.fold_local_part = not options.boolean("case_sensitive_local_part", False)
        self.not_found = options.action("not_found", "DUNNO")
        interval = options.number("reload_interval", DEFAULT_RELOAD_INTERVAL)
        if interval < 0:
            raise options.error("reload_interval", "must be 0 (never) or more seconds")
        self._restriction_classes = options.restriction_classes
        self._reactor = options.reactor
        if run is None:
            run = file_loader(options.reactor)
        self._run = run
        self._loading = False
        self._last_error: Optional[str] = None
        try:
            self._signature: Optional[tuple[int, int, int, int]] = _signature(self.path)
            self.map: Union[AccessMap, regexptable.RegexpTable] = self._load()
        except OSError as e:
            raise options.error("map", f"cannot read {self.path}: {e.strerror}") from None
        except MapError as e:
            raise options.error("map", str(e)) from None
        # The answers depend on these values only (with the settings above).
        self._looked_up = (*self.lookups, *self.pair_with)
        #: The answers of the table in force, by the values looked up.
        self.memo: Memo[Any, Action] = Memo(MEMO_SIZE)
        self._timer: Optional[TimerService] = None
        if interval > 0:
            self._timer = TimerService(interval, self.reload)
            self._timer.clock = options.reactor

    def _load(self) -> Union[AccessMap, regexptable.RegexpTable]:
        if self.format != ACCESS:
            return regexptable.load(self.path, self.format, self._restriction_classes)
        return AccessMap.load(
            self.path,
            pairs=bool(self.pair_with),
            restriction_classes=self._restriction_classes,
            fold_local_part=self.fold_local_part,
        )

    def startService(self) -> None:
        super().startService()
        if self._timer is not None:
            self._timer.startService()

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()
        if self._timer is not None:
            return self._timer.stopService()
        return None

    def reload(self) -> Optional[Deferred[None]]:
        """
        Re-read the map if the file changed since it was last read. Never
        fails: errors are logged and the table in force stays.

        @return: a Deferred that fires when a reload is done, or L{None}
            when there was nothing to do.
        """
        if self._loading:
            return None
        try:
            signature = _signature(self.path)
        except OSError as e:
            self._report(MapError(self.path, None, f"cannot read: {e.strerror}"))
            return None
        if signature == self._signature:
            return None
        # Remember the file as examined before reading it: if it changes
        # while being read, the next poll sees a new signature and reads it
        # again; a broken file is not re-read (and re-logged) every poll.
        self._signature = signature
        self._loading = True
        loading = self._run(self._load)
        loading.addCallbacks(self._install, self._failed)
        loading.addBoth(self._done)
        return loading

    def _install(self, new_map: Union[AccessMap, regexptable.RegexpTable]) -> None:
        self.map = new_map
        self._last_error = None
        self._log.info(
            "check {check}: loaded {entries} entries from {path}",
            check=self.check_name,
            entries=new_map.entries,
            path=self.path,
        )

    def _failed(self, failure: Failure) -> None:
        if failure.check(MapError):
            self._report(failure.value)
        else:
            self._log.failure(
                "check {check}: reading {path} failed; keeping the table in force",
                failure,
                check=self.check_name,
                path=self.path,
            )

    def _done(self, result: object) -> None:
        self._loading = False

    def _report(self, error: MapError) -> None:
        # One message per distinct problem: a missing file is not logged
        # again at every poll.
        if str(error) == self._last_error:
            return
        self._last_error = str(error)
        self._log.error(
            "check {check}: {file}:{line}: {reason}; keeping the table in force",
            check=self.check_name,
            file=error.path,
            line=error.line if error.line is not None else "-",
            reason=error.reason,
        )

    def check(self, request: PolicyRequest) -> Action:
        """
        The action of the most specific matching entry (of a regexp or pcre
        table: of its first matching rule, for the first C{lookup}
        attribute that one matches), or C{not_found}.

        Answers are remembered (L{memo}) by the values looked up, for as
        long as the table they came from is in force: a reload empties
        the memo. A failed lookup is never remembered.

        @raise regexptable.TableLookupError: when a regexp or pcre rule's
            result, with the text its groups captured, is not an action.
        """
        table = self.map
        looked_up = self._looked_up
        key: Any
        if len(looked_up) == 1:
            key = attribute_value(request, looked_up[0])
            length = len(key or "")
        else:
            key = tuple(attribute_value(request, name) for name in looked_up)
            length = sum(len(value or "") for value in key)
        memo = self.memo
        action = memo.get(table, key)
        if action is not None:
            return action
        action = self._lookup(table, request)
        if length <= MAX_MEMO_KEY_LENGTH:
            memo.put(table, key, action)
        return action

    def _lookup(
        self, table: Union[AccessMap, regexptable.RegexpTable], request: PolicyRequest
    ) -> Action:
        if type(table) is not AccessMap:
            assert isinstance(table, regexptable.RegexpTable)
            for name in self.lookups:
                value = table_value(request, name)
                if value:
                    action = table.lookup(value)
                    if action is not None:
                        return action
            return self.not_found
        style = self.parent_style
        fold = self.fold_local_part
        keys = [lookup_key(request, name, style, fold) for name in self.lookups]
        second = [lookup_key(request, name, style, fold) for name in self.pair_with]
        action = table.lookup(keys, second)
        return self.not_found if action is None else action

    def explain(self, request: PolicyRequest) -> list[tuple[str, bool, str]]:
        """
        For C{pfxpold-explain}: for a regexp or pcre table, each C{lookup}
        attribute's value and the line of the rule it matched; for an
        access map, the entry found.
        """
        table = self.map
        if type(table) is AccessMap:
            found = self.check(request)
            matched = found is not self.not_found
            return [(self.path, matched, str(found) if matched else "no entry matches")]
        assert isinstance(table, regexptable.RegexpTable)
        steps: list[tuple[str, bool, str]] = []
        for name in self.lookups:
            value = table_value(request, name)
            if not value:
                steps.append((name, False, "empty: not looked up"))
                continue
            try:
                traced = table.trace(value)
            except regexptable.TableLookupError as e:
                steps.append((f"{name}={value!r}", True, str(e)))
                break
            if traced is None:
                steps.append((f"{name}={value!r}", False, "no rule matches"))
                continue
            line, action = traced
            where = f"{os.path.basename(self.path)}:{line}"
            steps.append((f"{name}={value!r}", True, f"{where}: {action}"))
            break
        return steps

    def possible_actions(self) -> list[Possible]:
        """
        Each verb of the table in force, and C{not_found}'s, at any stage.
        """
        table = self.map
        origins: dict[str, str] = {}
        if type(table) is AccessMap:
            for action in table.actions():
                origins.setdefault(action.verb, self.path)
        else:
            assert isinstance(table, regexptable.RegexpTable)
            for line, verb in table.verbs():
                origins.setdefault(verb, f"{self.path}:{line}")
        origins.setdefault(self.not_found.verb, "not_found")
        return [possible(verb, None, origin) for verb, origin in origins.items()]

    def config_warnings(self) -> list[str]:
        """
        Rules of a regexp or pcre table that no value can reach, because an
        earlier rule matches every value.
        """
        table = self.map
        if type(table) is AccessMap:
            return []
        assert isinstance(table, regexptable.RegexpTable)
        return [
            f"{self.path}:{line}: never matches: the rule on line {earlier} matches every"
            " value first"
            for line, earlier in table.unreachable()
        ]
