"""
A small Twisted-native Redis client: the RESP2 protocol, pipelined on one
connection kept up by a L{ClientService}.

pfxpold needs a handful of commands (EVALSHA, EVAL, AUTH, SELECT, PING, ROLE),
every one bounded in time: a command sent while Redis is unreachable fails
at once with L{RedisUnavailable}, a command Redis does not answer within
the timeout fails with L{RedisTimeout} and drops the connection (which is
then re-made), and a command whose caller gave up (the check's timeout
cancelled it) is simply forgotten when its reply comes. It takes its
reactor from the caller, so tests drive it with a Clock and
L{twisted.internet.testing.StringTransport}.

Why pfxpold keeps its own client (issue 15, decided on what was measured
and read): redis-py 8.2, the well-kept client that does Sentinel and
Cluster, offers a blocking API and an asyncio one. The blocking one would
put every command on a thread (a thread hop per check, a bounded pool
that a frozen Redis fills). The asyncio one runs only under Twisted's
asyncio reactor (twistd's default here is epoll, and every worker would
have to switch), keeps its timeouts on asyncio's loop clock, so tests
could no longer drive them with a L{Clock}, and its cluster and connection
modules alone are some 10,000 lines, for the few commands pfxpold sends.
txredisapi, the Twisted-native one, does Sentinel but not Redis Cluster
(its sharding is its own consistent hashing, not Cluster's slots). What Sentinel and Cluster need on top of this client is
small and testable with fake transports: finding the master (a client
endpoint, L{pfxpold.state.sentinel}), a slot map with MOVED/ASK/TRYAGAIN
(L{pfxpold.state.cluster}), and TLS and ACL logins, which are Twisted's
own TLS endpoints and one C{AUTH} form. A down store still fails a command
at once and a silent one within the timeout, on every path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Optional, Union

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfxpold.escape import escape
from pfxpold.state import StoreError

#: The longest bulk reply or array we accept; pfxpold's replies are tiny.
MAX_REPLY = 1024 * 1024


class RedisError(StoreError):
    """
    Redis answered with an error reply (C{-ERR ...}).
    """


class RedisUnavailable(StoreError):
    """
    There is no connection to Redis right now.
    """


class RedisTimeout(StoreError):
    """
    Redis did not answer in time.
    """


class ProtocolError(Exception):
    """
    Redis sent something that is not RESP.
    """


Reply = Union[bytes, int, None, list[Any], RedisError]


def encode_command(arguments: tuple[Any, ...]) -> bytes:
    """
    A command as a RESP array of bulk strings (binary safe: no argument can
    inject a second command).
    """
    parts = [b"*%d\r\n" % len(arguments)]
    for argument in arguments:
        if isinstance(argument, bytes):
            data = argument
        elif isinstance(argument, str):
            data = argument.encode("utf-8")
        elif isinstance(argument, (int, float)):
            data = repr(argument).encode("ascii")
        else:
            raise TypeError(f"cannot send {argument!r} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    pass


def parse_reply(data: bytes, position: int = 0) -> tuple[Reply, int]:
    """
    Parse one RESP2 reply from C{data} at C{position}.

    @return: the reply and the position after it.
    @raise _Incomplete: when C{data} does not hold all of it yet.
    @raise ProtocolError: when it is not RESP.
    """
    end = data.find(b"\r\n", position)
    if end < 0:
        if len(data) - position > MAX_REPLY:
            raise ProtocolError("reply line too long")
        raise _Incomplete()
    kind = data[position : position + 1]
    line = data[position + 1 : end]
    after = end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), after
    try:
        number = int(line)
    except ValueError:
        raise ProtocolError(f"bad length or integer {line[:40]!r}") from None
    if kind == b":":
        return number, after
    if kind == b"$":
        if number < 0:
            return None, after
        if number > MAX_REPLY:
            raise ProtocolError("bulk reply too long")
        if len(data) < after + number + 2:
            raise _Incomplete()
        return data[after : after + number], after + number + 2
    if kind == b"*":
        if number < 0:
            return None, after
        if number > MAX_REPLY:
            raise ProtocolError("array reply too long")
        items = []
        for _ in range(number):
            item, after = parse_reply(data, after)
            items.append(item)
        return items, after
    raise ProtocolError(f"unknown reply type {kind!r}")


class RedisProtocol(Protocol):
    """
    One connection to Redis: commands are written at once (pipelined) and
    their replies matched in order.
    """

    _log = Logger()
    # A TCP (or TLS, or UNIX) transport, which can abort.
    transport: Any

    def __init__(self) -> None:
        self._buffer = b""
        self._pending: deque[Deferred[Any]] = deque()
        self.connected_ = False
        #: Called with the reason when the connection is lost.
        self.on_lost: Optional[Callable[[Optional[Failure]], None]] = None
        #: Called with each published message (channel, payload) once the
        #: connection has subscribed (see L{subscribe}).
        self.on_message: Optional[Callable[[bytes, bytes], None]] = None

    def connectionMade(self) -> None:
        self.connected_ = True

    def notify_lost(self, callback: Callable[[Optional[Failure]], None]) -> None:
        """
        Have C{callback} called when the connection is lost. (A method, not
        an attribute to set: L{ClientService} hands out a proxy of the
        protocol, which forwards calls but not attribute assignments.)
        """
        self.on_lost = callback

    def subscribe(self, channel: str, callback: Callable[[bytes, bytes], None]) -> Deferred[Any]:
        """
        Subscribe to C{channel}: C{callback} is then called with the
        channel and payload of every message published on it, and the
        connection is used for nothing else.

        @return: a Deferred that fires when Redis confirms.
        """
        self.on_message = callback
        return self.execute("SUBSCRIBE", channel)

    def execute(self, *arguments: Any) -> Deferred[Any]:
        """
        Send a command.

        @return: a Deferred that fires with its reply, or fails with
            L{RedisError} for an error reply or L{RedisUnavailable} when the
            connection is lost first.
        """
        if not self.connected_:
            return fail(RedisUnavailable("not connected to Redis"))
        d: Deferred[Any] = Deferred()
        self._pending.append(d)
        self.transport.write(encode_command(arguments))
        return d

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        position = 0
        try:
            while position < len(self._buffer):
                try:
                    reply, position = parse_reply(self._buffer, position)
                except _Incomplete:
                    break
                if (
                    self.on_message is not None
                    and isinstance(reply, list)
                    and len(reply) == 3
                    and reply[0] == b"message"
                ):
                    self.on_message(reply[1], reply[2])
                    continue
                if not self._pending:
                    raise ProtocolError("a reply nobody asked for")
                d = self._pending.popleft()
                if d.called:
                    # The caller gave up (cancelled or timed out).
                    continue
                if isinstance(reply, RedisError):
                    d.errback(reply)
                else:
                    d.callback(reply)
        except ProtocolError as e:
            self._log.error("Redis sent garbage ({reason}); reconnecting", reason=escape(str(e)))
            self._buffer = b""
            self.transport.abortConnection()
            return
        self._buffer = self._buffer[position:]

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.connected_ = False
        pending, self._pending = self._pending, deque()
        why = "connection to Redis lost"
        if reason is not None and not reason.check(ConnectionDone):
            # A TLS handshake that failed says why here, and only here.
            why += f": {reason.getErrorMessage()}"
        for d in pending:
            if not d.called:
                d.errback(RedisUnavailable(why))
        if self.on_lost is not None:
            self.on_lost(reason)


class _Deadlines:
    """
    The timeouts of one connection's commands, kept by one timer.

    Redis answers a connection's commands in the order they were sent, so
    the oldest unanswered command is always the next one due: one timer,
    set for it, does what a timer per command did (a C{DelayedCall} made
    and cancelled for every command, on the reactor's heap). Commands are
    forgotten from the front as they are answered.

    @param expired: called with each command's Deferred that is still
        unanswered at its deadline.
    """

    def __init__(
        self, clock: Any, timeout: float, expired: Callable[[Deferred[Any]], None]
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._expired = expired
        self._waiting: deque[tuple[float, Deferred[Any]]] = deque()
        self._timer: Any = None

    def track(self, d: Deferred[Any]) -> None:
        """
        Time out C{d} unless it fires within the timeout from now.
        """
        waiting = self._waiting
        while waiting and waiting[0][1].called:
            waiting.popleft()
        waiting.append((self._clock.seconds() + self._timeout, d))
        if self._timer is None:
            self._timer = self._clock.callLater(self._timeout, self._due)

    def _due(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        waiting = self._waiting
        while waiting and (waiting[0][1].called or waiting[0][0] <= now):
            _, d = waiting.popleft()
            if not d.called:
                self._expired(d)
        if waiting and self._timer is None:
            self._timer = self._clock.callLater(max(0.0, waiting[0][0] - now), self._due)

    def stop(self) -> None:
        """
        Forget every command (the connection is gone: they have failed).
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting.clear()


def _quick_policy(max_delay: float) -> Callable[[int], float]:
    import random

    def delay(attempt: int) -> float:
        if attempt <= 1:
            return 0.0
        return min(0.1 * 2 ** (attempt - 2), max_delay) + random.random() * 0.1

    return delay


class RedisClient(ClientService):
    """
    A connection to Redis that is re-made whenever it is lost.

    @ivar timeout: seconds a command may take before it fails.
    """

    _log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        reactor: Any,
        timeout: float = 5.0,
        password: Optional[str] = None,
        database: int = 0,
        description: str = "Redis",
        username: Optional[str] = None,
        role: Optional[str] = None,
        ping: bool = False,
        max_retry_delay: float = 5.0,
        quick_retry: bool = False,
    ) -> None:
        """
        @param username: the ACL user (C{AUTH username password}); without
            it, C{AUTH password} (the C{default} user).
        @param role: the role (C{b"master"}) the server must say it has
            (C{ROLE}) before the connection is used: a server found through
            Sentinel may have become a replica since.
        @param ping: send a C{PING} before the connection is used, so that
            a TLS handshake that fails is seen (and logged) as a failed
            connection, not as a connection lost at the first command.
        @param max_retry_delay: the longest wait between two attempts to
            connect.
        @param quick_retry: try again at once after a lost connection, then
            after 0.1 s, 0.2 s, ... (with at most 0.1 s of jitter), rather
            than after Twisted's default backoff, whose jitter alone may be
            a second: for a master that a failover moved, whose new address
            is known at once.
        """
        factory = Factory.forProtocol(RedisProtocol)
        # Connection changes are logged by this client, once and by name.
        factory.noisy = False
        super().__init__(
            endpoint,
            factory,
            retryPolicy=(
                _quick_policy(max_retry_delay)
                if quick_retry
                else backoffPolicy(initialDelay=0.2, maxDelay=max_retry_delay, factor=2.0)
            ),
            clock=reactor,
            prepareConnection=lambda protocol: Deferred.fromCoroutine(self._prepare(protocol)),
        )
        self.reactor = reactor
        self.timeout = timeout
        self.password = password
        self.username = username
        self.database = database
        self.description = description
        self.role = role
        self.ping = ping
        self._protocol: Any = None
        #: The command timeouts of each connection, by the connection.
        self._deadlines: dict[Any, _Deadlines] = {}
        self._was_lost = False
        self._ever_connected = False
        self._gave_up_waiting = False
        #: The last reason a connection could not be used, logged once.
        self._last_problem: Optional[str] = None
        #: Services to run beside this client (a Sentinel subscription).
        self.companions: list[Any] = []

    async def _prepare(self, protocol: Any) -> None:
        try:
            if self.password is not None:
                credentials = (self.username, self.password) if self.username else (self.password,)
                try:
                    await self._bounded(protocol.execute("AUTH", *credentials), protocol)
                except RedisError as e:
                    raise RedisError(f"authentication failed: {e}") from None
            if self.database:
                await self._bounded(protocol.execute("SELECT", self.database), protocol)
            if self.role is not None:
                reply = await self._bounded(protocol.execute("ROLE"), protocol)
                role = reply[0] if isinstance(reply, list) and reply else reply
                if role != self.role.encode("ascii"):
                    shown = role.decode("ascii", "replace") if isinstance(role, bytes) else role
                    raise RedisUnavailable(f"the server is a {shown}, not a {self.role}")
            elif self.ping:
                await self._bounded(protocol.execute("PING"), protocol)
        except BaseException as e:
            # The connection is dropped; its lost callback is not set yet.
            # ClientService leaves a connection whose preparation failed
            # open, and fails (NoTransition) when it is closed later while
            # waiting to retry: close it without telling ClientService.
            self._forget(protocol)
            if hasattr(protocol, "_lostNotification"):
                protocol._lostNotification = lambda reason: None
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            problem = str(e) or type(e).__name__
            if problem != self._last_problem:
                self._last_problem = problem
                self._log.error(
                    "{description}: cannot use the connection: {problem}",
                    description=self.description,
                    problem=problem,
                )
            raise
        self._last_problem = None
        self._protocol = protocol
        self._ever_connected = True
        self._log.info(
            "{description}: {what}",
            description=self.description,
            what="reconnected" if self._was_lost else "connected",
        )

        def connection_lost(reason: Optional[Failure]) -> None:
            self._forget(protocol)
            if self._protocol is protocol:
                self._protocol = None
                self._was_lost = True
                if self.running:
                    self._log.warn(
                        "{description}: connection lost; reconnecting", description=self.description
                    )

        protocol.notify_lost(connection_lost)

    def drop(self) -> None:
        """
        Drop the current connection (the server is no longer the one to
        use): it is made again, to wherever the endpoint leads now.
        """
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()

    def _forget(self, protocol: Any) -> None:
        """
        Stop timing the commands of a connection that is gone.
        """
        deadlines = self._deadlines.pop(protocol, None)
        if deadlines is not None:
            deadlines.stop()

    def _bounded(self, d: Deferred[Any], protocol: Any) -> Deferred[Any]:
        """
        Fail C{d}, a command sent on C{protocol}, with L{RedisTimeout} if
        Redis does not answer it within the timeout.
        """
        deadlines = self._deadlines.get(protocol)
        if deadlines is None:

            def expired(command: Deferred[Any]) -> None:
                # A Redis that stopped answering: drop the connection so
                # that the replies of later commands cannot be late too.
                if protocol.transport is not None:
                    protocol.transport.abortConnection()
                command.errback(RedisTimeout(f"{self.description}: no answer in {self.timeout}s"))

            deadlines = self._deadlines[protocol] = _Deadlines(self.reactor, self.timeout, expired)
        deadlines.track(d)
        return d

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    def execute(self, *arguments: Any) -> Deferred[Any]:
        """
        Send a command on the current connection.

        @return: a Deferred that fires with its reply, or fails with a
            L{StoreError} (at once when there is no connection).
        """
        protocol = self._protocol
        if protocol is None:
            if self.running and not self._ever_connected and not self._gave_up_waiting:
                return self._after_first_connection(arguments)
            return fail(RedisUnavailable(f"{self.description}: not connected"))
        d = self._bounded(protocol.execute(*arguments), protocol)
        return d.addErrback(self._readonly, protocol)

    def execute_asking(self, *arguments: Any) -> Deferred[Any]:
        """
        Send C{ASKING} and then a command, back to back on one connection
        (how a cluster node is asked about a slot being imported).
        """
        protocol = self._protocol
        if protocol is None:
            if self.running and not self._ever_connected and not self._gave_up_waiting:
                return self._after_first_connection(arguments, asking=True)
            return fail(RedisUnavailable(f"{self.description}: not connected"))
        asking = self._bounded(protocol.execute("ASKING"), protocol)
        # Its failure shows as the command's own (a node that does not
        # hold the slot answers the command with MOVED).
        asking.addErrback(lambda failure: None)
        return self._bounded(protocol.execute(*arguments), protocol)

    def _readonly(self, failure: Failure, protocol: Any) -> Failure:
        """
        A C{READONLY} error means the server is a replica now (its master
        failed over): drop the connection, so that the next one goes to
        the master.
        """
        if failure.check(RedisError) and str(failure.value).startswith("READONLY"):
            if self._protocol is protocol and protocol.transport is not None:
                self._log.warn(
                    "{description}: the server became a replica; reconnecting",
                    description=self.description,
                )
                protocol.transport.abortConnection()
        return failure

    def _after_first_connection(
        self, arguments: tuple[Any, ...], asking: bool = False
    ) -> Deferred[Any]:
        """
        Send a command once the first connection is made.

        A starting daemon listens as soon as its checks have started, while
        the first connection to Redis (and its AUTH and SELECT) may still
        be under way: its first requests wait for it, within the timeout,
        instead of failing. Once a first connection failed to come in time,
        commands fail at once, as they do during any outage.
        """
        waiting: Deferred[Any] = self.whenConnected()
        waiting.addTimeout(self.timeout, self.reactor)

        def connected(protocol: Any) -> Deferred[Any]:
            if asking:
                return self.execute_asking(*arguments)
            return self.execute(*arguments)

        def not_connected(failure: Failure) -> Failure:
            self._gave_up_waiting = True
            return Failure(RedisUnavailable(f"{self.description}: not connected"))

        return waiting.addCallbacks(connected, not_connected)
