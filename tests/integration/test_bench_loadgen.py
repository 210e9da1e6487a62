"""
The benchmark's load generator (bench/loadgen.c) still builds and checks
replies: a short run against the trivial C server, with one record whose
expected answer the server never gives. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from tests.integration.support import REPOSITORY, free_port, require_program, wait_for_port


def load_bench_runner():
    """
    bench/run.py as a module (bench/ is not a package).
    """
    spec = importlib.util.spec_from_file_location(
        "bench_run", os.path.join(REPOSITORY, "bench", "run.py")
    )
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules.setdefault("bench_run", module)
    spec.loader.exec_module(module)
    return module


def test_loadgen_counts_right_and_wrong_answers(tmp_path):
    """Right answers are counted as requests, the unexpected one as wrong."""
    compiler = require_program("cc", "gcc")
    bench = load_bench_runner()
    programs = {}
    for name in ("loadgen", "trivial_server"):
        programs[name] = os.fspath(tmp_path / name)
        subprocess.run(
            [
                compiler,
                "-O2",
                "-o",
                programs[name],
                os.path.join(bench.BENCH, f"{name}.c"),
                "-lpthread",
            ],
            check=True,
        )
    requests = bench.make_requests(3)
    assert all(len(request) == 29 for request in requests)
    wrong_sender = requests[2]["sender"]
    records = os.fspath(tmp_path / "records.txt")
    bench.write_records(
        records,
        requests,
        lambda request: ["OK"] if request["sender"] == wrong_sender else ["DUNNO", "OK"],
    )
    port = free_port()
    server = subprocess.Popen([programs["trivial_server"], str(port)], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=server)
        result = subprocess.run(
            [
                programs["loadgen"],
                "-p",
                str(port),
                "-f",
                records,
                "-c",
                "3",
                "-d",
                "1",
                "-w",
                "0.2",
                "-P",
                str(server.pid),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    finally:
        server.terminate()
        server.wait()
    report = json.loads(result.stdout)
    assert report["requests"] > 0
    assert report["wrong"] > 0
    assert "got action=DUNNO expected action=OK" in report["first_wrong"]
    for key in ("malformed", "closed", "connect_errors", "timeouts", "starved_connections"):
        assert report[key] == 0, key
    assert report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert report["daemon_cpu_s"] >= 0
