"""
The state layer that stateful checks (quota, greylist) share: the values
that pass through L{pfxpold.interfaces.IStateStore}, and the configuration
of stores.

Stores are configured once, as top-level tables of the configuration file,
and shared by every check that names them::

    [stores.main]
    type = "redis"                      # or "sqlite", "memory"
    endpoint = "tcp:host=127.0.0.1:port=6379"

    [[check]]
    type = "quota"
    store = "main"

A check that names no store uses C{"default"}: the C{[stores.default]}
table when there is one, else an SQLite file C{pfxpold-state.sqlite3} beside
the configuration file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from pfxpold.config import CheckOptions, ConfigError
from pfxpold.interfaces import IStateStore

#: The store a check uses when it names none.
DEFAULT_STORE = "default"
#: The SQLite file of the default store, relative to the configuration file.
DEFAULT_SQLITE_PATH = "pfxpold-state.sqlite3"

#: Greylist verdicts.
NEW = "new"
EARLY = "early"
PASSED = "passed"
KNOWN = "known"
WHITELISTED = "whitelisted"


class StoreError(Exception):
    """
    The store could not do what was asked (unreachable, timed out, failed);
    the check fails and its C{on_error} applies.
    """


@dataclass(frozen=True)
class Counter:
    """
    One limit on one key in one window.

    @ivar key: the key that an addition goes to (the current bucket).
    @ivar read_keys: the keys whose sum is the counter's total: C{(key,)}
        for a fixed window, the buckets still in the window for a sliding
        one. C{key} is always among them.
    @ivar limit: the most the total may reach.
    @ivar expires_at: when C{key} may be forgotten.
    """

    key: str
    read_keys: tuple[str, ...]
    limit: int
    expires_at: float


@dataclass(frozen=True)
class Consumption:
    """
    What L{IStateStore.consume} did.

    @ivar allowed: whether the amount was added to every counter.
    @ivar totals: each counter's total, in the order given (empty when
        C{repeated}).
    @ivar repeated: the message's L{Once} mark was already held: it was
        counted before (by this process or another sharing the store), and
        nothing was added now.
    """

    allowed: bool
    totals: tuple[int, ...]
    repeated: bool = False


@dataclass(frozen=True)
class Once:
    """
    The mark of one counted message (its Postfix C{instance}), kept in the
    store atomically with its count, so that the same message is counted
    once by every process that shares the store.

    @ivar key: the mark's key; it carries the hash tag of the counters it
        goes with (see L{pfxpold.checks.quota.QuotaCheck.once}), so one
        Redis Cluster slot holds both.
    @ivar expires_at: when the mark may be forgotten.
    @ivar instance: the message's Postfix C{instance}, when known: not
        part of the mark's identity (the same message always carries the
        same), only where a store keeps it. The SQLite store keeps marks in
        the order of the arrival time it tells, so that a turn's new marks
        land on one page rather than one each.
    """

    key: str
    expires_at: float
    instance: str = ""


@dataclass(frozen=True)
class GreylistState:
    """
    What a greylist attempt is.

    @ivar verdict: L{NEW} (first attempt, or the retry window passed),
        L{EARLY} (retried before the delay), L{PASSED} (the first retry
        after the delay), L{KNOWN} (a triplet that passed before) or
        L{WHITELISTED} (the client is auto-whitelisted).
    @ivar first_seen: when the triplet was first seen (0 when whitelisted).
    """

    verdict: str
    first_seen: float


@dataclass(frozen=True)
class Triplet:
    """
    A greylisting triplet in clear, as the greylist check compares it
    (sender and recipient normalised), kept with the entry so that
    C{pfxpold-admin} can list entries by any of its parts.
    """

    network: str
    sender: str
    recipient: str


@dataclass(frozen=True)
class GreylistEntry:
    """
    One greylisting triplet as the store holds it.

    @ivar key: the triplet's key (what L{IStateStore.delete_greylist} takes).
    @ivar triplet: the clear triplet, or L{None} for an entry first seen
        before the store kept it.
    @ivar first_seen: when the triplet was first seen.
    @ivar passes: how many times it passed (0: still waiting).
    @ivar expires_at: when the store forgets it.
    """

    key: str
    triplet: Optional[Triplet]
    first_seen: float
    passes: int
    expires_at: float


@dataclass(frozen=True)
class CounterValue:
    """
    A live counter key's value (see L{IStateStore.counters}).
    """

    count: int
    expires_at: float


#: Kinds of run-time whitelist entries.
WHITELIST_CLIENT = "client"
WHITELIST_SENDER = "sender"
WHITELIST_KINDS = (WHITELIST_CLIENT, WHITELIST_SENDER)


@dataclass(frozen=True)
class WhitelistEntry:
    """
    One entry of a store's run-time greylisting whitelist.

    @ivar kind: L{WHITELIST_CLIENT} (C{value} is a network, e.g.
        C{"192.0.2.0/24"}) or L{WHITELIST_SENDER} (C{value} is a sender
        domain; its subdomains match too).
    @ivar added: when it was added.
    @ivar comment: why, in the admin's words.
    """

    kind: str
    value: str
    added: float = 0.0
    comment: str = ""


def _store_types() -> dict[str, Callable[[CheckOptions], Any]]:
    # Imported here: each store module imports this one for its values.
    from pfxpold.state.memory import MemoryStore
    from pfxpold.state.redis import RedisStore
    from pfxpold.state.sqlite import SQLiteStore

    return {"memory": MemoryStore, "sqlite": SQLiteStore, "redis": RedisStore}


def store_options(options: CheckOptions, name: str) -> CheckOptions:
    """
    The C{[stores.NAME]} table of the configuration as typed options, or
    the default store's settings when C{name} is the default and the file
    has no such table.

    @raise ConfigError: when there is no such store.
    """
    # Only this store's entry: a reload keeps the store (and its counters)
    # while other stores are added or changed.
    table = options.section_entry("stores", name)
    if table is None:
        if name != DEFAULT_STORE:
            known = ", ".join(sorted(options.section("stores"))) or "none"
            raise options.error("store", f"no [stores.{name}] table (stores: {known})")
        table = {"type": "sqlite", "path": DEFAULT_SQLITE_PATH}
    if not isinstance(table, dict):
        raise ConfigError(f"{options.config_path or '<configuration>'}: stores.{name}: not a table")
    return CheckOptions(
        table, name=f"stores.{name}", reactor=options.reactor, path=options.config_path
    )


def make_store(options: CheckOptions) -> IStateStore:
    """
    Build a store from its C{[stores.NAME]} options.

    @raise ConfigError: when the table cannot be used.
    """
    types = _store_types()
    kind = options.choice("type", tuple(types))
    store = types[kind](options)
    if options.unused():
        raise options.error(options.unused()[0], "is not a setting of this store type")
    return store


def store_for(options: CheckOptions) -> IStateStore:
    """
    The store a check's C{store} key names (the default store without
    one), shared with every other check of the configuration that names it.

    @raise ConfigError: when it cannot be built.
    """
    name = options.string("store", DEFAULT_STORE)
    return options.shared(("store", name), lambda: make_store(store_options(options, name)))
