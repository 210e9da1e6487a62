"""
Reloading a running daemon's configuration with a real SIGHUP, and the
signals a mail admin's tools send (SIGHUP, SIGUSR1) never stopping it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.integration.support import (
    Daemon,
    PolicyClient,
    daemon_environment,
    encode_request,
    free_port,
    read_reply,
    running_daemon,
    stop_process,
    wait_for_port,
)
from tests.integration.test_workers import children_of, read, the_worker, wait_until

#: A check that answers its C{answer} (with C{{pid}} replaced by the
#: serving process's PID), after C{delay} seconds when given.
SLOW_CHECK = textwrap.dedent(
    '''
    """Answers a configured action, optionally late, to test reloads."""
    import os

    from twisted.internet.defer import Deferred
    from zope.interface import implementer

    from pfxpold.interfaces import ICheck


    @implementer(ICheck)
    class SlowCheck:
        """Answers C{answer} after C{delay} seconds."""

        def __init__(self, options):
            self.answer = options.string("answer")
            self.delay = options.number("delay", 0.0)
            self.reactor = options.reactor

        def check(self, request):
            answer = self.answer.format(pid=os.getpid())
            if not self.delay:
                return answer
            d = Deferred()
            self.reactor.callLater(self.delay, d.callback, answer)
            return d
    '''
)

REQUEST = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "sender": "a@example.com"}


def slow_config(answer: str, delay: float = 0.0, extra: str = "") -> str:
    return (
        textwrap.dedent(
            f"""
        [[check]]
        name = "slow"
        type = "slowcheck:SlowCheck"
        answer = "{answer}"
        delay = {delay}
        """
        )
        + extra
    )


@contextmanager
def daemon_with(tmp_path, config: str, extra_args: tuple[str, ...] = ()) -> Iterator[Daemon]:
    (tmp_path / "slowcheck.py").write_text(SLOW_CHECK)
    with running_daemon(
        tmp_path, config, extra_args=extra_args, extra_path=os.fspath(tmp_path)
    ) as daemon:
        yield daemon


def config_path(daemon: Daemon) -> str:
    return daemon.log_path[: -len(".log")] + ".toml"


def rewrite(daemon: Daemon, config: str) -> None:
    with open(config_path(daemon), "w", encoding="utf-8") as f:
        f.write(config)


def ask(daemon: Daemon, attributes=REQUEST) -> str:
    with daemon.client() as client:
        answer = client.ask(attributes)
    assert answer is not None
    return answer


def hangup(daemon: Daemon, count: int = 1) -> None:
    """
    SIGHUP the daemon and wait for its reload to end (the count-th reload
    line, success or failure).
    """
    os.kill(daemon.process.pid, signal.SIGHUP)
    assert wait_until(
        lambda: daemon.log().count("reloaded ") + daemon.log().count("reload failed") >= count
    ), daemon.log()


def test_changed_action_takes_effect_in_the_same_process(tmp_path):
    """
    A changed check answers anew after SIGHUP, on a connection opened
    before it too; the PID is the same, and the log names the changed check.
    """
    with daemon_with(tmp_path, slow_config("OK first")) as daemon:
        pid = daemon.process.pid
        with daemon.client() as client:
            assert client.ask(REQUEST) == "OK first"
            rewrite(daemon, slow_config("OK second"))
            hangup(daemon)
            assert client.ask(REQUEST) == "OK second"
        assert ask(daemon) == "OK second"
        assert daemon.process.poll() is None
        assert daemon.process.pid == pid
        assert "checks added: none; removed: none; changed: slow;" in daemon.log()


def test_broken_file_keeps_the_old_answers(tmp_path):
    """
    A configuration with an error changes nothing; the failure is one log
    line naming the file, the check and the key.
    """
    with daemon_with(tmp_path, slow_config("OK first")) as daemon:
        rewrite(daemon, slow_config("OK second", extra='misspelt = "x"\n'))
        hangup(daemon)
        assert ask(daemon) == "OK first"
        [line] = [line for line in daemon.log().splitlines() if "reload failed" in line]
        assert config_path(daemon) in line
        assert "check 'slow'" in line and "key 'misspelt'" in line
        assert "still serving the previous configuration" in line
        # Not valid TOML at all: the same.
        rewrite(daemon, "[[check]\n")
        hangup(daemon, count=2)
        assert ask(daemon) == "OK first"
        # Fixed: the next SIGHUP applies it.
        rewrite(daemon, slow_config("OK third"))
        hangup(daemon, count=3)
        assert ask(daemon) == "OK third"


def test_requests_in_flight_are_all_answered(tmp_path):
    """
    Requests waiting for a slow check when SIGHUP comes are answered by
    the old chain; those after it by the new one.
    """
    with daemon_with(tmp_path, slow_config("OK old", delay=3.0)) as daemon:
        sockets = [socket.create_connection(("127.0.0.1", daemon.port), 10) for _ in range(5)]
        try:
            for sock in sockets:
                for _ in range(2):
                    sock.sendall(encode_request(REQUEST))
            # Let the daemon read them (they are in flight: the check
            # answers after 3 s) before the HUP.
            time.sleep(0.5)
            rewrite(daemon, slow_config("OK new"))
            hangup(daemon)
            replies = [read_reply(sock) for sock in sockets for _ in range(2)]
            assert replies == [b"action=OK old\n\n"] * 10
            for sock in sockets:
                sock.sendall(encode_request(REQUEST))
            assert [read_reply(sock) for sock in sockets] == [b"action=OK new\n\n"] * 5
        finally:
            for sock in sockets:
                sock.close()


QUOTA_CONFIG = """
[stores.mem]
type = "memory"

[stores.disk]
type = "sqlite"
path = "state.sqlite3"

[[check]]
name = "per-sender"
type = "quota"
store = "disk"
key = "sender"
limits = [{{ period = "day", max = 3 }}]
action = "DEFER disk quota full"

[[check]]
name = "per-user"
type = "quota"
store = "mem"
key = "sasl_username"
limits = [{{ period = "day", max = 3 }}]
action = "{memory_action}"

[[check]]
name = "slow"
type = "slowcheck:SlowCheck"
answer = "{answer}"
"""


def message(number: int, user: str, sender: str) -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "END-OF-MESSAGE",
        "sasl_username": user,
        "sender": sender,
        "client_address": "192.0.2.1",
        "instance": f"i{number}",
    }


def test_quota_counts_survive_a_reload(tmp_path):
    """
    Counts in a memory store and in an SQLite store survive a reload that
    changes another check and the memory-store quota's own action: the
    next message past each limit is refused at the right count.
    """
    first = QUOTA_CONFIG.format(memory_action="DEFER memory quota full", answer="DUNNO one")
    with daemon_with(tmp_path, first) as daemon:
        assert ask(daemon, message(1, "alice", "bob@example.com")) == "DUNNO one"
        assert ask(daemon, message(2, "alice", "bob@example.com")) == "DUNNO one"
        rewrite(
            daemon,
            QUOTA_CONFIG.format(memory_action="DEFER memory full, again", answer="DUNNO two"),
        )
        hangup(daemon)
        assert "changed: per-user, slow; unchanged: per-sender" in daemon.log()
        # Third message: both counts reach 3 of 3.
        assert ask(daemon, message(3, "alice", "bob@example.com")) == "DUNNO two"
        # alice's fourth (another sender): refused by the rebuilt check,
        # counting on in the same memory store.
        assert ask(daemon, message(4, "alice", "carol@example.com")) == "DEFER memory full, again"
        # bob's fourth (another user): refused by the SQLite store's count.
        assert ask(daemon, message(5, "dave", "bob@example.com")) == "DEFER disk quota full"


def test_workers_reload_too(tmp_path):
    """
    With --workers 2, SIGHUP to the parent reloads the parent and its
    worker: both processes answer with the new action, and each logs it.
    """
    with daemon_with(
        tmp_path, slow_config("OK first pid={pid}"), extra_args=("--workers", "2")
    ) as daemon:
        parent = daemon.process.pid
        worker = the_worker(daemon)
        worker_log = daemon.log_path.replace(".log", ".worker1.log")
        rewrite(daemon, slow_config("OK second pid={pid}"))
        hangup(daemon)
        assert "told 1 workers to reload" in daemon.log()
        assert wait_until(lambda: "reloaded " in read(worker_log)), read(worker_log)
        answers = set()
        clients = []
        try:
            for _ in range(300):
                client = daemon.client()
                clients.append(client)
                answers.add(client.ask(REQUEST))
                if len(answers) == 2:
                    break
        finally:
            for client in clients:
                client.close()
        assert answers == {f"OK second pid={parent}", f"OK second pid={worker}"}
        assert children_of(parent) == [worker]


@contextmanager
def logging_to_stdout(tmp_path, config: str) -> Iterator[tuple[subprocess.Popen, int, str]]:
    """
    C{twistd -n --logfile=- pfxpold}: twistd handles no SIGUSR1 then.

    @return: the process, its port and the file its stdout goes to.
    """
    (tmp_path / "slowcheck.py").write_text(SLOW_CHECK)
    port = free_port()
    (tmp_path / "pfxpold.toml").write_text(config)
    output = os.fspath(tmp_path / "stdout.log")
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "--logfile=-",
                "pfxpold",
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
                "--config",
                os.fspath(tmp_path / "pfxpold.toml"),
            ],
            env=daemon_environment(os.fspath(tmp_path)),
            cwd=os.fspath(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process=process)
        yield process, port, output
    finally:
        stop_process(process)


def test_sigusr1_and_sighup_with_stdout_logging(tmp_path):
    """
    Logging to stdout, SIGUSR1 (which twistd does not handle then) is
    logged and does not stop the daemon, nor does SIGHUP.
    """
    with logging_to_stdout(tmp_path, slow_config("OK first")) as (process, port, output):
        os.kill(process.pid, signal.SIGUSR1)
        assert wait_until(lambda: "SIGUSR1" in read(output)), read(output)
        with PolicyClient(port) as client:
            assert client.ask(REQUEST) == "OK first"
        (tmp_path / "pfxpold.toml").write_text(slow_config("OK second"))
        os.kill(process.pid, signal.SIGHUP)
        assert wait_until(lambda: "reloaded " in read(output)), read(output)
        with PolicyClient(port) as client:
            assert client.ask(REQUEST) == "OK second"
        assert process.poll() is None


def test_sighup_in_daemon_mode(tmp_path):
    """
    A daemonized twistd (no -n) reloads on SIGHUP and keeps running.
    """
    (tmp_path / "slowcheck.py").write_text(SLOW_CHECK)
    (tmp_path / "pfxpold.toml").write_text(slow_config("OK first"))
    port = free_port()
    pidfile = tmp_path / "pfxpold.pid"
    log = tmp_path / "pfxpold.log"
    launcher = subprocess.run(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            f"--pidfile={pidfile}",
            f"--logfile={log}",
            "pfxpold",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--config",
            os.fspath(tmp_path / "pfxpold.toml"),
        ],
        env=daemon_environment(os.fspath(tmp_path)),
        cwd=os.fspath(tmp_path),
        capture_output=True,
        timeout=60,
    )
    assert launcher.returncode == 0, launcher.stderr
    assert wait_until(lambda: read(os.fspath(pidfile)).strip().isdigit())
    pid = int(read(os.fspath(pidfile)))
    try:
        wait_for_port(port)
        (tmp_path / "pfxpold.toml").write_text(slow_config("OK second"))
        os.kill(pid, signal.SIGHUP)
        assert wait_until(lambda: "reloaded " in read(os.fspath(log))), read(os.fspath(log))
        with PolicyClient(port) as client:
            assert client.ask(REQUEST) == "OK second"
        os.kill(pid, 0)
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        gone = wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=20)
        if not gone:
            os.kill(pid, signal.SIGKILL)


def test_databases_are_opened_before_the_swap(tmp_path):
    """
    A new sql check whose SQLite file does not exist, or a state store in
    a folder that does not exist, fails the reload before the swap; the
    old answers stay.
    """
    with daemon_with(tmp_path, slow_config("OK first")) as daemon:
        missing_database = slow_config("OK second") + textwrap.dedent(
            """
            [[check]]
            name = "db"
            type = "sql"
            database = "missing.sqlite"
            query = "SELECT 'OK' WHERE :sender = ''"
            """
        )
        rewrite(daemon, missing_database)
        hangup(daemon)
        assert ask(daemon) == "OK first"
        [line] = [line for line in daemon.log().splitlines() if "reload failed" in line]
        assert "check 'db': key 'database':" in line and "missing.sqlite does not exist" in line
        missing_folder = slow_config("OK second") + textwrap.dedent(
            """
            [stores.disk]
            type = "sqlite"
            path = "no/such/folder/state.sqlite3"

            [[check]]
            name = "quota"
            type = "quota"
            store = "disk"
            limits = [{ period = "day", max = 3 }]
            """
        )
        rewrite(daemon, missing_folder)
        hangup(daemon, count=2)
        assert ask(daemon) == "OK first"
        [_, line] = [line for line in daemon.log().splitlines() if "reload failed" in line]
        assert "store disk: cannot be opened:" in line
