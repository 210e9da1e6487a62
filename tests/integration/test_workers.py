"""
C{twistd pfxpold --workers N}: worker processes serve the parent's
listening socket and never outlive the parent.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time

from tests.integration.support import running_daemon

#: A check that answers with the PID of the process that ran it.
PID_CHECK = textwrap.dedent(
    '''
    """Answers with the serving process's PID, to see which process served."""
    import os

    from zope.interface import implementer

    from pfxpold.interfaces import ICheck


    @implementer(ICheck)
    class PidCheck:
        """Answers OK pid=<pid>."""

        def __init__(self, options):
            pass

        def check(self, request):
            return f"OK pid={os.getpid()}"
    '''
)

CONFIG = """
[[check]]
name = "pid"
type = "pidcheck:PidCheck"
"""


def children_of(pid: int) -> list[int]:
    """
    The PIDs whose parent is C{pid}.
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """
    Whether C{pid} is a running (not zombie) process.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def read(path: str) -> str:
    """
    A file's text, or C{""} while it does not exist.
    """
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def wait_until(condition, timeout: float = 20.0) -> bool:
    """
    Poll C{condition} until it is true or C{timeout} seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def the_worker(daemon) -> int:
    """
    The PID of the one worker of a C{--workers 2} daemon, once it serves
    (its log, beside the parent's, says so).
    """
    parent = daemon.process.pid
    assert wait_until(lambda: len(children_of(parent)) == 1)
    [worker] = children_of(parent)
    worker_log = daemon.log_path.replace(".log", ".worker1.log")
    assert wait_until(lambda: "pfxpold serving on" in read(worker_log))
    return worker


def start(tmp_path):
    (tmp_path / "pidcheck.py").write_text(PID_CHECK)
    return running_daemon(
        tmp_path, CONFIG, extra_args=("--workers", "2"), extra_path=os.fspath(tmp_path)
    )


def test_workers_share_the_port_and_stop_with_the_parent(tmp_path):
    """Both processes answer on the one port, and SIGTERM stops the worker too."""
    with start(tmp_path) as daemon:
        parent = daemon.process.pid
        worker = the_worker(daemon)
        serving = set()
        clients = []
        try:
            # The kernel gives each new connection to whichever process
            # accepts first: keep connecting until both have answered.
            for _ in range(300):
                client = daemon.client()
                clients.append(client)
                answer = client.ask({"request": "smtpd_access_policy", "sender": "a@b.example"})
                serving.add(int(answer.split("pid=")[1]))
                if len(serving) == 2:
                    break
        finally:
            for client in clients:
                client.close()
        assert serving == {parent, worker}
        # twistd ends by re-raising the signal that stopped it.
        assert daemon.stop() in (0, -signal.SIGTERM)
        assert "Server Shut Down" in daemon.log()
    assert wait_until(lambda: not alive(worker))


def serving_pids(daemon, count: int) -> list[int]:
    """
    Open C{count} connections at once, then ask one request on each: the
    PID of the process that answered each, in order.
    """
    clients = []
    try:
        for _ in range(count):
            clients.append(daemon.client())
        return [
            int(
                client.ask({"request": "smtpd_access_policy", "sender": "a@b.example"}).split(
                    "pid="
                )[1]
            )
            for client in clients
        ]
    finally:
        for client in clients:
            client.close()


def test_a_burst_of_connections_is_spread_over_the_workers(tmp_path):
    """
    64 connections opened at once (Postfix restarting) go to both
    processes, about half each: every process listens on a TCP socket of
    its own in one SO_REUSEPORT group. On one shared socket, the process
    that woke first took nearly all of them.
    """
    with start(tmp_path) as daemon:
        parent = daemon.process.pid
        worker = the_worker(daemon)
        pids = serving_pids(daemon, 64)
        assert set(pids) == {parent, worker}
        # The kernel hashes the clients' ports: 32 each on average, and
        # fewer than 16 about once in 30,000 runs.
        assert min(pids.count(parent), pids.count(worker)) >= 16, pids


def test_connections_while_a_worker_is_down_are_answered(tmp_path):
    """
    Once a worker ended unexpectedly, its socket is closed: every new
    connection goes to a process that answers it, the parent or the
    worker started again on the parent's socket.
    """
    with start(tmp_path) as daemon:
        parent = daemon.process.pid
        worker = the_worker(daemon)
        os.kill(worker, signal.SIGKILL)
        assert wait_until(lambda: "worker 1 ended unexpectedly" in daemon.log())
        assert "sharing the parent's listening sockets" in daemon.log()
        pids = serving_pids(daemon, 32)
        assert worker not in pids
        assert set(pids) <= {parent} | set(children_of(parent))


def test_worker_stops_when_the_parent_is_killed(tmp_path):
    """A worker whose parent dies without stopping it exits by itself."""
    with start(tmp_path) as daemon:
        parent = daemon.process.pid
        assert wait_until(lambda: len(children_of(parent)) == 1)
        [worker] = children_of(parent)
        # Let the worker finish starting, so the test sees its watch work.
        assert wait_until(lambda: "started worker 1" in daemon.log())
        os.kill(parent, signal.SIGKILL)
        daemon.process.wait()
        assert wait_until(lambda: not alive(worker))


def test_workers_share_the_request_log(tmp_path):
    """
    With request_log, the parent and its worker append to the one file:
    every answered request is there once, as a whole line, whichever
    process answered it.
    """
    (tmp_path / "pidcheck.py").write_text(PID_CHECK)
    config = '[server]\nrequest_log = "requests.log"\n' + CONFIG
    answers = []
    with running_daemon(
        tmp_path, config, extra_args=("--workers", "2"), extra_path=os.fspath(tmp_path)
    ) as daemon:
        the_worker(daemon)
        clients = []
        try:
            for index in range(300):
                client = daemon.client()
                clients.append(client)
                for number in range(5):
                    sender = f"s{index}-{number}@example.com"
                    answers.append((sender, client.ask({"sender": sender})))
                if len({answer for _, answer in answers}) == 2 and index >= 20:
                    break
        finally:
            for client in clients:
                client.close()
        assert daemon.stop() in (0, -signal.SIGTERM)
    lines = read(os.fspath(tmp_path / "requests.log")).splitlines()
    assert len({answer for _, answer in answers}) == 2
    assert len(lines) == len(answers)
    by_sender = {line.split("from=<")[1].split(">")[0]: line for line in lines}
    for sender, answer in answers:
        assert f": {answer} (pid, " in by_sender[sender]


def test_reuseport_sockets_refused_leave_the_listener_alone():
    """
    A listening socket bound by another user (as systemd binds a .socket
    unit's) cannot be joined: L{workers.reuseport_sockets} fails with
    EADDRINUSE and leaves that socket without SO_REUSEPORT, so that
    nothing else can join it either.
    """
    import errno
    import socket

    import pytest

    from pfxpold import workers
    from tests.integration.deployment import require_root

    require_root()
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setuid(65534)
            listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listening.bind(("127.0.0.1", 0))
            listening.listen(1)
            socket.send_fds(child_end, [b"fd"], [listening.fileno()])
        finally:
            os._exit(0)
    try:
        _, [fd], _, _ = socket.recv_fds(parent_end, 16, 1)
    finally:
        os.waitpid(pid, 0)
        parent_end.close()
        child_end.close()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=fd) as listening:
        with pytest.raises(OSError) as raised:
            workers.reuseport_sockets(fd, socket.AF_INET, 1, 5)
        assert raised.value.errno == errno.EADDRINUSE
        assert listening.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
