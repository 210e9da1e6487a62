"""
Tests for L{pfxpold.tap}: the command line of C{twistd pfxpold} and the
service it makes.
"""

import io
import os
import signal
import sys

from twisted.application.service import Application
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogLevel, capturedLogs
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.checks.demo import DemoCheck
from pfxpold.interfaces import ICheck, IConfigWarnings
from pfxpold.logger import OffersLogObserver, mail_syslog
from pfxpold.requestlog import EventRequestLog, FileRequestLog
from pfxpold.service import CollectorTuning, PolicyService
from pfxpold.tap import (
    Options,
    endpoint_description,
    install_startup_error_hook,
    makeService,
    probe_listen,
)
from tests.unit.tempdir import temporary_directory

GOOD = """
[server]
listen = ["tcp:7001:interface=127.0.0.1"]
default_action = "DUNNO"

[[check]]
name = "first"
type = "tests.unit.test_config.OptionsCheck"
answer = "REJECT no"
timeout = 2.5
on_error = "skip"
"""

BAD = """
[[check]]
name = "first"
type = "tests.unit.test_config.OptionsCheck"
answr = "REJECT no"
"""


@implementer(ICheck, IConfigWarnings)
class WarningCheck:
    """
    A check type with warnings of its own, as the rules check has.
    """

    def __init__(self, options):
        self.options = options

    def check(self, request):
        return "DUNNO"

    def config_warnings(self):
        return ["rule 'b' can never match: rule 'a' always matches first", "second line"]


class TapTestCase(SynchronousTestCase):
    """
    Options parsed against a L{MemoryReactor}.
    """

    def setUp(self):
        self.reactor = MemoryReactor()
        self.directory = temporary_directory(self)
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "PFXPOLD_CONFIG"})

    def write(self, text, name="pfxpold.toml"):
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def parse(self, *arguments):
        options = Options(reactor=self.reactor)
        with capturedLogs():
            options.parseOptions(list(arguments))
        return options

    def assertOneLineError(self, *arguments):
        """
        Parsing C{arguments} stops with one line for stderr (SystemExit
        with a message: exit status 1), not twistd's usage text.

        @return: the line.
        """
        error = self.assertRaises(SystemExit, self.parse, *arguments)
        self.assertIsInstance(error.code, str)
        self.assertNotIn("\n", error.code)
        self.assertNotIn("Usage", error.code)
        return error.code


class EndpointTests(TapTestCase):
    """
    --port takes a port number or endpoint strings.
    """

    def test_bare_port(self):
        """A bare port number listens on 127.0.0.1 only."""
        self.assertEqual(endpoint_description("9998"), "tcp:9998:interface=127.0.0.1")
        self.assertEqual(
            self.parse("--port", "9998").configuration.listen, ["tcp:9998:interface=127.0.0.1"]
        )

    def test_endpoint_strings(self):
        """Endpoint strings are taken as given, several make several listeners."""
        options = self.parse(
            "--port", "unix:/tmp/pfxpold.sock", "-p", "tcp6:9998:interface=\\:\\:1", "--port", "25"
        )
        self.assertEqual(
            options.configuration.listen,
            ["unix:/tmp/pfxpold.sock", "tcp6:9998:interface=\\:\\:1", "tcp:25:interface=127.0.0.1"],
        )

    def test_port_replaces_listen(self):
        """--port replaces the configuration's listen."""
        options = self.parse("--config", self.write(GOOD), "--port", "7002")
        self.assertEqual(options.configuration.listen, ["tcp:7002:interface=127.0.0.1"])

    def test_invalid_endpoint(self):
        """An invalid endpoint is a usage error naming it."""
        for bad in (
            "nosuch:1",
            "tcp:notaport",
            "tcp",
            "tcp:1:backlog=x",
            # Outside systemd socket activation there is no socket 0.
            "systemd:domain=INET:index=0",
            "ssl:443:privateKey=/nonexistent/key.pem",
        ):
            message = self.assertOneLineError("--port", bad)
            self.assertTrue(message.startswith(f"pfxpold: --port {bad!r}: "), message)

    def test_systemd_socket_not_passed(self):
        """
        A systemd endpoint without the socket systemd would pass says so in
        words, not as Python's IndexError.
        """
        self.patch(os, "environ", {})
        message = self.assertOneLineError("--port", "systemd:domain=INET:index=0")
        self.assertIn("systemd passed no socket at that index", message)
        self.assertNotIn("IndexError", message)

    def test_invalid_listen_in_config(self):
        """An invalid endpoint in the configuration names file, [server] and key."""
        path = self.write(
            '[server]\nlisten = ["bogus:1"]\n'
            + GOOD.split("[server]")[0]
            + BAD.replace("answr", "answer")
        )
        message = self.assertOneLineError("--config", path)
        self.assertTrue(message.startswith(f"{path}: [server] key 'listen': 'bogus:1': "), message)

    def test_port_out_of_range(self):
        """--port 99999 and tcp:70000 are refused in one line naming --port."""
        message = self.assertOneLineError("--port", "99999")
        self.assertEqual(
            message,
            "pfxpold: --port 'tcp:99999:interface=127.0.0.1': port 99999 is out of range (1-65535)",
        )
        message = self.assertOneLineError("--port", "7001", "--port", "tcp6:port=70000")
        self.assertIn("--port 'tcp6:port=70000'", message)

    def test_port_out_of_range_in_config(self):
        """A port out of range in listen names the file, [server] and listen."""
        path = self.write(GOOD.replace("tcp:7001:", "tcp:99999:"))
        message = self.assertOneLineError("--check-config", "--config", path)
        self.assertEqual(
            message,
            f"{path}: [server] key 'listen': 'tcp:99999:interface=127.0.0.1':"
            " port 99999 is out of range (1-65535)",
        )

    def test_bare_number_in_config(self):
        """listen = ["7005"] means 127.0.0.1:7005, as --port 7005 does."""
        options = self.parse("--config", self.write(GOOD.replace("tcp:7001:interface=127.0.0.1", "7005")))
        self.assertEqual(options.configuration.listen, ["tcp:7005:interface=127.0.0.1"])

    def test_unix_socket_directory_missing(self):
        """A UNIX socket in a directory that does not exist is refused before start."""
        missing = os.path.join(self.directory, "missing", "p.sock")
        message = self.assertOneLineError("--port", f"unix:{missing}")
        self.assertIn(f"--port 'unix:{missing}'", message)
        self.assertIn(f"{os.path.dirname(missing)} does not exist", message)
        path = self.write(GOOD.replace("tcp:7001:interface=127.0.0.1", f"unix:{missing}"))
        message = self.assertOneLineError("--check-config", "--config", path)
        self.assertTrue(message.startswith(f"{path}: [server] key 'listen': "), message)

    def test_unix_socket_relative_to_rundir_and_chroot(self):
        """Relative socket paths are looked for where twistd will bind them."""
        os.mkdir(os.path.join(self.directory, "run"))
        os.mkdir(os.path.join(self.directory, "jail-only"))
        for twistd, good in (
            ({"rundir": self.directory, "chroot": None}, "run/p.sock"),
            ({"rundir": ".", "chroot": self.directory}, "run/p.sock"),
            ({"rundir": "/run", "chroot": self.directory}, "p.sock"),
            # Absolute paths are inside the jail too (Postfix's private/).
            ({"rundir": ".", "chroot": self.directory}, "/jail-only/p.sock"),
        ):
            options = Options(reactor=self.reactor)
            options.parent = twistd
            with capturedLogs():
                options.parseOptions(["--port", f"unix:{good}"])
            options = Options(reactor=self.reactor)
            options.parent = twistd
            error = self.assertRaises(
                SystemExit, options.parseOptions, ["--port", "unix:nowhere/p.sock"]
            )
            self.assertIn("does not exist", error.code)


class ConfigOptionTests(TapTestCase):
    """
    --config, PFXPOLD_CONFIG and --check-config.
    """

    def test_default_demo(self):
        """Without --config: the demo check on 127.0.0.1:9998."""
        options = self.parse()
        self.assertEqual(options.configuration.listen, ["tcp:9998:interface=127.0.0.1"])
        [entry] = options.configuration.chain.entries
        self.assertIsInstance(entry.check, DemoCheck)
        self.assertIs(options.reactor, self.reactor)

    def test_config(self):
        """--config loads the file, with the options' reactor."""
        options = self.parse("--config", self.write(GOOD))
        [entry] = options.configuration.chain.entries
        self.assertEqual(entry.name, "first")
        self.assertIs(entry.check.options.reactor, self.reactor)

    def test_config_error(self):
        """A bad configuration is one line naming file, check and key, not a usage error."""
        path = self.write(BAD)
        message = self.assertOneLineError("--config", path)
        self.assertEqual(
            message, f"{path}: check 'first': key 'answr': is not a setting of this check type"
        )

    def test_config_missing(self):
        """A missing file is one line naming it."""
        path = os.path.join(self.directory, "nope.toml")
        message = self.assertOneLineError("-c", path)
        self.assertTrue(message.startswith(f"{path}: cannot read"), message)

    def test_misspelt_table(self):
        """A misspelt table is one line naming it, with a suggestion."""
        path = self.write(GOOD.replace("[server]", "[sever]"))
        message = self.assertOneLineError("--check-config", "--config", path)
        self.assertEqual(
            message, f"{path}: [sever]: is not a table pfxpold knows; did you mean [server]?"
        )

    def test_load_raises_an_exception(self):
        """
        load() itself raises an Exception with the one line, never
        SystemExit: a caller such as a reload survives a broken file.
        """
        options = self.parse("--config", self.write(GOOD))
        with open(options["config"], "w", encoding="utf-8") as f:
            f.write(GOOD.replace("[server]", "[sever]"))
        error = self.assertRaises(usage.UsageError, options.load, self.reactor)
        self.assertIn("[sever]: is not a table pfxpold knows", str(error))

    def test_unknown_option_is_usage_error(self):
        """A genuine command-line mistake is still twistd's usage error."""
        self.assertRaises(usage.UsageError, self.parse, "--prot", "9998")

    def test_environment(self):
        """PFXPOLD_CONFIG names the file when --config is not given, read at parse time."""
        os.environ["PFXPOLD_CONFIG"] = self.write(GOOD)
        options = self.parse()
        self.assertEqual(options.configuration.chain.entries[0].name, "first")

    def test_option_beats_environment(self):
        """--config wins over PFXPOLD_CONFIG."""
        os.environ["PFXPOLD_CONFIG"] = self.write(BAD, "bad.toml")
        options = self.parse("--config", self.write(GOOD))
        self.assertEqual(options.configuration.path, os.path.join(self.directory, "pfxpold.toml"))

    def test_check_config_good(self):
        """--check-config prints a summary and exits 0."""
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        error = self.assertRaises(
            SystemExit, self.parse, "--check-config", "--config", self.write(GOOD)
        )
        self.assertEqual(error.code, 0)
        text = output.getvalue()
        self.assertIn(": OK", text)
        self.assertIn("check first: OptionsCheck, timeout 2.5s, on_error skip", text)
        self.assertIn("default action: DUNNO", text)
        self.assertIn("tcp:7001:interface=127.0.0.1", text)

    def test_check_config_warnings(self):
        """
        --check-config prints each IConfigWarnings provider's warnings on
        stderr as "warning: CHECK: ..." lines, and still exits 0.
        """
        table = os.path.join(self.directory, "helo.pcre")
        with open(table, "w", encoding="utf-8") as f:
            f.write("/^dsl/ REJECT dynamic\n/.*/ DUNNO\n/^dyn/ REJECT never\n")
        configuration = GOOD + f"""
[[check]]
name = "warns"
type = "tests.unit.test_tap.WarningCheck"

[[check]]
name = "helo"
type = "file"
format = "pcre"
map = "{table}"
lookup = ["helo_name"]
"""
        output, errors = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", output)
        self.patch(sys, "stderr", errors)
        error = self.assertRaises(
            SystemExit, self.parse, "--check-config", "--config", self.write(configuration)
        )
        self.assertEqual(error.code, 0)
        self.assertIn(": OK", output.getvalue())
        self.assertEqual(
            errors.getvalue().splitlines(),
            [
                "warning: warns: rule 'b' can never match: rule 'a' always matches first",
                "warning: warns: second line",
                f"warning: helo: {table}:3: never matches: the rule on line 2 matches every"
                " value first",
            ],
        )

    def test_check_config_stage_warnings(self):
        """
        --check-config warns about an answer of a check's map that the
        declared Postfix does not honour where the check runs, and still
        exits 0.
        """
        table = os.path.join(self.directory, "late.map")
        with open(table, "w", encoding="utf-8") as f:
            f.write("a@example.com PREPEND X-Late: yes\nb@example.com REJECT no\n")
        configuration = GOOD.replace("[server]\n", '[server]\npostfix_version = "3.7"\n') + f"""
[[check]]
name = "late"
type = "file"
map = "{table}"
lookup = ["sender"]
"""
        output, errors = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", output)
        self.patch(sys, "stderr", errors)
        error = self.assertRaises(
            SystemExit, self.parse, "--check-config", "--config", self.write(configuration)
        )
        self.assertEqual(error.code, 0)
        [line] = errors.getvalue().splitlines()
        self.assertTrue(
            line.startswith(f"warning: late: can answer PREPEND ({table}), which Postfix 3.7"),
            line,
        )
        self.assertIn(
            'at END-OF-MESSAGE: ignored ("action PREPEND must be used before'
            ' smtpd_end_of_data_restrictions")',
            line,
        )
        self.assertTrue(
            line.endswith("(on_error = DEFER_IF_PERMIT Service temporarily unavailable)"), line
        )

    def test_check_config_bad(self):
        """--check-config with a bad file is one line (exit status 1)."""
        path = self.write(BAD)
        message = self.assertOneLineError("--check-config", "--config", path)
        self.assertIn("key 'answr'", message)

    def test_adopt_hidden(self):
        """--adopt, for worker processes only, is not in --help but still works."""
        options = Options(reactor=self.reactor)
        self.assertNotIn("adopt", options.getUsage())
        self.assertIn("--check-config", options.getUsage())
        self.assertIn("--workers", str(options))
        self.assertIn("adopt=", options.longOpt)
        options = self.parse("--adopt", "3:INET")
        self.assertEqual(options["adopt"], ["3:INET"])

    def test_version(self):
        """--version prints the version and exits 0."""
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        error = self.assertRaises(SystemExit, self.parse, "--version")
        self.assertEqual(error.code, 0)
        self.assertTrue(output.getvalue().startswith("pfxpold "))


class MakeServiceTests(TapTestCase):
    """
    makeService builds the service tree the options describe.
    """

    def start(self, service):
        """
        Start C{service}; stop its backends when the test ends, which
        undoes the garbage collector's tuning.
        """
        with capturedLogs():
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.backends.stopService)

    def test_collector_tuned(self):
        """
        The daemon tunes the garbage collector, as its last backend: once
        every check has started.
        """
        service = makeService(self.parse(), self.reactor)
        self.assertIsInstance(list(service.backends)[-1], CollectorTuning)

    def test_listeners(self):
        """Listeners are bound where asked, on start, with the policy factory."""
        options = self.parse("--port", "7003", "--port", "unix:/tmp/pfxpold-test.sock")
        service = makeService(options, self.reactor)
        self.assertIsInstance(service, PolicyService)
        self.assertEqual(self.reactor.tcpServers, [])
        self.start(service)
        [(port, factory, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (7003, "127.0.0.1"))
        self.assertIs(factory, service.factory)
        [(path, unix_factory, *_)] = self.reactor.unixServers
        self.assertEqual(path, "/tmp/pfxpold-test.sock")
        self.assertIs(unix_factory, service.factory)

    def test_tcp6(self):
        """A tcp6 endpoint listens on the IPv6 interface given."""
        options = self.parse("--port", "tcp6:7004:interface=\\:\\:1")
        service = makeService(options, self.reactor)
        self.start(service)
        [(port, _, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (7004, "::1"))

    def test_reuses_configuration(self):
        """Under twistd (no reactor given), the configuration parsed is used, not rebuilt."""
        options = self.parse("--config", self.write(GOOD))
        service = makeService(options)
        self.assertIs(service.configuration, options.configuration)
        self.assertIs(service.reactor, self.reactor)

    def test_other_reactor_rebuilds(self):
        """Given another reactor, the checks are built again with it."""
        options = self.parse("--config", self.write(GOOD))
        other = MemoryReactor()
        service = makeService(options, other)
        self.assertIsNot(service.configuration, options.configuration)
        self.assertIs(service.configuration.chain.entries[0].check.options.reactor, other)


class StartupErrorTests(TapTestCase):
    """
    Start-up errors are one line on stderr: a probe before twistd
    daemonizes, and a hook for a listener that fails when started anyhow.
    """

    def setUp(self):
        super().setUp()
        self.previous = []
        self.hook = lambda *exc_info: self.previous.append(exc_info)
        self.patch(sys, "excepthook", self.hook)
        self.stderr = io.StringIO()
        self.patch(sys, "__stderr__", self.stderr)

    def test_hook_one_line(self):
        """A CannotListenError reaching the top is one line naming the endpoint."""
        install_startup_error_hook(["unix:/run/p.sock", "tcp:9998:interface=127.0.0.1"])
        error = CannotListenError("127.0.0.1", 9998, OSError(98, "Address already in use"))
        with capturedLogs() as events:
            sys.excepthook(CannotListenError, error, None)
        self.assertEqual(
            self.stderr.getvalue(),
            "pfxpold: cannot listen on tcp:9998:interface=127.0.0.1: address already in use\n",
        )
        self.assertEqual(self.previous, [])
        self.assertTrue([e for e in events if "9998" in e.get("startup_error", "")])

    def test_hook_unix(self):
        """A UNIX socket's failure names its description."""
        install_startup_error_hook(["unix:/run/p.sock"])
        error = CannotListenError(None, "/run/p.sock", OSError(2, "No such file or directory"))
        with capturedLogs():
            sys.excepthook(CannotListenError, error, None)
        self.assertEqual(
            self.stderr.getvalue(),
            "pfxpold: cannot listen on unix:/run/p.sock: no such file or directory\n",
        )

    def test_hook_other_exceptions(self):
        """Other exceptions go to the hook there was."""
        install_startup_error_hook(["tcp:9998"])
        error = RuntimeError("x")
        sys.excepthook(RuntimeError, error, None)
        self.assertEqual(self.previous, [(RuntimeError, error, None)])
        self.assertEqual(self.stderr.getvalue(), "")

    def test_probe_unix_socket_exists(self):
        """
        With lockfile=0, a UNIX socket path that exists is in use (Twisted
        would fail to bind it).
        """
        path = os.path.join(self.directory, "p.sock")
        self.assertIsNone(probe_listen(f"unix:{path}:lockfile=0", "/"))
        with open(path, "w"):
            pass
        problem = probe_listen(f"unix:{path}:lockfile=0", "/")
        self.assertEqual(
            problem,
            f"cannot listen on unix:{path}:lockfile=0: address already in use ({path} exists)",
        )
        self.assertIsNotNone(probe_listen("unix:p.sock:lockfile=0", self.directory))

    def test_probe_unix_lock(self):
        """
        With its lock file (the default), a socket left behind is no
        problem (Twisted replaces it) unless a live process holds the lock;
        the probe never takes the lock itself.
        """
        path = os.path.join(self.directory, "p.sock")
        with open(path, "w"):
            pass
        self.assertIsNone(probe_listen(f"unix:{path}", "/"))
        os.symlink("999999999", path + ".lock")
        self.assertIsNone(probe_listen(f"unix:{path}", "/"))
        os.remove(path + ".lock")
        os.symlink(str(os.getpid()), path + ".lock")
        self.assertEqual(
            probe_listen(f"unix:{path}", "/"),
            f"cannot listen on unix:{path}: address already in use (by pid {os.getpid()})",
        )
        self.assertEqual(os.readlink(path + ".lock"), str(os.getpid()))
        self.assertIsNotNone(probe_listen("unix:p.sock", self.directory))

    def test_probe_not_without_twistd(self):
        """
        Outside twistd (no parent options), makeService neither probes nor
        installs the hook: a unit test's ports are a MemoryReactor's.
        """
        path = os.path.join(self.directory, "p.sock")
        with open(path, "w"):
            pass
        makeService(self.parse("--port", f"unix:{path}:lockfile=0"), self.reactor)
        self.assertIs(sys.excepthook, self.hook)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_hangup_ignored_until_served(self):
        """
        Under twistd, a SIGHUP between makeService and the service's start
        (a large map loading) is ignored, not fatal. SIGUSR1 is left at its
        default: twistd installs its log rotation handler only over that.
        """
        for number in (signal.SIGHUP, signal.SIGUSR1):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
            signal.signal(number, signal.SIG_DFL)
        options = Options(reactor=self.reactor)
        options.parent = {"rundir": ".", "chroot": None}
        with capturedLogs():
            options.parseOptions(["--port", f"unix:{self.directory}/free.sock"])
        makeService(options, self.reactor)
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_IGN)
        self.assertEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)

    def test_probe_under_twistd(self):
        """Under twistd, makeService stops in one line when a listener's place is taken."""
        path = os.path.join(self.directory, "p.sock")
        with open(path, "w"):
            pass
        options = Options(reactor=self.reactor)
        options.parent = {"rundir": ".", "chroot": None}
        with capturedLogs():
            options.parseOptions(["--port", f"unix:{path}:lockfile=0"])
        error = self.assertRaises(SystemExit, makeService, options, self.reactor)
        self.assertEqual(
            error.code,
            f"pfxpold: cannot listen on unix:{path}:lockfile=0:"
            f" address already in use ({path} exists)",
        )


class TwistdLogTests(TapTestCase):
    """
    Under twistd, makeService sends request lines to twistd's log in
    batches where the log is made of pfxpold's observers, and offers twistd
    the observer for its log file or standard output.
    """

    def setUp(self):
        super().setUp()
        self.patch(sys, "excepthook", sys.excepthook)
        for number in (signal.SIGHUP, signal.SIGUSR1):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
            signal.signal(number, signal.SIG_DFL)

    def make(self, *arguments, **twistd):
        options = Options(reactor=self.reactor)
        options.parent = {"rundir": ".", "chroot": None, "logfile": None, "nodaemon": True}
        options.parent.update(twistd)
        with capturedLogs():
            options.parseOptions(["--port", f"unix:{self.directory}/p.sock", *arguments])
        return makeService(options, self.reactor)

    def test_logfile(self):
        """
        --logfile: batches, and the application gets an observer writing
        them to that file as twistd's own lines.
        """
        path = os.path.join(self.directory, "twistd.log")
        service = self.make(logfile=path)
        self.assertIsInstance(service.factory.request_log, EventRequestLog)
        application = Application("pfxpold")
        service.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.addCleanup(observer.output.close)
        observer(dict(log_format="hello", log_namespace="x", log_level=LogLevel.info, log_time=0))
        with open(path) as f:
            self.assertTrue(f.read().endswith(" [x#info] hello\n"))

    def test_standard_output(self):
        """-n without a log file: batches, to standard output."""
        service = self.make()
        self.assertIsInstance(service.factory.request_log, EventRequestLog)
        application = Application("pfxpold")
        service.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver).output, sys.stdout)

    def test_syslog(self):
        """twistd's --syslog: each request an event of its own, twistd's observer."""
        service = self.make(syslog=True)
        self.assertIsNone(service.factory.request_log)
        application = Application("pfxpold")
        service.setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))

    def test_mail_syslog(self):
        """--logger pfxpold.logger.mail_syslog: batches, twistd makes that observer."""
        service = self.make(logger=mail_syslog)
        self.assertIsInstance(service.factory.request_log, EventRequestLog)
        application = Application("pfxpold")
        service.setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))

    def test_request_log_file(self):
        """A request_log file keeps the lines, under twistd too."""
        path = self.write(GOOD.replace("[server]\n", '[server]\nrequest_log = "requests.log"\n'))
        service = self.make("--config", path)
        self.assertIsInstance(service.factory.request_log, FileRequestLog)

    def test_workers_parent(self):
        """With --workers, the parent's top service offers the observer."""
        top = self.make("--workers", "2")
        self.assertIsInstance(top, OffersLogObserver)
        application = Application("pfxpold")
        top.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver).output, sys.stdout)
        [policy] = [s for s in top if isinstance(s, PolicyService)]
        self.assertIsInstance(policy.factory.request_log, EventRequestLog)

    def test_worker(self):
        """A worker (--adopt) logs its request lines in batches too."""
        fd = os.open(os.devnull, os.O_RDONLY)
        service = self.make("--adopt", f"{fd}:INET")
        self.assertIsInstance(service.factory.request_log, EventRequestLog)
        self.assertIsNotNone(service.log_observer_factory)
