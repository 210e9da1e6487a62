"""
The C{quota} check: sending quotas and rate limits, exact across every
pfxpold that shares the store.

A message is counted once, at the configured stage (DATA or
END-OF-MESSAGE; RCPT counts recipients one by one), using Postfix's
C{instance} attribute: the store keeps a mark of each counted message
(L{pfxpold.state.Once}) in the same atomic step as its count, so the same
message through two daemons, two workers or two hosts sharing the store is
counted once. The count is reserved atomically in the store when
the check runs (so concurrent messages can never pass a limit together)
and taken back when the chain's final answer refuses the message (another
check rejected it), through L{pfxpold.interfaces.IDecisionListener}.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.action import DUNNO, Action
from pfxpold.config import CheckOptions
from pfxpold.escape import escape
from pfxpold.interfaces import ICheck, IDecisionListener, IPossibleActions, IStateStore
from pfxpold.request import PolicyRequest, client_network
from pfxpold.stages import Possible, possible
from pfxpold.state import Consumption, Counter, Once, store_for
from pfxpold.state.outage import LOCAL, ON_ERROR, DegradableCheck, Pending
from pfxpold.whitelist import exemption_file, map_attributes

KEY_PARTS = (
    "sasl_username",
    "sender",
    "sender_domain",
    "client_address",
    "client_network",
    "recipient",
    "recipient_domain",
)
UNITS = ("messages", "recipients", "bytes")
STAGES = ("END-OF-MESSAGE", "DATA", "RCPT")
PERIODS = ("hour", "day", "sliding")
DEFAULT_ACTION = "DEFER 4.7.1 Sending quota exceeded ({limit}: {max} {unit})"

#: Final answers after which the mail was not accepted: its count is
#: taken back. DEFER_IF_REJECT is not among them (the mail usually passes).
REFUSING_VERBS = frozenset({"REJECT", "DEFER", "DEFER_IF_PERMIT", "DISCARD"})

#: Messages whose count is in flight, remembered per process, so that a
#: repeated request for the same message waits for no store.
REMEMBERED = 65536
#: Seconds the store keeps a counted message's mark: far longer than
#: Postfix takes to ask again about one message (its retry comes within
#: seconds; an SMTP transaction's commands time out after 300 s).
COUNTED_FOR = 3600.0

# Keys may not exceed this; longer identities are hashed.
_MAX_IDENTITY = 200


def refuses(action: Optional[Action]) -> bool:
    """
    Whether Postfix refuses (or never gets an answer for) the mail when
    the chain answers C{action}.
    """
    if action is None:
        return True
    verb = action.verb
    return verb in REFUSING_VERBS or (len(verb) == 3 and verb[0] in "45" and verb.isdigit())


def answer_of(stored: Deferred[Consumption], decide: Callable[[Any], Any]) -> Any:
    """
    The check's answer from the store's Deferred: C{decide(outcome)} (the
    outcome being the L{Consumption} or the store's L{Failure}; it returns
    an action or a Failure), returned itself when the store already
    answered (the memory store always does, the SQLite store unless
    another process shares its file), so that the chain stays on
    its synchronous path; else a new Deferred of it. One callback on the
    store's Deferred does it all: the Deferred machinery cost more than the
    memory store's work.

    The store's own Deferred is never the one returned: the chain cancels
    what a check returns when it stops waiting (its timeout), and the
    store's result is still needed then, to take back a count that lands
    after the chain gave up and refused the mail. Its result is consumed
    here, so a late failure is not an unhandled error.

    @return: an L{Action}, or a Deferred that fires with one.
    @raise Exception: what the store failed with, when it already failed.
    """
    later: Optional[Deferred[Action]] = None
    settled: list[Any] = []

    def deliver(outcome: Any) -> None:
        try:
            answer = decide(outcome)
        except Exception:
            answer = Failure()
        if later is None:
            settled.append(answer)
        elif later.called:
            # The chain gave up (cancelled): nothing waits for this.
            pass
        elif isinstance(answer, Failure):
            later.errback(answer)
        else:
            later.callback(answer)

    stored.addBoth(deliver)
    if settled:
        answer = settled[0]
        if isinstance(answer, Failure):
            answer.raiseException()
        return answer
    later = Deferred()
    return later


@dataclass(frozen=True)
class Window:
    """
    One limit's window.

    @ivar name: the limit's name, used in overrides, texts and keys.
    @ivar period: C{"hour"}, C{"day"} or C{"sliding"}.
    @ivar maximum: the default limit.
    @ivar zone: the time zone of fixed windows.
    @ivar reset: seconds after midnight when a day window starts.
    @ivar seconds: a sliding window's length.
    @ivar precision: a sliding window's bucket width.
    """

    name: str
    period: str
    maximum: int
    zone: datetime.tzinfo = datetime.UTC
    reset: int = 0
    seconds: int = 0
    precision: int = 0

    #: The last window or buckets computed, reused while C{now} falls in
    #: them: the date arithmetic cost more than the rest of the check.
    _memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def bounds(self, now: float) -> tuple[str, float]:
        """
        The fixed window that C{now} is in.

        @return: an id of the window and when it ends.
        """
        local = datetime.datetime.fromtimestamp(now, self.zone)
        if self.period == "hour":
            start = local.replace(minute=0, second=0, microsecond=0)
            # The UTC offset tells apart the two 01:00 hours of a DST change.
            return start.strftime("%Y%m%d%H%z"), start.timestamp() + 3600
        reset = datetime.time(self.reset // 3600, self.reset % 3600 // 60)
        day = local.date()
        start = datetime.datetime.combine(day, reset, self.zone)
        if local < start:
            day -= datetime.timedelta(days=1)
        end = datetime.datetime.combine(day + datetime.timedelta(days=1), reset, self.zone)
        return day.strftime("%Y%m%d"), end.timestamp()

    def _fixed_bounds(self, now: float) -> tuple[str, float]:
        """
        L{bounds}, reused within the same UTC minute: what L{bounds}
        answers depends only on the local hour, date and minute, and
        today's UTC offsets are whole minutes, changed at whole minutes, so
        no local hour or day starts inside a UTC minute. Keyed on the
        minute, the memo costs no conversion to local time per call.
        """
        minute = now // 60
        memo = self._memo.get("fixed")
        if memo is None or memo[0] != minute:
            memo = self._memo["fixed"] = (minute, self.bounds(now))
        return memo[1]

    def counter(self, prefix: str, now: float, limit: int) -> Counter:
        """
        The counter of this window at C{now} for the identity whose keys
        start with C{prefix}.
        """
        if self.period == "sliding":
            width = self.precision
            current = int(now // width)
            oldest = int((now - self.seconds) // width)
            buckets = self._memo.get("sliding")
            if buckets is None or buckets[0] != (current, oldest):
                suffixes = tuple(
                    f":{self.name}:{bucket}" for bucket in range(current, oldest - 1, -1)
                )
                buckets = self._memo["sliding"] = ((current, oldest), suffixes)
            keys = tuple(prefix + suffix for suffix in buckets[1])
            return Counter(keys[0], keys, limit, (current + 1) * width + self.seconds + 60)
        window, end = self._fixed_bounds(now)
        key = f"{prefix}:{self.name}:{window}"
        # A minute of grace, so that taking a count back at the end of a
        # window finds its key.
        return Counter(key, (key,), limit, end + 60)


def parse_time_of_day(value: str) -> Optional[int]:
    """
    C{"HH:MM"} as seconds after midnight, or L{None} when it is not one.
    """
    hours, colon, minutes = value.partition(":")
    if not colon or not hours.isdigit() or not minutes.isdigit():
        return None
    if int(hours) > 23 or int(minutes) > 59:
        return None
    return int(hours) * 3600 + int(minutes) * 60


def read_windows(options: CheckOptions) -> tuple[Window, ...]:
    """
    The C{limits} of a quota check.
    """
    raw = options.raw("limits")
    if not isinstance(raw, list) or not raw or not all(isinstance(item, dict) for item in raw):
        raise options.error(
            "limits", 'must be a list of tables, e.g. [{period = "day", max = 500}]'
        )
    zone_name = options.string("timezone", "UTC")
    try:
        zone: datetime.tzinfo = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise options.error("timezone", f"unknown time zone {zone_name!r}") from None
    windows: list[Window] = []
    for item in raw:
        unknown = set(item) - {"name", "period", "max", "reset", "seconds", "precision"}
        if unknown:
            raise options.error("limits", f"unknown setting {sorted(unknown)[0]!r} in {item!r}")
        period = item.get("period")
        if period not in PERIODS:
            raise options.error("limits", f"period must be one of {', '.join(PERIODS)} in {item!r}")
        maximum = item.get("max")
        if not isinstance(maximum, int) or isinstance(maximum, bool) or maximum < 0:
            raise options.error("limits", f"max must be a whole number >= 0 in {item!r}")
        reset = 0
        seconds = precision = 0
        if period == "day":
            reset_text = item.get("reset", "00:00")
            reset_value = parse_time_of_day(reset_text) if isinstance(reset_text, str) else None
            if reset_value is None:
                raise options.error("limits", f'reset must be "HH:MM" in {item!r}')
            reset = reset_value
        elif "reset" in item:
            raise options.error("limits", f"only a day window has a reset time: {item!r}")
        if period == "sliding":
            seconds = item.get("seconds")
            if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 1:
                raise options.error("limits", f"a sliding window needs seconds >= 1 in {item!r}")
            precision = item.get("precision", max(1, seconds // 60))
            if not isinstance(precision, int) or not 1 <= precision <= seconds:
                raise options.error("limits", f"precision must be 1..seconds in {item!r}")
        elif "seconds" in item or "precision" in item:
            raise options.error(
                "limits", f"seconds and precision are for sliding windows: {item!r}"
            )
        name = item.get("name", f"{seconds}s" if period == "sliding" else period)
        if (
            not isinstance(name, str)
            or not name
            or not name.replace("-", "").replace("_", "").isalnum()
        ):
            raise options.error("limits", f"name must be letters, digits, - or _ in {item!r}")
        if any(window.name == name for window in windows):
            raise options.error("limits", f"two limits are named {name!r}; name them")
        windows.append(Window(name, period, maximum, zone, reset, seconds, precision))
    return tuple(windows)


class OverridesError(ValueError):
    """
    An overrides file cannot be used; the message says where and why.
    """


def parse_overrides(path: str, names: set[str]) -> dict[str, Optional[dict[str, int]]]:
    """
    Read an overrides file: lines of C{identity unlimited} or C{identity
    NAME=MAX ...}, C{#} comments.

    @return: identity -> {limit name: max}, or L{None} for unlimited.
    @raise OverridesError: when it cannot be read or used.
    """
    overrides: dict[str, Optional[dict[str, int]]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise OverridesError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    for number, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path} line {number}"
        identity, settings = fields[0], fields[1:]
        if settings == ["unlimited"]:
            overrides[identity] = None
            continue
        limits: dict[str, int] = {}
        for setting in settings:
            name, equals, value = setting.partition("=")
            if not equals or name not in names or not value.isdigit():
                raise OverridesError(
                    f"{where}: expected 'unlimited' or NAME=MAX with NAME one of"
                    f" {', '.join(sorted(names))}, not {setting!r}"
                )
            limits[name] = int(value)
        if not limits:
            raise OverridesError(f"{where}: {identity} has no limits")
        overrides[identity] = limits
    return overrides


@dataclass
class _Reservation:
    """
    A message's count while the chain decides: taken back if the final
    answer refuses the message.
    """

    counters: tuple[Counter, ...]
    amount: int
    once: Optional[Once] = None
    consumed: Optional[bool] = None
    decided: bool = False
    action: Optional[Action] = field(default=None)
    #: Counted in the local store (degraded mode), not the shared one.
    local: bool = False


@implementer(ICheck, IDecisionListener, IPossibleActions)
class QuotaCheck(DegradableCheck):
    """
    Counts messages, recipients or bytes per identity in one or more
    windows, and answers the over-limit action when one is full.

    It is a service so that a timer can re-read the overrides file while
    the daemon runs (C{overrides_reload} seconds apart, when it changed).
    """

    #: It records what it sees: with C{[server] parallel}, started only once
    #: every check before it answered DUNNO.
    writes_state = True

    _log = Logger()

    def __init__(self, options: CheckOptions) -> None:
        super().__init__()
        self.name: str = options.name  # type: ignore[assignment]
        self.reactor = options.reactor
        parts = options.strings("key", ["sasl_username"])
        if not parts:
            raise options.error("key", "must name at least one of " + ", ".join(KEY_PARTS))
        for part in parts:
            if part not in KEY_PARTS:
                raise options.error("key", f"{part!r} is not one of {', '.join(KEY_PARTS)}")
        self.key_parts = tuple(parts)
        self.unit = options.choice("unit", UNITS, "messages")
        self.stage = options.choice("stage", STAGES, "END-OF-MESSAGE")
        if self.stage == "RCPT" and self.unit != "recipients":
            raise options.error("stage", "at RCPT only recipients can be counted")
        if self.stage != "RCPT" and {"recipient", "recipient_domain"} & set(parts):
            raise options.error(
                "key", 'recipient keys need stage = "RCPT" (a message has many recipients)'
            )
        self.ipv4_prefix = options.integer("ipv4_prefix", 24, minimum=0)
        self.ipv6_prefix = options.integer("ipv6_prefix", 64, minimum=0)
        if self.ipv4_prefix > 32 or self.ipv6_prefix > 128:
            raise options.error("ipv4_prefix", "prefixes are at most 32 (IPv4) and 128 (IPv6)")
        self.windows = read_windows(options)
        self.overrides_path = options.path("overrides", None)
        self.unlimited = tuple(options.strings("unlimited", []))
        self.unlimited_file = exemption_file(options, "unlimited_file", map_attributes(parts))
        self.overrides: dict[str, Optional[dict[str, int]]] = {}
        self._overrides_version: Optional[tuple[float, int]] = None
        try:
            self.load_overrides()
        except OverridesError as e:
            raise options.error("overrides", str(e)) from None
        reload = options.number("overrides_reload", 60.0)
        if reload > 0 and self.overrides_path is not None:
            reloader = TimerService(reload, self.reload_overrides)
            reloader.clock = options.reactor
            reloader.setServiceParent(self)
        self.action = options.action("action", DEFAULT_ACTION)
        try:
            self._text(self.windows[0], 0, "identity")
        except (KeyError, IndexError, ValueError) as e:
            raise options.error(
                "action",
                f"bad placeholder ({e}); use {{limit}} {{max}} {{count}} {{unit}} {{period}} {{key}}",
            ) from None
        self.refuse_early = options.boolean("refuse_early", False)
        if self.refuse_early and self.stage == "RCPT":
            raise options.error("refuse_early", "is for stage DATA or END-OF-MESSAGE")
        self.time_offset = options.number("time_offset", 0.0)
        #: Counts only the mail a rules check's rule hands it (L{apply}).
        self.rules_only = options.boolean("rules_only", False)
        self.store: IStateStore = store_for(options)
        self.read_outage(options, "quota", (ON_ERROR, LOCAL))
        # Marks of local counts of messages without an instance: unique to
        # this check object.
        self._local_tag = os.urandom(8).hex()
        self._local_sequence = itertools.count()
        self._reservations: OrderedDict[tuple[str, ...], _Reservation] = OrderedDict()
        # The counters built in the current minute, by identity and room:
        # an identity sending several mails a minute builds them once.
        # Only for fixed windows, which change at most once a minute (see
        # Window._fixed_bounds); sliding buckets move at any second.
        self._cacheable = all(window.period != "sliding" for window in self.windows)
        self._counters_minute = -1.0
        self._counters_cache: dict[tuple[str, int], tuple[Counter, ...]] = {}

    def load_overrides(self) -> None:
        """
        Read the overrides file (if any) and the C{unlimited} list.

        @raise OverridesError: when the file cannot be used.
        """
        overrides: dict[str, Optional[dict[str, int]]] = {}
        if self.overrides_path is not None:
            status = os.stat(self.overrides_path) if os.path.exists(self.overrides_path) else None
            version = (status.st_mtime, status.st_size) if status else None
            overrides = parse_overrides(self.overrides_path, {w.name for w in self.windows})
            self._overrides_version = version
        for identity in self.unlimited:
            overrides[identity] = None
        self.overrides = overrides
        # Counters built under the old limits.
        self._counters_cache = {}

    def reload_overrides(self) -> None:
        """
        Re-read the overrides file when it changed; a file that cannot be
        used is logged and the limits in force are kept.
        """
        assert self.overrides_path is not None
        try:
            status = os.stat(self.overrides_path)
        except OSError as e:
            self._log.error(
                "quota {check}: cannot read {path}: {reason}; keeping the overrides in force",
                check=self.name,
                path=self.overrides_path,
                reason=e.strerror,
            )
            return
        if (status.st_mtime, status.st_size) == self._overrides_version:
            return
        try:
            self.load_overrides()
        except OverridesError as e:
            # Said once per change of the file, not at every look.
            self._overrides_version = (status.st_mtime, status.st_size)
            self._log.error(
                "quota {check}: {reason}; keeping the overrides in force",
                check=self.name,
                reason=str(e),
            )
            return
        self._log.info(
            "quota {check}: {count} overrides loaded from {path}",
            check=self.name,
            count=len(self.overrides),
            path=self.overrides_path,
        )

    def now(self) -> float:
        """
        The time windows are computed from: the reactor's, plus
        C{time_offset}.
        """
        return self.reactor.seconds() + self.time_offset

    def identity(self, request: PolicyRequest) -> Optional[str]:
        """
        The value counted against, e.g. C{"alice"} or
        C{"alice,192.0.2.0/24"}; L{None} when a part is empty (such mail is
        not counted).
        """
        values = []
        for part in self.key_parts:
            if part == "client_address" or part == "client_network":
                address = request.client_ip
                if address is None:
                    return None
                if part == "client_network":
                    value = client_network(address, self.ipv4_prefix, self.ipv6_prefix)
                else:
                    value = str(address)
            elif part == "sender" or part == "recipient":
                address = getattr(request, part)
                local, at, domain = address.rpartition("@")
                value = f"{local}@{domain.lower()}" if at else address
            else:
                value = getattr(request, part)
            if not value:
                return None
            values.append(value)
        return ",".join(values)

    def key_prefix(self, identity: Optional[str] = None) -> str:
        """
        What the keys of an C{identity}'s counters start with (every
        window's, every bucket's), or of every identity's when L{None}.
        """
        if identity is None:
            return f"quota:{{{self.name}:"
        if len(identity) > _MAX_IDENTITY or "{" in identity or "}" in identity:
            identity = "sha256:" + hashlib.sha256(identity.encode("utf-8")).hexdigest()
        # The braces are a Redis hash tag: one identity's keys share a slot.
        return f"quota:{{{self.name}:{identity}}}"

    def _amount(self, request: PolicyRequest) -> int:
        if self.unit == "messages":
            return 1
        if self.unit == "recipients":
            return 1 if self.stage == "RCPT" else max(1, request.recipient_count)
        return request.size

    def _token(self, request: PolicyRequest) -> Optional[tuple[str, ...]]:
        instance = request.instance
        if not instance:
            return None
        if self.stage == "RCPT":
            return (instance, request.client_address, request.recipient)
        return (instance, request.client_address)

    def once(self, identity: str, token: tuple[str, ...], now: float) -> Once:
        """
        The mark of the message C{token} (its C{instance}, ...) counted for
        C{identity}: its key carries the identity's hash tag, so that it
        shares a Redis Cluster slot with the identity's counters, and no
        counter key starts like it.
        """
        digest = hashlib.sha256("\0".join(token).encode("utf-8", "replace")).hexdigest()[:32]
        tagged = self.key_prefix(identity)[len("quota") :]
        return Once(f"counted{tagged}:{digest}", now + COUNTED_FOR, token[0])

    def _text(
        self, window: Window, count: int, identity: str, maximum: Optional[int] = None
    ) -> str:
        return self.action.text.format_map(
            {
                "limit": window.name,
                "max": window.maximum if maximum is None else maximum,
                "count": count,
                "unit": self.unit,
                "period": window.period,
                "key": identity,
            }
        )

    def counters_for(self, identity: str, now: float, room: int = 0) -> tuple[Counter, ...]:
        """
        The identity's counters at C{now}, their limits lowered by C{room}.

        @return: the counters, or an empty tuple for an unlimited identity.
        """
        if self._cacheable:
            minute = now // 60
            if minute != self._counters_minute:
                self._counters_minute = minute
                self._counters_cache = {}
            cached = self._counters_cache.get((identity, room))
            if cached is not None:
                return cached
        limits = self.overrides.get(identity, {})
        if limits is None:
            counters: tuple[Counter, ...] = ()
        else:
            prefix = self.key_prefix(identity)
            counters = tuple(
                window.counter(prefix, now, limits.get(window.name, window.maximum) - room)
                for window in self.windows
            )
        if self._cacheable:
            if len(self._counters_cache) >= REMEMBERED:
                self._counters_cache = {}
            self._counters_cache[(identity, room)] = counters
        return counters

    def _over_limit(
        self,
        identity: str,
        counters: tuple[Counter, ...],
        totals: tuple[int, ...],
        amount: int,
        degraded: bool = False,
    ) -> Action:
        """
        The over-limit answer naming the first full window, logged.
        """
        windows = self.windows
        window, counter, total = next(
            (window, counter, total)
            for window, counter, total in zip(windows, counters, totals, strict=True)
            if total + amount > counter.limit
        )
        maximum = counter.limit + (1 if amount == 0 else 0)
        action = Action(self.action.verb, self._text(window, total, identity, maximum))
        self._log.warn(
            "quota {check}: {key} is over its {limit} limit{local}: {count} + {amount} > {max}"
            " {unit}; answering {action}",
            check=self.name,
            local=" (local share: the store is down)" if degraded else "",
            key=escape(identity),
            limit=window.name,
            count=total,
            amount=max(amount, 1),
            max=maximum,
            unit=self.unit,
            counts={w.name: t for w, t in zip(windows, totals, strict=True)},
            action=str(action),
        )
        return action

    def answers(self) -> list[Possible]:
        """
        What it answers when it counts (by itself, or for a rules check's
        C{quota} rule): its C{action}, at its stage (and at RCPT with
        C{refuse_early}).
        """
        states = [self.stage, "RCPT"] if self.refuse_early else [self.stage]
        return [possible(self.action.verb, states, "action")]

    def possible_actions(self) -> list[Possible]:
        # With rules_only, the rules check answers its action.
        return [] if self.rules_only else self.answers()

    def check(self, request: PolicyRequest) -> Any:
        if self.rules_only:
            return DUNNO
        return self.apply(request)

    def apply(self, request: PolicyRequest) -> Any:
        """
        Count C{request} and answer as the check does: what L{check} does
        for all mail, and a rules check's C{quota} rule for the mail it
        matches.
        """
        if self.unlimited_file is not None and self.unlimited_file.exempt(request):
            return DUNNO
        state = request.protocol_state
        if state != self.stage:
            if self.refuse_early and state == "RCPT":
                return self._check_early(request)
            return DUNNO
        # A message being counted here (Postfix asking again) answers
        # before its identity and counters are built; one counted earlier,
        # here or elsewhere, is known by its mark in the store.
        token = self._token(request)
        if token is not None and token in self._reservations:
            return DUNNO
        identity = self.identity(request)
        if identity is None:
            return DUNNO
        amount = self._amount(request)
        if amount <= 0:
            return DUNNO
        now = self.now()
        counters = self.counters_for(identity, now)
        if not counters:
            return DUNNO
        once = self.once(identity, token, now) if token is not None else None
        reservation = _Reservation(counters, amount, once)
        if token is not None:
            self._reservations[token] = reservation
            if len(self._reservations) > REMEMBERED:
                self._reservations.popitem(last=False)
        outage = self.outage
        if outage is not None and outage.active:
            return self._count_locally(identity, token, reservation, now)

        def consumed(result: Any) -> Any:
            if isinstance(result, Failure):
                if outage is not None and outage.failed(result, counters[0].key):
                    return self._count_locally(identity, token, reservation, now)
                reservation.consumed = False
                self._settle(token, reservation)
                return result
            if result.repeated:
                # Counted before, by this process or another: not ours to
                # take back.
                reservation.consumed = False
                self._settle(token, reservation)
                self._log.debug(
                    "quota {check}: {key}: message already counted",
                    check=self.name,
                    key=escape(identity),
                )
                return DUNNO
            reservation.consumed = result.allowed
            self._settle(token, reservation)
            if result.allowed:
                return DUNNO
            return self._over_limit(identity, counters, result.totals, amount)

        return answer_of(self.store.consume(counters, amount, now, once), consumed)

    def _local_counters(self, counters: tuple[Counter, ...], room: int = 0) -> tuple[Counter, ...]:
        """
        C{counters} with the limits this process enforces while degraded:
        its share of each, lowered by C{room}.
        """
        share = self.outage_settings.local_limit
        return tuple(
            Counter(c.key, c.read_keys, share(c.limit + room) - room, c.expires_at)
            for c in counters
        )

    def _count_locally(
        self,
        identity: str,
        token: Optional[tuple[str, ...]],
        reservation: _Reservation,
        now: float,
    ) -> Action:
        """
        Count a message in the local store (degraded mode) against this
        process's share of the limits, and journal the count for the
        shared store.
        """
        outage = self.outage
        assert outage is not None and outage.local is not None
        counters, amount, once = reservation.counters, reservation.amount, reservation.once
        local = self._local_counters(counters)
        result = _now(outage.local.consume(local, amount, now, once))
        reservation.local = True
        if result.repeated:
            reservation.consumed = False
            self._settle(token, reservation)
            return DUNNO
        reservation.consumed = result.allowed
        if result.allowed:
            if once is None:
                once = self.once(identity, (self._local_tag, str(next(self._local_sequence))), now)
            outage.record(Pending(counters, amount, once))
        self._settle(token, reservation)
        if result.allowed:
            return DUNNO
        return self._over_limit(identity, local, result.totals, amount, degraded=True)

    def _check_early(self, request: PolicyRequest) -> Any:
        """
        At RCPT, before the message is counted: refuse at once when a
        window is already full, so the client need not send the message
        first. Nothing is counted (the store adds 0 if there is room for
        one more).
        """
        identity = self.identity(request)
        if identity is None:
            return DUNNO
        now = self.now()
        counters = self.counters_for(identity, now, room=1)
        if not counters:
            return DUNNO
        outage = self.outage

        def early_locally() -> Any:
            assert outage is not None and outage.local is not None
            local = self._local_counters(counters, room=1)
            result = _now(outage.local.consume(local, 0, now))
            if result.allowed:
                return DUNNO
            return self._over_limit(identity, local, result.totals, 0, degraded=True)

        if outage is not None and outage.active:
            return early_locally()

        def answer(result: Any) -> Any:
            if isinstance(result, Failure):
                if outage is not None and outage.failed(result, counters[0].key):
                    return early_locally()
                return result
            if result.allowed:
                return DUNNO
            return self._over_limit(identity, counters, result.totals, 0)

        return answer_of(self.store.consume(counters, 0, now), answer)

    def decided(self, request: PolicyRequest, action: Optional[Action]) -> None:
        # Every request the chain answers comes here, most of them never
        # counted (another check answered first, another stage): with no
        # message in flight there is nothing to look up.
        if not self._reservations or request.protocol_state != self.stage:
            return
        token = self._token(request)
        reservation = self._reservations.get(token) if token is not None else None
        if reservation is None or reservation.decided:
            return
        reservation.decided = True
        reservation.action = action
        self._settle(token, reservation)

    def _settle(self, token: Optional[tuple[str, ...]], reservation: _Reservation) -> None:
        """
        Once both the store and the chain have answered: take the count
        back when the message was counted but refused.
        """
        if reservation.consumed is None:
            return
        if token is None:
            return
        if not reservation.decided:
            return
        self._reservations.pop(token, None)
        if reservation.consumed and refuses(reservation.action):
            self._log.info(
                "quota {check}: message refused ({action}); its count is taken back",
                check=self.name,
                action=str(reservation.action),
            )
            if reservation.local:
                outage = self.outage
                assert outage is not None and outage.local is not None
                outage.local.release(
                    reservation.counters, reservation.amount, self.now(), reservation.once
                )
                if reservation.once is None or outage.forget(reservation.once):
                    # Never left this process.
                    return
            released = self.store.release(
                reservation.counters, reservation.amount, self.now(), reservation.once
            )
            released.addErrback(
                lambda failure: self._log.failure(
                    "quota {check}: taking a count back failed", failure, check=self.name
                )
            )


def _now(d: Deferred[Consumption]) -> Consumption:
    """
    The result of a Deferred that has one already (the memory store's).
    """
    results: list[Any] = []
    d.addBoth(results.append)
    outcome = results[0]
    if isinstance(outcome, Failure):
        outcome.raiseException()
    return outcome  # type: ignore[no-any-return]
