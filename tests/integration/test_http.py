"""
The http check in a real pfxpold daemon against a twisted.web server run
as its own process on loopback: JSON, form and SOAP services, and slow,
erroring, malformed, oversized and injecting answers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.certificates import make_certificates
from tests.integration.support import PolicyClient, free_port, running_daemon

HERE = os.path.dirname(os.path.abspath(__file__))
ON_ERROR = "DEFER_IF_PERMIT policy service unavailable"

REQUEST = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "helo_name": "mx.example.net",
    "sender": "alice@example.org",
    "recipient": "bob@example.com",
    "client_address": "192.0.2.1",
    "client_name": "mx.example.net",
    "instance": "1.2.3",
}

SOAP_TEMPLATE = """<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns:p="urn:policy">
  <soap:Body>
    <p:Check>
      <p:client>{client_address}</p:client>
      <p:sender>{sender}</p:sender>
    </p:Check>
  </soap:Body>
</soap:Envelope>
"""


def start_web_server(*arguments: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "http_server.py"), str(port), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if process.stdout.readline().strip() != b"READY":
        process.kill()
        raise RuntimeError(f"http_server.py did not start: {process.stderr.read()!r}")
    return process, port


@pytest.fixture(scope="module")
def web_server():
    process, port = start_web_server()
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


def test_tls_verified(tmp_path):
    """
    HTTPS is verified: a service whose CA is given in ca_file answers; the
    same service without ca_file (a CA the system does not trust) gets
    on_error.
    """
    ca_path, server_path = make_certificates(str(tmp_path))
    process, port = start_web_server(server_path)
    try:
        url = f"https://127.0.0.1:{port}/json"
        trusted = check("tls", url, f'action_field = "result.action"\nca_file = "{ca_path}"')
        with running_daemon(tmp_path, trusted) as daemon, daemon.client() as client:
            assert client.ask(dict(REQUEST, sender="bad@x.example")) == (
                "REJECT bad sender bad@x.example"
            )
        untrusted = check("tls", url, 'action_field = "result.action"')
        with running_daemon(tmp_path, untrusted) as daemon, daemon.client() as client:
            assert client.ask(dict(REQUEST, sender="bad@x.example")) == ON_ERROR
            assert "certificate verify failed" in daemon.log()
    finally:
        process.terminate()
        process.wait(10)


def check(name: str, url: str, settings: str = "", timeout: float = 2.0) -> str:
    return f"""
[[check]]
name = "{name}"
type = "http"
url = "{url}"
timeout = {timeout}
on_error = "{ON_ERROR}"
{settings}
"""


def test_json_and_form(tmp_path, web_server):
    """
    A JSON service's nested action field decides; a form service's plain
    text answer decides.
    """
    config = check("rest", f"{web_server}/json", 'action_field = "result.action"') + check(
        "form", f"{web_server}/form", 'mode = "form"\naction_field = ""'
    )
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        assert client.ask(dict(REQUEST, sender="bad@example.org")) == (
            "REJECT bad sender bad@example.org"
        )
        assert client.ask(REQUEST) == "OK form from 192.0.2.1"


def test_soap(tmp_path, web_server):
    """
    The SOAP envelope is filled with XML-escaped attributes (the service
    parses it and echoes the sender back), and the action is read at
    action_path; a SOAP fault is an error.
    """
    settings = f'''mode = "soap"
soap_action = "urn:policy#Check"
action_path = "soap:Body/p:CheckResponse/p:action"
namespaces = {{ soap = "http://schemas.xmlsoap.org/soap/envelope/", p = "urn:policy" }}
soap_template = """{SOAP_TEMPLATE}"""
'''
    with running_daemon(tmp_path, check("soap", f"{web_server}/soap", settings)) as daemon:
        with daemon.client() as client:
            sender = "x<y>&\"'z@example.org"
            assert client.ask(dict(REQUEST, sender=sender)) == f"OK sender={sender}"
    with running_daemon(tmp_path, check("fault", f"{web_server}/soapfault", settings)) as daemon:
        with daemon.client() as client:
            assert client.ask(REQUEST) == ON_ERROR
        assert "SOAP fault (HTTP 500): soap:Server database down" in daemon.log()


@pytest.mark.parametrize(
    "path, settings, logged",
    [
        ("error", "", "HTTP status 500"),
        ("badjson", "", "answer is not JSON"),
        ("missing", "", "answer has no 'action' field"),
        ("huge", "max_response_size = 65536", "larger than 65536 bytes"),
        ("inject", "", "line break"),
        ("textinject", 'action_field = ""', "line break"),
        ("nosuchpath", "", "HTTP status 404"),
        (
            "notxml",
            'mode = "soap"\naction_path = "a"\nsoap_template = "<a>{sender}</a>"',
            "answer is not XML",
        ),
    ],
)
def test_bad_answers(tmp_path, web_server, path, settings, logged):
    """Erroring, malformed, oversized and injecting answers all get on_error."""
    config = check("bad", f"{web_server}/{path}", settings)
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        assert client.ask(REQUEST) == ON_ERROR
        assert client.ask(REQUEST) == ON_ERROR
        log = daemon.log()
    assert logged in log


def timed(port: int, request: dict[str, str]) -> tuple[str | None, float]:
    started = time.monotonic()
    with PolicyClient(port) as client:
        answer = client.ask(request)
    return answer, time.monotonic() - started


def test_slow_service_holds_up_nothing(tmp_path, web_server):
    """
    A service slower than the check's timeout gets on_error after the
    timeout, while requests that a fast check before it decides are answered
    at once by the same daemon: nothing blocks the reactor.
    """
    config = (
        '[server]\ndefault_action = "DUNNO"\n'
        + check("fast", f"{web_server}/json", 'action_field = "result.action"')
        + check("slow", f"{web_server}/slow", "max_requests = 4", timeout=1.0)
    )
    with running_daemon(tmp_path, config) as daemon:
        with ThreadPoolExecutor(10) as pool:
            slow = [pool.submit(timed, daemon.port, REQUEST) for _ in range(8)]
            time.sleep(0.1)
            fast_results = [
                timed(daemon.port, dict(REQUEST, sender="bad@x.example")) for _ in range(5)
            ]
            slow_results = [future.result() for future in slow]
    assert {answer for answer, _ in slow_results} == {ON_ERROR}
    assert {answer for answer, _ in fast_results} == {"REJECT bad sender bad@x.example"}
    slowest = max(t for _, t in slow_results)
    print(
        f"\nhttp measured: slow service (3 s) with timeout 1 s: on_error after"
        f" {min(t for _, t in slow_results):.2f}-{slowest:.2f}s for 8 parallel requests"
        f" (max_requests 4); requests decided by the fast check meanwhile"
        f" {max(t for _, t in fast_results):.3f}s"
    )


def test_service_gone(tmp_path):
    """
    A refused connection gets on_error at once; a server that accepts and
    never answers gets it after the check's timeout.
    """
    refused = free_port()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        config = check("refused", f"http://127.0.0.1:{refused}/", timeout=1.0)
        mute = check("mute", f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=1.0)
        with running_daemon(tmp_path, config) as daemon:
            answer, refused_time = timed(daemon.port, REQUEST)
            assert answer == ON_ERROR
            assert "Connection refused" in daemon.log() or "ConnectionRefused" in daemon.log()
        with running_daemon(tmp_path, mute) as daemon:
            answer, mute_time = timed(daemon.port, REQUEST)
            assert answer == ON_ERROR
            assert "timed out after 1.0s" in daemon.log()
    assert mute_time >= 0.9
    print(
        f"\nhttp measured: service gone (refused) on_error after {refused_time:.3f}s;"
        f" accepts but never answers: {mute_time:.2f}s (timeout 1 s)"
    )
