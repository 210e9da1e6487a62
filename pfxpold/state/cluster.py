"""
Redis Cluster: each command sent to the master that holds its key's slot.

The slot map (which master serves which of the 16384 slots) is learnt
with C{CLUSTER SLOTS} from any node that answers, at start and again
after a C{MOVED} redirection (at most one refresh at a time). A command
whose slot is not known yet goes to any node; its answer (C{MOVED}) says
where to go. A slot being migrated answers C{ASK}: the command is sent
once to the importing node, after C{ASKING}, and the map is left alone.
A multi-key command caught half-way through a migration (a sliding
window's buckets, some moved, some not yet written) answers C{TRYAGAIN}:
it is sent again every 50 ms, within the node's timeout. So is a command
sent round by nodes that each name another (a slot handed over in the
wrong order), after a few redirections in a row. Every attempt is
bounded by the node client's timeout, and the waits by that timeout from
the command's start, so a cluster in trouble never holds a request longer
than the check allows.

pfxpold's keys put an identity's counters in one slot with a hash tag
(C{quota:{quota:alice}:day:...}), so every script's keys are in one slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from pfxpold.state.redisconfig import Address
from pfxpold.state.resp import RedisClient, RedisError, RedisUnavailable

SLOTS = 16384
#: Redirections followed in a row before a command waits TRYAGAIN_DELAY
#: (and fails, when the node's timeout from its start would be over).
MAX_REDIRECTIONS = 5
#: The wait between two tries of a command answered TRYAGAIN (tried again
#: until the node's timeout has passed since the first).
TRYAGAIN_DELAY = 0.05
#: The shortest time between two slot map refreshes.
REFRESH_INTERVAL = 0.5


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """
    CRC-16/XMODEM, the checksum Redis Cluster places keys by.
    """
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: Union[str, bytes]) -> int:
    """
    The cluster slot of C{key}: of its hash tag (the part between the
    first C{{} and the next C{}}, when not empty) if it has one.
    """
    data = key.encode("utf-8") if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc16(data) % SLOTS


def parse_redirection(message: str) -> Optional[tuple[str, int, Address]]:
    """
    A C{MOVED} or C{ASK} error (C{MOVED 3999 127.0.0.1:6381}) as its kind,
    slot and address; L{None} for any other error.
    """
    parts = message.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK") or not parts[1].isdigit():
        return None
    host, separator, port = parts[2].rpartition(":")
    if not separator or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    slot = int(parts[1])
    if slot >= SLOTS or not 0 < int(port) < 65536:
        return None
    return parts[0], slot, Address(host, int(port))


def command_key(arguments: Sequence[Any]) -> Optional[Any]:
    """
    The key that places a command, or L{None} for one that names none
    (C{PING}, C{SCAN}): pfxpold's commands have their key first, scripts
    their first key after the count.
    """
    if not arguments:
        return None
    name = str(arguments[0]).upper()
    if name in ("EVAL", "EVALSHA"):
        return arguments[3] if len(arguments) > 3 and int(arguments[2]) > 0 else None
    if name in ("PING", "SCAN", "CLUSTER", "INFO", "ROLE"):
        return None
    return arguments[1] if len(arguments) > 1 else None


def parse_slots(reply: Any, asked: Address) -> list[tuple[int, int, Address]]:
    """
    A C{CLUSTER SLOTS} reply as (first slot, last slot, master) ranges. A
    master shown without a host is the node that was asked.

    @raise ValueError: when the reply is not one.
    """
    if not isinstance(reply, list):
        raise ValueError(f"not a CLUSTER SLOTS reply: {reply!r}")
    ranges = []
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[2], list):
            raise ValueError(f"not a slot range: {entry!r}")
        first, last, master = entry[0], entry[1], entry[2]
        if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last < SLOTS):
            raise ValueError(f"not a slot range: {entry!r}")
        if len(master) < 2 or not isinstance(master[1], int):
            raise ValueError(f"not a node: {master!r}")
        host = master[0].decode("ascii", "replace") if isinstance(master[0], bytes) else ""
        if host in ("", "?"):
            host = asked.host
        ranges.append((first, last, Address(host, master[1])))
    return ranges


class ClusterClient(MultiService):
    """
    Commands to a Redis Cluster, each to the master of its key's slot,
    through one L{RedisClient} per node (made when a node is first named).

    @ivar description: how the log names the cluster.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        seeds: Sequence[Address],
        make_node: Callable[[Address], RedisClient],
        description: str = "Redis Cluster",
    ) -> None:
        """
        @param seeds: nodes to learn the cluster from.
        @param make_node: makes the client of one node (not started).
        """
        super().__init__()
        self.reactor = reactor
        self.seeds = list(seeds)
        self._make_node = make_node
        self.description = description
        self._nodes: dict[Address, RedisClient] = {}
        self._slots: list[Optional[Address]] = [None] * SLOTS
        self._refreshing = False
        self._last_refresh = float("-inf")
        self._timeout: Optional[float] = None
        self._seen: set[tuple[str, int, Address]] = set()
        #: Whether the last refresh found no node to give the map: logged
        #: once per outage, not at every refresh a failing command asks for.
        self._map_failing = False
        for seed in self.seeds:
            self.node(seed)

    def node(self, address: Address) -> RedisClient:
        """
        The client of the node at C{address}, made (and started, when the
        cluster client runs) the first time.
        """
        client = self._nodes.get(address)
        if client is None:
            client = self._nodes[address] = self._make_node(address)
            if self._timeout is not None:
                client.timeout = self._timeout
            client.setServiceParent(self)
        return client

    def startService(self) -> None:
        super().startService()
        self.refresh()

    @property
    def connected(self) -> bool:
        """
        Whether the slot map is known and a node is connected.
        """
        return any(address is not None for address in self._slots) and any(
            client.connected for client in self._nodes.values()
        )

    @property
    def timeout(self) -> float:
        """
        Seconds a command may take on a node (pfxpold-admin sets its own).
        """
        return max((client.timeout for client in self._nodes.values()), default=2.0)

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._timeout = seconds
        for client in self._nodes.values():
            client.timeout = seconds

    def masters(self) -> list[RedisClient]:
        """
        The clients of the masters in the slot map (every seed while it is
        not known): where a SCAN must go to see every key.
        """
        known = sorted({address for address in self._slots if address is not None}, key=str)
        return [self.node(address) for address in known] or list(self._nodes.values())

    def where(self, slot: int) -> Address:
        """
        The master that serves C{slot}, or a node to ask when not known.
        """
        address = self._slots[slot]
        if address is not None:
            return address
        connected = [a for a, client in self._nodes.items() if client.connected]
        return (connected or list(self._nodes))[0]

    def refresh(self) -> None:
        """
        Learn the slot map again (in the background), unless a refresh is
        under way or the last one was very recent.
        """
        now = self.reactor.seconds()
        if self._refreshing or now - self._last_refresh < REFRESH_INTERVAL:
            return
        self._refreshing = True
        self._last_refresh = now
        d = Deferred.fromCoroutine(self._refresh())
        d.addErrback(
            lambda failure: self._log.failure(
                "{description}: slot map refresh failed", failure, description=self.description
            )
        )

    async def _refresh(self) -> None:
        try:
            problems = []
            candidates = sorted(
                self._nodes.items(), key=lambda item: (not item[1].connected, str(item[0]))
            )
            for address, client in candidates:
                try:
                    reply = await client.execute("CLUSTER", "SLOTS")
                    ranges = parse_slots(reply, address)
                except (RedisError, RedisUnavailable, ValueError) as e:
                    problems.append(f"{address}: {e}")
                    continue
                except Exception as e:
                    problems.append(f"{address}: {e.__class__.__name__} {e}")
                    continue
                slots: list[Optional[Address]] = [None] * SLOTS
                for first, last, master in ranges:
                    slots[first : last + 1] = [master] * (last - first + 1)
                    self.node(master)
                self._slots = slots
                if self._map_failing:
                    self._map_failing = False
                    self._log.info(
                        "{description}: slot map read again, from {address}",
                        description=self.description,
                        address=str(address),
                    )
                return
            if self.running and not self._map_failing:
                self._map_failing = True
                self._log.warn(
                    "{description}: no node gave the slot map ({problems})",
                    description=self.description,
                    problems="; ".join(problems),
                )
        finally:
            self._refreshing = False

    def execute(self, *arguments: Any) -> Deferred[Any]:
        """
        Send a command to the node of its key's slot, following
        redirections.

        @return: a Deferred that fires with its reply, or fails with a
            L{StoreError}.
        """
        key = command_key(arguments)
        slot = key_slot(key) if key is not None else None
        return Deferred.fromCoroutine(self._execute(arguments, slot))

    async def _wait_within(self, started: float, timeout: float) -> bool:
        """
        Wait C{TRYAGAIN_DELAY} before a command is tried again, when that
        leaves it within C{timeout} of its C{started} time.

        @return: whether it waited (else it must fail now).
        """
        if self.reactor.seconds() + TRYAGAIN_DELAY >= started + timeout:
            return False
        await deferLater(self.reactor, TRYAGAIN_DELAY, lambda: None)
        return True

    async def _execute(self, arguments: tuple[Any, ...], slot: Optional[int]) -> Any:
        address = self.where(slot) if slot is not None else self.where(0)
        asking = False
        redirections = 0
        started = self.reactor.seconds()
        while True:
            client = self.node(address)
            try:
                if asking:
                    return await client.execute_asking(*arguments)
                return await client.execute(*arguments)
            except RedisError as e:
                message = str(e)
                redirection = parse_redirection(message)
                if redirection is not None:
                    redirections += 1
                    if redirections > MAX_REDIRECTIONS:
                        # Nodes sending the command round (a slot handed
                        # to its new master after the old one let go of
                        # it: each names the other for a moment): wait as
                        # for TRYAGAIN, then follow them again, within the
                        # node client's timeout.
                        if not await self._wait_within(started, client.timeout):
                            raise RedisError(
                                f"{self.description}: too many redirections ({message})"
                            ) from None
                        redirections = 1
                    kind, moved_slot, address = redirection
                    asking = kind == "ASK"
                    if (kind, moved_slot, address) not in self._seen:
                        # Once per slot and place: a migration is worth a
                        # line, not a line per command.
                        self._seen.add((kind, moved_slot, address))
                        self._log.info(
                            "{description}: slot {slot} {what} {address}",
                            description=self.description,
                            slot=moved_slot,
                            what="moved to" if kind == "MOVED" else "is migrating to",
                            address=str(address),
                        )
                    if kind == "MOVED":
                        self._slots[moved_slot] = address
                        self.refresh()
                    continue
                if message.startswith("TRYAGAIN") and await self._wait_within(
                    started, client.timeout
                ):
                    continue
                raise
            except RedisUnavailable:
                # The node is gone (a failed-over master, a removed node):
                # the map may be stale; the check's on_error answers now.
                self.refresh()
                raise
