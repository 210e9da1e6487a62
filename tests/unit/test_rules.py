"""
Tests for the C{rules} check (L{pfxpold.checks.rules}) and its language
(L{pfxpold.rules}): the five policies of examples/rules.toml, every
operator, the index, jump and return, marks across stages, quota rules,
templates, the explain and the configuration warnings.
"""

from __future__ import annotations

import os
import sys

import re2
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from pfxpold.checks.rules import RulesCheck
from pfxpold.config import ConfigError, Configuration, load_configuration
from pfxpold.interfaces import ICheck, IConfigWarnings, IExplainable, IUsesChecks
from pfxpold.rules.conditions import Matches
from pfxpold.testing import CheckTestCase, make_request, run_check
from tests.unit.tempdir import temporary_directory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "rules.toml")


def write(path: str, text: str) -> None:
    with open(path + ".new", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".new", path)


class RulesTestCase(CheckTestCase):
    """
    Loads configurations from TOML text in a temporary directory.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = temporary_directory(self)

    def configure(self, text: str, **files: str) -> Configuration:
        for name, content in files.items():
            write(os.path.join(self.directory, name), content)
        path = os.path.join(self.directory, "pfxpold.toml")
        write(path, text)
        return load_configuration(path, self.clock)

    def rules(self, rules: str, check: str = "", prefix: str = "", **files: str) -> RulesCheck:
        """
        A rules check named C{policy} with C{rules} (TOML after its table).
        """
        configuration = self.configure(
            f'{prefix}\n[[check]]\nname = "policy"\ntype = "rules"\n{check}\n{rules}', **files
        )
        return configuration.chain.entries[-1].check

    def assertRejects(self, text: str, message: str) -> None:
        error = self.assertRaises(ConfigError, self.configure, text)
        self.assertIn(message, str(error))

    def answer(self, check: RulesCheck, **attributes: str) -> str:
        fixture = attributes.pop("fixture", "rcpt")
        return str(self.successResultOf(run_check(check, make_request(fixture, **attributes))))


class ExampleTests(RulesTestCase):
    """
    The five policies of examples/rules.toml, request in, answer out.
    """

    def setUp(self) -> None:
        super().setUp()
        self.check = load_configuration(EXAMPLE, self.clock).chain.entries[0].check

    def ask(self, **attributes: str) -> str:
        return self.answer(self.check, **attributes)

    def test_provides(self) -> None:
        """
        The check provides ICheck, IExplainable, IConfigWarnings and
        IUsesChecks.
        """
        for interface in (ICheck, IExplainable, IConfigWarnings, IUsesChecks):
            self.assertTrue(verifyObject(interface, self.check))

    def test_exactly_five_rules(self) -> None:
        """
        The example holds the five policies, in order, and nothing else,
        and --check-config has nothing to warn about.
        """
        names = [rule.name for rule in self.check.program.rules()]
        self.assertEqual(
            names,
            [
                "application servers",
                "login's own domain",
                "size limit",
                "many recipients",
                "unknown or dynamic client",
            ],
        )
        self.assertEqual(self.check.config_warnings(), [])

    def test_application_servers_own_domain(self) -> None:
        """
        Policy 1: an application server may send as anyone@apps.example.
        """
        self.assertEqual(self.ask(client_address="192.0.2.7", sender="app@apps.example"), "DUNNO")
        self.assertEqual(self.ask(client_address="192.0.2.7", sender="app@APPS.example."), "DUNNO")

    def test_application_servers_other_sender(self) -> None:
        """
        Policy 1: any other sender, a subdomain's or the null sender, is
        rejected with 5.7.1 and the address named.
        """
        for sender in ("x@sub.apps.example", "x@other.example", ""):
            self.assertEqual(
                self.ask(client_address="192.0.2.250", sender=sender),
                f"REJECT 5.7.1 The application servers may not send as <{sender}>",
            )

    def test_application_servers_only(self) -> None:
        """
        Policy 1 applies only to 192.0.2.0/24.
        """
        self.assertEqual(self.ask(client_address="192.0.3.1", sender="x@other.example"), "DUNNO")

    def test_login_own_domain(self) -> None:
        """
        Policy 2: alice@corp.example may send as anyone@corp.example.
        """
        self.assertEqual(
            self.ask(sasl_username="alice@corp.example", sender="anyone@Corp.Example"), "DUNNO"
        )

    def test_login_other_domain(self) -> None:
        """
        Policy 2: not as x@other.example, nor as the null sender.
        """
        for sender in ("x@other.example", "x@sub.corp.example", ""):
            self.assertEqual(
                self.ask(sasl_username="alice@corp.example", sender=sender),
                "REJECT 5.7.1 Your login may not send as this sender",
            )

    def test_size_limit(self) -> None:
        """
        Policy 3: over 10,000,000 bytes at RCPT is rejected with 5.3.4.
        """
        self.assertEqual(
            self.ask(size="10000001", client_address="203.0.113.9"),
            "REJECT 5.3.4 Message too big: at most 10000000 bytes",
        )
        self.assertEqual(self.ask(size="10000000", client_address="203.0.113.9"), "DUNNO")

    def test_size_limit_exempt(self) -> None:
        """
        Policy 3: not from 198.51.100.0/24, nor at END-OF-MESSAGE.
        """
        self.assertEqual(self.ask(size="20000000", client_address="198.51.100.77"), "DUNNO")
        self.assertEqual(
            self.ask(fixture="eod", size="20000000", client_address="203.0.113.9"), "DUNNO"
        )

    def test_many_recipients(self) -> None:
        """
        Policy 4: more than 50 recipients without a login at DATA or
        END-OF-MESSAGE is held.
        """
        for fixture in ("data", "eod"):
            self.assertEqual(
                self.ask(fixture=fixture, recipient_count="51"),
                "HOLD More than 50 recipients without a login",
            )

    def test_many_recipients_not(self) -> None:
        """
        Policy 4: not with 50, not with a login.
        """
        self.assertEqual(self.ask(fixture="data", recipient_count="50"), "DUNNO")
        self.assertEqual(
            self.ask(
                fixture="eod", recipient_count="99", sasl_username="bob", sender="bob"
            ),
            "DUNNO",
        )

    def test_dynamic_clients(self) -> None:
        """
        Policy 5: unknown and dynamic-looking names without a login are
        deferred, in any case.
        """
        for name in ("unknown", "DSL-1-2.isp.example", "dyn.1.example", "dhcp7.example",
                     "Ppp-9.example", "pool.x.example", "UNKNOWN"):
            self.assertEqual(
                self.ask(client_name=name),
                "DEFER_IF_PERMIT Your host name is unknown or looks dynamic;"
                " use your provider's relay",
                name,
            )

    def test_not_dynamic(self) -> None:
        """
        Policy 5: a name that only starts like one, or a client with a
        login, passes.
        """
        for name in ("dslam.isp.example", "poolside.example", "mx.dsl-1.example"):
            self.assertEqual(self.ask(client_name=name), "DUNNO", name)
        self.assertEqual(
            self.ask(
                client_name="unknown", sasl_username="joe@corp.example", sender="joe@corp.example"
            ),
            "DUNNO",
        )

    def test_explain(self) -> None:
        """
        The explain names each rule, whether it matched, and the first
        condition that failed or the answer.
        """
        steps = self.check.explain(make_request(client_address="192.0.2.7", sender="x@a.example"))
        self.assertEqual(
            steps,
            [
                (
                    "application servers",
                    True,
                    "answers REJECT 5.7.1 The application servers may not send as <x@a.example>",
                )
            ],
        )
        steps = self.check.explain(make_request(size="20000000", client_address="198.51.100.1"))
        self.assertEqual(steps[0][:2], ("application servers", False))
        self.assertIn("client_address in 192.0.2.0/24", steps[0][2])
        self.assertEqual(
            steps[2], ("size limit", False, "not (client_address in 198.51.100.0/24):"
                       " client_address is '198.51.100.1'")
        )
        self.assertEqual(steps[-1], ("(end of rules)", False, "no rule answered: DUNNO"))


class ReadmeTests(RulesTestCase):
    """
    The README's rules section.
    """

    def test_example_as_printed(self) -> None:
        """
        The README shows examples/rules.toml as it is, and its other
        samples load as parts of a rules check.
        """
        import re
        import tomllib

        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        start = readme.index("### `rules`")
        section = readme[start : readme.index("\n## ", start)]
        blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
        with open(EXAMPLE, "rb") as f:
            self.assertEqual(tomllib.loads(blocks[0]), tomllib.load(f))
        marks = self.rules(blocks[1], prefix='[stores.default]\ntype = "memory"\n')
        self.assertEqual(len(list(marks.program.rules())), 2)
        # The quota sample is a whole configuration, as an admin pastes it.
        configuration = self.configure(blocks[2])
        self.assertEqual(
            [entry.name for entry in configuration.chain.entries], ["policy", "newsletter-quota"]
        )
        [rule] = configuration.chain.entries[0].check.program.rules()
        self.assertEqual(rule.name, "newsletters")


class OperatorTests(RulesTestCase):
    """
    Every operator of the condition tables.
    """

    def one(self, condition: str, **files: str) -> RulesCheck:
        return self.rules(
            f'[[check.rule]]\nname = "r"\nif = {condition}\naction = "REJECT matched"\n', **files
        )

    def assertMatches(self, check: RulesCheck, expected: bool, **attributes: str) -> None:
        self.assertEqual(
            self.answer(check, **attributes), "REJECT matched" if expected else "DUNNO", attributes
        )

    def test_equality_ignores_case(self) -> None:
        """
        Addresses, domains and host names compare without case, and
        domains and host names without a trailing dot.
        """
        check = self.one('{ sender = "Alice@Example.COM" }')
        self.assertMatches(check, True, sender="alice@example.com")
        self.assertMatches(check, False, sender="alice@example.net")
        check = self.one('{ helo_name = "mx.example.com" }')
        self.assertMatches(check, True, helo_name="MX.Example.Com.")
        check = self.one('{ sender_domain = "example.com." }')
        self.assertMatches(check, True, sender="x@EXAMPLE.com")

    def test_is_operator(self) -> None:
        """
        C{is} is the same as a plain value; an empty string tests for an
        empty value.
        """
        check = self.one('{ protocol_state = { is = "rcpt" } }')
        self.assertMatches(check, True)
        check = self.one('{ sasl_username = "" }')
        self.assertMatches(check, True)
        self.assertMatches(check, False, sasl_username="joe")

    def test_inline_list(self) -> None:
        """
        A list, or C{in}, is membership.
        """
        for condition in ('{ recipient_domain = ["a.example", "b.example"] }',
                          '{ recipient_domain = { in = ["a.example", "b.example"] } }'):
            check = self.one(condition)
            self.assertMatches(check, True, recipient="x@B.example")
            self.assertMatches(check, False, recipient="x@c.example")

    def test_list_file(self) -> None:
        """
        C{in_file} reads a file of values (comments and blank lines
        skipped) and reads it again when it changes.
        """
        check = self.one(
            '{ sender = { in_file = "senders.txt" } }',
            **{"senders.txt": "# blocked\nspam@example.com\n\nJunk@Example.NET  # old\n"},
        )
        check.startService()
        self.addCleanup(check.stopService)
        self.assertMatches(check, True, sender="junk@example.net")
        self.assertMatches(check, False, sender="ham@example.com")
        write(os.path.join(self.directory, "senders.txt"), "ham@example.com\n")
        self.clock.advance(5)
        self.assertMatches(check, True, sender="ham@example.com")
        self.assertMatches(check, False, sender="junk@example.net")

    def test_list_file_networks(self) -> None:
        """
        A list file for an IP attribute holds addresses and networks.
        """
        check = self.one(
            '{ client_address = { in_file = "nets.txt" } }',
            **{"nets.txt": "192.0.2.0/24\n2001:db8::/32\n198.51.100.7\n"},
        )
        self.assertMatches(check, True, client_address="192.0.2.200")
        self.assertMatches(check, True, client_address="2001:db8:1::5")
        self.assertMatches(check, True, client_address="198.51.100.7")
        self.assertMatches(check, False, client_address="198.51.100.8")

    def test_missing_list_file(self) -> None:
        """
        A list file that cannot be read is a load error naming it.
        """
        self.assertRejects(
            '[[check]]\nname = "p"\ntype = "rules"\n[[check.rule]]\nname = "r"\n'
            'if = { sender = { in_file = "nope.txt" } }\naction = "OK"\n',
            "rule 'r': 'if': sender: 'in_file': cannot read",
        )

    def test_cidr(self) -> None:
        """
        IPv4 and IPv6 networks, single addresses, and IPv4-mapped clients.
        """
        check = self.one('{ client_address = ["192.0.2.0/24", "2001:db8::/32", "203.0.113.5"] }')
        self.assertMatches(check, True, client_address="192.0.2.1")
        self.assertMatches(check, True, client_address="::ffff:192.0.2.1")
        self.assertMatches(check, True, client_address="2001:DB8::1")
        self.assertMatches(check, True, client_address="203.0.113.5")
        self.assertMatches(check, False, client_address="203.0.113.6")
        self.assertMatches(check, False, client_address="unknown")

    def test_bad_network(self) -> None:
        """
        A network with host bits set is a load error.
        """
        self.assertRejects(
            '[[check]]\nname = "p"\ntype = "rules"\n[[check.rule]]\nname = "r"\n'
            'if = { client_address = "192.0.2.1/24" }\naction = "OK"\n',
            "has host bits set",
        )

    def test_domain_and_subdomains(self) -> None:
        """
        C{domain} matches the domain and names below it, of an address or
        a name.
        """
        check = self.one('{ sender = { domain = "example.com" } }')
        self.assertMatches(check, True, sender="a@example.com")
        self.assertMatches(check, True, sender="a@mail.EXAMPLE.com")
        self.assertMatches(check, False, sender="a@notexample.com")
        self.assertMatches(check, False, sender="")
        check = self.one('{ client_name = { domain = ["example.net"] } }')
        self.assertMatches(check, True, client_name="mx1.example.net.")
        self.assertMatches(check, False, client_name="example.network")

    def test_regex(self) -> None:
        """
        C{regex} searches the value, ignoring case unless the pattern says
        (?-i).
        """
        check = self.one('{ helo_name = { regex = "^[0-9]+\\\\.dyn\\\\." } }')
        self.assertMatches(check, True, helo_name="12.DYN.example")
        self.assertMatches(check, False, helo_name="x12.dyn.example")
        check = self.one("{ helo_name = { regex = '(?-i)Bad' } }")
        self.assertMatches(check, True, helo_name="a.Bad.example")
        self.assertMatches(check, False, helo_name="a.bad.example")

    def test_regex_engine(self) -> None:
        """
        Patterns are compiled by RE2, not by Python's backtracking re.
        """
        check = self.one("{ helo_name = { regex = '(a+)+$' } }")
        condition = next(iter(check.program.main.rules)).condition
        self.assertIsInstance(condition, Matches)
        self.assertIsInstance(condition.compiled[0], re2._Regexp)

    def test_catastrophic_patterns(self) -> None:
        """
        The classic catastrophic patterns run on a 4 KiB hostile HELO name
        in RE2 and finish, with the answer a backtracking engine would
        take seconds (or years) to find.
        """
        check = self.rules(
            "".join(
                f'[[check.rule]]\nname = "p{number}"\nif = {{ helo_name = {{ regex = \'{p}\' }} }}\n'
                f'action = "REJECT {number}"\n'
                for number, p in enumerate(["(a+)+$", "(a|aa)*b", "(.*a){20}x"])
            )
        )
        for rule in check.program.main.rules:
            self.assertIsInstance(rule.condition.compiled[0], re2._Regexp)
        hostile = "a" * 4096 + "!"
        self.assertEqual(self.answer(check, helo_name=hostile), "DUNNO")
        self.assertEqual(self.answer(check, helo_name="a" * 4095 + "b"), "REJECT 1")

    def test_regex_error(self) -> None:
        """
        A pattern RE2 cannot compile (a back-reference, look-ahead) is a
        load error naming the file, the check and the rule.
        """
        for pattern in ("(a)\\\\1", "(?=x)y", "(unclosed"):
            error = self.assertRaises(
                ConfigError,
                self.configure,
                '[[check]]\nname = "p"\ntype = "rules"\n[[check.rule]]\nname = "backref"\n'
                f'if = {{ helo_name = {{ regex = "{pattern}" }} }}\naction = "OK"\n',
            )
            self.assertIn("pfxpold.toml: check 'p': key 'rule': rule 'backref':", str(error))
            self.assertIn("RE2 cannot compile it", str(error))

    def test_regex_error_in_include(self) -> None:
        """
        In an included file, the error names that file.
        """
        error = self.assertRaises(
            ConfigError,
            self.configure,
            '[[check]]\nname = "p"\ntype = "rules"\ninclude = ["more.toml"]\n',
            **{"more.toml": '[[rule]]\nname = "look"\nif = { sender = { regex = "(?!x)" } }\n'
               'action = "OK"\n'},
        )
        self.assertIn("key 'include':", str(error))
        self.assertIn("more.toml: rule 'look': 'if': regex", str(error))

    def test_numbers(self) -> None:
        """
        gt, ge, lt, le and a whole number compare numbers; a value that is
        not one never matches.
        """
        cases = [
            ("{ size = { gt = 100 } }", {"101": True, "100": False}),
            ("{ size = { ge = 100 } }", {"100": True, "99": False}),
            ("{ size = { lt = 100 } }", {"99": True, "100": False}),
            ("{ size = { le = 100 } }", {"100": True, "101": False, "x": False}),
            ("{ size = 100 }", {"100": True, "0100": True, "101": False}),
            ("{ size = { gt = 10, lt = 20 } }", {"15": True, "25": False}),
        ]
        for condition, values in cases:
            check = self.one(condition)
            for value, expected in values.items():
                self.assertMatches(check, expected, size=value)
        check = self.one("{ encryption_keysize = { lt = 128 } }")
        self.assertMatches(check, True, encryption_keysize="0")
        self.assertMatches(check, False, encryption_keysize="256")

    def test_present(self) -> None:
        """
        present = true wants a value, false an empty one.
        """
        check = self.one("{ sasl_username = { present = true } }")
        self.assertMatches(check, True, sasl_username="joe")
        self.assertMatches(check, False)
        check = self.one("{ ccert_fingerprint = { present = false } }")
        self.assertMatches(check, True)

    def test_same_as(self) -> None:
        """
        same_as compares two attributes as they compare with values.
        """
        check = self.one('{ sender_domain = { same_as = "sasl_domain" } }')
        self.assertMatches(check, True, sender="a@Corp.Example", sasl_username="b@corp.example")
        self.assertMatches(check, False, sender="a@other.example", sasl_username="b@corp.example")
        check = self.one('{ client_address = { same_as = "server_address" } }')
        self.assertMatches(check, True, client_address="::ffff:127.0.0.1")

    def test_groups(self) -> None:
        """
        all, any and not nest.
        """
        check = self.one(
            '{ any = [{ sender_domain = "a.example" }, { all = [{ recipient_domain = "b.example" },'
            ' { not = { size = { gt = 5 } } }] }] }'
        )
        self.assertMatches(check, True, sender="x@a.example")
        self.assertMatches(check, True, recipient="x@b.example", size="5")
        self.assertMatches(check, False, recipient="x@b.example", size="6")

    def test_derived_values(self) -> None:
        """
        Derived values: client network, local parts, SASL login's domain.
        """
        check = self.one('{ client_network = "192.0.2.0/24", sender_local_part = "Bob" }')
        self.assertMatches(check, True, client_address="192.0.2.9", sender="bob@x.example")
        check = self.one('{ sasl_domain = "corp.example" }')
        self.assertMatches(check, True, sasl_username="joe@CORP.example")

    def test_no_condition(self) -> None:
        """
        A rule without 'if' always applies.
        """
        check = self.rules('[[check.rule]]\nname = "all"\naction = "OK"\n')
        self.assertEqual(self.answer(check), "OK")

    def test_errors(self) -> None:
        """
        Mistakes are one-line load errors naming the rule.
        """
        base = '[[check]]\nname = "p"\ntype = "rules"\n[[check.rule]]\nname = "r"\n'
        cases = [
            ('if = { size = { bigger = 5 } }\naction = "OK"\n', "'bigger' is not an operator"),
            ('if = { size = { gt = "5" } }\naction = "OK"\n', "takes a whole number"),
            ('iff = { size = 1 }\naction = "OK"\n', "'iff' is not a rule setting; did you mean 'if'?"),
            ('action = "REJECT 5.7.1"\n', "status code but no text"),
            ('action = "REJECT 5.7.1 {sender}"\n', "with its placeholders empty"),
            ('action = "{verb} x"\n', "verb cannot be a placeholder"),
            ('if = { size = 1 }\n', "does nothing"),
            ('action = "OK"\njump = "x"\n', "not action and jump"),
            ('jump = "nowhere"\n', "no rule set 'nowhere'"),
            ('if = { "Bad Name" = 1 }\naction = "OK"\n', "is not an attribute name"),
            ('mark = "a b"\n', "a mark name is"),
        ]
        for rule, message in cases:
            error = self.assertRaises(ConfigError, self.configure, base + rule)
            self.assertIn("check 'p'", str(error))
            self.assertIn(message, str(error))
            self.assertNotIn("\n", str(error))


class IndexTests(RulesTestCase):
    """
    The index finds the rules a request may match, and answers as testing
    every rule in order would.
    """

    def test_candidates(self) -> None:
        """
        Rules filed under other values (equality, networks, patterns) are
        not candidates; rules that cannot be filed always are.
        """
        check = self.rules(
            '[[check.rule]]\nname = "a"\nif = { sender_domain = "a.example" }\naction = "OK"\n'
            '[[check.rule]]\nname = "net"\nif = { client_address = "192.0.2.0/24" }\naction = "OK"\n'
            '[[check.rule]]\nname = "re"\nif = { helo_name = { regex = "^bad" } }\naction = "OK"\n'
            '[[check.rule]]\nname = "b"\nif = { size = { gt = 5 }, sender_domain = ["b.example", "c.example"] }\n'
            'action = "OK"\n'
            '[[check.rule]]\nname = "big"\nif = { size = { gt = 5 } }\naction = "OK"\n'
        )
        main = check.program.main
        self.assertEqual(main.indexed, 4)
        from pfxpold.rules.conditions import Facts
        from pfxpold.rules.program import positions

        def candidates(**attributes: str) -> list[int]:
            return list(positions(main.candidates(Facts(make_request(**attributes)))))

        self.assertEqual(candidates(sender="x@z.example"), [4])
        self.assertEqual(candidates(sender="x@C.example", client_address="192.0.2.1"), [1, 3, 4])
        self.assertEqual(candidates(sender="x@a.example"), [0, 4])
        self.assertEqual(candidates(helo_name="BAD.example"), [2, 4])

    def test_filed_under_telling_condition(self) -> None:
        """
        A rule is filed under its most telling condition: not
        protocol_state nor an empty value, which most requests have.
        """
        check = self.rules(
            '[[check.rule]]\nname = "r"\n'
            'if = { protocol_state = "RCPT", sasl_username = "", sender = "a@b.example" }\n'
            'action = "REJECT r"\n'
        )
        from pfxpold.rules.conditions import Facts

        main = check.program.main
        self.assertEqual(main.candidates(Facts(make_request(sender="x@b.example"))), 0)
        self.assertEqual(main.candidates(Facts(make_request(sender="A@b.example"))), 1)
        self.assertEqual(self.answer(check, sender="a@b.example"), "REJECT r")
        self.assertEqual(self.answer(check, sender="a@b.example", sasl_username="u"), "DUNNO")

    def test_order_kept(self) -> None:
        """
        An unfiled rule before a filed one answers first.
        """
        check = self.rules(
            '[[check.rule]]\nname = "first"\nif = { size = { gt = 1 } }\naction = "REJECT first"\n'
            '[[check.rule]]\nname = "second"\nif = { sender = "a@b.example" }\naction = "REJECT second"\n'
        )
        self.assertEqual(self.answer(check, sender="a@b.example", size="2"), "REJECT first")
        self.assertEqual(self.answer(check, sender="a@b.example", size="1"), "REJECT second")

    def test_thousand_rules_as_a_scan(self) -> None:
        """
        The benchmark's 1,000 rules answer 3,000 of its requests exactly as
        an independent first-match scan in Python does, and almost all of
        them are filed in the index.
        """
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        self.addCleanup(sys.path.remove, os.path.join(ROOT, "bench"))
        import rules_bench
        import run as bench_run

        population = bench_run.Population()
        models = rules_bench.build_rules(
            population.senders, population.sender_domains, population.clients, population.recipients
        )
        path = os.path.join(self.directory, "pfxpold.toml")
        write(path, "")
        rules_bench.write_rules(path, models)
        check = load_configuration(path, self.clock).chain.entries[0].check
        self.assertGreaterEqual(check.program.main.indexed, 990)
        expect = rules_bench.expectation(models)
        answers = set()
        for attributes in bench_run.make_requests(3000):
            attributes = dict(attributes, instance="x")
            answer = self.answer(check, **{k: v for k, v in attributes.items()})
            self.assertEqual([answer], expect(attributes), attributes)
            answers.add(answer.split()[0])
        self.assertEqual(answers, {"OK", "REJECT", "DEFER_IF_PERMIT", "DUNNO"})


class IndexStructureTests(RulesTestCase):
    """
    The index's structures: domains by label, networks of every length,
    several indexes at once, the attributes read as one key, what is
    remembered, and the answers the index alone decides.
    """

    def candidates(self, check: RulesCheck, **attributes: str) -> list[int]:
        from pfxpold.rules.program import positions

        return list(positions(check.program.main.candidates_of(make_request(**attributes))))

    def test_domains_by_label(self) -> None:
        """
        A domain condition is filed under its domains, and a value finds
        the rules of its domain and of every domain above it, with or
        without case and trailing dot, and never a sibling's.
        """
        check = self.rules(
            '[[check.rule]]\nname = "a"\nif = { sender = { domain = "a.example" } }\naction = "REJECT a"\n'
            '[[check.rule]]\nname = "top"\nif = { helo_name = { domain = "example" } }\naction = "REJECT top"\n'
            '[[check.rule]]\nname = "b"\nif = { sender_domain = { domain = ["b.example", "c.test"] } }\n'
            'action = "REJECT b"\n'
        )
        self.assertEqual(check.program.main.indexed, 3)
        self.assertTrue(all(rule.filed_alone for rule in check.program.main.rules))
        self.assertEqual(self.candidates(check, sender="u@x.Y.A.example.", helo_name="h.test"), [0])
        self.assertEqual(self.candidates(check, sender="u@a.example", helo_name="mx.EXAMPLE"), [0, 1])
        self.assertEqual(self.candidates(check, sender="u@ba.example", helo_name="example.net"), [])
        self.assertEqual(self.candidates(check, sender="u@deep.c.test", helo_name=""), [2])
        self.assertEqual(self.answer(check, sender="u@sub.b.example", helo_name="x"), "REJECT b")
        self.assertEqual(self.answer(check, sender="u@sub.b.example", helo_name="x.example"), "REJECT top")
        self.assertEqual(self.answer(check, sender="u@ab.example", helo_name="x.test"), "DUNNO")

    def test_networks_of_every_length(self) -> None:
        """
        Every network holding the address is found, the most specific and
        the widest alike; the first of their rules in file order answers.
        """
        rules = [
            ("wide", "10.0.0.0/8"),
            ("narrow", "10.1.2.0/24"),
            ("host", "10.1.2.3"),
            ("v6", "2001:db8::/32"),
        ]
        text = "".join(
            f'[[check.rule]]\nname = "{name}"\nif = {{ client_address = "{network}" }}\n'
            f'action = "REJECT {name}"\n'
            for name, network in rules
        )
        check = self.rules(text)
        self.assertEqual(self.candidates(check, client_address="10.1.2.3"), [0, 1, 2])
        self.assertEqual(self.candidates(check, client_address="10.1.2.4"), [0, 1])
        self.assertEqual(self.candidates(check, client_address="::ffff:10.9.9.9"), [0])
        self.assertEqual(self.candidates(check, client_address="2001:db8:1::1"), [3])
        self.assertEqual(self.candidates(check, client_address="not an address"), [])
        self.assertEqual(self.answer(check, client_address="10.1.2.3"), "REJECT wide")
        reversed_text = "".join(
            f'[[check.rule]]\nname = "{name}"\nif = {{ client_address = "{network}" }}\n'
            f'action = "REJECT {name}"\n'
            for name, network in reversed(rules)
        )
        check = self.rules(reversed_text)
        self.assertEqual(self.answer(check, client_address="10.1.2.3"), "REJECT host")
        self.assertEqual(self.answer(check, client_address="10.1.2.9"), "REJECT narrow")
        self.assertEqual(self.answer(check, client_address="10.200.0.1"), "REJECT wide")

    def test_several_indexes_first_in_file_order(self) -> None:
        """
        A request that several indexes find rules for is answered by the
        first of them in file order, whichever index found it, and a rule
        the index cannot decide is tested in its place.
        """
        check = self.rules(
            '[[check.rule]]\nname = "re"\nif = { client_name = { regex = "^dyn" } }\naction = "REJECT re"\n'
            '[[check.rule]]\nname = "big"\nif = { sender = "a@b.example", size = { gt = 10 } }\n'
            'action = "REJECT big"\n'
            '[[check.rule]]\nname = "net"\nif = { client_address = "192.0.2.0/24" }\naction = "REJECT net"\n'
            '[[check.rule]]\nname = "dom"\nif = { recipient = { domain = "example" } }\naction = "REJECT dom"\n'
            '[[check.rule]]\nname = "helo"\nif = { helo_name = "h.example" }\naction = "REJECT helo"\n'
        )
        every = dict(
            client_name="dyn1.example", sender="a@b.example", client_address="192.0.2.9",
            recipient="r@x.example", helo_name="h.example", size="11",
        )
        self.assertEqual(self.candidates(check, **every), [0, 1, 2, 3, 4])
        self.assertEqual(self.answer(check, **every), "REJECT re")
        self.assertEqual(self.answer(check, **dict(every, client_name="mx")), "REJECT big")
        self.assertEqual(self.answer(check, **dict(every, client_name="mx", size="5")), "REJECT net")
        self.assertEqual(
            self.answer(check, **dict(every, client_name="mx", size="5", client_address="::1")),
            "REJECT dom",
        )
        self.assertEqual(
            self.answer(
                check,
                **dict(every, client_name="mx", size="5", client_address="::1", recipient="r@x.test"),
            ),
            "REJECT helo",
        )

    def test_session_attributes_one_key(self) -> None:
        """
        The client's attributes the index reads are one key; the others
        one each; the answers follow every attribute of the key.
        """
        check = self.rules(
            '[[check.rule]]\nname = "net"\nif = { client_address = "192.0.2.0/24" }\naction = "REJECT net"\n'
            '[[check.rule]]\nname = "helo"\nif = { helo_name = "h.example" }\naction = "REJECT helo"\n'
            '[[check.rule]]\nname = "re"\nif = { client_name = { regex = "^dyn" } }\naction = "REJECT re"\n'
            '[[check.rule]]\nname = "s"\nif = { sender_domain = "b.example" }\naction = "REJECT s"\n'
            '[[check.rule]]\nname = "l"\nif = { sender_local_part = "x" }\naction = "REJECT l"\n'
        )
        groups = [remembered.names for remembered in check.program.main._sources]
        self.assertEqual(
            sorted(groups), [("client_address", "client_name", "helo_name"), ("sender",)]
        )
        client = dict(client_address="192.0.2.1", client_name="mx", helo_name="x")
        self.assertEqual(self.answer(check, **client), "REJECT net")
        self.assertEqual(self.answer(check, **dict(client, client_address="::1")), "DUNNO")
        self.assertEqual(
            self.answer(check, **dict(client, client_address="::1", helo_name="H.example")),
            "REJECT helo",
        )
        self.assertEqual(
            self.answer(check, **dict(client, client_address="::1", client_name="dyn")), "REJECT re"
        )
        self.assertEqual(self.answer(check, sender="x@a.example"), "REJECT l")
        self.assertEqual(self.answer(check, sender="y@B.example"), "REJECT s")

    def test_missing_attributes_read_empty(self) -> None:
        """
        A request without the attributes the index reads (an older
        Postfix, a hand-made request) is answered as with them empty.
        """
        from pfxpold.request import PolicyRequest

        check = self.rules(
            '[[check.rule]]\nname = "empty helo"\nif = { helo_name = "", client_address = "192.0.2.1" }\n'
            'action = "REJECT empty"\n'
            '[[check.rule]]\nname = "null sender"\nif = { sender = "" }\naction = "REJECT null"\n'
        )
        bare = PolicyRequest({"request": "smtpd_access_policy", "client_address": "192.0.2.1"})
        self.assertEqual(str(self.successResultOf(run_check(check, bare))), "REJECT empty")
        bare = PolicyRequest({"request": "smtpd_access_policy"})
        self.assertEqual(str(self.successResultOf(run_check(check, bare))), "REJECT null")

    def test_remembered_values_bounded(self) -> None:
        """
        The values remembered per key are at most twice
        L{pfxpold.rules.program.REMEMBERED}, and answers stay right while
        values come and go.
        """
        from pfxpold.rules import program

        self.patch(program, "REMEMBERED", 4)
        check = self.rules(
            '[[check.rule]]\nname = "s"\nif = { sender_domain = ["d3.example", "d7.example"] }\n'
            'action = "REJECT s"\n'
        )
        (remembered,) = check.program.main._sources
        for _ in range(3):
            for number in range(10):
                answer = self.answer(check, sender=f"u@d{number}.example")
                self.assertEqual(answer, "REJECT s" if number in (3, 7) else "DUNNO")
                self.assertLessEqual(len(remembered), 4)
                self.assertLessEqual(len(remembered.older), 4)

    def test_long_values_not_remembered(self) -> None:
        """
        A value longer than any name or address (a hostile HELO name) is
        answered but not remembered, by the index nor by a template.
        """
        check = self.rules(
            '[[check.rule]]\nname = "h"\nif = { helo_name = { regex = "^x" } }\n'
            'action = "REJECT {helo_name}"\n'
        )
        (remembered,) = check.program.main._sources
        long_name = "x" * 300
        # The action's text is cut to 256 characters, as any action's.
        self.assertEqual(self.answer(check, helo_name=long_name), "REJECT " + "x" * 256)
        self.assertEqual(len(remembered), 0)
        self.assertEqual(len(check.program.main.rules[0].action._filled), 0)
        self.assertEqual(self.answer(check, helo_name="x.example"), "REJECT x.example")
        self.assertEqual(list(remembered), ["x.example"])
        self.assertEqual(len(check.program.main.rules[0].action._filled), 1)

    def test_filled_templates_remembered(self) -> None:
        """
        A template's action for the same values is made once; other values
        make other actions; at most L{pfxpold.rules.program.FILLED} are kept
        per generation.
        """
        from pfxpold.rules import program

        self.patch(program, "FILLED", 2)
        check = self.rules(
            '[[check.rule]]\nname = "r"\nif = { recipient_domain = "a.example" }\n'
            'action = "REJECT 5.1.1 <{recipient}>: unknown user"\n'
        )
        request = make_request(recipient="x@a.example")
        first = self.successResultOf(run_check(check, request))
        self.assertIs(self.successResultOf(run_check(check, make_request(recipient="x@a.example"))), first)
        for name in "abcdef":
            answer = self.answer(check, recipient=f"{name}@a.example")
            self.assertEqual(answer, f"REJECT 5.1.1 <{name}@a.example>: unknown user")
        template = check.program.main.rules[0].action
        self.assertLessEqual(len(template._filled), 2)

    def test_regex_alone_decided_by_set(self) -> None:
        """
        A rule whose whole condition is a regex is decided by the RE2 set;
        when the set cannot be built, its rules are tested on every request
        and still answer right.
        """
        from pfxpold.rules import program

        text = (
            '[[check.rule]]\nname = "re"\nif = { client_name = { regex = ["^dyn", "\\\\.pool\\\\."] } }\n'
            'action = "REJECT re"\n'
            '[[check.rule]]\nname = "re2"\nif = { client_name = { regex = "^mx" }, size = { gt = 5 } }\n'
            'action = "REJECT re2"\n'
        )
        check = self.rules(text)
        self.assertEqual([r.filed_alone for r in check.program.main.rules], [True, False])
        self.assertEqual(check.program.main.answers[0].line, b"action=REJECT re\n\n")
        self.assertEqual(self.answer(check, client_name="a.POOL.example"), "REJECT re")
        self.assertEqual(self.answer(check, client_name="mx1", size="6"), "REJECT re2")
        self.assertEqual(self.answer(check, client_name="mx1", size="5"), "DUNNO")
        self.patch(program, "pattern_set", lambda patterns: None)
        check = self.rules(text)
        self.assertEqual([r.filed_alone for r in check.program.main.rules], [False, False])
        self.assertEqual(check.program.main.always, 0b11)
        self.assertEqual(self.answer(check, client_name="a.POOL.example"), "REJECT re")
        self.assertEqual(self.answer(check, client_name="dyn.example"), "REJECT re")
        self.assertEqual(self.answer(check, client_name="mx1", size="6"), "REJECT re2")
        self.assertEqual(self.answer(check, client_name="other"), "DUNNO")

    def test_derived_values_from_their_source(self) -> None:
        """
        Every derived value is made from the attribute L{Attribute.source}
        names alone: a request holding only that attribute gives it the
        same value, which is what lets the index remember it per value.
        """
        from pfxpold.accessmap import DERIVED_ATTRIBUTES
        from pfxpold.request import PolicyRequest
        from pfxpold.rules.conditions import RULE_DERIVED, SOURCES, Attribute

        self.assertEqual(set(SOURCES), set(DERIVED_ATTRIBUTES | RULE_DERIVED))
        request = make_request(
            sender="Alice@Sub.Example.", recipient="bob@x.example", client_address="::ffff:192.0.2.7",
            sasl_username="carol@Corp.example",
        )
        for name in sorted(DERIVED_ATTRIBUTES | RULE_DERIVED):
            attribute = Attribute(name)
            alone = PolicyRequest({attribute.source: request.get(attribute.source, "")})
            self.assertEqual(attribute.get(alone), attribute.get(request), name)
            self.assertEqual(attribute.get_folded(alone), attribute.get_folded(request), name)
            self.assertTrue(attribute.get(request), name)


class IndexPropertyTests(RulesTestCase):
    """
    For random rule sets and requests, the indexed check answers as the
    explain's rule-by-rule walk does.
    """

    def test_index_equals_walk(self) -> None:
        """
        Equality, lists, networks, patterns, numbers and groups, in any
        order, with jumps: the same answer either way.
        """
        from hypothesis import given, settings
        from hypothesis import strategies as st

        domains = ["a.example", "b.example", "c.example"]
        conditions = st.sampled_from(
            [
                '{ sender_domain = "a.example" }',
                '{ sender_domain = ["b.example", "c.example"] }',
                '{ client_address = "192.0.2.0/25" }',
                '{ client_address = ["192.0.2.128/25", "2001:db8::/32"] }',
                '{ helo_name = { regex = "^mx[0-9]" } }',
                '{ size = { gt = 100 } }',
                '{ sender_domain = "a.example", size = { le = 100 } }',
                '{ any = [{ recipient_domain = "b.example" }, { helo_name = "x.example" }] }',
                '{ not = { sender_domain = "c.example" } }',
                '{ sender_domain = { domain = "a.example" } }',
                '{ helo_name = { domain = "example" } }',
                '{ recipient = { domain = ["b.example", "x.c.example"] } }',
                '{ client_name = { regex = ["^x", "ample$"] } }',
                '{ client_address = "192.0.2.0/24", helo_name = { domain = "x.example" } }',
                '{ client_address = "192.0.2.1" }',
                "",
            ]
        )
        rule_sets = st.lists(
            st.tuples(conditions, st.sampled_from(["action", "template", "jump", "return"])),
            min_size=1,
            max_size=8,
        )
        requests = st.lists(
            st.fixed_dictionaries(
                {
                    "sender": st.sampled_from(domains + ["sub.A.example"]).map(lambda d: "u@" + d),
                    "recipient": st.sampled_from(domains + ["x.c.example."]).map(
                        lambda d: "r@" + d
                    ),
                    "client_address": st.sampled_from(
                        ["192.0.2.1", "192.0.2.200", "2001:db8::5", "203.0.113.1", "bad"]
                    ),
                    "client_name": st.sampled_from(["x.example", "mx.EXAMPLE", "unknown"]),
                    "helo_name": st.sampled_from(
                        ["mx1.example", "x.example", "MX.example", "sub.X.example.", ""]
                    ),
                    "size": st.sampled_from(["0", "100", "101"]),
                }
            ),
            min_size=1,
            max_size=5,
        )

        @settings(max_examples=60, deadline=None)
        @given(rule_sets, rule_sets, requests)
        def check(main, other, asked) -> None:
            text = ""
            for number, (condition, kind) in enumerate(main):
                text += f'[[check.rule]]\nname = "m{number}"\n'
                if condition:
                    text += f"if = {condition}\n"
                text += {
                    "action": f'action = "REJECT m{number}"\n',
                    "template": f'action = "REJECT m{number} {{helo_name}} {{sender}}"\n',
                    "jump": 'jump = "other"\n',
                    "return": "return = true\n",
                }[kind]
            for number, (condition, kind) in enumerate(other):
                text += f'[[check.ruleset.other]]\nname = "o{number}"\n'
                if condition:
                    text += f"if = {condition}\n"
                text += 'return = true\n' if kind != "action" else f'action = "REJECT o{number}"\n'
            rules = self.rules(text)
            for attributes in asked:
                request = make_request(**attributes)
                answer = str(self.successResultOf(run_check(rules, request)))
                steps = rules.explain(request)
                walked = steps[-1][2].removeprefix("answers ")
                if steps[-1][0] == "(end of rules)":
                    walked = "DUNNO"
                self.assertEqual(answer, walked, (text, attributes, steps))

        check()


class JumpTests(RulesTestCase):
    """
    jump to a named rule set, and return from it.
    """

    RULES = """
[[check.rule]]
name = "submission"
if = { sasl_username = { present = true } }
jump = "authenticated"

[[check.rule]]
name = "fallback"
if = { sender_domain = "corp.example" }
action = "REJECT 5.7.1 log in first"

[[check.ruleset.authenticated]]
name = "trusted"
if = { sasl_username = "boss@corp.example" }
return = true

[[check.ruleset.authenticated]]
name = "own domain"
if = { not = { sender_domain = { same_as = "sasl_domain" } } }
action = "REJECT 5.7.1 not your domain"

[[check.ruleset.authenticated]]
name = "done"
action = "OK"
"""

    def test_jump_answers(self) -> None:
        """
        The rule set's answer is the answer.
        """
        check = self.rules(self.RULES)
        self.assertEqual(
            self.answer(check, sasl_username="a@corp.example", sender="a@x.example"),
            "REJECT 5.7.1 not your domain",
        )
        self.assertEqual(
            self.answer(check, sasl_username="a@corp.example", sender="a@corp.example"), "OK"
        )

    def test_return(self) -> None:
        """
        return goes back after the jump, where the next rule applies.
        """
        check = self.rules(self.RULES)
        self.assertEqual(
            self.answer(check, sasl_username="boss@corp.example", sender="b@corp.example"),
            "REJECT 5.7.1 log in first",
        )
        self.assertEqual(
            self.answer(check, sasl_username="boss@corp.example", sender="b@x.example"), "DUNNO"
        )

    def test_explain_follows_jumps(self) -> None:
        """
        The explain shows the rules of the set jumped to, by set and name.
        """
        check = self.rules(self.RULES)
        steps = check.explain(make_request(sasl_username="boss@corp.example", sender="b@x.example"))
        self.assertEqual(
            [step[:2] for step in steps],
            [
                ("submission", True),
                ("authenticated: trusted", True),
                ("fallback", False),
                ("(end of rules)", False),
            ],
        )

    def test_loop(self) -> None:
        """
        Rule sets that jump in a circle are a load error.
        """
        error = self.assertRaises(
            ConfigError,
            self.rules,
            '[[check.rule]]\nname = "go"\njump = "a"\n'
            '[[check.ruleset.a]]\nname = "to b"\njump = "b"\n'
            '[[check.ruleset.b]]\nname = "to a"\njump = "a"\n',
        )
        self.assertIn("jumps loop: a -> b -> a", str(error))

    def test_included_rule_sets(self) -> None:
        """
        Included files add rules after the check's and rule sets, and are
        read again when they change.
        """
        check = self.rules(
            '[[check.rule]]\nname = "go"\nif = { sender_domain = "x.example" }\njump = "more"\n',
            check='include = ["more.toml"]\n',
            **{"more.toml": '[[ruleset.more]]\nname = "m"\naction = "REJECT m"\n'
               '[[rule]]\nname = "last"\naction = "OK"\n'},
        )
        check.startService()
        self.addCleanup(check.stopService)
        self.assertEqual(self.answer(check, sender="a@x.example"), "REJECT m")
        self.assertEqual(self.answer(check, sender="a@y.example"), "OK")
        write(
            os.path.join(self.directory, "more.toml"),
            '[[ruleset.more]]\nname = "m"\naction = "REJECT changed"\n',
        )
        self.clock.advance(5)
        self.assertEqual(self.answer(check, sender="a@x.example"), "REJECT changed")
        self.assertEqual(self.answer(check, sender="a@y.example"), "DUNNO")

    def test_broken_include_keeps_rules(self) -> None:
        """
        A changed file with an error is logged, and the rules in force stay.
        """
        check = self.rules(
            "", check='include = ["more.toml"]\n',
            **{"more.toml": '[[rule]]\nname = "r"\naction = "REJECT r"\n'},
        )
        check.startService()
        self.addCleanup(check.stopService)
        write(os.path.join(self.directory, "more.toml"), '[[rule]]\nname = "r"\nactoin = "OK"\n')
        from twisted.logger import capturedLogs

        with capturedLogs() as events:
            self.clock.advance(5)
        self.assertEqual(self.answer(check), "REJECT r")
        self.assertTrue(any("keeping the rules in force" in e["log_format"] for e in events))


class MarkTests(RulesTestCase):
    """
    Marks set at one stage and tested at a later one.
    """

    RULES = """
[[check.rule]]
name = "external recipient"
if = { protocol_state = "RCPT", not = { recipient_domain = { domain = "corp.example" } } }
mark = "external"

[[check.rule]]
name = "external at end"
if = { protocol_state = "END-OF-MESSAGE", marked = "external", sasl_username = "" }
action = "HOLD external mail without a login"
"""

    def make(self, store: str = "memory") -> RulesCheck:
        check = self.rules(self.RULES, prefix=f'[stores.default]\ntype = "{store}"\n'
                           + ('path = "state.sqlite3"\n' if store == "sqlite" else ""))
        return check

    def test_mark_then_act(self) -> None:
        """
        A mark at RCPT is seen at END-OF-MESSAGE of the same message only.
        """
        check = self.make()
        self.assertEqual(self.answer(check, recipient="a@corp.example", instance="m1"), "DUNNO")
        self.assertEqual(self.answer(check, fixture="eod", instance="m1"), "DUNNO")
        self.assertEqual(self.answer(check, recipient="a@other.example", instance="m1"), "DUNNO")
        self.assertEqual(
            self.answer(check, fixture="eod", instance="m1"), "HOLD external mail without a login"
        )
        self.assertEqual(self.answer(check, fixture="eod", instance="m2"), "DUNNO")

    def test_explain_reads_marks(self) -> None:
        """
        The explain reads the message's marks from the store, and marks
        nothing itself.
        """
        check = self.make()
        steps = self.successResultOf(
            check.explain(make_request(recipient="a@other.example", instance="m1"))
        )
        self.assertEqual(steps[0], ("external recipient", True, "marks external"))
        self.assertEqual(check.store.marks_by_key, {})
        self.answer(check, recipient="a@other.example", instance="m1")
        steps = self.successResultOf(check.explain(make_request("eod", instance="m1")))
        self.assertEqual(
            steps[1], ("external at end", True, "answers HOLD external mail without a login")
        )
        steps = self.successResultOf(check.explain(make_request("eod", instance="m2")))
        self.assertEqual(
            steps[1],
            ("external at end", False, "marked external: the message has no marks"),
        )

    def test_explain_reads_shadow_marks(self) -> None:
        """
        A shadow rules check's explain reads the marks it keeps apart from
        the enforcing checks', not theirs.
        """
        check = self.rules(
            self.RULES, check="shadow = true\n", prefix='[stores.default]\ntype = "memory"\n'
        )
        self.assertEqual(check.mark_prefix, "shadow:")
        self.answer(check, recipient="a@other.example", instance="m1")
        self.assertEqual(list(check.store.marks_by_key), ["mark:shadow:m1"])
        steps = self.successResultOf(check.explain(make_request("eod", instance="m1")))
        self.assertEqual(
            steps[1], ("external at end", True, "answers HOLD external mail without a login")
        )

    def test_marks_expire(self) -> None:
        """
        A mark lives mark_lifetime seconds.
        """
        check = self.make()
        self.answer(check, recipient="a@other.example", instance="m1")
        self.clock.advance(3601)
        self.assertEqual(self.answer(check, fixture="eod", instance="m1"), "DUNNO")

    def test_only_rules_that_test_marks_read_them(self) -> None:
        """
        Requests no marking rule concerns never ask the store.
        """
        check = self.make()
        asked = []
        original = check.store.marks
        check.store.marks = lambda *args: asked.append(args) or original(*args)
        self.answer(check, recipient="a@corp.example", instance="m1")
        self.assertEqual(asked, [])
        self.answer(check, fixture="eod", instance="m1")
        self.assertEqual(asked, [("mark:m1", 0.0)])

    def test_sqlite_store(self) -> None:
        """
        The SQLite store keeps marks (run here in the reactor's thread).
        """
        from pfxpold.state.sqlite import SQLiteStore, marks_in, open_database, set_mark_in

        connection = open_database(os.path.join(self.directory, "s.sqlite3"), 1.0)
        self.addCleanup(connection.close)
        set_mark_in(connection, "mark:m", "a", 100.0)
        set_mark_in(connection, "mark:m", "a", 50.0)
        set_mark_in(connection, "mark:m", "b", 10.0)
        self.assertEqual(marks_in(connection, "mark:m", 20.0), frozenset({"a"}))
        self.assertEqual(marks_in(connection, "mark:n", 0.0), frozenset())
        self.assertTrue(hasattr(SQLiteStore, "set_mark"))

    def test_memory_store_expires_marks(self) -> None:
        """
        The memory store's sweep forgets expired marks.
        """
        check = self.make()
        self.answer(check, recipient="a@other.example", instance="m1")
        self.assertEqual(self.successResultOf(check.store.expire(3600.0 + 1)), 1)
        self.assertEqual(check.store.marks_by_key, {})

    def test_store_failure(self) -> None:
        """
        A store that fails makes the check fail (its on_error applies).
        """
        from twisted.internet.defer import fail

        check = self.make()
        check.store.set_mark = lambda *args: fail(RuntimeError("down"))
        self.failureResultOf(
            run_check(check, make_request(recipient="a@x.example", instance="m")), RuntimeError
        )


class QuotaRuleTests(RulesTestCase):
    """
    A rule applies a quota check's limit to the mail it matches only.
    """

    CONFIG = """
[stores.default]
type = "memory"

[[check]]
name = "policy"
type = "rules"

[[check.rule]]
name = "newsletter quota"
if = { sender_domain = "news.example" }
quota = "news-quota"

[[check.rule]]
name = "after"
if = { sender_domain = "news.example" }
action = "OK within"

[[check]]
name = "news-quota"
type = "quota"
key = ["sender_domain"]
rules_only = {rules_only}
limits = [{ period = "hour", max = 2 }]
action = "DEFER 4.7.1 too much news"
"""

    def test_applies_to_matched_mail(self) -> None:
        """
        Matched mail is counted and stopped over the limit; other mail is
        not counted, and the quota check in the chain answers DUNNO.
        """
        configuration = self.configure(self.CONFIG.replace("{rules_only}", "true"))
        check, quota = (entry.check for entry in configuration.chain.entries)
        for number in range(2):
            # A new message each time.
            self.assertEqual(
                self.answer(check, fixture="eod", sender="a@news.example", instance=f"x{number}"),
                "OK within",
            )
        self.assertEqual(
            self.answer(check, fixture="eod", sender="a@news.example", instance="x2"),
            "DEFER 4.7.1 too much news",
        )
        self.assertEqual(self.answer(check, fixture="eod", sender="a@other.example"), "DUNNO")
        self.assertEqual(
            str(self.successResultOf(run_check(quota, make_request("eod", sender="a@other.example")))),
            "DUNNO",
        )

    def test_reload(self) -> None:
        """
        A reload builds a rules check that uses a quota check anew, linked
        to the new configuration's quota check; one that uses none is kept
        when unchanged.
        """
        from pfxpold.config import load_document

        text = self.CONFIG.replace("{rules_only}", "true")
        old = self.configure(text)
        import tomllib

        document = tomllib.loads(text.replace("max = 2", "max = 3"))
        new = load_document(document, self.clock, old.path, previous=old)
        rules, quota = (entry.check for entry in new.chain.entries)
        self.assertIsNot(rules, old.chain.entries[0].check)
        self.assertIsNot(quota, old.chain.entries[1].check)
        self.assertIs(rules._checks["news-quota"], quota)
        self.assertIs(old.chain.entries[0].check._checks["news-quota"], old.chain.entries[1].check)
        plain = tomllib.loads('[[check]]\nname = "p"\ntype = "rules"\n[[check.rule]]\nname = "r"\naction = "OK"\n')
        first = load_document(plain, self.clock, old.path)
        second = load_document(plain, self.clock, old.path, previous=first)
        self.assertIs(second.chain.entries[0].check, first.chain.entries[0].check)

    def test_must_be_rules_only(self) -> None:
        """
        A quota check that counts all mail itself is refused.
        """
        error = self.assertRaises(
            ConfigError, self.configure, self.CONFIG.replace("{rules_only}", "false")
        )
        self.assertIn("set rules_only = true", str(error))

    def test_unknown_quota(self) -> None:
        """
        A rule naming no quota check is a load error.
        """
        error = self.assertRaises(
            ConfigError,
            self.configure,
            self.CONFIG.replace("{rules_only}", "true").replace('quota = "news-quota"', 'quota = "q"'),
        )
        self.assertIn("'quota': no quota check 'q'", str(error))


class TemplateTests(RulesTestCase):
    """
    Action texts filled from the request.
    """

    def test_filled(self) -> None:
        """
        Placeholders take the request's values, derived ones too.
        """
        check = self.rules(
            '[[check.rule]]\nname = "r"\naction = "REJECT 5.7.1 <{sender}> from {client_address}'
            ' ({sender_domain})"\n'
        )
        self.assertEqual(
            self.answer(check, sender="A@B.example", client_address="192.0.2.1"),
            "REJECT 5.7.1 <A@B.example> from 192.0.2.1 (b.example)",
        )

    def test_escaped(self) -> None:
        """
        Control characters and non-ASCII become harmless, a value cannot
        bring in a placeholder, and the text is capped.
        """
        check = self.rules('[[check.rule]]\nname = "r"\naction = "REJECT no {helo_name}"\n')
        action = self.successResultOf(
            run_check(check, make_request(helo_name="x\r\n\r\naction=OK\x00é {recipient}"))
        )
        self.assertEqual(action.line, b"action=REJECT no x action=OK ? {recipient}\n\n")
        action = self.successResultOf(run_check(check, make_request(helo_name="h" * 5000)))
        self.assertEqual(len(action.text), 256)

    def test_unknown_placeholder_warns(self) -> None:
        """
        A placeholder that names no attribute is a warning, and empty.
        """
        check = self.rules('[[check.rule]]\nname = "r"\naction = "REJECT x {sendr}"\n')
        self.assertEqual(self.answer(check), "REJECT x")
        self.assertEqual(
            check.config_warnings(),
            [
                "rule 'r': 'sendr' is not an attribute Postfix sends nor one pfxpold derives;"
                " it is always empty; did you mean 'sender'?"
            ],
        )


class WarningTests(RulesTestCase):
    """
    config_warnings: rules that can never match, unknown attributes.
    """

    def warnings(self, rules: str) -> list[str]:
        return self.rules(rules).config_warnings()

    def test_unconditional_shadows(self) -> None:
        """
        A rule after an unconditional answer can never match.
        """
        self.assertEqual(
            self.warnings(
                '[[check.rule]]\nname = "all"\naction = "OK"\n'
                '[[check.rule]]\nname = "late"\nif = { size = 1 }\naction = "REJECT x"\n'
            ),
            ["rule 'late' can never match: rule 'all' before it matches every request it does"],
        )

    def test_broader_shadows(self) -> None:
        """
        Same conditions, a broader list, a broader network, a parent
        domain: shadowed.
        """
        cases = [
            ('{ sender = "a@b.example" }', '{ sender = "A@b.example", size = 1 }'),
            ('{ sender_domain = ["a.example", "b.example"] }', '{ sender_domain = "b.example" }'),
            ('{ client_address = "192.0.2.0/24" }', '{ client_address = "192.0.2.128/25" }'),
            ('{ sender = { domain = "example" } }', '{ sender = { domain = "a.example" } }'),
        ]
        for first, second in cases:
            warnings = self.warnings(
                f'[[check.rule]]\nname = "one"\nif = {first}\naction = "OK"\n'
                f'[[check.rule]]\nname = "two"\nif = {second}\naction = "REJECT x"\n'
            )
            self.assertEqual(len(warnings), 1, (first, second))
            self.assertIn("rule 'two' can never match", warnings[0])

    def test_not_shadowed(self) -> None:
        """
        Narrower earlier rules, and rules that do not answer, shadow
        nothing.
        """
        self.assertEqual(
            self.warnings(
                '[[check.rule]]\nname = "one"\nif = { sender = "a@b.example", size = 1 }\n'
                'action = "OK"\n'
                '[[check.rule]]\nname = "mark"\nmark = "m"\n'
                '[[check.rule]]\nname = "two"\nif = { sender = "a@b.example" }\naction = "REJECT x"\n',
            ),
            [],
        )

    def test_unknown_attribute(self) -> None:
        """
        A condition on an attribute no request has is a warning (a newer
        Postfix may send it), with a guess.
        """
        self.assertEqual(
            self.warnings('[[check.rule]]\nname = "r"\nif = { sendr = "x" }\naction = "OK"\n'),
            [
                "rule 'r': 'sendr' is not an attribute Postfix sends nor one pfxpold derives;"
                " it is always empty; did you mean 'sender'?"
            ],
        )
