"""
The Redis store over TLS (redis-server --tls-port, a throwaway CA) as an
ACL user with a password file: counting works; a wrong CA and a wrong
password are each an on_error answer and one clear logged error.
"""

from __future__ import annotations

import os

from tests.integration.certificates import make_certificates
from tests.integration.redis_groups import redis_cli
from tests.integration.redis_server import RedisServer, RedisTLS
from tests.integration.support import running_daemon
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
    # No client certificate: the server does not ask for one.
    tls = RedisTLS.make(directory, client_certificates=False)
    other = os.path.join(directory, "other")
    os.mkdir(other)
    other_ca, _ = make_certificates(other)
    server = RedisServer(directory, tls=tls)
    server.start()
    try:
        redis_cli(
            server.port, "ACL", "SETUSER", "pfx", "on", ">s3cret", "~pfxpold:*", "+@all", tls=tls
        )
        secret = os.path.join(directory, "redis.secret")
        with open(secret, "w") as f:
            f.write("s3cret\n")

        def store(ca_file: str) -> str:
            return (
                f'[stores.main]\ntype = "redis"\nendpoint = "{server.endpoint}"\n'
                f"{tls.store_lines(ca_file)}"
                f'username = "pfx"\npassword_file = "{secret}"\ntimeout = 2.0\n'
            )

        user = unique("tls")
        with running_daemon(tmp_path, quota_config(store(tls.files.ca), 2)) as daemon:
            assert [ask(daemon, user) for _ in range(3)] == [
                "OK",
                "OK",
                "REJECT 5.7.1 quota day of 2 reached",
            ]
        keys = redis_cli(
            server.port, "--user", "pfx", "--pass", "s3cret", "--no-auth-warning", "--scan", tls=tls
        )
        assert f"pfxpold:quota:{{quota:{user}}}:day:" in keys

        with running_daemon(tmp_path, quota_config(store(other_ca), 2)) as daemon:
            assert poll(lambda: "cannot use the connection" in daemon.log(), 10)
            assert ask(daemon, unique("tls")) == ON_ERROR
            log = daemon.log()
        assert "certificate verify failed" in log, log

        with open(secret, "w") as f:
            f.write("wrong\n")
        with running_daemon(tmp_path, quota_config(store(tls.files.ca), 2)) as daemon:
            assert poll(lambda: "cannot use the connection" in daemon.log(), 10)
            assert ask(daemon, unique("tls")) == ON_ERROR
            log = daemon.log()
        assert "authentication failed: WRONGPASS" in log, log
        # Logged once, not at every retry.
        assert log.count("authentication failed") == 1, log
    finally:
        server.stop()
