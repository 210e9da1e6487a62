"""
A check whose optional library is not installed fails the configuration
with one line naming the check and the extra to install, and an http://
check needs no TLS library at all.

A missing library is simulated by putting L{None} in C{sys.modules} for
the duration of a test (Python then refuses to import it), and by
forgetting the check's module so that it is imported again.
"""

from __future__ import annotations

import os
import sys

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.checks import MissingExtraError, missing_extra
from pfxpold.config import ConfigError, load_configuration
from pfxpold.testing import make_options, make_request

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")

#: The modules Twisted's TLS support needs (the http extra brings them).
TLS_MODULES = ("OpenSSL", "service_identity", "twisted.internet.ssl", "twisted.internet._sslverify")


def unimportable(case: SynchronousTestCase, *modules: str) -> None:
    """
    Make C{modules} unimportable until the end of the test C{case}.
    """
    saved = {name: sys.modules.get(name) for name in modules}

    def restore() -> None:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module

    case.addCleanup(restore)
    for name in modules:
        sys.modules[name] = None  # type: ignore[assignment]


def forget(case: SynchronousTestCase, name: str) -> None:
    """
    Remove module C{name} from C{sys.modules} until the end of the test
    C{case}, so that the next import runs it (and its imports) again.
    """
    saved = sys.modules.pop(name, None)
    parent_name, _, attribute = name.rpartition(".")
    parent = sys.modules[parent_name]

    def restore() -> None:
        # The import in the test rebinds the parent package's attribute too;
        # a module not imported before the test is forgotten again.
        if saved is None:
            sys.modules.pop(name, None)
            if hasattr(parent, attribute):
                delattr(parent, attribute)
        else:
            sys.modules[name] = saved
            setattr(parent, attribute, saved)

    case.addCleanup(restore)


class MissingExtraTests(SynchronousTestCase):
    """
    The examples' checks, with their library missing.
    """

    def load_error(self, example: str) -> str:
        path = os.path.join(EXAMPLES, example)
        error = self.assertRaises(ConfigError, load_configuration, path, Clock())
        return str(error)

    def test_ldap(self) -> None:
        """examples/ldap.toml without ldaptor: one line naming the check and the ldap extra."""
        unimportable(self, "ldaptor")
        forget(self, "pfxpold.checks.ldap")
        message = self.load_error("ldap.toml")
        self.assertEqual(
            message,
            os.path.join(EXAMPLES, "ldap.toml")
            + ": check 'ldap': needs ldaptor: pip install 'pfxpold[ldap]'",
        )

    def test_postgresql(self) -> None:
        """examples/relay-acl-postgresql.toml without psycopg names the postgresql extra."""
        unimportable(self, "psycopg")
        # The drivers module imports psycopg; its package must be known
        # to forget it.
        import pfxpold.sql.drivers  # noqa: F401

        forget(self, "pfxpold.checks.sql")
        forget(self, "pfxpold.sql.drivers")
        message = self.load_error("relay-acl-postgresql.toml")
        self.assertIn(": check '", message)
        self.assertTrue(
            message.endswith(": needs psycopg: pip install 'pfxpold[postgresql]'"), message
        )
        self.assertNotIn("\n", message)

    def test_https(self) -> None:
        """examples/http.toml (https:// URLs) without pyOpenSSL names the check and the http extra."""
        unimportable(self, *TLS_MODULES)
        message = self.load_error("http.toml")
        self.assertEqual(
            message,
            os.path.join(EXAMPLES, "http.toml")
            + ": check 'rest': key 'url': needs pyOpenSSL: pip install 'pfxpold[http]'",
        )

    def test_ca_file_needs_tls(self) -> None:
        """An http:// URL with a ca_file still needs TLS: the error names ca_file."""
        from pfxpold.checks.http import HTTPCheck

        unimportable(self, *TLS_MODULES)
        error = self.assertRaises(
            ConfigError,
            HTTPCheck,
            make_options(name="web", url="http://p.example/", ca_file="/nonexistent/ca.pem"),
        )
        self.assertIn("key 'ca_file': needs pyOpenSSL: pip install 'pfxpold[http]'", str(error))

    def test_ldap_tls_server(self) -> None:
        """An ldap check with a tls: server and no pyOpenSSL names the check's key and the ldap extra."""
        from pfxpold.checks.ldap import LDAPCheck

        unimportable(self, *TLS_MODULES)
        error = self.assertRaises(
            ConfigError,
            LDAPCheck,
            make_options(
                name="directory",
                server="tls:ldap.example.com:636",
                base="dc=example,dc=com",
                filter="(mail={recipient})",
            ),
        )
        self.assertEqual(
            str(error),
            "<configuration>: check 'directory': key 'server':"
            " needs pyOpenSSL: pip install 'pfxpold[ldap]'",
        )

    def test_user_module_error_unchanged(self) -> None:
        """An ImportError of a library pfxpold does not know is not blamed on an extra."""
        error = ModuleNotFoundError("No module named 'mycompany'", name="mycompany")
        self.assertIsNone(missing_extra(error))
        advice = missing_extra(ModuleNotFoundError("x", name="ldaptor.protocols"))
        self.assertIsInstance(advice, MissingExtraError)
        self.assertEqual(str(advice), "needs ldaptor: pip install 'pfxpold[ldap]'")


class PlainHTTPTests(SynchronousTestCase):
    """
    An http:// check works without pyOpenSSL.
    """

    def test_http_without_tls(self) -> None:
        """
        With every TLS module unimportable, an http:// check builds, posts
        its request and answers with the service's action.
        """
        unimportable(self, *TLS_MODULES)
        forget(self, "pfxpold.checks.http")
        from pfxpold.checks.http import HTTPCheck

        reactor = MemoryReactorClock()
        check = HTTPCheck(make_options(reactor=reactor, url="http://127.0.0.1:8080/policy"))
        answer = check.check(make_request(sender="a@b.example"))
        [(host, port, factory, _, _)] = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 8080))
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"POST /policy HTTP/1.1\r\n"))
        body = b'{"action": "REJECT no"}'
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(str(self.successResultOf(answer)), "REJECT no")
