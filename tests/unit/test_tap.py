"""
Tests for L{pfxpold.tap}: the command line of C{twistd pfxpold} and the
service it makes.
"""

import io
import os
import sys

from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.checks.demo import DemoCheck
from pfxpold.service import CollectorTuning, PolicyService
from pfxpold.tap import Options, endpoint_description, makeService
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
            error = self.assertRaises(usage.UsageError, self.parse, "--port", bad)
            self.assertIn(repr(bad), str(error))

    def test_invalid_listen_in_config(self):
        """An invalid endpoint in the configuration is a usage error too."""
        path = self.write(
            '[server]\nlisten = ["bogus:1"]\n'
            + GOOD.split("[server]")[0]
            + BAD.replace("answr", "answer")
        )
        error = self.assertRaises(usage.UsageError, self.parse, "--config", path)
        self.assertIn("bogus:1", str(error))


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
        """A bad configuration is a usage error naming file, check and key."""
        path = self.write(BAD)
        error = self.assertRaises(usage.UsageError, self.parse, "--config", path)
        self.assertIn(path, str(error))
        self.assertIn("check 'first'", str(error))
        self.assertIn("key 'answr'", str(error))

    def test_config_missing(self):
        """A missing file is a usage error naming it."""
        path = os.path.join(self.directory, "nope.toml")
        error = self.assertRaises(usage.UsageError, self.parse, "-c", path)
        self.assertIn(path, str(error))

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

    def test_check_config_bad(self):
        """--check-config with a bad file is a usage error (twistd exits 1)."""
        path = self.write(BAD)
        error = self.assertRaises(usage.UsageError, self.parse, "--check-config", "--config", path)
        self.assertIn("key 'answr'", str(error))

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
