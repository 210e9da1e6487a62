"""
Tests for L{pfxpold.query}'s request building (asking a real server is in
tests/integration/test_daemon.py).
"""

import io
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from pfxpold.query import build_request, make_parser, query
from pfxpold.testing import make_request, parse_request
from tests.unit.tempdir import temporary_directory


class BuildRequestTests(SynchronousTestCase):
    """
    The request pfxpold-query sends.
    """

    def build(self, *argv, stdin=None):
        return build_request(make_parser().parse_args(list(argv)), stdin=stdin)

    def test_template(self):
        """Without options: a RCPT request with all 29 attributes Postfix 3.7 sends."""
        data = self.build()
        self.assertTrue(data.endswith(b"\n\n"))
        self.assertEqual(data.count(b"\n\n"), 1)
        request = parse_request(data)
        self.assertEqual(len(request), 29)
        self.assertEqual(set(request), set(make_request()))
        self.assertEqual(request.protocol_state, "RCPT")
        self.assertEqual(request.request, "smtpd_access_policy")
        self.assertEqual(request.client_name, "unknown")
        self.assertEqual(request["size"], "0")
        self.assertEqual(request.sender, "")

    def test_options(self):
        """Each attribute option sets its attribute."""
        request = parse_request(
            self.build(
                "--sender",
                "a@b.example",
                "--recipient",
                "c@d.example",
                "--client-address",
                "192.0.2.1",
                "--client-name",
                "mx.example",
                "--reverse-client-name",
                "mx.example",
                "--helo-name",
                "helo.example",
                "--sasl-username",
                "joe",
                "--sasl-method",
                "PLAIN",
                "--protocol-state",
                "DATA",
                "--instance",
                "1.2.3",
                "--recipient-count",
                "2",
                "--size",
                "100",
                "--queue-id",
                "ABC",
            )
        )
        self.assertEqual(request.sender, "a@b.example")
        self.assertEqual(request.recipient, "c@d.example")
        self.assertEqual(request.client_address, "192.0.2.1")
        self.assertEqual(request.client_name, "mx.example")
        self.assertEqual(request.reverse_client_name, "mx.example")
        self.assertEqual(request.helo_name, "helo.example")
        self.assertEqual(request.sasl_username, "joe")
        self.assertEqual(request.sasl_method, "PLAIN")
        self.assertEqual(request.protocol_state, "DATA")
        self.assertEqual(request.instance, "1.2.3")
        self.assertEqual(request.recipient_count, 2)
        self.assertEqual(request.size, 100)
        self.assertEqual(request.queue_id, "ABC")
        self.assertEqual(len(request), 29)

    def test_attribute(self):
        """--attribute adds or overrides any attribute; = may be in its value."""
        request = parse_request(
            self.build("-a", "tls_sni=mx.example", "--attribute", "ccert_subject=CN=x")
        )
        self.assertEqual(request["tls_sni"], "mx.example")
        self.assertEqual(request["ccert_subject"], "CN=x")

    def test_bad_attribute(self):
        """An --attribute that is not name=value is refused."""
        self.assertRaises(ValueError, self.build, "--attribute", "novalue")
        self.assertRaises(ValueError, self.build, "--attribute", "=value")

    def test_newline_refused(self):
        """A newline in a value would start a new attribute: refused."""
        self.assertRaises(ValueError, self.build, "--sender", "a@b\nrecipient=x")
        self.assertRaises(ValueError, self.build, "--attribute", "x=1\n")

    def test_request_file(self):
        """A request file is read; options override it."""
        path = os.path.join(temporary_directory(self), "request.txt")
        with open(path, "wb") as f:
            f.write(b"sender=file@example.com\nrecipient=r@example.com\n\n")
        request = parse_request(self.build(path, "--recipient", "o@example.com"))
        self.assertEqual(
            dict(request), {"sender": "file@example.com", "recipient": "o@example.com"}
        )

    def test_stdin(self):
        """C{-} reads the request from standard input."""
        request = parse_request(self.build("-", stdin=b"sender=in@example.com\r\n\r\n"))
        self.assertEqual(dict(request), {"sender": "in@example.com"})

    def test_stdin_default(self):
        """Without stdin given, C{-} reads sys.stdin."""
        fake = io.TextIOWrapper(io.BytesIO(b"sender=sys@example.com\n\n"))
        self.patch(sys, "stdin", fake)
        self.assertEqual(parse_request(self.build("-")).sender, "sys@example.com")

    def test_missing_file(self):
        """A missing request file raises OSError (reported by main)."""
        self.assertRaises(OSError, self.build, os.path.join(temporary_directory(self), "nope"))

    def test_bad_server(self):
        """A server that is not host:port is refused before connecting."""
        self.assertRaises(ValueError, query, "127.0.0.1:notaport", b"x\n\n")
