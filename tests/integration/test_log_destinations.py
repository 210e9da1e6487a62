"""
Where a production pfxpold logs, tested for real as root:

  - syslog: each daemon runs in a private mount namespace (C{unshare
    --mount}) whose C{/dev} is a directory of this test's, holding the
    host's null/zero/random/urandom/full device nodes and, as C{/dev/log},
    a datagram socket the test reads. The received lines show the facility
    (C{PRI = facility * 8 + severity}): C{user} for twistd's own
    C{--syslog}, C{mail} for C{--logger pfxpold.logger.mail_syslog}, also
    after C{--chroot} and C{--uid}.
  - C{--logfile} rotation after C{--uid}: twistd rotates at 1 MB, but only
    when the service user may write both the directory and the file.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import socket
import subprocess
import time

import pytest

from tests.integration.deployment import (
    SERVICE_GROUP,
    SERVICE_USER,
    SYSTEM_PYTHON,
    build_jail,
    listening_on,
    process_gone,
    read_file,
    require_mount_namespace,
    require_root,
    running_twistd,
    wait_until,
    world_readable_directory,
)
from tests.integration.support import (
    PolicyClient,
    encode_request,
    free_port,
    read_reply,
    require_program,
)

LOG_USER = 1
LOG_MAIL = 2
LOG_WARNING = 4
LOG_INFO = 6

#: Runs in the new mount namespace: put the host's device nodes into the
#: test's directory, mount that directory over /dev (only this namespace
#: sees it), and exec twistd.
_NAMESPACE_SCRIPT = """
dev=$1
shift
for node in null zero random urandom full; do
    mount --bind "/dev/$node" "$dev/$node"
done
mount --rbind "$dev" /dev
exec "$@"
"""

#: <PRI>Mmm dd hh:mm:ss TAG[PID]: message, as glibc's syslog(3) sends it.
_SYSLOG_LINE = re.compile(
    r"<(?P<pri>\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d (?P<tag>[^\[:]+)(?:\[(?P<pid>\d+)\])?: "
    r"(?P<message>.*)",
    re.DOTALL,
)


def _require_prerequisites(installation, namespace: bool = True) -> None:
    require_root()
    require_program(SYSTEM_PYTHON, "python3")
    assert installation.base_python == SYSTEM_PYTHON
    if namespace:
        require_program("unshare", "util-linux")
        require_mount_namespace()


def _fake_dev(directory: str) -> tuple[str, socket.socket]:
    """
    A directory to mount over /dev: empty files on which the namespace
    script binds the host's device nodes, and C{log}, a datagram socket
    bound by this test.
    """
    dev = world_readable_directory(directory, "dev")
    for node in ("null", "zero", "random", "urandom", "full"):
        open(os.path.join(dev, node), "w").close()
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(os.path.join(dev, "log"))
    os.chmod(os.path.join(dev, "log"), 0o666)
    receiver.settimeout(0.2)
    return dev, receiver


def _receive_until(receiver: socket.socket, text: str, timeout: float = 15.0) -> list[dict]:
    """
    Read syslog datagrams until one contains C{text}.

    @return: every datagram read, parsed.
    """
    received = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            datagram = receiver.recv(65536).decode("utf-8", "replace")
        except TimeoutError:
            continue
        match = _SYSLOG_LINE.match(datagram)
        assert match, datagram
        received.append(match.groupdict())
        if text in datagram:
            return received
    raise AssertionError(f"no syslog line with {text!r} in {timeout}s; got {received!r}")


@pytest.mark.parametrize(
    ("logger_arguments", "chroot", "facility"),
    [
        (["--syslog", "--prefix", "pfxpold"], False, LOG_USER),
        (["--logger", "pfxpold.logger.mail_syslog"], False, LOG_MAIL),
        (["--logger", "pfxpold.logger.mail_syslog"], True, LOG_MAIL),
    ],
    ids=["twistd-syslog-is-user", "mail-syslog", "mail-syslog-in-chroot"],
)
def test_syslog_facility(pfxpold_installation, tmp_path, logger_arguments, chroot, facility):
    """
    Run as root with --uid nobody (and --chroot into a jail without
    /dev/log), twistd's --syslog logs to the user facility, while
    --logger pfxpold.logger.mail_syslog logs to mail, tagged pfxpold[PID],
    with the demo warning at warning and the per-request line at info
    severity: it connected to /dev/log before the chroot and the drop.
    """
    _require_prerequisites(pfxpold_installation)
    work = world_readable_directory(str(tmp_path), "work")
    dev, receiver = _fake_dev(work)
    port = free_port()
    arguments = ["-n", "--pidfile=", *logger_arguments]
    if chroot:
        arguments += ["--chroot", build_jail(os.path.join(work, "jail"))]
    arguments += ["--uid", SERVICE_USER, "--gid", SERVICE_GROUP, "pfxpold"]
    arguments += ["--port", f"tcp:{port}:interface=127.0.0.1"]
    wrapper = ["unshare", "--mount", "--propagation", "private"]
    wrapper += ["sh", "-ec", _NAMESPACE_SCRIPT, "sh", dev]
    with (
        receiver,
        running_twistd(
            pfxpold_installation, work, arguments, listening_on(port), wrapper=wrapper
        ) as twistd,
    ):
        with PolicyClient(port) as client:
            answer = client.ask({"sender": "syslog@example.com", "client_address": "192.0.2.9"})
        received = _receive_until(receiver, "from=<syslog@example.com>")
        pid = twistd.pid
    assert answer in ("OK (you win!)", "DUNNO (you lose!)")
    assert {int(line["pri"]) // 8 for line in received} == {facility}
    assert {line["tag"] for line in received} == {"pfxpold"}
    request_line = received[-1]
    assert "[192.0.2.9] helo=<> from=<syslog@example.com>" in request_line["message"]
    assert int(request_line["pri"]) == facility * 8 + LOG_INFO
    if facility == LOG_MAIL:
        assert {line["pid"] for line in received} == {str(pid)}
        (warning,) = [line for line in received if "is the demo check" in line["message"]]
        assert int(warning["pri"]) == LOG_MAIL * 8 + LOG_WARNING
        assert any("set uid/gid" in line["message"] for line in received)


def test_mail_syslog_when_daemonized(pfxpold_installation, world_readable_tmp):
    """
    Daemonized (no -n) with --logger pfxpold.logger.mail_syslog and --uid,
    the daemon (whose PID is in the pidfile) still logs to the mail
    facility: the syslog connection survives the fork; on SIGTERM it logs
    its shutdown there too, and removes its pidfile from the service user's
    run directory.
    """
    _require_prerequisites(pfxpold_installation)
    work = world_readable_tmp
    dev, receiver = _fake_dev(work)
    run_directory = world_readable_directory(work, "run")
    os.chown(run_directory, pwd.getpwnam(SERVICE_USER).pw_uid, grp.getgrnam(SERVICE_GROUP).gr_gid)
    pidfile = os.path.join(run_directory, "pfxpold.pid")
    port = free_port()
    command = ["unshare", "--mount", "--propagation", "private"]
    command += ["sh", "-ec", _NAMESPACE_SCRIPT, "sh", dev, pfxpold_installation.program("twistd")]
    command += [f"--pidfile={pidfile}", "--logger", "pfxpold.logger.mail_syslog"]
    command += ["--uid", SERVICE_USER, "--gid", SERVICE_GROUP, "pfxpold", "--port", str(port)]
    pid = None
    with receiver:
        try:
            launcher = subprocess.run(
                command,
                cwd=work,
                env=pfxpold_installation.environment(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert launcher.returncode == 0, launcher.stdout + launcher.stderr
            pid = int(read_file(pidfile))
            with PolicyClient(port) as client:
                client.ask({"sender": "daemon-syslog@example.com"})
            served = _receive_until(receiver, "from=<daemon-syslog@example.com>")
            os.kill(pid, signal.SIGTERM)
            stopped = _receive_until(receiver, "Server Shut Down.")
            wait_until(lambda: process_gone(pid), what=f"daemon {pid} exits")
        finally:
            if pid is not None and not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
    received = served + stopped
    assert {int(line["pri"]) // 8 for line in received} == {LOG_MAIL}
    assert {line["pid"] for line in received if "from=<daemon-syslog@" in line["message"]} == {
        str(pid)
    }
    assert not os.path.exists(pidfile)


def _fill_log(port: int, megabytes: float, marker: str) -> int:
    """
    Send enough requests, pipelined on one connection, to log about
    C{megabytes} (each is logged with its long sender and recipient).

    @return: how many.
    """
    sender = marker + "-" + "s" * 1900 + "@example.com"
    recipient = "r" * 1500 + "@example.net"
    request = encode_request({"sender": sender, "recipient": recipient})
    batches = int(megabytes * 1_000_000 / 3500 / 20) + 1
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        for _ in range(batches):
            connection.sendall(request * 20)
            for _ in range(20):
                assert read_reply(connection) is not None
    return batches * 20


def _logged(directory: str, text: str) -> int:
    """
    How many lines of the log files in C{directory}, rotated ones too,
    hold C{text}.
    """
    count = 0
    for name in os.listdir(directory):
        try:
            count += read_file(os.path.join(directory, name)).count(text)
        except FileNotFoundError:
            pass  # rotated away while we looked: the next poll sees it
    return count


@pytest.mark.parametrize(
    ("directory_owner", "file_owner", "chroot", "rotates"),
    [
        (SERVICE_USER, SERVICE_USER, False, True),
        (SERVICE_USER, None, False, False),
        ("root", SERVICE_USER, False, False),
        (SERVICE_USER, SERVICE_USER, True, False),
    ],
    ids=[
        "user-owns-directory-and-file",
        "file-created-by-root",
        "directory-owned-by-root",
        "chrooted",
    ],
)
def test_logfile_rotation_after_dropping_privileges(
    pfxpold_installation, world_readable_tmp, directory_owner, file_owner, chroot, rotates
):
    """
    twistd --logfile with --uid nobody rotates at log_max_bytes, here 1 MB
    (and on SIGUSR1)
    only when nobody owns the log directory and the log file; when twistd
    creates the file (as root, before the drop), when the directory is
    root's, or when the log is outside a --chroot jail, rotation is
    silently skipped and the log grows past 1 MB.
    """
    _require_prerequisites(pfxpold_installation, namespace=False)
    work = world_readable_tmp
    log_directory = world_readable_directory(work, "log")
    os.chown(
        log_directory,
        pwd.getpwnam(directory_owner).pw_uid,
        grp.getgrnam(SERVICE_GROUP if directory_owner == SERVICE_USER else "root").gr_gid,
    )
    log_path = os.path.join(log_directory, "pfxpold.log")
    if file_owner is not None:
        open(log_path, "w").close()
        os.chmod(log_path, 0o640)
        os.chown(log_path, pwd.getpwnam(file_owner).pw_uid, grp.getgrnam(SERVICE_GROUP).gr_gid)
    port = free_port()
    # pfxpold rotates at 100 MiB by default; twistd's own 1 MB keeps the
    # test short, and shows the setting reaches twistd's LogFile.
    config = os.path.join(work, "pfxpold.toml")
    with open(config, "w") as f:
        f.write('[server]\nlog_max_bytes = 1000000\n\n[[check]]\nname = "demo"\ntype = "demo"\n')
    os.chmod(config, 0o644)
    arguments = ["-n", "--pidfile=", f"--logfile={log_path}"]
    if chroot:
        arguments += ["--chroot", build_jail(os.path.join(work, "jail"))]
    arguments += ["--uid", SERVICE_USER, "--gid", SERVICE_GROUP, "pfxpold", "--config", config]
    arguments += ["--port", f"tcp:{port}:interface=127.0.0.1"]
    with running_twistd(pfxpold_installation, work, arguments, listening_on(port)) as twistd:
        sent = _fill_log(port, 1.2, "first")
        # Request lines are written in batches within a second, a few KiB
        # at a time, each after twistd's LogFile decided whether to rotate:
        # once all are written, every rotation the size allowed was tried.
        wait_until(
            lambda: _logged(log_directory, "from=<first-") == sent, what="the request lines"
        )
        if rotates:
            twistd.process.send_signal(signal.SIGUSR1)
            wait_until(lambda: os.path.exists(log_path + ".2"), what="rotation on SIGUSR1")
        with PolicyClient(port) as client:
            client.ask({"sender": "after@example.com"})
        # Request lines are written in batches, within a second.
        wait_until(
            lambda: "from=<after@example.com>" in read_file(log_path), what="the last request line"
        )
        sizes = {
            name: os.path.getsize(os.path.join(log_directory, name))
            for name in os.listdir(log_directory)
        }
        current = read_file(log_path)
    if rotates:
        assert sorted(sizes) == ["pfxpold.log", "pfxpold.log.1", "pfxpold.log.2"]
        assert 1_000_000 <= sizes["pfxpold.log.2"] < 1_010_000
        assert "set uid/gid" in read_file(log_path + ".2")
        assert "from=<after@example.com>" in current and "first-" not in current
        reopened = os.stat(log_path)
        assert reopened.st_uid == pwd.getpwnam(SERVICE_USER).pw_uid
        assert reopened.st_mode & 0o777 == 0o640
    else:
        assert sorted(name for name in sizes if name.startswith("pfxpold.log")) == ["pfxpold.log"]
        assert sizes["pfxpold.log"] > 1_200_000
        assert "set uid/gid" in current and "from=<after@example.com>" in current
