"""
The ldap check in a real pfxpold daemon against a real OpenLDAP slapd
started on loopback from a throwaway configuration: binding, found/not
found, attribute values as actions, filter injection, a server restart and
a server that accepts but never answers.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.certificates import make_certificates, split_certificate
from tests.integration.slapd import BIND_DN, BIND_PASSWORD, SUFFIX, Slapd
from tests.integration.support import PolicyClient, running_daemon

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


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(str(tmp_path_factory.mktemp("slapd")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_slapd(tmp_path):
    """A slapd of the test's own, for tests that stop or freeze it."""
    server = Slapd(str(tmp_path / "slapd"))
    server.start()
    yield server
    server.stop()


def config(tmp_path, port: int, password: str = BIND_PASSWORD, **settings: str) -> str:
    secret = tmp_path / "ldap.secret"
    secret.write_text(password + "\n")
    extra = "".join(f"{key} = {value}\n" for key, value in settings.items())
    return f"""
[[check]]
name = "ldap"
type = "ldap"
timeout = 2.0
on_error = "{ON_ERROR}"
server = "tcp:127.0.0.1:{port}"
bind_dn = "{BIND_DN}"
bind_password_file = "{secret}"
base = "ou=people,{SUFFIX}"
request_timeout = 1.0
{extra}"""


def ask(port: int, **changes: str) -> str | None:
    with PolicyClient(port) as client:
        return client.ask(dict(REQUEST, **changes))


def test_found_and_attribute(tmp_path, slapd):
    """
    Bound as the service account, the check answers the description
    attribute's value, DUNNO for an entry without it or no entry, and
    on_error for an entry with two different values.
    """
    text = config(tmp_path, slapd.port, filter='"(mail={sender})"', attribute='"description"')
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == "OK known sender"
        assert ask(daemon.port, sender="bob@example.com") == "DUNNO"
        assert ask(daemon.port, sender="nobody@example.com") == "DUNNO"
        assert ask(daemon.port, sender="carol@example.com") == ON_ERROR
        assert ask(daemon.port, sender="") == "DUNNO"
        assert "2 different values of description" in daemon.log()


def test_filter_injection(tmp_path, slapd):
    """
    Wildcards and parentheses in a sender are matched literally: C{*}
    finds nobody, C{*)(uid=*} finds only the entry whose mail is exactly
    that, and a sender closing the filter early finds nothing.
    """
    text = config(
        tmp_path,
        slapd.port,
        filter='"(&(objectClass=inetOrgPerson)(mail={sender}))"',
        found='"REJECT found"',
        not_found='"OK not found"',
    )
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port, sender="alice@example.com") == "REJECT found"
        assert ask(daemon.port, sender="*") == "OK not found"
        assert ask(daemon.port, sender="*)(uid=*") == "REJECT found"
        assert ask(daemon.port, sender="x)(|(mail=*") == "OK not found"
        assert ask(daemon.port, sender="alice@example.com)(mail=*") == "OK not found"
        assert ask(daemon.port, sender="a\\2a") == "OK not found"


def test_control_characters_not_searched(tmp_path, slapd):
    """
    slapd stops reading a value at a NUL, so C{alice@example.com\\x00}
    would find alice; it is not searched at all: not_found answers, and the
    log shows the value escaped. So for an escape sequence.
    """
    text = config(
        tmp_path,
        slapd.port,
        filter='"(mail={sender})"',
        found='"REJECT found"',
        not_found='"OK not found"',
    )
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port, sender="alice@example.com") == "REJECT found"
        assert ask(daemon.port, sender="alice@example.com\x00") == "OK not found"
        assert ask(daemon.port, sender="alice@example.com\x00x") == "OK not found"
        assert ask(daemon.port, sender="alice@example.com\x1b[2J") == "OK not found"
        log = daemon.log()
    assert "sender holds a control character, not looked up: alice@example.com\\x00" in log
    assert "\x00" not in log and "\x1b" not in log


def test_substring_template(tmp_path, slapd):
    """A placeholder inside a substring filter stays a literal value."""
    text = config(tmp_path, slapd.port, filter='"(mail=*@{sender_domain})"', scope='"one"')
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port, sender="x@example.com") == "OK"
        assert ask(daemon.port, sender="x@example.org") == "DUNNO"


def test_wrong_password(tmp_path, slapd):
    """A failing bind gets on_error, and the password is never logged."""
    text = config(tmp_path, slapd.port, password="wrong-password", filter='"(mail={sender})"')
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == ON_ERROR
        log = daemon.log()
    assert "bind as cn=pfxpold,dc=example,dc=com failed" in log
    assert "wrong-password" not in log


def wait_for_answer(port: int, expected: str, timeout: float = 20.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if ask(port) == expected:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"no {expected!r} within {timeout}s")


def test_restart(tmp_path, own_slapd):
    """
    With slapd gone the check answers on_error at once; after slapd comes
    back on the same port, the persistent connection is re-established and
    bound again.
    """
    text = config(tmp_path, own_slapd.port, filter='"(mail={sender})"')
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == "OK"
        own_slapd.stop()
        started = time.monotonic()
        assert ask(daemon.port) == ON_ERROR
        gone = time.monotonic() - started
        own_slapd.start()
        recovered = wait_for_answer(daemon.port, "OK")
        assert "connected to the directory" in daemon.log()
    print(
        f"\nldap measured: slapd stopped: on_error after {gone:.3f}s; recovered {recovered:.2f}s after restart"
    )


def test_server_never_answers(tmp_path, own_slapd):
    """
    A frozen slapd (accepts, never answers) costs request_timeout per
    request, requests in parallel all get on_error, and the check
    reconnects when slapd wakes up.
    """
    text = config(tmp_path, own_slapd.port, filter='"(mail={sender})"', max_requests="4")
    with running_daemon(tmp_path, text) as daemon:
        assert ask(daemon.port) == "OK"
        own_slapd.pause()
        try:

            def timed(_: int) -> tuple[str | None, float]:
                started = time.monotonic()
                answer = ask(daemon.port)
                return answer, time.monotonic() - started

            with ThreadPoolExecutor(8) as pool:
                waiting = pool.map(timed, range(8))
                time.sleep(0.2)
                # A bounce (empty sender) needs no search: answered at once
                # while the others wait for the frozen server.
                started = time.monotonic()
                assert ask(daemon.port, sender="") == "DUNNO"
                unblocked = time.monotonic() - started
                results = list(waiting)
        finally:
            own_slapd.resume()
        assert {answer for answer, _ in results} == {ON_ERROR}
        recovered = wait_for_answer(daemon.port, "OK")
        log = daemon.log()
    assert "sent nothing" in log or "timed out" in log
    times = [t for _, t in results]
    print(
        f"\nldap measured: frozen slapd: 8 parallel requests got on_error after"
        f" {min(times):.2f}-{max(times):.2f}s (request_timeout 1 s, timeout 2 s,"
        f" max_requests 4); a request needing no search meanwhile {unblocked:.3f}s;"
        f" answering again {recovered:.2f}s after SIGCONT"
    )


def test_ldaps_verified(tmp_path):
    """
    A tls: server endpoint verifies slapd's certificate: trusted through
    trustRoots it answers; with the system's trust store only (which does
    not know the test CA) every request gets on_error.
    """
    keys = tmp_path / "keys"
    keys.mkdir()
    ca_path, server_path = make_certificates(str(keys))
    # trustRoots names a directory of CA certificates, and nothing else.
    roots = tmp_path / "roots"
    roots.mkdir()
    shutil.copy(ca_path, roots / "ca.pem")
    server = Slapd(str(tmp_path / "slapd"), tls=split_certificate(server_path, str(keys)))
    server.start()
    try:
        trusted = config(tmp_path, server.port, filter='"(mail={sender})"').replace(
            f"tcp:127.0.0.1:{server.port}", f"tls:127.0.0.1:{server.tls_port}:trustRoots={roots}"
        )
        with running_daemon(tmp_path, trusted) as daemon:
            assert ask(daemon.port) == "OK"
        untrusted = config(tmp_path, server.port, filter='"(mail={sender})"').replace(
            f"tcp:127.0.0.1:{server.port}", f"tls:127.0.0.1:{server.tls_port}"
        )
        with running_daemon(tmp_path, untrusted) as daemon:
            assert ask(daemon.port) == ON_ERROR
            assert "certificate verify failed" in daemon.log()
    finally:
        server.stop()
