"""
Tests for L{pfxpold.request}: the immutable request and its helpers.
"""

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.request import PolicyRequest, client_network, parse_ip
from pfxpold.testing import FIXTURES, fixture_bytes, make_request, parse_request


class ParseIPTests(SynchronousTestCase):
    """
    L{parse_ip} reads client addresses the way Postfix sends them.
    """

    def test_ipv4(self):
        """An IPv4 address becomes an IPv4Address."""
        self.assertEqual(parse_ip("192.0.2.1"), ipaddress.IPv4Address("192.0.2.1"))

    def test_ipv6_without_brackets(self):
        """IPv6 comes without brackets from Postfix and parses as IPv6Address."""
        self.assertEqual(parse_ip("2001:db8::1"), ipaddress.IPv6Address("2001:db8::1"))

    def test_ipv6_with_brackets_and_prefix(self):
        """A bracketed or IPv6:-prefixed address (as in SMTP) still parses."""
        self.assertEqual(parse_ip("[2001:db8::1]"), ipaddress.IPv6Address("2001:db8::1"))
        self.assertEqual(parse_ip("IPv6:2001:db8::1"), ipaddress.IPv6Address("2001:db8::1"))

    def test_v4_mapped_folded(self):
        """An IPv4-mapped IPv6 address is folded to the IPv4 address."""
        self.assertEqual(parse_ip("::ffff:192.0.2.7"), ipaddress.IPv4Address("192.0.2.7"))

    def test_not_an_address(self):
        """C{unknown}, an empty value and garbage give L{None}."""
        for value in ("unknown", "", "300.1.2.3", "example.com", "[", "IPv6:"):
            self.assertIsNone(parse_ip(value), value)


class ClientNetworkTests(SynchronousTestCase):
    """
    L{client_network}: the one derivation of a client's network that the
    greylist and quota checks and the C{client_network} lookup value share.
    """

    def test_defaults(self):
        """A /24 for IPv4 and a /64 for IPv6 unless told otherwise."""
        self.assertEqual(client_network(ipaddress.ip_address("192.0.2.77")), "192.0.2.0/24")
        self.assertEqual(
            client_network(ipaddress.ip_address("2001:db8:1:2:3::4")), "2001:db8:1:2::/64"
        )

    def test_prefixes(self):
        """Each family takes its own prefix length, the ends included."""
        v4 = ipaddress.ip_address("192.0.2.77")
        v6 = ipaddress.ip_address("2001:db8::1")
        self.assertEqual(client_network(v4, 16, 48), "192.0.0.0/16")
        self.assertEqual(client_network(v4, 32, 48), "192.0.2.77/32")
        self.assertEqual(client_network(v4, 0, 48), "0.0.0.0/0")
        self.assertEqual(client_network(v6, 16, 48), "2001:db8::/48")
        self.assertEqual(client_network(v6, 16, 128), "2001:db8::1/128")

    def test_mapped_address_folded_first(self):
        """An IPv4-mapped client, as parse_ip folds it, gets its IPv4 network."""
        self.assertEqual(client_network(parse_ip("::ffff:192.0.2.77")), "192.0.2.0/24")

    @given(
        st.one_of(
            st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
            st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
        )
    )
    def test_same_as_ipaddress(self, case):
        """It is the text of the network ipaddress computes, for any address and prefix."""
        address, prefix = case
        expected = str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
        self.assertEqual(client_network(address, prefix, prefix), expected)


class PolicyRequestTests(SynchronousTestCase):
    """
    L{PolicyRequest} is an immutable mapping with typed helpers.
    """

    def test_attributes(self):
        """
        C{attributes} is the request's own dictionary: an adopted one itself,
        a copy for a request made from a mapping; it cannot be replaced.
        """
        adopted = {"sender": "a@example.com"}
        self.assertIs(PolicyRequest.adopt(adopted).attributes, adopted)
        copied = {"sender": "a@example.com"}
        request = PolicyRequest(copied)
        self.assertEqual(request.attributes, copied)
        self.assertIsNot(request.attributes, copied)
        self.assertRaises(AttributeError, setattr, request, "attributes", {})

    def test_adopt(self):
        """
        An adopted dictionary makes a request equal to a copied one, just
        as immutable.
        """
        attributes = {"sender": "a@example.com", "recipient": "b@example.org"}
        request = PolicyRequest.adopt(attributes)
        self.assertEqual(request, PolicyRequest(dict(attributes)))
        self.assertEqual(request.sender, "a@example.com")
        self.assertRaises(AttributeError, setattr, request, "sender", "x")
        with self.assertRaises(TypeError):
            request["sender"] = "x"  # type: ignore[index]

    def test_mapping(self):
        """It reads like a dict, keeps unknown attributes and iterates in order."""
        request = PolicyRequest({"sender": "a@b", "tls_sni": "mx.example"})
        self.assertEqual(request["tls_sni"], "mx.example")
        self.assertEqual(request.get("missing", "x"), "x")
        self.assertEqual(list(request), ["sender", "tls_sni"])
        self.assertEqual(len(request), 2)
        self.assertIn("sender", request)

    def test_views(self):
        """
        get, keys, values and items answer as the attributes' dict does,
        absent attributes included, and give no way to change them.
        """
        request = PolicyRequest({"sender": "a@b", "tls_sni": "mx.example"})
        self.assertIsNone(request.get("missing"))
        self.assertEqual(request.get("sender", ""), "a@b")
        self.assertEqual(list(request.keys()), ["sender", "tls_sni"])
        self.assertEqual(list(request.values()), ["a@b", "mx.example"])
        self.assertEqual(list(request.items()), [("sender", "a@b"), ("tls_sni", "mx.example")])
        self.assertFalse(hasattr(request.items(), "__setitem__"))

    def test_immutable(self):
        """Neither attributes nor items can be changed or added."""
        request = make_request()
        self.assertRaises(AttributeError, setattr, request, "sender", "x")
        self.assertRaises(AttributeError, setattr, request, "_attributes", {})

        def set_item():
            request["sender"] = "x"

        self.assertRaises(TypeError, set_item)
        self.assertRaises(AttributeError, getattr, request, "update")

    def test_source_mapping_copied(self):
        """Changing the dict a request was built from does not change the request."""
        source = {"sender": "a@b.example"}
        request = PolicyRequest(source)
        source["sender"] = "evil@x"
        self.assertEqual(request.sender, "a@b.example")

    def test_replace(self):
        """C{replace} returns a changed copy and leaves the original alone."""
        request = make_request()
        changed = request.replace(sender="x@y.example", new_attribute="1")
        self.assertEqual(changed.sender, "x@y.example")
        self.assertEqual(changed["new_attribute"], "1")
        self.assertEqual(request.sender, "alice@example.com")
        self.assertNotIn("new_attribute", request)

    def test_equality_and_hash(self):
        """Equal attributes make equal, equally hashed requests."""
        self.assertEqual(make_request(), make_request())
        self.assertEqual(hash(make_request()), hash(make_request()))
        self.assertNotEqual(make_request(), make_request(sender=""))
        self.assertNotEqual(make_request(), {"sender": "x"}.items())

    def test_domains_lowercased_values_preserved(self):
        """Domain helpers lowercase; the raw values and local parts keep their case."""
        request = make_request(sender="Alice.Smith@Example.COM", recipient="Bob@Mail.Example.NET")
        self.assertEqual(request.sender, "Alice.Smith@Example.COM")
        self.assertEqual(request["sender"], "Alice.Smith@Example.COM")
        self.assertEqual(request.sender_domain, "example.com")
        self.assertEqual(request.sender_local_part, "Alice.Smith")
        self.assertEqual(request.recipient_domain, "mail.example.net")
        self.assertEqual(request.recipient_local_part, "Bob")

    def test_address_with_several_at_signs(self):
        """The domain follows the last C{@}, as in a quoted local part."""
        request = make_request(sender='"a@b"@Example.org')
        self.assertEqual(request.sender_domain, "example.org")
        self.assertEqual(request.sender_local_part, '"a@b"')

    def test_null_sender(self):
        """The null sender is empty, with no domain and an empty local part."""
        request = make_request(sender="")
        self.assertEqual(request.sender, "")
        self.assertEqual(request.sender_domain, "")
        self.assertEqual(request.sender_local_part, "")

    def test_address_without_domain(self):
        """An address without C{@} has no domain and is all local part."""
        request = make_request(recipient="postmaster")
        self.assertEqual(request.recipient_domain, "")
        self.assertEqual(request.recipient_local_part, "postmaster")

    def test_client_ip(self):
        """C{client_ip} is an ipaddress object, v4-mapped folded, or None."""
        self.assertEqual(
            make_request(client_address="192.0.2.1").client_ip,
            ipaddress.IPv4Address("192.0.2.1"),
        )
        self.assertEqual(
            make_request(client_address="2001:DB8::5").client_ip,
            ipaddress.IPv6Address("2001:db8::5"),
        )
        self.assertEqual(
            make_request(client_address="::ffff:10.0.0.1").client_ip,
            ipaddress.IPv4Address("10.0.0.1"),
        )
        self.assertIsNone(make_request(client_address="unknown").client_ip)
        self.assertIsNone(PolicyRequest({}).client_ip)

    def test_ints(self):
        """C{recipient_count} and C{size} are ints; missing or bad values are 0."""
        request = make_request("eod")
        self.assertEqual(request.recipient_count, 1)
        self.assertEqual(request.size, 221)
        self.assertEqual(make_request(size="", recipient_count="x").size, 0)
        self.assertEqual(make_request(recipient_count="many").recipient_count, 0)
        self.assertEqual(PolicyRequest({}).size, 0)

    def test_protocol_state_uppercased(self):
        """C{protocol_state} is uppercased whatever the case sent."""
        self.assertEqual(
            make_request(protocol_state="end-of-message").protocol_state, "END-OF-MESSAGE"
        )

    def test_stress(self):
        """C{stress} is true only for C{yes}, in any case."""
        self.assertFalse(make_request().stress)
        self.assertTrue(make_request(stress="yes").stress)
        self.assertTrue(make_request(stress="YES").stress)
        self.assertFalse(make_request(stress="no").stress)

    def test_missing_attributes_read_empty(self):
        """Helpers read a missing attribute as C{""}, as Postfix sends unknowns."""
        request = PolicyRequest({})
        for helper in (
            "request",
            "protocol_state",
            "protocol_name",
            "instance",
            "queue_id",
            "helo_name",
            "sender",
            "sender_domain",
            "recipient",
            "recipient_domain",
            "client_address",
            "client_name",
            "reverse_client_name",
            "sasl_username",
            "sasl_method",
        ):
            self.assertEqual(getattr(request, helper), "", helper)

    def test_summary(self):
        """
        The summary shows the stage (upper case), client, HELO name,
        envelope and queue id; missing attributes show empty.
        """
        request = PolicyRequest(
            {
                "protocol_state": "rcpt",
                "client_name": "mx.example.org",
                "client_address": "192.0.2.1",
                "helo_name": "helo.example.org",
                "sender": "a@example.org",
                "recipient": "b@example.net",
                "instance": "1.2.3",
            }
        )
        self.assertEqual(
            request.summary(),
            "RCPT mx.example.org[192.0.2.1] helo=<helo.example.org> from=<a@example.org>"
            " to=<b@example.net> instance=1.2.3 queue_id=",
        )

    def test_repr(self):
        """The repr shows the attributes."""
        self.assertIn("'sender': 'a@b'", repr(PolicyRequest({"sender": "a@b"})))


class FixtureTests(SynchronousTestCase):
    """
    The four real Postfix 3.7 requests parse into the expected requests.
    """

    def test_every_fixture_has_29_attributes(self):
        """Postfix 3.7 sends the same 29 attributes at every stage."""
        names = None
        for fixture in FIXTURES:
            request = make_request(fixture)
            self.assertEqual(len(request), 29, fixture)
            self.assertEqual(request.request, "smtpd_access_policy")
            if names is None:
                names = set(request)
            self.assertEqual(set(request), names, fixture)

    def test_fixture_bytes_end_with_empty_line(self):
        """The fixtures are the bytes on the wire, ending with the empty line."""
        for fixture in FIXTURES:
            data = fixture_bytes(fixture)
            self.assertTrue(data.endswith(b"\n\n"), fixture)
            self.assertEqual(data.count(b"\n\n"), 1, fixture)

    def test_unknown_fixture(self):
        """Asking for a fixture that does not exist names the real ones."""
        error = self.assertRaises(ValueError, fixture_bytes, "helo")
        self.assertIn("rcpt", str(error))

    def test_rcpt(self):
        """The RCPT request."""
        request = make_request("rcpt")
        self.assertEqual(request.protocol_state, "RCPT")
        self.assertEqual(request.sender, "alice@example.com")
        self.assertEqual(request.recipient, "bob@example.net")
        self.assertEqual(request.recipient_count, 0)
        self.assertEqual(request.queue_id, "")
        self.assertEqual(request.client_ip, ipaddress.IPv4Address("127.0.0.1"))
        self.assertEqual(request.helo_name, "client.example.com")

    def test_data(self):
        """The DATA request has a queue id and one recipient."""
        request = make_request("data")
        self.assertEqual(request.protocol_state, "DATA")
        self.assertEqual(request.queue_id, "080B1212137")
        self.assertEqual(request.recipient_count, 1)
        self.assertEqual(request.size, 0)

    def test_eod(self):
        """The END-OF-MESSAGE request has the real size and the same instance as DATA."""
        request = make_request("eod")
        self.assertEqual(request.protocol_state, "END-OF-MESSAGE")
        self.assertEqual(request.size, 221)
        self.assertEqual(request.instance, make_request("data").instance)

    def test_xclient(self):
        """The XCLIENT request carries the SASL login and the presented client."""
        request = make_request("xclient")
        self.assertEqual(request.sasl_username, "joe")
        self.assertEqual(request.sasl_method, "XCLIENT")
        self.assertEqual(request.client_name, "mx.example.org")
        self.assertEqual(request.client_ip, ipaddress.IPv4Address("192.0.2.10"))

    def test_parse_request_splits_on_first_equals(self):
        """A value may contain C{=}; the name ends at the first one."""
        request = parse_request(b"ccert_subject=CN=mx,O=Example\nempty=\n\n")
        self.assertEqual(request["ccert_subject"], "CN=mx,O=Example")
        self.assertEqual(request["empty"], "")

    def test_parse_request_crlf(self):
        """Lines ending in CRLF parse without the CR."""
        request = parse_request(b"sender=a@b.example\r\nrecipient=c@d\r\n\r\n")
        self.assertEqual(request.sender, "a@b.example")
        self.assertEqual(request.recipient, "c@d")
