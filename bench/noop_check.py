"""
A synchronous check that always answers DUNNO, for profiling pfxpold's own
per-request cost: with it, everything measured is protocol, chain and log.

Named in a benchmark configuration as C{type = "noop_check:NoopCheck"}
(bench/run.py puts bench/ on C{PYTHONPATH}).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import implementer

from pfxpold.action import DUNNO, Action
from pfxpold.config import CheckOptions
from pfxpold.interfaces import ICheck
from pfxpold.request import PolicyRequest


@implementer(ICheck)
class NoopCheck:
    """
    Answers DUNNO at once.
    """

    def __init__(self, options: CheckOptions) -> None:
        pass

    def check(self, request: PolicyRequest) -> Action:
        return DUNNO


@implementer(ICheck)
class AsyncNoopCheck:
    """
    Answers DUNNO from an C{async def} that never waits, as a check that
    answers from a warm cache does: the chain's asynchronous path at its
    cheapest.
    """

    def __init__(self, options: CheckOptions) -> None:
        pass

    async def check(self, request: PolicyRequest) -> Action:
        return DUNNO


@implementer(ICheck)
class LaterNoopCheck:
    """
    Answers DUNNO on the reactor's next turn, as a check waiting for a
    backend does: the chain's and the protocol's asynchronous paths with no
    backend cost.
    """

    def __init__(self, options: CheckOptions) -> None:
        self._reactor = options.reactor

    def check(self, request: PolicyRequest) -> Deferred[Action]:
        answer: Deferred[Action] = Deferred()
        self._reactor.callLater(0, answer.callback, DUNNO)
        return answer
