"""
The protocol parses a read that holds whole requests in one go, and falls
back to line-by-line parsing for anything unusual. These tests check that
both paths give the same replies, closes and warnings, whatever the bytes.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.action import Action
from pfxpold.chain import Decision
from pfxpold.interfaces import IPolicyDecider
from pfxpold.protocol import Limits, PolicyFactory


@implementer(IPolicyDecider)
class Echo:
    """
    Answers with what it saw, so that a different parse gives a different
    reply; C{sender=noreply} closes without an answer.
    """

    def decide(self, request):
        if request.get("sender") == "noreply":
            return Decision(None, "echo")
        text = " ".join(f"{name}:{value}" for name, value in sorted(request.items()))
        return Decision(Action("OK", text[:200]), "echo")


LIMITS = Limits(max_line_length=40, max_attributes=4, max_request_size=120, max_pipelined=3)


def run(chunks: list[bytes], limits: Limits = LIMITS) -> tuple[bytes, bool, list[str]]:
    """
    Feed C{chunks} to one connection.

    @return: what was written, whether it closed, and its warnings.
    """
    factory = PolicyFactory(Echo(), Clock(), limits, log_requests=False)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    with capturedLogs() as events:
        for chunk in chunks:
            if transport.disconnecting:
                break
            protocol.dataReceived(chunk)
    warnings = [event["reason"] for event in events if event["log_level"] >= LogLevel.warn]
    return transport.value(), transport.disconnecting, warnings


names = st.sampled_from(["sender", "recipient", "client_address", "request", "x", ""])
values = st.text(alphabet="ab=@.\x00\r é", max_size=12)
lines = st.one_of(
    st.tuples(names, values).map(lambda pair: f"{pair[0]}={pair[1]}".encode()),
    st.sampled_from([b"no-equals", b"sender=noreply", b"a" * 45, b"\xff\xfe=bad utf-8", b"x=\r"]),
)
requests = st.lists(lines, min_size=0, max_size=6).map(
    lambda request_lines: b"".join(line + b"\n" for line in request_lines) + b"\n"
)
streams = st.lists(requests, min_size=1, max_size=5).map(b"".join)


class EquivalenceTests(SynchronousTestCase):
    """
    Whole reads and byte-by-byte reads give the same outcome.
    """

    @settings(max_examples=300, deadline=None)
    @given(streams)
    def test_same_outcome(self, data):
        """One read of everything acts exactly like one byte per read."""
        whole = run([data])
        bytewise = run([data[i : i + 1] for i in range(len(data))])
        self.assertEqual(whole, bytewise)

    @settings(max_examples=100, deadline=None)
    @given(streams, st.integers(min_value=1, max_value=50))
    def test_same_outcome_any_split(self, data, size):
        """Reads of any size act like one read of everything."""
        self.assertEqual(run([data[i : i + size] for i in range(0, len(data), size)]), run([data]))

    def test_postfix_requests(self):
        """Several real-looking requests in one read are each answered, in order."""
        data = b"request=smtpd_access_policy\nsender=a@b\n\n" * 3
        written, closed, warnings = run([data])
        self.assertEqual(written.count(b"action=OK request:smtpd_access_policy sender:a@b\n\n"), 3)
        self.assertFalse(closed)
        self.assertEqual(warnings, [])

    def test_limit_edges(self):
        """At and just over each limit, both paths agree."""
        at_line_limit = b"sender=" + b"a" * (LIMITS.max_line_length - 7)
        cases = [
            [b"a%d=1" % n for n in range(LIMITS.max_attributes)],
            [b"a%d=1" % n for n in range(LIMITS.max_attributes + 1)],
            [at_line_limit],
            [at_line_limit + b"a"],
            # 41 + 41 + 38 bytes: exactly max_request_size, then one more.
            [b"a=" + b"x" * 38, b"b=" + b"x" * 38, b"c=" + b"x" * 35],
            [b"a=" + b"x" * 38, b"b=" + b"x" * 38, b"c=" + b"x" * 36],
        ]
        outcomes = set()
        # Long lines allowed, so that only the request size limit applies.
        long_lines = Limits(max_line_length=200, max_attributes=4, max_request_size=120)
        for limits in (LIMITS, long_lines):
            for request_lines in cases:
                request = b"".join(line + b"\n" for line in request_lines) + b"\n"
                data = request + request
                whole = run([data], limits)
                self.assertEqual(whole, run([data[i : i + 1] for i in range(len(data))], limits))
                outcomes.add(whole[1])
        # Some cases are over a limit (closed), some are not.
        self.assertEqual(outcomes, {True, False})
