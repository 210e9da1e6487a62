"""
Tests for L{pfxpold.capture}'s batches: requests kept as strings on the
answer's path and made into lines a batch at a time write exactly the
lines a request encoded on its own would, hostile values included, in the
order they were answered; and captures written before read the same.
"""

import json
import os

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.action import Action
from pfxpold.capture import CaptureWriter
from pfxpold.chain import Decision
from pfxpold.config import CaptureSettings
from pfxpold.replay import Reading, read_captures
from pfxpold.request import PolicyRequest
from pfxpold.testing import make_request

from .tempdir import temporary_directory
from .test_capture import NOW, CaptureTestCase

#: 2026-11-24 21:00:00 UTC, well inside a second.

#: Values that JSON must escape, or that look like the separators a batch
#: joins values with, or that are merely long.
HOSTILE = [
    'q"uote',
    '"',
    "back\\slash",
    "\\",
    "tab\there",
    "nul\x00x",
    "\\u0000",
    'a","b',
    '","',
    "\u00e9t\u00e9\u2028",
    "del\x7f",
    "esc\x1b[31m",
    "cr\rlf\n",
    "\ud800lone",
    "",
    "x" * 70000,
    "\u00e9" * 5000,
]


def expected_line(request, decision, started):
    """
    The line of one request encoded on its own by the standard library's
    JSON encoder: what every line must be, batched or not.
    """
    compact = {"separators": (",", ":")}
    action = decision.action
    return (
        f'{{"t":{started:.3f},"values":{json.dumps(list(request.values()), **compact)},'
        f'"answer":{json.dumps(None if action is None else str(action))},'
        f'"by":{json.dumps(decision.decided_by)},'
        f'"verdicts":{json.dumps(decision.verdicts, **compact)}}}'
    )


class BatchTests(CaptureTestCase):
    """
    L{CaptureWriter} keeps requests as strings and makes their lines a
    batch at a time.
    """

    def writer(self, **arguments):
        writer = CaptureWriter(CaptureSettings(self.path), self.clock, **arguments)
        writer.startService()
        self.addCleanup(lambda: writer.running and writer.stopService())
        return writer

    def lines(self):
        with open(self.path, encoding="ascii") as f:
            return f.read().split("\n")

    def test_lines_as_encoded_alone(self):
        """
        Hostile values (quotes, backslashes, control characters, NUL, the
        separators' text, non-ASCII text, a lone surrogate, very long
        values) scattered among clean requests across batch boundaries give
        exactly the line the standard JSON encoder gives each request on
        its own, and the file stays one line per request.
        """
        writer = self.writer(batch=4)
        requests = []
        for number, value in enumerate(HOSTILE):
            for request in (
                make_request(sender=f"clean{number}@example.com"),
                make_request(sender=value, recipient=f"r{number}@example.org"),
                make_request(helo_name=value),
            ):
                decision = self.decision if number % 2 else Decision(None, "deadline")
                started = NOW + number + len(requests) / 1000
                requests.append((request, decision, started))
                writer.record(request, decision, started)
        writer.stopService()
        lines = self.lines()
        self.assertEqual(lines[-1], "")
        self.assertEqual(lines[1:-1], [expected_line(*each) for each in requests])

    def test_read_back_by_replay(self):
        """
        Replay reads every hostile value back exactly as it was answered.
        """
        writer = self.writer(batch=3)
        for number, value in enumerate(HOSTILE):
            writer.record(make_request(sender=value), self.decision, NOW + number)
        writer.stopService()
        reading = Reading()
        captured = list(read_captures([self.path], reading))
        self.assertEqual(reading.unreadable, 0)
        self.assertEqual([each.attributes["sender"] for each in captured], HOSTILE)
        self.assertEqual({each.decided_by for each in captured}, {"senders"})
        self.assertEqual(captured[0].verdicts, {"clients": "DUNNO", "senders": "REJECT go away"})

    def test_order_kept(self):
        """
        Lines are written in the order requests were answered: across
        batches, with requests written whole among them, and the last
        partial batch written when the writer stops.
        """
        writer = self.writer(batch=3)
        for number in range(10):
            request = (
                make_request(tls_sni=f"n{number}")
                if number % 4 == 1
                else make_request(instance=f"n{number}")
            )
            writer.record(request, self.decision, NOW + number)
        writer.stopService()
        seen = []
        for line in self.lines()[1:-1]:
            record = json.loads(line)
            seen.append(record["t"] - NOW)
        self.assertEqual(seen, [float(number) for number in range(10)])

    def test_time_per_request(self):
        """
        Requests of one millisecond share their time's text; the next
        millisecond has its own.
        """
        writer = self.writer()
        for started in (NOW, NOW + 0.0002, NOW + 0.001, NOW + 0.0011, NOW + 2.5):
            writer.record(make_request(), self.decision, started)
        writer.flush()
        times = [json.loads(line)["t"] for line in self.lines()[1:-1]]
        self.assertEqual(times, [NOW, NOW, NOW + 0.001, NOW + 0.001, NOW + 2.5])

    def test_nothing_encoded_twice_or_lost_on_buffer_full(self):
        """
        With a batch larger than C{max_buffered}, requests are written when
        C{max_buffered} wait, each once.
        """
        writer = self.writer(batch=100, max_buffered=5)
        for number in range(12):
            writer.record(make_request(instance=str(number)), self.decision, NOW)
        self.assertEqual(len(self.lines()) - 2, 10)
        writer.flush()
        instances = [json.loads(line)["values"] for line in self.lines()[1:-1]]
        names = json.loads(self.lines()[0])["names"]
        position = names.index("instance")
        self.assertEqual([values[position] for values in instances], [str(n) for n in range(12)])

    def test_unencodable_request(self):
        """
        A request that cannot be encoded (values that are not strings: never
        one the protocol parsed) is counted as lost and logged once; the
        requests around it are written.
        """
        writer = self.writer(batch=2)
        broken = PolicyRequest({**make_request(), "sender": 42})
        with capturedLogs() as events:
            writer.record(make_request(), self.decision, NOW)
            writer.record(broken, self.decision, NOW)
            writer.record(broken, self.decision, NOW)
            writer.record(make_request(tls_sni=object()), self.decision, NOW)
            writer.record(make_request(), self.decision, NOW)
            writer.flush()
        self.assertEqual(writer.dropped, 3)
        self.assertEqual(len([e for e in events if "cannot encode" in e["log_format"]]), 1)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(len(self.lines()), 4)

    def test_first_request_without_attributes(self):
        """
        When the first request has no attributes, the header names none and
        every request is written whole, names and values.
        """
        writer = self.writer()
        writer.record(PolicyRequest({}), self.decision, NOW)
        writer.record(make_request(sender='"x"'), self.decision, NOW)
        writer.flush()
        header, first, second, _ = self.lines()
        self.assertEqual(json.loads(header)["names"], [])
        self.assertEqual(json.loads(first)["request"], {})
        self.assertEqual(json.loads(second)["request"]["sender"], '"x"')

    def test_redacted_batches(self):
        """
        Redacted requests (the slow path) are batched alike: hashed local
        parts, dropped attributes, hostile values escaped.
        """
        self.path = os.path.join(self.directory, "redacted.jsonl")
        writer = CaptureWriter(
            CaptureSettings(self.path, hash_local_parts=True, drop=("ccert_subject",)),
            self.clock,
            key=b"k" * 32,
            batch=2,
        )
        writer.startService()
        for value in ('a"b@example.com', "plain@example.com", "\u00e9@example.com"):
            writer.record(make_request(sender=value), self.decision, NOW)
        writer.stopService()
        reading = Reading()
        captured = list(read_captures([self.path], reading))
        senders = [each.attributes["sender"] for each in captured]
        self.assertEqual(len(senders), 3)
        for sender in senders:
            self.assertTrue(sender.startswith("h-") and sender.endswith("@example.com"), sender)
        self.assertNotIn("ccert_subject", captured[0].attributes)


#: A capture as pfxpold wrote it before batches (format 1): a header, a
#: request written as its values, one written whole, one not answered.
OLD_CAPTURE = (
    '{"pfxpold_capture":1,"t":1795554000.25,"checks":{"senders":{"type":"file",'
    '"fingerprint":"0123456789abcdef"}},"names":["request","sender","recipient"],'
    '"redacted":{"hash_local_parts":false,"dropped":[]}}\n'
    '{"t":1795553999.750,"values":["smtpd_access_policy","q\\"u\\\\o\\u00e9",'
    '"bob@example.org"],"answer":"REJECT go away","by":"senders",'
    '"verdicts":[["senders","REJECT go away"]]}\n'
    '{"t":1795554000.500,"request":{"request":"smtpd_access_policy",'
    '"tls_sni":"mx.example.com"},"answer":"DUNNO","by":"default",'
    '"verdicts":[["senders","DUNNO"]]}\n'
    '{"t":1795554001.000,"values":["smtpd_access_policy","","x"],"answer":null,'
    '"by":"deadline","verdicts":[]}\n'
)


class OldCaptureTests(SynchronousTestCase):
    """
    Captures written before batches read as they did.
    """

    def test_old_capture_read(self):
        """
        Replay reads a capture written by the writer before batches: values
        lines, whole lines and a request without an answer.
        """
        path = os.path.join(temporary_directory(self), "old.jsonl")
        with open(path, "w", encoding="ascii") as f:
            f.write(OLD_CAPTURE)
        reading = Reading()
        first, second, third = read_captures([path], reading)
        self.assertEqual(reading.unreadable, 0)
        self.assertEqual(
            first.attributes,
            {
                "request": "smtpd_access_policy",
                "sender": 'q"u\\o\u00e9',
                "recipient": "bob@example.org",
            },
        )
        self.assertEqual(first.answer, "REJECT go away")
        self.assertEqual(first.fingerprints, {"senders": "0123456789abcdef"})
        self.assertEqual(second.attributes["tls_sni"], "mx.example.com")
        self.assertEqual(second.decided_by, "default")
        self.assertIsNone(third.answer)
        self.assertEqual(third.t, 1795554001.0)

    def test_same_format_written(self):
        """
        The writer still writes that format: the same request gives the
        same line.
        """
        directory = temporary_directory(self)
        path = os.path.join(directory, "new.jsonl")
        clock = Clock()
        clock.advance(NOW)
        writer = CaptureWriter(CaptureSettings(path), clock)
        writer.startService()
        request = PolicyRequest(
            {
                "request": "smtpd_access_policy",
                "sender": 'q"u\\o\u00e9',
                "recipient": "bob@example.org",
            }
        )
        decision = Decision(
            Action.parse("REJECT go away"), "senders", [("senders", "REJECT go away")]
        )
        writer.record(request, decision, NOW - 0.5)
        writer.stopService()
        with open(path, encoding="ascii") as f:
            header, line = f.read().splitlines()
        self.assertEqual(line, OLD_CAPTURE.splitlines()[1])
        self.assertEqual(json.loads(header)["pfxpold_capture"], 1)
