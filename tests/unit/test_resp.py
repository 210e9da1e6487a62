"""
Tests for pfxpold's own Redis client (pfxpold.state.resp) and the Redis
store's use of it, with StringTransport and a Clock: no Redis needed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.config import CheckOptions
from pfxpold.state import Counter
from pfxpold.state.redis import CONSUME, RedisStore
from pfxpold.state.resp import (
    ProtocolError,
    RedisError,
    RedisProtocol,
    RedisTimeout,
    RedisUnavailable,
    encode_command,
    parse_reply,
)


class EncodingTests(SynchronousTestCase):
    """
    RESP encoding and parsing.
    """

    def test_encode(self) -> None:
        """
        Commands are arrays of bulk strings, so a value with CR LF cannot
        inject a second command.
        """
        self.assertEqual(
            encode_command(("GET", "a\r\nFLUSHALL", 5)),
            b"*3\r\n$3\r\nGET\r\n$11\r\na\r\nFLUSHALL\r\n$1\r\n5\r\n",
        )

    def test_parse(self) -> None:
        """
        Every RESP2 type parses, nested arrays included.
        """
        data = b"*4\r\n:1\r\n$3\r\nabc\r\n$-1\r\n*1\r\n+OK\r\n"
        self.assertEqual(parse_reply(data), ([1, b"abc", None, [b"OK"]], len(data)))
        reply, _ = parse_reply(b"-NOSCRIPT No matching script\r\n")
        self.assertIsInstance(reply, RedisError)

    def test_garbage(self) -> None:
        """
        Something that is not RESP is a protocol error.
        """
        self.assertRaises(ProtocolError, parse_reply, b"?what\r\n")
        self.assertRaises(ProtocolError, parse_reply, b"$abc\r\n")


class ProtocolTests(SynchronousTestCase):
    """
    One connection: pipelining, errors, loss.
    """

    def setUp(self) -> None:
        self.protocol = RedisProtocol()
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def test_pipelined_in_order(self) -> None:
        """
        Commands are written at once and replies matched in order, even
        when they arrive in pieces.
        """
        first = self.protocol.execute("GET", "a")
        second = self.protocol.execute("GET", "b")
        self.assertEqual(self.transport.value().count(b"GET"), 2)
        self.protocol.dataReceived(b"$1\r\nx\r")
        self.assertNoResult(first)
        self.protocol.dataReceived(b"\n-ERR no\r\n")
        self.assertEqual(self.successResultOf(first), b"x")
        self.failureResultOf(second, RedisError)

    def test_cancelled_reply_skipped(self) -> None:
        """
        The reply of a cancelled command is dropped; the next command gets
        its own reply.
        """
        first = self.protocol.execute("GET", "a")
        second = self.protocol.execute("GET", "b")
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.protocol.dataReceived(b":1\r\n:2\r\n")
        self.assertEqual(self.successResultOf(second), 2)

    def test_connection_lost(self) -> None:
        """
        Commands waiting when the connection is lost fail; later ones fail
        at once.
        """
        pending = self.protocol.execute("GET", "a")
        self.protocol.connectionLost(None)
        self.failureResultOf(pending, RedisUnavailable)
        self.failureResultOf(self.protocol.execute("GET", "a"), RedisUnavailable)

    def test_garbage_drops_connection(self) -> None:
        """
        A reply that is not RESP drops the connection.
        """
        self.protocol.execute("GET", "a")
        self.protocol.dataReceived(b"?\r\n")
        self.assertTrue(self.transport.disconnecting)


class StoreTests(SynchronousTestCase):
    """
    The Redis store over a connection driven by hand.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.store = RedisStore(
            CheckOptions(
                {"endpoint": "tcp:host=127.0.0.1:port=6379", "timeout": 2.0},
                name="stores.r",
                reactor=self.reactor,
            )
        )

    def connect(self) -> tuple[RedisProtocol, StringTransport]:
        self.store.startService()
        self.addCleanup(self.store.stopService)
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 6379))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def consume(self) -> Any:
        counter = Counter("k", ("k",), 5, 1000.0)
        return self.store.consume([counter], 1, 10.0)

    def test_waits_for_first_connection(self) -> None:
        """
        Right after start, an operation waits for the first connection
        instead of failing, and is sent once it is made.
        """
        self.store.startService()
        self.addCleanup(self.store.stopService)
        result = self.consume()
        self.assertNoResult(result)
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIn(b"EVALSHA", transport.value())
        protocol.dataReceived(b"*2\r\n:1\r\n:1\r\n")
        self.assertTrue(self.successResultOf(result).allowed)

    def test_first_connection_too_slow(self) -> None:
        """
        When the first connection does not come within the timeout, the
        waiting operation fails, and later ones fail at once.
        """
        self.store.startService()
        self.addCleanup(self.store.stopService)
        first = self.consume()
        self.reactor.advance(2.0)
        self.failureResultOf(first, RedisUnavailable)
        self.failureResultOf(self.consume(), RedisUnavailable)

    def test_down_fails_at_once(self) -> None:
        """
        Once the connection is lost, an operation fails at once instead of
        queueing.
        """
        protocol, transport = self.connect()
        protocol.connectionLost(None)
        self.failureResultOf(self.consume(), RedisUnavailable)

    def test_evalsha_then_eval(self) -> None:
        """
        The script runs by digest; on NOSCRIPT it is sent whole, and the
        reply becomes a Consumption.
        """
        protocol, transport = self.connect()
        result = self.consume()
        self.assertIn(b"EVALSHA", transport.value())
        transport.clear()
        protocol.dataReceived(b"-NOSCRIPT No matching script\r\n")
        self.assertIn(CONSUME.encode(), transport.value())
        protocol.dataReceived(b"*2\r\n:1\r\n:1\r\n")
        consumption = self.successResultOf(result)
        self.assertEqual((consumption.allowed, consumption.totals), (True, (1,)))

    def test_timeout_drops_connection(self) -> None:
        """
        A command Redis does not answer in time fails with RedisTimeout and
        drops the connection, so it is made anew.
        """
        protocol, transport = self.connect()
        result = self.consume()
        self.reactor.advance(2.0)
        self.failureResultOf(result, RedisTimeout)
        self.assertTrue(transport.disconnecting)

    def test_one_timer_for_many_commands(self) -> None:
        """
        However many commands wait, one timer times them out, each at its
        own deadline (2 s after it was sent), in the order they were sent.
        """
        protocol, transport = self.connect()
        first = self.consume()
        self.reactor.advance(1.0)
        second = self.consume()
        third = self.consume()
        self.assertEqual(len(self.pending_timers()), 1)
        self.reactor.advance(1.0)
        self.failureResultOf(first, RedisTimeout)
        self.assertNoResult(second)
        self.assertNoResult(third)
        self.reactor.advance(1.0)
        self.failureResultOf(second, RedisTimeout)
        self.failureResultOf(third, RedisTimeout)
        self.assertEqual(self.pending_timers(), [])

    def test_answered_commands_do_not_time_out(self) -> None:
        """
        Commands answered in time are forgotten: nothing fails at their
        deadline, the connection stays, and the timer goes once due.
        """
        protocol, transport = self.connect()
        results = [self.consume() for _ in range(3)]
        protocol.dataReceived(b"*2\r\n:1\r\n:1\r\n" * 3)
        self.reactor.advance(1.0)
        late = self.consume()
        self.reactor.advance(1.0)
        for result in results:
            self.assertTrue(self.successResultOf(result).allowed)
        self.assertFalse(transport.disconnecting)
        self.assertNoResult(late)
        protocol.dataReceived(b"*2\r\n:1\r\n:1\r\n")
        self.reactor.advance(1.0)
        self.assertTrue(self.successResultOf(late).allowed)
        self.assertEqual(self.pending_timers(), [])

    def test_lost_connection_stops_the_timer(self) -> None:
        """
        When the connection is lost, its waiting commands fail as lost and
        its timer is cancelled.
        """
        protocol, transport = self.connect()
        result = self.consume()
        protocol.connectionLost(None)
        self.failureResultOf(result, RedisUnavailable)
        self.assertEqual(self.pending_timers(), [])

    def pending_timers(self) -> list[Any]:
        """
        The reactor's pending calls, other than the client's reconnection.
        """
        return [
            call
            for call in self.reactor.getDelayedCalls()
            if call.active() and getattr(call.func, "__name__", "") == "_due"
        ]

