"""
Tests for L{pfxpold.stages}: the table of what Postfix honours at which
stage, C{[server] postfix_version}, the chain treating an answer Postfix
would ignore as a check error, and C{--check-config}'s stage warnings.
"""

import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pfxpold.action import Action
from pfxpold.chain import ChainEntry, CheckChain, ErrorPolicy, StageError
from pfxpold.config import ConfigError, load_configuration
from pfxpold.interfaces import IPossibleActions
from pfxpold.stages import (
    DEFAULT_POSTFIX,
    OUTSIDE_TRANSACTION,
    ROWS,
    STATES,
    VersionError,
    chain_warnings,
    parse_version,
    possible,
    problem,
    problems,
    stage_table,
    warnings_for,
)
from pfxpold.tap import configuration_warnings
from pfxpold.testing import make_request
from tests.unit.tempdir import temporary_directory
from tests.unit.test_chain import Answer, RequestAnswer

V37 = (3, 7)


class TableTests(SynchronousTestCase):
    """
    What the table says Postfix honours, stage by stage and version by
    version.
    """

    def test_prepend_at_end_of_message(self):
        """PREPEND is ignored at END-OF-MESSAGE, quoting Postfix's warning."""
        reason = problem("PREPEND", "END-OF-MESSAGE", V37)
        self.assertIsNotNone(reason)
        self.assertIn("must be used before smtpd_end_of_data_restrictions", reason)

    def test_prepend_inside_transaction(self):
        """PREPEND is honoured at MAIL, RCPT and DATA."""
        for state in ("MAIL", "RCPT", "DATA"):
            self.assertIsNone(problem("PREPEND", state, V37), state)

    def test_delegated_outside_transaction(self):
        """
        HOLD, DISCARD, FILTER, REDIRECT, BCC and PREPEND are skipped where
        there is no mail transaction, and at ETRN.
        """
        for verb in ("HOLD", "DISCARD", "FILTER", "REDIRECT", "BCC", "PREPEND"):
            for state in OUTSIDE_TRANSACTION:
                self.assertIsNotNone(problem(verb, state, V37), (verb, state))
        self.assertIn("smtpd_etrn_restrictions", problem("HOLD", "ETRN", V37))
        self.assertIn("Client host or Helo command restrictions", problem("FILTER", "CONNECT", V37))

    def test_delegated_inside_transaction(self):
        """
        The actions handed to the cleanup server work at MAIL, RCPT, DATA
        and END-OF-MESSAGE (smtpd.c flushes them after the message).
        """
        for verb in ("HOLD", "DISCARD", "FILTER", "REDIRECT", "BCC"):
            for state in ("MAIL", "RCPT", "DATA", "END-OF-MESSAGE"):
                self.assertIsNone(problem(verb, state, V37), (verb, state))

    def test_everywhere(self):
        """The refusing, accepting and logging verbs work at every stage."""
        for verb in (
            "OK",
            "DUNNO",
            "REJECT",
            "DEFER",
            "DEFER_IF_PERMIT",
            "DEFER_IF_REJECT",
            "WARN",
            "INFO",
            "554",
            "450",
            "local_class",
        ):
            for state in STATES:
                self.assertIsNone(problem(verb, state, V37), (verb, state))

    def test_versions(self):
        """
        BCC and INFO need 3.0 and DEFER 2.6: older versions would read them
        as unknown restrictions, at every stage.
        """
        for verb, since, before in (
            ("BCC", (3, 0), (2, 11)),
            ("INFO", (3, 0), (2, 11)),
            ("DEFER", (2, 6), (2, 5)),
        ):
            self.assertIsNone(problem(verb, "RCPT", since))
            for state in STATES:
                self.assertIn("unknown restriction", problem(verb, state, before))

    def test_unknown_state(self):
        """A protocol_state Postfix never sends is not second-guessed."""
        self.assertIsNone(problem("PREPEND", "", V37))
        self.assertIsNone(problem("PREPEND", "QUIT", V37))

    def test_rows_well_formed(self):
        """Every row cites its source and names only real stages."""
        for row in ROWS:
            self.assertTrue(row.source, row.verb)
            self.assertTrue(set(row.ignored) <= set(STATES), row.verb)

    def test_stage_table(self):
        """The table in rows, as the README shows it."""
        rows = dict((verb, (since, where)) for verb, since, where in stage_table())
        self.assertEqual(rows["BCC"], ("3.0", "CONNECT, EHLO, HELO, VRFY, ETRN"))
        self.assertEqual(
            rows["PREPEND"], ("2.1", "CONNECT, EHLO, HELO, END-OF-MESSAGE, VRFY, ETRN")
        )
        self.assertEqual(rows["DEFER"], ("2.6", "-"))

    def test_problems_is_fresh(self):
        """problems() returns its own dicts: a caller cannot change the table."""
        problems(V37)["PREPEND"].clear()
        self.assertIsNotNone(problem("PREPEND", "END-OF-MESSAGE", V37))


class VersionTests(SynchronousTestCase):
    """
    Reading C{postfix_version}.
    """

    def test_parse(self):
        """Major.minor, with an optional patch level; 3.10 is not 3.1."""
        self.assertEqual(parse_version("3.7"), (3, 7))
        self.assertEqual(parse_version("3.7.11"), (3, 7))
        self.assertEqual(parse_version("3.10"), (3, 10))
        self.assertEqual(parse_version(DEFAULT_POSTFIX), (3, 0))

    def test_bad(self):
        """Floats, words and versions before the policy protocol are refused."""
        for value in (3.7, "three", "3", "3.7.x", "2.0", "1.1", ""):
            self.assertRaises(VersionError, parse_version, value)


def stage_chain(check, on_error="skip", default=None, version=V37, **kwargs):
    """A chain of one check C{c1}, then nothing."""
    return CheckChain(
        [ChainEntry("c1", check, 10.0, ErrorPolicy.parse(on_error))],
        default_action=Action.parse(default) if default else None,
        deadline=20.0,
        deadline_policy=ErrorPolicy.parse("DEFER_IF_PERMIT deadline"),
        clock=Clock(),
        postfix_version=version,
        **kwargs,
    )


class RunTimeTests(SynchronousTestCase):
    """
    An answer Postfix would not honour at the request's stage is a check
    error, handled by the check's C{on_error}.
    """

    def test_prepend_at_rcpt_is_sent(self):
        """PREPEND at RCPT is sent as it is."""
        decision = stage_chain(Answer("PREPEND X-Test: yes")).decide(make_request("rcpt"))
        self.assertEqual(str(decision.action), "PREPEND X-Test: yes")
        self.assertEqual(decision.decided_by, "c1")

    def test_prepend_at_end_of_message_on_error_reply(self):
        """
        PREPEND at END-OF-MESSAGE is never sent: on_error answers, and the
        log says why.
        """
        chain = stage_chain(Answer("PREPEND X-Test: yes"), on_error="REJECT 5.7.1 Policy error")
        with capturedLogs() as events:
            decision = chain.decide(make_request("eod"))
        self.assertEqual(str(decision.action), "REJECT 5.7.1 Policy error")
        self.assertEqual(decision.decided_by, "c1")
        text = "\n".join(formatEvent(event) for event in events)
        self.assertIn("check c1 answered PREPEND X-Test: yes", text)
        self.assertIn("must be used before smtpd_end_of_data_restrictions", text)
        self.assertIn("END-OF-MESSAGE", text)
        self.assertNotIn("bug in the check", text)

    def test_on_error_not_honoured(self):
        """
        An on_error answer Postfix would not honour at the stage is not
        sent either: no reply, so Postfix applies its own default, and the
        log says why.
        """
        chain = stage_chain(Answer("PREPEND X-Test: yes"), on_error="PREPEND X-Error: yes")
        with capturedLogs() as events:
            decision = chain.decide(make_request("eod"))
        self.assertIsNone(decision.action)
        self.assertEqual(decision.decided_by, "c1")
        text = "\n".join(formatEvent(event) for event in events)
        self.assertIn("the configured answer PREPEND X-Error: yes (by c1)", text)
        self.assertIn("smtpd_policy_service_default_action", text)

    def test_default_action_not_honoured(self):
        """A default_action Postfix would not honour at the stage: no reply."""
        chain = stage_chain(Answer("DUNNO"), default="PREPEND X-Checked: yes")
        with capturedLogs():
            self.assertIsNone(chain.decide(make_request("eod")).action)
        self.assertEqual(
            str(chain.decide(make_request("rcpt")).action), "PREPEND X-Checked: yes"
        )

    def test_late_on_error_not_honoured(self):
        """After a late answer the configured answer is held to the same rule."""
        waiting = Deferred()
        chain = stage_chain(Answer(waiting), on_error="PREPEND X-Error: yes")
        pending = chain.decide(make_request("eod"))
        with capturedLogs():
            waiting.callback(Action("PREPEND", "X-Late: yes"))
        self.assertIsNone(self.successResultOf(pending).action)

    def test_skip_goes_on(self):
        """With on_error = skip, the chain goes on as if the check had failed."""
        chain = stage_chain(Answer("PREPEND X-Test: yes"), default="DUNNO fine")
        with capturedLogs():
            decision = chain.decide(make_request("eod"))
        self.assertEqual(str(decision.action), "DUNNO fine")
        self.assertEqual(decision.decided_by, "default")

    def test_asynchronous_answer(self):
        """A late answer is held to the same rule."""
        waiting = Deferred()
        chain = stage_chain(Answer(waiting), on_error="DEFER_IF_PERMIT not now")
        pending = chain.decide(make_request("eod"))
        with capturedLogs():
            waiting.callback(Action("PREPEND", "X-Late: yes"))
        decision = self.successResultOf(pending)
        self.assertEqual(str(decision.action), "DEFER_IF_PERMIT not now")

    def test_version(self):
        """BCC from a chain declared for Postfix 2.11 is an error; for 3.0 it is sent."""
        request = make_request("rcpt")
        with capturedLogs():
            old = stage_chain(Answer("BCC archive@example.com"), "DUNNO", version=(2, 11))
            self.assertEqual(str(old.decide(request).action), "DUNNO")
        new = stage_chain(Answer("BCC archive@example.com"), "DUNNO", version=(3, 0))
        self.assertEqual(str(new.decide(request).action), "BCC archive@example.com")

    def test_hold_by_state(self):
        """HOLD at ETRN is an error; at END-OF-MESSAGE it is sent."""
        chain = stage_chain(RequestAnswer(lambda request: "HOLD review"), on_error="DUNNO")
        self.assertEqual(str(chain.decide(make_request("eod")).action), "HOLD review")
        with capturedLogs():
            decision = chain.decide(make_request("rcpt", protocol_state="ETRN"))
        self.assertEqual(str(decision.action), "DUNNO")

    def test_verdict_recorded(self):
        """The verdict names the stage problem, not a bug."""
        chain = stage_chain(Answer("PREPEND X-Test: yes"), record_verdicts=True)
        with capturedLogs():
            decision = chain.decide(make_request("eod"))
        self.assertEqual(decision.verdicts, [("c1", "action not honoured at this stage")])

    def test_stage_error_message(self):
        """StageError names the version, the stage and the reason."""
        error = StageError(Action("PREPEND", "X: y"), "END-OF-MESSAGE", V37, "ignored")
        self.assertEqual(str(error), "Postfix 3.7 at END-OF-MESSAGE: ignored")


class ConfigTests(SynchronousTestCase):
    """
    C{[server] postfix_version} in a configuration file.
    """

    def setUp(self):
        self.directory = temporary_directory(self)

    def load(self, text):
        path = os.path.join(self.directory, "pfxpold.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return load_configuration(path, Clock()), path

    def test_default(self):
        """Without the key, the chain is for Postfix 3.0."""
        configuration, _ = self.load('[[check]]\nname = "d"\ntype = "demo"\n')
        self.assertEqual(configuration.chain.postfix_version, (3, 0))

    def test_set(self):
        """The key sets the chain's version."""
        configuration, _ = self.load(
            '[server]\npostfix_version = "3.7"\n[[check]]\nname = "d"\ntype = "demo"\n'
        )
        self.assertEqual(configuration.chain.postfix_version, (3, 7))

    def test_invalid(self):
        """A bad value is one line naming the file, [server] and the key."""
        for value in ("3.7", '"x"', '"1.0"'):
            path = os.path.join(self.directory, "pfxpold.toml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(f'[server]\npostfix_version = {value}\n[[check]]\ntype = "demo"\n')
            error = self.assertRaises(ConfigError, load_configuration, path, Clock())
            message = str(error)
            self.assertTrue(message.startswith(f"{path}: [server] key 'postfix_version': "))
            self.assertNotIn("\n", message)


class WarningTests(SynchronousTestCase):
    """
    C{--check-config} warns when a check can answer an action Postfix does
    not honour where the check can run.
    """

    def setUp(self):
        self.directory = temporary_directory(self)

    def file(self, name, text):
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def load(self, text):
        path = self.file("pfxpold.toml", text)
        return load_configuration(path, Clock())

    def warnings(self, text):
        with capturedLogs():
            return configuration_warnings(self.load(text))

    def test_warnings_for(self):
        """One line per verb and origin, naming the stages and the reason."""
        lines = warnings_for(
            "c", [possible("PREPEND", ["rcpt", "end-of-message"], "rule 'x'")], V37, "skip"
        )
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith("c: can answer PREPEND (rule 'x'), which Postfix 3.7"))
        self.assertIn("at END-OF-MESSAGE: ignored", lines[0])
        self.assertNotIn("RCPT", lines[0])
        self.assertIn("the check failing (on_error = skip)", lines[0])
        self.assertEqual(warnings_for("c", [possible("PREPEND", ["RCPT"], "r")], V37), [])

    def test_access_map(self):
        """A file check can answer every verb of its map, at any stage."""
        path = self.file("m.map", "a@example.com PREPEND X-A: b\nb@example.com REJECT no\n")
        lines = self.warnings(
            f'[[check]]\nname = "m"\ntype = "file"\nmap = "{path}"\nlookup = ["sender"]\n'
        )
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(f"warning: m: can answer PREPEND ({path})"))
        self.assertIn("END-OF-MESSAGE", lines[0])

    def test_pair_and_regexp_tables(self):
        """Pair maps and regexp tables (inside if blocks, with $n) are read too."""
        pairs = self.file("p.map", "a@example.com b@example.net HOLD\n")
        regexp = self.file("r.regexp", "if /x/\n/^(x.*)$/ FILTER smtp:[$1]\nendif\n")
        configuration = self.load(
            f'[[check]]\nname = "p"\ntype = "file"\nmap = "{pairs}"\nlookup = ["sender"]\n'
            'pair_with = ["recipient"]\n'
            f'[[check]]\nname = "r"\ntype = "file"\nformat = "regexp"\nmap = "{regexp}"\n'
            'lookup = ["helo_name"]\n'
        )
        by_name = {entry.name: entry.check for entry in configuration.chain.entries}
        self.assertEqual(
            sorted((p.verb, p.origin) for p in by_name["p"].possible_actions()),
            [("DUNNO", "not_found"), ("HOLD", pairs)],
        )
        self.assertIn(
            ("FILTER", f"{regexp}:2"), [(p.verb, p.origin) for p in by_name["r"].possible_actions()]
        )

    def test_rules_stages(self):
        """
        A rule limited to END-OF-MESSAGE warns about PREPEND; one limited
        to RCPT (or excluding END-OF-MESSAGE) does not; a jump passes its
        stages to the rule set.
        """
        lines = self.warnings("""
[server]
postfix_version = "3.7"
[[check]]
name = "r"
type = "rules"
[[check.rule]]
name = "late"
if = { protocol_state = "END-OF-MESSAGE" }
action = "PREPEND X-Late: yes"
[[check.rule]]
name = "early"
if = { protocol_state = "RCPT" }
action = "PREPEND X-Early: yes"
[[check.rule]]
name = "to-set"
if = { protocol_state = ["RCPT", "DATA"] }
jump = "tag"
[[check.ruleset.tag]]
name = "tagged"
action = "PREPEND X-Tag: yes"
""")
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("rule 'late'", lines[0])

    def test_rules_not_condition(self):
        """A rule with protocol_state under not holds at every other stage."""
        configuration = self.load("""
[[check]]
name = "r"
type = "rules"
[[check.rule]]
name = "not-eom"
if = { not = { protocol_state = ["END-OF-MESSAGE", "CONNECT"] } }
action = "HOLD x"
""")
        (answer,) = configuration.chain.entries[0].check.possible_actions()
        self.assertEqual(answer.states, frozenset(STATES) - {"END-OF-MESSAGE", "CONNECT"})

    def test_quota_and_greylist(self):
        """
        The quota answers at its stage (and RCPT with refuse_early), the
        greylist at RCPT; a rules check passes on its quota rule's answer.
        """
        configuration = self.load("""
[stores.default]
type = "memory"
[[check]]
name = "g"
type = "greylist"
header = true
[[check]]
name = "q"
type = "quota"
stage = "DATA"
refuse_early = true
action = "HOLD over quota"
limits = [{ period = "day", max = 10 }]
[[check]]
name = "qr"
type = "quota"
rules_only = true
action = "PREPEND X-Quota: over"
limits = [{ period = "day", max = 10 }]
[[check]]
name = "r"
type = "rules"
[[check.rule]]
name = "counted"
quota = "qr"
""")
        checks = {entry.name: entry.check for entry in configuration.chain.entries}
        for check in checks.values():
            self.assertTrue(verifyObject(IPossibleActions, check))
        self.assertEqual(
            sorted((p.verb, tuple(sorted(p.states))) for p in checks["g"].possible_actions()),
            [("DEFER_IF_PERMIT", ("RCPT",)), ("PREPEND", ("RCPT",))],
        )
        (quota,) = checks["q"].possible_actions()
        self.assertEqual((quota.verb, quota.states), ("HOLD", frozenset({"DATA", "RCPT"})))
        self.assertEqual(checks["qr"].possible_actions(), [])
        (via,) = checks["r"].possible_actions()
        self.assertEqual((via.verb, via.states), ("PREPEND", frozenset({"END-OF-MESSAGE"})))
        self.assertEqual(via.origin, "rule 'counted', quota 'qr'")
        lines = configuration_warnings(configuration)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("warning: r: can answer PREPEND"))

    def test_on_error_and_default(self):
        """on_error and default_action are answered at any stage the check runs."""
        configuration = self.load("""
[server]
default_action = "PREPEND X-Default: yes"
[[check]]
name = "d"
type = "demo"
on_error = "BCC audit@example.com"
""")
        lines = chain_warnings(
            configuration.chain.entries, (2, 11), configuration.chain.default_action
        )
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith("d: can answer BCC (on_error)"))
        self.assertIn("needs Postfix 3.0", lines[0])
        self.assertTrue(lines[1].startswith("[server]: can answer PREPEND (default_action)"))

    def test_clean_configuration(self):
        """A configuration whose answers all fit gives no stage warning."""
        path = self.file("m.map", "a@example.com REJECT no\n10.0.0.0/8 OK\n")
        lines = self.warnings(
            '[server]\npostfix_version = "3.7"\n'
            f'[[check]]\nname = "m"\ntype = "file"\nmap = "{path}"\nlookup = ["sender"]\n'
        )
        self.assertEqual(lines, [])
