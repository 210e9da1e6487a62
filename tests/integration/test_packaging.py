"""
Packaging: pfxpold built from this checkout (sdist, then the wheel from the
sdist), installed in a fresh virtualenv, is what an administrator gets from
C{pip install}: the twistd dropin is found, C{twistd -n pfxpold} answers,
C{pfxpold-query} is installed, and the tac and the fixtures ship.

Every program runs from the virtualenv, in a directory outside the
repository, with no C{PYTHONPATH}: nothing can come from the checkout.

The README's quick start runs here as written, in a copy of the checkout
with Debian's /usr/bin/python3 first on C{PATH}, and so does
scripts/setup-test-env (the suite's own virtualenv) before and after it:
neither may break the other's C{twistd pfxpold}.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

from tests.integration.deployment import (
    STALE_MODULE,
    SYSTEM_PYTHON,
    copy_checkout,
    listening_on,
    readme_block,
    running_twistd,
)
from tests.integration.support import REPOSITORY, free_port, require_program, wait_for_port

DEMO_ANSWERS = {"OK (you win!)", "DUNNO (you lose!)"}


def _repository_files(directory: str, suffix: str = "") -> set[str]:
    """
    The files under C{directory} of the checkout, relative to the
    repository, ending in C{suffix}.
    """
    found = set()
    for parent, directories, files in os.walk(os.path.join(REPOSITORY, directory)):
        directories[:] = [d for d in directories if d != "__pycache__"]
        for name in files:
            if name.endswith(suffix):
                found.add(os.path.relpath(os.path.join(parent, name), REPOSITORY))
    return found


def test_wheel_ships_the_package_and_the_dropin(pfxpold_installation):
    """
    The wheel holds every module of the pfxpold package, the fixtures
    pfxpold.testing reads, the twistd dropin, and the pfxpold-query entry
    point; it holds no twisted/__init__.py or twisted/plugins/__init__.py
    (which would shadow Twisted itself), no dropin.cache and no tests.
    """
    with zipfile.ZipFile(pfxpold_installation.wheel) as wheel:
        names = set(wheel.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points_text = wheel.read(entry_points).decode()
    expected = _repository_files("pfxpold", ".py") | _repository_files("pfxpold/fixtures", ".txt")
    expected |= {"pfxpold/py.typed", "twisted/plugins/pfxpold_plugin.py"}
    assert {"pfxpold/fixtures/rcpt.txt", "pfxpold/checks/demo.py"} <= expected
    assert sorted(expected - names) == []
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    # The README's steps remove a stale build/ before building.
    assert STALE_MODULE not in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache") or n.startswith("tests/")]
    assert "pfxpold-query = pfxpold.query:main" in entry_points_text


def test_sdist_ships_the_tac_fixtures_and_examples(pfxpold_installation):
    """
    The sdist holds pfxpold.tac, the README, the packaging files, every
    module, the fixtures, the dropin and every file under examples/ (the
    README's sample configurations); the wheel installed was built from it.
    """
    with tarfile.open(pfxpold_installation.sdist) as sdist:
        top, *_ = sdist.getnames()
        names = {os.path.relpath(name, top) for name in sdist.getnames()}
    expected = {
        "pfxpold.tac",
        "README.md",
        "setup.py",
        "pyproject.toml",
        "MANIFEST.in",
        "LICENSE",
        "twisted/plugins/pfxpold_plugin.py",
    }
    expected |= _repository_files("pfxpold", ".py") | _repository_files("pfxpold/fixtures")
    expected |= _repository_files("examples")
    assert sorted(expected - names) == []


def test_twistd_lists_the_installed_dropin(pfxpold_installation, tmp_path):
    """
    In the virtualenv, pfxpold and its dropin are imported from the
    installation, the regenerated plugin cache is there, twistd --help
    lists pfxpold, and finding the plugin does not import pfxpold.tap (so
    twistd --help stays light).
    """
    imported = pfxpold_installation.run(
        [
            "python",
            "-c",
            "import sys, pfxpold, twisted.plugins.pfxpold_plugin as p\n"
            "from twisted.application.service import IServiceMaker\n"
            "from twisted.plugin import getPlugins\n"
            "names = [m.tapname for m in getPlugins(IServiceMaker)]\n"
            "print(pfxpold.__file__, p.__file__, 'pfxpold' in names,"
            " 'pfxpold.tap' in sys.modules)",
        ],
        cwd=str(tmp_path),
    )
    assert imported.returncode == 0, imported.stderr
    package_file, dropin_file, listed, tap_imported = imported.stdout.split()
    site_packages = os.path.join(pfxpold_installation.venv, "lib")
    assert package_file.startswith(site_packages)
    assert dropin_file.startswith(site_packages)
    assert (listed, tap_imported) == ("True", "False")
    assert os.path.exists(os.path.join(os.path.dirname(dropin_file), "dropin.cache"))

    help_output = pfxpold_installation.run(["twistd", "--help"], cwd=str(tmp_path))
    assert help_output.returncode == 0, help_output.stderr
    (line,) = [line for line in help_output.stdout.splitlines() if line.split()[:1] == ["pfxpold"]]
    assert "Postfix" in line


def test_installed_daemon_answers_pfxpold_query(pfxpold_installation, tmp_path):
    """
    twistd -n pfxpold from the virtualenv answers the demo request, asked
    with the installed pfxpold-query, by options and from a request file on
    standard input.
    """
    port = free_port()
    log_path = str(tmp_path / "pfxpold.log")
    arguments = ["-n", "--pidfile=", f"--logfile={log_path}", "pfxpold"]
    arguments += ["--port", f"tcp:{port}:interface=127.0.0.1"]
    with running_twistd(pfxpold_installation, str(tmp_path), arguments, listening_on(port)):
        by_options = pfxpold_installation.run(
            [
                "pfxpold-query",
                "--server",
                f"127.0.0.1:{port}",
                "--sender",
                "foo@example.com",
                "--client-address",
                "1.2.3.4",
            ],
            cwd=str(tmp_path),
        )
        with open(os.path.join(REPOSITORY, "pfxpold", "fixtures", "rcpt.txt"), "rb") as request:
            from_stdin = pfxpold_installation.run(
                ["pfxpold-query", "--server", f"127.0.0.1:{port}", "-"],
                cwd=str(tmp_path),
                stdin=request,
            )
    assert by_options.returncode == 0, by_options.stderr
    assert by_options.stdout.strip() in DEMO_ANSWERS
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout.strip() in DEMO_ANSWERS
    with open(log_path, encoding="utf-8") as log:
        text = log.read()
    assert os.path.join(pfxpold_installation.venv, "bin") in text  # twistd's start-up line
    assert "demo check" in text
    assert "from=<foo@example.com>" in text


def test_tac_from_the_sdist_runs_the_installed_package(pfxpold_installation, tmp_path):
    """
    pfxpold.tac as shipped in the sdist, run with twistd -ny from the
    virtualenv, serves on the endpoint named by PFXPOLD_PORT.
    """
    with tarfile.open(pfxpold_installation.sdist) as sdist:
        (member,) = [m for m in sdist.getmembers() if m.name.endswith("/pfxpold.tac")]
        tac_text = sdist.extractfile(member).read()
    (tmp_path / "pfxpold.tac").write_bytes(tac_text)
    port = free_port()
    arguments = ["-ny", "pfxpold.tac", "--pidfile=", "--logfile=tac.log"]
    environment = {"PFXPOLD_PORT": f"tcp:{port}:interface=127.0.0.1"}
    with running_twistd(
        pfxpold_installation,
        str(tmp_path),
        arguments,
        listening_on(port),
        extra_environment=environment,
    ):
        answer = pfxpold_installation.run(
            ["pfxpold-query", "--server", f"127.0.0.1:{port}", "--sender", "tac@example.com"],
            cwd=str(tmp_path),
        )
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() in DEMO_ANSWERS
    assert "from=<tac@example.com>" in (tmp_path / "tac.log").read_text()


def test_version_is_written_once(pfxpold_installation):
    """
    The installed distribution's version is pfxpold.__version__, the one
    place it is written (pyproject.toml reads it from there).
    """
    shown = pfxpold_installation.run(
        [
            "python",
            "-c",
            "import importlib.metadata, pfxpold\n"
            "print(importlib.metadata.version('pfxpold'), pfxpold.__version__)",
        ],
        cwd=pfxpold_installation.root,
    )
    assert shown.returncode == 0, shown.stderr
    installed, written = shown.stdout.split()
    assert installed == written
    assert os.path.basename(pfxpold_installation.wheel) == f"pfxpold-{written}-py3-none-any.whl"


#: What an administrator's shell has on a fresh Debian 12: Debian's python3.
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

#: Seconds the quick start or setup-test-env may take: pip installs
#: Twisted and the rest from the network or its cache.
INSTALL_TIMEOUT = 300


def _shell_environment(clone: str) -> dict[str, str]:
    """
    A login shell's environment in C{clone}: Debian's PATH, no
    virtualenv, no PYTHONPATH; HOME kept so that pip reuses its cache.
    """
    return {
        "PATH": DEBIAN_PATH,
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PWD": clone,
    }


@contextmanager
def quick_start(clone: str, port: int, log_path: str) -> Iterator[None]:
    """
    Run the README's quick-start block, as written but for the port, in
    C{clone}, until its twistd listens on C{port}; stop everything it
    started afterwards (it runs in a session of its own: its process group
    is exactly what it started).
    """
    script = readme_block("quick-start")
    assert "--port 9998" in script
    script = script.replace("--port 9998", f"--port {port}")
    with open(log_path, "wb") as log:
        shell = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=clone,
            env=_shell_environment(clone),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            wait_for_port(port, timeout=INSTALL_TIMEOUT, process=shell)
        except RuntimeError as e:
            with open(log_path, errors="replace") as log_file:
                raise AssertionError(f"{e}:\n{log_file.read()[-4000:]}") from None
        yield
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGTERM)
            try:
                shell.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(shell.pid, signal.SIGKILL)
                shell.wait()
        _assert_group_gone(shell.pid)


def _assert_group_gone(group: int) -> None:
    """
    No process of the process group C{group} (one this test started) is
    left; any that is gets killed, and the test fails.
    """
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return
    os.killpg(group, signal.SIGKILL)
    raise AssertionError(f"processes of group {group} were left running")


def _query(clone: str, port: int) -> subprocess.CompletedProcess:
    """
    The README's pfxpold-query command, as written, asking C{port}.
    """
    block = readme_block("quick-start-query")
    (command,) = [line for line in block.splitlines() if line[:1] != "#"]
    assert command.startswith(".venv/bin/pfxpold-query ")
    return subprocess.run(
        ["bash", "-e", "-c", f"{command} --server 127.0.0.1:{port}"],
        cwd=clone,
        env=_shell_environment(clone),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _lists_pfxpold(clone: str, python: str, extra_environment: dict[str, str]) -> bool:
    """
    Whether twistd of the virtualenv of C{python} lists the pfxpold plugin.
    """
    help_output = subprocess.run(
        [python, "-m", "twisted", "--help"],
        cwd=clone,
        env={**_shell_environment(clone), **extra_environment},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_output.returncode == 0, help_output.stderr
    return any(line.split()[:1] == ["pfxpold"] for line in help_output.stdout.splitlines())


def _check_quick_start(clone: str, log_directory: str) -> None:
    """
    The quick start runs; its twistd lists pfxpold and its daemon answers
    the README's pfxpold-query command.
    """
    port = free_port()
    with quick_start(clone, port, os.path.join(log_directory, f"quick-start-{port}.log")):
        answer = _query(clone, port)
        listed = _lists_pfxpold(clone, os.path.join(clone, ".venv", "bin", "python"), {})
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() in DEMO_ANSWERS
    assert listed


def _setup_test_env(clone: str) -> None:
    """
    Run scripts/setup-test-env in C{clone} (its own .venv-test/), as
    ./test.sh does, and check that the suite's virtualenv runs the twistd
    dropin of the clone, from PYTHONPATH, without pfxpold installed in it.
    """
    result = subprocess.run(
        ["scripts/setup-test-env"],
        cwd=clone,
        env=_shell_environment(clone),
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    python = os.path.join(clone, ".venv-test", "bin", "python")
    found = subprocess.run(
        [python, "-c", "import importlib.util; print(importlib.util.find_spec('pfxpold'))"],
        cwd="/",
        env=_shell_environment(clone),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.stdout.strip() == "None", found.stdout + found.stderr
    assert _lists_pfxpold(clone, python, {"PYTHONPATH": clone})


def test_quick_start_then_test_env(tmp_path):
    """
    The README's quick-start block, run as written in a copy of the
    checkout with Debian's python3 first on PATH, installs pfxpold in
    .venv/ and starts the daemon; twistd lists pfxpold, the README's
    pfxpold-query command gets a demo answer, and everything it started
    stops. scripts/setup-test-env in the same clone then leaves it working.
    """
    require_program(SYSTEM_PYTHON, "python3")
    clone = copy_checkout(str(tmp_path / "clone"))
    _check_quick_start(clone, str(tmp_path))
    _setup_test_env(clone)
    _check_quick_start(clone, str(tmp_path))


def test_test_env_then_quick_start(tmp_path):
    """
    scripts/setup-test-env first, then the README's quick start, in one
    clone: the quick start's daemon answers, and the suite's virtualenv
    still runs the clone's dropin.
    """
    require_program(SYSTEM_PYTHON, "python3")
    clone = copy_checkout(str(tmp_path / "clone"))
    _setup_test_env(clone)
    _check_quick_start(clone, str(tmp_path))
    python = os.path.join(clone, ".venv-test", "bin", "python")
    assert _lists_pfxpold(clone, python, {"PYTHONPATH": clone})
