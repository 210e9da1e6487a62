"""
Tests for L{pfxpold.capture}: the capture written in batches, rotated by
size, compressed, redacted, following a moved file, and hooked into the
protocol and the configuration.
"""

import gzip
import json
import os

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.action import Action
from pfxpold.capture import (
    KEY_VARIABLE,
    CaptureWriter,
    Redactor,
    check_fingerprints,
    redaction_key,
    worker_path,
)
from pfxpold.chain import Decision
from pfxpold.config import CaptureSettings, ConfigError, load_document
from pfxpold.protocol import PolicyFactory
from pfxpold.testing import make_request

from .tempdir import temporary_directory

#: 2026-11-24 21:00:00 UTC, well inside a second.
NOW = 1795554000.25


def read_lines(path):
    """
    The capture's lines, each request's values turned back into a
    C{"request"} object with the names its header lists.
    """
    opener = gzip.open if path.endswith(".gz") else open
    lines = []
    with opener(path, "rt", encoding="ascii") as f:
        for text in f:
            line = json.loads(text)
            if "names" in line:
                names = line["names"]
            if "values" in line:
                values = line.pop("values")
                line = {"t": line["t"], "request": dict(zip(names, values, strict=True)), **line}
            lines.append(line)
    return lines


class BrokenFile:
    """
    A file whose writes fail the way a full disk does.
    """

    def write(self, text):
        raise OSError(28, "No space left on device")

    def writelines(self, texts):
        raise OSError(28, "No space left on device")

    def flush(self):
        pass

    def close(self):
        pass


class CaptureTestCase(SynchronousTestCase):
    """
    A capture file's path in a directory of the test's own, a clock at
    C{NOW}, and a decision with two checks' verdicts.
    """

    def setUp(self):
        self.directory = temporary_directory(self)
        self.path = os.path.join(self.directory, "capture.jsonl")
        self.clock = Clock()
        self.clock.advance(NOW)
        self.decision = Decision(
            Action.parse("REJECT go away"),
            "senders",
            [("clients", "DUNNO"), ("senders", "REJECT go away")],
        )


class CaptureWriterTests(CaptureTestCase):
    """
    L{CaptureWriter} keeps answered requests and writes them as JSON lines
    on its timer, when enough wait, and when it stops.
    """

    def writer(self, **settings):
        writer = CaptureWriter(
            CaptureSettings(self.path, **settings),
            self.clock,
            key=b"k" * 32,
            in_thread=lambda work: work(),
        )
        writer.startService()
        self.addCleanup(lambda: writer.running and writer.stopService())
        return writer

    def test_line(self):
        """
        A line holds the time the request was complete, every attribute,
        the answer, the deciding check and each check's verdict; the file
        starts with a header line.
        """
        writer = self.writer()
        request = make_request(sender="alice@example.com")
        writer.record(request, self.decision, NOW - 0.5)
        self.clock.advance(1)
        header, line = read_lines(self.path)
        self.assertEqual(header["pfxpold_capture"], 1)
        self.assertEqual(
            line,
            {
                "t": NOW - 0.5,
                "request": dict(request),
                "answer": "REJECT go away",
                "by": "senders",
                "verdicts": [["clients", "DUNNO"], ["senders", "REJECT go away"]],
            },
        )

    def test_no_reply(self):
        """
        A request closed without a reply is captured with a null answer.
        """
        writer = self.writer()
        writer.record(make_request(), Decision(None, "deadline"), NOW)
        writer.flush()
        self.assertIsNone(read_lines(self.path)[1]["answer"])

    def test_hostile_values(self):
        """
        Control characters and non-ASCII text in attributes are escaped in
        the JSON, one line per request, and read back as they were.
        """
        writer = self.writer()
        sender = "a\nb\x1b[31m\u2028c@example.com"
        writer.record(make_request(sender=sender), self.decision, NOW)
        writer.flush()
        with open(self.path, encoding="ascii") as f:
            self.assertEqual(len(f.read().splitlines()), 2)
        self.assertEqual(read_lines(self.path)[1]["request"]["sender"], sender)

    def test_other_attributes(self):
        """
        The header names the first request's attributes and lines hold
        their values; a request with other attributes is written whole,
        names and values.
        """
        writer = self.writer()
        first = make_request()
        other = make_request(tls_sni="mx.example.com")
        writer.record(first, self.decision, NOW)
        writer.record(other, self.decision, NOW)
        writer.flush()
        with open(self.path, encoding="ascii") as f:
            header, one, two = (json.loads(line) for line in f)
        self.assertEqual(header["names"], list(first))
        self.assertEqual(one["values"], list(first.values()))
        self.assertEqual(two["request"], dict(other))

    def test_written_on_timer(self):
        """
        Nothing is written on the answer's path: lines appear when the
        timer fires.
        """
        writer = self.writer()
        writer.record(make_request(), self.decision, NOW)
        self.assertEqual(os.path.getsize(self.path), 0)
        self.clock.advance(1)
        self.assertEqual(len(read_lines(self.path)), 2)

    def test_written_when_buffer_full(self):
        """
        When C{max_buffered} requests wait, they are written at once.
        """
        writer = CaptureWriter(CaptureSettings(self.path), self.clock, max_buffered=3)
        writer.startService()
        self.addCleanup(writer.stopService)
        for _ in range(3):
            writer.record(make_request(), self.decision, NOW)
        self.assertEqual(len(read_lines(self.path)), 4)

    def test_stop_flushes(self):
        """
        Stopping writes what waits and closes the file.
        """
        writer = self.writer()
        writer.record(make_request(), self.decision, NOW)
        writer.stopService()
        self.assertEqual(len(read_lines(self.path)), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_header_after_reload(self):
        """
        A new header line follows a change of the configuration in force.
        """
        configurations = [object()]
        writer = CaptureWriter(
            CaptureSettings(self.path),
            self.clock,
            checks=lambda: configurations[0],
            describe=lambda configuration: {
                "c": {"type": "t", "fingerprint": str(id(configuration))}
            },
        )
        writer.startService()
        self.addCleanup(writer.stopService)
        writer.record(make_request(), self.decision, NOW)
        writer.flush()
        writer.record(make_request(), self.decision, NOW)
        writer.flush()
        configurations[0] = object()
        writer.record(make_request(), self.decision, NOW)
        writer.flush()
        headers = [line for line in read_lines(self.path) if "pfxpold_capture" in line]
        self.assertEqual(len(headers), 2)
        self.assertNotEqual(headers[0]["checks"], headers[1]["checks"])

    def test_write_error_counted_and_logged_once(self):
        """
        Failed writes count the requests lost and log one error per outage.
        """
        writer = self.writer()
        writer.output.stream = BrokenFile()
        with capturedLogs() as events:
            for _ in range(3):
                writer.record(make_request(), self.decision, NOW)
                writer.flush()
        self.assertEqual(writer.dropped, 3)
        self.assertEqual(len([e for e in events if "cannot write" in e["log_format"]]), 1)

    def test_follows_move(self):
        """
        A capture moved away is followed by a new file at the path, with its
        own header.
        """
        writer = self.writer()
        writer.record(make_request(), self.decision, NOW)
        self.clock.advance(1)
        os.rename(self.path, self.path + ".old")
        writer.record(make_request(), self.decision, NOW)
        self.clock.advance(1)
        writer.record(make_request(), self.decision, NOW)
        self.clock.advance(1)
        self.assertEqual(len(read_lines(self.path + ".old")), 3)
        self.assertEqual(len(read_lines(self.path)), 2)

    def test_rotation(self):
        """
        A file that would grow past C{max_bytes} is renamed with a time
        stamp, and only the newest C{keep} rotated files stay.
        """
        writer = self.writer(max_bytes=65536, keep=2)
        for _ in range(30):
            for _ in range(20):
                writer.record(make_request(), self.decision, NOW)
            self.clock.advance(1)
        rotated = writer.rotated_files()
        self.assertEqual(len(rotated), 2)
        self.assertGreater(len(writer.rotated), 2)
        self.assertTrue(os.path.basename(rotated[0]).startswith("capture.jsonl.20261124T2100"))
        for path in [*rotated, self.path]:
            self.assertLessEqual(os.path.getsize(path), 65536)
            self.assertIn("pfxpold_capture", read_lines(path)[0])
        total = sum(len(read_lines(p)) - 1 for p in [*rotated, self.path])
        self.assertGreater(total, 20)

    def test_rotation_compressed(self):
        """
        With C{compress}, rotated files are gzipped (in a thread in the
        daemon) and the uncompressed ones removed.
        """
        writer = self.writer(max_bytes=65536, keep=3, compress=True)
        for _ in range(20):
            for _ in range(20):
                writer.record(make_request(), self.decision, NOW)
            self.clock.advance(1)
        rotated = writer.rotated_files()
        self.assertTrue(rotated)
        for path in rotated:
            self.assertTrue(path.endswith(".gz"), path)
            self.assertEqual(read_lines(path)[1]["by"], "senders")
        self.assertFalse([n for n in os.listdir(self.directory) if n.endswith(".tmp")])


class RedactionTests(SynchronousTestCase):
    """
    L{Redactor} hashes local parts with a key and drops attributes.
    """

    def test_local_parts_hashed(self):
        """
        The local part of each address attribute becomes a keyed hash, the
        same for the same local part; the domain stays.
        """
        redact = Redactor(b"k" * 32, True, ())
        attributes = {
            "sender": "alice@example.com",
            "recipient": "alice@example.org",
            "sasl_username": "alice",
            "client_address": "192.0.2.1",
        }
        redacted = redact(attributes)
        local = redacted["sender"].split("@")[0]
        self.assertTrue(local.startswith("h-"))
        self.assertEqual(redacted["recipient"], local + "@example.org")
        self.assertEqual(redacted["sasl_username"], local)
        self.assertEqual(redacted["client_address"], "192.0.2.1")
        self.assertNotIn("alice", json.dumps(redacted))
        self.assertEqual(attributes["sender"], "alice@example.com")

    def test_key_matters(self):
        """
        Another key gives another hash: without the key, a guessed address
        cannot be confirmed.
        """
        one = Redactor(b"a" * 32, True, ())({"sender": "bob@example.com"})
        two = Redactor(b"b" * 32, True, ())({"sender": "bob@example.com"})
        self.assertNotEqual(one, two)

    def test_empty_sender_kept(self):
        """
        The null sender stays empty.
        """
        self.assertEqual(Redactor(b"k", True, ())({"sender": ""}), {"sender": ""})

    def test_drop(self):
        """
        Dropped attributes are left out.
        """
        redacted = Redactor(b"", False, ("ccert_subject", "sasl_username"))(
            {"sender": "a@b", "ccert_subject": "x", "sasl_username": "u"}
        )
        self.assertEqual(redacted, {"sender": "a@b"})

    def test_key_shared_with_workers(self):
        """
        The parent makes a key and leaves it in the environment for its
        workers, which take it.
        """
        environ = {}
        key = redaction_key(environ)
        self.assertEqual(len(key), 32)
        self.assertEqual(redaction_key(environ), key)
        self.assertEqual(environ[KEY_VARIABLE], key.hex())

    def test_redacted_capture(self):
        """
        The capture's lines carry redacted requests, and its header says
        how they were redacted.
        """
        directory = temporary_directory(self)
        path = os.path.join(directory, "c.jsonl")
        writer = CaptureWriter(
            CaptureSettings(path, hash_local_parts=True, drop=("helo_name",)),
            Clock(),
            key=b"k" * 32,
        )
        writer.startService()
        writer.record(make_request(sender="carol@example.com"), Decision(None, "x"), 0)
        writer.stopService()
        header, line = read_lines(path)
        self.assertEqual(
            header["redacted"], {"hash_local_parts": True, "dropped": ["helo_name"]}
        )
        self.assertNotIn("helo_name", line["request"])
        self.assertTrue(line["request"]["sender"].endswith("@example.com"))
        self.assertNotIn("carol", line["request"]["sender"])


class WorkerPathTests(SynchronousTestCase):
    """
    Workers write files of their own.
    """

    def test_names(self):
        """
        The parent writes the path itself; worker N a file named for it.
        """
        self.assertEqual(worker_path("/v/capture.jsonl", None), "/v/capture.jsonl")
        self.assertEqual(worker_path("/v/capture.jsonl", "2"), "/v/capture.worker2.jsonl")


MAP_CONFIG = """
[server]
capture = "capture.jsonl"
capture_keep = 3

[[check]]
name = "senders"
type = "file"
map = "senders.map"
lookup = ["sender"]
"""


class ConfigurationTests(SynchronousTestCase):
    """
    The C{capture} settings of C{[server]}.
    """

    def setUp(self):
        self.directory = temporary_directory(self)
        self.path = os.path.join(self.directory, "pfxpold.toml")
        with open(os.path.join(self.directory, "senders.map"), "w") as f:
            f.write("spam@example.com REJECT spam\n")

    def load(self, server):
        document = {
            "server": server,
            "check": [{"name": "senders", "type": "file", "map": "senders.map",
                       "lookup": ["sender"]}],
        }
        return load_document(document, Clock(), self.path)

    def test_defaults(self):
        """
        Without C{capture}, nothing is captured and verdicts are not
        recorded; with it, every setting has its default and the chain
        records each check's verdict.
        """
        off = self.load({})
        self.assertIsNone(off.capture)
        self.assertFalse(off.chain.record_verdicts)
        on = self.load({"capture": "capture.jsonl"})
        self.assertEqual(
            on.capture, CaptureSettings(os.path.join(self.directory, "capture.jsonl"))
        )
        self.assertEqual(on.capture.max_bytes, 100 * 1024 * 1024)
        self.assertEqual(on.capture.keep, 10)
        self.assertTrue(on.chain.record_verdicts)
        self.assertFalse(on.log_verdicts)

    def test_settings(self):
        """
        Each setting is read.
        """
        configuration = self.load(
            {
                "capture": "capture.jsonl",
                "capture_max_bytes": 1000000,
                "capture_keep": 3,
                "capture_compress": True,
                "capture_hash_local_parts": True,
                "capture_drop": ["ccert_subject"],
            }
        )
        self.assertEqual(
            configuration.capture,
            CaptureSettings(
                os.path.join(self.directory, "capture.jsonl"),
                1000000,
                3,
                True,
                True,
                ("ccert_subject",),
            ),
        )

    def test_errors(self):
        """
        A bad setting is one line naming the file, the table and the key.
        """
        cases = [
            ({"capture_keep": 3}, "capture_keep", "needs capture"),
            ({"capture": ""}, "capture", "must name a file"),
            ({"capture": "nowhere/c.jsonl"}, "capture", "is not a directory"),
            ({"capture": "c.jsonl", "capture_keep": 0}, "capture_keep", ""),
            ({"capture": "c.jsonl", "capture_max_bytes": 10}, "capture_max_bytes", ""),
            ({"capture": "c.jsonl", "capture_drop": ["a=b"]}, "capture_drop", "attribute names"),
            ({"capture": "c.jsonl", "capture_compress": "yes"}, "capture_compress", ""),
        ]
        for server, key, text in cases:
            error = self.assertRaises(ConfigError, self.load, server)
            message = str(error)
            self.assertIn(self.path, message)
            self.assertIn(key, message)
            self.assertIn(text, message)
            self.assertNotIn("\n", message)

    def test_fingerprints(self):
        """
        A check's fingerprint changes with its settings, not with other
        checks' or the server's.
        """
        one = check_fingerprints(self.load({}))
        two = check_fingerprints(self.load({"capture": "c.jsonl"}))
        self.assertEqual(one, two)
        self.assertEqual(one["senders"]["type"], "file")
        document = {
            "check": [{"name": "senders", "type": "file", "map": "senders.map",
                       "lookup": ["sender", "client_address"]}],
        }
        three = check_fingerprints(load_document(document, Clock(), self.path))
        self.assertNotEqual(one["senders"]["fingerprint"], three["senders"]["fingerprint"])


class ProtocolTests(SynchronousTestCase):
    """
    The protocol gives every answered request to the capture.
    """

    def test_answered_requests_captured(self):
        """
        A request answered by the chain reaches the capture with its
        decision, its verdicts and the time it was complete; the verdicts
        are not logged unless C{log_verdicts} asks.
        """
        directory = temporary_directory(self)
        with open(os.path.join(directory, "senders.map"), "w") as f:
            f.write("spam@example.com REJECT spam\n")
        config = os.path.join(directory, "pfxpold.toml")
        clock = Clock()
        clock.advance(NOW)
        document = {
            "server": {"capture": "capture.jsonl"},
            "check": [{"name": "senders", "type": "file", "map": "senders.map",
                       "lookup": ["sender"]}],
        }
        configuration = load_document(document, clock, config)
        factory = PolicyFactory(configuration.chain, clock, log_requests=False)
        factory.log_verdicts = configuration.log_verdicts
        captured = []

        class Capture:
            def record(self, request, decision, started, block):
                captured.append((request, decision, started, block))

        factory.capture = Capture()
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        request = "".join(
            f"{name}={value}\n" for name, value in make_request(sender="spam@example.com").items()
        ).encode()
        with capturedLogs() as events:
            protocol.dataReceived(request + b"\n")
        self.assertEqual(transport.value(), b"action=REJECT spam\n\n")
        [(seen, decision, started, block)] = captured
        self.assertEqual(seen["sender"], "spam@example.com")
        # The lines as they came, for the writer process.
        self.assertEqual(block, request)
        self.assertEqual(decision.verdicts, [("senders", "REJECT spam")])
        self.assertEqual(started, NOW)
        self.assertFalse([e for e in events if "verdicts" in e.get("log_format", "")])
        protocol.connectionLost(None)


class ValuesTextTests(SynchronousTestCase):
    """
    The values of a request encoded in one call read back exactly.
    """

    def test_round_trip(self):
        """
        Backslashes, quotes, control characters, NUL, the text C{\\u0000}
        and non-ASCII text read back as they were.
        """
        from pfxpold.capture import _values_text

        for values in (
            ["a", "b"],
            ["", ""],
            ["a\\", "b"],
            ["\\u0000x", "y"],
            ["a\x00", "b"],
            ["\u00e9\u2028\n", '"q"'],
            ["x"],
        ):
            self.assertEqual(json.loads(f"[{_values_text(values, len(values))}]"), values)


class ServiceTests(SynchronousTestCase):
    """
    The daemon's service tree captures with the configuration, and a
    reload keeps the capture in force.
    """

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock

        from pfxpold.reload import Reloader
        from pfxpold.service import PolicyService

        from .test_reload import check, document

        self.directory = temporary_directory(self)
        self.path = os.path.join(self.directory, "pfxpold.toml")
        self.reactor = MemoryReactorClock()
        self.document = document
        self.check = check
        self.next = document(check("a"), server={"capture": "capture.jsonl"})
        self.configuration = self.load(None)
        self.service = PolicyService(self.configuration, self.reactor)
        self.reloader = Reloader(self.service, self.load, self.reactor)
        with capturedLogs():
            self.service.privilegedStartService()
            self.service.startService()
        self.addCleanup(self.service.stopService)

    def load(self, previous):
        return load_document(self.next, self.reactor, self.path, previous)

    def test_capture_is_a_backend(self):
        """
        The capture writer is started with the backends, answers reach it,
        and the factory does not log verdicts it records for the capture.
        """
        writer = self.service.factory.capture
        self.assertIsNotNone(writer)
        self.assertTrue(writer.running)
        self.assertEqual(writer.path, os.path.join(self.directory, "capture.jsonl"))
        self.assertFalse(self.service.factory.log_verdicts)
        self.assertTrue(self.service.factory.decider.record_verdicts)

    def test_reload_keeps_capture(self):
        """
        A reload without capture warns that it takes effect on restart; the
        capture goes on, with each check's verdicts recorded by the new chain.
        """
        self.next = self.document(self.check("a"), self.check("b"))
        with capturedLogs() as events:
            self.assertTrue(self.successResultOf(self.reloader.reload()))
        [warning] = [e for e in events if "server.capture changed" in e.get("log_format", "")]
        self.assertIn("still capturing to", warning["capture"])
        self.assertEqual(self.service.configuration.capture, self.configuration.capture)
        self.assertTrue(self.service.factory.decider.record_verdicts)

    def test_round_trip_more(self):
        """
        Values holding the separators' text read back exactly too.
        """
        from pfxpold.capture import _values_text

        for values in (
            ['a","b', "c"],
            ['"', '"'],
            ["a,b", ""],
            ["", "", ""],
            ["tab\there", "x"],
            ['"","', "\\"],
        ):
            self.assertEqual(json.loads(f"[{_values_text(values, len(values))}]"), values)
