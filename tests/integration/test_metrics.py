"""
C{[metrics]}: a real daemon serves Prometheus's text format on
C{/metrics}, with exact counts of what it was sent, also added up across
C{--workers}.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pfxpold import __version__
from tests.integration.support import (
    daemon_environment,
    free_port,
    running_daemon,
    wait_for_port,
)
from tests.integration.test_workers import PID_CHECK, children_of, read

MAP_CONFIG = """
[metrics]
listen = "tcp:{metrics_port}:interface=127.0.0.1"

[[check]]
name = "senders"
type = "file"
map = "senders.map"
lookup = ["sender"]
"""

SENDERS_MAP = "good@example.com OK\nbad@example.com REJECT go away\n"


def request(sender: str, state: str = "RCPT") -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": state,
        "client_address": "192.0.2.1",
        "sender": sender,
        "recipient": "someone@example.net",
    }


def scrape(port: int) -> dict[str, Any]:
    """
    C{/metrics}, parsed by C{prometheus_client}'s own parser.

    @return: C{{sample name: {frozenset of label items: value}}}.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    return samples.get(name, {}).get(frozenset(labels.items()), 0.0)


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_exact_counts(tmp_path):
    """
    Requests by stage, action and deciding check, per-check verdicts and
    latency, limit violations, connections and build info are exact.
    """
    (tmp_path / "senders.map").write_text(SENDERS_MAP)
    metrics_port = free_port()
    config = MAP_CONFIG.format(metrics_port=metrics_port)
    with running_daemon(tmp_path, config) as daemon:
        wait_for_port(metrics_port, process=daemon.process)
        before = scrape(metrics_port)
        assert (
            value(
                before,
                "pfxpold_requests_total",
                protocol_state="RCPT",
                action="OK",
                check="senders",
            )
            == 0
        )
        with daemon.client() as client:
            for _ in range(7):
                assert client.ask(request("good@example.com")) == "OK"
            for _ in range(3):
                assert client.ask(request("bad@example.com")) == "REJECT go away"
            assert client.ask(request("nobody@example.com", state="MAIL")) == "DUNNO"
            # Still connected while scraped.
            during = scrape(metrics_port)
            assert value(during, "pfxpold_connections") == 1
        # One connection closed for a line that is not name=value.
        with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
            sock.sendall(b"request=smtpd_access_policy\nno equals sign\n\n")
            sock.settimeout(10)
            try:
                # Aborted: a reset, or an end of file without a reply.
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
        samples = scrape(metrics_port)
    assert (
        value(
            samples, "pfxpold_requests_total", protocol_state="RCPT", action="OK", check="senders"
        )
        == 7
    )
    assert (
        value(
            samples,
            "pfxpold_requests_total",
            protocol_state="RCPT",
            action="REJECT",
            check="senders",
        )
        == 3
    )
    assert (
        value(
            samples,
            "pfxpold_requests_total",
            protocol_state="MAIL",
            action="DUNNO",
            check="default",
        )
        == 1
    )
    assert sum(samples["pfxpold_requests_total"].values()) == 11
    assert value(samples, "pfxpold_request_duration_seconds_count") == 11
    assert value(samples, "pfxpold_request_duration_seconds_bucket", le="+Inf") == 11
    assert value(samples, "pfxpold_check_verdicts_total", check="senders", verdict="OK") == 7
    assert value(samples, "pfxpold_check_verdicts_total", check="senders", verdict="REJECT") == 3
    assert value(samples, "pfxpold_check_verdicts_total", check="senders", verdict="DUNNO") == 1
    assert value(samples, "pfxpold_check_duration_seconds_count", check="senders") == 11
    assert value(samples, "pfxpold_limit_violations_total", kind="not_name_value") == 1
    assert sum(samples["pfxpold_limit_violations_total"].values()) == 1
    assert "pfxpold_check_errors_total" not in samples
    assert value(samples, "pfxpold_connections") == 0
    assert value(samples, "pfxpold_requests_in_flight") == 0
    [build] = samples["pfxpold_build_info"]
    assert ("version", __version__) in build


PID_CONFIG = """
[metrics]
listen = "tcp:{metrics_port}:interface=127.0.0.1"

[[check]]
name = "pid"
type = "pidcheck:PidCheck"
"""


def test_workers_add_up(tmp_path):
    """
    With --workers 2, the parent's /metrics shows the requests both
    processes answered, exactly, and only the parent listens for scrapes.
    """
    (tmp_path / "pidcheck.py").write_text(PID_CHECK)
    metrics_port = free_port()
    config = PID_CONFIG.format(metrics_port=metrics_port)
    with running_daemon(
        tmp_path, config, extra_args=("--workers", "2"), extra_path=os.fspath(tmp_path)
    ) as daemon:
        wait_for_port(metrics_port, process=daemon.process)
        worker_log = daemon.log_path.replace(".log", ".worker1.log")
        assert wait_until(lambda: "pfxpold serving on" in read(worker_log))
        serving: dict[int, int] = {}
        sent = 0
        # The kernel gives each new connection to whichever process accepts
        # first: keep connecting until both have answered a few.
        for _ in range(400):
            with daemon.client() as client:
                for _ in range(3):
                    answer = client.ask(request("good@example.com"))
                    sent += 1
                    pid = int(answer.split("pid=")[1])
                    serving[pid] = serving.get(pid, 0) + 1
            if len(serving) == 2 and min(serving.values()) >= 6:
                break
        assert len(serving) == 2, serving
        assert daemon.process.pid in serving

        def total() -> float:
            return value(
                scrape(metrics_port),
                "pfxpold_requests_total",
                protocol_state="RCPT",
                action="OK",
                check="pid",
            )

        # A worker's figures reach the parent within a second.
        assert wait_until(lambda: total() == sent), (total(), sent)
        time.sleep(1.5)
        samples = scrape(metrics_port)
        assert (
            value(
                samples, "pfxpold_requests_total", protocol_state="RCPT", action="OK", check="pid"
            )
            == sent
        )
        assert value(samples, "pfxpold_check_verdicts_total", check="pid", verdict="OK") == sent
        assert value(samples, "pfxpold_request_duration_seconds_count") == sent
        assert value(samples, "pfxpold_connections") == 0
        [worker] = children_of(daemon.process.pid)
        with open(f"/proc/{worker}/environ", "rb") as f:
            environment = dict(
                item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item
            )
        directory = environment[b"PFXPOLD_METRICS_DIR"].decode()
        assert os.listdir(directory) == [f"worker-{worker}.json"]
    # The parent removed its directory for the workers' snapshots.
    assert not os.path.exists(directory)


NO_METRICS = """
import sys

from twisted.internet.testing import MemoryReactorClock

from pfxpold import tap

options = tap.Options(reactor=MemoryReactorClock())
options.parseOptions(["--config", sys.argv[1]])
service = tap.makeService(options, options.reactor)
print(service.factory.metrics, service.configuration.chain.observer)
print(sorted(name for name in sys.modules if "prometheus" in name or name == "pfxpold.metrics"))
"""


def test_off_imports_nothing(tmp_path):
    """
    Without [metrics], neither prometheus_client nor pfxpold.metrics is
    imported, and nothing is attached to the factory or the chain.
    """
    config = tmp_path / "pfxpold.toml"
    config.write_text('[[check]]\nname = "demo"\ntype = "demo"\n')
    result = subprocess.run(
        [sys.executable, "-c", NO_METRICS, os.fspath(config)],
        env=daemon_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["None None", "[]"]


def test_missing_library(tmp_path):
    """
    Without prometheus_client installed, [metrics] stops the daemon with one
    line naming the extra to install.
    """
    (tmp_path / "hide").mkdir()
    # A package that cannot be imported: found by find_spec as missing.
    (tmp_path / "hide" / "sitecustomize.py").write_text(
        "import sys\nsys.modules['prometheus_client'] = None\n"
    )
    config = tmp_path / "pfxpold.toml"
    config.write_text('[metrics]\n[[check]]\nname = "demo"\ntype = "demo"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "pfxpold",
            "--config",
            os.fspath(config),
            "--check-config",
        ],
        env=daemon_environment(os.fspath(tmp_path / "hide")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    # twistd prints a usage error (after its usage text) with its own prefix.
    output = result.stdout + result.stderr
    [line] = [line for line in output.splitlines() if "[metrics]" in line]
    assert line.endswith(
        f"{config}: [metrics]: needs the prometheus_client package:"
        " pip install 'pfxpold[metrics]'"
    ), output


def test_reloads_counted_and_checks_still_counted(tmp_path):
    """
    A SIGHUP's reload, good or broken, is counted, with the time of the
    last one; a check rebuilt by the reload goes on counting under its name,
    and a reload resets no figure.
    """
    from tests.integration.test_reload import hangup, rewrite

    (tmp_path / "senders.map").write_text(SENDERS_MAP)
    metrics_port = free_port()
    config = MAP_CONFIG.format(metrics_port=metrics_port)
    with running_daemon(tmp_path, config) as daemon:
        wait_for_port(metrics_port, process=daemon.process)
        with daemon.client() as client:
            assert client.ask(request("good@example.com")) == "OK"
        before = scrape(metrics_port)
        assert value(before, "pfxpold_reloads_total", result="succeeded") == 0
        # The check changes (a default for senders the map does not know):
        # it is rebuilt, under the same name.
        rewrite(daemon, config + 'not_found = "REJECT unknown sender"\n')
        hangup(daemon)
        with daemon.client() as client:
            assert client.ask(request("good@example.com")) == "OK"
            assert client.ask(request("nobody@example.com")) == "REJECT unknown sender"
        rewrite(daemon, config + "no_such_key = 1\n")
        hangup(daemon, count=2)
        samples = scrape(metrics_port)
    assert value(samples, "pfxpold_reloads_total", result="succeeded") == 1
    assert value(samples, "pfxpold_reloads_total", result="failed") == 1
    assert value(samples, "pfxpold_last_reload_timestamp_seconds") > 0
    assert value(samples, "pfxpold_check_verdicts_total", check="senders", verdict="OK") == 2
    assert value(samples, "pfxpold_check_verdicts_total", check="senders", verdict="REJECT") == 1
    assert sum(samples["pfxpold_requests_total"].values()) == 3
