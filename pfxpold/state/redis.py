"""
The Redis state store: one state for every pfxpold on every MX host.

Each operation is one Lua script run with EVALSHA (EVAL the first time a
Redis has not seen it), so Redis runs it atomically: no other client's
command runs between a script's reads and writes. Keys carry an absolute
expiry (PEXPIREAT computed from the window's end), so every writer of a
key sets the same expiry and a fixed window stays fixed. The keys of one
operation share a hash tag, so the scripts also work on Redis Cluster.

A greylisting triplet's hash also holds the triplet in clear (written with
its first attempt, in the same HSET), so that C{pfxpold-admin} can list
entries by client, sender or recipient: it finds them with SCAN under the
check's key prefix, which never blocks Redis, and no index is kept on the
daemon's path. The run-time whitelist is one hash per store
(L{WHITELIST_KEY}), which the greylist checks read every few seconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, succeed
from zope.interface import implementer

from pfxpold.config import CheckOptions
from pfxpold.interfaces import IStateStore
from pfxpold.state import (
    Consumption,
    Counter,
    CounterValue,
    GreylistEntry,
    GreylistState,
    Once,
    Triplet,
    WhitelistEntry,
)
from pfxpold.state.memory import matches
from pfxpold.state.redisconfig import Address, RedisSettings, describe, read_settings
from pfxpold.state.resp import RedisClient, RedisError

# With one more argument than the counters take, the last key is the
# message's counted-once mark and that argument its expiry (ms): a live
# mark answers 2 (counted before) and changes nothing; an addition sets it.
CONSUME = """
local amount = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local mark = false
if #ARGV > 2 + 3 * n then
  mark = KEYS[#KEYS]
  if redis.call('EXISTS', mark) == 1 then return {2} end
end
local a, k = 3, 1
local totals, writes, allowed = {}, {}, 1
for i = 1, n do
  local limit, expires, nread = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  local total = 0
  for j = k, k + nread - 1 do
    total = total + (tonumber(redis.call('GET', KEYS[j])) or 0)
  end
  writes[i] = {KEYS[k], expires}
  k = k + nread
  totals[i] = total
  if total + amount > limit then allowed = 0 end
end
if allowed == 1 then
  for i = 1, n do
    redis.call('INCRBY', writes[i][1], amount)
    redis.call('PEXPIREAT', writes[i][1], writes[i][2])
    totals[i] = totals[i] + amount
  end
  if mark then
    redis.call('SET', mark, 1)
    redis.call('PEXPIREAT', mark, ARGV[#ARGV])
  end
end
table.insert(totals, 1, allowed)
return totals
"""

# ARGV[2] = '1': the last key is the message's mark; the count is taken
# back only if the mark was still there, and the mark goes with it.
RELEASE = """
local last = #KEYS
if ARGV[2] == '1' then
  if redis.call('DEL', KEYS[last]) == 0 then return 0 end
  last = last - 1
end
for i = 1, last do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('DECRBY', KEYS[i], ARGV[1]) < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
    end
  end
end
return 0
"""

GREYLIST = """
local now, delay, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lifetime, after = tonumber(ARGV[4]), tonumber(ARGV[5])
local function at(t) return math.floor(t * 1000) end
if after > 0 then
  local passes = tonumber(redis.call('GET', KEYS[2]) or '0')
  if passes >= after then
    redis.call('PEXPIREAT', KEYS[2], at(now + lifetime))
    return {'whitelisted', '0'}
  end
end
local t = redis.call('HMGET', KEYS[1], 'first', 'passes')
local first, passes = tonumber(t[1]), tonumber(t[2])
if first == nil or (passes == 0 and now > first + window) then
  if ARGV[6] == '1' then
    redis.call('HSET', KEYS[1], 'first', ARGV[1], 'passes', 0,
               'network', ARGV[7], 'sender', ARGV[8], 'recipient', ARGV[9])
  else
    redis.call('HSET', KEYS[1], 'first', ARGV[1], 'passes', 0)
  end
  redis.call('PEXPIREAT', KEYS[1], at(now + window))
  return {'new', ARGV[1]}
end
if passes == 0 and now < first + delay then return {'early', t[1]} end
redis.call('HSET', KEYS[1], 'passes', passes + 1)
redis.call('PEXPIREAT', KEYS[1], at(now + lifetime))
if passes > 0 then return {'known', t[1]} end
if after > 0 then
  redis.call('INCR', KEYS[2])
  redis.call('PEXPIREAT', KEYS[2], at(now + lifetime))
end
return {'passed', t[1]}
"""

COUNTERS = """
local found = {}
for i = 1, #KEYS do
  found[i] = {redis.call('GET', KEYS[i]) or false, redis.call('PTTL', KEYS[i])}
end
return found
"""

# A message's marks: one hash, a field per mark holding its expiry (ms);
# the key lives as long as its longest mark.
SET_MARK = """
local expires = tonumber(ARGV[2])
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if expires > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
local latest = 0
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
  latest = math.max(latest, tonumber(value))
end
redis.call('PEXPIREAT', KEYS[1], latest)
return 0
"""

#: The hash of a store's run-time whitelist, after the prefix: fields are
#: KIND:VALUE, values "ADDED COMMENT".
WHITELIST_KEY = "greylist-whitelist"
#: Keys asked for per SCAN step.
SCAN_COUNT = 1000


def glob_escape(text: str) -> str:
    """
    C{text} as a Redis MATCH pattern that matches it literally.
    """
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class Script:
    """
    A Lua script, run by its SHA1 digest and sent whole only when Redis
    does not know it yet (first use, or after Redis restarted).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def run(self, client: Any, keys: Sequence[str], arguments: Sequence[Any]) -> Deferred[Any]:
        def unknown(failure: Any) -> Any:
            failure.trap(RedisError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return client.execute("EVAL", self.source, len(keys), *keys, *arguments)

        d = client.execute("EVALSHA", self.sha, len(keys), *keys, *arguments)
        return d.addErrback(unknown)


_CONSUME = Script(CONSUME)
_RELEASE = Script(RELEASE)
_GREYLIST = Script(GREYLIST)
_COUNTERS = Script(COUNTERS)
_SET_MARK = Script(SET_MARK)


def _consumption(reply: list[int]) -> Consumption:
    if reply[0] == 2:
        return Consumption(True, (), repeated=True)
    return Consumption(bool(reply[0]), tuple(reply[1:]))


def _milliseconds(timestamp: float) -> int:
    return int(timestamp * 1000)


def make_client(settings: RedisSettings, reactor: Any, name: str) -> Any:
    """
    The client of a store's Redis: a L{RedisClient} of one server or of
    the master the sentinels name, or a L{ClusterClient}.
    """
    from pfxpold.state.cluster import ClusterClient
    from pfxpold.state.sentinel import SentinelEndpoint, SentinelWatch

    description = describe(name, settings)
    connect = settings.connector(reactor)

    def client(endpoint: Any, description: str, **extra: Any) -> RedisClient:
        return RedisClient(
            endpoint,
            reactor,
            timeout=settings.timeout,
            password=settings.password,
            username=settings.username,
            database=settings.database,
            description=description,
            ping=settings.tls,
            **extra,
        )

    if settings.mode == "cluster":
        return ClusterClient(
            reactor,
            settings.cluster_nodes,
            lambda address: client(connect(address), f"{name} (cluster node {address})"),
            description=description,
        )
    if settings.mode == "server":
        return client(settings.server_endpoint(reactor), description)
    assert settings.master_name is not None
    credentials: tuple[str, ...] = ()
    if settings.sentinel_password is not None:
        credentials = tuple(
            part for part in (settings.sentinel_username, settings.sentinel_password) if part
        )
    endpoint = SentinelEndpoint(
        reactor,
        settings.sentinels,
        settings.master_name,
        connect,
        settings.timeout,
        credentials,
        description,
    )
    # A failover should be followed within a second or so.
    master = client(endpoint, description, role="master", max_retry_delay=1.0, quick_retry=True)

    def switched(address: Address) -> None:
        if address != endpoint.current:
            endpoint.hint = address
            master.drop()

    # Started and stopped with the store (see RedisStore): one
    # subscription per sentinel.
    master.companions = [
        SentinelWatch(
            reactor,
            [sentinel],
            settings.master_name,
            connect,
            settings.timeout,
            switched,
            credentials,
            f"{description} via sentinel {sentinel}",
        )
        for sentinel in settings.sentinels
    ]
    return master


@implementer(IStateStore)
class RedisStore(MultiService):
    """
    State in Redis, through one pipelined connection (one per master on
    a cluster) that is re-made whenever it is lost.

    Settings of C{[stores.NAME]} (see L{read_settings}): C{endpoint} (a
    Twisted client endpoint string; default
    C{tcp:host=127.0.0.1:port=6379}), or C{sentinels} and C{master_name},
    or C{cluster_nodes}; C{database} (0), C{username} and C{password_file}
    (a file whose first line is the password), C{tls} and its files,
    C{timeout} (seconds a command may take, default 2), C{prefix} (of
    every key, default C{pfxpold:}).
    """

    def __init__(self, options: CheckOptions) -> None:
        super().__init__()
        self.name: str = options.name  # type: ignore[assignment]
        self.reactor = options.reactor
        self.settings = read_settings(options)
        self.prefix = self.settings.prefix
        self.client: Any = make_client(self.settings, options.reactor, self.name)
        self.client.setServiceParent(self)
        for companion in getattr(self.client, "companions", ()):
            companion.setServiceParent(self)

    def consume(
        self, counters: Sequence[Counter], amount: int, now: float, once: Optional[Once] = None
    ) -> Deferred[Consumption]:
        keys: list[str] = []
        arguments: list[Any] = [amount, len(counters)]
        for counter in counters:
            keys.extend(self.prefix + key for key in counter.read_keys)
            arguments.extend(
                [counter.limit, _milliseconds(counter.expires_at), len(counter.read_keys)]
            )
        if once is not None:
            keys.append(self.prefix + once.key)
            arguments.append(_milliseconds(once.expires_at))
        d = _CONSUME.run(self.client, keys, arguments)
        return d.addCallback(_consumption)

    def release(
        self, counters: Sequence[Counter], amount: int, now: float, once: Optional[Once] = None
    ) -> Deferred[None]:
        keys = [self.prefix + c.key for c in counters]
        if once is not None:
            keys.append(self.prefix + once.key)
        d = _RELEASE.run(self.client, keys, [amount, 1 if once is not None else 0])
        return d.addCallback(lambda reply: None)

    def greylist(
        self,
        triplet: str,
        client: str,
        now: float,
        delay: float,
        retry_window: float,
        lifetime: float,
        whitelist_after: int,
        clear: Optional[Triplet] = None,
    ) -> Deferred[GreylistState]:
        arguments: list[Any] = [repr(float(now)), delay, retry_window, lifetime, whitelist_after]
        if clear is None:
            arguments.append(0)
        else:
            arguments.extend([1, clear.network, clear.sender, clear.recipient])
        d = _GREYLIST.run(self.client, [self.prefix + triplet, self.prefix + client], arguments)
        return d.addCallback(lambda reply: GreylistState(reply[0].decode(), float(reply[1])))

    def expire(self, now: float) -> Deferred[int]:
        # Redis forgets keys by itself (every key has an expiry).
        return succeed(0)

    def counters(self, keys: Sequence[str], now: float) -> Deferred[dict[str, CounterValue]]:
        keys = list(keys)
        d = _COUNTERS.run(self.client, [self.prefix + key for key in keys], [])

        def found(reply: list[Any]) -> dict[str, CounterValue]:
            values = {}
            for key, (count, ttl) in zip(keys, reply, strict=True):
                if count is not None:
                    # PTTL is -1 for a key without expiry (never written so
                    # by pfxpold): shown as expiring now.
                    values[key] = CounterValue(int(count), now + max(ttl, 0) / 1000)
            return values

        return d.addCallback(found)

    def reset(self, keys: Sequence[str]) -> Deferred[int]:
        if not keys:
            return succeed(0)
        # One quota identity's keys share a hash tag: one DEL is fine on a
        # cluster too.
        return self.client.execute("DEL", *(self.prefix + key for key in keys))

    async def _scan(self, prefix: str, kind: Optional[str] = None) -> list[str]:
        """
        Every key that starts with C{prefix} (after the store's prefix),
        found with SCAN: incremental, so Redis keeps serving the daemons
        between steps.
        """
        pattern = glob_escape(self.prefix + prefix) + "*"
        extra = ["TYPE", kind] if kind is not None else []
        found: list[str] = []
        # A cluster's keys are spread over its masters: each is scanned.
        nodes = self.client.masters() if hasattr(self.client, "masters") else [self.client]
        for node in nodes:
            cursor = b"0"
            while True:
                cursor, keys = await node.execute(
                    "SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT, *extra
                )
                found.extend(key.decode("utf-8")[len(self.prefix) :] for key in keys)
                if cursor == b"0":
                    break
        return sorted(set(found))

    def reset_prefix(self, prefix: str) -> Deferred[int]:
        async def reset() -> int:
            keys = await self._scan(prefix, "string")
            removed = 0
            for key in keys:
                # One key at a time: keys of different identities are in
                # different slots of a cluster.
                removed += await self.client.execute("DEL", self.prefix + key)
            return removed

        return Deferred.fromCoroutine(reset())

    def greylist_entries(
        self,
        prefix: str,
        now: float,
        network: Optional[str] = None,
        sender: Optional[str] = None,
        recipient: Optional[str] = None,
    ) -> Deferred[list[GreylistEntry]]:
        async def entries() -> list[GreylistEntry]:
            keys = await self._scan(prefix, "hash")
            # Pipelined: every HMGET and PTTL goes out before the first
            # reply comes back.
            replies = await gatherResults(
                [
                    self.client.execute(
                        "HMGET",
                        self.prefix + key,
                        "first",
                        "passes",
                        "network",
                        "sender",
                        "recipient",
                    )
                    for key in keys
                ]
                + [self.client.execute("PTTL", self.prefix + key) for key in keys],
                consumeErrors=True,
            )
            found = []
            for key, fields, ttl in zip(
                keys, replies[: len(keys)], replies[len(keys) :], strict=True
            ):
                first, passes, *clear = fields
                if first is None or ttl == -2:
                    continue
                triplet = (
                    Triplet(*(part.decode("utf-8") for part in clear))
                    if None not in clear
                    else None
                )
                entry = GreylistEntry(
                    key, triplet, float(first), int(passes or 0), now + max(ttl, 0) / 1000
                )
                if matches(entry, network, sender, recipient):
                    found.append(entry)
            found.sort(key=lambda entry: (entry.first_seen, entry.key))
            return found

        return Deferred.fromCoroutine(entries())

    def delete_greylist(self, keys: Sequence[str]) -> Deferred[int]:
        if not keys:
            return succeed(0)
        d = gatherResults(
            [self.client.execute("DEL", self.prefix + key) for key in keys], consumeErrors=True
        )
        return d.addCallback(sum)

    def whitelist_add(self, entry: WhitelistEntry) -> Deferred[None]:
        d = self.client.execute(
            "HSET",
            self.prefix + WHITELIST_KEY,
            f"{entry.kind}:{entry.value}",
            f"{entry.added!r} {entry.comment}",
        )
        return d.addCallback(lambda reply: None)

    def whitelist_remove(self, kind: str, value: str) -> Deferred[bool]:
        d = self.client.execute("HDEL", self.prefix + WHITELIST_KEY, f"{kind}:{value}")
        return d.addCallback(bool)

    def whitelist_list(self) -> Deferred[list[WhitelistEntry]]:
        d = self.client.execute("HGETALL", self.prefix + WHITELIST_KEY)

        def entries(reply: list[bytes]) -> list[WhitelistEntry]:
            found = []
            for field, value in zip(reply[::2], reply[1::2], strict=True):
                kind, _, name = field.decode("utf-8").partition(":")
                added, _, comment = value.decode("utf-8").partition(" ")
                found.append(WhitelistEntry(kind, name, float(added), comment))
            return sorted(found, key=lambda entry: (entry.kind, entry.value))

        return d.addCallback(entries)

    # Per-message marks of the rules check.

    def set_mark(self, key: str, mark: str, expires_at: float) -> Deferred[None]:
        d = _SET_MARK.run(self.client, [self.prefix + key], [mark, _milliseconds(expires_at)])
        return d.addCallback(lambda reply: None)

    def marks(self, key: str, now: float) -> Deferred[frozenset[str]]:
        d = self.client.execute("HGETALL", self.prefix + key)
        limit = _milliseconds(now)

        def live(reply: list[bytes]) -> frozenset[str]:
            return frozenset(
                field.decode("utf-8")
                for field, expires in zip(reply[::2], reply[1::2], strict=True)
                if int(expires) > limit
            )

        return d.addCallback(live)
