"""
The capture's writer process, really forked by a daemon run with twistd:
it survives the signals an admin's tools send, writes everything when the
daemon stops, and is started again when it dies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

from pfxpold.testing import make_request
from tests.integration.support import running_daemon

CONFIG = """
[server]
capture = "capture.jsonl"
default_action = "DUNNO"
log_requests = false
{extra}

[[check]]
name = "senders"
type = "file"
map = "senders.map"
lookup = ["sender"]
"""

STARTED = re.compile(r"capture writer process (\d+) writes")


def poll(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def writers(daemon) -> list[int]:
    """
    The writer processes the daemon started, in order, from its log.
    """
    return [int(pid) for pid in STARTED.findall(daemon.log())]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def ask(daemon, senders):
    with daemon.client() as client:
        return [client.ask(dict(make_request(sender=sender))) for sender in senders]


def captured(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def setup(tmp_path):
    (tmp_path / "senders.map").write_text("spam@example.com REJECT spam\n")


def test_signals_and_stop(tmp_path):
    """
    HUP and USR1 to the daemon, and TERM, INT and HUP to the writer (a
    whole group's signals reach it too), leave the writer running; when
    the daemon stops, every answered request is in the file and the
    writer is gone.
    """
    setup(tmp_path)
    senders = [f"user{index}@example.com" for index in range(40)] + ["spam@example.com"]
    with running_daemon(tmp_path, CONFIG.format(extra="")) as daemon:
        assert poll(lambda: writers(daemon))
        [writer] = writers(daemon)
        answers = ask(daemon, senders)
        for number in (signal.SIGHUP, signal.SIGUSR1):
            daemon.process.send_signal(number)
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(writer, number)
        assert poll(lambda: "reloaded " in daemon.log())
        answers += ask(daemon, senders)
        assert alive(writer)
        assert writers(daemon) == [writer]
        assert daemon.stop() in (0, -15)
        assert "ended unexpectedly" not in daemon.log()
    assert not alive(writer)
    lines = captured(tmp_path / "capture.jsonl")
    requests = [line for line in lines if "pfxpold_capture" not in line]
    assert [line["answer"] for line in requests] == answers
    assert answers.count("REJECT spam") == 2
    assert [line["values"][lines[0]["names"].index("sender")] for line in requests] == senders * 2


def test_killed_writer_started_again(tmp_path):
    """
    A writer killed outright is logged; the daemon goes on answering,
    starts a new writer ten seconds later, and what is answered from
    then on is captured, under a header of its own.
    """
    setup(tmp_path)
    with running_daemon(tmp_path, CONFIG.format(extra="")) as daemon:
        assert poll(lambda: writers(daemon))
        [first] = writers(daemon)
        assert ask(daemon, ["before@example.com"]) == ["DUNNO"]
        os.kill(first, signal.SIGKILL)
        assert poll(lambda: "ended unexpectedly (signal 9)" in daemon.log())
        assert ask(daemon, ["spam@example.com"]) == ["REJECT spam"]
        assert poll(lambda: len(writers(daemon)) == 2)
        second = writers(daemon)[1]
        assert second != first and alive(second)
        assert ask(daemon, ["after@example.com"]) == ["DUNNO"]
        assert daemon.stop() in (0, -15)
    lines = captured(tmp_path / "capture.jsonl")
    headers = [index for index, line in enumerate(lines) if "pfxpold_capture" in line]
    # The first writer may have died before it wrote anything; what the
    # daemon answered while none ran is lost.
    assert headers and headers[0] == 0
    last = lines[headers[-1] :]
    sender = last[0]["names"].index("sender")
    assert [line["values"][sender] for line in last[1:]] == ["after@example.com"]
    assert "spam@example.com" not in json.dumps(lines)


def test_in_process(tmp_path):
    """
    With capture_process = false the daemon writes the capture itself:
    no writer process, the same lines.
    """
    setup(tmp_path)
    with running_daemon(tmp_path, CONFIG.format(extra="capture_process = false")) as daemon:
        answers = ask(daemon, ["spam@example.com", "other@example.com"])
        assert daemon.stop() in (0, -15)
        assert "capture writer process" not in daemon.log()
    lines = captured(tmp_path / "capture.jsonl")
    assert [line["answer"] for line in lines[1:]] == answers == ["REJECT spam", "DUNNO"]
