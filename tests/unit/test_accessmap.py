"""
Tests for L{pfxpold.accessmap}: key parsing, access(5) key derivation and
lookup order, longest-prefix matching, pair tables and map errors.
"""

from __future__ import annotations

import ipaddress
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from pfxpold.accessmap import (
    AccessMap,
    KeyTable,
    LookupKey,
    MapError,
    address_keys,
    attribute_value,
    check_attribute,
    domain_keys,
    logical_lines,
    lookup_key,
    parse_key,
)
from pfxpold.action import Action
from pfxpold.testing import make_request
from tests.unit.tempdir import temporary_path


def parse(text: str, **keywords) -> AccessMap:
    # Indented lines continue the previous one in a Postfix table: dedent.
    lines = textwrap.dedent(text).splitlines(keepends=True)
    return AccessMap.parse(lines, "test.map", **keywords)


def answer(access_map: AccessMap, request, lookups, second=(), style="dot", fold=True):
    keys = [lookup_key(request, name, style, fold) for name in lookups]
    others = [lookup_key(request, name, style, fold) for name in second]
    action = access_map.lookup(keys, others)
    return None if action is None else str(action)


class ParseKeyTests(SynchronousTestCase):
    """
    L{parse_key} reads networks and names as lookups derive them.
    """

    def test_ipv4_address(self):
        """An IPv4 address is a /32 network."""
        self.assertEqual(parse_key("192.0.2.1"), ipaddress.ip_network("192.0.2.1/32"))

    def test_octet_prefixes(self):
        """access(5) octet prefixes are /8, /16 and /24 networks."""
        self.assertEqual(parse_key("10"), ipaddress.ip_network("10.0.0.0/8"))
        self.assertEqual(parse_key("192.168"), ipaddress.ip_network("192.168.0.0/16"))
        self.assertEqual(parse_key("192.0.2"), ipaddress.ip_network("192.0.2.0/24"))

    def test_cidr(self):
        """CIDR networks of both families, brackets allowed, /0 included."""
        self.assertEqual(parse_key("198.51.100.0/22"), ipaddress.ip_network("198.51.100.0/22"))
        self.assertEqual(parse_key("[2001:db8::]/32"), ipaddress.ip_network("2001:db8::/32"))
        self.assertEqual(parse_key("[2001:DB8::1]"), ipaddress.ip_network("2001:db8::1/128"))
        self.assertEqual(parse_key("0.0.0.0/0"), ipaddress.ip_network("0.0.0.0/0"))
        self.assertEqual(parse_key("::/0"), ipaddress.ip_network("::/0"))

    def test_host_bits(self):
        """A network with host bits set is an error, as in cidr_table(5)."""
        self.assertRaises(ValueError, parse_key, "192.0.2.1/24")
        self.assertRaises(ValueError, parse_key, "2001:db8::1/32")
        self.assertRaises(ValueError, parse_key, "192.0.2.0/33")
        self.assertRaises(ValueError, parse_key, "300.1")

    def test_v4_mapped_folded(self):
        """IPv4-mapped IPv6 keys are stored as IPv4."""
        self.assertEqual(parse_key("::ffff:192.0.2.1"), ipaddress.ip_network("192.0.2.1/32"))
        self.assertEqual(parse_key("::ffff:192.0.2.0/120"), ipaddress.ip_network("192.0.2.0/24"))

    def test_names(self):
        """Domains lowercase; @domain is the domain; local parts fold unless told."""
        self.assertEqual(parse_key("Example.COM."), "example.com")
        self.assertEqual(parse_key("@Example.COM"), "example.com")
        self.assertEqual(parse_key("User@Example.COM"), "user@example.com")
        self.assertEqual(parse_key("User@Example.COM", fold_local_part=False), "User@example.com")
        self.assertEqual(parse_key("User@"), "user@")
        self.assertEqual(parse_key("<>"), "<>")


class KeyDerivationTests(SynchronousTestCase):
    """
    Which keys an attribute is looked up as, in access(5) order.
    """

    def test_address_dot_style(self):
        """user@domain, domain, .parents, user@."""
        self.assertEqual(
            address_keys("Joe@Mail.Example.COM"),
            ["joe@mail.example.com", "mail.example.com", ".example.com", ".com", "joe@"],
        )

    def test_address_implicit_style(self):
        """With implicit parent matching, parents are looked up without a dot."""
        self.assertEqual(
            address_keys("joe@mail.example.com", "implicit"),
            ["joe@mail.example.com", "mail.example.com", "example.com", "com", "joe@"],
        )

    def test_address_no_parents(self):
        """With parent domains off, only the domain itself."""
        self.assertEqual(
            address_keys("joe@mail.example.com", "off"),
            ["joe@mail.example.com", "mail.example.com", "joe@"],
        )

    def test_address_case_kept(self):
        """The local part keeps its case when folding is off; the domain never does."""
        self.assertEqual(
            address_keys("Joe@EXAMPLE.com", "off", False),
            ["Joe@example.com", "example.com", "Joe@"],
        )

    def test_null_sender(self):
        """The null sender is looked up as <>."""
        self.assertEqual(address_keys(""), ["<>"])

    def test_address_without_domain(self):
        """An address without @ is looked up as itself and as user@."""
        self.assertEqual(address_keys("Postmaster"), ["postmaster", "postmaster@"])

    def test_domain_literal(self):
        """A domain literal has no parents."""
        self.assertEqual(domain_keys("[192.0.2.1]"), ["[192.0.2.1]"])

    def test_unknown_client_name(self):
        """An unresolved client name (unknown) is not looked up at all."""
        key = lookup_key(make_request(client_name="unknown"), "client_name")
        self.assertEqual(key, LookupKey())

    def test_client_address(self):
        """A client address is an IP, v4-mapped folded; garbage is no key."""
        self.assertEqual(
            lookup_key(make_request(client_address="::ffff:192.0.2.1"), "client_address").ip,
            ipaddress.ip_address("192.0.2.1"),
        )
        self.assertEqual(
            lookup_key(make_request(client_address="bogus"), "client_address"), LookupKey()
        )

    def test_derived_values(self):
        """Derived values come from the request's helpers."""
        request = make_request(sender="Joe@Example.COM", client_address="2001:db8:1:2:3::4")
        self.assertEqual(attribute_value(request, "sender_domain"), "example.com")
        self.assertEqual(attribute_value(request, "sender_at_domain"), "@example.com")
        self.assertEqual(attribute_value(request, "sender_local_part"), "Joe")
        self.assertEqual(attribute_value(request, "client_ip"), "2001:db8:1:2:3::4")
        self.assertEqual(attribute_value(request, "client_network"), "2001:db8:1:2::/64")
        v4 = make_request(client_address="192.0.2.77", sender="")
        self.assertEqual(attribute_value(v4, "client_network"), "192.0.2.0/24")
        self.assertEqual(attribute_value(v4, "sender_at_domain"), "")
        self.assertIsNone(attribute_value(make_request(client_address="unknown"), "client_ip"))

    def test_check_attribute(self):
        """Postfix attributes and derived values are known; typos are not."""
        check_attribute("sender")
        check_attribute("tls_sni")
        check_attribute("client_network")
        self.assertRaises(ValueError, check_attribute, "sendr")


class NetworkTests(SynchronousTestCase):
    """
    Longest-prefix matching over both address families.
    """

    MAP = """
        0.0.0.0/0           REJECT v4 default
        10                  REJECT ten
        10.1.0.0/16         REJECT ten-one
        10.1.2              REJECT ten-one-two
        10.1.2.3            OK
        ::/0                REJECT v6 default
        2001:db8::/32       REJECT doc
        2001:db8:1::/48     REJECT doc-one
        2001:db8:1::1       OK
    """

    def lookup(self, address: str):
        return answer(parse(self.MAP), make_request(client_address=address), ["client_address"])

    def test_longest_prefix_v4(self):
        """/32 beats /24 beats /16 beats /8 beats /0."""
        self.assertEqual(self.lookup("10.1.2.3"), "OK")
        self.assertEqual(self.lookup("10.1.2.4"), "REJECT ten-one-two")
        self.assertEqual(self.lookup("10.1.3.1"), "REJECT ten-one")
        self.assertEqual(self.lookup("10.2.0.1"), "REJECT ten")
        self.assertEqual(self.lookup("192.0.2.1"), "REJECT v4 default")

    def test_longest_prefix_v6(self):
        """/128 beats /48 beats /32 beats /0."""
        self.assertEqual(self.lookup("2001:db8:1::1"), "OK")
        self.assertEqual(self.lookup("2001:DB8:1::2"), "REJECT doc-one")
        self.assertEqual(self.lookup("2001:db8:2::1"), "REJECT doc")
        self.assertEqual(self.lookup("2001:db9::1"), "REJECT v6 default")

    def test_v4_mapped(self):
        """An IPv4-mapped IPv6 client matches the IPv4 entries, not the IPv6 ones."""
        self.assertEqual(self.lookup("::ffff:10.1.2.3"), "OK")

    def test_families_apart(self):
        """Without an IPv6 default, an IPv6 client matches nothing IPv4."""
        access_map = parse("0.0.0.0/0 REJECT v4\n")
        request = make_request(client_address="2001:db8::1")
        self.assertIsNone(answer(access_map, request, ["client_address"]))

    def test_edges(self):
        """The first and last address of a network are in it; the next one is not."""
        access_map = parse("192.0.2.0/25 OK\n2001:db8::/127 OK\n")
        for address in ("192.0.2.0", "192.0.2.127", "2001:db8::", "2001:db8::1"):
            self.assertEqual(
                answer(access_map, make_request(client_address=address), ["client_address"]), "OK"
            )
        for address in ("192.0.2.128", "192.0.1.255", "2001:db8::2"):
            self.assertIsNone(
                answer(access_map, make_request(client_address=address), ["client_address"])
            )

    def test_table_counts(self):
        """A key table counts names and networks."""
        table: KeyTable[str] = KeyTable()
        self.assertTrue(table.add("example.com", "a"))
        self.assertTrue(table.add(ipaddress.ip_network("10.0.0.0/8"), "b"))
        self.assertFalse(table.add(ipaddress.ip_network("10.0.0.0/8"), "c"))
        self.assertEqual(len(table), 2)


class NameTests(SynchronousTestCase):
    """
    Addresses, domains and host names in access(5) order.
    """

    MAP = """
        joe@example.com         OK
        example.com             REJECT domain
        .example.com            REJECT subdomain
        postmaster@             DUNNO
        <>                      REJECT bounce
        mail.example.net        OK
        .example.net            REJECT net subdomain
        Joe                     OK sasl
    """

    def sender(self, sender, style="dot", fold=True, text=None):
        access_map = parse(text or self.MAP, fold_local_part=fold)
        return answer(access_map, make_request(sender=sender), ["sender"], style=style, fold=fold)

    def test_order(self):
        """user@domain beats domain beats user@."""
        self.assertEqual(self.sender("joe@example.com"), "OK")
        self.assertEqual(self.sender("ann@example.com"), "REJECT domain")
        self.assertEqual(self.sender("postmaster@example.com"), "REJECT domain")
        self.assertEqual(self.sender("postmaster@example.org"), "DUNNO")
        self.assertIsNone(self.sender("ann@example.org"))

    def test_case(self):
        """Domains are case-insensitive; local parts fold by default."""
        self.assertEqual(self.sender("JOE@EXAMPLE.COM"), "OK")

    def test_case_sensitive_local_part(self):
        """With folding off, Joe@ is not joe@; the domain still folds."""
        self.assertEqual(self.sender("joe@EXAMPLE.com", fold=False), "OK")
        self.assertEqual(self.sender("Joe@example.com", fold=False), "REJECT domain")

    def test_parent_domains_dot(self):
        """.example.com matches subdomains, example.com only itself."""
        self.assertEqual(self.sender("ann@mail.example.com"), "REJECT subdomain")
        self.assertEqual(self.sender("ann@a.b.example.com"), "REJECT subdomain")

    def test_parent_domains_implicit(self):
        """In implicit style, example.com matches its subdomains too."""
        self.assertEqual(self.sender("ann@mail.example.com", style="implicit"), "REJECT domain")

    def test_parent_domains_off(self):
        """With parent domains off, subdomains match nothing."""
        self.assertIsNone(self.sender("ann@mail.example.com", style="off"))

    def test_null_sender(self):
        """The null sender matches <>."""
        self.assertEqual(self.sender(""), "REJECT bounce")

    def test_host_names(self):
        """Client names match themselves, then parent domains, case-insensitively."""
        access_map = parse(self.MAP)
        for name, expected in (
            ("MAIL.example.net", "OK"),
            ("other.example.net", "REJECT net subdomain"),
            ("example.net", None),
            ("unknown", None),
        ):
            request = make_request(client_name=name)
            self.assertEqual(answer(access_map, request, ["client_name"]), expected, name)

    def test_plain(self):
        """A plain attribute matches its value, case-insensitively by default."""
        access_map = parse(self.MAP)
        self.assertEqual(
            answer(access_map, make_request(sasl_username="joe"), ["sasl_username"]), "OK sasl"
        )
        self.assertIsNone(answer(access_map, make_request(sasl_username=""), ["sasl_username"]))

    def test_lookup_attributes_in_order(self):
        """The first attribute that matches decides."""
        access_map = parse(textwrap.dedent(self.MAP) + "192.0.2.1 REJECT by address\n")
        request = make_request(client_address="192.0.2.1", client_name="mail.example.net")
        self.assertEqual(
            answer(access_map, request, ["client_address", "client_name"]), "REJECT by address"
        )
        self.assertEqual(answer(access_map, request, ["client_name", "client_address"]), "OK")


class PairTests(SynchronousTestCase):
    """
    Pair tables: origin × address.
    """

    MAP = """
        192.0.2.10          scanner@example.com     OK
        192.0.2.32/27       @example.com            OK
        192.0.2.0/24        boss@example.com        REJECT not from there
        scanner.example.com scanner@example.com     OK by name
        .apps.example.com   <>                      OK bounce
    """

    def ask(self, **attributes):
        access_map = parse(self.MAP, pairs=True)
        request = make_request(**{"client_name": "unknown", **attributes})
        return answer(access_map, request, ["client_address", "client_name"], ["sender"])

    def test_pairs(self):
        """Only listed combinations match."""
        self.assertEqual(self.ask(client_address="192.0.2.10", sender="scanner@example.com"), "OK")
        self.assertIsNone(self.ask(client_address="192.0.2.11", sender="scanner@example.com"))
        self.assertIsNone(self.ask(client_address="192.0.2.10", sender="other@example.com"))

    def test_network_and_domain(self):
        """A network origin and a domain address cover their members."""
        self.assertEqual(self.ask(client_address="192.0.2.40", sender="any@EXAMPLE.com"), "OK")
        self.assertIsNone(self.ask(client_address="192.0.2.40", sender="any@example.org"))

    def test_longer_prefix_without_the_address(self):
        """A more specific origin without this address falls back to a wider one."""
        self.assertEqual(
            self.ask(client_address="192.0.2.10", sender="boss@example.com"),
            "REJECT not from there",
        )

    def test_origin_by_name(self):
        """The client name is tried after the address; subdomains with dot style."""
        self.assertEqual(
            self.ask(
                client_address="198.51.100.1",
                client_name="Scanner.Example.com",
                sender="scanner@example.com",
            ),
            "OK by name",
        )
        self.assertEqual(
            self.ask(client_address="198.51.100.1", client_name="web1.apps.example.com", sender=""),
            "OK bounce",
        )

    def test_pair_missing_field(self):
        """A pair line needs two keys and an action."""
        error = self.assertRaises(MapError, parse, "192.0.2.1 OK\n", pairs=True)
        self.assertEqual(error.line, 1)


class FileFormatTests(SynchronousTestCase):
    """
    Comments, continuation lines and errors with line numbers.
    """

    def test_comments_and_blank_lines(self):
        """Comments and blank lines are skipped; continuation lines join."""
        access_map = parse(
            "# comment\n\n   \n  # indented comment\nexample.com REJECT a\n  long text\n"
        )
        self.assertEqual(access_map.entries, 1)
        request = make_request(sender="x@example.com")
        self.assertEqual(answer(access_map, request, ["sender"]), "REJECT a long text")

    def test_logical_line_numbers(self):
        """Logical lines carry the number of their first line."""
        lines = list(logical_lines(["# c\n", "a OK\n", "\n", "b REJECT x\n", " y\n", "c OK\n"]))
        self.assertEqual(lines, [(2, "a OK"), (4, "b REJECT x y"), (6, "c OK")])

    def assertMapError(self, text: str, line: int, reason: str, **keywords) -> None:
        error = self.assertRaises(MapError, parse, text, **keywords)
        self.assertEqual((error.path, error.line), ("test.map", line))
        self.assertIn(reason, error.reason)
        self.assertTrue(str(error).startswith(f"test.map:{line}: "))

    def test_missing_action(self):
        """A key alone is an error on its line."""
        self.assertMapError("a OK\n\nexample.com\n", 3, "expected 2 fields")

    def test_bad_action(self):
        """An action Postfix would not accept is an error."""
        self.assertMapError("a OK\nb FROBNICATE now\n", 2, "FROBNICATE")
        self.assertMapError("a OK\nb FILTER\n", 2, "FILTER needs an argument")

    def test_restriction_class(self):
        """A restriction class is an action only when declared."""
        self.assertMapError("a my_class\n", 1, "my_class")
        access_map = parse("a my_class\n", restriction_classes=("my_class",))
        self.assertEqual(access_map.lookup([LookupKey(["a"])]), Action("my_class"))

    def test_bad_network(self):
        """A network with host bits is an error on its line."""
        self.assertMapError("a OK\n# x\n192.0.2.1/24 OK\n", 3, "not a valid network")

    def test_duplicate(self):
        """A key listed twice is an error, as keys compare (case folded)."""
        self.assertMapError("Example.com OK\nexample.COM REJECT\n", 2, "listed twice")
        self.assertMapError("10.1 OK\n10.1.0.0/16 OK\n", 2, "listed twice")

    def test_unreadable(self):
        """A missing file or one that is not UTF-8 is a MapError without a line."""
        error = self.assertRaises(MapError, AccessMap.load, temporary_path(self))
        self.assertIsNone(error.line)
        self.assertIn("cannot read", error.reason)
        path = temporary_path(self)
        with open(path, "wb") as f:
            f.write(b"caf\xe9.example OK\n")
        error = self.assertRaises(MapError, AccessMap.load, path)
        self.assertIn("not UTF-8", error.reason)
