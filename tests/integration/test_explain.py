"""
C{pfxpold-explain} as a mail admin runs it: a subprocess on the shipped
example configurations, its output, its one-line errors, and a stateful
check that leaves the production store alone.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.integration.support import REPOSITORY

EXAMPLES = os.path.join(REPOSITORY, "examples")


def explain(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pfxpold.explain", *argv],
        env={**os.environ, "PYTHONPATH": REPOSITORY},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def examples(tmp_path):
    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy)
    return copy


def test_pcre_example(examples):
    """The client-names example: a dynamic-looking name, then a forged HELO."""
    config = str(examples / "client-names.toml")
    result = explain("--config", config, "--client-name", "dsl-7.isp.example")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("request: RCPT dsl-7.isp.example[")
    assert lines[1] == (
        "check client-names (file): DEFER_IF_PERMIT 4.7.1 Your host name looks dynamic"
        " (dsl...); please use your provider's mail server"
    )
    assert lines[2].startswith("    yes  client_name='dsl-7.isp.example': client-names.pcre:10: ")
    assert lines[-1].startswith("answer: DEFER_IF_PERMIT 4.7.1 Your host name looks dynamic")
    assert lines[-1].endswith("(decided by client-names)")

    request = "client_name=mx.isp.example\nhelo_name=mail.example.com\n\n"
    result = explain("--config", config, "-", stdin=request)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "check client-names (file): REJECT 5.7.1 You are not mail.example.com",
        "    no   client_name='mx.isp.example': no rule matches",
        "    yes  helo_name='mail.example.com': client-names.pcre:19:"
        " REJECT 5.7.1 You are not mail.example.com",
        "answer: REJECT 5.7.1 You are not mail.example.com (decided by client-names)",
    ]


def test_greylist_leaves_the_store_alone(examples):
    """
    The greylist example's SQLite store is replaced by a private memory
    store: the first attempt is deferred and no state file is written.
    """
    config = str(examples / "greylist.toml")
    arguments = ["--client-address", "203.0.113.7", "--sender", "a@example.org"]
    arguments += ["--recipient", "b@example.net"]
    for _ in range(2):
        result = explain("--config", config, *arguments)
        assert result.returncode == 0, result.stderr
        assert "answer: DEFER_IF_PERMIT Greylisted" in result.stdout
    assert not (examples / "pfxpold-state.sqlite3").exists()


def test_errors_are_one_line(examples):
    """A broken table or a missing file is one line on stderr and exit status 1."""
    with open(examples / "client-names.pcre", "a", encoding="utf-8") as f:
        f.write("/^(?=x)/ REJECT look-ahead\n")
    result = explain("--config", str(examples / "client-names.toml"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("pfxpold-explain: ")
    assert "client-names.pcre:20: '/^(?=x)/': not supported by RE2" in result.stderr

    result = explain("--config", str(examples / "nope.toml"))
    assert result.returncode == 1
    assert (
        result.stderr
        == f"pfxpold-explain: {examples / 'nope.toml'}: cannot read: No such file or directory\n"
    )


def test_help():
    """--help tells that stores are private and shows pfxpold-query's request options."""
    result = explain("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "private in-memory store" in text
    for option in ("--sender", "--client-address", "--attribute", "request_file"):
        assert option in text


def test_readme_example(examples):
    """The README's pfxpold-explain example prints what the README shows."""
    with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start = readme.index("### Explaining a request offline")
    section = readme[start : readme.index("\n### ", start + 1)]
    command, output = re.findall(r"```\w*\n(.*?)```", section, re.S)[:2]
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0] == "pfxpold-explain"
    argv = [str(examples / "client-names.toml") if a.startswith("examples/") else a for a in argv]
    result = explain(*argv[1:])
    assert result.returncode == 0, result.stderr

    def without_instance(text: str) -> list[str]:
        return [re.sub(r"instance=\S+", "instance=", line) for line in text.splitlines()]

    assert without_instance(result.stdout) == without_instance(output)


def test_readme_rules_examples(examples):
    """
    The README's rules section shows pfxpold-explain on examples/rules.toml
    as it prints: each rule, whether it matched, the first condition that
    failed, and the answer.
    """
    with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start = readme.index("### `rules`")
    section = readme[start : readme.index("\n### ", start + 1)]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    pairs = [
        (command, output)
        for (kind, command), (_, output) in zip(blocks, blocks[1:], strict=False)
        if kind == "sh" and command.startswith("pfxpold-explain ")
    ]
    assert len(pairs) == 2
    answers = []
    for command, output in pairs:
        argv = shlex.split(command.replace("\\\n", " "))
        argv = [str(examples / "rules.toml") if a == "examples/rules.toml" else a for a in argv]
        result = explain(*argv[1:])
        assert result.returncode == 0, result.stderr
        assert _without_instance(result.stdout) == _without_instance(output)
        answers.append(result.stdout.splitlines()[-1])
    assert answers[0].startswith("answer: DEFER_IF_PERMIT ")
    assert answers[1] == "answer: DUNNO (decided by default)"


def _without_instance(text: str) -> list[str]:
    return [re.sub(r"instance=\S+", "instance=", line) for line in text.splitlines()]
