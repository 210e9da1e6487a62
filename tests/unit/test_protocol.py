"""
Tests for L{pfxpold.protocol}: the policy protocol on one connection, its
limits and timeouts, and the factory's bookkeeping.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.action import Action
from pfxpold.chain import ChainEntry, CheckChain, Decision, ErrorPolicy
from pfxpold.escape import escape
from pfxpold.interfaces import ICheck, IDecisionListener, IPolicyDecider
from pfxpold.protocol import Limits, PolicyFactory
from pfxpold.testing import fixture_bytes


@implementer(IPolicyDecider)
class ScriptedDecider:
    """
    Answers each request with the action named by its C{answer} attribute
    (C{"noreply"} for none); with C{wait=1} it returns a Deferred the test
    fires through C{waiting}.
    """

    def __init__(self):
        self.requests = []
        self.waiting = []

    def decide(self, request):
        self.requests.append(request)
        answer = request.get("answer", "DUNNO")
        decision = Decision(None if answer == "noreply" else Action.parse(answer), "script")
        if request.get("wait"):
            waiting = Deferred()
            self.waiting.append((waiting, decision))
            return waiting
        return decision

    def fire(self, index):
        waiting, decision = self.waiting[index]
        waiting.callback(decision)


#: Pieces of the protocol for the fuzz test to mix with random bytes.
FRAGMENTS = [
    b"\n",
    b"\r\n",
    b"sender=a@b.example\n",
    b"answer=REJECT no\n",
    b"answer=OK\n\n",
    b"answer=noreply\n\n",
    b"wait=1\n",
    b"=\n",
    b"x" * 300,
]


def request_bytes(**attributes):
    return b"".join(f"{k}={v}\n".encode() for k, v in attributes.items()) + b"\n"


class ProtocolTestCase(SynchronousTestCase):
    """
    A policy connection on a L{StringTransport} with a L{Clock}.
    """

    limits = Limits(
        max_line_length=256,
        max_attributes=5,
        max_request_size=600,
        idle_timeout=1200.0,
        request_timeout=60.0,
        max_pipelined=3,
    )

    def setUp(self):
        self.clock = Clock()
        self.decider = ScriptedDecider()
        self.factory = PolicyFactory(self.decider, self.clock, self.limits, log_requests=False)
        self.transport, self.protocol = self.connect()

    def connect(self):
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 40000))
        protocol.makeConnection(transport)
        return transport, protocol

    def send(self, data, protocol=None):
        (protocol or self.protocol).dataReceived(data)

    def written(self, transport=None):
        return (transport or self.transport).value()

    def assertClosedWithoutReply(self, reason_part, events):
        """The connection was aborted and a warning names the peer and reason."""
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
        self.assertEqual(self.written(), b"")
        warnings = [e for e in events if e.get("peer") == "192.0.2.9:40000" and "reason" in e]
        self.assertEqual(len(warnings), 1, events)
        self.assertIn(reason_part, warnings[0]["reason"])


class RequestReplyTests(ProtocolTestCase):
    """
    One reply per request, in order, nothing before a request.
    """

    def test_nothing_written_before_request(self):
        """Connecting and sending part of a request writes nothing."""
        self.assertEqual(self.written(), b"")
        self.send(b"sender=a@b.example\nrecipient=c@d")
        self.assertEqual(self.written(), b"")
        self.assertEqual(self.decider.requests, [])

    def test_one_reply(self):
        """A request gets exactly one reply and the connection stays open."""
        self.send(request_bytes(sender="Alice@Example.COM", answer="REJECT no"))
        self.assertEqual(self.written(), b"action=REJECT no\n\n")
        self.assertFalse(self.transport.disconnecting)
        [request] = self.decider.requests
        self.assertEqual(request.sender, "Alice@Example.COM")

    def use_default_limits(self):
        self.factory.limits = Limits()
        self.transport, self.protocol = self.connect()

    def test_fixtures(self):
        """The real Postfix requests parse into requests of 29 attributes."""
        self.use_default_limits()
        for name in ("rcpt", "data", "eod", "xclient"):
            self.send(fixture_bytes(name))
        self.assertEqual(self.written(), b"action=DUNNO\n\n" * 4)
        self.assertEqual([len(r) for r in self.decider.requests], [29] * 4)
        self.assertEqual(self.decider.requests[2].protocol_state, "END-OF-MESSAGE")

    def test_several_requests(self):
        """Many requests on one connection get one reply each, in order."""
        for answer in ("OK", "REJECT a", "DUNNO", "HOLD"):
            self.send(request_bytes(answer=answer))
        self.assertEqual(
            self.written(),
            b"action=OK\n\naction=REJECT a\n\naction=DUNNO\n\naction=HOLD\n\n",
        )

    def test_byte_at_a_time(self):
        """A request arriving one byte at a time is answered once, at its end."""
        data = request_bytes(answer="OK", sender="a@b")
        for i in range(len(data)):
            self.assertEqual(self.written(), b"")
            self.send(data[i : i + 1])
        self.assertEqual(self.written(), b"action=OK\n\n")

    def test_crlf(self):
        """CRLF line ends are accepted and the CR is not part of a value."""
        self.send(b"sender=a@b.example\r\nanswer=OK\r\n\r\n")
        self.assertEqual(self.written(), b"action=OK\n\n")
        self.assertEqual(self.decider.requests[0].sender, "a@b.example")

    def test_values(self):
        """Values split on the first C{=}, keep case and may be empty; unknown names kept."""
        self.send(b"ccert_subject=CN=Mx,O=Ex\nqueue_id=\ntls_sni=MX.example\n\n")
        request = self.decider.requests[0]
        self.assertEqual(request["ccert_subject"], "CN=Mx,O=Ex")
        self.assertEqual(request["queue_id"], "")
        self.assertEqual(request["tls_sni"], "MX.example")

    def test_non_utf8(self):
        """Bytes that are not UTF-8 are read with replacement, not a crash."""
        self.send(b"sender=\xff\xfe@example.com\n\n")
        self.assertEqual(self.written(), b"action=DUNNO\n\n")
        self.assertEqual(self.decider.requests[0].sender_domain, "example.com")

    def test_pipelining_out_of_order(self):
        """
        Pipelined requests are answered in request order even when later
        ones are decided first.
        """
        self.send(
            request_bytes(wait=1, answer="REJECT first")
            + request_bytes(wait=1, answer="OK")
            + request_bytes(answer="HOLD")
        )
        self.assertEqual(self.written(), b"")
        self.assertEqual(self.factory.in_flight, 3)
        self.decider.fire(1)
        self.assertEqual(self.written(), b"")
        self.decider.fire(0)
        self.assertEqual(self.written(), b"action=REJECT first\n\naction=OK\n\naction=HOLD\n\n")
        self.assertEqual(self.factory.in_flight, 0)

    def test_fast_path(self):
        """
        A synchronous decision is answered without a Deferred, without a
        new timer, and without counting as in flight.
        """

        def no_deferreds(*args, **kwargs):
            raise AssertionError("the fast path made a Deferred")

        self.send(request_bytes(answer="OK"))
        [idle_timer] = self.clock.getDelayedCalls()
        self.patch(Deferred, "__init__", no_deferreds)
        for _ in range(3):
            self.send(request_bytes(answer="OK"))
        self.assertEqual(self.clock.getDelayedCalls(), [idle_timer])
        self.assertEqual(self.factory.in_flight, 0)
        self.assertEqual(self.written(), b"action=OK\n\n" * 4)

    def test_decider_fails(self):
        """
        A decider whose Deferred fails (it must not) closes the connection
        after the earlier answers, logged, instead of leaving it hanging.
        """
        self.send(request_bytes(wait=1, answer="OK") + request_bytes(wait=1, answer="OK"))
        with capturedLogs() as events:
            self.decider.waiting[1][0].errback(RuntimeError("decider bug"))
            self.decider.fire(0)
        self.assertEqual(self.written(), b"action=OK\n\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.factory.in_flight, 0)
        [event] = [e for e in events if "log_failure" in e]
        self.assertEqual(event["peer"], "192.0.2.9:40000")
        self.flushLoggedErrors(RuntimeError)

    def test_synchronous_after_pending(self):
        """A synchronous decision waits behind a pending one."""
        self.send(request_bytes(wait=1, answer="OK"))
        self.send(request_bytes(answer="REJECT second"))
        self.assertEqual(self.written(), b"")
        self.decider.fire(0)
        self.assertEqual(self.written(), b"action=OK\n\naction=REJECT second\n\n")

    def test_noreply_closes_after_earlier_answers(self):
        """A no-reply decision closes the connection after earlier answers are written."""
        self.send(
            request_bytes(wait=1, answer="OK")
            + request_bytes(answer="noreply")
            + request_bytes(answer="REJECT never")
        )
        self.decider.fire(0)
        self.assertEqual(self.written(), b"action=OK\n\n")
        self.assertTrue(self.transport.disconnecting)
        # loseConnection, not abort: what was written is flushed first.
        self.assertFalse(self.transport.disconnected)

    def test_noreply_synchronous(self):
        """A synchronous no-reply closes the connection without writing."""
        self.send(request_bytes(answer="noreply"))
        self.assertEqual(self.written(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_request_log(self):
        """With log_requests, one event per request carries its fields."""
        self.use_default_limits()
        self.factory.log_requests = True
        self.clock.advance(5)
        with capturedLogs() as events:
            self.send(fixture_bytes("eod"))
        [event] = [e for e in events if "protocol_state" in e]
        self.assertEqual(event["protocol_state"], "END-OF-MESSAGE")
        self.assertEqual(event["client_address"], "127.0.0.1")
        self.assertEqual(event["client_name"], "localhost")
        self.assertEqual(event["helo_name"], "client.example.com")
        self.assertEqual(event["sender"], "alice@example.com")
        self.assertEqual(event["recipient"], "bob@example.net")
        self.assertEqual(event["queue_id"], "080B1212137")
        self.assertEqual(event["instance"], "7ee1.6b05ccb5.7a08.0")
        self.assertEqual(event["action"], "DUNNO")
        self.assertEqual(event["check"], "script")
        self.assertEqual(event["elapsed_ms"], 0.0)
        self.assertEqual(event["peer"], "192.0.2.9:40000")

    def test_request_log_elsewhere(self):
        """
        With a request log of its own, the factory hands it each answered
        request, its decision, the time taken and the peer, and logs no
        event.
        """
        recorded = []

        class Recorder:
            def record(self, request, decision, elapsed_ms, peer):
                recorded.append((request, decision, elapsed_ms, peer))

        self.factory.log_requests = True
        self.factory.request_log = Recorder()
        with capturedLogs() as events:
            self.send(request_bytes(wait=1, answer="OK"))
            self.clock.advance(0.5)
            self.decider.fire(0)
        [(request, decision, elapsed_ms, peer)] = recorded
        self.assertEqual(request["answer"], "OK")
        self.assertEqual(str(decision.action), "OK")
        self.assertEqual(elapsed_ms, 500.0)
        self.assertEqual(peer, "192.0.2.9:40000")
        self.assertFalse([e for e in events if "elapsed_ms" in e])

    def test_request_log_elapsed(self):
        """The logged time is the time the decision took, on the clock."""
        self.factory.log_requests = True
        with capturedLogs() as events:
            self.send(request_bytes(wait=1, answer="OK"))
            self.clock.advance(0.25)
            self.decider.fire(0)
        [event] = [e for e in events if "elapsed_ms" in e]
        self.assertEqual(event["elapsed_ms"], 250.0)

    def test_verdicts_logged(self):
        """A decision's verdicts are logged at debug level."""
        decision = Decision(Action("OK"), "b", [("a", "DUNNO"), ("b", "OK")])
        self.decider.decide = lambda request: decision
        with capturedLogs() as events:
            self.send(request_bytes(sender="x"))
        [event] = [e for e in events if "verdicts" in e]
        self.assertEqual(event["verdicts"], [("a", "DUNNO"), ("b", "OK")])

    def test_ipv6_peer(self):
        """An IPv6 peer is logged with brackets around the address."""
        from twisted.internet.address import IPv6Address

        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(StringTransport(peerAddress=IPv6Address("TCP", "::1", 4000)))
        self.assertEqual(protocol.peer, "[::1]:4000")

    def test_unix_peer(self):
        """A unix socket peer is named in the log without crashing."""
        factory = PolicyFactory(self.decider, self.clock, self.limits, log_requests=False)
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=UNIXAddress(None))
        protocol.makeConnection(transport)
        protocol.dataReceived(request_bytes(answer="OK"))
        self.assertEqual(transport.value(), b"action=OK\n\n")
        self.assertEqual(protocol.peer, "unix:?")


class LimitTests(ProtocolTestCase):
    """
    Every limit closes the connection without a reply, logging the peer.
    """

    def violate(self, data, reason_part):
        with capturedLogs() as events:
            self.send(data)
        self.assertClosedWithoutReply(reason_part, events)
        self.assertEqual(self.decider.requests, [])

    def test_line_length(self):
        """A line over max_line_length closes the connection."""
        self.violate(b"sender=" + b"a" * 300 + b"\n\n", "line longer")

    def test_line_length_without_newline(self):
        """A long run of bytes without a newline closes it too, without waiting."""
        self.violate(b"x" * 300, "line longer")

    def test_attributes(self):
        """More than max_attributes attributes close the connection."""
        self.violate(b"".join(b"a%d=1\n" % i for i in range(6)) + b"\n", "attributes")

    def test_request_size(self):
        """A request over max_request_size bytes closes the connection."""
        self.violate(b"".join(b"a%d=" % i + b"v" * 200 + b"\n" for i in range(4)), "larger")

    def test_repeated_attribute(self):
        """A repeated attribute closes the connection."""
        self.violate(b"sender=a\nsender=b\n\n", "repeated")

    def test_not_name_value(self):
        """A line without C{=} or with an empty name closes the connection."""
        self.violate(b"sender\n\n", "not name=value")

    def test_empty_name(self):
        """A line with an empty name closes the connection."""
        self.violate(b"=value\n\n", "not name=value")

    def test_nul_in_name(self):
        """A NUL in a name closes the connection."""
        self.violate(b"sen\x00der=a\n\n", "bad or repeated")

    def test_empty_line_first(self):
        """An empty line where a request should start closes the connection."""
        self.violate(b"\n", "empty line")

    def test_after_good_request(self):
        """A violation after a good request keeps the good answer, adds nothing."""
        self.send(request_bytes(answer="OK"))
        with capturedLogs():
            self.send(b"\n" + request_bytes(answer="REJECT"))
        self.assertEqual(self.written(), b"action=OK\n\n")
        self.assertTrue(self.transport.disconnected or self.transport.disconnecting)
        self.assertEqual(len(self.decider.requests), 1)

    def test_other_connections_unaffected(self):
        """A violation on one connection leaves another one serving."""
        other_transport, other = self.connect()
        with capturedLogs():
            self.send(b"garbage\n")
        self.send(request_bytes(answer="OK"), other)
        self.assertEqual(other_transport.value(), b"action=OK\n\n")
        self.assertFalse(other_transport.disconnecting)

    def test_limits_exactly_at(self):
        """A request exactly at the attribute limit is served."""
        self.send(b"".join(b"a%d=1\n" % i for i in range(5)) + b"\n")
        self.assertEqual(self.written(), b"action=DUNNO\n\n")


class ViolationCloseTests(ProtocolTestCase):
    """
    A violation closes the connection gracefully: the answers written
    before it are sent, requests still waiting are answered first, and a
    peer that does not read is dropped after close_timeout.
    """

    def test_answer_sent_before_close(self):
        """
        A valid request and a malformed one in the same write: the valid
        one's answer is written and the connection closed after it is sent,
        not aborted.
        """
        with capturedLogs():
            self.send(request_bytes(answer="OK") + b"garbage\n")
        self.assertEqual(self.written(), b"action=OK\n\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)
        self.assertEqual(self.factory.violations, {"not_name_value": 1})

    def test_dropped_when_peer_does_not_read(self):
        """A closing connection whose answers do not leave is aborted after close_timeout."""
        with capturedLogs() as events:
            self.send(request_bytes(answer="OK") + b"\n")
            self.clock.advance(self.limits.close_timeout - 0.5)
            self.assertFalse(self.transport.disconnected)
            self.clock.advance(0.5)
        self.assertTrue(self.transport.disconnected)
        self.assertTrue([e for e in events if "did not take its last answers" in e["log_format"]])
        self.protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pending_answered_then_closed(self):
        """
        Requests still waiting for a check when the violation comes are
        answered, in order, and then the connection closes; nothing more
        is read.
        """
        with capturedLogs():
            self.send(request_bytes(wait=1, answer="OK") + request_bytes(wait=1, answer="HOLD"))
            self.send(b"sender\n\n" + request_bytes(answer="REJECT never"))
        self.assertFalse(self.transport.disconnecting)
        self.decider.fire(1)
        self.assertEqual(self.written(), b"")
        self.decider.fire(0)
        self.assertEqual(self.written(), b"action=OK\n\naction=HOLD\n\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)
        self.assertEqual(len(self.decider.requests), 2)
        self.send(request_bytes(answer="REJECT later"))
        self.assertEqual(len(self.decider.requests), 2)


class EscapedLogTests(ProtocolTestCase):
    """
    Client-provided text is escaped in every log line.
    """

    def test_request_line_escaped(self):
        """
        A CR, an escape sequence, U+2028 or a NUL in a value cannot forge
        or corrupt the request line; the fields are escaped as well.
        """
        self.factory.log_requests = True
        sender = "evil\rRCPT forged[192.0.2.1] from=<x> OK\x1b[2J\u2028\x00@x.test"
        with capturedLogs() as events:
            self.send(request_bytes(sender=sender, helo_name="a\\b"))
        [event] = [e for e in events if "request_text" in e]
        text = formatEvent(event)
        self.assertTrue(text.isprintable(), text)
        self.assertIn(
            "from=<evil\\x0dRCPT forged[192.0.2.1] from=<x> OK\\x1b[2J\\u2028\\x00@x.test>",
            text,
        )
        self.assertIn("helo=<a\\\\b>", text)
        self.assertEqual(event["sender"], escape(sender))

    def test_clean_request_line_unchanged(self):
        """A request without anything to escape is logged as it came."""
        self.factory.log_requests = True
        with capturedLogs() as events:
            self.send(request_bytes(sender="ünï@exämple.test"))
        [event] = [e for e in events if "request_text" in e]
        self.assertIn("from=<ünï@exämple.test>", formatEvent(event))

    def test_attribute_name_escaped(self):
        """A repeated attribute name with a control character is escaped in the warning."""
        with capturedLogs() as events:
            self.send(b"a\x1b[31m=1\na\x1b[31m=2\n\n")
        [event] = [e for e in events if "reason" in e]
        self.assertTrue(formatEvent(event).isprintable())
        self.assertIn("a\\x1b[31m", formatEvent(event))

    def test_unix_peer_escaped(self):
        """A unix socket path with a control character is escaped in the peer's name."""
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(StringTransport(peerAddress=UNIXAddress(b"/tmp/a\rb")))
        self.assertEqual(protocol.peer, "unix:/tmp/a\\x0db")


class TimeoutTests(ProtocolTestCase):
    """
    The request and idle timeouts, on the clock.
    """

    def test_request_timeout(self):
        """A request started and not finished within request_timeout is dropped."""
        self.clock.advance(100)
        with capturedLogs() as events:
            self.send(b"sender=a@b\n")
            self.clock.advance(59.9)
            self.assertFalse(self.transport.disconnecting)
            self.send(b"recipient=c@d\n")
            self.clock.advance(0.1)
        self.assertClosedWithoutReply("not finished", events)

    def test_idle_timeout(self):
        """A connection idle for idle_timeout is closed, not aborted."""
        self.send(request_bytes(answer="OK"))
        with capturedLogs() as events:
            self.clock.advance(1199)
            self.assertFalse(self.transport.disconnecting)
            self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue([e for e in events if e.get("peer") == "192.0.2.9:40000"])

    def test_idle_timeout_reset_by_requests(self):
        """Each request restarts the idle timer."""
        for _ in range(3):
            self.clock.advance(1000)
            self.send(request_bytes(answer="OK"))
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_idle_timer_not_moved_per_request(self):
        """
        A request does not reschedule the idle timer; when it fires early it
        waits for what is left, so the connection still closes exactly
        idle_timeout after its last request.
        """
        [timer] = self.clock.getDelayedCalls()
        due = timer.getTime()
        self.clock.advance(500)
        self.send(request_bytes(answer="OK"))
        self.assertEqual(self.clock.getDelayedCalls(), [timer])
        self.assertEqual(timer.getTime(), due)
        self.clock.advance(700)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(499.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)

    def test_idle_before_first_request(self):
        """A connection that never sends anything is closed after idle_timeout."""
        self.clock.advance(1200)
        self.assertTrue(self.transport.disconnecting)

    def test_timers_cancelled_on_close(self):
        """No timer outlives the connection."""
        self.send(b"sender=a\n")
        self.protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HalfCloseTests(ProtocolTestCase):
    """
    A client that shuts down its sending side still gets its answers.
    """

    def test_answers_in_flight_then_closes(self):
        """After readConnectionLost, pending answers are written, then the connection closes."""
        self.send(request_bytes(wait=1, answer="OK") + request_bytes(answer="REJECT x"))
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        self.decider.fire(0)
        self.assertEqual(self.written(), b"action=OK\n\naction=REJECT x\n\n")
        self.assertTrue(self.transport.disconnecting)

    def test_unread_requests_answered(self):
        """
        Requests still unread because the transport had paused us are read
        and answered after the half-close, then the connection closes.
        """
        self.protocol.pauseProducing()
        self.send(request_bytes(answer="OK") + request_bytes(answer="REJECT two") + b"x=1")
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        with capturedLogs() as events:
            self.protocol.resumeProducing()
        self.assertEqual(self.written(), b"action=OK\n\naction=REJECT two\n\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue([e for e in events if "middle of a request" in e["log_format"]])

    def test_unread_requests_behind_pipelined(self):
        """
        Requests unread because too many were in flight are read and
        answered after the half-close, in order, then the connection closes.
        """
        self.send(b"".join(request_bytes(wait=1, answer=f"HOLD {i}") for i in range(5)))
        self.protocol.readConnectionLost()
        for i in range(5):
            self.assertFalse(self.transport.disconnecting)
            self.decider.fire(i)
        self.assertEqual(self.written(), b"".join(b"action=HOLD %d\n\n" % i for i in range(5)))
        self.assertTrue(self.transport.disconnecting)

    def test_nothing_in_flight(self):
        """With nothing in flight, readConnectionLost closes at once."""
        self.send(request_bytes(answer="OK"))
        self.protocol.readConnectionLost()
        self.assertEqual(self.written(), b"action=OK\n\n")
        self.assertTrue(self.transport.disconnecting)

    def test_half_request_dropped(self):
        """A request without its empty line is dropped at half-close."""
        with capturedLogs():
            self.send(b"sender=a\n")
            self.protocol.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.written(), b"")

    def test_write_connection_lost(self):
        """When the peer stops reading, the connection is aborted."""
        self.protocol.writeConnectionLost()
        self.assertTrue(self.transport.disconnected)


class FlowControlTests(ProtocolTestCase):
    """
    max_pipelined and the transport's back-pressure.
    """

    def test_max_pipelined_pauses_and_resumes(self):
        """
        Reading stops at max_pipelined requests in flight and resumes as
        answers go out; requests read later are answered in order.
        """
        data = b"".join(request_bytes(wait=1, answer=f"REJECT {i}") for i in range(5))
        self.send(data)
        self.assertEqual(len(self.decider.requests), 3)
        self.assertEqual(self.transport.producerState, "paused")
        self.decider.fire(0)
        # The fourth request was read, which makes three in flight again.
        self.assertEqual(len(self.decider.requests), 4)
        self.assertEqual(self.transport.producerState, "paused")
        self.decider.fire(1)
        self.assertEqual(len(self.decider.requests), 5)
        self.assertEqual(self.transport.producerState, "paused")
        self.decider.fire(2)
        self.assertEqual(self.transport.producerState, "producing")
        for i in range(3, 5):
            self.decider.fire(i)
        self.assertEqual(
            self.written(),
            b"".join(b"action=REJECT %d\n\n" % i for i in range(5)),
        )
        self.assertEqual(self.factory.in_flight, 0)

    def test_write_buffer_full(self):
        """The transport pausing us stops our reading until it resumes us."""
        self.protocol.pauseProducing()
        self.send(request_bytes(answer="OK"))
        self.assertEqual(self.written(), b"")
        self.protocol.resumeProducing()
        self.assertEqual(self.written(), b"action=OK\n\n")

    def test_close_unregisters(self):
        """
        Closing unregisters us as the transport's producer, even while the
        transport has us paused, so the close is not traded for a resume.
        """
        self.assertIs(self.transport.producer, self.protocol)
        self.protocol.pauseProducing()
        self.send(request_bytes(answer="noreply"))
        self.protocol.resumeProducing()
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)

    def test_both_reasons(self):
        """Reading resumes only when every reason to pause is gone."""
        self.protocol.pauseProducing()
        self.protocol._pause("too many requests in flight")
        self.protocol.resumeProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol._resume("too many requests in flight")
        self.assertEqual(self.transport.producerState, "producing")


class ReentrancyTests(ProtocolTestCase):
    """
    A decider that answers or feeds data while the protocol is parsing.
    """

    def test_data_while_parsing(self):
        """
        Data delivered from within a decision (a transport delivering
        re-entrantly) is parsed after what was already read, in order.
        """
        decide = self.decider.decide
        fed = []

        def feeding(request):
            if not fed:
                fed.append(True)
                self.send(request_bytes(answer="REJECT third"))
            return decide(request)

        self.decider.decide = feeding
        self.send(request_bytes(answer="OK") + request_bytes(answer="HOLD"))
        self.assertEqual(
            self.written(), b"action=OK\n\naction=HOLD\n\naction=REJECT third\n\n"
        )
        self.assertEqual(self.protocol._buffer, b"")

    def test_resumed_while_parsing(self):
        """
        A request answered by an already fired Deferred at max_pipelined
        pauses and resumes reading from within the parse loop; every
        request is answered once, in order, and reading goes on.
        """
        decide = self.decider.decide

        def fired(request):
            return succeed(decide(request))

        self.decider.decide = fired
        self.send(b"".join(request_bytes(answer=f"HOLD {i}") for i in range(7)))
        self.assertEqual(self.written(), b"".join(b"action=HOLD %d\n\n" % i for i in range(7)))
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.factory.in_flight, 0)

    def test_stop_producing(self):
        """A transport that stops us is not read from any more."""
        self.protocol.stopProducing()
        self.send(request_bytes(answer="OK"))
        self.assertEqual(self.written(), b"")
        self.assertEqual(self.transport.producerState, "paused")


class FactoryTests(ProtocolTestCase):
    """
    The factory counts requests in flight and says when none are left.
    """

    def test_needs_decider(self):
        """The factory refuses something that is not an IPolicyDecider."""
        self.assertRaises(TypeError, PolicyFactory, object(), self.clock)

    def test_connections(self):
        """Open connections are tracked and forgotten when lost."""
        self.assertEqual(self.factory.connections, {self.protocol})
        self.protocol.connectionLost(None)
        self.assertEqual(self.factory.connections, set())

    def test_drained_at_once(self):
        """With nothing in flight, drained() has fired already."""
        self.successResultOf(self.factory.drained())

    def test_drained_later(self):
        """drained() fires once every request in flight is answered."""
        self.send(request_bytes(wait=1, answer="OK"))
        self.send(request_bytes(wait=1, answer="OK"), self.connect()[1])
        drained = self.factory.drained()
        self.assertEqual(self.factory.in_flight, 2)
        self.decider.fire(0)
        self.assertNoResult(drained)
        self.decider.fire(1)
        self.successResultOf(drained)

    def test_drained_connection_lost(self):
        """A lost connection's requests no longer count as in flight."""
        self.send(request_bytes(wait=1, answer="OK") + request_bytes(wait=1, answer="OK"))
        drained = self.factory.drained()
        self.protocol.connectionLost(None)
        self.assertEqual(self.factory.in_flight, 0)
        self.successResultOf(drained)
        # A decision arriving after the connection is gone changes nothing.
        self.decider.fire(0)
        self.assertEqual(self.factory.in_flight, 0)
        self.assertEqual(self.written(), b"")

    def test_drained_cancelled(self):
        """A cancelled drained() (a grace timeout) does not break later bookkeeping."""
        self.send(request_bytes(wait=1, answer="OK"))
        drained = self.factory.drained()
        drained.addTimeout(5, self.clock)
        self.clock.advance(5)
        self.failureResultOf(drained)
        self.decider.fire(0)
        self.assertEqual(self.factory.in_flight, 0)
        self.assertEqual(self.written(), b"action=OK\n\n")

    def test_close_connections(self):
        """
        close_connections closes every open connection, and its Deferred
        fires once they are all closed.
        """
        other_transport, other = self.connect()
        closed = self.factory.close_connections()
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(other_transport.disconnecting)
        self.assertFalse(self.transport.disconnected)
        self.protocol.connectionLost(None)
        self.assertNoResult(closed)
        other.connectionLost(None)
        self.successResultOf(closed)

    def test_close_connections_abort(self):
        """With abort, connections are dropped at once."""
        self.factory.close_connections(abort=True)
        self.assertTrue(self.transport.disconnected)

    def test_close_connections_none_open(self):
        """With no connection open, close_connections has fired already."""
        self.protocol.connectionLost(None)
        self.successResultOf(self.factory.close_connections())


class InMemoryClientServerTests(SynchronousTestCase):
    """
    A client and the server connected in memory with L{iosim}.
    """

    def test_client_server(self):
        """A line-based client gets the answers of its pipelined requests."""
        from twisted.protocols.basic import LineReceiver

        class Client(LineReceiver):
            delimiter = b"\n"

            def __init__(self):
                self.lines = []

            def lineReceived(self, line):
                self.lines.append(line)

        clock = Clock()
        decider = ScriptedDecider()
        factory = PolicyFactory(decider, clock, log_requests=False)
        client = Client()
        server_protocol, client_protocol, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), lambda: client, greet=False
        )
        pump.flush()
        client.transport.write(
            fixture_bytes("rcpt").replace(b"sender=", b"answer=REJECT slow\nsender=", 1)
        )
        client.transport.write(request_bytes(answer="OK"))
        pump.flush()
        self.assertEqual(client.lines, [b"action=REJECT slow", b"", b"action=OK", b""])
        self.assertEqual(factory.in_flight, 0)


@implementer(ICheck, IDecisionListener)
class EchoCheck:
    """Answers the request's C{answer} attribute and counts the decisions."""

    def __init__(self):
        self.decisions = 0

    def check(self, request):
        return request.get("answer", "DUNNO")

    def decided(self, request, action):
        self.decisions += 1


class FuzzTests(SynchronousTestCase):
    """
    Whatever bytes a client sends, the daemon neither crashes nor writes
    anything but whole action lines, exactly one per request decided.
    """

    @given(st.lists(st.binary(max_size=300) | st.sampled_from(FRAGMENTS), max_size=30))
    @settings(max_examples=300, deadline=None)
    def test_any_bytes(self, chunks):
        """Random chunks (mixed with protocol fragments) never break a connection's replies."""
        clock = Clock()
        echo = EchoCheck()
        chain = CheckChain(
            [ChainEntry("echo", echo, 1.0, ErrorPolicy.parse("REJECT invalid"))],
            default_action=None,
            deadline=5.0,
            deadline_policy=ErrorPolicy.parse("noreply"),
            clock=clock,
        )
        factory = PolicyFactory(chain, clock, ProtocolTestCase.limits, log_requests=False)
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 40000))
        protocol.makeConnection(transport)
        with capturedLogs():
            for chunk in chunks:
                if transport.disconnecting:
                    break
                protocol.dataReceived(chunk)
        written = transport.value()
        replies = written.split(b"\n\n")
        self.assertEqual(replies[-1], b"")
        for reply in replies[:-1]:
            self.assertTrue(reply.startswith(b"action="), written)
            self.assertGreater(len(reply), len(b"action="))
            self.assertNotIn(b"\n", reply)
            self.assertNotIn(b"\r", reply)
        self.assertEqual(len(replies) - 1, echo.decisions)
        self.assertEqual(clock.getDelayedCalls()[1:], [])
