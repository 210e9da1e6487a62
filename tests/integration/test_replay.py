"""
Capture and replay as a mail admin uses them: a daemon (twistd) with
C{[server] capture} on answers requests, then C{pfxpold-replay} runs in a
subprocess over what it captured, with the same and a changed map.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

from pfxpold.testing import make_request
from tests.integration.support import REPOSITORY, running_daemon

CONFIG = """
[server]
capture = "capture.jsonl"
default_action = "DUNNO"
log_requests = false

[[check]]
name = "senders"
type = "file"
map = "{map}"
lookup = ["sender"]
"""


def replay(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pfxpold.replay", *argv],
        env={**os.environ, "PYTHONPATH": REPOSITORY},
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_for_worker(daemon, timeout=60.0):
    """
    Wait until worker 1 serves: its log says so.
    """
    root, extension = os.path.splitext(daemon.log_path)
    log = f"{root}.worker1{extension}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(log) and "pfxpold serving on" in open(log).read():
            return
        time.sleep(0.1)
    raise AssertionError(f"worker 1 did not start: {daemon.log()}")


def serve(tmp_path, senders, extra_args=()):
    """
    Run the daemon with capture on, ask it about each sender, stop it.

    @return: the answers.
    """
    (tmp_path / "senders.map").write_text(
        "spam@example.com REJECT spam\nfriend@example.com OK\n"
    )
    answers = []
    with running_daemon(
        tmp_path, CONFIG.format(map="senders.map"), extra_args=extra_args
    ) as daemon:
        if extra_args:
            wait_for_worker(daemon)
        for _ in range(3):
            with daemon.client() as client:
                for sender in senders:
                    answers.append(client.ask(dict(make_request(sender=sender))))
        # Stopped by SIGTERM, as systemd does: the capture is flushed.
        assert daemon.stop() in (0, -15)
    return answers


def test_capture_then_replay(tmp_path):
    """
    Replayed through the same configuration, nothing changes (exit 0);
    through a map that newly rejects a sender, exactly those answers
    change and the accept-to-refuse gate fails (exit 1).
    """
    senders = ["spam@example.com", "friend@example.com", "new@example.com"]
    answers = serve(tmp_path, senders)
    assert answers == ["REJECT spam", "OK", "DUNNO"] * 3
    capture = tmp_path / "capture.jsonl"
    lines = [json.loads(line) for line in capture.read_text().splitlines()]
    assert lines[0]["pfxpold_capture"] == 1
    assert lines[0]["checks"]["senders"]["type"] == "file"
    assert [line["answer"] for line in lines[1:]] == answers
    assert lines[1]["verdicts"] == [["senders", "REJECT spam"]]

    config = next(iter(glob.glob(str(tmp_path / "pfxpold-*.toml"))))
    result = replay("--config", config, str(capture))
    assert result.returncode == 0, result.stderr
    assert "replayed 9 requests from 1 file(s)" in result.stdout
    assert "changed: 0 (0.00%), accept -> refuse: 0" in result.stdout

    (tmp_path / "new.map").write_text(
        "spam@example.com REJECT spam\nfriend@example.com OK\nnew@example.com REJECT new\n"
    )
    new = tmp_path / "new.toml"
    new.write_text(CONFIG.format(map="new.map"))
    result = replay("--config", str(new), "--json", str(capture))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "pfxpold-replay: failed: 3 answers changed from accepting to refusing"
    )
    report = json.loads(result.stdout)
    assert report["changed"] == 3
    assert report["answers"][0] == {"old": "DUNNO", "new": "REJECT", "count": 3}
    assert report["top_senders"] == [["new@example.com", 3]]
    assert report["causes"] == [{"old_by": "default", "new_by": "senders", "count": 3}]

    result = replay("--config", str(new), "--no-fail-on-refuse", "--max-changed", "40%",
                    str(capture))
    assert result.returncode == 0, result.stderr


def test_workers_write_their_own_files(tmp_path):
    """
    With workers, each process captures to a file of its own; replay
    merges them.
    """
    senders = [f"user{index}@example.com" for index in range(20)]
    serve(tmp_path, senders, extra_args=("--workers", "2"))
    files = sorted(glob.glob(str(tmp_path / "capture*.jsonl")))
    assert [os.path.basename(path) for path in files] == [
        "capture.jsonl",
        "capture.worker1.jsonl",
    ]
    config = next(iter(glob.glob(str(tmp_path / "pfxpold-*.toml"))))
    result = replay("--config", config, *files)
    assert result.returncode == 0, result.stderr
    assert "replayed 60 requests from 2 file(s)" in result.stdout


def test_bad_configuration(tmp_path):
    """
    A configuration that cannot be used is one line on standard error
    and exit status 2.
    """
    (tmp_path / "c.jsonl").write_text("")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\ncapture_keep = 2\n")
    result = replay("--config", str(bad), str(tmp_path / "c.jsonl"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "key 'capture_keep': needs capture" in result.stderr
