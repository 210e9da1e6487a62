"""
Tests for L{pfxpold.config}: the TOML configuration, its defaults and the
errors that name file, check and key.
"""

import os

from twisted.application.service import IService, Service
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.action import Action
from pfxpold.chain import CheckChain
from pfxpold.checks.demo import DemoCheck
from pfxpold.config import (
    DEFAULT_LISTEN,
    CheckOptions,
    ConfigError,
    default_configuration,
    endpoint_description,
    listen_problem,
    load_configuration,
    load_document,
    resolve_check_type,
)
from pfxpold.interfaces import ICheck
from pfxpold.protocol import Limits
from pfxpold.testing import make_options
from tests.unit.tempdir import temporary_directory

HERE = __name__


@implementer(ICheck)
class OptionsCheck:
    """A check type that reads C{answer} (and optionally C{extra}) and keeps its options."""

    def __init__(self, options):
        self.options = options
        self.answer = options.action("answer", "DUNNO")
        self.extra = options.raw("extra", None)

    def check(self, request):
        return self.answer


@implementer(ICheck)
class ServiceCheck(Service):
    """A check that is also a service, and asks for a shared service."""

    def __init__(self, options):
        self.options = options
        self.store = options.shared("store", SharedStore)

    def check(self, request):
        return "DUNNO"


class SharedStore(Service):
    """A shared backend that is a service."""


class NotACheck:
    """A type that does not make an ICheck provider."""

    def __init__(self, options):
        pass


def failing_type(options):
    """A check type whose construction fails."""
    raise RuntimeError("cannot connect")


def config_error_type(options):
    """A check type reading a required setting it is not given."""
    options.string("query")


def check_table(name="one", type=f"{HERE}.OptionsCheck", **extra):
    return dict(name=name, type=type, **extra)


class ConfigTestCase(SynchronousTestCase):
    """
    Helpers to write and load configuration files.
    """

    def setUp(self):
        self.clock = Clock()
        self.directory = temporary_directory(self)

    def write(self, text, name="pfxpold.toml"):
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def load(self, text):
        return load_configuration(self.write(text), self.clock)

    def assertConfigError(self, text, *parts):
        """Loading C{text} fails with a message containing the file and every part."""
        path = self.write(text)
        with capturedLogs():
            error = self.assertRaises(ConfigError, load_configuration, path, self.clock)
        message = str(error)
        self.assertTrue(message.startswith(path + ":"), message)
        for part in parts:
            self.assertIn(part, message)
        return message


CHECK = f"""
[[check]]
name = "one"
type = "{HERE}.OptionsCheck"
"""


class ServerTests(ConfigTestCase):
    """
    The [server] table and its defaults.
    """

    def test_request_log_default(self):
        """Without request_log, requests are logged in twistd's log."""
        self.assertIsNone(self.load(CHECK).request_log)

    def test_request_log_relative(self):
        """A relative request_log is resolved from the configuration's folder."""
        configuration = self.load('[server]\nrequest_log = "requests.log"\n' + CHECK)
        self.assertEqual(configuration.request_log, os.path.join(self.directory, "requests.log"))

    def test_request_log_no_directory(self):
        """A request_log in a folder that does not exist is a configuration error."""
        self.assertConfigError(
            '[server]\nrequest_log = "nowhere/requests.log"\n' + CHECK,
            "key 'request_log'",
            "is not a directory",
        )

    def test_request_log_empty(self):
        """An empty request_log is an error, not the configuration's folder."""
        self.assertConfigError(
            '[server]\nrequest_log = ""\n' + CHECK, "key 'request_log'", "must name a file"
        )

    def test_defaults(self):
        """Every server setting has its documented default."""
        configuration = self.load(CHECK)
        self.assertEqual(configuration.listen, [DEFAULT_LISTEN])
        self.assertEqual(DEFAULT_LISTEN, "tcp:9998:interface=127.0.0.1")
        self.assertEqual(configuration.limits, Limits())
        self.assertEqual(Limits().max_line_length, 4096)
        self.assertEqual(Limits().max_attributes, 100)
        self.assertEqual(Limits().max_request_size, 32768)
        self.assertEqual(Limits().idle_timeout, 1200.0)
        self.assertEqual(Limits().request_timeout, 60.0)
        self.assertEqual(Limits().max_pipelined, 32)
        self.assertTrue(configuration.log_requests)
        self.assertEqual(configuration.shutdown_grace, 10.0)
        chain = configuration.chain
        self.assertIsInstance(chain, CheckChain)
        self.assertIsNone(chain.default_action)
        self.assertEqual(chain.deadline, 20.0)
        self.assertEqual(str(chain.deadline_policy), "known")
        self.assertFalse(chain.parallel)
        self.assertEqual(chain.restriction_classes, ())
        self.assertFalse(chain.record_verdicts)
        [entry] = chain.entries
        self.assertEqual(entry.name, "one")
        self.assertEqual(entry.timeout, 10.0)
        self.assertEqual(str(entry.on_error), "DEFER_IF_PERMIT Service temporarily unavailable")
        self.assertEqual(configuration.services, [])

    def test_every_setting(self):
        """Every server setting is read."""
        configuration = self.load(
            """
[server]
listen = ["tcp:1:interface=127.0.0.1", "unix:/tmp/p.sock"]
default_action = "reject no"
deadline = 5
on_deadline = "noreply"
restriction_classes = ["local_only"]
log_requests = false
log_verdicts = true
shutdown_grace = 3.5
idle_timeout = 2000
request_timeout = 30.0
max_line_length = 1000
max_attributes = 40
max_request_size = 4096
max_pipelined = 4
"""
            + CHECK
        )
        self.assertEqual(configuration.listen, ["tcp:1:interface=127.0.0.1", "unix:/tmp/p.sock"])
        self.assertEqual(configuration.chain.default_action, Action("REJECT", "no"))
        self.assertEqual(configuration.chain.deadline, 5.0)
        self.assertEqual(configuration.chain.deadline_policy.kind, "noreply")
        self.assertEqual(configuration.chain.restriction_classes, ("local_only",))
        self.assertFalse(configuration.log_requests)
        self.assertTrue(configuration.chain.record_verdicts)
        self.assertEqual(configuration.shutdown_grace, 3.5)
        self.assertEqual(
            configuration.limits,
            Limits(
                max_line_length=1000,
                max_attributes=40,
                max_request_size=4096,
                idle_timeout=2000.0,
                request_timeout=30.0,
                max_pipelined=4,
            ),
        )

    def test_listen_string(self):
        """A single listen string is accepted as a list of one."""
        configuration = self.load('[server]\nlisten = "unix:/tmp/x.sock"\n' + CHECK)
        self.assertEqual(configuration.listen, ["unix:/tmp/x.sock"])

    def test_restriction_class_default_action(self):
        """A declared restriction class may be the default action and on_error."""
        configuration = self.load(
            '[server]\nrestriction_classes = ["local_only"]\ndefault_action = "local_only"\n'
            + CHECK
            + 'on_error = "local_only"\nanswer = "local_only"\n'
        )
        self.assertEqual(configuration.chain.default_action.verb, "local_only")
        self.assertEqual(configuration.chain.entries[0].check.answer.verb, "local_only")

    def test_demo_default(self):
        """Without a file: the demo check on 127.0.0.1:9998, with its warning."""
        with capturedLogs() as events:
            configuration = default_configuration(self.clock)
        self.assertEqual(configuration.listen, ["tcp:9998:interface=127.0.0.1"])
        self.assertIsNone(configuration.path)
        [entry] = configuration.chain.entries
        self.assertEqual(entry.name, "demo")
        self.assertIsInstance(entry.check, DemoCheck)
        self.assertTrue([e for e in events if "demo check" in e["log_format"]])


class ErrorTests(ConfigTestCase):
    """
    Every mistake is reported with the file, the check and the key.
    """

    def test_invalid_toml(self):
        """A file that is not TOML."""
        self.assertConfigError("[server\n", "not valid TOML")

    def test_unreadable(self):
        """A file that cannot be read."""
        path = os.path.join(self.directory, "missing.toml")
        error = self.assertRaises(ConfigError, load_configuration, path, self.clock)
        self.assertIn(path, str(error))
        self.assertIn("cannot read", str(error))

    def test_unreadable_directory(self):
        """A path that is a directory cannot be read either."""
        error = self.assertRaises(ConfigError, load_configuration, self.directory, self.clock)
        self.assertIn(self.directory, str(error))
        self.assertIn("cannot read", str(error))

    def test_not_utf8(self):
        """A file that is not UTF-8 is reported as invalid TOML, not a crash."""
        path = os.path.join(self.directory, "latin1.toml")
        with open(path, "wb") as f:
            f.write(b'[server]\ndefault_action = "REJECT caf\xe9"\n')
        error = self.assertRaises(ConfigError, load_configuration, path, self.clock)
        self.assertIn(path, str(error))
        self.assertIn("not UTF-8 at byte 37", str(error))

    def test_missing_type(self):
        """A check without a type."""
        self.assertConfigError('[[check]]\nname = "x"\n', "check 'x'", "key 'type'", "required")

    def test_missing_check_key(self):
        """A check type's required setting, named with file, check and key."""
        self.assertConfigError(
            f'[[check]]\nname = "sql"\ntype = "{HERE}.config_error_type"\n',
            "check 'sql'",
            "key 'query'",
            "is required",
        )

    def test_wrong_type(self):
        """A setting of the wrong TOML type."""
        self.assertConfigError('[server]\ndeadline = "soon"\n' + CHECK, "key 'deadline'", "number")
        self.assertConfigError("[server]\nlog_requests = 1\n" + CHECK, "key 'log_requests'")
        self.assertConfigError("[server]\nmax_pipelined = true\n" + CHECK, "key 'max_pipelined'")
        self.assertConfigError(CHECK + 'timeout = "10"\n', "check 'one'", "key 'timeout'")
        self.assertConfigError(CHECK + "answer = 5\n", "check 'one'", "key 'answer'", "string")

    def test_out_of_range(self):
        """Numbers out of their range."""
        self.assertConfigError("[server]\ndeadline = 0\n" + CHECK, "key 'deadline'")
        self.assertConfigError("[server]\nmax_pipelined = 0\n" + CHECK, "key 'max_pipelined'")
        self.assertConfigError("[server]\nmax_line_length = 10\n" + CHECK, "max_line_length")
        self.assertConfigError(CHECK + "timeout = -1\n", "key 'timeout'")
        self.assertConfigError(
            "[server]\ndeadline = 2000\n" + CHECK, "key 'deadline'", "idle_timeout"
        )

    def test_unknown_server_key(self):
        """A misspelt server setting."""
        self.assertConfigError("[server]\ndeadlin = 3\n" + CHECK, "key 'deadlin'", "not a setting")

    def test_unknown_check_key(self):
        """A setting the check type does not read."""
        self.assertConfigError(
            CHECK + 'anser = "OK"\n', "check 'one'", "key 'anser'", "not a setting"
        )

    def test_bad_on_error(self):
        """on_error that is neither skip, noreply nor an action."""
        self.assertConfigError(
            CHECK + 'on_error = "fail-open"\n', "check 'one'", "key 'on_error'", "skip"
        )

    def test_bad_on_deadline(self):
        """on_deadline must be an action or noreply; skip makes no sense for the deadline."""
        self.assertConfigError('[server]\non_deadline = "PERMIT"\n' + CHECK, "key 'on_deadline'")
        self.assertConfigError('[server]\non_deadline = "skip"\n' + CHECK, "key 'on_deadline'")

    def test_bad_default_action(self):
        """A default action Postfix would not accept."""
        self.assertConfigError(
            '[server]\ndefault_action = "ACCEPT"\n' + CHECK, "key 'default_action'", "ACCEPT"
        )
        self.assertConfigError('[server]\ndefault_action = ""\n' + CHECK, "key 'default_action'")

    def test_bad_restriction_class(self):
        """Restriction classes that are verbs, reserved or invalid names."""
        for name in ("REJECT", "ok", "skip", "noreply", "has space", "1x", ""):
            self.assertConfigError(
                f'[server]\nrestriction_classes = ["{name}"]\n' + CHECK,
                "key 'restriction_classes'",
            )

    def test_unknown_type(self):
        """A check type that is neither built in nor a dotted path."""
        message = self.assertConfigError(
            '[[check]]\nname = "x"\ntype = "nosuch"\n', "check 'x'", "key 'type'"
        )
        self.assertIn("demo", message)

    def test_dotted_path_does_not_import(self):
        """A dotted path naming a missing module or attribute."""
        self.assertConfigError(
            '[[check]]\nname = "x"\ntype = "nosuchmodule.policy:Relay"\n', "check 'x'", "key 'type'"
        )
        self.assertConfigError(
            f'[[check]]\nname = "x"\ntype = "{HERE}:Missing"\n', "check 'x'", "key 'type'"
        )

    def test_dotted_path_module_broken(self):
        """A dotted path to a module that fails to import is a ConfigError, not a crash."""
        os.makedirs(os.path.join(self.directory, "brokenpolicy"))
        with open(os.path.join(self.directory, "brokenpolicy", "__init__.py"), "w") as f:
            f.write("this is not python\n")
        import sys

        sys.path.insert(0, self.directory)
        self.addCleanup(sys.path.remove, self.directory)
        self.addCleanup(sys.modules.pop, "brokenpolicy", None)
        self.assertConfigError(
            '[[check]]\nname = "x"\ntype = "brokenpolicy:Check"\n', "check 'x'", "key 'type'"
        )

    def test_not_callable(self):
        """A dotted path to something that is not callable."""
        self.assertConfigError(
            f'[[check]]\nname = "x"\ntype = "{HERE}.HERE"\n', "check 'x'", "not callable"
        )

    def test_not_a_check(self):
        """A type that does not make an ICheck provider."""
        self.assertConfigError(
            f'[[check]]\nname = "x"\ntype = "{HERE}.NotACheck"\n', "check 'x'", "ICheck"
        )

    def test_check_setup_fails(self):
        """A check type that raises while being built."""
        self.assertConfigError(
            f'[[check]]\nname = "x"\ntype = "{HERE}.failing_type"\n', "check 'x'", "cannot connect"
        )

    def test_duplicate_names(self):
        """Two checks with the same name."""
        self.assertConfigError(CHECK + CHECK, "check 'one'", "key 'name'", "another check")

    def test_no_checks(self):
        """A file without checks."""
        self.assertConfigError("[server]\n", "check", "at least one")

    def test_check_not_a_list(self):
        """[check] instead of [[check]]."""
        self.assertConfigError(f'[check]\ntype = "{HERE}.OptionsCheck"\n', "[[check]]")

    def test_server_not_a_table(self):
        """server = 1."""
        self.assertConfigError("server = 1\n" + CHECK, "server", "table")

    def test_unnamed_check(self):
        """A check without a name is named by its position in errors."""
        self.assertConfigError(
            f'[[check]]\ntype = "{HERE}.OptionsCheck"\nbad = 1\n', "check 'check1'", "key 'bad'"
        )

    def test_bad_check_action(self):
        """A check's action setting that Postfix would not accept."""
        self.assertConfigError(CHECK + 'answer = "ALLOW"\n', "check 'one'", "key 'answer'")


class TableTests(ConfigTestCase):
    """
    Top-level tables other than the known ones are errors: misspelt, they
    would be silently ignored.
    """

    def test_misspelt_server(self):
        """[sever] is refused, with [server] suggested."""
        message = self.assertConfigError(
            "[sever]\nlisten = []\n" + CHECK, "[sever]", "not a table", "did you mean [server]?"
        )
        self.assertNotIn("\n", message)

    def test_misspelt_check(self):
        """[[chekc]] is refused, with [[check]] suggested."""
        self.assertConfigError(
            CHECK.replace("[[check]]", "[[chekc]]") + CHECK,
            "[[chekc]]",
            "did you mean [[check]]?",
        )

    def test_misspelt_stores(self):
        """[store.main] is refused, with [stores] suggested."""
        self.assertConfigError(
            '[store.main]\ntype = "memory"\n' + CHECK, "[store]", "did you mean [stores]?"
        )

    def test_unknown_lists_known(self):
        """A table like no known one is refused, listing the known tables."""
        self.assertConfigError(
            "[zzz]\n" + CHECK, "[zzz]", "[server], [[check]], [stores], [metrics]"
        )

    def test_known_tables(self):
        """[stores] and [metrics] are known tables, and reach checks as sections."""
        configuration = self.load(
            '[stores.main]\ntype = "memory"\n[metrics]\nlisten = "tcp:9100"\n' + CHECK
        )
        options = configuration.chain.entries[0].check.options
        self.assertEqual(options.section("metrics"), {"listen": "tcp:9100"})
        self.assertEqual(options.section("stores"), {"main": {"type": "memory"}})

    def test_server_keys_named_with_table(self):
        """Errors in [server] name the table and the key."""
        message = self.assertConfigError("[server]\ndeadlin = 3\n" + CHECK)
        self.assertIn(": [server] key 'deadlin': is not a setting", message)
        message = self.assertConfigError("[server]\nlisten = []\n" + CHECK)
        self.assertIn(": [server] key 'listen': must name", message)

    def test_server_not_a_table(self):
        """A server that is not a table names [server]."""
        self.assertConfigError('server = "x"\n' + CHECK, "[server]: must be a table")


class ListenTests(ConfigTestCase):
    """
    [server] listen: a bare number is 127.0.0.1, as with --port, and
    ports out of range are errors before start.
    """

    def test_bare_number(self):
        """listen = ["9998"] listens on 127.0.0.1, as --port 9998 does."""
        configuration = self.load('[server]\nlisten = ["9998", "unix:/tmp/x.sock"]\n' + CHECK)
        self.assertEqual(
            configuration.listen, ["tcp:9998:interface=127.0.0.1", "unix:/tmp/x.sock"]
        )
        self.assertEqual(endpoint_description("9998"), "tcp:9998:interface=127.0.0.1")
        self.assertEqual(endpoint_description("unix:/x"), "unix:/x")

    def test_port_out_of_range(self):
        """Ports out of 1-65535 in tcp, tcp6 and ssl descriptions and bare numbers."""
        for value in (
            "99999",
            "tcp:99999:interface=127.0.0.1",
            "tcp:port=70000",
            "tcp6:65536:interface=\\\\:\\\\:1",
            "ssl:0:privateKey=key.pem",
            "TCP:100000",
        ):
            message = self.assertConfigError(
                f'[server]\nlisten = ["{value}"]\n' + CHECK,
                "[server] key 'listen'",
                "out of range (1-65535)",
            )
            self.assertNotIn("\n", message)

    def test_ports_in_range(self):
        """Ports 1 and 65535 are fine, and so are other endpoint types."""
        configuration = self.load(
            '[server]\nlisten = ["tcp:1", "tcp6:port=65535", "systemd:domain=INET:index=0"]\n'
            + CHECK
        )
        self.assertEqual(len(configuration.listen), 3)

    def test_unix_directory(self):
        """With a root, a UNIX socket whose directory does not exist is reported."""
        self.assertIsNone(listen_problem("unix:/nonexistent/dir/p.sock"))
        problem = listen_problem("unix:/nonexistent/dir/p.sock", root="/")
        self.assertIn("/nonexistent/dir", problem)
        self.assertIn("does not exist", problem)
        self.assertIsNone(listen_problem(f"unix:{self.directory}/p.sock", root="/"))
        self.assertIsNone(listen_problem("unix:p.sock", root=self.directory))
        self.assertIn("missing", listen_problem("unix:missing/p.sock", root=self.directory))
        self.assertIsNone(listen_problem("unix:address=p.sock:mode=660", root=self.directory))
        self.assertIsNone(listen_problem("unix:@abstract", root=self.directory))

    def test_escapes(self):
        """Escaped colons are part of a value, as Twisted reads them."""
        self.assertIsNone(listen_problem("tcp6:9998:interface=\\:\\:1"))
        self.assertIn(
            "70000", listen_problem("tcp6:interface=\\:\\:1:port=70000")
        )


class BadActionTests(ConfigTestCase):
    """
    Actions Postfix 3.7 misreads are configuration errors naming the key.
    """

    def test_misread_actions(self):
        """A status code without text, a bare code, arguments Postfix ignores."""
        for action, reason in (
            ("REJECT 5.7.1", "no text after it"),
            ("550 5.1.1", "no text after it"),
            ("554 5.7.1 ", "no text after it"),
            ("554", "needs a text"),
            ("450", "needs a text"),
            ("PREPEND no colon", "header"),
            ("FILTER smtp", "transport:destination"),
            ("REDIRECT nobody", "user@domain"),
            ("BCC a@example.com b@example.com", "user@domain"),
        ):
            self.assertConfigError(
                f'[server]\ndefault_action = "{action}"\n' + CHECK,
                "[server] key 'default_action'",
                reason,
            )
            self.assertConfigError(
                CHECK + f'answer = "{action}"\n', "check 'one'", "key 'answer'", reason
            )
            self.assertConfigError(
                CHECK + f'on_error = "{action}"\n', "check 'one'", "key 'on_error'", reason
            )


class CheckTypeTests(ConfigTestCase):
    """
    Finding check types and building checks.
    """

    def test_builtin(self):
        """A built-in name finds its class."""
        self.assertIs(resolve_check_type("demo"), DemoCheck)

    def test_dotted_paths(self):
        """Both module:attribute and module.attribute work."""
        self.assertIs(resolve_check_type(f"{HERE}:OptionsCheck"), OptionsCheck)
        self.assertIs(resolve_check_type(f"{HERE}.OptionsCheck"), OptionsCheck)

    def test_chain_entries(self):
        """Checks are built in order with their names, timeouts and on_error."""
        configuration = self.load(
            CHECK
            + 'answer = "REJECT x"\ntimeout = 2\non_error = "skip"\n'
            + f'[[check]]\nname = "two"\ntype = "{HERE}:OptionsCheck"\non_error = "noreply"\n'
        )
        first, second = configuration.chain.entries
        self.assertEqual((first.name, first.timeout, str(first.on_error)), ("one", 2.0, "skip"))
        self.assertEqual(first.check.answer, Action("REJECT", "x"))
        self.assertEqual((second.name, str(second.on_error)), ("two", "noreply"))
        # The chain's own keys are not passed to the check.
        self.assertNotIn("timeout", first.check.options)
        self.assertNotIn("name", first.check.options)

    def test_services(self):
        """Checks and shared objects that are services are listed to be started."""
        configuration = self.load(
            f'[[check]]\nname = "a"\ntype = "{HERE}.ServiceCheck"\n'
            f'[[check]]\nname = "b"\ntype = "{HERE}.ServiceCheck"\n'
        )
        a, b = (entry.check for entry in configuration.chain.entries)
        self.assertIs(a.store, b.store)
        self.assertEqual(configuration.services, [a, b, a.store])
        for service in configuration.services:
            self.assertTrue(IService.providedBy(service))
        self.assertFalse(a.running)


class CheckOptionsTests(ConfigTestCase):
    """
    The typed getters a check type reads its table with.
    """

    def options(self, **table):
        return CheckOptions(
            table,
            name="mine",
            reactor=self.clock,
            path=os.path.join(self.directory, "pfxpold.toml"),
        )

    def assertOptionError(self, call, *parts):
        error = self.assertRaises(ConfigError, call)
        for part in ("pfxpold.toml", "check 'mine'") + parts:
            self.assertIn(part, str(error))

    def test_attributes(self):
        """name, reactor, base_directory."""
        options = self.options()
        self.assertEqual(options.name, "mine")
        self.assertIs(options.reactor, self.clock)
        self.assertEqual(options.base_directory, os.path.abspath(self.directory))

    def test_getters(self):
        """Each getter returns its typed value or default."""
        options = self.options(
            s="text", i=3, n=2, f=0.5, b=True, l=["a", "b"], one="a", t={"k": 1}, c="x"
        )
        self.assertEqual(options.string("s"), "text")
        self.assertEqual(options.integer("i", minimum=1), 3)
        self.assertEqual(options.number("n"), 2.0)
        self.assertIsInstance(options.number("n"), float)
        self.assertEqual(options.number("f", positive=True), 0.5)
        self.assertIs(options.boolean("b"), True)
        self.assertEqual(options.strings("l"), ["a", "b"])
        self.assertEqual(options.strings("one"), ["a"])
        self.assertEqual(options.table("t"), {"k": 1})
        self.assertEqual(options.choice("c", ("x", "y")), "x")
        self.assertEqual(options.string("absent", "d"), "d")
        self.assertIsNone(options.integer("absent2", None))
        self.assertEqual(options.unused(), [])

    def test_getter_errors(self):
        """Each getter refuses the wrong type, naming file, check and key."""
        options = self.options(s=1, i="1", b="yes", l=[1], t=[], c="z", neg=-1, flag=True)
        self.assertOptionError(lambda: options.string("s"), "key 's'")
        self.assertOptionError(lambda: options.integer("i"), "key 'i'")
        self.assertOptionError(lambda: options.integer("flag"), "key 'flag'")
        self.assertOptionError(lambda: options.number("flag"), "key 'flag'")
        self.assertOptionError(lambda: options.boolean("b"), "key 'b'")
        self.assertOptionError(lambda: options.strings("l"), "key 'l'")
        self.assertOptionError(lambda: options.table("t"), "key 't'")
        self.assertOptionError(lambda: options.choice("c", ("x", "y")), "key 'c'", "x, y")
        self.assertOptionError(lambda: options.integer("neg", minimum=0), "key 'neg'")
        self.assertOptionError(lambda: options.number("neg", positive=True), "key 'neg'")
        self.assertOptionError(lambda: options.string("absent"), "key 'absent'", "required")
        self.assertOptionError(lambda: options.action("s"), "key 's'")

    def test_action(self):
        """action() parses and validates an action string."""
        options = self.options(a="reject Go away", bad="PERMIT")
        self.assertEqual(options.action("a"), Action("REJECT", "Go away"))
        self.assertOptionError(lambda: options.action("bad"), "key 'bad'", "PERMIT")
        self.assertIsNone(options.action("absent", None))

    def test_path_relative_to_configuration(self):
        """Relative paths are resolved from the configuration file's folder."""
        options = self.options(rel="data/list.txt", abs="/etc/x")
        self.assertEqual(
            options.path("rel"), os.path.join(os.path.abspath(self.directory), "data/list.txt")
        )
        self.assertEqual(options.path("abs"), "/etc/x")
        self.assertIsNone(options.path("absent", None))

    def test_path_without_file(self):
        """Without a configuration file, relative paths are from the working directory."""
        options = make_options(rel="x.txt")
        self.assertEqual(options.path("rel"), os.path.join(os.getcwd(), "x.txt"))

    def test_existing_path(self):
        """
        existing_path() resolves like path() and reports a given file that
        cannot be opened, naming check and key, without creating it.
        """
        path = os.path.join(self.directory, "present.db")
        with open(path, "w") as f:
            f.write("x")
        options = CheckOptions({"database": "present.db"}, "sql", self.clock, path=path)
        self.assertEqual(options.existing_path("database"), path)
        missing = os.path.join(self.directory, "missing.db")
        options = CheckOptions({"database": "missing.db"}, "sql", self.clock, path=path)
        error = self.assertRaises(ConfigError, options.existing_path, "database")
        self.assertIn("check 'sql'", str(error))
        self.assertIn("key 'database'", str(error))
        self.assertIn(f"cannot open {missing}", str(error))
        self.assertFalse(os.path.exists(missing))
        self.assertIsNone(options.existing_path("other", None))
        self.assertEqual(options.existing_path("other", "/nonexistent/default"), "/nonexistent/default")

    def test_secret(self):
        """A secret is the first line of the file it names, never the setting itself."""
        with open(os.path.join(self.directory, "db.secret"), "w") as f:
            f.write("s3cr=t\r\nsecond line\n")
        options = self.options(password_file="db.secret", missing="nope.secret")
        self.assertEqual(options.secret("password_file"), "s3cr=t")
        self.assertOptionError(lambda: options.secret("missing"), "key 'missing'", "cannot read")
        self.assertIsNone(options.secret("absent", None))

    def test_error(self):
        """error() builds a ConfigError naming file, check and key."""
        error = self.options().error("query", "is wrong")
        self.assertIsInstance(error, ConfigError)
        self.assertIn("check 'mine': key 'query': is wrong", str(error))

    def test_unused(self):
        """Keys nobody read are reported, sorted."""
        options = self.options(b=1, a=2, c=3)
        options.raw("c")
        self.assertEqual(options.unused(), ["a", "b"])

    def test_shared(self):
        """shared() makes one object per key for every check of a configuration."""
        shared = {}
        made = []

        def make():
            made.append(object())
            return made[-1]

        first = CheckOptions({}, "a", self.clock, shared=shared)
        second = CheckOptions({}, "b", self.clock, shared=shared)
        self.assertIs(first.shared("pool", make), second.shared("pool", make))
        self.assertEqual(len(made), 1)
        self.assertIsNot(first.shared("other", make), made[0])

    def test_section(self):
        """section() returns a top-level table other than server and check."""
        configuration = self.load(
            '[stores.main]\nurl = "redis://127.0.0.1"\n'
            f'[[check]]\nname = "a"\ntype = "{HERE}.OptionsCheck"\n'
        )
        options = configuration.chain.entries[0].check.options
        self.assertEqual(options.section("stores"), {"main": {"url": "redis://127.0.0.1"}})
        self.assertEqual(options.section("absent"), {})
        self.assertNotIn("server", options._document)

    def test_section_not_a_table(self):
        """A section that is not a table is an error naming it."""
        options = CheckOptions({}, "a", self.clock, document={"stores": 1})
        error = self.assertRaises(ConfigError, options.section, "stores")
        self.assertIn("'stores'", str(error))

    def test_load_document(self):
        """load_document builds from a parsed document without a file."""
        configuration = load_document({"check": [check_table(answer="OK")]}, self.clock)
        self.assertIsNone(configuration.path)
        self.assertEqual(configuration.chain.decide(None).action, Action("OK"))
