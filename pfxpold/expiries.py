"""
Many timeouts under one timer: what the check chain uses to bound the
requests waiting for checks, instead of a C{callLater} per request.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class Expiries:
    """
    Keys that expire a fixed time after they are added, under one timer.

    Each key is added to a queue made with L{queue}, which has one duration
    and one function to call with a key when it expires. Within a queue,
    keys expire in the order they were added (their clock only moves
    forward; if the wall clock steps back, a key may expire up to that step
    late), so each queue is an insertion-ordered dictionary, and one
    C{callLater} waits for the earliest queue head. Adding a key costs a
    dictionary insertion and, only when nothing earlier is waited for, a
    timer; removing one costs a dictionary deletion, and cancels the timer
    when nothing is left. Keys due at the same time expire in the order of
    their queues' creation.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._queues: list[tuple[float, dict[Hashable, float], Callable[[Any], object]]] = []
        self._timer: Optional[IDelayedCall] = None
        self._timer_at = float("inf")

    def queue(self, duration: float, expired: Callable[[Any], object]) -> int:
        """
        Make a queue.

        @param duration: seconds after which a key added to it expires.
        @param expired: called with each key that expires; the key is no
            longer in the queue then.
        @return: the queue's number, for L{add} and L{discard}.
        """
        self._queues.append((duration, {}, expired))
        return len(self._queues) - 1

    def add(self, queue: int, key: Hashable) -> None:
        """
        Start C{key}'s time in C{queue}; C{key} must not be in it already.
        """
        duration, keys, _ = self._queues[queue]
        due = self._clock.seconds() + duration
        keys[key] = due
        if due < self._timer_at:
            self._wake_at(due)

    def discard(self, queue: int, key: Hashable) -> None:
        """
        Forget C{key} in C{queue}, if it is there.
        """
        keys = self._queues[queue][1]
        if keys.pop(key, None) is not None and not keys and self._timer is not None:
            for _, others, _ in self._queues:
                if others:
                    return
            self._timer.cancel()
            self._timer = None
            self._timer_at = float("inf")

    def __len__(self) -> int:
        return sum(len(keys) for _, keys, _ in self._queues)

    def _wake_at(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._expire)
        self._timer_at = due

    def _expire(self) -> None:
        # What was due when the timer was set is due now, even if the
        # clock's sum of delays comes out a rounding error short.
        now = max(self._clock.seconds(), self._timer_at)
        self._timer = None
        self._timer_at = float("inf")
        for _, keys, expired in self._queues:
            # One key at a time: what each expiry runs may remove others.
            while keys:
                key = next(iter(keys))
                if keys[key] > now:
                    break
                del keys[key]
                try:
                    expired(key)
                except Exception:
                    # The others still expire, and the timer is set again.
                    self._log.failure("expiring {key!r} failed", key=key)
        heads = [next(iter(keys.values())) for _, keys, _ in self._queues if keys]
        if heads:
            due = min(heads)
            if due < self._timer_at:
                self._wake_at(due)
