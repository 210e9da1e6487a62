"""
The Redis store over TLS (redis-server --tls-port, a throwaway CA) as an
ACL user with a password file: counting works; a wrong CA and a wrong
password are each an on_error answer and one clear logged error.
"""

from __future__ import annotations

import os
import subprocess

from tests.integration.certificates import make_certificates, split_certificate
from tests.integration.redis_server import RedisServer
from tests.integration.support import free_port, require_program, running_daemon
from tests.integration.test_state_stores import ask, poll, quota_config, unique

ON_ERROR = "451 4.3.0 quota store unavailable"


def test_tls_and_acl_user(tmp_path: os.PathLike) -> None:
    """
    A quota counts through TLS as the ACL user C{pfx}; with another CA the
    handshake fails ("certificate verify failed" logged), with a wrong
    password AUTH does ("authentication failed" logged): both answer
    on_error at once.
    """
    directory = os.fspath(tmp_path)
    ca, server_pem = make_certificates(directory)
    certificate, key = split_certificate(server_pem, directory)
    other = os.path.join(directory, "other")
    os.mkdir(other)
    other_ca, _ = make_certificates(other)
    port = free_port()
    server = RedisServer(
        directory,
        port,
        extra_args=(
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", certificate,
            "--tls-key-file", key,
            "--tls-ca-cert-file", ca,
            "--tls-auth-clients", "no",
        ),
    )  # fmt: skip
    server.start()
    try:
        cli = [
            require_program("/usr/bin/redis-cli", "redis-tools"),
            "--tls",
            "--cacert",
            ca,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ]
        subprocess.run(
            [*cli, "ACL", "SETUSER", "pfx", "on", ">s3cret", "~pfxpold:*", "+@all"],
            check=True,
            capture_output=True,
        )
        secret = os.path.join(directory, "redis.secret")
        with open(secret, "w") as f:
            f.write("s3cret\n")

        def store(ca_file: str) -> str:
            return (
                '[stores.main]\ntype = "redis"\n'
                f'endpoint = "tcp:host=127.0.0.1:port={port}"\n'
                f'tls = true\ntls_ca_file = "{ca_file}"\n'
                f'username = "pfx"\npassword_file = "{secret}"\ntimeout = 2.0\n'
            )

        user = unique("tls")
        with running_daemon(tmp_path, quota_config(store(ca), 2)) as daemon:
            assert [ask(daemon, user) for _ in range(3)] == [
                "OK",
                "OK",
                "REJECT 5.7.1 quota day of 2 reached",
            ]
        keys = subprocess.run(
            [*cli, "--user", "pfx", "--pass", "s3cret", "--no-auth-warning", "--scan"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"pfxpold:quota:{{quota:{user}}}:day:" in keys

        with running_daemon(tmp_path, quota_config(store(other_ca), 2)) as daemon:
            assert poll(lambda: "cannot use the connection" in daemon.log(), 10)
            assert ask(daemon, unique("tls")) == ON_ERROR
            log = daemon.log()
        assert "certificate verify failed" in log, log

        with open(secret, "w") as f:
            f.write("wrong\n")
        with running_daemon(tmp_path, quota_config(store(ca), 2)) as daemon:
            assert poll(lambda: "cannot use the connection" in daemon.log(), 10)
            assert ask(daemon, unique("tls")) == ON_ERROR
            log = daemon.log()
        assert "authentication failed: WRONGPASS" in log, log
        # Logged once, not at every retry.
        assert log.count("authentication failed") == 1, log
    finally:
        server.stop()
