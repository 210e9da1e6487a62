"""
Helpers for testing checks with Twisted trial: requests built from real
Postfix 3.7 requests, and a test case that runs a check and asserts its
action.

Example::

    from pfxpold.testing import CheckTestCase, make_options, make_request
    from mycompany.policy import RelayCheck

    class RelayCheckTests(CheckTestCase):
        def test_scanner_may_relay(self):
            check = RelayCheck(make_options(networks=["192.0.2.0/24"]))
            self.assertAction(check, make_request(client_address="192.0.2.7"), "OK")
"""

from __future__ import annotations

from collections.abc import Collection
from importlib import resources
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.action import Action, as_action
from pfxpold.config import CheckOptions
from pfxpold.request import PolicyRequest

#: The real Postfix 3.7 requests shipped with pfxpold: RCPT, DATA,
#: END-OF-MESSAGE, and RCPT after XCLIENT LOGIN=joe.
FIXTURES = ("rcpt", "data", "eod", "xclient")


def fixture_bytes(name: str = "rcpt") -> bytes:
    """
    The bytes of a real Postfix request, exactly as Postfix sent them,
    empty line included.
    """
    if name not in FIXTURES:
        raise ValueError(f"no fixture {name!r}; there are {', '.join(FIXTURES)}")
    return resources.files("pfxpold").joinpath("fixtures", f"{name}.txt").read_bytes()


def parse_request(data: bytes) -> PolicyRequest:
    """
    Parse one request's C{name=value} lines (the empty line is optional).
    """
    attributes = {}
    for line in data.decode("utf-8").splitlines():
        if line:
            name, _, value = line.partition("=")
            attributes[name] = value
    return PolicyRequest(attributes)


def make_request(fixture: str = "rcpt", **changes: str) -> PolicyRequest:
    """
    A real Postfix request (RCPT by default) with some attributes changed,
    e.g. C{make_request(sender="alice@example.com", client_address="::1")}.
    """
    return parse_request(fixture_bytes(fixture)).replace(**changes)


def make_options(
    name: str = "test",
    reactor: Any = None,
    restriction_classes: Collection[str] = (),
    path: Optional[str] = None,
    **table: Any,
) -> CheckOptions:
    """
    The L{CheckOptions} a check type receives, as if C{table} had been its
    C{[[check]]} table. The reactor is a fresh L{Clock} unless given.
    """
    return CheckOptions(
        table,
        name=name,
        reactor=reactor if reactor is not None else Clock(),
        path=path,
        restriction_classes=tuple(restriction_classes),
    )


def run_check(
    check: Any, request: PolicyRequest, restriction_classes: Collection[str] = ()
) -> Deferred[Action]:
    """
    Run C{check} on C{request} as the chain would, whatever it returns (a
    string, an L{Action}, a Deferred, a coroutine).

    @return: a Deferred that fires with the validated L{Action}, or fails
        with what the check raised or an L{pfxpold.action.ActionError}.
    """
    result: Deferred[Any] = maybeDeferred(check.check, request)
    return result.addCallback(as_action, restriction_classes)


class CheckTestCase(SynchronousTestCase):
    """
    A trial test case with assertions for checks.
    """

    def assertAction(
        self,
        check: Any,
        request: PolicyRequest,
        expected: Union[str, Action],
        restriction_classes: Collection[str] = (),
    ) -> Action:
        """
        Assert that C{check} answers C{request} with C{expected} at once
        (advance a L{Clock} first for checks that wait).

        @return: the action.
        """
        action = self.successResultOf(run_check(check, request, restriction_classes))
        if isinstance(expected, str):
            expected = Action.parse(expected, restriction_classes)
        self.assertEqual(action, expected)
        return action
