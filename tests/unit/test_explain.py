"""
Tests for L{pfxpold.explain}: the chain run with each check's verdict and
steps, the private stores, the rendering, and the command's errors
(running it on a real configuration is in
tests/integration/test_explain.py).
"""

from __future__ import annotations

import io
import os

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.config import load_document
from pfxpold.explain import (
    NOT_REACHED,
    CheckReport,
    ExplainError,
    Explanation,
    explain,
    load,
    make_parser,
    private_stores,
    render,
    run,
)
from pfxpold.interfaces import ICheck, IDecisionListener, IExplainable
from pfxpold.query import make_parser as query_parser
from pfxpold.testing import make_request
from tests.unit.tempdir import temporary_directory

HERE = __name__


@implementer(ICheck, IExplainable)
class RulesDouble:
    """
    Stands in for the rules check: rules are C{[name, attribute, value,
    action]} lists; the first whose attribute equals the value answers.
    """

    def __init__(self, options):
        self.rules = options.raw("rules")
        self.explained = []

    def _run(self, request):
        steps, answer = [], "DUNNO"
        for name, attribute, value, action in self.rules:
            if request.get(attribute, "") == value:
                steps.append((name, True, action))
                answer = action
                break
            steps.append((name, False, f"{attribute} is not {value!r}"))
        return steps, answer

    def check(self, request):
        return self._run(request)[1]

    def explain(self, request):
        self.explained.append(request)
        # As a Deferred: explain may wait, like check.
        return succeed(self._run(request)[0])


@implementer(ICheck)
class Plain:
    """A check that answers what its table says, without steps."""

    def __init__(self, options):
        self.answer = options.string("answer", "DUNNO")

    def check(self, request):
        return self.answer


@implementer(ICheck)
class Broken:
    """A check that always fails."""

    def __init__(self, options):
        pass

    def check(self, request):
        return fail(RuntimeError("backend down\r\ninjected"))


@implementer(ICheck, IDecisionListener)
class Listener:
    """A check that wants to hear the decision."""

    heard: list = []

    def __init__(self, options):
        pass

    def check(self, request):
        return "DUNNO"

    def decided(self, request, action):
        Listener.heard.append(str(action))


def document(*checks, **server):
    return {"server": server, "check": list(checks)}


class ExplainTests(SynchronousTestCase):
    """
    The chain as the explain runs it.
    """

    def explain(self, configuration_document, request):
        clock = Clock()
        configuration = load_document(configuration_document, clock, "test.toml")
        return self.successResultOf(Deferred.fromCoroutine(explain(configuration, request, clock)))

    def test_verdicts_and_steps(self):
        """
        Every reached check has its verdict; an IExplainable one its steps;
        checks after the decision are not reached.
        """
        rules = [
            ["apps", "client_address", "192.0.2.1", "REJECT 5.7.1 apps only"],
            ["sasl", "sasl_username", "alice", "OK"],
        ]
        explanation = self.explain(
            document(
                {"name": "first", "type": f"{HERE}.Plain", "answer": "DUNNO"},
                {"name": "rules", "type": f"{HERE}.RulesDouble", "rules": rules},
                {"name": "last", "type": f"{HERE}.Plain", "answer": "OK"},
            ),
            make_request(client_address="203.0.113.9", sasl_username="alice"),
        )
        first, ruled, last = explanation.reports
        self.assertEqual(
            (first.name, first.type_name, first.verdict), ("first", f"{HERE}.Plain", "DUNNO")
        )
        self.assertEqual(first.steps, [])
        self.assertEqual(ruled.verdict, "OK")
        self.assertEqual(
            ruled.steps,
            [("apps", False, "client_address is not '192.0.2.1'"), ("sasl", True, "OK")],
        )
        self.assertEqual(last.verdict, NOT_REACHED)
        self.assertEqual(str(explanation.answer), "OK")
        self.assertEqual(explanation.decided_by, "rules")

    def test_default_action(self):
        """When no check decides, the default action answers."""
        explanation = self.explain(
            document({"name": "only", "type": f"{HERE}.Plain"}, default_action="DEFER_IF_PERMIT x"),
            make_request(),
        )
        self.assertEqual(str(explanation.answer), "DEFER_IF_PERMIT x")
        self.assertEqual(explanation.decided_by, "default")

    def test_failure_and_on_error(self):
        """A failing check shows the error and its on_error; skip goes on."""
        explanation = self.explain(
            document(
                {"name": "broken", "type": f"{HERE}.Broken", "on_error": "skip"},
                {"name": "next", "type": f"{HERE}.Plain", "answer": "REJECT no"},
            ),
            make_request(),
        )
        broken, following = explanation.reports
        self.assertEqual(broken.verdict, "error")
        self.assertEqual(broken.problem, "RuntimeError: backend down\r\ninjected")
        self.assertEqual(following.verdict, "REJECT no")
        text = render(explanation)
        self.assertIn(
            "check broken (tests.unit.test_explain.Broken): error, on_error skip"
            " (RuntimeError: backend down\\x0d\\x0ainjected)",
            text,
        )

    def test_listeners_hear_the_decision(self):
        """A decision listener (a quota) is still told, through the recording wrapper."""
        Listener.heard = []
        self.explain(
            document(
                {"name": "quota", "type": f"{HERE}.Listener"},
                {"name": "no", "type": f"{HERE}.Plain", "answer": "REJECT no"},
            ),
            make_request(),
        )
        self.assertEqual(Listener.heard, ["REJECT no"])


class RenderTests(SynchronousTestCase):
    """
    What the explain prints.
    """

    def test_render(self):
        """One line per check, its steps under it, the answer last; request text escaped."""
        request = make_request(sender="a\x1b[2J@example.com", client_address="192.0.2.1")
        explanation = Explanation(
            request,
            [
                CheckReport("acl", "file", "skip", "DUNNO"),
                CheckReport(
                    "rules",
                    "rules",
                    "skip",
                    "REJECT 5.7.1 no",
                    [
                        ("apps", False, "client_address not in 192.0.2.0/24"),
                        ("sasl", True, "REJECT 5.7.1 no"),
                    ],
                ),
                CheckReport("greylist", "greylist", "skip"),
            ],
            None,
            "rules",
        )
        lines = render(explanation).splitlines()
        self.assertTrue(lines[0].startswith("request: RCPT "))
        self.assertIn("[192.0.2.1]", lines[0])
        self.assertIn("from=<a\\x1b[2J@example.com>", lines[0])
        self.assertEqual(
            lines[1:],
            [
                "check acl (file): DUNNO",
                "check rules (rules): REJECT 5.7.1 no",
                "    no   apps: client_address not in 192.0.2.0/24",
                "    yes  sasl: REJECT 5.7.1 no",
                "check greylist (greylist): not reached",
                "answer: no reply (decided by rules): the connection is closed and Postfix"
                " applies smtpd_policy_service_default_action",
            ],
        )


class StoreTests(SynchronousTestCase):
    """
    Stateful checks never reach the production store.
    """

    def test_private_stores(self):
        """Every store, and the default one, becomes a private memory store."""
        original = {
            "stores": {"main": {"type": "redis", "endpoint": "tcp:host=192.0.2.1:port=6379"}},
            "check": [],
        }
        changed = private_stores(original)
        self.assertEqual(
            changed["stores"], {"default": {"type": "memory"}, "main": {"type": "memory"}}
        )
        self.assertEqual(original["stores"]["main"]["type"], "redis")
        self.assertEqual(private_stores({})["stores"], {"default": {"type": "memory"}})

    def test_quota_uses_memory(self):
        """A quota check on a Redis store is built on a memory store instead."""
        directory = temporary_directory(self)
        path = os.path.join(directory, "pfxpold.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                '[stores.main]\ntype = "sqlite"\npath = "state.sqlite3"\n\n'
                '[[check]]\nname = "q"\ntype = "quota"\nstore = "main"\n'
                'key = ["sasl_username"]\nlimits = [{ period = "hour", max = 10 }]\n'
            )
        configuration = load(path, Clock())
        store = configuration.checks["q"].check.store
        self.assertEqual(type(store).__name__, "MemoryStore")
        self.assertFalse(os.path.exists(os.path.join(directory, "state.sqlite3")))


class CommandTests(SynchronousTestCase):
    """
    The command line: shared with pfxpold-query, errors in one line.
    """

    def test_same_request_options_as_query(self):
        """Every request option of pfxpold-query is one of pfxpold-explain's."""

        def destinations(parser):
            return {action.dest for action in parser._actions}

        shared = destinations(query_parser()) - {"server", "timeout"}
        self.assertTrue(shared)
        self.assertLessEqual(shared, destinations(make_parser()))

    def test_help_names_the_private_store(self):
        """--help says that stores are private and in memory."""
        self.assertIn("private in-memory store", make_parser().format_help())

    def run_command(self, *argv, stdin=None):
        arguments = make_parser().parse_args(list(argv))
        out = io.StringIO()
        result = Deferred.fromCoroutine(run(Clock(), arguments, out, stdin))
        return result, out

    def test_errors(self):
        """A missing configuration, a bad file or a bad request is an ExplainError."""
        result, _ = self.run_command()
        self.assertIn("no configuration", str(self.failureResultOf(result, ExplainError).value))
        result, _ = self.run_command("--config", "/nonexistent/pfxpold.toml")
        self.assertIn("cannot read", str(self.failureResultOf(result, ExplainError).value))
        result, _ = self.run_command("--config", "x.toml", "-a", "novalue")
        self.assertIn("not name=value", str(self.failureResultOf(result, ExplainError).value))

    def test_request_file(self):
        """A request on standard input is explained with the configuration's checks."""
        directory = temporary_directory(self)
        path = os.path.join(directory, "pfxpold.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f'[[check]]\nname = "one"\ntype = "{HERE}.Plain"\nanswer = "HOLD x"\n')
        result, out = self.run_command(
            "--config", path, "-", stdin=b"protocol_state=DATA\nsender=a@b.example\n\n"
        )
        self.successResultOf(result)
        self.assertEqual(
            out.getvalue().splitlines()[1:],
            [
                "check one (tests.unit.test_explain.Plain): HOLD x",
                "answer: HOLD x (decided by one)",
            ],
        )
        self.assertTrue(out.getvalue().startswith("request: DATA "))

    def test_script_entry(self):
        """pyproject.toml installs the command as pfxpold-explain."""
        import tomllib

        pyproject = os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml")
        with open(pyproject, "rb") as f:
            scripts = tomllib.load(f)["project"]["scripts"]
        self.assertEqual(scripts["pfxpold-explain"], "pfxpold.explain:main")
