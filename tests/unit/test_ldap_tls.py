"""
Unit tests for the ldap check's protected connections: the server
setting's LDAP URLs, the TLS and SASL settings, and the order a new
connection is made ready in (STARTTLS, the handshake, then the bind), with
fake protocols and a L{Clock}.
"""

from __future__ import annotations

from typing import Any

from ldaptor.protocols import pureldap
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.checks import ldap
from pfxpold.checks.ldap import DEFAULT_LDAPI_PATH, LDAPCheck, Server, parse_server
from pfxpold.config import ConfigError
from pfxpold.testing import make_options
from tests.integration.certificates import make_client_certificates
from tests.unit.tempdir import secret_file, temporary_directory
from tests.unit.test_ldap import FakeService

STARTTLS_OK = pureldap.LDAPExtendedResponse(resultCode=0)
BIND_OK = pureldap.LDAPBindResponse(resultCode=0)


class SetupProtocol:
    """
    A new connection as the check prepares it: answers each request sent
    with the next of C{responses} (a Deferred: answered when it fires), and
    starts TLS when asked, the handshake finishing when the test says.
    """

    def __init__(self, *responses: Any) -> None:
        self.responses = list(responses)
        self.sent: list[Any] = []
        self.transport = StringTransport()
        self.tls_options: Any = None
        self.handshake: Deferred[None] = Deferred()

    def send(self, request: Any) -> Deferred[Any]:
        self.sent.append(request)
        response = self.responses.pop(0)
        return response if isinstance(response, Deferred) else succeed(response)

    def start_tls(self, options: Any) -> Deferred[None]:
        self.tls_options = options
        return self.handshake


def make_check(clock: Any = None, **table: Any) -> LDAPCheck:
    table.setdefault("base", "dc=example,dc=com")
    table.setdefault("filter", "(mail={sender})")
    return LDAPCheck(make_options(reactor=clock or Clock(), **table), service=FakeService(None))


class ServerTests(SynchronousTestCase):
    """
    The server setting: LDAP URLs, or a Twisted endpoint string.
    """

    def test_urls(self) -> None:
        """ldap://, ldaps:// and ldapi:// URLs, with their default ports and socket."""
        self.assertEqual(
            parse_server("ldap://ldap.example.com"), Server("ldap", "ldap.example.com", 389)
        )
        self.assertEqual(
            parse_server("LDAPS://Ldap.Example.com:1636/"),
            Server("ldaps", "ldap.example.com", 1636),
        )
        self.assertEqual(parse_server("ldap://[::1]:3389"), Server("ldap", "::1", 3389))
        self.assertEqual(
            parse_server("ldapi://%2Frun%2Fslapd%2Fldapi"), Server("ldapi", path="/run/slapd/ldapi")
        )
        self.assertEqual(parse_server("ldapi:///"), Server("ldapi", path=DEFAULT_LDAPI_PATH))
        self.assertTrue(parse_server("ldapi:///").local)
        self.assertTrue(parse_server("ldaps://h").implicit_tls)
        self.assertEqual(parse_server("tcp:h:389"), Server("", endpoint="tcp:h:389"))
        self.assertTrue(parse_server("unix:/run/ldapi").local)

    def test_bad_urls(self) -> None:
        """Other schemes, a base DN in the URL, no host, a bad port: refused."""
        for bad in [
            "http://ldap.example.com",
            "ldap://ldap.example.com/dc=example,dc=com",
            "ldap://ldap.example.com/??sub?(uid=x)",
            "ldap://",
            "ldap://user@host",
            "ldap://host:99999",
            "ldapi://relative%2Fpath",
        ]:
            self.assertRaises(ValueError, parse_server, bad)


class SettingsTests(SynchronousTestCase):
    """
    TLS and SASL settings: refused where they cannot work, in one line
    naming the check and the key.
    """

    def assertRefused(self, key: str, text: str, **table: Any) -> None:
        error = self.assertRaises(ConfigError, make_check, **table)
        self.assertIn(f"check 'test': key '{key}': ", str(error))
        self.assertIn(text, str(error))
        self.assertNotIn("\n", str(error))

    def test_tls_keys_need_tls(self) -> None:
        """ca_file and friends on a plain connection would be ignored: refused."""
        for key in ldap.TLS_KEYS:
            self.assertRefused(
                key, "needs starttls = true or an ldaps:// server", server="ldap://h", **{key: "x"}
            )

    def test_starttls_where_it_cannot_be(self) -> None:
        """STARTTLS on ldaps://, tls: or a unix socket is refused."""
        for server in ["ldaps://h", "tls:h:636", "ldapi:///", "unix:/run/ldapi"]:
            self.assertRefused("starttls", "is for ldap:// servers", server=server, starttls=True)

    def test_starttls_hostname(self) -> None:
        """
        The name to verify comes from the URL or tls_hostname; a tcp:
        endpoint string has none to offer.
        """
        self.assertRefused("tls_hostname", "is required", server="tcp:h:389", starttls=True)
        check = make_check(
            server="tcp:10.0.0.1:389", starttls=True, tls_hostname="ldap.example.com"
        )
        self.assertEqual(check.tls_options._hostnameASCII, "ldap.example.com")
        check = make_check(server="ldap://ldap.example.com", starttls=True)
        self.assertEqual(check.tls_options._hostnameASCII, "ldap.example.com")

    def test_ca_file(self) -> None:
        """A CA file is read at start-up: missing or not PEM is a configuration error."""
        directory = temporary_directory(self)
        ca, _, client, client_key = make_client_certificates(directory)
        check = make_check(server="ldap://h", starttls=True, ca_file=ca)
        self.assertIsNotNone(check.tls_options)
        self.assertRefused(
            "ca_file", "cannot read", server="ldap://h", starttls=True, ca_file=ca + "x"
        )
        self.assertRefused(
            "ca_file",
            "holds no PEM certificate",
            server="ldap://h",
            starttls=True,
            ca_file=client_key,
        )
        check = make_check(server="ldaps://h", ca_file=ca, cert_file=client, key_file=client_key)
        self.assertIsNotNone(check.tls_options)
        self.assertRefused(
            "key_file", "holds no PEM private key", server="ldaps://h", cert_file=client
        )
        self.assertRefused(
            "cert_file", "is required with key_file", server="ldaps://h", key_file=client_key
        )

    def test_sasl(self) -> None:
        """
        Only EXTERNAL, never with bind_dn, and only where the connection
        proves an identity (a unix socket, or a client certificate).
        """
        self.assertEqual(
            make_check(server="ldapi:///", sasl_mechanism="external").sasl_mechanism, "EXTERNAL"
        )
        self.assertRefused(
            "sasl_mechanism", "'PLAIN' is not supported", server="ldapi:///", sasl_mechanism="PLAIN"
        )
        self.assertRefused(
            "sasl_mechanism",
            "EXTERNAL needs an ldapi:// server",
            server="ldap://h",
            sasl_mechanism="EXTERNAL",
        )
        path = secret_file(self, "pw")
        self.assertRefused(
            "sasl_mechanism",
            "replaces bind_dn",
            server="ldapi:///",
            sasl_mechanism="EXTERNAL",
            bind_dn="cn=x",
            bind_password_file=path,
        )

    def test_sasl_bind_carries_empty_credentials(self) -> None:
        """
        The EXTERNAL bind request holds an empty credentials octet string,
        which ldaptor's own request leaves out (slapd then answers
        saslBindInProgress).
        """
        wire = ldap._SASLBindRequest("EXTERNAL").toWire()
        self.assertTrue(wire.endswith(b"\xa3\x0c\x04\x08EXTERNAL\x04\x00"), wire)
        ours = pureldap.LDAPBindRequest(dn="", auth=("EXTERNAL", None), sasl=True).toWire()
        self.assertTrue(ours.endswith(b"\xa3\x0a\x04\x08EXTERNAL"), ours)


class SetupTests(SynchronousTestCase):
    """
    A new connection: STARTTLS, the handshake, then the bind; any failure
    logged once, the connection closed, and requests failing at once.
    """

    def starttls_check(self, clock: Any = None, **table: Any) -> LDAPCheck:
        path = secret_file(self, "s3cret")
        table.setdefault("bind_dn", "cn=pfxpold,dc=x")
        table.setdefault("bind_password_file", path)
        return make_check(clock, server="ldap://ldap.example.com", starttls=True, **table)

    def test_starttls_then_bind(self) -> None:
        """The password is sent only once the handshake is done."""
        check = self.starttls_check()
        protocol = SetupProtocol(STARTTLS_OK, BIND_OK)
        ready = check._prepare(protocol)
        self.assertIsInstance(protocol.sent[0], pureldap.LDAPStartTLSRequest)
        self.assertIs(protocol.tls_options, check.tls_options)
        self.assertEqual(len(protocol.sent), 1)
        self.assertNoResult(ready)
        protocol.handshake.callback(None)
        self.successResultOf(ready)
        self.assertEqual(protocol.sent[1].auth, "s3cret")
        self.assertTrue(check.connected)

    def test_handshake_fails(self) -> None:
        """
        A certificate refused: no bind, one log line saying why, the
        connection closed, and requests failing at once.
        """
        check = self.starttls_check()
        protocol = SetupProtocol(STARTTLS_OK)
        with capturedLogs() as events:
            ready = check._prepare(protocol)
            error = Exception([("SSL routines", "", "certificate verify failed")])
            protocol.handshake.errback(Failure(error))
            self.failureResultOf(ready)
            # The ClientService tries again: the same reason is not logged again.
            again = SetupProtocol(STARTTLS_OK)
            retried = check._prepare(again)
            again.handshake.errback(Failure(error))
            self.failureResultOf(retried)
        self.assertEqual(
            [formatEvent(event) for event in events],
            ["check test: TLS with the directory failed: certificate verify failed"],
        )
        self.assertEqual(len(protocol.sent), 1)
        self.assertTrue(protocol.transport.disconnecting)
        self.assertFalse(check.connected)
        self.assertIn("certificate verify failed", check._down or "")

    def test_host_name_mismatch(self) -> None:
        """service_identity's refusal is logged as a host name problem."""
        from service_identity import VerificationError

        check = self.starttls_check()
        protocol = SetupProtocol(STARTTLS_OK)
        with capturedLogs() as events:
            ready = check._prepare(protocol)
            protocol.handshake.errback(Failure(VerificationError([])))
            self.failureResultOf(ready)
        [text] = [formatEvent(event) for event in events]
        self.assertIn(
            "TLS with the directory failed: the certificate is not valid for the host name", text
        )

    def test_starttls_refused(self) -> None:
        """A server that refuses STARTTLS gets no bind, and the log says so."""
        check = self.starttls_check()
        protocol = SetupProtocol(
            pureldap.LDAPExtendedResponse(
                resultCode=2, errorMessage="unsupported extended operation"
            )
        )
        with capturedLogs() as events:
            self.failureResultOf(check._prepare(protocol))
        [text] = [formatEvent(event) for event in events]
        self.assertIn(
            "the directory refused STARTTLS: protocolError: unsupported extended operation", text
        )
        self.assertIsNone(protocol.tls_options)
        self.assertEqual(len(protocol.sent), 1)

    def test_setup_timeout(self) -> None:
        """A server that never answers STARTTLS: given up after request_timeout, closed."""
        clock = Clock()
        check = self.starttls_check(clock, request_timeout=2)
        protocol = SetupProtocol(Deferred())
        with capturedLogs() as events:
            ready = check._prepare(protocol)
            clock.advance(2)
            self.failureResultOf(ready, TimeoutError)
        [text] = [formatEvent(event) for event in events]
        self.assertIn("no answer while setting up the connection within 2.0s", text)
        self.assertTrue(protocol.transport.disconnecting)

    def test_sasl_external(self) -> None:
        """With sasl_mechanism, the bind is a SASL EXTERNAL bind, with no DN."""
        check = make_check(server="ldapi:///", sasl_mechanism="EXTERNAL")
        protocol = SetupProtocol(BIND_OK)
        self.successResultOf(check._prepare(protocol))
        [bind] = protocol.sent
        self.assertTrue(bind.sasl)
        self.assertEqual(bind.auth, ("EXTERNAL", b""))
        self.assertEqual(bind.dn, "")
        refused = SetupProtocol(pureldap.LDAPBindResponse(resultCode=48, errorMessage="no"))
        with capturedLogs() as events:
            self.failureResultOf(check._prepare(refused))
        [text] = [formatEvent(event) for event in events]
        self.assertIn("SASL EXTERNAL bind failed: inappropriateAuthentication: no", text)


class HandshakeTests(SynchronousTestCase):
    """
    The client protocol tells when its TLS handshake is done.
    """

    def test_handshake_listener(self) -> None:
        """Waiters fire at handshakeCompleted; later ones at once."""
        client = ldap._TLSClient()
        self.assertTrue(IHandshakeListener.providedBy(client))
        waiting = client.when_handshake_done()
        self.assertNoResult(waiting)
        client.handshakeCompleted()
        self.successResultOf(waiting)
        self.successResultOf(client.when_handshake_done())

    def test_lost_before_handshake(self) -> None:
        """A connection lost during the handshake fails the waiters with its reason."""
        client = ldap._TLSClient()
        client.clock = Clock()
        waiting = client.when_handshake_done()
        client.connectionLost(Failure(ConnectionError("refused")))
        self.failureResultOf(waiting, ConnectionError)

    def test_start_tls(self) -> None:
        """start_tls starts TLS on the transport with the options given."""
        client = ldap._TLSClient()
        started: list[Any] = []

        class Transport:
            def startTLS(self, options: Any) -> None:
                started.append(options)

        client.transport = Transport()  # type: ignore[assignment]
        waiting = client.start_tls("options")
        self.assertEqual(started, ["options"])
        self.assertNoResult(waiting)
