"""
The README's C{file} and C{sql} sections work as pasted: their TOML and
map blocks load and answer the relay-ACL scenario, and match the samples
in examples/.
"""

from __future__ import annotations

import os
import re
import tomllib

from twisted.internet.task import Clock

from pfxpold.config import load_configuration
from pfxpold.testing import CheckTestCase, make_request
from tests.unit.tempdir import sqlite_database, temporary_path

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REJECT = (
    "REJECT Sorry, this combination of sender and originating system does not match"
    " any of my policies."
)


def section_blocks(title: str) -> list[tuple[str, str]]:
    """
    The fenced blocks (language, text) of the README section C{### title}.
    """
    with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start = readme.index(f"### `{title}`")
    end = min(
        index
        for index in (readme.find("\n### ", start + 1), readme.find("\n## ", start + 1))
        if index > 0
    )
    return re.findall(r"```(\w*)\n(.*?)```", readme[start:end], re.S)


def example_check(name: str) -> dict:
    with open(os.path.join(REPOSITORY, "examples", name), "rb") as f:
        return tomllib.load(f)["check"][0]


class ReadmeTests(CheckTestCase):
    """
    The README's samples for the lookup checks.
    """

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def setUp(self) -> None:
        self.directory = os.path.dirname(temporary_path(self))

    def test_file_section(self):
        """The file section's configuration and map answer the relay ACL."""
        blocks = section_blocks("file")
        toml = [text for language, text in blocks if language == "toml"]
        maps = [text for language, text in blocks if language == "" and "relay-acl.map" in text]
        # The second is the regexp and pcre tables' (test_pcre_section).
        self.assertEqual(len(toml), 2)
        self.assertEqual(len(maps), 1)
        self.write("relay-acl.map", maps[0])
        configuration = load_configuration(self.write("pfxpold.toml", toml[0]), Clock())
        check = configuration.chain.entries[0].check
        self.assertAction(
            check, make_request(client_address="192.0.2.10", sender="scanner@example.com"), "OK"
        )
        self.assertAction(
            check, make_request(client_address="192.0.2.11", sender="scanner@example.com"), REJECT
        )
        self.assertEqual(tomllib.loads(toml[0])["check"][0], example_check("relay-acl-file.toml"))

    def test_pcre_section(self):
        """
        The file section's pcre table and its configuration are the shipped
        example's, and answer as it does.
        """
        blocks = section_blocks("file")
        toml = [text for language, text in blocks if language == "toml"][1]
        [table] = [text for language, text in blocks if text.startswith("# client-names.pcre")]
        self.write("client-names.pcre", table)
        configuration = load_configuration(self.write("pfxpold.toml", toml), Clock())
        check = configuration.chain.entries[0].check
        shipped = (
            load_configuration(os.path.join(REPOSITORY, "examples", "client-names.toml"), Clock())
            .chain.entries[0]
            .check
        )
        self.assertEqual(tomllib.loads(toml)["check"][0], example_check("client-names.toml"))
        for names in (
            {"client_name": "dsl-7.isp.example"},
            {"client_name": "DHCP.isp.example"},
            {"client_name": "dsl-7.example.com"},
            {"client_name": "unknown"},
            {"client_name": "mx.isp.example", "helo_name": "mail.example.com"},
            {"client_name": "mx.isp.example", "helo_name": "mx.isp.example"},
        ):
            request = make_request(**names)
            self.assertEqual(check.check(request), shipped.check(request), names)
        self.assertAction(
            check,
            make_request(client_name="ppp-1.isp.example"),
            "DEFER_IF_PERMIT 4.7.1 Your host name looks dynamic (ppp...); please use your"
            " provider's mail server",
        )

    def test_sql_section(self):
        """The sql section's configurations load and are the shipped samples' checks."""
        toml = [text for language, text in section_blocks("sql") if language == "toml"]
        self.assertEqual(len(toml), 4)
        sqlite_database(os.path.join(self.directory, "relay-acl.sqlite"))
        self.write("relay-acl-mysql.secret", "change-me\n")
        # The key-list example: its query's parameters are all known.
        sqlite_database(os.path.join(self.directory, "client-access.sqlite"))
        key_lists = load_configuration(self.write("pfxpold.toml", toml[3]), Clock())
        self.assertEqual(
            key_lists.chain.entries[0].check.parameters,
            ["client_address_keys", "sender_domain_keys"],
        )
        for text in toml[:3]:
            configuration = load_configuration(self.write("pfxpold.toml", text), Clock())
            self.assertEqual(str(configuration.chain.entries[0].check.found), "OK")
        self.assertEqual(tomllib.loads(toml[0])["check"][0], example_check("relay-acl-sqlite.toml"))
        shipped = example_check("relay-acl-postgresql.toml")
        for key, value in tomllib.loads(toml[1])["check"][0].items():
            self.assertEqual(shipped[key], value, key)
        self.assertEqual(tomllib.loads(toml[2])["check"][0], example_check("relay-acl-mysql.toml"))
