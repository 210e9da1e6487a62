"""
Check types for the daemon integration tests (tests/integration/test_daemon.py),
loaded by a real C{twistd -n pfxpold} by dotted path.

Each request says how it wants to be treated through attributes of its own,
so one running daemon can show many behaviours:

  - C{fail=<check name>}: that check raises;
  - C{answer=<action>}: what the C{script} check answers; without it, a
    C{WARN} naming the stage, sender domain, attribute count, SASL login
    and size, to show that a real Postfix request arrived intact;
  - C{delay=<seconds>}: the C{script} check answers after that long;
  - C{gate=<path>}: the C{script} check answers once that file exists;
  - C{hang=1}: the C{script} check never answers (its Deferred is
    cancellable, so the deadline can cancel it).
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from zope.interface import implementer

from pfxpold.config import CheckOptions
from pfxpold.interfaces import ICheck
from pfxpold.request import PolicyRequest


@implementer(ICheck)
class FailingCheck:
    """
    Raises when the request's C{fail} attribute names this check, else
    passes.
    """

    def __init__(self, options: CheckOptions) -> None:
        self.name = options.name

    def check(self, request: PolicyRequest) -> str:
        if request.get("fail") == self.name:
            raise RuntimeError(f"{self.name} was told to fail")
        return "DUNNO"


@implementer(ICheck)
class ScriptCheck:
    """
    Answers as the request's attributes say, now or later.
    """

    _log = Logger()

    def __init__(self, options: CheckOptions) -> None:
        self.reactor = options.reactor

    def check(self, request: PolicyRequest):
        answer = request.get("answer") or (
            f"WARN {request.protocol_state} {request.sender_domain}"
            f" n={len(request)} sasl={request.sasl_username or '-'} size={request.size}"
        )
        if request.get("hang"):
            self._log.info("script check hanging")
            return Deferred()
        if request.get("delay"):
            delay = float(request["delay"])
            self._log.info("script check waiting {delay}s", delay=delay)
            return deferLater(self.reactor, delay, lambda: answer)
        if request.get("gate"):
            return self._after_gate(request["gate"], answer)
        return answer

    async def _after_gate(self, path: str, answer: str) -> str:
        self._log.info("script check waiting for {path}", path=path)
        waiting = LoopingCall(lambda: os.path.exists(path) and waiting.stop())
        waiting.clock = self.reactor
        await waiting.start(0.05)
        return answer
