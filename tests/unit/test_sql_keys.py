"""
Tests for L{pfxpold.sql.keys} (the key lists), the MySQL dialect and key
lists of L{pfxpold.sql.params}, and L{pfxpold.sql.drivers.parse_mysql_url};
run on a real SQLite database, synchronously.
"""

from __future__ import annotations

import sqlite3

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
