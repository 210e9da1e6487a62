"""
Packaging: pfxpold built from this checkout (sdist, then the wheel from the
sdist), installed in a fresh virtualenv, is what an administrator gets from
C{pip install}: the twistd dropin is found, C{twistd -n pfxpold} answers,
C{pfxpold-query} is installed, and the tac and the fixtures ship.

Every program runs from the virtualenv, in a directory outside the
repository, with no C{PYTHONPATH}: nothing can come from the checkout.
"""

from __future__ import annotations

import os
import tarfile
import zipfile

from tests.integration.deployment import listening_on, running_twistd
from tests.integration.support import REPOSITORY, free_port

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
