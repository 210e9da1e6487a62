"""
The demo check the original pfxpold shipped: a coin toss.

It exists so that a fresh install answers something; it is never a policy.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.logger import Logger
from zope.interface import implementer

from pfxpold.action import Action
from pfxpold.config import CheckOptions
from pfxpold.interfaces import ICheck
from pfxpold.request import PolicyRequest

WIN = Action("OK", "(you win!)")
LOSE = Action("DUNNO", "(you lose!)")


@implementer(ICheck)
class DemoCheck:
    """
    Answers C{OK (you win!)} or C{DUNNO (you lose!)} at random.
    """

    _log = Logger()

    def __init__(self, options: CheckOptions, coin: Callable[[], float] = random.random) -> None:
        self._coin = coin
        self._log.warn(
            "check {name!r} is the demo check: it accepts or passes mail at random."
            " Configure real checks with --config before using pfxpold for mail.",
            name=options.name,
        )

    def check(self, request: PolicyRequest) -> Action:
        return WIN if self._coin() < 0.5 else LOSE
