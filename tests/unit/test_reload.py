"""
Tests for L{pfxpold.reload} and the reuse of unchanged checks and stores
by L{pfxpold.config.load_document}.
"""

from __future__ import annotations

import copy
import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold import workers
from pfxpold.config import ConfigError, default_configuration, load_document
from pfxpold.interfaces import ICheck
from pfxpold.reload import Reloader, ServiceSet, SignalService, check_changes
from pfxpold.service import PolicyService
from pfxpold.state import store_for

from .test_workers import FakeEndpoint, FakePort, ProcessReactor

PATH = "/etc/pfxpold/pfxpold.toml"

#: Deferreds of verify() calls a test fires itself.
PENDING: list[Deferred[None]] = []


@implementer(ICheck)
class StubCheck(Service):
    """
    Answers C{answer}; optionally uses a store, fails to start or to
    verify, or verifies only when the test fires C{PENDING}.
    """

    def __init__(self, options):
        self.answer = options.string("answer", "DUNNO")
        self.fail_start = options.boolean("fail_start", False)
        self.verify_with = options.string("verify", "ok")
        self.store = store_for(options) if "store" in options else None
        self.stopped = 0

    def startService(self):
        if self.fail_start:
            raise RuntimeError("no backend")
        Service.startService(self)

    def stopService(self):
        self.stopped += 1
        return Service.stopService(self)

    def verify(self):
        if self.verify_with == "fail":
            return fail(OSError("unable to open database file"))
        if self.verify_with == "pending":
            PENDING.append(Deferred())
            return PENDING[-1]
        return succeed(None)

    def check(self, request):
        return self.answer


STUB = f"{__name__}.StubCheck"


def check(name: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "type": STUB, **settings}


def document(*checks: dict[str, Any], **top: Any) -> dict[str, Any]:
    server = {"listen": ["tcp:7101:interface=127.0.0.1"], "log_requests": False}
    server.update(top.pop("server", {}))
    return {"server": server, "check": list(checks), **top}


class ReuseTests(SynchronousTestCase):
    """
    L{load_document} with C{previous} keeps what did not change.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()

    def load(self, doc, previous=None):
        return load_document(copy.deepcopy(doc), self.clock, PATH, previous)

    def test_unchanged_check_is_the_same_object(self):
        """
        A check whose table did not change is the previous object; one
        whose table changed is new.
        """
        first = self.load(document(check("a", answer="OK"), check("b", answer="OK")))
        second = self.load(document(check("a", answer="OK"), check("b", answer="REJECT")), first)
        self.assertIs(second.chain.entries[0].check, first.chain.entries[0].check)
        self.assertIsNot(second.chain.entries[1].check, first.chain.entries[1].check)
        self.assertEqual(second.chain.entries[1].check.answer, "REJECT")

    def test_chain_settings_keep_the_object(self):
        """
        A changed timeout, on_error or place in the chain keeps the check
        object; check_changes reports it apart from rebuilt checks.
        """
        first = self.load(document(check("a"), check("b")))
        second = self.load(document(check("b"), check("a", timeout=3, on_error="skip")), first)
        self.assertIs(second.chain.entries[1].check, first.chain.entries[0].check)
        self.assertEqual(second.chain.entries[1].timeout, 3)
        changes = check_changes(first, second)
        self.assertEqual(changes["retuned"], ["b", "a"])
        self.assertEqual(changes["changed"], [])

    def test_type_and_restriction_classes_matter(self):
        """
        Another restriction class list rebuilds checks (their actions were
        parsed with it).
        """
        first = self.load(document(check("a")))
        second = self.load(document(check("a"), server={"restriction_classes": ["vip"]}), first)
        self.assertIsNot(second.chain.entries[0].check, first.chain.entries[0].check)

    def test_store_reused_by_a_changed_check(self):
        """
        A changed check keeps using the unchanged store: the very object,
        counters and all.
        """
        stores = {"mem": {"type": "memory"}}
        first = self.load(document(check("q", store="mem", answer="OK"), stores=stores))
        second = self.load(document(check("q", store="mem", answer="REJECT"), stores=stores), first)
        old, new = first.chain.entries[0].check, second.chain.entries[0].check
        self.assertIsNot(new, old)
        self.assertIs(new.store, old.store)
        self.assertEqual([r.value for r in second.shared.values()], [old.store])
        self.assertIn(old.store, second.services)

    def test_changed_store_rebuilds_its_checks(self):
        """
        A store whose settings changed is new, and so are the checks that
        use it, though their own tables did not change; a check using
        another store is kept.
        """
        stores = {"mem": {"type": "memory"}, "other": {"type": "memory"}}
        doc = document(check("q", store="mem"), check("r", store="other"), stores=stores)
        first = self.load(doc)
        changed = copy.deepcopy(doc)
        changed["stores"]["mem"]["expire_interval"] = 60
        second = self.load(changed, first)
        self.assertIsNot(second.chain.entries[0].check, first.chain.entries[0].check)
        self.assertIsNot(second.chain.entries[0].check.store, first.chain.entries[0].check.store)
        self.assertIs(second.chain.entries[1].check, first.chain.entries[1].check)

    def test_new_store_leaves_others_alone(self):
        """
        Adding a store to [stores] keeps the checks and stores that do not
        use it.
        """
        stores = {"mem": {"type": "memory"}}
        first = self.load(document(check("q", store="mem"), stores=stores))
        more = {"mem": {"type": "memory"}, "new": {"type": "memory"}}
        second = self.load(
            document(check("q", store="mem"), check("n", store="new"), stores=more), first
        )
        self.assertIs(second.chain.entries[0].check, first.chain.entries[0].check)
        self.assertIsNot(second.chain.entries[1].check.store, first.chain.entries[0].check.store)

    def test_error_leaves_previous_alone(self):
        """
        A document with an error raises ConfigError, and the previous
        configuration is as it was.
        """
        first = self.load(document(check("a")))
        records = dict(first.checks)
        with self.assertRaises(ConfigError):
            self.load(document(check("a"), check("b", misspelt=1)), first)
        self.assertEqual(first.checks, records)


class ReloaderTests(SynchronousTestCase):
    """
    L{Reloader} validates, starts what is new, swaps the chain and stops
    what was replaced once requests on the old chain are answered.
    """

    def setUp(self):
        del PENDING[:]
        self.reactor = MemoryReactorClock()
        self.next = document(check("a", answer="OK"), check("b", answer="DUNNO"))
        self.configuration = self.load(None)
        self.service = PolicyService(self.configuration, self.reactor)
        self.reloader = Reloader(self.service, self.load, self.reactor)
        self.service.reloader = self.reloader
        with capturedLogs():
            self.service.privilegedStartService()
            self.service.startService()

    def load(self, previous):
        return load_document(copy.deepcopy(self.next), self.reactor, PATH, previous)

    def reload(self, doc):
        self.next = doc
        with capturedLogs() as events:
            ok = self.successResultOf(self.reloader.reload())
        return ok, events

    def test_success_swaps_the_chain(self):
        """
        New requests go to the new chain; the counters and the one log line
        say what changed.
        """
        old_chain = self.service.factory.decider
        self.reactor.advance(100)
        ok, events = self.reload(document(check("a", answer="REJECT"), check("c")))
        self.assertTrue(ok)
        self.assertIsNot(self.service.factory.decider, old_chain)
        self.assertIs(self.service.configuration.chain, self.service.factory.decider)
        self.assertEqual((self.reloader.reloads_succeeded, self.reloader.reloads_failed), (1, 0))
        self.assertEqual(self.reloader.last_reload_time, 100)
        self.assertTrue(self.reloader.last_reload_ok)
        [line] = [e for e in events if "changes" in e]
        self.assertEqual(line["added"], "c")
        self.assertEqual(line["removed"], "b")
        self.assertEqual(line["changed"], "a")

    def test_demo_configuration_kept(self):
        """
        Without a configuration file, a reload keeps the demo check as it
        is: nothing changed.
        """
        first = default_configuration(self.reactor)
        second = default_configuration(self.reactor, first)
        self.assertIs(second.chain.entries[0].check, first.chain.entries[0].check)

    def test_metrics_change_needs_a_restart(self):
        """
        A [metrics] table added by a reload is logged as taking effect on
        restart, and the configuration in force keeps metrics off.
        """
        ok, events = self.reload(document(check("a"), metrics={"listen": "9101"}))
        self.assertTrue(ok)
        [warning] = [e for e in events if "[metrics] changed" in e.get("log_format", "")]
        self.assertEqual(warning["endpoint"], "metrics stay off")
        self.assertIsNone(self.service.configuration.metrics_listen)

    def test_log_rotation_change_needs_a_restart(self):
        """
        twistd's log file was opened at start: a reload that changes
        log_max_bytes or log_keep says it takes effect on restart, and the
        configuration in force keeps the settings the file has.
        """
        ok, events = self.reload(document(check("a"), server={"log_keep": 3}))
        self.assertTrue(ok)
        [warning] = [e for e in events if "log_keep changed" in e.get("log_format", "")]
        self.assertEqual(warning["keep"], "all")
        self.assertEqual(self.service.configuration.log_keep, 0)

    def test_failure_changes_nothing(self):
        """
        A broken file leaves the chain, the services and the listeners as
        they were, and is one error line naming the file, check and key.
        """
        chain = self.service.factory.decider
        ok, events = self.reload(document(check("a"), check("b", misspelt=1)))
        self.assertFalse(ok)
        self.assertIs(self.service.factory.decider, chain)
        self.assertIs(self.service.configuration, self.configuration)
        self.assertEqual((self.reloader.reloads_succeeded, self.reloader.reloads_failed), (0, 1))
        self.assertFalse(self.reloader.last_reload_ok)
        [error] = [e for e in events if e["log_level"].name == "error"]
        self.assertEqual(
            error["error"],
            f"{PATH}: check 'b': key 'misspelt': is not a setting of this check type",
        )

    def test_unexpected_error_is_a_failure(self):
        """
        A bug while swapping is logged and counted as a failed reload, and
        the next SIGHUP reloads again.
        """

        def broken(*args):
            raise ZeroDivisionError()

        self.reloader._swap = broken
        ok, events = self.reload(document(check("a", answer="REJECT")))
        self.assertFalse(ok)
        self.assertEqual(self.reloader.reloads_failed, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        del self.reloader._swap
        ok, _ = self.reload(document(check("a", answer="REJECT")))
        self.assertTrue(ok)

    def test_new_checks_start_before_the_swap_and_old_ones_stop(self):
        """
        A changed check's successor is running when the chain is swapped;
        the replaced one stops, and an unchanged one keeps running.
        """
        old_a, old_b = (entry.check for entry in self.configuration.chain.entries)
        ok, _ = self.reload(document(check("a", answer="REJECT"), check("b", answer="DUNNO")))
        new_a, new_b = (entry.check for entry in self.service.configuration.chain.entries)
        self.assertTrue(ok)
        self.assertTrue(new_a.running)
        self.assertIs(new_b, old_b)
        self.assertTrue(old_b.running)
        self.assertEqual(old_b.stopped, 0)
        self.assertFalse(old_a.running)
        self.assertEqual(old_a.stopped, 1)
        # The daemon stopping stops the checks in force, once each.
        self.service.stopService()
        self.assertEqual((old_a.stopped, new_a.stopped, old_b.stopped), (1, 1, 1))

    def test_start_failure_changes_nothing(self):
        """
        A new check that cannot start fails the reload; nothing new keeps
        running.
        """
        chain = self.service.factory.decider
        ok, events = self.reload(
            document(
                check("a", answer="OK"), check("b", answer="DUNNO"), check("c", fail_start=True)
            )
        )
        self.assertFalse(ok)
        self.assertIs(self.service.factory.decider, chain)
        [error] = [e for e in events if e["log_level"].name == "error"]
        self.assertIn("check 'c': cannot start: RuntimeError: no backend", error["error"])

    def test_verify_failure_stops_what_started(self):
        """
        A new check whose files or databases cannot be opened fails the
        reload, and the new objects started for it are stopped again.
        """
        chain = self.service.factory.decider
        ok, events = self.reload(
            document(check("a", answer="OK"), check("b", answer="DUNNO"), check("c", verify="fail"))
        )
        self.assertFalse(ok)
        self.assertIs(self.service.factory.decider, chain)
        [error] = [e for e in events if e["log_level"].name == "error"]
        self.assertIn("check 'c': cannot be opened: unable to open database file", error["error"])
        self.assertEqual(len(self.service.checks.members), 2)

    def test_replaced_checks_stop_after_requests_in_flight(self):
        """
        A request in flight on the old chain is answered by it; the check
        it replaced stops only then.
        """
        old_a = self.configuration.chain.entries[0].check
        waiting: Deferred[str] = Deferred()
        old_a.check = lambda request: waiting
        protocol = self.service.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"request=smtpd_access_policy\n\n")
        self.assertEqual(self.service.factory.in_flight, 1)
        ok, _ = self.reload(document(check("a", answer="REJECT"), check("b")))
        self.assertTrue(ok)
        self.assertTrue(old_a.running)
        protocol.dataReceived(b"request=smtpd_access_policy\n\n")
        waiting.callback("OK old")
        self.assertEqual(transport.value(), b"action=OK old\n\naction=REJECT\n\n")
        self.assertFalse(old_a.running)
        self.successResultOf(self.reloader.retiring)

    def test_replaced_checks_stop_after_the_old_deadline(self):
        """
        A request that never ends does not keep a replaced check running
        past the old chain's deadline.
        """
        old_a = self.configuration.chain.entries[0].check
        self.service.factory.in_flight = 1
        ok, _ = self.reload(document(check("a", answer="REJECT"), check("b")))
        self.assertTrue(ok)
        self.assertTrue(old_a.running)
        with capturedLogs():
            self.reactor.advance(self.configuration.chain.deadline)
        self.assertFalse(old_a.running)

    def test_reload_during_reload_runs_again(self):
        """
        SIGHUP while a reload waits for a new check's verify() runs one
        more reload after it, which sees the newest file.
        """
        self.next = document(check("a", verify="pending"))
        first = self.reloader.reload()
        self.next = document(check("z", answer="REJECT"))
        second = self.reloader.reload()
        third = self.reloader.reload()
        self.assertNoResult(first)
        with capturedLogs():
            PENDING[0].callback(None)
        self.assertTrue(self.successResultOf(first))
        self.assertTrue(self.successResultOf(second))
        self.assertTrue(self.successResultOf(third))
        self.assertEqual(self.reloader.reloads_succeeded, 2)
        self.assertEqual([e.name for e in self.service.configuration.chain.entries], ["z"])

    def test_listen_changes(self):
        """
        An added endpoint is listened on, a removed one closed; the
        connections stay.
        """
        self.assertEqual([server[0] for server in self.reactor.tcpServers], [7101])
        [old_port] = [p for p in self.service.listeners]
        ok, events = self.reload(
            document(check("a"), check("b"), server={"listen": ["tcp:7102:interface=127.0.0.1"]})
        )
        self.assertTrue(ok)
        self.assertEqual([server[0] for server in self.reactor.tcpServers], [7101, 7102])
        self.assertEqual(list(self.service.listening), ["tcp:7102:interface=127.0.0.1"])
        self.assertFalse(old_port.running)
        self.assertEqual(len(list(self.service.listeners)), 1)

    def test_listen_failure_keeps_the_listeners(self):
        """
        When a new endpoint cannot be bound (a privileged port after
        --uid), the listeners stay as they were and the log says so; the
        checks are still reloaded.
        """

        def refuse(port, factory, backlog=50, interface=""):
            raise CannotListenError(interface, port, PermissionError(13, "Permission denied"))

        self.reactor.listenTCP = refuse
        ok, events = self.reload(
            document(check("a", answer="REJECT"), server={"listen": ["tcp:25:interface=127.0.0.1"]})
        )
        self.assertTrue(ok)
        self.assertEqual(self.service.configuration.listen, ["tcp:7101:interface=127.0.0.1"])
        self.assertEqual(list(self.service.listening), ["tcp:7101:interface=127.0.0.1"])
        [error] = [e for e in events if e["log_level"].name == "error"]
        self.assertIn("Permission denied", error["reason"])
        self.assertEqual(self.service.configuration.chain.entries[0].check.answer, "REJECT")

    def test_workers_told_after_the_parent(self):
        """
        A parent with workers reloads itself, then sends SIGHUP to each
        worker; a listen change is left for a restart, and logged.
        """
        reactor = ProcessReactor()
        recorder = workers.RecordingEndpoint(FakeEndpoint(FakePort(7)))
        self.successResultOf(recorder.listen(object()))
        pool = workers.WorkerPool(reactor, 3, [recorder], [], stop_timeout=1.0)
        pool.startService()
        self.reloader.pool = pool
        ok, events = self.reload(
            document(check("a"), server={"listen": ["tcp:7102:interface=127.0.0.1"]})
        )
        self.assertTrue(ok)
        self.assertEqual([spawned[5].signals for spawned in reactor.spawned], [[signal.SIGHUP]] * 2)
        self.assertEqual(self.service.configuration.listen, ["tcp:7101:interface=127.0.0.1"])
        self.assertTrue([e for e in events if "restart pfxpold" in e["log_format"]])
        # A parent whose reload failed tells nobody.
        self.reload(document(check("a", misspelt=1)))
        self.assertEqual([spawned[5].signals for spawned in reactor.spawned], [[signal.SIGHUP]] * 2)


class ServiceSetTests(SynchronousTestCase):
    """
    L{ServiceSet} starts and stops its members and takes running ones.
    """

    def test_members(self):
        """
        Members start and stop with the set; an adopted member is not
        started again; a retired one is stopped once.
        """
        first, second, adopted = Service(), Service(), Service()
        services = ServiceSet([first, second])
        services.startService()
        self.assertTrue(first.running and second.running)
        adopted.startService()
        services.adopt(adopted)
        self.successResultOf(services.retire(first))
        self.assertFalse(first.running)
        self.successResultOf(services.retire(first))
        self.successResultOf(services.stopService())
        self.assertFalse(second.running or adopted.running)


class FakeReactor:
    """
    Runs what a signal handler hands to the reactor thread at once.
    """

    def __init__(self):
        self.calls = []

    def callFromThread(self, function, *args):
        self.calls.append(function)
        function(*args)


class FakeReloader:
    def __init__(self):
        self.reloads = 0

    def reload(self):
        self.reloads += 1
        return succeed(True)


class FakeRequestLog:
    path = "/var/log/pfxpold/requests.log"

    def __init__(self):
        self.reopened = 0

    def reopen_if_moved(self):
        self.reopened += 1


class SignalServiceTests(SynchronousTestCase):
    """
    L{SignalService} handles SIGHUP, and SIGUSR1 where twistd does not.
    """

    def make(self, usr1, request_log=None):
        self.handlers = {signal.SIGHUP: signal.SIG_DFL, signal.SIGUSR1: usr1}
        self.reactor = FakeReactor()
        self.reloader = FakeReloader()
        return SignalService(
            self.reactor,
            self.reloader,
            lambda: request_log,
            install=self.handlers.__setitem__,
            getsignal=self.handlers.get,
        )

    def test_sighup_reloads(self):
        """SIGHUP runs a reload in the reactor thread; stop restores the default."""
        service = self.make(signal.SIG_DFL)
        service.startService()
        self.handlers[signal.SIGHUP](signal.SIGHUP, None)
        self.assertEqual(self.reloader.reloads, 1)
        service.stopService()
        self.assertEqual(self.handlers[signal.SIGHUP], signal.SIG_DFL)

    def test_sigusr1_where_twistd_does_not_rotate(self):
        """
        With no handler of twistd's, SIGUSR1 reopens the request log and is
        logged; stop puts the default back.
        """
        request_log = FakeRequestLog()
        service = self.make(signal.SIG_DFL, request_log)
        service.startService()
        with capturedLogs() as events:
            self.handlers[signal.SIGUSR1](signal.SIGUSR1, None)
        self.assertEqual(request_log.reopened, 1)
        self.assertTrue([e for e in events if "SIGUSR1" in e["log_format"]])
        service.stopService()
        self.assertEqual(self.handlers[signal.SIGUSR1], signal.SIG_DFL)

    def test_sigusr1_without_request_log(self):
        """Without a request log file SIGUSR1 is only logged."""
        service = self.make(None)
        service.startService()
        with capturedLogs() as events:
            self.handlers[signal.SIGUSR1](signal.SIGUSR1, None)
        self.assertTrue([e for e in events if "nothing to rotate" in e["log_format"]])

    def test_twistd_rotation_stays(self):
        """twistd's own SIGUSR1 handler (it logs to a file) is left alone."""

        def rotate(number, frame):
            pass

        service = self.make(rotate)
        service.startService()
        self.assertIs(self.handlers[signal.SIGUSR1], rotate)
        service.stopService()
        self.assertIs(self.handlers[signal.SIGUSR1], rotate)
