"""
The daemon core run for real: C{twistd -n pfxpold} (and C{twistd -ny
pfxpold.tac}) subprocesses on free loopback ports, spoken to over real
sockets, with the test checks of L{tests.integration.daemon_checks}.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from pfxpold.testing import fixture_bytes
from tests.integration.support import (
    REPOSITORY,
    PolicyClient,
    daemon_environment,
    encode_request,
    free_port,
    read_reply,
    require_program,
    running_daemon,
    wait_for_port,
)

CHECKS = "tests.integration.daemon_checks"

SHARED_CONFIG = f"""
[server]
log_verdicts = true
deadline = 3.0
on_deadline = "DEFER_IF_PERMIT deadline passed"
request_timeout = 1.5
max_line_length = 512
max_attributes = 40
max_request_size = 2048

[[check]]
name = "action"
type = "{CHECKS}.FailingCheck"
on_error = "REJECT check failed"

[[check]]
name = "skip"
type = "{CHECKS}.FailingCheck"
on_error = "skip"

[[check]]
name = "noreply"
type = "{CHECKS}.FailingCheck"
on_error = "noreply"

[[check]]
name = "script"
type = "{CHECKS}.ScriptCheck"
timeout = 30
"""


def assert_clean_sigterm_exit(status: int, log: str) -> None:
    """
    The daemon shut down cleanly after SIGTERM. twistd (since Twisted 20.3)
    ends a clean shutdown caused by a signal by killing itself with that
    signal again, so its status says "terminated by SIGTERM" (systemd counts
    that as a clean stop); anything else is a crash.
    """
    assert status in (0, -signal.SIGTERM), status
    assert "Received SIGTERM, shutting down." in log
    assert "Server Shut Down." in log
    assert "Traceback" not in log


def wait_until(condition, timeout: float = 15.0, message: str = "condition"):
    """Poll C{condition} until it is true, for at most C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{message} not met within {timeout}s")


def closed_without_reply(sock: socket.socket, timeout: float = 15.0) -> bool:
    """Whether the server closes C{sock} without sending a byte."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        return True
    return data == b""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One pfxpold serving the shared test configuration for this module."""
    with running_daemon(tmp_path_factory.mktemp("daemon"), SHARED_CONFIG) as daemon:
        yield daemon


def ask_raw(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send C{data}, half-close, and read everything until the server closes."""
    with socket.create_connection((host, port), timeout=15) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return received
            received += chunk


# Requests and replies


def test_postfix_fixtures(daemon):
    """The four real Postfix 3.7 requests are answered, each seen whole."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
        answers = []
        for name in ("rcpt", "data", "eod", "xclient"):
            sock.sendall(fixture_bytes(name))
            answers.append(read_reply(sock))
    assert answers == [
        b"action=WARN RCPT example.com n=29 sasl=- size=0\n\n",
        b"action=WARN DATA example.com n=29 sasl=- size=0\n\n",
        b"action=WARN END-OF-MESSAGE example.com n=29 sasl=- size=221\n\n",
        b"action=WARN RCPT example.com n=29 sasl=joe size=0\n\n",
    ]
    log = wait_until(
        lambda: "END-OF-MESSAGE localhost[127.0.0.1]" in daemon.log() and daemon.log(),
        message="the request log line",
    )
    line = next(line for line in log.splitlines() if "END-OF-MESSAGE localhost" in line)
    for part in (
        "helo=<client.example.com>",
        "from=<alice@example.com>",
        "to=<bob@example.net>",
        "instance=7ee1.6b05ccb5.7a08.0",
        "queue_id=080B1212137",
        "WARN END-OF-MESSAGE",
        "(script,",
        " ms)",
    ):
        assert part in line, line


def test_verdicts_logged(daemon):
    """With log_verdicts, each check's verdict is logged for every request."""
    with daemon.client() as client:
        assert client.ask({"fail": "skip", "answer": "HOLD verdicts"}) == "HOLD verdicts"
    wait_until(
        lambda: (
            "('action', 'DUNNO'), ('skip', 'error'), ('noreply', 'DUNNO'),"
            " ('script', 'HOLD verdicts')" in daemon.log()
        ),
        message="the verdicts line",
    )


def test_many_requests_one_connection(daemon):
    """Two hundred requests on one persistent connection, one answer each."""
    with daemon.client() as client:
        for number in range(200):
            assert client.ask({"answer": f"REJECT number {number}"}) == f"REJECT number {number}"


def test_crlf_request(daemon):
    """A request with CRLF line ends is answered with LF only."""
    reply = ask_raw(daemon.port, b"answer=HOLD\r\nsender=a@b.example\r\n\r\n")
    assert reply == b"action=HOLD\n\n"


def test_pipelining_in_order(daemon):
    """Three requests in one sendall, the first slowest: answers in request order."""
    data = (
        encode_request({"answer": "REJECT first", "delay": "1.0"})
        + encode_request({"answer": "OK"})
        + encode_request({"answer": "HOLD third", "delay": "0.3"})
    )
    assert ask_raw(daemon.port, data) == (
        b"action=REJECT first\n\naction=OK\n\naction=HOLD third\n\n"
    )


def test_invalid_action_never_sent(daemon):
    """An answer that is not a valid action is caught and on_error answers."""
    with daemon.client() as client:
        assert client.ask({"answer": "PERMIT"}) == "DEFER_IF_PERMIT Service temporarily unavailable"
        assert client.ask({"answer": "REJECT\x01inject"}) == (
            "DEFER_IF_PERMIT Service temporarily unavailable"
        )
        assert client.ask({"answer": "REJECT a\x01b\x7fc"}) == "REJECT a b c"
        assert client.ask({"answer": "OK"}) == "OK"


# Failing checks, timeouts, the deadline


def test_on_error_action(daemon):
    """A check that raises with on_error = an action answers it."""
    with daemon.client() as client:
        assert client.ask({"fail": "action", "answer": "OK"}) == "REJECT check failed"
        assert client.ask({"answer": "OK"}) == "OK"
    assert "action was told to fail" in daemon.log()


def test_on_error_skip(daemon):
    """A check that raises with on_error = skip lets the next check decide."""
    with daemon.client() as client:
        assert client.ask({"fail": "skip", "answer": "HOLD skipped"}) == "HOLD skipped"


def test_on_error_noreply(daemon):
    """A check that raises with on_error = noreply closes without an answer."""
    with daemon.client() as client:
        assert client.ask({"answer": "OK"}) == "OK"
        assert client.ask({"fail": "noreply", "answer": "OK"}) is None
    with daemon.client() as client:
        assert client.ask({"answer": "OK"}) == "OK"


def test_deadline(daemon):
    """A check that never answers is cut off by the deadline with on_deadline."""
    with daemon.client() as client:
        assert client.ask({"hang": "1"}) == "DEFER_IF_PERMIT deadline passed"
        assert client.ask({"answer": "OK"}) == "OK"
    assert "missed the 3.0s deadline" in daemon.log()


# Limits


def violations():
    long_line = b"sender=" + b"a" * 600 + b"\n\n"
    many = b"".join(b"a%d=1\n" % i for i in range(41)) + b"\n"
    big = b"".join(b"a%d=" % i + b"v" * 300 + b"\n" for i in range(8)) + b"\n"
    return {
        "line length": long_line,
        "attributes": many,
        "request size": big,
        "repeated attribute": b"sender=a\nsender=b\n\n",
        "not name=value": b"sender\n\n",
        "empty line first": b"\n",
    }


@pytest.mark.parametrize("violation", sorted(violations()))
def test_limit_closes_only_that_connection(daemon, violation):
    """
    A limit violation closes that connection without a reply, is logged
    with the peer, and another connection keeps being served.
    """
    with daemon.client() as bystander:
        assert bystander.ask({"answer": "OK"}) == "OK"
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
            peer = f"127.0.0.1:{sock.getsockname()[1]}"
            sock.sendall(violations()[violation])
            assert closed_without_reply(sock)
        assert bystander.ask({"answer": "REJECT still here"}) == "REJECT still here"
    wait_until(
        lambda: any(
            "without a reply" in line and peer in line for line in daemon.log().splitlines()
        ),
        message="a warning naming the peer",
    )


def test_request_timeout(daemon):
    """A request started and never finished is dropped after request_timeout."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
        sock.sendall(b"sender=a@b.example\nrecipient=c@d.example\n")
        started = time.monotonic()
        assert closed_without_reply(sock)
        assert time.monotonic() - started >= 1.0
    assert "not finished within 1.5s" in daemon.log()


def test_close_while_write_buffer_full(tmp_path):
    """
    A connection closed while its peer reads nothing (the daemon's write
    buffer full, so the transport has paused it) really closes once the
    peer reads again, instead of staying open forever.
    """
    config = SHARED_CONFIG.replace(
        "deadline = 3.0", "deadline = 1.0\nidle_timeout = 1.5\nlog_requests = false"
    )
    with running_daemon(tmp_path, config) as daemon:
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
        request = encode_request({"answer": "REJECT " + "x" * 250})

        def flood():
            try:
                sock.sendall(request * 40000)
            except OSError:
                pass  # the daemon stopped reading, then closed

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        wait_until(lambda: "closing idle connection" in daemon.log(), message="the idle close")
        sock.settimeout(15)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass  # closed with our unread requests still in its buffer
        except TimeoutError:
            pytest.fail("the connection stayed open after the daemon closed it")
        finally:
            sock.close()
            sender.join(30)


# Clients


def test_query_command(daemon):
    """pfxpold-query sends one request and prints the action."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pfxpold.query",
            "--server",
            f"127.0.0.1:{daemon.port}",
            "--sender",
            "a@b.example",
            "--attribute",
            "answer=REJECT from query",
        ],
        env=daemon_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "REJECT from query\n"), result.stderr


def test_query_command_stdin(daemon):
    """pfxpold-query - reads the request from standard input."""
    result = subprocess.run(
        [sys.executable, "-m", "pfxpold.query", "--server", f"127.0.0.1:{daemon.port}", "-"],
        input=fixture_bytes("xclient"),
        env=daemon_environment(),
        capture_output=True,
        timeout=60,
    )
    assert result.stdout == b"WARN RCPT example.com n=29 sasl=joe size=0\n", result.stderr


def test_query_command_no_answer(daemon):
    """pfxpold-query exits 1 when the server closes without answering."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pfxpold.query",
            "--server",
            f"127.0.0.1:{daemon.port}",
            "--attribute",
            "fail=noreply",
        ],
        env=daemon_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "without an answer" in result.stderr


def test_query_command_nobody_listens():
    """pfxpold-query exits 2 when nothing listens."""
    result = subprocess.run(
        [sys.executable, "-m", "pfxpold.query", "--server", f"127.0.0.1:{free_port()}"],
        env=daemon_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2


def test_nc_half_close(daemon):
    """nc -N sends a request, half-closes, and still gets the answer."""
    nc = require_program("nc", "netcat-openbsd")
    result = subprocess.run(
        [nc, "-N", "127.0.0.1", str(daemon.port)],
        input=b"sender=foo@example.com\nclient_address=1.2.3.4\nanswer=OK (you win!)\n\n",
        capture_output=True,
        timeout=30,
    )
    assert result.stdout == b"action=OK (you win!)\n\n"


# Several listeners and stopping


def test_listeners_and_sigterm(tmp_path):
    """
    pfxpold listens on tcp 127.0.0.1, tcp6 ::1 and a unix socket at once;
    on SIGTERM it stops accepting, answers the request in flight, closes
    the connection and exits cleanly.
    """
    port6 = free_port()
    unix_path = str(tmp_path / "pfxpold.sock")
    gate = tmp_path / "gate"
    config = SHARED_CONFIG.replace("[server]", "[server]\nshutdown_grace = 30.0")
    extra = ("--port", f"tcp6:{port6}:interface=\\:\\:1", "--port", f"unix:{unix_path}")
    with running_daemon(tmp_path, config, extra_args=extra) as daemon:
        wait_until(lambda: os.path.exists(unix_path), message="the unix socket")
        with daemon.client() as client:
            assert client.ask({"answer": "OK"}) == "OK"
        wait_for_port(port6, host="::1")
        with PolicyClient(port6, host="::1") as client:
            assert client.ask({"answer": "REJECT v6"}) == "REJECT v6"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(15)
            sock.connect(unix_path)
            sock.sendall(encode_request({"answer": "HOLD unix"}))
            assert read_reply(sock) == b"action=HOLD unix\n\n"

        slow = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
        slow.sendall(
            encode_request({"answer": "REJECT answered while stopping", "gate": str(gate)})
        )
        wait_until(lambda: "waiting for" in daemon.log(), message="the request in flight")
        daemon.process.send_signal(signal.SIGTERM)

        def refused():
            try:
                socket.create_connection(("127.0.0.1", daemon.port), timeout=1).close()
            except OSError:
                return True
            return False

        wait_until(refused, message="new connections refused")
        assert daemon.process.poll() is None
        gate.touch()
        assert read_reply(slow) == b"action=REJECT answered while stopping\n\n"
        assert closed_without_reply(slow)
        slow.close()
        assert_clean_sigterm_exit(daemon.process.wait(30), daemon.log())
        assert "answering 1 requests in flight" in daemon.log()


# Configuration from the command line, the environment and the tac


def run_twistd(*arguments, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *arguments],
        env=env or daemon_environment(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_config_good(tmp_path):
    """--check-config on a good file prints a summary and exits 0."""
    path = tmp_path / "good.toml"
    path.write_text(SHARED_CONFIG)
    result = run_twistd("-n", "pfxpold", "--check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: OK" in result.stdout
    assert "check noreply: FailingCheck, timeout 10s, on_error noreply" in result.stdout


def test_check_config_bad(tmp_path):
    """--check-config on a bad file exits non-zero naming the file, the check and the key."""
    path = tmp_path / "bad.toml"
    path.write_text(SHARED_CONFIG.replace('on_error = "skip"', 'on_eror = "skip"'))
    result = run_twistd("-n", "pfxpold", "--check-config", "--config", str(path))
    assert result.returncode != 0
    assert f"{path}: check 'skip': key 'on_eror'" in result.stdout + result.stderr


@contextmanager
def twistd_process(tmp_path, arguments, env, port):
    """Run twistd with C{arguments} until the block ends; stop it by its PID."""
    log_path = tmp_path / "twistd.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={log_path}",
            *arguments,
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        try:
            wait_for_port(port, process=process)
        except RuntimeError:
            process.kill()
            process.wait()
            log = log_path.read_text() if log_path.exists() else ""
            raise AssertionError(f"{process.stderr.read().decode()}\n{log}") from None
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_pfxpold_config_environment(tmp_path):
    """PFXPOLD_CONFIG names the configuration when --config is not given."""
    path = tmp_path / "env.toml"
    path.write_text(SHARED_CONFIG)
    port = free_port()
    env = daemon_environment()
    env["PFXPOLD_CONFIG"] = str(path)
    with twistd_process(tmp_path, ["pfxpold", "--port", str(port)], env, port) as process:
        with PolicyClient(port) as client:
            assert client.ask({"answer": "REJECT from env config"}) == "REJECT from env config"
        process.send_signal(signal.SIGTERM)
        assert_clean_sigterm_exit(process.wait(30), (tmp_path / "twistd.log").read_text())


def test_tac(tmp_path):
    """twistd -ny pfxpold.tac serves the configuration and port from the environment."""
    path = tmp_path / "tac.toml"
    path.write_text(SHARED_CONFIG)
    port = free_port()
    env = daemon_environment()
    env["PFXPOLD_CONFIG"] = str(path)
    env["PFXPOLD_PORT"] = f"tcp:{port}:interface=127.0.0.1"
    tac = os.path.join(REPOSITORY, "pfxpold.tac")
    with twistd_process(tmp_path, ["-y", tac], env, port):
        with PolicyClient(port) as client:
            assert client.ask({"answer": "HOLD from the tac"}) == "HOLD from the tac"
            assert client.ask({"fail": "action"}) == "REJECT check failed"


def test_daemonized(tmp_path):
    """
    twistd pfxpold --port N (no -n) forks into the background with a
    pidfile and a logfile, answers, and stops on SIGTERM to that PID,
    removing its pidfile.
    """
    path = tmp_path / "daemon.toml"
    path.write_text(SHARED_CONFIG)
    pidfile, logfile = tmp_path / "pfxpold.pid", tmp_path / "pfxpold.log"
    port = free_port()
    result = run_twistd(
        f"--pidfile={pidfile}",
        f"--logfile={logfile}",
        "pfxpold",
        "--port",
        str(port),
        "--config",
        str(path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    pid = int(
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), message="the pidfile")
    )
    try:
        wait_for_port(port)
        with PolicyClient(port) as client:
            assert client.ask({"answer": "HOLD daemonized"}) == "HOLD daemonized"
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pidfile.exists(), message="the daemon to remove its pidfile")
    log = logfile.read_text()
    assert "Server Shut Down." in log
    assert "Traceback" not in log


def test_demo_without_configuration(tmp_path):
    """With no configuration at all, the demo answers the original README's request."""
    nc = shutil.which("nc")
    with running_daemon(tmp_path) as daemon:
        request = b"sender=foo@example.com\nclient_address=1.2.3.4\nclient_name=foo.bar\n\n"
        if nc:
            reply = subprocess.run(
                [nc, "-N", "127.0.0.1", str(daemon.port)],
                input=request,
                capture_output=True,
                timeout=30,
            ).stdout
        else:
            reply = ask_raw(daemon.port, request)
        assert reply in (b"action=OK (you win!)\n\n", b"action=DUNNO (you lose!)\n\n")


# The request log in a file of its own


def test_request_log_file(tmp_path):
    """
    With request_log, answered requests go to that file (written within
    about a second while the daemon runs, and the last ones on SIGTERM),
    and not to twistd's log; moving the file away (logrotate) makes the
    daemon start a new one.
    """
    config = SHARED_CONFIG.replace("[server]", '[server]\nrequest_log = "requests.log"')
    path = tmp_path / "requests.log"
    with running_daemon(tmp_path, config) as daemon:
        with daemon.client() as client:
            assert client.ask({"answer": "REJECT first", "sender": "one@example.com"}) == (
                "REJECT first"
            )
        wait_until(lambda: "one@example.com" in path.read_text(), message="the first line")
        path.rename(tmp_path / "requests.log.1")
        with daemon.client() as client:
            assert client.ask({"answer": "OK", "sender": "two@example.com"}) == "OK"
            wait_until(lambda: "reopened" in daemon.log(), message="the reopened log")
            assert client.ask({"answer": "OK", "sender": "three@example.com"}) == "OK"
        daemon.process.send_signal(signal.SIGTERM)
        assert_clean_sigterm_exit(daemon.process.wait(30), daemon.log())
        log = daemon.log()
    rotated = (tmp_path / "requests.log.1").read_text()
    assert ": REJECT first (script, " in rotated
    current = path.read_text()
    assert "from=<three@example.com>" in current
    assert "one@example.com" not in current
    assert "two@example.com" in rotated + current
    assert "one@example.com" not in log
