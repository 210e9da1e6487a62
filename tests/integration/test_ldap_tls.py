"""
The ldap check's protected connections against a real OpenLDAP slapd that
refuses plain TCP (C{security ssf=1}): STARTTLS with the CA and the host
name verified, LDAPS, and SASL EXTERNAL, both over C{ldapi://} (the
daemon's uid mapped to the service entry) and over TLS with a client
certificate.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.integration.certificates import (
    make_certificates,
    make_client_certificates,
    split_certificate,
)
from tests.integration.slapd import BIND_DN, BIND_PASSWORD, SUFFIX, Slapd
from tests.integration.support import REPOSITORY, PolicyClient, running_daemon

ON_ERROR = "DEFER_IF_PERMIT directory unavailable"

REQUEST = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "helo_name": "mx.example.net",
    "sender": "alice@example.com",
    "recipient": "bob@example.org",
    "client_address": "192.0.2.1",
    "client_name": "mx.example.net",
    "instance": "1.2.3",
}


class Keys:
    """The test CA, slapd's certificate, a client's, and a CA nobody used."""

    def __init__(self, directory: str) -> None:
        self.ca, self.server, self.client, self.client_key = make_client_certificates(directory)
        other = os.path.join(directory, "other")
        os.mkdir(other)
        self.other_ca, _ = make_certificates(other)
        self.server_files = split_certificate(self.server, directory)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return Keys(str(tmp_path_factory.mktemp("keys")))


@pytest.fixture(scope="module")
def slapd(tmp_path_factory, keys):
    """
    A slapd that refuses binds and searches without TLS (or a unix
    socket), and maps this process's uid over ldapi:// and the client
    certificate's subject to the service entry, the only one allowed to
    read.
    """
    server = Slapd(
        str(tmp_path_factory.mktemp("slapd")),
        tls=keys.server_files,
        ca_file=keys.ca,
        security="ssf=1",
        ldapi=True,
        authz_regexps=[
            (
                rf"gidNumber=[0-9]+[+]uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth",
                BIND_DN,
            ),
            ("cn=pfxpold-client", BIND_DN),
        ],
    )
    try:
        server.start()
        yield server
    finally:
        server.remove()


def config(tmp_path, server: str, **settings: str) -> str:
    secret = tmp_path / "ldap.secret"
    secret.write_text(BIND_PASSWORD + "\n")
    settings.setdefault("bind_dn", f'"{BIND_DN}"')
    settings.setdefault("bind_password_file", f'"{secret}"')
    extra = "".join(f"{key} = {value}\n" for key, value in settings.items() if value)
    return f"""
[[check]]
name = "ldap"
type = "ldap"
timeout = 2.0
on_error = "{ON_ERROR}"
server = "{server}"
base = "ou=people,{SUFFIX}"
filter = "(mail={{sender}})"
found = "REJECT found"
not_found = "OK not found"
request_timeout = 1.0
{extra}"""


def ask(port: int, **changes: str) -> str | None:
    with PolicyClient(port) as client:
        return client.ask(dict(REQUEST, **changes))


def test_plain_refused_by_server(tmp_path, slapd):
    """
    Without TLS the server refuses the bind: the test server really
    requires it, and the check answers on_error with the server's reason.
    """
    text = config(tmp_path, f"ldap://127.0.0.1:{slapd.port}")
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == ON_ERROR
        log = daemon.log()
    assert "bind as cn=pfxpold,dc=example,dc=com failed" in log
    assert "confidentiality required" in log.lower()


def test_starttls(tmp_path, slapd, keys):
    """
    With starttls and the test CA, the check upgrades the connection,
    verifies the certificate for 127.0.0.1, binds and searches.
    """
    text = config(
        tmp_path, f"ldap://127.0.0.1:{slapd.port}", starttls="true", ca_file=f'"{keys.ca}"'
    )
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == "REJECT found"
        assert ask(daemon.port, sender="nobody@example.com") == "OK not found"
        assert "connected to the directory" in daemon.log()


def test_starttls_wrong_ca(tmp_path, slapd, keys):
    """
    A certificate that the configured CA did not sign is refused before the
    bind (the password is never sent): on_error, and the log says why.
    """
    text = config(
        tmp_path, f"ldap://127.0.0.1:{slapd.port}", starttls="true", ca_file=f'"{keys.other_ca}"'
    )
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == ON_ERROR
        log = daemon.log()
    assert "check ldap: TLS with the directory failed: certificate verify failed" in log
    assert "bind as" not in log


def test_starttls_wrong_host_name(tmp_path, slapd, keys):
    """
    A certificate for 127.0.0.1, expected to name ldap.example.com: refused,
    and the log says the host name does not match.
    """
    text = config(
        tmp_path,
        f"ldap://127.0.0.1:{slapd.port}",
        starttls="true",
        ca_file=f'"{keys.ca}"',
        tls_hostname='"ldap.example.com"',
    )
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == ON_ERROR
        log = daemon.log()
    assert "TLS with the directory failed: the certificate is not valid for the host name" in log
    assert "ldap.example.com" in log


def test_ldaps(tmp_path, slapd, keys):
    """An ldaps:// server with ca_file: TLS from the first byte, verified."""
    text = config(tmp_path, f"ldaps://127.0.0.1:{slapd.tls_port}", ca_file=f'"{keys.ca}"')
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == "REJECT found"
    text = config(tmp_path, f"ldaps://127.0.0.1:{slapd.tls_port}", ca_file=f'"{keys.other_ca}"')
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == ON_ERROR
        assert "certificate verify failed" in daemon.log()


def test_sasl_external_ldapi(tmp_path, slapd):
    """
    SASL EXTERNAL over ldapi://: slapd maps the daemon's uid to the service
    entry, which may read; without the bind the server refuses the same
    search (anonymous clients may not read).
    """
    text = config(
        tmp_path, slapd.ldapi_url, bind_dn="", bind_password_file="", sasl_mechanism='"EXTERNAL"'
    )
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == "REJECT found"
    text = config(tmp_path, slapd.ldapi_url, bind_dn="", bind_password_file="")
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == ON_ERROR
        assert "insufficientAccessRights" in daemon.log()


def test_sasl_external_client_certificate(tmp_path, slapd, keys):
    """
    SASL EXTERNAL over STARTTLS with a client certificate: slapd maps the
    certificate's subject to the service entry; no password anywhere.
    """
    text = config(
        tmp_path,
        f"ldap://127.0.0.1:{slapd.port}",
        bind_dn="",
        bind_password_file="",
        starttls="true",
        ca_file=f'"{keys.ca}"',
        cert_file=f'"{keys.client}"',
        key_file=f'"{keys.client_key}"',
        sasl_mechanism='"EXTERNAL"',
    )
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == "REJECT found"


def readme_block(first_line: str) -> str:
    """The README's toml block that starts with C{first_line}."""
    with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    match = re.search(r"```toml\n(" + re.escape(first_line) + r"\n.*?)```", readme, re.DOTALL)
    assert match is not None, f"README has no toml block starting {first_line!r}"
    return match.group(1)


def test_readme_ldapi_example(tmp_path, slapd):
    """
    The README's SASL EXTERNAL example works as printed, with only the
    socket's path changed to the test slapd's.
    """
    text = readme_block("# The ldap check over slapd's unix socket, bound as the daemon's user")
    assert 'server = "ldapi:///"' in text
    text = text.replace('"ldapi:///"', f'"{slapd.ldapi_url}"')
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port, recipient="alice@example.com") == "OK"
        assert ask(daemon.port, recipient="nobody@example.com") == "REJECT No such user here"


def test_shipped_example(tmp_path, slapd, keys):
    """
    examples/ldap.toml (STARTTLS, a simple bind) against the slapd that
    requires TLS, with the server, the CA, the service DN and the password
    changed to the test's.
    """
    with open(os.path.join(REPOSITORY, "examples", "ldap.toml"), encoding="utf-8") as f:
        text = f.read()
    secret = tmp_path / "ldap.secret"
    secret.write_text(BIND_PASSWORD + "\n")
    for old, new in [
        ('"ldap://ldap.example.com"', f'"ldap://127.0.0.1:{slapd.port}"'),
        ('# ca_file = "/etc/pfxpold/ldap-ca.pem"', f'ca_file = "{keys.ca}"'),
        ('"cn=pfxpold,ou=services,dc=example,dc=com"', f'"{BIND_DN}"'),
        ('"ldap.secret"', f'"{secret}"'),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port, recipient="bob@example.com") == "DUNNO"
        assert ask(daemon.port, recipient="nobody@example.com") == "REJECT No such user here"
