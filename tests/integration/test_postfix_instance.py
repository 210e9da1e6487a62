"""
The private Postfix of the end-to-end tests (tests/integration/postfix.py)
leaves no process behind: not after a test passes, not after one fails.
"""

from __future__ import annotations

import os
import smtplib

import pytest

from tests.integration.postfix import group_members, running_postfix
from tests.integration.support import free_port


def _names(pids: list[int]) -> set[str]:
    """The program names of the processes C{pids} that still exist."""
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", encoding="ascii", errors="replace") as f:
                names.add(f.read().strip())
        except OSError:
            pass
    return names


def _alive(pid: int) -> bool:
    """Whether C{pid} is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _start_daemons(postfix) -> tuple[list[int], set[str]]:
    """
    Make the instance fork an smtpd (an SMTP session) besides its qmgr,
    and return the PIDs and the names of its processes.
    """
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=15) as smtp:
        smtp.ehlo("client.test.example")
        members = group_members(postfix.process_group)
        return members, _names(members)


def test_stop_leaves_no_process():
    """
    After a Postfix instance is stopped, none of its processes remains:
    neither the master nor its qmgr or smtpd.
    """
    with running_postfix(free_port()) as postfix:
        group = postfix.process_group
        members, names = _start_daemons(postfix)
        assert postfix.process.pid in members
        assert {"master", "qmgr", "smtpd"} <= names
    assert group_members(group) == []
    assert [pid for pid in members if _alive(pid)] == []


def test_failing_test_leaves_no_process():
    """
    A test failing inside the block still stops every process of the
    instance.
    """
    with pytest.raises(RuntimeError, match="the test failed"):
        with running_postfix(free_port()) as postfix:
            group = postfix.process_group
            members, names = _start_daemons(postfix)
            raise RuntimeError("the test failed")
    assert {"master", "qmgr", "smtpd"} <= names
    assert group_members(group) == []
    assert [pid for pid in members if _alive(pid)] == []
    assert not os.path.exists(postfix.directory)
