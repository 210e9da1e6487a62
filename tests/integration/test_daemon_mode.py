"""
Daemon mode: C{twistd --pidfile P --logfile L pfxpold} (no C{-n}) forks
into the background, writes the daemon's PID, answers, and on SIGTERM to
that PID exits and removes its pidfile, which after C{--uid} it can only
do in a directory the service user may write.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import pytest

from tests.integration.deployment import (
    SERVICE_GROUP,
    SERVICE_USER,
    SYSTEM_PYTHON,
    Installation,
    build_jail,
    process_gone,
    process_ids,
    read_file,
    require_root,
    wait_until,
    world_readable_directory,
)
from tests.integration.support import PolicyClient, free_port, require_program

DEMO_ANSWERS = {"OK (you win!)", "DUNNO (you lose!)"}


@contextmanager
def daemonized(
    installation: Installation,
    directory: str,
    twistd_arguments: list[str],
    port: int,
    pidfile: Optional[str] = None,
) -> Iterator[int]:
    """
    Start C{twistd TWISTD_ARGUMENTS pfxpold --port PORT} in the background
    and wait for the launcher to exit (it exits once the daemon has
    started).

    @param pidfile: where the pidfile is, if not at the C{--pidfile}
        argument's path.
    @return: the daemon's PID, from its pidfile.
    """
    (pidfile_argument,) = [
        argument.split("=", 1)[1]
        for argument in twistd_arguments
        if argument.startswith("--pidfile=")
    ]
    pidfile = pidfile or pidfile_argument
    launcher = installation.run(
        ["twistd", *twistd_arguments, "pfxpold", "--port", f"tcp:{port}:interface=127.0.0.1"],
        cwd=directory,
    )
    pid = None
    try:
        assert launcher.returncode == 0, launcher.stdout + launcher.stderr
        pid = int(read_file(pidfile))
        yield pid
    finally:
        if pid is not None and not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_daemonizes_writes_pidfile_and_stops_on_sigterm(pfxpold_installation, world_readable_tmp):
    """
    twistd --pidfile P --logfile L pfxpold returns once the daemon serves;
    P holds the PID of a running twistd that is not the launcher and is
    detached (in a new session); it answers; SIGTERM to that PID stops it
    and removes P.
    """
    work = world_readable_tmp
    pidfile = os.path.join(work, "pfxpold.pid")
    log_path = os.path.join(work, "pfxpold.log")
    port = free_port()
    with daemonized(
        pfxpold_installation, work, [f"--pidfile={pidfile}", f"--logfile={log_path}"], port
    ) as pid:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert b"twistd" in cmdline.read()
        # Double fork: a new session, of which it is not the leader.
        assert os.getsid(pid) not in (os.getsid(0), pid)
        with PolicyClient(port) as client:
            answer = client.ask({"sender": "daemon@example.com"})
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: process_gone(pid), what=f"daemon {pid} exits on SIGTERM")
        wait_until(lambda: not os.path.exists(pidfile), what="pidfile removed")
    assert answer in DEMO_ANSWERS
    log = read_file(log_path)
    assert "from=<daemon@example.com>" in log
    assert "Server Shut Down." in log


@pytest.mark.parametrize(
    ("directory_owner", "removed"),
    [(SERVICE_USER, True), ("root", False)],
    ids=["run-directory-of-the-service-user", "root-directory"],
)
def test_pidfile_after_dropping_privileges(
    pfxpold_installation, world_readable_tmp, directory_owner, removed
):
    """
    Daemonized with --uid nobody, the daemon runs as nobody; on SIGTERM it
    removes its pidfile when nobody owns the pidfile's directory (the
    README's /run/pfxpold), and leaves it behind with a warning in a
    directory of root's.
    """
    require_root()
    require_program(SYSTEM_PYTHON, "python3")
    work = world_readable_tmp
    run_directory = world_readable_directory(work, "run")
    os.chown(
        run_directory,
        pwd.getpwnam(directory_owner).pw_uid,
        grp.getgrnam(SERVICE_GROUP if directory_owner == SERVICE_USER else "root").gr_gid,
    )
    pidfile = os.path.join(run_directory, "pfxpold.pid")
    log_path = os.path.join(work, "pfxpold.log")
    port = free_port()
    arguments = [f"--pidfile={pidfile}", f"--logfile={log_path}"]
    arguments += ["--uid", SERVICE_USER, "--gid", SERVICE_GROUP]
    with daemonized(pfxpold_installation, work, arguments, port) as pid:
        uid = process_ids(pid)["Uid"]
        with PolicyClient(port) as client:
            answer = client.ask({"sender": "pidfile@example.com"})
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: process_gone(pid), what=f"daemon {pid} exits on SIGTERM")
    assert uid == [pwd.getpwnam(SERVICE_USER).pw_uid] * 4
    assert answer in DEMO_ANSWERS
    log = read_file(log_path)
    assert "Server Shut Down." in log
    assert os.path.exists(pidfile) is not removed
    assert ("No permission to delete pid file" in log) is not removed


def test_pidfile_is_inside_the_chroot_jail(pfxpold_installation, world_readable_tmp):
    """
    Daemonized with --chroot, twistd writes the pidfile after changing
    root: --pidfile=/run/pfxpold.pid lands in JAIL/run/pfxpold.pid (with
    the daemon's PID), and is removed from there on SIGTERM when the
    service user owns JAIL/run.
    """
    require_root()
    require_program(SYSTEM_PYTHON, "python3")
    work = world_readable_tmp
    jail = build_jail(os.path.join(work, "jail"))
    jail_run = world_readable_directory(jail, "run")
    os.chown(jail_run, pwd.getpwnam(SERVICE_USER).pw_uid, grp.getgrnam(SERVICE_GROUP).gr_gid)
    pidfile_in_jail = os.path.join(jail_run, "pfxpold.pid")
    log_path = os.path.join(work, "pfxpold.log")
    port = free_port()
    arguments = ["--pidfile=/run/pfxpold.pid", f"--logfile={log_path}", "--chroot", jail]
    arguments += ["--uid", SERVICE_USER, "--gid", SERVICE_GROUP]
    with daemonized(pfxpold_installation, work, arguments, port, pidfile_in_jail) as pid:
        assert os.readlink(f"/proc/{pid}/root") == jail
        with PolicyClient(port) as client:
            answer = client.ask({"sender": "jailed-daemon@example.com"})
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: process_gone(pid), what=f"daemon {pid} exits on SIGTERM")
    assert answer in DEMO_ANSWERS
    assert not os.path.exists(pidfile_in_jail)
    assert "from=<jailed-daemon@example.com>" in read_file(log_path)
