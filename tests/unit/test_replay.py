"""
Tests for L{pfxpold.replay}: captured requests run through a configuration
on a clock that follows the captured times, the decision diff, recorded
lookups and the exit status (the command on a daemon's real capture is in
tests/integration/test_replay.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pfxpold.capture import CaptureWriter
from pfxpold.config import load_configuration
from pfxpold.interfaces import ICheck
from pfxpold.protocol import PolicyFactory
from pfxpold.replay import (
    BROKEN,
    FAILED,
    PASSED,
    Reading,
    ReplayError,
    Report,
    _RecordedFailure,
    answer_key,
    build,
    gate,
    load,
    make_parser,
    read_captures,
    refuses,
    render,
    replay,
    run,
)
from pfxpold.testing import make_request

from .tempdir import temporary_directory

#: 2026-11-24 21:00:00 UTC.
NOW = 1795554000.0

MAP_CONFIG = """
[server]
capture = "capture.jsonl"
default_action = "DUNNO"

[[check]]
name = "senders"
type = "file"
map = "{map}"
lookup = ["sender"]
"""

GREYLIST_CONFIG = """
[server]
capture = "capture.jsonl"
default_action = "DUNNO"

[stores.default]
type = "memory"

[[check]]
name = "greylist"
type = "greylist"
delay = 300
whitelist_clients = []
action = "DEFER_IF_PERMIT Greylisted"

[[check]]
name = "quota"
type = "quota"
key = ["sender"]
unit = "recipients"
stage = "RCPT"
limits = [{ period = "sliding", seconds = 600, max = 3 }]
action = "DEFER 4.7.1 Sending quota exceeded"
"""

DNSBL_CONFIG = """
[server]
capture = "capture.jsonl"
default_action = "DUNNO"

[[check]]
name = "senders"
type = "file"
map = "senders.map"
lookup = ["sender"]

[[check]]
name = "dnsbl"
type = "dnsbl"
on_error = "skip"
action = "REJECT listed"

[[check.lists]]
zone = "zen.example.net"
"""


def wire(request):
    return "".join(f"{name}={value}\n" for name, value in request.items()).encode() + b"\n"


class Harness:
    """
    A configuration served on a L{Clock} with its capture on, and replays
    of what it captured.
    """

    def __init__(self, test, config, maps=None):
        self.test = test
        self.directory = temporary_directory(test)
        for name, text in (maps or {}).items():
            with open(os.path.join(self.directory, name), "w") as f:
                f.write(text)
        self.config = self.write("pfxpold.toml", config)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.configuration = load_configuration(self.config, self.clock)
        for service in self.configuration.services:
            service.startService()
        self.factory = PolicyFactory(self.configuration.chain, self.clock, log_requests=False)
        self.capture = CaptureWriter(
            self.configuration.capture, self.clock, checks=lambda: self.configuration
        )
        self.capture.startService()
        self.factory.capture = self.capture
        self.answers = []

    def write(self, name, text):
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def send(self, at, **attributes):
        """
        Send one request at C{NOW + at} seconds; return the answer.
        """
        self.clock.advance(NOW + at - self.clock.seconds())
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(wire(make_request(**attributes)))
        answer = transport.value().decode()
        protocol.connectionLost(None)
        self.answers.append(answer)
        return answer

    def stop(self):
        self.capture.stopService()
        for service in self.configuration.services:
            service.stopService()
        return self.capture.path

    def replay(self, config=None, lookups="recorded", text=False):
        """
        Replay the capture through C{config} (default: the same).
        """
        path = self.stop() if self.capture.running else self.capture.path
        clock = Clock()
        configuration = load(config or self.config, clock)
        reading = Reading()
        captured = read_captures([path], reading)
        replayer = build(configuration, clock, lookups, reading.first_headers)
        report = Report(config or self.config, reading.files, lookups, "verb")
        replayer.services.startService()
        self.test.addCleanup(replayer.services.stopService)
        done = Deferred.fromCoroutine(replay(replayer, captured, report, Clock(), text=text))
        self.test.successResultOf(done)
        report.unreadable = reading.unreadable
        return report, replayer


class SameConfigurationTests(SynchronousTestCase):
    """
    Replayed through the configuration that answered them, captured
    requests get the same answers.
    """

    def test_map(self):
        """
        A map: no answer changes.
        """
        harness = Harness(
            self,
            MAP_CONFIG.format(map="senders.map"),
            {"senders.map": "spam@example.com REJECT spam\nfriend@example.com OK\n"},
        )
        for index, sender in enumerate(
            ["spam@example.com", "friend@example.com", "other@example.com"] * 5
        ):
            harness.send(index, sender=sender)
        report, _ = harness.replay()
        self.assertEqual(report.requests, 15)
        self.assertEqual(report.changed, 0)
        self.assertEqual(
            dict(report.pairs), {("REJECT", "REJECT"): 5, ("OK", "OK"): 5, ("DUNNO", "DUNNO"): 5}
        )
        self.assertEqual(gate(report, 0.0, True), [])

    def test_greylist_and_quota(self):
        """
        Greylisting and a sliding-window quota give the answers they gave
        live, since the replay's clock follows the captured times: a first
        attempt deferred, a retry too early deferred, one after the delay
        passed, and the quota's fourth recipient in ten minutes deferred.
        """
        harness = Harness(self, GREYLIST_CONFIG)
        timeline = [
            (0, "r1@example.net"),
            (1, "r2@example.net"),
            (2, "r3@example.net"),
            (3, "r4@example.net"),
            (100, "r1@example.net"),
            (400, "r1@example.net"),
            (410, "r2@example.net"),
            (420, "r3@example.net"),
            (430, "r4@example.net"),
            (1100, "r4@example.net"),
        ]
        for at, recipient in timeline:
            harness.send(
                at, sender="alice@example.com", recipient=recipient, client_address="192.0.2.7"
            )
        verbs = [answer_key(a.removeprefix("action=").strip()) for a in harness.answers]
        self.assertEqual(
            verbs,
            ["DEFER_IF_PERMIT"] * 5 + ["DUNNO"] * 3 + ["DEFER", "DUNNO"],
        )
        report, _ = harness.replay()
        self.assertEqual(report.requests, len(timeline))
        self.assertEqual(report.changed, 0, report.samples)

    def test_redacted_capture(self):
        """
        With local parts hashed in the capture, greylisting and a quota
        per sender, and a map by sender domain, are reproduced (the same
        local part hashes alike); a map entry for a whole address is not,
        as the README says.
        """
        config = GREYLIST_CONFIG.replace(
            'default_action = "DUNNO"\n',
            'default_action = "DUNNO"\ncapture_hash_local_parts = true\n',
        ).replace(
            '[[check]]\nname = "greylist"',
            '[[check]]\nname = "domains"\ntype = "file"\nmap = "domains.map"\n'
            'lookup = ["sender_domain"]\n\n[[check]]\nname = "greylist"',
        )
        maps = {"domains.map": "spam.example REJECT spam domain\n"}
        harness = Harness(self, config, maps)
        timeline = [
            (0, "alice@example.com", "r1@example.net"),
            (1, "alice@example.com", "r2@example.net"),
            (2, "alice@example.com", "r3@example.net"),
            (3, "alice@example.com", "r4@example.net"),
            (4, "bob@example.com", "r1@example.net"),
            (5, "x@spam.example", "r1@example.net"),
            (400, "alice@example.com", "r1@example.net"),
            (401, "alice@example.com", "r2@example.net"),
            (402, "alice@example.com", "r3@example.net"),
            (403, "alice@example.com", "r4@example.net"),
            (404, "bob@example.com", "r1@example.net"),
        ]
        for at, sender, recipient in timeline:
            harness.send(at, sender=sender, recipient=recipient, client_address="192.0.2.7")
        verbs = [answer_key(a.removeprefix("action=").strip()) for a in harness.answers]
        # Greylisted first; after the delay alice's fourth recipient is
        # over her quota of 3, while bob's first is counted apart.
        self.assertEqual(
            verbs,
            ["DEFER_IF_PERMIT"] * 5 + ["REJECT"] + ["DUNNO"] * 3 + ["DEFER", "DUNNO"],
        )
        path = harness.stop()
        with open(path) as f:
            text = f.read()
        self.assertNotIn("alice", text)
        self.assertNotIn("bob", text)
        report, _ = harness.replay()
        self.assertEqual(report.requests, len(timeline))
        self.assertEqual(report.changed, 0, report.samples)

        # A map entry for alice's whole address would refuse her mail
        # live; her hashed address in the capture matches no entry.
        harness.write("domains.map", "alice@example.com REJECT no alice\n")
        whole = harness.write("whole.toml", config.replace('"sender_domain"', '"sender"'))
        report, _ = harness.replay(whole)
        live = load_configuration(whole, Clock()).chain.decide(
            make_request(sender="alice@example.com")
        )
        self.assertEqual(str(live.action), "REJECT no alice")
        self.assertEqual(report.requests, len(timeline))
        # Only the spam domain's request changes (its entry is gone).
        self.assertEqual(report.changed, 1)
        self.assertEqual(report.pairs[("REJECT", "DEFER_IF_PERMIT")], 1)

    def test_greylist_timing_matters(self):
        """
        The captured times matter: replayed with a longer delay, the retry
        that passed after 400 seconds is deferred.
        """
        harness = Harness(self, GREYLIST_CONFIG)
        harness.send(0, sender="alice@example.com", client_address="192.0.2.7")
        harness.send(400, sender="alice@example.com", client_address="192.0.2.7")
        self.assertEqual(harness.answers[1], "action=DUNNO\n\n")
        longer = harness.write("longer.toml", GREYLIST_CONFIG.replace("delay = 300", "delay = 600"))
        report, _ = harness.replay(longer)
        self.assertEqual(report.changed, 1)
        self.assertEqual(dict(report.causes), {("default", "greylist"): 1})
        self.assertEqual(report.accept_to_refuse, 1)


class PrivateStoresTests(SynchronousTestCase):
    """
    Replay never touches the production stores.
    """

    def test_sqlite_replaced(self):
        """
        A configuration's SQLite store is replaced by a memory store: its
        file is not created by a replay.
        """
        directory = temporary_directory(self)
        config = os.path.join(directory, "pfxpold.toml")
        with open(config, "w") as f:
            f.write(
                GREYLIST_CONFIG.replace(
                    'type = "memory"', 'type = "sqlite"\npath = "state.sqlite3"'
                )
            )
        clock = Clock()
        replayer = build(load(config, clock), clock, "recorded", [])
        replayer.services.startService()
        replayer.services.stopService()
        self.assertFalse(os.path.exists(os.path.join(directory, "state.sqlite3")))


class ChangedMapTests(SynchronousTestCase):
    """
    Replayed through a changed map, exactly the requests the change
    concerns change.
    """

    def setUp(self):
        self.harness = Harness(
            self,
            MAP_CONFIG.format(map="senders.map"),
            {"senders.map": "spam@example.com REJECT spam\nfriend@example.com OK\n"},
        )
        for index, sender in enumerate(
            ["spam@example.com", "friend@example.com", "other@example.com", "new@example.com"] * 3
        ):
            self.harness.send(index, sender=sender, client_address=f"192.0.2.{index}")
        self.harness.write(
            "new.map",
            "spam@example.com REJECT spam\nfriend@example.com OK\nnew@example.com REJECT new\n"
            "other@example.com 450 4.7.1 later\n",
        )
        self.new = self.harness.write("new.toml", MAP_CONFIG.format(map="new.map"))

    def test_differences(self):
        """
        The changed senders' answers change, counted by (old, new) answer,
        by deciding check, and by sender; samples show them.
        """
        report, _ = self.harness.replay(self.new)
        self.assertEqual(report.requests, 12)
        self.assertEqual(report.changed, 6)
        self.assertEqual(report.pairs["DUNNO", "REJECT"], 3)
        self.assertEqual(report.pairs["DUNNO", "450"], 3)
        self.assertEqual(report.pairs["REJECT", "REJECT"], 3)
        self.assertEqual(dict(report.causes), {("default", "senders"): 6})
        self.assertEqual(
            dict(report.senders), {"new@example.com": 3, "other@example.com": 3}
        )
        self.assertEqual(report.accept_to_refuse, 6)
        self.assertEqual(len(report.clients), 6)
        self.assertEqual(report.samples[0]["sender"], "other@example.com")
        self.assertEqual(report.samples[0]["new"], "450 4.7.1 later")
        self.assertEqual(report.samples[0]["new_by"], "senders")

    def test_shadow_never_decides(self):
        """
        A check that is a shadow in the new configuration decides nothing
        in the replay either, as it would decide nothing live: what it
        refused or accepted in the capture now gets the default answer, and
        its new map's entries refuse nothing.
        """
        shadow = self.harness.write(
            "shadow.toml", MAP_CONFIG.format(map="new.map") + "shadow = true\n"
        )
        report, _ = self.harness.replay(shadow)
        self.assertEqual(report.requests, 12)
        self.assertEqual(
            dict(report.pairs),
            {("DUNNO", "DUNNO"): 6, ("REJECT", "DUNNO"): 3, ("OK", "DUNNO"): 3},
        )

    def test_render(self):
        """
        The printed report has the table of answers, the causes, the top
        changed senders and the samples.
        """
        report, _ = self.harness.replay(self.new)
        text = render(report, 5)
        self.assertIn("changed: 6 (50.00%), accept -> refuse: 6", text)
        self.assertIn("DUNNO   ->  REJECT      3", text)
        self.assertIn("default  ->  senders      6", text)
        self.assertIn("new@example.com    3", text)
        self.assertIn("from=<other@example.com>", text)
        self.assertIn("DUNNO (default) -> 450 4.7.1 later (senders)", text)

    def test_gate(self):
        """
        The gate fails on a share of changes above C{--max-changed}, and on
        an answer changed from accepting to refusing unless told not to.
        """
        report, _ = self.harness.replay(self.new)
        self.assertEqual(len(gate(report, None, True)), 1)
        self.assertEqual(gate(report, None, False), [])
        self.assertEqual(gate(report, 0.5, False), [])
        self.assertIn("50.00% of answers changed", gate(report, 0.4, False)[0])


class AnswerTests(SynchronousTestCase):
    """
    How answers are compared and classed.
    """

    def test_keys(self):
        """
        Answers compare by verb or status code, or whole text.
        """
        self.assertEqual(answer_key("REJECT go away"), "REJECT")
        self.assertEqual(answer_key("reject"), "REJECT")
        self.assertEqual(answer_key("450 4.7.1 later"), "450")
        self.assertEqual(answer_key(None), "no reply")
        self.assertEqual(answer_key("REJECT go away", text=True), "REJECT go away")

    def test_refuses(self):
        """
        REJECT, DEFER..., HOLD, DISCARD and 4xx/5xx codes refuse; OK,
        DUNNO, PREPEND, no reply do not.
        """
        for answer in ("REJECT x", "DEFER x", "DEFER_IF_PERMIT x", "HOLD", "DISCARD", "554 5.7.1 no",
                       "450 4.7.1 later"):
            self.assertTrue(refuses(answer), answer)
        for answer in ("OK", "DUNNO", "PREPEND X-A: b", "FILTER smtp:x", None, "permit_class"):
            self.assertFalse(refuses(answer), answer)


class RecordedLookupTests(SynchronousTestCase):
    """
    With C{--lookups recorded}, an unchanged lookup answers what the
    capture recorded, without asking its backend.
    """

    def capture(self, directory, lines):
        from pfxpold.capture import check_fingerprints

        configuration = load_configuration(os.path.join(directory, "pfxpold.toml"), Clock())
        header = {"pfxpold_capture": 1, "checks": check_fingerprints(configuration)}
        path = os.path.join(directory, "capture.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps(header) + "\n")
            for line in lines:
                f.write(json.dumps(line) + "\n")
        return path

    def line(self, t, sender, answer, by, verdicts):
        return {
            "t": t,
            "request": dict(make_request(sender=sender)),
            "answer": answer,
            "by": by,
            "verdicts": verdicts,
        }

    def test_recorded_verdicts(self):
        """
        The DNS list's recorded verdicts are used; a request the old chain
        decided before asking it has none and counts as unrecorded; a
        recorded failure applies the check's on_error.
        """
        directory = temporary_directory(self)
        with open(os.path.join(directory, "senders.map"), "w") as f:
            f.write("spam@example.com REJECT spam\n")
        with open(os.path.join(directory, "pfxpold.toml"), "w") as f:
            f.write(DNSBL_CONFIG)
        path = self.capture(
            directory,
            [
                self.line(NOW, "a@example.com", "REJECT listed", "dnsbl",
                          [["senders", "DUNNO"], ["dnsbl", "REJECT listed"]]),
                self.line(NOW + 1, "b@example.com", "DUNNO", "default",
                          [["senders", "DUNNO"], ["dnsbl", "DUNNO"]]),
                self.line(NOW + 2, "spam@example.com", "REJECT spam", "senders",
                          [["senders", "REJECT spam"]]),
                self.line(NOW + 3, "c@example.com", "DUNNO", "default",
                          [["senders", "DUNNO"], ["dnsbl", "error"]]),
            ],
        )
        # The new map no longer rejects spam@: the DNS list is reached.
        with open(os.path.join(directory, "senders.map"), "w") as f:
            f.write("other@example.com REJECT other\n")
        clock = Clock()
        configuration = load(os.path.join(directory, "pfxpold.toml"), clock)
        reading = Reading()
        captured = read_captures([path], reading)
        replayer = build(configuration, clock, "recorded", reading.first_headers)
        self.assertEqual(replayer.live_checks, [])
        report = Report("x", reading.files, "recorded", "verb")
        self.successResultOf(Deferred.fromCoroutine(replay(replayer, captured, report, Clock())))
        [dnsbl] = replayer.recorded
        self.assertEqual((dnsbl.used, dnsbl.unrecorded, dnsbl.live), (3, 1, 0))
        self.assertEqual(report.changed, 1)
        self.assertEqual(dict(report.pairs)["REJECT", "DUNNO"], 1)
        self.assertEqual(len(self.flushLoggedErrors(_RecordedFailure)), 1)

    def test_changed_lookup_goes_live(self):
        """
        A lookup whose settings changed since the capture is asked live.
        """
        directory = temporary_directory(self)
        with open(os.path.join(directory, "senders.map"), "w") as f:
            f.write("")
        with open(os.path.join(directory, "pfxpold.toml"), "w") as f:
            f.write(DNSBL_CONFIG)
        path = self.capture(directory, [])
        with open(os.path.join(directory, "pfxpold.toml"), "w") as f:
            f.write(DNSBL_CONFIG.replace("zen.example.net", "other.example.net"))
        clock = Clock()
        configuration = load(os.path.join(directory, "pfxpold.toml"), clock)
        reading = Reading()
        list(read_captures([path], reading))
        replayer = build(configuration, clock, "recorded", reading.first_headers)
        self.assertEqual(replayer.live_checks, ["dnsbl"])


class CommandTests(SynchronousTestCase):
    """
    The command: its report, JSON, and exit statuses.
    """

    def setUp(self):
        self.harness = Harness(
            self,
            MAP_CONFIG.format(map="senders.map"),
            {"senders.map": "spam@example.com REJECT spam\n"},
        )
        for index, sender in enumerate(["spam@example.com", "other@example.com"] * 4):
            self.harness.send(index, sender=sender)
        self.path = self.harness.stop()

    def run_command(self, *argv):
        arguments = make_parser().parse_args(list(argv))
        out, self.err = io.StringIO(), io.StringIO()
        status = self.successResultOf(
            Deferred.fromCoroutine(run(Clock(), arguments, out, self.err))
        )
        return status, out.getvalue()

    def test_same(self):
        """
        The same configuration: exit status 0, nothing changed.
        """
        status, out = self.run_command("--config", self.harness.config, self.path)
        self.assertEqual(status, PASSED)
        self.assertIn("replayed 8 requests from 1 file(s)", out)
        self.assertIn("changed: 0 (0.00%)", out)

    def test_refusing_change_fails(self):
        """
        An accepted answer now refused: exit status 1, unless
        C{--no-fail-on-refuse} and within C{--max-changed}.
        """
        new = self.harness.write("new.toml", MAP_CONFIG.format(map="new.map"))
        self.harness.write("new.map", "other@example.com REJECT other\n")
        status, out = self.run_command("--config", new, self.path)
        self.assertEqual(status, FAILED)
        self.assertEqual(
            self.err.getvalue(),
            "pfxpold-replay: failed: 4 answers changed from accepting to refusing\n",
        )
        status, out = self.run_command(
            "--config", new, "--no-fail-on-refuse", "--max-changed", "100%", self.path
        )
        self.assertEqual(status, PASSED)
        status, out = self.run_command(
            "--config", new, "--no-fail-on-refuse", "--max-changed", "0.4", self.path
        )
        self.assertEqual(status, FAILED)

    def test_json(self):
        """
        C{--json} prints the report as one JSON document.
        """
        self.harness.write("new.map", "other@example.com OK\n")
        new = self.harness.write("new.toml", MAP_CONFIG.format(map="new.map"))
        status, out = self.run_command("--config", new, "--json", self.path)
        document = json.loads(out)
        self.assertEqual(status, PASSED)
        self.assertEqual(document["requests"], 8)
        self.assertEqual(document["changed"], 8)
        self.assertEqual(document["accept_to_refuse"], 0)
        self.assertIn({"old": "REJECT", "new": "DUNNO", "count": 4}, document["answers"])
        self.assertIn({"old": "DUNNO", "new": "OK", "count": 4}, document["answers"])

    def test_bad_configuration(self):
        """
        A configuration that cannot be loaded is a L{ReplayError} (exit
        status 2) with its one-line error.
        """
        bad = self.harness.write("bad.toml", "[server]\ncapture_keep = 2\n")
        arguments = make_parser().parse_args(["--config", bad, self.path])
        failure = self.failureResultOf(
            Deferred.fromCoroutine(run(Clock(), arguments, io.StringIO())), ReplayError
        )
        self.assertIn("capture_keep", str(failure.value))
        self.assertEqual(BROKEN, 2)

    def test_unreadable_lines(self):
        """
        Lines that are not captured requests are skipped and counted.
        """
        with open(self.path, "a") as f:
            f.write("not json\n{\"t\": 1}\n")
        status, out = self.run_command("--config", self.harness.config, self.path)
        self.assertIn("unreadable lines skipped: 2", out)

    def test_missing_capture(self):
        """
        A capture that cannot be read is a L{ReplayError}.
        """
        arguments = make_parser().parse_args(
            ["--config", self.harness.config, os.path.join(self.harness.directory, "nothing")]
        )
        self.failureResultOf(
            Deferred.fromCoroutine(run(Clock(), arguments, io.StringIO())), ReplayError
        )

    def test_share_argument(self):
        """
        C{--max-changed} takes a fraction or a percentage between 0 and 1.
        """
        parser = make_parser()
        self.assertEqual(parser.parse_args(["-c", "x", "--max-changed", "1%", "y"]).max_changed,
                         0.01)
        self.assertEqual(parser.parse_args(["-c", "x", "--max-changed", "0.2", "y"]).max_changed,
                         0.2)
        self.patch(argparse.ArgumentParser, "exit", lambda *a, **k: (_ for _ in ()).throw(
            ValueError("exit")))
        self.assertRaises(ValueError, parser.parse_args, ["-c", "x", "--max-changed", "2", "y"])


@implementer(ICheck)
class Hanging:
    """
    A check whose answer never comes (a backend that hangs).
    """

    def __init__(self, options):
        self.asked = 0

    def check(self, request):
        self.asked += 1
        return Deferred()


HANGING_CONFIG = """
[server]
deadline = 5.0
on_deadline = "DEFER_IF_PERMIT Service temporarily unavailable"

[[check]]
name = "hanging"
type = "tests.unit.test_replay.Hanging"
timeout = 10.0
"""


class WaitingTests(SynchronousTestCase):
    """
    A check that does not answer at once is waited for on the real
    reactor, within the chain's deadline in real time.
    """

    def test_deadline(self):
        """
        A check that never answers is given up after the chain's deadline
        (of the reactor's time): the replay answers C{on_deadline} and goes
        on with the next request.
        """
        directory = temporary_directory(self)
        config = os.path.join(directory, "pfxpold.toml")
        with open(config, "w") as f:
            f.write(HANGING_CONFIG)
        capture = os.path.join(directory, "capture.jsonl")
        with open(capture, "w") as f:
            for t in (NOW, NOW + 1):
                f.write(json.dumps({"t": t, "request": dict(make_request()), "answer": "DUNNO",
                                    "by": "default", "verdicts": []}) + "\n")
        clock, reactor = Clock(), Clock()
        reading = Reading()
        replayer = build(load(config, clock), clock, "recorded", [])
        report = Report(config, [capture], "recorded", "verb")
        done = Deferred.fromCoroutine(
            replay(replayer, read_captures([capture], reading), report, reactor)
        )
        self.assertNoResult(done)
        self.assertEqual(report.requests, 0)
        reactor.advance(5)
        self.assertNoResult(done)
        self.assertEqual(report.requests, 1)
        reactor.advance(5)
        self.successResultOf(done)
        self.assertEqual(report.requests, 2)
        self.assertEqual(dict(report.pairs), {("DUNNO", "DEFER_IF_PERMIT"): 2})
        self.assertEqual(dict(report.causes), {("default", "deadline"): 2})
        self.assertEqual(reactor.getDelayedCalls(), [])
