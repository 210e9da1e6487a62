"""
Helpers for the operational integration tests: pfxpold built from this
checkout into an sdist and a wheel, installed in a fresh virtualenv that an
unprivileged user can read, and C{twistd} run from that virtualenv the way
an administrator runs it (as root, with C{--uid}, C{--chroot}, syslog,
daemonized).

Nothing here imports pfxpold from the checkout: every process runs the
installed copy with a clean environment (no C{PYTHONPATH}) from a directory
outside the repository.
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import pytest

from tests.integration.support import IN_CI, REPOSITORY, stop_process

#: Debian's interpreter: readable by every user, unlike this machine's
#: default python3, which lives under /root (mode 0700).
SYSTEM_PYTHON = "/usr/bin/python3"

#: What a build must not copy from a working checkout.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "_trial_temp*",
    ".venv*",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "dropin.cache",
    "twistd.pid",
    "twistd.log*",
)

#: The service user and group the privilege tests switch to.
SERVICE_USER = "nobody"
SERVICE_GROUP = "nogroup"


def require_root() -> None:
    """
    Skip the calling test unless it runs as root; in CI, fail instead.
    """
    if os.geteuid() == 0:
        return
    message = "needs root: it binds a port below 1024, switches users or chroots"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_mount_namespace() -> None:
    """
    Skip the calling test unless this machine lets root make a private
    mount namespace (C{unshare --mount}: a container without
    CAP_SYS_ADMIN does not); in CI, fail instead.
    """
    unshare = shutil.which("unshare")
    probe = (
        subprocess.run([unshare, "--mount", "true"], capture_output=True, timeout=30)
        if unshare
        else None
    )
    if probe is not None and probe.returncode == 0:
        return
    message = "needs unshare --mount (util-linux, CAP_SYS_ADMIN) to give the daemon its /dev/log"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _run(command: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess:
    """
    Run C{command}, raising with its output when it fails.
    """
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=600, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def _builder_environment() -> dict[str, str]:
    """
    The environment for pip and build: ours, less anything that would make
    them see the checkout or another environment.
    """
    environment = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_USER"):
        environment.pop(name, None)
    return environment


@dataclass
class Installation:
    """
    pfxpold installed from its wheel in a fresh virtualenv.

    @ivar root: a world-readable directory holding everything below.
    @ivar venv: the virtualenv.
    @ivar sdist: the source distribution built from the checkout.
    @ivar wheel: the wheel built from that sdist and installed in C{venv}.
    @ivar base_python: the interpreter the virtualenv was made with.
    """

    root: str
    venv: str
    sdist: str
    wheel: str
    base_python: str

    def program(self, name: str) -> str:
        """
        @return: the path of the installed script C{name} (twistd, python, ...).
        """
        return os.path.join(self.venv, "bin", name)

    def environment(self, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """
        A clean environment for a program of the virtualenv: no
        C{PYTHONPATH}, the virtualenv's scripts first on C{PATH}.
        """
        environment = {
            "PATH": f"{os.path.join(self.venv, 'bin')}:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": self.root,
        }
        environment.update(extra or {})
        return environment

    def run(
        self,
        arguments: Sequence[str],
        cwd: str,
        extra_environment: Optional[Mapping[str, str]] = None,
        **kwargs: object,
    ) -> subprocess.CompletedProcess:
        """
        Run a program of the virtualenv (C{arguments[0]} is its name) to
        completion, in C{cwd}.
        """
        return subprocess.run(
            [self.program(arguments[0]), *arguments[1:]],
            cwd=cwd,
            env=self.environment(extra_environment),
            capture_output=True,
            text=True,
            timeout=60,
            **kwargs,
        )


#: A module only a stale build/ directory holds: the README's install steps
#: must keep it out of the wheel.
STALE_MODULE = "pfxpold/stale_deleted_module.py"


def readme_block(marker: str) -> str:
    """
    The shell block of README.md that follows the comment
    C{<!-- MARKER ... -->}, as written there.
    """
    with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as f:
        text = f.read()
    found = re.search(r"<!-- " + re.escape(marker) + r"[: ].*?-->\n```sh\n(.*?)\n```\n", text, re.S)
    if found is None:
        raise LookupError(f"README.md has no ```sh block after <!-- {marker} -->")
    return found.group(1) + "\n"


def copy_checkout(destination: str) -> str:
    """
    Copy the checkout's source (no build products, caches or virtualenvs)
    to C{destination}, as a fresh clone would have it.
    """
    shutil.copytree(REPOSITORY, destination, ignore=_NOT_SOURCE)
    return destination


def install(root: str) -> Installation:
    """
    Run the README's production install steps (build the sdist and the
    wheel in a virtualenv of their own, install the wheel in a fresh
    virtualenv made with Debian's interpreter, regenerate Twisted's plugin
    cache) with temporary paths under C{root}, from a copy of the checkout
    that has a stale C{build/} directory, as a clone used before may have.
    """
    os.chmod(root, 0o755)
    source = copy_checkout(os.path.join(root, "source"))
    stale = os.path.join(source, "build", "lib", STALE_MODULE)
    os.makedirs(os.path.dirname(stale))
    with open(stale, "w") as f:
        f.write("raise ImportError('deleted long ago')\n")
    venv = os.path.join(root, "venv")
    base_python = SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else sys.executable
    script = (
        readme_block("production-install")
        .replace("/path/to/pfxpold", source)
        .replace("/tmp/pfxpold-build", os.path.join(root, "build-venv"))
        .replace("/opt/pfxpold", venv)
        .replace(SYSTEM_PYTHON, base_python)
    )
    _run(["bash", "-euo", "pipefail", "-c", script], env=_builder_environment(), cwd=root)
    (sdist,) = glob.glob(os.path.join(source, "dist", "pfxpold-*.tar.gz"))
    (wheel,) = glob.glob(os.path.join(source, "dist", "pfxpold-*.whl"))
    return Installation(root=root, venv=venv, sdist=sdist, wheel=wheel, base_python=base_python)


def world_readable_directory(parent: str, name: str) -> str:
    """
    Make C{parent/name} and return it, readable and traversable by
    everyone, as the service user needs for the files it reads.
    """
    path = os.path.join(parent, name)
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o755)
    return path


def free_privileged_port(low: int = 600, high: int = 1000) -> int:
    """
    A free TCP port below 1024 on 127.0.0.1 (only root can bind one).
    """
    candidates = list(range(low, high + 1))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {low} and {high} on 127.0.0.1")


def process_ids(pid: int) -> dict[str, list[int]]:
    """
    The C{Uid}, C{Gid} (real, effective, saved, filesystem) and C{Groups}
    of a running process, from C{/proc/PID/status}.
    """
    ids: dict[str, list[int]] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("Uid", "Gid", "Groups"):
                ids[name] = [int(number) for number in value.split()]
    return ids


def process_gone(pid: int) -> bool:
    """
    Whether process C{pid} has exited (a zombie waiting for its parent to
    reap it counts as exited).
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat_file:
            state = stat_file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """
    Poll C{condition} until it is true, for at most C{timeout} seconds.

    @raise AssertionError: naming C{what} when it never becomes true.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s: {what or condition}")
        time.sleep(0.05)


def build_jail(
    path: str,
    users: Sequence[str] = ("root", SERVICE_USER),
    groups: Sequence[str] = ("root", SERVICE_GROUP),
) -> str:
    """
    Make a chroot jail for twistd at C{path}: C{dev/null} (a real device
    node, made with mknod), and C{etc/passwd} and C{etc/group} with the
    entries C{--uid}/C{--gid} need (twistd calls initgroups() after the
    chroot, which reads them).
    """
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o755)
    for directory in ("dev", "etc"):
        os.makedirs(os.path.join(path, directory), mode=0o755, exist_ok=True)
    null = os.path.join(path, "dev", "null")
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(null, 0o666)
    with open(os.path.join(path, "etc", "passwd"), "w", encoding="utf-8") as passwd:
        for user in users:
            entry = pwd.getpwnam(user)
            passwd.write(
                f"{entry.pw_name}:x:{entry.pw_uid}:{entry.pw_gid}:{entry.pw_gecos}:"
                f"{entry.pw_dir}:{entry.pw_shell}\n"
            )
    with open(os.path.join(path, "etc", "group"), "w", encoding="utf-8") as group:
        for name in groups:
            entry = grp.getgrnam(name)
            group.write(f"{entry.gr_name}:x:{entry.gr_gid}:{','.join(entry.gr_mem)}\n")
    return path


class Twistd:
    """
    A C{twistd} of the installation, run in the foreground (C{-n}) as a
    subprocess; its PID is twistd's own even behind C{unshare}/C{sh -c
    'exec ...'} wrappers, which exec it.

    @ivar output_path: where its standard output and error go.
    """

    def __init__(self, process: subprocess.Popen, output_path: str) -> None:
        self.process = process
        self.output_path = output_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        with open(self.output_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 15.0) -> int:
        """
        SIGTERM this twistd (only this PID) and wait for it; SIGKILL it if
        it does not exit in time.

        @return: its exit status.
        """
        return stop_process(self.process, timeout)


@contextmanager
def running_twistd(
    installation: Installation,
    directory: str,
    arguments: Sequence[str],
    ready: Callable[[Twistd], None],
    wrapper: Sequence[str] = (),
    extra_environment: Optional[Mapping[str, str]] = None,
) -> Iterator[Twistd]:
    """
    Run C{[*wrapper, VENV/bin/twistd, *arguments]} in C{directory} for the
    duration of the block, then stop it.

    @param ready: called with the L{Twistd} to wait until it serves; it
        raises when it does not.
    """
    output_path = os.path.join(directory, f"twistd-{time.monotonic_ns()}.out")
    with open(output_path, "wb") as output:
        process = subprocess.Popen(
            [*wrapper, installation.program("twistd"), *arguments],
            cwd=directory,
            env=installation.environment(extra_environment),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    twistd = Twistd(process, output_path)
    try:
        try:
            ready(twistd)
        except Exception as e:
            twistd.stop()
            raise AssertionError(f"twistd did not start ({e}):\n{twistd.output()}") from None
        yield twistd
    finally:
        twistd.stop()


def listening_on(port: int, timeout: float = 20.0) -> Callable[[Twistd], None]:
    """
    A C{ready} callable for L{running_twistd}: wait for C{127.0.0.1:port}.
    """
    from tests.integration.support import wait_for_port

    def ready(twistd: Twistd) -> None:
        wait_for_port(port, timeout=timeout, process=twistd.process)

    return ready


def log_says(path: str, text: str, timeout: float = 20.0) -> Callable[[Twistd], None]:
    """
    A C{ready} callable for L{running_twistd}: wait until the log file
    C{path} contains C{text} (for listeners a port probe cannot tell
    apart from a previous run's, like a unix socket left behind).
    """

    def ready(twistd: Twistd) -> None:
        def said() -> bool:
            if twistd.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {twistd.process.returncode}")
            return os.path.exists(path) and text in read_file(path)

        wait_until(said, timeout, what=f"{text!r} in {path}")

    return ready


def read_file(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
