"""
Tests for L{pfxpold.sql.keys} (the key lists), the MySQL dialect and key
lists of L{pfxpold.sql.params}, and L{pfxpold.sql.drivers.parse_mysql_url};
run on a real SQLite database, synchronously.
"""

from __future__ import annotations

import os
import sqlite3
import ssl
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pfxpold.sql.drivers import URLError, parse_mysql_url
from pfxpold.sql.keys import KEY_LISTS, MAX_PARENT_DOMAINS, network_keys
from pfxpold.sql.params import QueryError, parse_query
from pfxpold.testing import make_request


def keys(name: str, **attributes: str) -> list[str]:
    return KEY_LISTS[name][1](make_request(**attributes))


class KeyListTests(SynchronousTestCase):
    def test_networks(self) -> None:
        """An address, then every network holding it, longest prefix first; mapped IPv4 folded."""
        found = network_keys("::ffff:192.0.2.10")
        self.assertEqual(
            found[:4], ["192.0.2.10", "192.0.2.10/32", "192.0.2.10/31", "192.0.2.8/30"]
        )
        self.assertEqual(found[-1], "0.0.0.0/0")
        self.assertEqual(len(found), 34)
        self.assertEqual(len(network_keys("2001:db8::1")), 130)
        self.assertIn("2001:db8::/32", network_keys("2001:db8::1"))
        self.assertEqual(network_keys("unknown"), [])

    def test_domains_and_addresses(self) -> None:
        """Names and their parents without a dot; addresses in access(5) order."""
        self.assertEqual(
            keys("sender_domain_keys", sender="a@Mail.Example.COM"),
            ["mail.example.com", "example.com", "com"],
        )
        self.assertEqual(
            keys("sender_keys", sender="Joe@mail.example.com"),
            ["joe@mail.example.com", "mail.example.com", "example.com", "com", "joe@"],
        )
        self.assertEqual(keys("sender_keys", sender=""), ["<>"])
        self.assertEqual(
            keys("sender_at_domain_keys", sender="a@example.com"), ["@example.com", "@com"]
        )
        self.assertEqual(keys("client_name_keys", client_name="unknown"), [])

    def test_hostile_depth_bounded(self) -> None:
        """A name with thousands of labels gives a bounded list that still ends in its parents."""
        found = keys("sender_domain_keys", sender="x@" + "a." * 3000 + "example.com")
        self.assertEqual(len(found), MAX_PARENT_DOMAINS + 1)
        self.assertEqual(found[-2:], ["example.com", "com"])


class KeyListQueryTests(SynchronousTestCase):
    QUERY = (
        "SELECT action FROM acl WHERE origin IN (:client_address_keys)"
        " ORDER BY :client_address_keys_rank(origin) LIMIT 1"
    )

    def test_most_specific_network_first_on_sqlite(self) -> None:
        """On a real SQLite table the most specific network's row answers; no row, none."""
        connection = sqlite3.connect(":memory:")
        connection.execute("CREATE TABLE acl (origin TEXT, action TEXT)")
        connection.executemany(
            "INSERT INTO acl VALUES (?, ?)",
            [("0.0.0.0/0", "all"), ("192.0.2.0/24", "net"), ("192.0.2.10", "host")],
        )
        query = parse_query(self.QUERY, "?", False)
        for address, expected in [
            ("192.0.2.10", "host"),
            ("192.0.2.11", "net"),
            ("10.0.0.1", "all"),
        ]:
            sql, values = query.bind({"client_address_keys": network_keys(address)})
            self.assertEqual(connection.execute(sql, values).fetchone(), (expected,))
        sql, values = query.bind({"client_address_keys": []})
        self.assertEqual(values, [None, None])
        self.assertIsNone(connection.execute(sql, values).fetchone())

    def test_rank_needs_column(self) -> None:
        """A rank without its column, or unclosed, is a QueryError."""
        for text in (
            "SELECT :sender_keys_rank",
            "SELECT :sender_keys_rank(a",
            "SELECT :sender_keys_rank()",
        ):
            self.assertRaises(QueryError, parse_query, text, "?", False)


class MySQLDialectTests(SynchronousTestCase):
    def test_quotes_as_mysql_reads_them(self) -> None:
        """Backslash escapes in '' and "", backticks and # comments hide :names; % doubles."""
        query = (
            "SELECT 'it\\'s :a', \"b\\\" :b\", `c :c`, '100%' # :d\nFROM t WHERE x = :sender -- :e"
        )
        parsed = parse_query(query, "%s", True, "mysql")
        self.assertEqual(parsed.names, ["sender"])
        self.assertIn("'100%%'", parsed.sql)

    def test_executable_comments_refused(self) -> None:
        """/*! ... */ is code to MySQL: refused rather than misread."""
        self.assertRaises(QueryError, parse_query, "SELECT /*! :sender */ 1", "%s", True, "mysql")


class MySQLURLTests(SynchronousTestCase):
    def test_url(self) -> None:
        """Host, port, user, database and socket come from the URL."""
        self.assertEqual(
            parse_mysql_url("mariadb://pfx%40x@db.example:3307/acl?unix_socket=/run/m.sock"),
            {
                "user": "pfx@x",
                "database": "acl",
                "host": "db.example",
                "port": 3307,
                "unix_socket": "/run/m.sock",
            },
        )
        tls = parse_mysql_url("mysql://u@h/d?ssl_ca=/etc/ca.pem")
        self.assertTrue(tls["ssl_verify_cert"] and tls["ssl_verify_identity"])

    def test_bad_urls(self) -> None:
        """Passwords, missing parts and unknown options are refused."""
        for url in (
            "postgresql://u@h/d",
            "mysql://u:pw@h/d",
            "mysql://h/d",
            "mysql://u@h/",
            "mysql://u@h/d?foo=1",
            "mysql://u@h:99999/d",
        ):
            self.assertRaises(URLError, parse_mysql_url, url)


class MySQLTLSTests(SynchronousTestCase):
    """
    The TLS context of a MySQL URL's ssl_* options, made while the
    configuration is read.
    """

    def setUp(self) -> None:
        from tests.integration.certificates import make_client_certificates
        from tests.unit.tempdir import temporary_directory

        self.directory = temporary_directory(self)
        self.ca, self.server, self.client, self.client_key = make_client_certificates(
            self.directory
        )

    def driver(self, query: str) -> Any:
        from pfxpold.sql.drivers import MySQLDriver

        return MySQLDriver(f"mysql://u@127.0.0.1/d?{query}", "pw", 2.0, 1.0)

    def test_context(self) -> None:
        """
        ssl_ca makes a context that verifies the chain and the host name
        (not over a unix socket, where the host is only a name) and holds
        the client certificate; PyMySQL gets the context, not the paths.
        """
        keywords = self.driver(
            f"ssl_ca={self.ca}&ssl_cert={self.client}&ssl_key={self.client_key}"
        ).connect_keywords
        context = keywords["ssl"]
        self.assertIsInstance(context, ssl.SSLContext)
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(context.check_hostname)
        self.assertFalse([key for key in keywords if key.startswith("ssl_")])
        socket_context = self.driver(f"ssl_ca={self.ca}&unix_socket=/run/m.sock").connect_keywords[
            "ssl"
        ]
        self.assertFalse(socket_context.check_hostname)
        self.assertEqual(socket_context.verify_mode, ssl.CERT_REQUIRED)
        self.assertNotIn("ssl", self.driver("unix_socket=/run/m.sock").connect_keywords)

    def test_unusable_files(self) -> None:
        """
        A CA, certificate or key that is missing or not PEM is a
        configuration error naming the option and the file, and so is an
        encrypted key (never asked for on a terminal) or a key without a
        certificate.
        """
        from cryptography.hazmat.primitives import serialization

        missing = os.path.join(self.directory, "missing.pem")
        encrypted = os.path.join(self.directory, "encrypted.key")
        with open(self.client_key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        with open(encrypted, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.BestAvailableEncryption(b"secret"),
                )
            )
        for query, expected in (
            (f"ssl_ca={missing}", f"ssl_ca {missing}: No such file or directory"),
            (f"ssl_ca={self.client_key}", f"ssl_ca {self.client_key}: holds no PEM certificate"),
            (
                f"ssl_ca={self.ca}&ssl_cert={missing}",
                f"ssl_cert {missing}, ssl_key {missing}: No such file or directory",
            ),
            (
                f"ssl_ca={self.ca}&ssl_cert={self.client}&ssl_key={self.ca}",
                f"ssl_cert {self.client}, ssl_key {self.ca}: not a PEM certificate and its"
                " unencrypted private key",
            ),
            (
                f"ssl_ca={self.ca}&ssl_cert={self.client}&ssl_key={encrypted}",
                f"ssl_cert {self.client}, ssl_key {encrypted}: the private key is encrypted",
            ),
            (f"ssl_ca={self.ca}&ssl_key={self.client_key}", "gives ssl_key without ssl_cert"),
        ):
            with self.assertRaises(URLError) as raised:
                self.driver(query)
            self.assertIn(expected, str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))

    def test_old_pymysql_refused(self) -> None:
        """
        A PyMySQL older than 1.2 would go on in clear text when the server
        offers no TLS: ssl_ca with it is a configuration error.
        """
        import pymysql

        self.patch(pymysql, "VERSION", (1, 1, 1, "final"))
        with self.assertRaises(URLError) as raised:
            self.driver(f"ssl_ca={self.ca}")
        self.assertIn("needs PyMySQL 1.2 or later (this is 1.1.1;", str(raised.exception))
        self.driver("unix_socket=/run/m.sock")

    def test_error_text(self) -> None:
        """PyMySQL's (code, message) errors read as the message and the number."""
        import pymysql

        driver = self.driver("unix_socket=/run/m.sock")
        self.assertEqual(
            driver.error_text(pymysql.err.OperationalError(1045, "Access denied for user 'u'")),
            "Access denied for user 'u' (error 1045)",
        )
        self.assertEqual(driver.error_text(OSError("odd")), "OSError: odd")
