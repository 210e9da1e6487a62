"""
C{pfxpold-admin}: look at and change the state the quota and greylist
checks keep (counters, triplets, the run-time whitelist), in the SQLite or
Redis store the configuration names, while the daemons run.

    pfxpold-admin --config /etc/pfxpold/pfxpold.toml quota show --sasl-username alice
    pfxpold-admin --config ... quota reset --sasl-username alice
    pfxpold-admin --config ... greylist list --client 192.0.2.7
    pfxpold-admin --config ... whitelist add --client 192.0.2.0/24 --comment "ticket 123"

Everything goes through L{pfxpold.interfaces.IStateStore}, and every key is
computed by the check the configuration names, with its own functions: the
tool finds what the daemon wrote from the values a person has (a login, an
address, a client IP).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional, TextIO

from twisted.application.service import IService
from twisted.internet.defer import Deferred, TimeoutError

from pfxpold.checks.greylist import GreylistCheck, whitelist_entry
from pfxpold.checks.quota import QuotaCheck
from pfxpold.config import ConfigError, load_configuration
from pfxpold.interfaces import IStateStore
from pfxpold.request import PolicyRequest
from pfxpold.state import (
    WHITELIST_CLIENT,
    WHITELIST_SENDER,
    CounterValue,
    GreylistEntry,
    StoreError,
    WhitelistEntry,
)
from pfxpold.state.memory import ExpiringStore, MemoryStore
from pfxpold.state.redis import RedisStore
from pfxpold.state.sqlite import SQLiteStore

PROGRAM = "pfxpold-admin"
DEFAULT_TIMEOUT = 10.0


class AdminError(Exception):
    """
    What the tool could not do, in one line for the person who asked.
    """


def _common_options(default: Any) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        default=default,
        help="the daemon's TOML configuration (default: $PFXPOLD_CONFIG)",
    )
    common.add_argument(
        "--check",
        default=default,
        metavar="NAME",
        help="the quota or greylist check to use, when the configuration has several",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=default,
        help=f"seconds to wait for the store (default: {DEFAULT_TIMEOUT:g})",
    )
    common.add_argument(
        "--json", action="store_true", default=default, help="print JSON, not a table"
    )
    return common


def make_parser() -> argparse.ArgumentParser:
    """
    The command line of C{pfxpold-admin}.
    """
    # The common options are accepted before and after the command; the
    # copies after it (their own parser: parents share their actions)
    # keep the value given before unless given again.
    common = _common_options(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        parents=[_common_options(None)],
        description=(
            "Show and change the state of pfxpold's quota and greylist checks in the"
            " SQLite or Redis store its configuration names."
        ),
    )
    parser.set_defaults(timeout=DEFAULT_TIMEOUT, json=False)
    areas = parser.add_subparsers(dest="area", metavar="{quota,greylist,whitelist}")
    areas.required = True

    quota = areas.add_parser("quota", help="a quota check's counters")
    quota_commands = quota.add_subparsers(dest="command", metavar="{show,reset}")
    quota_commands.required = True
    show = quota_commands.add_parser(
        "show", parents=[common], help="an identity's counts, limits and when they reset"
    )
    reset = quota_commands.add_parser(
        "reset", parents=[common], help="forget an identity's counts (or --all)"
    )
    for command in (show, reset):
        command.add_argument(
            "--identity",
            help="the identity as the daemon logs it (e.g. alice or alice,192.0.2.0/24)",
        )
        command.add_argument("--sasl-username", metavar="LOGIN")
        command.add_argument("--sender", metavar="ADDRESS")
        command.add_argument("--client-address", metavar="IP")
        command.add_argument("--recipient", metavar="ADDRESS")
    reset.add_argument("--all", action="store_true", help="every identity's counts")

    greylist = areas.add_parser("greylist", help="a greylist check's triplets")
    greylist_commands = greylist.add_subparsers(dest="command", metavar="{list,delete}")
    greylist_commands.required = True
    listing = greylist_commands.add_parser(
        "list", parents=[common], help="the triplets of a client, a sender or a recipient"
    )
    delete = greylist_commands.add_parser(
        "delete", parents=[common], help="forget triplets (all of those the options select)"
    )
    for command in (listing, delete):
        command.add_argument("--client", metavar="IP", help="a client address")
        command.add_argument("--sender", metavar="ADDRESS")
        command.add_argument("--recipient", metavar="ADDRESS")
    delete.add_argument("--key", action="append", default=[], help="a key from the listing")

    whitelist = areas.add_parser("whitelist", help="the store's run-time greylisting whitelist")
    whitelist_commands = whitelist.add_subparsers(dest="command", metavar="{list,add,remove}")
    whitelist_commands.required = True
    whitelist_commands.add_parser("list", parents=[common], help="the entries")
    add = whitelist_commands.add_parser("add", parents=[common], help="add an entry")
    remove = whitelist_commands.add_parser("remove", parents=[common], help="remove an entry")
    for command in (add, remove):
        which = command.add_mutually_exclusive_group(required=True)
        which.add_argument("--client", metavar="NETWORK", help="a client network or address")
        which.add_argument(
            "--sender-domain", metavar="DOMAIN", help="a sender domain (and its subdomains)"
        )
    add.add_argument("--comment", default="", help="why, for the next admin")
    return parser


def find_check(configuration: Any, kind: type, name: Optional[str]) -> Any:
    """
    The check of type C{kind} named C{name}, or the only one.

    @raise AdminError: when there is none, or several and no name.
    """
    label = "quota" if kind is QuotaCheck else "greylist"
    found = [entry for entry in configuration.chain.entries if isinstance(entry.check, kind)]
    names = ", ".join(entry.name for entry in found) or "none"
    if name is not None:
        for entry in found:
            if entry.name == name:
                return entry.check
        raise AdminError(
            f"{configuration.path}: no {label} check named {name!r} ({label}: {names})"
        )
    if len(found) != 1:
        if not found:
            raise AdminError(f"{configuration.path}: has no {label} check")
        raise AdminError(
            f"{configuration.path}: several {label} checks ({names}); use --check NAME"
        )
    return found[0].check


def prepare_store(store: IStateStore, timeout: float) -> None:
    """
    Make a store ready for the tool: reachable from outside the daemon,
    and bounded by C{timeout}.

    @raise AdminError: for the in-memory store, or an SQLite file that
        does not exist (opening it would create an empty one).
    """
    if isinstance(store, MemoryStore):
        raise AdminError(
            f"{store.name} is a memory store: its state lives inside the daemon and"
            " cannot be reached from outside; pfxpold-admin needs an SQLite or Redis store"
        )
    if isinstance(store, ExpiringStore):
        # The daemons sweep expired entries; the tool only looks.
        store.sweeper.disownServiceParent()
    if isinstance(store, SQLiteStore):
        if not os.path.exists(store.path):
            raise AdminError(f"{store.name}: {store.path}: no such file (has the daemon run?)")
        # Opening the file when the store starts, then the command, may
        # each wait for another process's lock: both within the timeout,
        # so that SQLite's own "database is locked" is what is said.
        store.busy_timeout = timeout / 2
    if isinstance(store, RedisStore):
        store.client.timeout = timeout


def _request(arguments: argparse.Namespace) -> PolicyRequest:
    attributes = {}
    for name in ("sasl_username", "sender", "client_address", "recipient"):
        value = getattr(arguments, name, None)
        if value is not None:
            attributes[name] = value
    return PolicyRequest(attributes)


def quota_identity(check: QuotaCheck, arguments: argparse.Namespace) -> str:
    """
    The identity the quota check counts against, computed by the check
    itself from the values given (or given as it is with C{--identity}).

    @raise AdminError: when the values do not make one.
    """
    if arguments.identity is not None:
        return str(arguments.identity)
    identity = check.identity(_request(arguments))
    if identity is None:
        # The option each key part is computed from, once each.
        given_by = {"sender_domain": "sender", "client_network": "client_address"}
        given_by["recipient_domain"] = "recipient"
        options = dict.fromkeys(
            "--" + given_by.get(part, part).replace("_", "-") for part in check.key_parts
        )
        raise AdminError(
            f"quota {check.name} counts by {', '.join(check.key_parts)}:"
            f" give {' '.join(options)} (or --identity)"
        )
    return identity


async def quota_show(check: QuotaCheck, identity: str) -> dict[str, Any]:
    """
    An identity's counts in each of the check's windows, with their limits
    and when each count is back to zero.
    """
    now = check.now()
    counters = check.counters_for(identity, now)
    result: dict[str, Any] = {
        "check": check.name,
        "store": check.store.name,
        "identity": identity,
        "unlimited": not counters,
        "now": now,
        "limits": [],
    }
    if not counters:
        return result
    keys = [key for counter in counters for key in counter.read_keys]
    values: dict[str, CounterValue] = await check.store.counters(keys, now)
    for window, counter in zip(check.windows, counters, strict=True):
        resets: Optional[float]
        counts = [values[key].count if key in values else 0 for key in counter.read_keys]
        count = sum(counts)
        if window.period == "sliding":
            # read_keys go from the newest bucket back: the count is zero
            # once the newest bucket that holds something has left.
            newest = next((i for i, c in enumerate(counts) if c), None)
            current = int(now // window.precision)
            resets = (
                None
                if newest is None
                else (current - newest + 1) * window.precision + window.seconds
            )
            period = f"sliding {window.seconds}s"
        else:
            resets = window.bounds(now)[1] if count else None
            period = window.period
        result["limits"].append(
            {
                "limit": window.name,
                "period": period,
                "count": count,
                "max": counter.limit,
                "resets_at": resets,
                "keys": list(counter.read_keys),
            }
        )
    return result


async def quota_reset(
    check: QuotaCheck, identity: Optional[str], everything: bool
) -> dict[str, Any]:
    """
    Forget an identity's counts in the current windows, or every count of
    the check.
    """
    if everything:
        removed = await check.store.reset_prefix(check.key_prefix())
        return {"check": check.name, "identity": None, "removed": removed}
    assert identity is not None
    counters = check.counters_for(identity, check.now())
    keys = sorted({key for counter in counters for key in counter.read_keys})
    removed = await check.store.reset(keys)
    return {"check": check.name, "identity": identity, "removed": removed}


def greylist_filters(
    check: GreylistCheck, arguments: argparse.Namespace
) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """
    The client network, sender and recipient to select, normalised by the
    check as it normalises a request's.

    @raise AdminError: for a client that is not an address.
    """
    network = None
    if arguments.client is not None:
        try:
            network = check.client_network(ipaddress.ip_address(arguments.client.strip("[]")))
        except ValueError:
            raise AdminError(f"--client {arguments.client!r} is not an IP address") from None
    clear = check.triplet(network or "", arguments.sender or "", arguments.recipient or "")
    return (
        network,
        clear.sender if arguments.sender is not None else None,
        clear.recipient if arguments.recipient is not None else None,
    )


def _entry_json(check: GreylistCheck, entry: GreylistEntry, now: float) -> dict[str, Any]:
    if entry.passes:
        state = "passed"
    elif now < entry.first_seen + check.delay:
        state = "waiting"
    else:
        state = "ready"
    clear = entry.triplet
    return {
        "client_network": clear.network if clear else None,
        "sender": clear.sender if clear else None,
        "recipient": clear.recipient if clear else None,
        "state": state,
        "passes": entry.passes,
        "first_seen": entry.first_seen,
        "age": max(0.0, now - entry.first_seen),
        "passes_at": entry.first_seen + check.delay,
        "expires_at": entry.expires_at,
        "key": entry.key,
    }


async def greylist_list(check: GreylistCheck, arguments: argparse.Namespace) -> dict[str, Any]:
    """
    The triplets of a client, a sender or a recipient (or all).
    """
    network, sender, recipient = greylist_filters(check, arguments)
    now = check.now()
    entries = await check.store.greylist_entries(
        check.key_prefix(network), now, network, sender, recipient
    )
    return {
        "check": check.name,
        "store": check.store.name,
        "now": now,
        "entries": [_entry_json(check, entry, now) for entry in entries],
    }


async def greylist_delete(check: GreylistCheck, arguments: argparse.Namespace) -> dict[str, Any]:
    """
    Forget the triplets named by C{--key}, by all three of C{--client},
    C{--sender} and C{--recipient}, or every one that fewer select.

    @raise AdminError: when nothing selects any.
    """
    keys = list(arguments.key)
    network, sender, recipient = greylist_filters(check, arguments)
    if network is not None and sender is not None and recipient is not None:
        keys.append(check.keys(check.triplet(network, sender, recipient))[0])
    elif network is not None or sender is not None or recipient is not None:
        entries = await check.store.greylist_entries(
            check.key_prefix(network), check.now(), network, sender, recipient
        )
        keys.extend(entry.key for entry in entries)
    elif not keys:
        raise AdminError("greylist delete: give --key, or --client, --sender and/or --recipient")
    removed = await check.store.delete_greylist(keys) if keys else 0
    return {"check": check.name, "removed": removed, "keys": keys}


def _whitelist_request(arguments: argparse.Namespace, now: float) -> WhitelistEntry:
    kind, value = (
        (WHITELIST_CLIENT, arguments.client)
        if arguments.client is not None
        else (WHITELIST_SENDER, arguments.sender_domain)
    )
    try:
        return whitelist_entry(kind, value, now, getattr(arguments, "comment", ""))
    except ValueError as e:
        raise AdminError(f"whitelist: {e}") from None


def _entry_of_whitelist(entry: WhitelistEntry) -> dict[str, Any]:
    return {
        "kind": entry.kind,
        "value": entry.value,
        "added": entry.added,
        "comment": entry.comment,
    }


async def whitelist(check: GreylistCheck, arguments: argparse.Namespace) -> dict[str, Any]:
    """
    List, add or remove entries of the store's run-time whitelist.
    """
    store = check.store
    result: dict[str, Any] = {"store": store.name, "refresh": check.whitelist_refresh}
    if arguments.command == "add":
        entry = _whitelist_request(arguments, check.reactor.seconds())
        await store.whitelist_add(entry)
        result["added"] = _entry_of_whitelist(entry)
    elif arguments.command == "remove":
        entry = _whitelist_request(arguments, 0.0)
        result["removed"] = await store.whitelist_remove(entry.kind, entry.value)
        result["entry"] = _entry_of_whitelist(entry)
    else:
        entries = await store.whitelist_list()
        result["entries"] = [_entry_of_whitelist(entry) for entry in entries]
    return result


# Output.


def when(timestamp: Optional[float], now: float) -> str:
    """
    A time for a table: UTC, and how far from C{now}.
    """
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({duration(timestamp - now, signed=True)})"


def duration(seconds: float, signed: bool = False) -> str:
    """
    C{seconds} as C{"1d 2h"}, C{"5m 3s"}...; with C{signed}, C{"in ..."}
    for the future and C{"... ago"} for the past.
    """
    value = int(abs(seconds))
    days, rest = divmod(value, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2] or ["0s"]
    text = " ".join(shown)
    if not signed:
        return text
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """
    Rows under headers, in columns as wide as their widest cell.
    """
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def _text(value: Optional[str]) -> str:
    # Entries hold what mail clients sent: no control character reaches
    # the terminal.
    if value is None:
        return "?"
    if value == "":
        return "<>"
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)


def render(arguments: argparse.Namespace, result: dict[str, Any]) -> str:
    """
    A command's result as the tables a person reads.
    """
    area, command = arguments.area, arguments.command
    if area == "quota" and command == "show":
        head = f"quota {result['check']} ({result['store']}): {_text(result['identity'])}"
        if result["unlimited"]:
            return f"{head}: unlimited (nothing is counted)"
        rows = [
            [
                limit["limit"],
                limit["period"],
                str(limit["count"]),
                str(limit["max"]),
                when(limit["resets_at"], result["now"]),
            ]
            for limit in result["limits"]
        ]
        return head + "\n" + table(["LIMIT", "PERIOD", "COUNT", "MAX", "BACK TO 0 AT"], rows)
    if area == "quota":
        who = "every identity" if result["identity"] is None else _text(result["identity"])
        return f"quota {result['check']}: {who}: {result['removed']} counter keys removed"
    if area == "greylist" and command == "list":
        now = result["now"]
        if not result["entries"]:
            return f"greylist {result['check']} ({result['store']}): no entries"
        rows = [
            [
                _text(entry["client_network"]),
                _text(entry["sender"]),
                _text(entry["recipient"]),
                entry["state"] + (f" ({entry['passes']}x)" if entry["passes"] else ""),
                duration(entry["age"]),
                when(entry["expires_at"], now),
                entry["key"],
            ]
            for entry in result["entries"]
        ]
        headers = ["CLIENT", "SENDER", "RECIPIENT", "STATE", "AGE", "FORGOTTEN AT", "KEY"]
        return table(headers, rows)
    if area == "greylist":
        return f"greylist {result['check']}: {result['removed']} entries removed"
    if command == "add":
        entry = result["added"]
        return (
            f"whitelist ({result['store']}): {entry['kind']} {entry['value']} added; greylist"
            f" checks honour it within {result['refresh']:g}s"
        )
    if command == "remove":
        entry = result["entry"]
        if not result["removed"]:
            return f"whitelist ({result['store']}): no {entry['kind']} {entry['value']}"
        return f"whitelist ({result['store']}): {entry['kind']} {entry['value']} removed"
    if not result["entries"]:
        return f"whitelist ({result['store']}): empty"
    rows = [
        [
            entry["kind"],
            _text(entry["value"]),
            datetime.datetime.fromtimestamp(entry["added"], datetime.UTC).strftime(
                "%Y-%m-%d %H:%M:%S UTC"
            ),
            _text(entry["comment"]),
        ]
        for entry in result["entries"]
    ]
    return table(["KIND", "VALUE", "ADDED", "COMMENT"], rows)


def exit_status(arguments: argparse.Namespace, result: dict[str, Any]) -> int:
    """
    1 when a delete or remove found nothing to remove, else 0.
    """
    if arguments.command in ("delete", "remove"):
        return 0 if result["removed"] else 1
    return 0


async def execute(reactor: Any, arguments: argparse.Namespace) -> dict[str, Any]:
    """
    Load the configuration, start the store the command needs, run the
    command within C{--timeout}, and stop the store.

    @raise AdminError: with the one line to print.
    """
    if not arguments.config:
        raise AdminError("no configuration: give --config FILE (or set $PFXPOLD_CONFIG)")
    try:
        configuration = load_configuration(arguments.config, reactor)
    except ConfigError as e:
        raise AdminError(str(e)) from None
    kind = QuotaCheck if arguments.area == "quota" else GreylistCheck
    check = find_check(configuration, kind, arguments.check)
    store = check.store
    prepare_store(store, arguments.timeout)
    if arguments.area == "quota":
        if arguments.command == "reset" and arguments.all:
            work = quota_reset(check, None, True)
        else:
            identity = quota_identity(check, arguments)
            if arguments.command == "show":
                work = quota_show(check, identity)
            else:
                work = quota_reset(check, identity, False)
    elif arguments.area == "greylist":
        work = (greylist_list if arguments.command == "list" else greylist_delete)(check, arguments)
    else:
        work = whitelist(check, arguments)
    service = IService(store)
    service.startService()
    try:
        running = Deferred.fromCoroutine(work)
        # A little over the store's own timeout, so that its message (not
        # connected, database is locked) is the one shown.
        running.addTimeout(arguments.timeout + 0.5, reactor)
        return await running
    except TimeoutError:
        raise AdminError(
            f"store unreachable: {_describe(store)}: no answer within {arguments.timeout:g}s"
        ) from None
    except StoreError as e:
        raise AdminError(f"store unreachable: {e}") from None
    finally:
        stopping = service.stopService()
        if isinstance(stopping, Deferred):
            stopping.addTimeout(arguments.timeout, reactor)
            try:
                await stopping
            except Exception:
                # Stopping is best effort: the answer (or error) stands.
                pass


def _describe(store: Any) -> str:
    if isinstance(store, SQLiteStore):
        return f"{store.name}: {store.path}"
    if isinstance(store, RedisStore):
        return store.client.description
    return str(store.name)


async def _main(reactor: Any, arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        result = await execute(reactor, arguments)
    except AdminError as e:
        print(f"{PROGRAM}: {' '.join(str(e).split())}", file=err)
        return 2
    if arguments.json:
        print(json.dumps(result, indent=2, sort_keys=True), file=out)
    else:
        print(render(arguments, result), file=out)
    return exit_status(arguments, result)


def main(argv: Optional[list[str]] = None) -> None:
    """
    Run C{pfxpold-admin}; exits with 0 when done, 1 when a delete or
    remove found nothing, 2 when it could not be done (one line on
    standard error).
    """
    from twisted.internet.task import react

    arguments = make_parser().parse_args(argv)
    if not arguments.config:
        arguments.config = os.environ.get("PFXPOLD_CONFIG") or None

    async def run(reactor: Any) -> None:
        status = await _main(reactor, arguments, sys.stdout, sys.stderr)
        if status:
            raise SystemExit(status)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
