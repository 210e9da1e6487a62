"""
The Postfix SMTPD policy delegation protocol, server side.

Postfix sends C{name=value} lines and an empty line; we answer one
C{action=...} line and an empty line, in request order, and never write
before a request has arrived. Anything outside the protocol's limits closes
the connection without a reply to the offending request, logged with the
peer's address, and leaves every other connection alone; the answers to the
requests before it are sent first.

The protocol is a L{Protocol} that keeps its own buffer, not a
L{twisted.protocols.basic.LineReceiver}: a request is a block of lines ended
by an empty line, and Postfix writes each one whole, so the usual read
holds whole requests, each parsed with one decode and one split where a
line receiver calls a method per line (29 for a Postfix 3.7 request).
Owning the buffer also lets a connection stop parsing while it waits (too
many requests in flight, a peer not reading its answers), pick up where it
stopped, and tell after a half-close whether requests are left unread,
without reading a line receiver's private state. Anything unusual (a
request split across reads, CR LF, a request near a limit, a bad line) is
parsed line by line, so limits and errors are the same either way.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Optional

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from pfxpold.chain import Decision
from pfxpold.escape import escape, is_clean
from pfxpold.interfaces import IPolicyDecider
from pfxpold.request import PolicyRequest
from pfxpold.requestlog import request_line

#: The constant arguments of the fast path's C{str.split} calls.
_EQUALS = repeat("=")
_ONCE = repeat(1)


@dataclass(frozen=True)
class Limits:
    """
    What one connection may do before it is closed.

    @ivar max_line_length: longest attribute line, in bytes.
    @ivar max_attributes: most attributes in one request (Postfix 3.7 sends
        29).
    @ivar max_request_size: most bytes in one request.
    @ivar idle_timeout: seconds a connection may wait between requests.
        Postfix closes idle connections itself after
        C{smtpd_policy_service_max_idle} (300 s) and C{..._max_ttl} (1000 s);
        closing first costs it a reconnect and a second, so this is longer.
    @ivar request_timeout: seconds from a request's first line to its empty
        line.
    @ivar max_pipelined: requests one connection may have waiting for an
        answer before we stop reading from it.
    @ivar close_timeout: seconds a closing connection may take to send what
        was written to it before it is dropped: a peer that does not read
        must not keep it open.
    """

    max_line_length: int = 4096
    max_attributes: int = 100
    max_request_size: int = 32768
    idle_timeout: float = 1200.0
    request_timeout: float = 60.0
    max_pipelined: int = 32
    close_timeout: float = 30.0


class _Pending:
    """
    A request waiting for its decision, kept in arrival order.
    """

    __slots__ = ("request", "started", "decision", "block")

    def __init__(self, request: PolicyRequest, started: float, block: bytes) -> None:
        self.request = request
        self.started = started
        #: The request's lines as they came, when it was parsed whole.
        self.block = block
        self.decision: Optional[Decision] = None


@implementer(IHalfCloseableProtocol, IPushProducer)
class PolicyProtocol(Protocol, TimeoutMixin):
    """
    One Postfix connection: many requests, one answer each, in order.

    A client that shuts down its sending side after its last request (as
    C{nc -N} does) still gets every answer before the connection closes.

    The idle, request and closing timeouts are one L{TimeoutMixin} timer,
    re-armed for whichever applies.
    """

    _log = Logger()
    # Always connected while we use it (Twisted types it as optional).
    transport: Any

    def __init__(self, factory: PolicyFactory) -> None:
        self.factory = factory
        self._buffer = b""
        self._parsing = False
        self._attributes: dict[str, str] = {}
        self._size = 0
        self._queue: deque[_Pending] = deque()
        self._timer_reason = ""
        self._idle_since = 0.0
        self._closing = False
        self._eof = False
        self._violated = False
        self._paused_for: set[str] = set()
        self.peer = "?"
        #: The socket's send while answers go straight to it (L{_write}).
        self._send: Optional[Any] = None
        #: Answers waiting for the end of the reactor's turn (L{_write}).
        self._unsent: list[bytes] = []

    # Connection life

    def connectionMade(self) -> None:
        peer: Any = self.transport.getPeer()
        host = getattr(peer, "host", None)
        if host is None:
            name = getattr(peer, "name", None) or "?"
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            # A socket path is a file name: any byte but NUL and slash.
            self.peer = f"unix:{escape(name)}"
        elif ":" in host:
            # IPv6: brackets keep the port apart from the address.
            self.peer = f"[{host}]:{peer.port}"
        else:
            self.peer = f"{host}:{peer.port}"
        self.factory.connections.add(self)
        self.transport.registerProducer(self, True)
        if isinstance(self.transport, tcp.Connection) and not self.transport.TLS:
            # A plain TCP or Unix socket (the UNIX transport is a TCP one):
            # ISystemHandle.getHandle() is the socket itself.
            self._send = self.transport.getHandle().send
        self._arm(self.factory.limits.idle_timeout, "idle")

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self._closing = True
        self._buffer = b""
        self._unsent = []
        if self._queue:
            self.factory.in_flight -= len(self._queue)
            self._queue.clear()
            self.factory.check_drained()
        self.setTimeout(None)
        self.factory.connections.discard(self)
        self.factory.check_closed()

    def readConnectionLost(self) -> None:
        """
        The client sent its last request: answer every request it sent,
        then close. A half-finished request is dropped, as on any close.
        """
        self._eof = True
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        """
        After the client's half-close, close once every request it sent is
        answered, including requests still unread because we had paused
        reading.
        """
        if self._closing or self._queue or self._parsing:
            return
        if self._violated:
            self._close()
            return
        if not self._eof:
            return
        if b"\n" in self._buffer:
            # Complete lines not parsed yet: parsing resumes with reading,
            # and comes back here.
            return
        if self._attributes or self._buffer:
            self._log.info(
                "connection from {peer} closed in the middle of a request", peer=self.peer
            )
        self._close()

    def writeConnectionLost(self) -> None:
        self._close(abort=True)

    # Timers

    def callLater(self, period: float, func: Any) -> IDelayedCall:
        """
        L{TimeoutMixin}'s timer, on the factory's clock.
        """
        return self.factory.clock.callLater(period, func)

    def _arm(self, seconds: float, reason: str) -> None:
        self._timer_reason = reason
        if reason == "idle":
            self._idle_since = self.factory.clock.seconds()
        self.setTimeout(seconds)

    def timeoutConnection(self) -> None:
        """
        The connection was idle, or a request took too long to arrive, or
        a closing connection's last answers did not leave in time.
        """
        if self._timer_reason == "idle":
            # The idle timer is not moved for every request (that cost a
            # reschedule per request): a request since it was set moved
            # _idle_since, and the timer is set again for what is left.
            limits = self.factory.limits
            left = self._idle_since + limits.idle_timeout - self.factory.clock.seconds()
            if left > 0:
                self.setTimeout(left)
                return
            self._log.info("closing idle connection from {peer}", peer=self.peer)
            self._close()
        elif self._timer_reason == "close":
            self._log.info(
                "connection from {peer} did not take its last answers within {seconds}s;"
                " dropping it",
                peer=self.peer,
                seconds=self.factory.limits.close_timeout,
            )
            self.transport.abortConnection()
        else:
            self._violation(
                "request_timeout",
                f"request not finished within {self.factory.limits.request_timeout}s",
            )

    def _violation(self, kind: str, reason: str) -> None:
        """
        Close a connection that broke the protocol or its limits, without a
        reply to the offending request and without reading anything more
        from it. Requests it sent before, still waiting for a check, are
        answered first; then the connection is closed after the answers
        are sent (within C{close_timeout}). Postfix sends one request at a
        time, so there is rarely one waiting.

        @param kind: the violation's name, counted in the factory's
            C{violations}.
        """
        if self._violated or self._closing:
            return
        self._violated = True
        self.factory.violations[kind] += 1
        self._log.warn(
            "closing connection from {peer} without a reply: {reason}",
            peer=self.peer,
            reason=reason,
        )
        self._attributes = {}
        self._buffer = b""
        self._pause("protocol violation")
        self._finish_if_done()

    def _close(self, abort: bool = False) -> None:
        if self._closing:
            return
        if not abort:
            # The answers of this turn go before the close.
            self.send_unsent()
        self._closing = True
        self._attributes = {}
        self._buffer = b""
        # A transport that paused us (its write buffer was full) resumes its
        # producer when the buffer drains instead of finishing a
        # loseConnection: unregister first, or the connection never closes.
        self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
            # loseConnection waits for the written answers to leave, which
            # a peer that does not read makes wait forever.
            self._arm(self.factory.limits.close_timeout, "close")

    # Flow control: stop reading while the peer does not read our answers or
    # has too many requests waiting.

    def _pause(self, why: str) -> None:
        if not self._paused_for:
            self.transport.pauseProducing()
        self._paused_for.add(why)

    def _resume(self, why: str) -> None:
        if why in self._paused_for:
            self._paused_for.discard(why)
            if not self._paused_for and not self._closing:
                self.transport.resumeProducing()
                self._parse()
                self._finish_if_done()

    def pauseProducing(self) -> None:
        self._pause("write buffer full")

    def resumeProducing(self) -> None:
        self._resume("write buffer full")

    def stopProducing(self) -> None:
        # The transport is going away; connectionLost follows.
        self._pause("transport stopped")

    # Requests

    def dataReceived(self, data: bytes) -> None:
        if self._violated or self._closing:
            # Nothing more is read after a violation.
            return
        self._buffer = self._buffer + data if self._buffer else data
        if not self._paused_for:
            self._parse()

    def _parse(self) -> None:
        """
        Parse and answer the requests in the buffer, until it holds no whole
        line or reading is paused.
        """
        if self._parsing:
            # Called back from a request answered while parsing (which
            # resumed reading), or data delivered from within a check: the
            # loop below goes on with it.
            return
        self._parsing = True
        try:
            while True:
                buffer = self._buffer
                start = self._parse_requests(buffer)
                if self._violated or self._closing:
                    self._buffer = b""
                    break
                if self._buffer is buffer:
                    self._buffer = buffer[start:] if start else buffer
                    break
                # More data arrived while parsing: it follows what is left.
                self._buffer = buffer[start:] + self._buffer[len(buffer) :]
        finally:
            self._parsing = False
        if self._eof or self._violated:
            self._finish_if_done()

    def _parse_requests(self, buffer: bytes) -> int:
        """
        Parse C{buffer}: whole requests at once, anything else line by line.

        @return: where the bytes not parsed yet start.
        """
        start = 0
        while not self._paused_for and not self._closing:
            if not self._attributes:
                end = buffer.find(b"\n\n", start)
                if end >= 0 and self._take_request(buffer[start : end + 1]):
                    start = end + 2
                    continue
            end = buffer.find(b"\n", start)
            if end < 0:
                limit = self.factory.limits.max_line_length
                if len(buffer) - start > limit:
                    self._violation("line_too_long", f"line longer than {limit} bytes")
                break
            line = buffer[start:end]
            start = end + 1
            self._line_received(line)
        return start

    def _take_request(self, block: bytes) -> bool:
        """
        Parse and answer one whole request, C{block} being its lines with
        their line feeds (the empty line excluded).

        @return: C{False}, having changed nothing, when the request needs
            the line-by-line path to apply a limit or report an error.
        """
        limits = self.factory.limits
        if (
            len(block) > limits.max_line_length
            or len(block) > limits.max_request_size
            or block[:1] == b"\n"
            or b"\r" in block
        ):
            return False
        count = block.count(b"\n")
        if count > limits.max_attributes:
            return False
        text = block.decode("utf-8", "replace")
        if "\x00" in text:
            return False
        lines = text.split("\n")
        lines.pop()
        try:
            # str.split(line, "=", 1) for every line, called from C: about
            # a fifth cheaper than a generator expression.
            attributes = dict(map(str.split, lines, _EQUALS, _ONCE))
        except ValueError:
            return False
        if len(attributes) != count or "" in attributes:
            return False
        self._size = len(block)
        self._attributes = attributes
        self._request_complete(block)
        return True

    def _line_received(self, line: bytes) -> None:
        limits = self.factory.limits
        if len(line) > limits.max_line_length:
            self._violation("line_too_long", f"line longer than {limits.max_line_length} bytes")
            return
        if line[-1:] == b"\r":
            line = line[:-1]
        if not line:
            if self._attributes:
                self._request_complete(b"")
            else:
                self._violation("empty_line", "empty line where a request should start")
            return
        attributes = self._attributes
        if not attributes:
            self._size = 0
            self._arm(limits.request_timeout, "request")
        self._size += len(line) + 1
        if self._size > limits.max_request_size:
            self._violation(
                "request_too_large", f"request larger than {limits.max_request_size} bytes"
            )
            return
        if len(attributes) >= limits.max_attributes:
            self._violation("too_many_attributes", f"more than {limits.max_attributes} attributes")
            return
        name, sep, value = line.decode("utf-8", "replace").partition("=")
        if not sep or not name:
            self._violation("not_name_value", "a line that is not name=value")
            return
        if "\x00" in name or name in attributes:
            self._violation("bad_attribute_name", f"a bad or repeated attribute name '{escape(name)}'")
            return
        attributes[name] = value

    def _request_complete(self, block: bytes) -> None:
        """
        Decide the request whose attributes are gathered.

        @param block: its lines as they came when it was parsed whole (the
            capture keeps them as they are), else C{b""}.
        """
        # The dictionary is the request's from now on: no copy.
        request = PolicyRequest.adopt(self._attributes)
        self._attributes = {}
        factory = self.factory
        started = factory.clock.seconds()
        if self._timer_reason == "idle":
            # Idle from now: the timer, when it fires, sees this and waits
            # for the rest (timeoutConnection).
            self._idle_since = started
        else:
            self._arm(factory.limits.idle_timeout, "idle")
        result = factory.decider.decide(request)
        # type() first: Deferred is an abstract Awaitable, and isinstance
        # on it takes the slow ABC path.
        if not self._queue and type(result) is Decision:
            self._answer(request, result, started, block)
            return
        pending = _Pending(request, started, block)
        self._queue.append(pending)
        factory.in_flight += 1
        if len(self._queue) >= factory.limits.max_pipelined:
            self._pause("too many requests in flight")
        if type(result) is not Decision and isinstance(result, Deferred):
            result.addCallbacks(
                self._decided, self._decider_failed, callbackArgs=(pending,), errbackArgs=(pending,)
            )
        else:
            self._decided(result, pending)

    def _decider_failed(self, failure: Failure, pending: _Pending) -> None:
        """
        The decider broke its promise never to fail: rather than leave the
        request (and every one behind it) waiting until Postfix times out,
        answer nothing and close, so Postfix retries at once.
        """
        self._log.failure("deciding a request from {peer} failed", failure, peer=self.peer)
        self._decided(Decision(None, "error"), pending)

    def _decided(self, decision: Decision, pending: _Pending) -> None:
        pending.decision = decision
        queue = self._queue
        factory = self.factory
        while queue and queue[0].decision is not None and not self._closing:
            head = queue.popleft()
            factory.in_flight -= 1
            self._answer(head.request, head.decision, head.started, head.block)
        if len(queue) < factory.limits.max_pipelined:
            self._resume("too many requests in flight")
        self._finish_if_done()
        factory.check_drained()

    def _answer(
        self, request: PolicyRequest, decision: Any, started: float, block: bytes = b""
    ) -> None:
        action = decision.action
        factory = self.factory
        if factory.metrics is not None:
            factory.metrics.answered(request, decision, started)
        if factory.log_requests:
            request_log = factory.request_log
            if request_log is not None:
                request_log.record(
                    request, decision, (factory.clock.seconds() - started) * 1000.0, self.peer
                )
            else:
                self._log_request(request, decision, started)
        if decision.verdicts and factory.log_verdicts:
            self._log.debug(
                "verdicts for {peer}: {verdicts}", peer=self.peer, verdicts=decision.verdicts
            )
        if action is None:
            # Postfix retries once on a new connection, then applies its
            # smtpd_policy_service_default_action.
            self._close()
        else:
            self._write(action.line)
        capture = factory.capture
        if capture is not None:
            # After the answer: capturing is for later, not for Postfix.
            capture.record(request, decision, started, block)

    def _write(self, data: bytes) -> None:
        """
        Send an answer: with the socket's own C{send}, at the end of the
        reactor's turn, together with the other answers this connection
        got in the turn (L{PolicyFactory.send_soon}); through the
        transport once that is no longer possible.

        Twisted's transport sends what it is given on a later turn of the
        reactor, after asking epoll to watch the socket for writability
        and before asking it to stop: two system calls and a reactor turn
        for every answer, a fifth of a request's cost (bench/run.py,
        C{reference-protocol} against C{reference-protocol-direct}).
        Sending each answer at once instead, as asyncio's transports do,
        costs a wake-up of the peer per answer, while it may still be
        asleep: on some machines dearer than the system calls saved. So
        the answers of a turn leave together at its end, one C{send} per
        connection. Once a send is short (a peer not reading its answers)
        or fails, this connection writes through the transport for good,
        so the transport keeps the answers' order, its flow control
        (L{pauseProducing}) and the closing handshake.
        """
        if self._send is not None and not self.transport.disconnecting:
            if not self._unsent:
                self.factory.send_soon(self)
            self._unsent.append(data)
            return
        self.send_unsent()
        self.transport.write(data)

    def send_unsent(self) -> None:
        """
        Send the answers waiting for the end of the turn, if any.
        """
        if not self._unsent:
            return
        data = b"".join(self._unsent) if len(self._unsent) > 1 else self._unsent[0]
        self._unsent = []
        send = self._send
        if send is not None and not self.transport.disconnecting:
            try:
                sent = send(data)
            except OSError:
                # EAGAIN, or a connection going away: the transport finds
                # out and reports it as it does for its own writes.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            self._send = None
        self.transport.write(data)

    def _log_request(self, request: PolicyRequest, decision: Any, started: float) -> None:
        """
        Log an answered request as an event of its own, for a log that
        takes no batches (L{pfxpold.requestlog}): the line the other
        destinations write, and its values as fields, escaped, for
        observers that want them.
        """
        elapsed_ms = (self.factory.clock.seconds() - started) * 1000.0
        text = request_line(request, decision, elapsed_ms)
        action = decision.action
        fields = {
            "protocol_state": request.protocol_state,
            "client_name": request.client_name,
            "client_address": request.client_address,
            "helo_name": request.helo_name,
            "sender": request.sender,
            "recipient": request.recipient,
            "instance": request.instance,
            "queue_id": request.queue_id,
            "action": "no reply" if action is None else str(action),
            "check": decision.decided_by,
            "elapsed_ms": elapsed_ms,
            "peer": self.peer,
        }
        if not is_clean(request.summary()):
            # The line is escaped; so are the values that made it need it.
            for name, value in fields.items():
                if type(value) is str and name != "peer":  # escaped already
                    fields[name] = escape(value)
        self._log.info("{request_text}", request_text=text, **fields)


class PolicyFactory(Factory):
    """
    Builds a L{PolicyProtocol} per connection and keeps count of what is in
    flight, so that a stopping daemon can answer it before it exits.

    @ivar decider: the L{IPolicyDecider} (the check chain).
    @ivar connections: the open connections.
    @ivar in_flight: requests received and not yet answered.
    @ivar log_requests: whether answered requests are logged.
    @ivar request_log: where they are logged: an object with a C{record}
        method, L{pfxpold.requestlog.FileRequestLog} (a file of their own)
        or L{pfxpold.requestlog.EventRequestLog} (batches in twistd's log),
        or L{None} for one event per request in twistd's log (C{--syslog},
        another C{--logger}, a tac file).
    @ivar violations: connections closed for breaking the protocol, by
        kind (C{line_too_long}, C{request_too_large}, C{too_many_attributes},
        C{not_name_value}, C{bad_attribute_name}, C{empty_line},
        C{request_timeout}).
    @ivar metrics: what counts answers, a L{pfxpold.metrics.Metrics}, or
        L{None} (metrics off: nothing is called).
    @ivar capture: what captures answered requests for replay, a
        L{pfxpold.capture.CaptureWriter}, or L{None}.
    @ivar log_verdicts: whether the checks' verdicts, when the chain
        records them, are logged (the capture has them recorded without).
    """

    protocol = PolicyProtocol  # type: ignore[assignment]
    _log = Logger()

    def __init__(
        self,
        decider: Any,
        clock: IReactorTime,
        limits: Limits = Limits(),
        log_requests: bool = True,
        request_log: Optional[Any] = None,
    ) -> None:
        if not IPolicyDecider.providedBy(decider):
            raise TypeError("decider must provide IPolicyDecider")
        self.decider = decider
        self.clock = clock
        self.limits = limits
        self.log_requests = log_requests
        self.request_log = request_log
        self.connections: set[PolicyProtocol] = set()
        self.in_flight = 0
        self.violations: Counter[str] = Counter()
        self.metrics: Optional[Any] = None
        self.capture: Optional[Any] = None
        self.log_verdicts = True
        self._drain_waiters: list[Deferred[None]] = []
        self._close_waiters: list[Deferred[None]] = []
        self._unsent: list[PolicyProtocol] = []
        self._send_call: Optional[IDelayedCall] = None

    def buildProtocol(self, addr: Any) -> PolicyProtocol:
        return PolicyProtocol(self)

    def send_soon(self, connection: PolicyProtocol) -> None:
        """
        Have C{connection}'s waiting answers sent at the end of this turn
        of the reactor: one timer for every connection with answers.
        """
        self._unsent.append(connection)
        if self._send_call is None:
            self._send_call = self.clock.callLater(0, self._send_unsent)

    def _send_unsent(self) -> None:
        self._send_call = None
        connections, self._unsent = self._unsent, []
        for connection in connections:
            connection.send_unsent()

    def drained(self) -> Deferred[None]:
        """
        @return: a Deferred that fires once no request is waiting for an
            answer.
        """
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        self.check_drained()
        return waiter

    def check_drained(self) -> None:
        """
        Fire the L{drained} waiters if no request is in flight; called
        whenever requests are answered or dropped.
        """
        if self.in_flight <= 0 and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def close_connections(self, abort: bool = False) -> Deferred[None]:
        """
        Close every connection; Postfix reconnects to whoever listens next.

        @param abort: drop the connections at once, unwritten answers and
            all, instead of closing them after what was written is sent.
        @return: a Deferred that fires once every connection is closed: only
            then have the last answers left the process.
        """
        for connection in list(self.connections):
            if abort:
                connection.transport.abortConnection()
            else:
                connection._close()
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        self.check_closed()
        return waiter

    def check_closed(self) -> None:
        """
        Fire the L{close_connections} waiters if no connection is left;
        called by each connection as it is lost.
        """
        if not self.connections and self._close_waiters:
            waiters, self._close_waiters = self._close_waiters, []
            for waiter in waiters:
                waiter.callback(None)
