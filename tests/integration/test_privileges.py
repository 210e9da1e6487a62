"""
Dropping privileges for real: as root, C{twistd --uid nobody --gid
nogroup pfxpold} binds its ports (one below 1024) first, then runs as the
unprivileged user, and still answers.

The service user must be able to read the interpreter and the installed
package: this machine's default python lives under /root (mode 0700), so
the virtualenv is made from Debian's /usr/bin/python3 outside /root (see
the C{pfxpold_installation} fixture).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tempfile

from tests.integration.deployment import (
    SERVICE_GROUP,
    SERVICE_USER,
    SYSTEM_PYTHON,
    free_privileged_port,
    listening_on,
    process_ids,
    require_root,
    running_twistd,
    wait_until,
)
from tests.integration.support import PolicyClient, free_port, require_program, wait_for_port

DEMO_ANSWERS = {"OK (you win!)", "DUNNO (you lose!)"}


def test_uid_gid_drop_after_binding_a_privileged_port(pfxpold_installation, tmp_path):
    """
    twistd -n --uid nobody --gid nogroup pfxpold listening on a free port
    below 1024 (given as a bare number) and on an ordinary one: both answer, and the process's real,
    effective, saved and filesystem uid and gid are nobody/nogroup, with no
    supplementary group of root's left.
    """
    require_root()
    require_program(SYSTEM_PYTHON, "python3")
    assert pfxpold_installation.base_python == SYSTEM_PYTHON
    uid = pwd.getpwnam(SERVICE_USER).pw_uid
    gid = grp.getgrnam(SERVICE_GROUP).gr_gid
    port = free_port()
    privileged_port = free_privileged_port()
    log_path = str(tmp_path / "pfxpold.log")
    arguments = [
        "-n",
        "--pidfile=",
        f"--logfile={log_path}",
        "--uid",
        SERVICE_USER,
        "--gid",
        SERVICE_GROUP,
        "pfxpold",
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--port",
        # A bare number, the README's short form: 127.0.0.1 only.
        str(privileged_port),
    ]
    with running_twistd(
        pfxpold_installation, str(tmp_path), arguments, listening_on(port)
    ) as twistd:
        wait_for_port(privileged_port, process=twistd.process)
        answers = []
        for listening_port in (port, privileged_port):
            with PolicyClient(listening_port) as client:
                answers.append(
                    client.ask({"sender": "drop@example.com", "client_address": "192.0.2.1"})
                )
        ids = process_ids(twistd.pid)
        assert twistd.process.poll() is None
    assert set(answers) <= DEMO_ANSWERS and len(answers) == 2
    assert ids["Uid"] == [uid] * 4
    assert ids["Gid"] == [gid] * 4
    assert 0 not in ids["Groups"]
    with open(log_path, encoding="utf-8") as log:
        text = log.read()
    assert f"set uid/gid {uid}/{gid}" in text
    assert text.count("from=<drop@example.com>") == 2


def test_workers_own_sockets_on_a_privileged_port(pfxpold_installation):
    """
    With --workers 2 and --uid nobody, the worker's own socket on a port
    below 1024 is bound before the privileges go: a burst of connections
    there is answered by both processes, each running as nobody, and
    nothing says the socket is shared.
    """
    require_root()
    require_program(SYSTEM_PYTHON, "python3")
    from tests.integration.test_workers import CONFIG, PID_CHECK, children_of, wait_until

    uid = pwd.getpwnam(SERVICE_USER).pw_uid
    privileged_port = free_privileged_port()
    # The worker, already nobody, reads the configuration and the check,
    # and runs in this directory (twistd changes to its own).
    shared = tempfile.mkdtemp(prefix="pfxpold-workers-")
    try:
        os.chmod(shared, 0o755)
        with open(os.path.join(shared, "pidcheck.py"), "w") as f:
            f.write(PID_CHECK)
        config = os.path.join(shared, "pfxpold.toml")
        with open(config, "w") as f:
            f.write(CONFIG)
        arguments = [
            "-n",
            "--pidfile=",
            "--uid",
            SERVICE_USER,
            "--gid",
            SERVICE_GROUP,
            "pfxpold",
            "--config",
            config,
            "--workers",
            "2",
            "--port",
            str(privileged_port),
        ]
        with running_twistd(
            pfxpold_installation,
            shared,
            arguments,
            listening_on(privileged_port),
            extra_environment={"PYTHONPATH": shared},
        ) as twistd:
            # Connections hashed to the worker's socket wait for it to serve.
            assert wait_until(lambda: len(children_of(twistd.pid)) == 1)
            [worker] = children_of(twistd.pid)
            clients = [PolicyClient(privileged_port) for _ in range(32)]
            try:
                pids = {
                    int(client.ask({"sender": "drop@example.com"}).split("pid=")[1])
                    for client in clients
                }
            finally:
                for client in clients:
                    client.close()
            assert pids == {twistd.pid, worker}
            assert process_ids(worker)["Uid"] == [uid] * 4
            assert "could not be bound" not in twistd.output()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_workers_from_a_directory_the_user_may_not_enter(pfxpold_installation, tmp_path):
    """
    --workers 2 --uid nobody started from a directory only root may enter
    (twistd's run directory, which a worker enters as nobody): the parent
    says once why it starts no worker, and answers alone.
    """
    require_root()
    require_program(SYSTEM_PYTHON, "python3")
    from tests.integration.test_workers import children_of

    os.chmod(tmp_path, 0o700)
    port = free_port()
    arguments = ["-n", "--pidfile=", "--uid", SERVICE_USER, "--gid", SERVICE_GROUP, "pfxpold"]
    arguments += ["--workers", "2", "--port", f"tcp:{port}:interface=127.0.0.1"]
    with running_twistd(
        pfxpold_installation, str(tmp_path), arguments, listening_on(port)
    ) as twistd:
        with PolicyClient(port) as client:
            assert client.ask({"sender": "a@example.com"}) in DEMO_ANSWERS
        assert children_of(twistd.pid) == []
        output = twistd.output()
    assert output.count("cannot start the workers: uid") == 1
    assert f"may not enter this process's directory {tmp_path}" in output
    assert "Traceback" not in output


def test_worker_that_cannot_read_the_configuration(pfxpold_installation, tmp_path):
    """
    --workers 2 --uid nobody with a configuration only root may read: the
    parent (root when it reads it) serves; the worker, nobody, fails at
    every start, is started again less and less often, and every
    connection is answered by the parent meanwhile (the worker's own
    socket was closed when it first ended).
    """
    require_root()
    require_program(SYSTEM_PYTHON, "python3")
    shared = tempfile.mkdtemp(prefix="pfxpold-workers-")
    try:
        os.chmod(shared, 0o755)
        config = os.path.join(shared, "pfxpold.toml")
        with open(config, "w") as f:
            f.write('[[check]]\nname = "demo"\ntype = "demo"\n')
        os.chmod(config, 0o600)
        port = free_port()
        arguments = ["-n", "--pidfile=", "--uid", SERVICE_USER, "--gid", SERVICE_GROUP]
        arguments += ["pfxpold", "--config", config, "--workers", "2"]
        arguments += ["--port", f"tcp:{port}:interface=127.0.0.1"]
        with running_twistd(pfxpold_installation, shared, arguments, listening_on(port)) as twistd:
            wait_until(
                lambda: "starting it again in 2 s" in twistd.output(),
                timeout=20.0,
                what="the worker started again after 2 s",
            )
            clients = [PolicyClient(port) for _ in range(32)]
            try:
                for client in clients:
                    assert client.ask({"sender": "a@example.com"}) in DEMO_ANSWERS
            finally:
                for client in clients:
                    client.close()
            output = twistd.output()
        assert "starting it again in 1 s, sharing the parent's listening sockets" in output
        assert "Permission denied" in output
    finally:
        shutil.rmtree(shared, ignore_errors=True)
