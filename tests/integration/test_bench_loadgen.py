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
import textwrap

from tests.integration.support import (
    REPOSITORY,
    free_port,
    require_program,
    running_daemon,
    wait_for_port,
)


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


def build_programs(bench, tmp_path, names=("loadgen", "trivial_server")):
    """
    Compile the benchmark's C programs into C{tmp_path}.
    """
    compiler = require_program("cc", "gcc")
    programs = {}
    for name in names:
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
    return programs


def test_loadgen_counts_right_and_wrong_answers(tmp_path):
    """Right answers are counted as requests, the unexpected one as wrong."""
    bench = load_bench_runner()
    programs = build_programs(bench, tmp_path)
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


#: A check that refuses an instance it has seen before.
NEW_MESSAGE_CHECK = textwrap.dedent(
    '''
    """Answers OK for a new instance, REJECT for one seen before."""
    from zope.interface import implementer

    from pfxpold.interfaces import ICheck


    @implementer(ICheck)
    class NewMessage:
        """Remembers every instance."""

        def __init__(self, options):
            self.seen = set()

        def check(self, request):
            instance = request["instance"]
            if instance in self.seen:
                return "REJECT repeated " + instance
            self.seen.add(instance)
            return "OK"
    '''
)


def test_loadgen_makes_every_request_a_new_message(tmp_path):
    """
    Records come round again many times in a run, but every request sent
    carries an instance of its own: a server that refuses repeated
    instances gives no wrong answer.
    """
    bench = load_bench_runner()
    programs = build_programs(bench, tmp_path, ("loadgen",))
    requests = bench.make_requests(3)
    # Postfix's shape, pid.seconds.microseconds.sequence, the stamp standing
    # for the arrival time.
    assert all(request["instance"].split(".")[1] == bench.STAMP for request in requests)
    records = os.fspath(tmp_path / "records.txt")
    bench.write_records(records, requests, lambda request: ["OK"])
    (tmp_path / "newmessage.py").write_text(NEW_MESSAGE_CHECK)
    config = (
        '[server]\nlog_requests = false\n[[check]]\nname = "new"\ntype = "newmessage:NewMessage"\n'
    )
    with running_daemon(tmp_path, config, extra_path=os.fspath(tmp_path)) as daemon:
        result = subprocess.run(
            [
                programs["loadgen"],
                "-p",
                str(daemon.port),
                "-f",
                records,
                "-c",
                "2",
                "-d",
                "0.5",
                "-w",
                "0.1",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    report = json.loads(result.stdout)
    assert report["requests"] > 3 * 10
    assert report["wrong"] == 0, report["first_wrong"]
