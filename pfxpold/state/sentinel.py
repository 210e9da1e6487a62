"""
Redis Sentinel: the master of a Redis group found through its sentinels,
and followed when they fail it over.

L{SentinelEndpoint} is a client endpoint: each connection it makes first
asks the sentinels, one after another, for the master's address
(C{SENTINEL GET-MASTER-ADDR-BY-NAME}), then connects there. The
L{RedisClient} that uses it confirms with C{ROLE} that the server it
reached is a master before sending it anything, so a sentinel that has
not yet heard of a failover costs a retry, not a write to a replica.

The master connection is dropped, and so made again through the
sentinels, when:
  - a sentinel publishes C{+switch-master} for this master (L{SentinelWatch}
    keeps one subscription to one sentinel at a time);
  - the old master drops its clients (Sentinel tells it to when it turns
    it into a replica) or dies;
  - the server answers C{READONLY} (it is a replica now).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from pfxpold.state.redisconfig import Address
from pfxpold.state.resp import RedisError, RedisProtocol, RedisUnavailable

#: The channel on which sentinels announce a new master.
SWITCH_MASTER = "+switch-master"
#: The channel on which the sentinel that leads a failover announces the
#: replica it promoted, before the others switch.
PROMOTED = "+promoted-slave"


def parse_master_address(reply: Any) -> Optional[Address]:
    """
    The address in a C{SENTINEL GET-MASTER-ADDR-BY-NAME} reply: a
    two-element array (host, port), or nil when the sentinel does not know
    the master.

    @raise ValueError: when the reply is neither.
    """
    if reply is None:
        return None
    if (
        not isinstance(reply, list)
        or len(reply) != 2
        or not all(isinstance(item, bytes) for item in reply)
    ):
        raise ValueError(f"not a master address: {reply!r}")
    host = reply[0].decode("ascii", "replace")
    try:
        port = int(reply[1])
    except ValueError:
        raise ValueError(f"not a port: {reply[1]!r}") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"not a master address: {reply!r}")
    return Address(host, port)


def parse_switch_master(payload: bytes) -> Optional[tuple[str, Address]]:
    """
    A C{+switch-master} message (C{NAME OLDHOST OLDPORT NEWHOST NEWPORT})
    as the master's name and its new address; L{None} when malformed.
    """
    parts = payload.decode("utf-8", "replace").split()
    if len(parts) != 5 or not parts[4].isdigit():
        return None
    return parts[0], Address(parts[3], int(parts[4]))


def parse_promoted(payload: bytes) -> Optional[tuple[str, Address]]:
    """
    A C{+promoted-slave} message (C{slave NAME HOST PORT @ MASTER MHOST
    MPORT}) as the master's name and the promoted replica's address;
    L{None} when malformed.
    """
    parts = payload.decode("utf-8", "replace").split()
    if len(parts) != 8 or parts[0] != "slave" or parts[4] != "@" or not parts[3].isdigit():
        return None
    return parts[5], Address(parts[2], int(parts[3]))


async def _ask_once(
    endpoint: IStreamClientEndpoint,
    reactor: Any,
    timeout: float,
    credentials: tuple[str, ...],
    command: tuple[Any, ...],
) -> Any:
    """
    Connect, authenticate if asked, send one command, disconnect: all
    within C{timeout} seconds.
    """
    factory = Factory.forProtocol(RedisProtocol)
    factory.noisy = False
    connecting = endpoint.connect(factory)
    connecting.addTimeout(timeout, reactor)
    protocol: Any = await connecting
    try:
        if credentials:
            auth = protocol.execute("AUTH", *credentials)
            auth.addTimeout(timeout, reactor)
            await auth
        reply = protocol.execute(*command)
        reply.addTimeout(timeout, reactor)
        return await reply
    finally:
        protocol.transport.loseConnection()


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    Connects to the master the sentinels name now.

    @ivar current: the address of the master last connected to.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        sentinels: Sequence[Address],
        master_name: str,
        connect: Callable[[Address], IStreamClientEndpoint],
        timeout: float,
        credentials: tuple[str, ...] = (),
        description: str = "Redis",
    ) -> None:
        """
        @param connect: makes the endpoint of an address (a sentinel's or
            the master's): TCP or TLS.
        @param credentials: C{AUTH}'s arguments for the sentinels, if they
            want any.
        """
        self.reactor = reactor
        self.sentinels = list(sentinels)
        self.master_name = master_name
        self._connect = connect
        self.timeout = timeout
        self.credentials = credentials
        self.description = description
        self.current: Optional[Address] = None
        #: Where a sentinel said the master went (tried first, once).
        self.hint: Optional[Address] = None
        self._failing = False

    async def master_address(self) -> Address:
        """
        Ask the sentinels in turn for the master's address; the one that
        answered is asked first next time.

        @raise RedisUnavailable: when none can say.
        """
        problems = []
        for index, sentinel in enumerate(list(self.sentinels)):
            try:
                reply = await _ask_once(
                    self._connect(sentinel),
                    self.reactor,
                    self.timeout,
                    self.credentials,
                    ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name),
                )
                address = parse_master_address(reply)
            except (RedisError, ValueError) as e:
                problems.append(f"{sentinel}: {e}")
                continue
            except Exception as e:
                problems.append(f"{sentinel}: {e.__class__.__name__} {e}".rstrip())
                continue
            if address is None:
                problems.append(f"{sentinel}: does not know master {self.master_name}")
                continue
            if index:
                self.sentinels.insert(0, self.sentinels.pop(index))
            self._failing = False
            return address
        problem = "no sentinel named the master (" + "; ".join(problems) + ")"
        if not self._failing:
            # Once per outage: the retries every second or so are not news.
            self._failing = True
            self._log.error(
                "{description}: {problem}", description=self.description, problem=problem
            )
        raise RedisUnavailable(problem)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        async def connect() -> Any:
            hint, self.hint = self.hint, None
            # A hint from a sentinel's message saves asking; ROLE confirms it.
            address = hint if hint is not None else await self.master_address()
            if address != self.current:
                self._log.info(
                    "{description}: the sentinels name {address} as the master",
                    description=self.description,
                    address=str(address),
                )
            self.current = address
            return await self._connect(address).connect(protocolFactory)

        return Deferred.fromCoroutine(connect())


class SentinelWatch(ClientService):
    """
    A subscription to C{+switch-master} and C{+promoted-slave} on one
    sentinel (the store keeps one per sentinel, since only the leader of
    a failover announces the promotion): C{switched} is called at once
    when the master of C{master_name} moves, instead of when the old one
    drops its clients.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        sentinels: Sequence[Address],
        master_name: str,
        connect: Callable[[Address], IStreamClientEndpoint],
        timeout: float,
        switched: Callable[[Address], None],
        credentials: tuple[str, ...] = (),
        description: str = "Redis",
    ) -> None:
        factory = Factory.forProtocol(RedisProtocol)
        factory.noisy = False
        super().__init__(
            _RotatingEndpoint(sentinels, connect),
            factory,
            retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=2.0, factor=2.0),
            clock=reactor,
            prepareConnection=lambda protocol: Deferred.fromCoroutine(self._subscribe(protocol)),
        )
        self.reactor = reactor
        self.master_name = master_name
        self.timeout = timeout
        self.switched = switched
        self.credentials = credentials
        self.description = description

    async def _subscribe(self, protocol: Any) -> None:
        try:
            if self.credentials:
                auth = protocol.execute("AUTH", *self.credentials)
                auth.addTimeout(self.timeout, self.reactor)
                await auth
            for channel in (SWITCH_MASTER, PROMOTED):
                subscribed = protocol.subscribe(channel, self._message)
                subscribed.addTimeout(self.timeout, self.reactor)
                await subscribed
        except BaseException:
            # See RedisClient._prepare: close it without telling
            # ClientService, which would fail on it.
            if hasattr(protocol, "_lostNotification"):
                protocol._lostNotification = lambda reason: None
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            raise

    def _message(self, channel: bytes, payload: bytes) -> None:
        if channel == PROMOTED.encode("ascii"):
            switch = parse_promoted(payload)
        else:
            switch = parse_switch_master(payload)
        if switch is None or switch[0] != self.master_name:
            return
        self._log.info(
            "{description}: the sentinels switched the master to {address}",
            description=self.description,
            address=str(switch[1]),
        )
        self.switched(switch[1])


@implementer(IStreamClientEndpoint)
class _RotatingEndpoint:
    """
    Connects to each of several addresses in turn, one per connection.
    """

    def __init__(
        self, addresses: Sequence[Address], connect: Callable[[Address], IStreamClientEndpoint]
    ) -> None:
        self._addresses = list(addresses)
        self._connect = connect
        self._next = 0

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        address = self._addresses[self._next % len(self._addresses)]
        self._next += 1
        return self._connect(address).connect(protocolFactory)
