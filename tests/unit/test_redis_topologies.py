"""
Tests for the Redis store's Sentinel and Cluster support and its settings
(pfxpold.state.sentinel, cluster, redisconfig): parsing, slot placement,
redirections and configuration errors, with fake transports and a Clock.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.config import CheckOptions, ConfigError
from pfxpold.state.cluster import (
    REFRESH_INTERVAL,
    TRYAGAIN_DELAY,
    ClusterClient,
    command_key,
    crc16,
    key_slot,
    parse_redirection,
    parse_slots,
)
from pfxpold.state.redis import RedisStore
from pfxpold.state.redisconfig import Address, parse_address, read_settings
from pfxpold.state.resp import RedisClient, RedisError, RedisUnavailable, encode_command
from pfxpold.state.sentinel import (
    SentinelEndpoint,
    parse_master_address,
    parse_promoted,
    parse_switch_master,
)
from tests.unit.tempdir import temporary_directory


class SlotTests(SynchronousTestCase):
    """
    Key placement on a cluster, as Redis computes it.
    """

    def test_crc16(self) -> None:
        """
        CRC-16/XMODEM's check value, and Redis's own CLUSTER KEYSLOT of
        "foo" (12182).
        """
        self.assertEqual(crc16(b"123456789"), 0x31C3)
        self.assertEqual(key_slot("foo"), 12182)

    def test_hash_tags(self) -> None:
        """
        The first non-empty {...} places a key; an empty one does not.
        """
        self.assertEqual(key_slot("{user1000}.following"), key_slot("user1000"))
        self.assertEqual(key_slot("foo{}{bar}"), crc16(b"foo{}{bar}") % 16384)
        self.assertEqual(key_slot("foo{{bar}}zap"), key_slot("{bar"))
        self.assertEqual(key_slot(b"x{a}y"), key_slot("a"))
        self.assertEqual(
            key_slot("pfxpold:quota:{quota:alice}:day:20261205"),
            key_slot("pfxpold:quota:{quota:alice}:sliding:17"),
        )

    def test_command_key(self) -> None:
        """
        Scripts are placed by their first key, other commands by their
        first argument; keyless commands by nothing.
        """
        self.assertEqual(command_key(("EVALSHA", "abc", 2, "k1", "k2", 5)), "k1")
        self.assertIsNone(command_key(("EVAL", "return 1", 0)))
        self.assertEqual(command_key(("HGETALL", "h")), "h")
        self.assertIsNone(command_key(("SCAN", b"0", "MATCH", "x*")))
        self.assertIsNone(command_key(("PING",)))

    def test_redirections(self) -> None:
        """
        MOVED and ASK errors give their slot and address; other errors and
        malformed ones give nothing.
        """
        self.assertEqual(
            parse_redirection("MOVED 3999 127.0.0.1:6381"),
            ("MOVED", 3999, Address("127.0.0.1", 6381)),
        )
        self.assertEqual(parse_redirection("ASK 12 [::1]:7000"), ("ASK", 12, Address("::1", 7000)))
        for message in (
            "ERR unknown",
            "MOVED abc 127.0.0.1:1",
            "MOVED 16384 127.0.0.1:1",
            "ASK 1 127.0.0.1",
            "MOVED 1 127.0.0.1:99999",
            "TRYAGAIN Multiple keys request during rehashing of slot",
        ):
            self.assertIsNone(parse_redirection(message), message)

    def test_slots_reply(self) -> None:
        """
        CLUSTER SLOTS gives ranges and masters; an empty host is the node
        that was asked; garbage is a ValueError.
        """
        reply = [
            [0, 5460, [b"127.0.0.1", 7000, b"id1"], [b"127.0.0.1", 7003, b"id4"]],
            [5461, 16383, [b"", 7001, b"id2"]],
        ]
        self.assertEqual(
            parse_slots(reply, Address("10.0.0.9", 7001)),
            [(0, 5460, Address("127.0.0.1", 7000)), (5461, 16383, Address("10.0.0.9", 7001))],
        )
        for bad in (b"OK", [[0, 99999, [b"h", 1]]], [[0, 1]], [[0, 1, [b"h", b"x"]]]):
            self.assertRaises(ValueError, parse_slots, bad, Address("h", 1))


class SentinelParsingTests(SynchronousTestCase):
    """
    What sentinels say, parsed.
    """

    def test_master_address(self) -> None:
        """
        GET-MASTER-ADDR-BY-NAME: an address, nil (unknown master), or
        garbage (a ValueError).
        """
        self.assertEqual(parse_master_address([b"127.0.0.1", b"6380"]), Address("127.0.0.1", 6380))
        self.assertIsNone(parse_master_address(None))
        for bad in (b"OK", [b"h"], [b"h", b"port"], [b"h", b"0"], [b"", b"1"], [1, 2]):
            self.assertRaises(ValueError, parse_master_address, bad)

    def test_messages(self) -> None:
        """
        +switch-master and +promoted-slave payloads give the master's name
        and new address; malformed ones nothing.
        """
        self.assertEqual(
            parse_switch_master(b"pfx 127.0.0.1 6379 127.0.0.1 6380"),
            ("pfx", Address("127.0.0.1", 6380)),
        )
        self.assertEqual(
            parse_promoted(b"slave 127.0.0.1:6380 127.0.0.1 6380 @ pfx 127.0.0.1 6379"),
            ("pfx", Address("127.0.0.1", 6380)),
        )
        self.assertIsNone(parse_switch_master(b"pfx 127.0.0.1 6379"))
        self.assertIsNone(parse_promoted(b"master pfx 127.0.0.1 6379"))

    def test_addresses(self) -> None:
        """
        host:port, [v6]:port, and a default port; anything else is a
        ValueError.
        """
        self.assertEqual(parse_address("10.0.0.1:26380", 26379), Address("10.0.0.1", 26380))
        self.assertEqual(parse_address("redis-a", 26379), Address("redis-a", 26379))
        self.assertEqual(parse_address("[::1]:7000", 1), Address("::1", 7000))
        for bad in ("::1:7000", "h:0", "h:70000", "", "[nope]:1", "a b:1"):
            self.assertRaises(ValueError, parse_address, bad, 1)


def options(table: dict[str, Any], path: str = "/etc/pfxpold.toml") -> CheckOptions:
    return CheckOptions(table, name="stores.main", reactor=MemoryReactorClock(), path=path)


class SettingsTests(SynchronousTestCase):
    """
    A Redis store's settings: each mistake is one line naming the file,
    the store and the key.
    """

    def error(self, table: dict[str, Any]) -> str:
        table = dict(table, type="redis")
        with self.assertRaises(ConfigError) as caught:
            RedisStore(options({k: v for k, v in table.items() if k != "type"}))
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("/etc/pfxpold.toml: "), message)
        self.assertIn("stores.main", message)
        return message

    def test_errors(self) -> None:
        """
        Every contradictory or malformed setting is refused by key.
        """
        cases = [
            ({"sentinels": ["h:1"]}, "master_name", "is required with sentinels"),
            ({"master_name": "m"}, "master_name", "needs sentinels"),
            ({"sentinels": ["h:1"], "master_name": "m", "endpoint": "tcp:h:1"}, "sentinels", "cannot be used with endpoint"),
            ({"sentinels": ["h:1"], "master_name": "m", "cluster_nodes": ["h:2"]}, "cluster_nodes", "cannot be used with sentinels"),
            ({"sentinels": []}, "sentinels", "at least one"),
            ({"sentinels": ["h:x"], "master_name": "m"}, "sentinels", "not host:port"),
            ({"cluster_nodes": ["h:1"], "database": 2}, "database", "database 0 only"),
            ({"username": "u"}, "username", "needs password_file"),
            ({"tls_ca_file": "/x"}, "tls_ca_file", "needs tls = true"),
            ({"tls_server_name": "r"}, "tls_server_name", "needs tls = true"),
            ({"tls": True, "tls_ca_file": "/nonexistent/ca.pem"}, "tls_ca_file", "cannot open"),
            ({"tls": True, "endpoint": "unix:/run/redis.sock"}, "tls_server_name", "is required"),
            ({"sentinel_username": "s"}, "sentinel_username", "needs sentinels"),
            ({"endpoint": "nonsense:x"}, "endpoint", "not a Twisted client endpoint"),
            ({"tls": "yes"}, "tls", "true or false"),
        ]  # fmt: skip
        for table, key, text in cases:
            message = self.error(table)
            self.assertIn(f"key '{key}': ", message, table)
            self.assertIn(text, message, table)

    def test_not_a_certificate(self) -> None:
        """
        A CA file that holds no PEM certificate is refused at load time.
        """
        path = os.path.join(temporary_directory(self), "ca.pem")
        with open(path, "w") as f:
            f.write("hello\n")
        message = self.error({"tls": True, "tls_ca_file": path})
        self.assertIn("key 'tls_ca_file': ", message)
        self.assertIn("no PEM certificate", message)

    def test_modes(self) -> None:
        """
        The mode follows the keys given; sentinel ports default to 26379.
        """
        sentinel = read_settings(options({"sentinels": ["a", "b:2"], "master_name": "m"}))
        self.assertEqual(sentinel.mode, "sentinel")
        self.assertEqual(sentinel.sentinels, (Address("a", 26379), Address("b", 2)))
        self.assertEqual(read_settings(options({"cluster_nodes": ["c"]})).mode, "cluster")
        self.assertEqual(read_settings(options({})).mode, "server")


class FakeRedis:
    """
    The connections a MemoryReactorClock was asked for, answered by hand.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.seen = 0

    def accept(self) -> tuple[tuple[str, int], Any, StringTransport]:
        host, port, factory, _, _ = self.reactor.tcpClients[self.seen]
        self.seen += 1
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return (host, port), protocol, transport


def sentinel_endpoint(
    credentials: tuple[str, ...] = (),
) -> tuple[MemoryReactorClock, FakeRedis, SentinelEndpoint]:
    """
    A L{SentinelEndpoint} for master C{m} of the sentinels 127.0.0.1:1 and
    127.0.0.1:2 (timeout 1 s), on a MemoryReactorClock whose connections
    the L{FakeRedis} answers.
    """
    reactor = MemoryReactorClock()
    settings = read_settings(
        options({"sentinels": ["127.0.0.1:1", "127.0.0.1:2"], "master_name": "m"})
    )
    endpoint = SentinelEndpoint(
        reactor,
        settings.sentinels,
        "m",
        settings.connector(reactor),
        1.0,
        credentials,
        "stores.main",
    )
    return reactor, FakeRedis(reactor), endpoint


class SentinelEndpointTests(SynchronousTestCase):
    """
    The master found through the sentinels.
    """

    def test_asks_then_connects(self) -> None:
        """
        A sentinel that does not know the master is passed over; the next
        one's answer is where the connection goes; a hint goes first.
        """
        reactor, fake, endpoint = sentinel_endpoint()
        connected = endpoint.connect(Factory.forProtocol(Protocol))
        address, protocol, transport = fake.accept()
        self.assertEqual(address, ("127.0.0.1", 1))
        self.assertIn(b"GET-MASTER-ADDR-BY-NAME", transport.value())
        protocol.dataReceived(b"*-1\r\n")
        address, protocol, transport = fake.accept()
        self.assertEqual(address, ("127.0.0.1", 2))
        protocol.dataReceived(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6390\r\n")
        address, _, _ = fake.accept()
        self.assertEqual(address, ("127.0.0.1", 6390))
        self.assertEqual(endpoint.current, Address("127.0.0.1", 6390))
        self.assertIsNotNone(self.successResultOf(connected))
        # The sentinel that answered is asked first next time.
        self.assertEqual(endpoint.sentinels[0], Address("127.0.0.1", 2))
        endpoint.hint = Address("127.0.0.1", 6391)
        endpoint.connect(Factory.forProtocol(Protocol))
        address, _, _ = fake.accept()
        self.assertEqual(address, ("127.0.0.1", 6391))

    def master_client(self) -> tuple[RedisClient, Any, StringTransport]:
        """
        A started client that wants a master, its connection and the
        connection's transport, before the server said what it is.
        """
        reactor = MemoryReactorClock()
        fake = FakeRedis(reactor)
        client = RedisClient(
            TCP4ClientEndpoint(reactor, "127.0.0.1", 6379), reactor, timeout=1.0, role="master"
        )
        client.startService()
        self.addCleanup(client.stopService)
        _, protocol, transport = fake.accept()
        self.assertEqual(transport.value(), encode_command(("ROLE",)))
        return client, protocol, transport

    def test_replica_refused(self) -> None:
        """
        A server that says it is a replica is not used: the connection
        fails and is dropped, and the reason is logged.
        """
        client, protocol, transport = self.master_client()
        protocol.dataReceived(b"*1\r\n$5\r\nslave\r\n")
        self.assertFalse(client.connected)
        self.assertTrue(transport.disconnecting)

    def test_master_accepted(self) -> None:
        """
        A server whose ROLE says master is used: the client is connected
        and commands go to it, after the ROLE question.
        """
        client, protocol, transport = self.master_client()
        self.assertFalse(client.connected)
        protocol.dataReceived(resp([b"master", 0, []]))
        self.assertTrue(client.connected)
        transport.clear()
        result = client.execute("GET", "k")
        self.assertEqual(transport.value(), encode_command(("GET", "k")))
        protocol.dataReceived(b"$1\r\n9\r\n")
        self.assertEqual(self.successResultOf(result), b"9")


def start_cluster(case: Any) -> None:
    """
    Start a cluster client of one seed node (127.0.0.1:7000) for C{case},
    on a MemoryReactorClock: C{case.reactor}, C{case.fake}, C{case.cluster},
    and the seed's connection, C{case.seed} and C{case.seed_transport}.
    """
    case.reactor = MemoryReactorClock()
    case.fake = FakeRedis(case.reactor)
    settings = read_settings(options({"cluster_nodes": ["127.0.0.1:7000"]}))
    connect = settings.connector(case.reactor)
    case.cluster = ClusterClient(
        case.reactor,
        settings.cluster_nodes,
        lambda address: RedisClient(connect(address), case.reactor, timeout=1.0),
    )
    case.cluster.startService()
    case.addCleanup(case.cluster.stopService)
    _, case.seed, case.seed_transport = case.fake.accept()


class ClusterClientTests(SynchronousTestCase):
    """
    Commands on a cluster follow MOVED and ASK.
    """

    def setUp(self) -> None:
        start_cluster(self)
        # The slot map is asked for at start; this cluster says nothing yet.
        self.assertIn(b"SLOTS", self.seed_transport.value())
        self.seed.dataReceived(b"*0\r\n")
        self.seed_transport.clear()

    def test_moved(self) -> None:
        """
        MOVED sends the command to the new node and remembers it for the
        slot (and asks for the slot map again).
        """
        result = self.cluster.execute("GET", "{a}x")
        self.assertIn(b"GET", self.seed_transport.value())
        self.seed.dataReceived(b"-MOVED %d 127.0.0.1:7001\r\n" % key_slot("a"))
        address, node, transport = self.fake.accept()
        self.assertEqual(address, ("127.0.0.1", 7001))
        self.assertIn(b"GET", transport.value())
        node.dataReceived(b"$1\r\n5\r\n")
        self.assertEqual(self.successResultOf(result), b"5")
        self.assertEqual(self.cluster.where(key_slot("a")), Address("127.0.0.1", 7001))

    def test_ask(self) -> None:
        """
        ASK sends ASKING then the command to the importing node, once: the
        slot stays where it was.
        """
        result = self.cluster.execute("GET", "{a}x")
        self.seed.dataReceived(b"-ASK %d 127.0.0.1:7002\r\n" % key_slot("a"))
        _, node, transport = self.fake.accept()
        self.assertEqual(transport.value().split(b"\r\n")[2], b"ASKING")
        node.dataReceived(b"+OK\r\n$1\r\n7\r\n")
        self.assertEqual(self.successResultOf(result), b"7")
        self.assertEqual(self.cluster.where(key_slot("a")), Address("127.0.0.1", 7000))

    def test_redirection_loop(self) -> None:
        """
        Redirections without end: after a few in a row the command waits
        50 ms and follows them again, and fails once the node's timeout
        (1 s) from its start is over, never later.
        """
        result = self.cluster.execute("GET", "{a}x")
        ask = b"-ASK %d 127.0.0.1:7000\r\n" % key_slot("a")
        self.seed.dataReceived(ask)
        for _ in range(5):
            # ASKING's own answer, then the command's.
            self.seed.dataReceived(b"+OK\r\n" + ask)
        self.assertNoResult(result)
        self.seed_transport.clear()
        self.reactor.advance(TRYAGAIN_DELAY)
        self.assertIn(b"ASKING", self.seed_transport.value())
        while not result.called:
            self.assertLessEqual(self.reactor.seconds(), 1.0)
            for _ in range(6):
                self.seed.dataReceived(b"+OK\r\n" + ask)
            self.reactor.advance(TRYAGAIN_DELAY)
        failure = self.failureResultOf(result, RedisError)
        self.assertIn("too many redirections", str(failure.value))

    def test_nodes_naming_each_other(self) -> None:
        """
        Two nodes that each answer MOVED to the other (a slot handed over
        old master first) hold the command for 50 ms, not fail it; once
        the new master owns the slot, it answers.
        """
        slot = key_slot("a")
        result = self.cluster.execute("GET", "{a}x")
        self.seed.dataReceived(b"-MOVED %d 127.0.0.1:7001\r\n" % slot)
        _, other, _ = self.fake.accept()
        for _ in range(2):
            other.dataReceived(b"-MOVED %d 127.0.0.1:7000\r\n" % slot)
            self.seed.dataReceived(b"-MOVED %d 127.0.0.1:7001\r\n" % slot)
        # The sixth redirection in a row: the command waits.
        other.dataReceived(b"-MOVED %d 127.0.0.1:7000\r\n" % slot)
        self.seed_transport.clear()
        self.reactor.advance(TRYAGAIN_DELAY / 2)
        self.assertEqual(self.seed_transport.value(), b"")
        self.reactor.advance(TRYAGAIN_DELAY / 2)
        self.assertIn(b"GET", self.seed_transport.value())
        # The hand-over is complete: the old master names the new one,
        # which answers.
        self.seed.dataReceived(b"-MOVED %d 127.0.0.1:7001\r\n" % slot)
        self.assertNoResult(result)
        other.dataReceived(b"$1\r\n5\r\n")
        self.assertEqual(self.successResultOf(result), b"5")


def resp(value: Any) -> bytes:
    """
    C{value} as a Redis reply: bytes as a bulk string, an int as an
    integer, a list as an array.
    """
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    return b"*%d\r\n" % len(value) + b"".join(resp(item) for item in value)


class SentinelDiscoveryTests(SynchronousTestCase):
    """
    The master asked of sentinels that cannot say, or do not answer.
    """

    def test_no_sentinel_knows(self) -> None:
        """
        When every sentinel fails (one refuses the login, one does not know
        the master), the connection attempt fails with RedisUnavailable
        naming each reason, logged once for the outage, not per attempt;
        the sentinels are asked with the configured credentials.
        """
        _, fake, endpoint = sentinel_endpoint(("pfx", "secret"))
        with capturedLogs() as events:
            for _ in range(2):
                connecting = endpoint.connect(Factory.forProtocol(Protocol))
                _, protocol, transport = fake.accept()
                self.assertTrue(
                    transport.value().startswith(encode_command(("AUTH", "pfx", "secret")))
                )
                protocol.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
                _, protocol, transport = fake.accept()
                protocol.dataReceived(b"+OK\r\n*-1\r\n")
                failure = self.failureResultOf(connecting, RedisUnavailable)
                self.assertIn("127.0.0.1:1: WRONGPASS", str(failure.value))
                self.assertIn("127.0.0.1:2: does not know master m", str(failure.value))
        logged = [event for event in events if "no sentinel named the master" in formatEvent(event)]
        self.assertEqual(len(logged), 1)
        self.assertIn("stores.main: ", formatEvent(logged[0]))

    def test_silent_sentinel_times_out(self) -> None:
        """
        A sentinel that does not answer is given up on after the timeout,
        and the next one is asked.
        """
        reactor, fake, endpoint = sentinel_endpoint()
        connecting = endpoint.connect(Factory.forProtocol(Protocol))
        fake.accept()
        self.assertNoResult(connecting)
        reactor.advance(1.0)
        address, protocol, _ = fake.accept()
        self.assertEqual(address, ("127.0.0.1", 2))
        protocol.dataReceived(resp([b"127.0.0.1", b"6390"]))
        address, _, _ = fake.accept()
        self.assertEqual(address, ("127.0.0.1", 6390))
        self.assertIsNotNone(self.successResultOf(connecting))


class ClusterSlotMapTests(SynchronousTestCase):
    """
    The slot map a cluster client learns with CLUSTER SLOTS, and TRYAGAIN.
    """

    def setUp(self) -> None:
        start_cluster(self)
        self.assertEqual(self.seed_transport.value(), encode_command(("CLUSTER", "SLOTS")))
        self.slot = key_slot("a")
        # This node serves every slot but "a"'s, which 7001 serves.
        self.seed.dataReceived(
            resp(
                [
                    [0, self.slot - 1, [b"", 7000, b"id0"]],
                    [self.slot, self.slot, [b"127.0.0.1", 7001, b"id1"], [b"127.0.0.1", 7004]],
                    [self.slot + 1, 16383, [b"127.0.0.1", 7000, b"id0"]],
                ]
            )
        )
        self.seed_transport.clear()
        # A client for each master in the map, connected at once.
        address, self.node, self.node_transport = self.fake.accept()
        self.assertEqual(address, ("127.0.0.1", 7001))

    def test_map_routes_commands(self) -> None:
        """
        A command goes straight to the master of its key's slot (not to a
        replica, not to the seed), and a key of another slot to the seed.
        """
        self.assertEqual(self.cluster.where(self.slot), Address("127.0.0.1", 7001))
        self.assertEqual(self.cluster.where(self.slot + 1), Address("127.0.0.1", 7000))
        result = self.cluster.execute("EVALSHA", "abc", 2, "{a}:1", "{a}:2", "x")
        self.assertEqual(self.seed_transport.value(), b"")
        self.assertIn(b"EVALSHA", self.node_transport.value())
        self.node.dataReceived(b":1\r\n")
        self.assertEqual(self.successResultOf(result), 1)
        other = self.cluster.execute("GET", "{b}")
        self.assertEqual(self.seed_transport.value(), encode_command(("GET", "{b}")))
        self.seed.dataReceived(b"$-1\r\n")
        self.assertIsNone(self.successResultOf(other))
        self.assertEqual(
            self.cluster.masters(),
            [self.cluster.node(Address("127.0.0.1", port)) for port in (7000, 7001)],
        )

    def test_moved_refreshes_the_map(self) -> None:
        """
        MOVED sends the command on at once and has the slot map read again
        (not more than once in REFRESH_INTERVAL).
        """
        self.reactor.advance(REFRESH_INTERVAL)
        result = self.cluster.execute("GET", "{b}")
        self.seed.dataReceived(b"-MOVED %d 127.0.0.1:7001\r\n" % key_slot("b"))
        self.assertEqual(self.cluster.where(key_slot("b")), Address("127.0.0.1", 7001))
        self.assertIn(b"GET", self.node_transport.value())
        self.node.dataReceived(b"$1\r\n1\r\n")
        self.assertEqual(self.successResultOf(result), b"1")
        self.assertTrue(self.seed_transport.value().endswith(encode_command(("CLUSTER", "SLOTS"))))
        # The new map agrees: "b"'s slot is 7001's now.
        moved = key_slot("b")
        self.seed.dataReceived(
            resp(
                [
                    [0, moved - 1, [b"127.0.0.1", 7000, b"id0"]],
                    [moved, moved, [b"127.0.0.1", 7001, b"id1"]],
                    [moved + 1, 16383, [b"127.0.0.1", 7000, b"id0"]],
                ]
            )
        )
        self.assertEqual(self.cluster.where(moved), Address("127.0.0.1", 7001))
        self.assertEqual(self.cluster.where(self.slot), Address("127.0.0.1", 7000))
        self.seed_transport.clear()
        self.node_transport.clear()
        # Moved back at once: followed, but the map is not read again
        # within REFRESH_INTERVAL of the last time.
        again = self.cluster.execute("GET", "{b}")
        self.node.dataReceived(b"-MOVED %d 127.0.0.1:7000\r\n" % moved)
        self.assertEqual(self.seed_transport.value(), encode_command(("GET", "{b}")))
        self.seed.dataReceived(b"$1\r\n2\r\n")
        self.assertEqual(self.successResultOf(again), b"2")
        self.assertNotIn(b"SLOTS", self.seed_transport.value() + self.node_transport.value())

    def test_tryagain(self) -> None:
        """
        A command answered TRYAGAIN (its keys half-way through a migration)
        is sent again 50 ms later to the same node, and its reply is the
        command's.
        """
        result = self.cluster.execute("EVALSHA", "abc", 2, "{b}:1", "{b}:2")
        self.seed.dataReceived(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n")
        self.seed_transport.clear()
        self.assertNoResult(result)
        self.reactor.advance(TRYAGAIN_DELAY)
        self.assertIn(b"EVALSHA", self.seed_transport.value())
        self.seed.dataReceived(b":1\r\n")
        self.assertEqual(self.successResultOf(result), 1)

    def test_tryagain_after_ask(self) -> None:
        """
        TRYAGAIN from the node an ASK sent the command to: sent again there,
        after ASKING again (the slot is still the other node's).
        """
        result = self.cluster.execute("EVALSHA", "abc", 2, "{b}:1", "{b}:2")
        self.seed.dataReceived(b"-ASK %d 127.0.0.1:7002\r\n" % key_slot("b"))
        _, node, transport = self.fake.accept()
        node.dataReceived(b"+OK\r\n-TRYAGAIN Multiple keys request during rehashing of slot\r\n")
        transport.clear()
        self.reactor.advance(TRYAGAIN_DELAY)
        commands = transport.value()
        self.assertTrue(commands.startswith(encode_command(("ASKING",))), commands)
        self.assertIn(b"EVALSHA", commands)
        node.dataReceived(b"+OK\r\n:1\r\n")
        self.assertEqual(self.successResultOf(result), 1)
        self.assertEqual(self.cluster.where(key_slot("b")), Address("127.0.0.1", 7000))

    def test_tryagain_bounded(self) -> None:
        """
        A command answered TRYAGAIN again and again fails with it once the
        node's timeout has passed since it was first sent: never longer,
        and it was tried no more than every 50 ms meanwhile.
        """
        result = self.cluster.execute("EVALSHA", "abc", 1, "{b}:1")
        tries = 0
        while not result.called:
            self.assertLessEqual(self.reactor.seconds(), 1.0)
            self.assertIn(b"EVALSHA", self.seed_transport.value())
            self.seed_transport.clear()
            tries += 1
            self.seed.dataReceived(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n")
            self.reactor.advance(TRYAGAIN_DELAY)
        failure = self.failureResultOf(result, RedisError)
        self.assertIn("TRYAGAIN", str(failure.value))
        self.assertLessEqual(tries, 1.0 / TRYAGAIN_DELAY)
        self.assertGreater(tries, 1)

    def test_map_failure_logged_once(self) -> None:
        """
        A slot map that no node gives (every command failing on a cluster
        that cannot be reached asks for it again) is logged once per
        outage, with the reason, not at every refresh; reading it again is
        logged, and a later outage is logged again.
        """
        with capturedLogs() as events:
            for answer in (b"-ERR first\r\n", b"-ERR again\r\n", b"*0\r\n", b"-ERR later\r\n"):
                self.reactor.advance(REFRESH_INTERVAL)
                self.cluster.refresh()
                self.assertEqual(self.seed_transport.value(), encode_command(("CLUSTER", "SLOTS")))
                self.seed_transport.clear()
                self.seed.dataReceived(answer)
                if answer.startswith(b"-"):
                    # The other master known is asked next.
                    self.assertEqual(
                        self.node_transport.value(), encode_command(("CLUSTER", "SLOTS"))
                    )
                    self.node_transport.clear()
                    self.node.dataReceived(b"-ERR other\r\n")
        lines = [formatEvent(event) for event in events]
        failures = [line for line in lines if "no node gave the slot map" in line]
        self.assertEqual(len(failures), 2, lines)
        self.assertIn("127.0.0.1:7000: ERR first; 127.0.0.1:7001: ERR other", failures[0])
        self.assertIn("ERR later", failures[1])
        self.assertEqual(
            [line for line in lines if "slot map read again" in line],
            ["Redis Cluster: slot map read again, from 127.0.0.1:7000"],
        )
