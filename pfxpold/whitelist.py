"""
Exemptions read from a file: the greylist check's C{whitelist_file} and the
quota check's C{unlimited_file}, in access(5) syntax, re-read when they
change.

The file is an access map such as the C{file} check reads (client
addresses and networks, host and domain names, addresses, C{@domain} and
C{user@} keys), and it is read and watched by a C{file} check of its own:
the same parser, the same change detection (device, inode, size and
modification time, looked at every C{reload_interval} seconds), the same
rule that a file with an error leaves the table in force. A request is
exempt when, for the first of the lookup attributes with an entry, that
entry says C{OK}; C{DUNNO} carves an exception out of a wider C{OK} entry
(C{192.0.2.7 DUNNO} inside C{192.0.2.0/24 OK}).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional

from twisted.application.service import Service

from pfxpold.accessmap import AccessMap
from pfxpold.action import Action
from pfxpold.checks.file import DEFAULT_RELOAD_INTERVAL, FileCheck
from pfxpold.config import CheckOptions, ConfigError
from pfxpold.request import PolicyRequest

#: The verbs an exemption file may hold.
VERBS = ("OK", "DUNNO")

#: Quota key parts that an access map cannot match as they are, and the
#: attribute whose lookup matches them (a CIDR key matches a network).
_MAP_ATTRIBUTES = {"client_network": "client_address"}


def map_attributes(parts: Sequence[str]) -> list[str]:
    """
    @return: the attributes to look up for C{parts} (a quota's key), in
        order and without repeats.
    """
    found: list[str] = []
    for part in parts:
        attribute = _MAP_ATTRIBUTES.get(part, part)
        if attribute not in found:
            found.append(attribute)
    return found


class ExemptionFile(Service):
    """
    An access map of exemptions, re-read when the file changes.

    @ivar path: the file.
    @ivar lookups: the request attributes looked up, in order.
    """

    def __init__(self, watched: FileCheck) -> None:
        self._watched = watched
        self.path = watched.path
        self.lookups = tuple(watched.lookups)

    def exempt(self, request: PolicyRequest) -> bool:
        """
        Whether the first lookup attribute with an entry in the table in
        force finds C{OK}.
        """
        action = self._watched.check(request)
        return isinstance(action, Action) and action.verb == "OK"

    def reload(self) -> Any:
        """
        Re-read the file if it changed (what the timer does).

        @return: as L{FileCheck.reload}.
        """
        return self._watched.reload()

    def startService(self) -> None:
        super().startService()
        self._watched.startService()

    def stopService(self) -> Any:
        super().stopService()
        return self._watched.stopService()


def exemption_file(
    options: CheckOptions, key: str, default_lookups: Sequence[str]
) -> Optional[ExemptionFile]:
    """
    The exemptions named by C{key} of a check's options (with
    C{KEY_lookup} and C{KEY_reload_interval} beside it), or L{None} when
    C{key} is not set. The file is read now, so that C{--check-config}
    reports a missing or broken file; it is watched while the daemon runs
    (a shared service, started and stopped with it).

    @raise ConfigError: naming the check and C{key} (or the lookup key).
    """
    path = options.path(key, None)
    lookup_key = f"{key}_lookup"
    interval_key = f"{key}_reload_interval"
    lookups = options.strings(lookup_key, list(default_lookups))
    interval = options.number(interval_key, DEFAULT_RELOAD_INTERVAL)
    if path is None:
        for other in (lookup_key, interval_key):
            if other in options:
                raise options.error(other, f"needs {key}")
        return None
    table = {"map": path, "lookup": lookups, "reload_interval": interval}
    inner = CheckOptions(
        table,
        name=options.name,
        reactor=options.reactor,
        path=options.config_path,
        restriction_classes=options.restriction_classes,
    )
    try:
        watched = FileCheck(inner)
    except ConfigError as e:
        # The file check names its own keys: name the caller's instead.
        match = re.search(r"key '(\w+)': (.*)", str(e))
        if match is None:
            raise
        ours = {"lookup": lookup_key, "reload_interval": interval_key}.get(match.group(1), key)
        raise options.error(ours, match.group(2)) from None
    assert isinstance(watched.map, AccessMap)
    verbs = sorted({action.verb for action in watched.map.actions()} - set(VERBS))
    if verbs:
        raise options.error(
            key, f"{path}: entries may say OK or DUNNO only, not {', '.join(verbs)}"
        )
    shared_key = ("exemption file", options.name, key, path, tuple(lookups), interval)
    return options.shared(shared_key, lambda: ExemptionFile(watched))
