"""
The C{sql} check's MySQL connection settings as a mail admin uses them,
against real MariaDB servers with grant tables: the password from
C{password_file}, a wrong one, the server's unix socket, and TLS (the CA
and the host name verified) to a server that refuses TCP without it: a
wrong CA, a client certificate an account requires, an unreadable CA file,
and a server that offers no TLS refused rather than used in clear text.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Iterator

import pymysql
import pytest

from tests.integration.certificates import make_certificates
from tests.integration.support import running_daemon
from tests.integration.test_lookup_sql import ALLOWED, DEFER, REJECT, UNKNOWN, mariadb_config


@pytest.fixture(scope="module")
def tls_mariadb() -> Iterator:
    """
    A second private MariaDB server, with a certificate for 127.0.0.1
    signed by its own CA and C{require_secure_transport=ON}, holding the
    relay-ACL table; stopped at the end of the module.
    """
    from tests.integration.lookup_mariadb import running_relay_acl

    with running_relay_acl(tls=True) as server:
        yield server


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> str:
    """A CA that signed nothing the servers use."""
    ca, _ = make_certificates(str(tmp_path_factory.mktemp("other-ca")))
    return ca


def wrong_password_file(tmp_path, password: str) -> str:
    path = os.path.join(tmp_path, "wrong.password")
    with open(path, "w") as f:
        f.write(password + "\n")
    return path


def check_lines(log: str, check: str = "relay-acl") -> list[str]:
    """The log lines about the check (twistd's lines, one per event)."""
    return [line for line in log.splitlines() if f"check {check}" in line]


def assert_refused(log: str, count: int, reason: str, *secrets: str) -> None:
    """
    C{log} has C{count} failures of the check, each one line giving
    C{reason} and the on_error answer, no traceback, and none of
    C{secrets}.
    """
    lines = check_lines(log)
    assert len(lines) == count, log
    for line in lines:
        assert reason in line
        assert "on_error=DEFER" in line
    assert "Traceback" not in log
    for secret in secrets:
        assert secret not in log


def server_status(server) -> dict[str, int]:
    """The server's counters of refused logins and of connections that ended before one."""
    rows = server.execute(
        "SHOW GLOBAL STATUS WHERE Variable_name IN"
        " ('Access_denied_errors', 'Aborted_connects_preauth')",
        None,
    )
    return {name: int(value) for name, value in rows}


def wait_for_status(server, name: str, before: dict[str, int], timeout: float = 10.0) -> dict:
    """
    The server's counters once C{name} went up from C{before} (the server
    counts when it notices the closed connection).
    """
    deadline = time.monotonic() + timeout
    while True:
        status = server_status(server)
        if status[name] > before[name]:
            return status
        assert time.monotonic() < deadline, (name, before, status)
        time.sleep(0.05)


def test_password_file(tmp_path, lookup_mariadb):
    """
    The read-only account logs in with the password from password_file
    (its first line: the newline is not part of it; the password has
    quotes, a backslash, a % and a space), and the password is never
    logged.
    """
    with (
        running_daemon(tmp_path, mariadb_config(lookup_mariadb)) as daemon,
        daemon.client() as client,
    ):
        assert client.ask(ALLOWED) == "OK"
        assert client.ask(UNKNOWN) == REJECT
        log = daemon.log()
    assert lookup_mariadb.password not in log


def test_wrong_password(tmp_path, lookup_mariadb):
    """
    A wrong password answers the check's on_error at once (the server
    refuses the login: no waiting for a timeout), every time; the log
    says why in one line per failure, naming the check and the server's
    refusal, and shows neither the wrong password nor the right one.
    """
    wrong = "not-the-password-4711"
    config = mariadb_config(lookup_mariadb).replace(
        lookup_mariadb.password_file, wrong_password_file(tmp_path, wrong)
    )
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        for _ in range(3):
            assert client.ask(ALLOWED) == DEFER
        log = daemon.log()
    assert_refused(
        log,
        3,
        "Access denied for user 'pfxpold'@'127.0.0.1' (using password: YES)",
        wrong,
        lookup_mariadb.password,
    )
    # Answered from the refusal, not after waiting for the check's timeout.
    assert "timed out" not in log


def test_unix_socket(tmp_path, lookup_mariadb):
    """
    With unix_socket the check logs in over the server's socket (as
    pfxpold@localhost, an account of its own); the URL's host and port are
    not used (the port here is one nothing listens on).
    """
    config = mariadb_config(lookup_mariadb, port=9, unix_socket=lookup_mariadb.socket)
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        assert client.ask(ALLOWED) == "OK"
        assert client.ask(UNKNOWN) == REJECT
        assert "Traceback" not in daemon.log()


def test_tls_server_refuses_plain_tcp(tls_mariadb):
    """
    The TLS test server really requires TLS: the right password without
    TLS is refused, with TLS it is accepted.
    """
    with pytest.raises(pymysql.err.OperationalError):
        tls_mariadb.connect_tcp(ssl_disabled=True)
    connection = tls_mariadb.connect_tcp(ssl_ca=tls_mariadb.ca, ssl_verify_identity=True)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
            assert cursor.fetchone()[1].startswith("TLS")
    finally:
        connection.close()


def test_tls(tmp_path, tls_mariadb):
    """
    With ssl_ca the check connects over TLS to a server that refuses
    anything else, the certificate checked against the CA and 127.0.0.1.
    """
    config = mariadb_config(tls_mariadb, ssl_ca=tls_mariadb.ca)
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        assert client.ask(ALLOWED) == "OK"
        assert client.ask(UNKNOWN) == REJECT
        assert "Traceback" not in daemon.log()


def test_tls_client_certificate(tmp_path, tls_mariadb):
    """
    An account that requires a client certificate (REQUIRE SUBJECT) is
    reached with ssl_cert and ssl_key; without them the server refuses the
    login, and the check answers on_error.
    """
    from tests.integration.lookup_mariadb import CERTIFICATE_USER

    user = urllib.parse.quote(CERTIFICATE_USER)
    config = mariadb_config(
        tls_mariadb,
        user=user,
        ssl_ca=tls_mariadb.ca,
        ssl_cert=tls_mariadb.client_certificate,
        ssl_key=tls_mariadb.client_key,
    )
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        assert client.ask(ALLOWED) == "OK"
        assert client.ask(UNKNOWN) == REJECT
    config = mariadb_config(tls_mariadb, user=user, ssl_ca=tls_mariadb.ca)
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        assert client.ask(ALLOWED) == DEFER
        log = daemon.log()
    [line] = check_lines(log)
    assert f"Access denied for user '{CERTIFICATE_USER}'@'127.0.0.1'" in line


def test_tls_wrong_ca(tmp_path, tls_mariadb, other_ca):
    """
    A server certificate the configured CA did not sign is refused before
    the login: on_error at once, and one line per failure saying the
    certificate could not be verified.
    """
    config = mariadb_config(tls_mariadb, ssl_ca=other_ca)
    before = server_status(tls_mariadb)
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        for _ in range(2):
            assert client.ask(ALLOWED) == DEFER
        log = daemon.log()
    assert_refused(log, 2, "certificate verify failed", tls_mariadb.password)
    # Refused before the login was sent: the server counts connections
    # that ended before authentication, and no refused login.
    after = wait_for_status(tls_mariadb, "Aborted_connects_preauth", before)
    assert after["Access_denied_errors"] == before["Access_denied_errors"]


def test_tls_required_by_client(tmp_path, lookup_mariadb, other_ca):
    """
    With ssl_ca, a server that does not offer TLS (the plain test server;
    or someone in between who strips the offer) is refused rather than
    used in clear text: on_error, and the log says TLS was required.
    """
    config = mariadb_config(lookup_mariadb, ssl_ca=other_ca)
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        assert client.ask(ALLOWED) == DEFER
        log = daemon.log()
    lines = check_lines(log)
    assert len(lines) == 1, log
    assert "SSL is required but the server doesn't support it" in lines[0]
    assert "Traceback" not in log


def test_tls_file_missing(tmp_path, lookup_mariadb):
    """
    An ssl_ca that cannot be read stops the daemon from starting, with one
    line naming the file, the check and the key, rather than answering
    on_error to every request.
    """
    missing = os.path.join(tmp_path, "missing-ca.pem")
    with pytest.raises(RuntimeError) as failed:
        with running_daemon(tmp_path, mariadb_config(lookup_mariadb, ssl_ca=missing)):
            pass
    message = str(failed.value)
    assert f"check 'relay-acl': key 'url': ssl_ca {missing}: No such file or directory" in message
    assert "Traceback" not in message
