"""
Tests for L{pfxpold.requestlog}: the one request line, batches of them in
twistd's log, and the request log in a file of its own, written in
batches, following logrotate, and never in the way of answers.
"""

import os
import time

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.action import Action
from pfxpold.chain import Decision
from pfxpold.escape import escape
from pfxpold.requestlog import (
    BATCH_KEY,
    REQUEST_NAMESPACE,
    EventRequestLog,
    FileRequestLog,
    escaped_lines,
    render,
    request_line,
)
from pfxpold.testing import make_request

from .tempdir import temporary_directory

#: 2026-11-24 21:00:00 UTC, well inside a second.
NOW = 1795554000.25


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


class BrokenFile:
    """
    A file whose writes fail the way a full disk does.
    """

    def __init__(self):
        self.closed = False

    def write(self, text):
        raise OSError(28, "No space left on device")

    def flush(self):
        pass

    def close(self):
        self.closed = True


class FileRequestLogTests(SynchronousTestCase):
    """
    L{FileRequestLog} buffers lines and writes them on its timer, when the
    buffer is full, and when it stops.
    """

    def setUp(self):
        self.directory = temporary_directory(self)
        self.path = os.path.join(self.directory, "requests.log")
        self.clock = Clock()
        self.clock.advance(NOW)
        self.log = FileRequestLog(self.path, self.clock)
        self.decision = Decision(Action.parse("REJECT go away"), "senders")

    def start(self):
        self.log.privilegedStartService()
        self.log.startService()
        self.addCleanup(lambda: self.log.running and self.log.stopService())

    def record(self, decision=None, **attributes):
        self.log.record(make_request(**attributes), decision or self.decision, 1.25, "peer")

    def test_line(self):
        """
        A line is twistd's timestamp, then the request as the twistd log
        shows it, the action, the deciding check and the time taken.
        """
        self.start()
        self.record(sender="a@example.com")
        self.log.flush()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(int(NOW)))
        request = make_request(sender="a@example.com")
        self.assertEqual(
            read(self.path),
            f"{stamp} {request.summary()}: REJECT go away (senders, 1.2 ms)\n",
        )

    def test_hostile_values_escaped(self):
        """
        A CR, an escape sequence, C{\\x0b}, C{\\x85}, U+2028 or a NUL in a
        value cannot forge or corrupt a line: each request stays one
        printable line, its values escaped (backslashes doubled).
        """
        self.start()
        sender = "evil\rRCPT forged[192.0.2.1] OK\x1b[2J\x0b\x85\u2028\x00\\@x.test"
        self.record(sender=sender)
        self.record(sender="clean@example.com")
        self.log.flush()
        lines = read(self.path).split("\n")
        self.assertEqual(lines[2], "")
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[0].isprintable() and lines[1].isprintable())
        self.assertIn(
            "from=<evil\\x0dRCPT forged[192.0.2.1] OK\\x1b[2J\\x0b\\x85\\u2028\\x00\\\\@x.test>",
            lines[0],
        )
        self.assertIn("from=<clean@example.com>", lines[1])

    def test_no_reply(self):
        """A request answered with no reply says so."""
        self.start()
        self.record(Decision(None, "deadline"))
        self.log.flush()
        self.assertIn(": no reply (deadline, ", read(self.path))

    def test_timestamp_follows_clock(self):
        """Each line carries the second it was recorded in."""
        self.start()
        self.record()
        self.clock.advance(61)
        self.record()
        self.log.flush()
        first, second = read(self.path).splitlines()
        self.assertEqual(
            first.split()[0], time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(int(NOW)))
        )
        self.assertEqual(
            second.split()[0], time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(int(NOW) + 61))
        )

    def test_written_on_timer(self):
        """Lines wait in memory until the flush interval passes."""
        self.start()
        self.record()
        self.assertEqual(read(self.path), "")
        self.clock.advance(1.0)
        self.assertEqual(len(read(self.path).splitlines()), 1)

    def test_written_when_buffer_full(self):
        """A full buffer is written without waiting for the timer."""
        self.log = FileRequestLog(self.path, self.clock, max_buffered=1000)
        self.start()
        for _ in range(20):
            self.record()
        self.assertGreaterEqual(len(read(self.path).splitlines()), 1)
        self.log.flush()
        self.assertEqual(len(read(self.path).splitlines()), 20)

    def test_stop_flushes_and_closes(self):
        """Stopping writes every buffered line and cancels the timer."""
        self.start()
        self.record()
        self.log.stopService()
        self.assertEqual(len(read(self.path).splitlines()), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_appends(self):
        """An existing file is appended to, not truncated."""
        with open(self.path, "w") as f:
            f.write("earlier\n")
        self.start()
        self.record()
        self.log.stopService()
        self.assertEqual(read(self.path).splitlines()[0], "earlier")
        self.assertEqual(len(read(self.path).splitlines()), 2)

    def test_opened_before_privileges_drop(self):
        """The file is open once privilegedStartService has run."""
        self.log.privilegedStartService()
        self.addCleanup(self.log.stopService)
        self.assertTrue(os.path.exists(self.path))

    def test_cannot_open(self):
        """A path that cannot be opened fails the start, naming the path."""
        log = FileRequestLog(os.path.join(self.directory, "missing", "x.log"), self.clock)
        error = self.assertRaises(OSError, log.privilegedStartService)
        self.assertIn("missing", str(error))

    def test_follows_rotation(self):
        """
        After the file is moved away, earlier lines end up in the moved file
        and later ones in a new file at the path.
        """
        self.start()
        self.record(sender="before@example.com")
        self.clock.advance(1.0)
        os.rename(self.path, self.path + ".1")
        self.record(sender="between@example.com")
        with capturedLogs() as events:
            self.clock.advance(1.0)
        self.record(sender="after@example.com")
        self.log.stopService()
        old = read(self.path + ".1")
        self.assertIn("before@example.com", old)
        self.assertIn("between@example.com", old)
        self.assertEqual(len(read(self.path).splitlines()), 1)
        self.assertIn("after@example.com", read(self.path))
        self.assertTrue(any("reopened" in event["log_format"] for event in events))

    def test_rotation_cannot_reopen(self):
        """
        When a new file cannot be made at the path, the lines go on to the
        moved file and the error is logged once.
        """
        self.start()
        moved = os.path.join(self.directory, "moved.log")
        os.rename(self.path, moved)
        os.mkdir(self.path)  # the path is now a directory: cannot be opened
        with capturedLogs() as events:
            self.record(sender="one@example.com")
            self.clock.advance(1.0)
            self.record(sender="two@example.com")
            self.clock.advance(1.0)
        self.log.stopService()
        self.assertEqual(len(read(moved).splitlines()), 2)
        errors = [event for event in events if "cannot be opened again" in event["log_format"]]
        self.assertEqual(len(errors), 1)

    def test_write_failure(self):
        """
        Lines a write loses are counted and logged once per outage; the
        next good write says how many were lost.
        """
        self.start()
        good = self.log.output.stream
        self.log.output.stream = BrokenFile()
        with capturedLogs() as events:
            self.record()
            self.log.flush()
            self.record()
            self.log.flush()
            self.log.output.stream = good
            self.record()
            self.log.flush()
        self.assertEqual(self.log.dropped, 2)
        errors = [event for event in events if "cannot write" in event["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["reason"], "No space left on device")
        recovered = [event for event in events if "written again" in event["log_format"]]
        self.assertEqual(recovered[0]["dropped"], 2)
        self.assertEqual(len(read(self.path).splitlines()), 1)


class RequestLineTests(SynchronousTestCase):
    """
    L{request_line} is the one line of a request, wherever it goes.
    """

    def test_line(self):
        """Stage, client, HELO, envelope, instance, queue id, answer, check, time."""
        request = make_request(
            protocol_state="RCPT",
            client_name="mx.example.net",
            client_address="192.0.2.1",
            helo_name="helo.example.net",
            sender="a@example.org",
            recipient="b@example.com",
            instance="1.2",
            queue_id="ABC",
        )
        self.assertEqual(
            request_line(request, Decision(Action.parse("OK"), "relay"), 0.25),
            "RCPT mx.example.net[192.0.2.1] helo=<helo.example.net> from=<a@example.org>"
            " to=<b@example.com> instance=1.2 queue_id=ABC: OK (relay, 0.2 ms)",
        )

    def test_shadows(self):
        """
        Shadow verdicts follow the answer, apart from it, and are escaped
        like the rest of the line.
        """
        decision = Decision(Action.parse("DUNNO"), "default")
        decision.shadows = [("new-rbl", "REJECT listed\r\naction=OK"), ("quota", "pending")]
        line = request_line(make_request(), decision, 1.0)
        self.assertTrue(
            line.endswith(
                ": DUNNO (default, 1.0 ms) shadow new-rbl=REJECT listed\\x0d\\x0aaction=OK"
                " quota=pending"
            ),
            line,
        )

    def test_no_shadows(self):
        """Without shadow checks the line ends with the answer's check and time."""
        line = request_line(make_request(), Decision(Action.parse("OK"), "relay"), 1.0)
        self.assertTrue(line.endswith(": OK (relay, 1.0 ms)"), line)

    def test_no_reply(self):
        """A decision without an action is "no reply"."""
        line = request_line(make_request(), Decision(None, "deadline"), 3000.0)
        self.assertTrue(line.endswith(": no reply (deadline, 3000.0 ms)"), line)

    def test_escaped(self):
        """
        Control characters, line separators and backslashes in values are
        escaped: the line stays one line and cannot be forged.
        """
        request = make_request(sender="a\rb\x1b[31m\u2028\\@x", helo_name="h\x85")
        line = request_line(request, Decision(Action.parse("DUNNO"), "c"), 1.0)
        self.assertIn("helo=<h\\x85> from=<a\\x0db\\x1b[31m\\u2028\\\\@x>", line)
        self.assertTrue(line.isprintable())


class EscapedLinesTests(SynchronousTestCase):
    """
    L{escaped_lines} escapes a batch's lines as L{request_line} escapes one,
    testing the whole batch at once.
    """

    def test_clean(self):
        """A batch of clean lines is returned as it is."""
        lines = ["RCPT a[192.0.2.1]: OK (c, 0.1 ms)", "RCPT b[192.0.2.2]: DUNNO (d, 0.2 ms)"]
        self.assertIs(escaped_lines(lines), lines)

    def test_one_hostile(self):
        """
        A line with a control character, a line separator, a backslash or
        a newline is escaped; the clean lines around it are kept as they are.
        """
        hostile = ["a\rb", "c\u2028d", "e\\f", "g\nh", "i\x85j"]
        for line in hostile:
            self.assertEqual(
                escaped_lines(["clean one", line, "clean two"]),
                ["clean one", escape(line), "clean two"],
            )
        self.assertEqual(escaped_lines(["a\rb", "c\nd"]), ["a\\x0db", "c\\x0ad"])

    def test_empty(self):
        """No lines, nothing to escape."""
        self.assertEqual(escaped_lines([]), [])


class RecordedLineTests(SynchronousTestCase):
    """
    A line kept by L{EventRequestLog.record} and written in a batch is
    L{request_line}'s line for the request, whatever it holds.
    """

    def test_same_as_request_line(self):
        """Clean, hostile, shadowed, unanswered and texted decisions alike."""
        shadowed = Decision(Action.parse("DUNNO"), "default")
        shadowed.shadows = [("new-rbl", "REJECT listed\r\naction=OK"), ("quota", "pending")]
        cases = [
            (make_request(sender="a@example.org"), Decision(Action.parse("OK"), "relay")),
            (
                make_request(sender="a\rb\x1b[31m\u2028\\@x", helo_name="h\x85"),
                Decision(Action.parse("DUNNO"), "c"),
            ),
            (make_request(), shadowed),
            (make_request(), Decision(None, "deadline")),
            (make_request(), Decision(Action.parse("REJECT 5.7.1 go away"), "senders")),
            (
                make_request(client_name="mx.\u00e9xample.net"),
                Decision(Action.parse("OK"), "relay"),
            ),
        ]
        clock = Clock()
        clock.advance(NOW)
        log = EventRequestLog(clock)
        with capturedLogs() as events:
            for request, decision in cases:
                log.record(request, decision, 1.25, "peer")
            log.flush()
        [event] = [e for e in events if BATCH_KEY in e]
        [(_, lines)] = event[BATCH_KEY]
        self.assertEqual(
            lines, [request_line(request, decision, 1.25) for request, decision in cases]
        )
        self.assertTrue(all(line.isprintable() for line in lines))


class RenderTests(SynchronousTestCase):
    """
    L{render} writes a batch with each second's prefix.
    """

    def test_render(self):
        """Each line follows the prefix of its second; the prefix is made once a second."""
        seconds = []

        def prefix(second):
            seconds.append(second)
            return f"[{second}] "

        text = render([(1, ["a", "b"]), (2, ["c"])], prefix)
        self.assertEqual(text, "[1] a\n[1] b\n[2] c\n")
        self.assertEqual(seconds, [1, 2])

    def test_empty(self):
        """An empty batch is no text."""
        self.assertEqual(render([], str), "")


class EventRequestLogTests(SynchronousTestCase):
    """
    L{EventRequestLog} hands twistd's log one event per batch of request
    lines: on its timer, when full, and when it stops.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.log = EventRequestLog(self.clock, max_buffered=1000)
        self.decision = Decision(Action.parse("OK"), "relay")

    def record(self, **attributes):
        self.log.record(make_request(**attributes), self.decision, 0.5, "peer")

    def batches(self, events):
        return [event for event in events if BATCH_KEY in event]

    def test_batch_on_timer(self):
        """
        Nothing is logged per request; a second later one info event in
        the protocol's namespace holds every line, grouped by second.
        """
        self.log.startService()
        self.addCleanup(self.log.stopService)
        with capturedLogs() as events:
            self.record(sender="one@example.org")
            self.clock.advance(0.8)  # into the next second
            self.record(sender="two@example.org")
            self.assertEqual(self.batches(events), [])
            self.clock.advance(0.2)
        [event] = self.batches(events)
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["log_namespace"], REQUEST_NAMESPACE)
        [(first, [one]), (second, [two])] = event[BATCH_KEY]
        self.assertEqual((first, second), (int(NOW), int(NOW) + 1))
        self.assertIn("from=<one@example.org>", one)
        self.assertIn("from=<two@example.org>", two)
        self.assertEqual(
            one, request_line(make_request(sender="one@example.org"), self.decision, 0.5)
        )

    def test_text_for_other_observers(self):
        """An observer that knows no batches sees the lines as the event's text."""
        from twisted.logger import formatEvent

        self.log.startService()
        with capturedLogs() as events:
            self.record(sender="one@example.org")
            self.record(sender="two@example.org")
            self.log.stopService()
        [event] = self.batches(events)
        text = formatEvent(event)
        self.assertEqual(text.count("\n"), 1)
        self.assertIn("from=<one@example.org>", text.splitlines()[0])
        self.assertIn("from=<two@example.org>", text.splitlines()[1])

    def test_every_second(self):
        """The timer goes on: each second's lines are one event."""
        self.log.startService()
        self.addCleanup(self.log.stopService)
        with capturedLogs() as events:
            for _ in range(3):
                self.record()
                self.clock.advance(1)
            self.clock.advance(1)
        self.assertEqual([len(e[BATCH_KEY]) for e in self.batches(events)], [1, 1, 1])

    def test_when_full(self):
        """max_buffered characters waiting are logged at once."""
        self.log.startService()
        self.addCleanup(self.log.stopService)
        with capturedLogs() as events:
            while not self.batches(events):
                self.record(sender="x" * 100)
        [event] = self.batches(events)
        [(_, lines)] = event[BATCH_KEY]
        self.assertGreaterEqual(sum(len(line) + 1 for line in lines), 1000)
        self.assertLess(sum(len(line) + 1 for line in lines[:-1]), 1000)

    def test_stop_flushes(self):
        """Stopping logs what waits, and the timer stops."""
        self.log.startService()
        with capturedLogs() as events:
            self.record()
            self.log.stopService()
        self.assertEqual(len(self.batches(events)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothing_waiting(self):
        """With no request answered, nothing is logged."""
        self.log.startService()
        with capturedLogs() as events:
            self.clock.advance(5)
            self.log.stopService()
        self.assertEqual(self.batches(events), [])

    def test_hostile_value(self):
        """A hostile value is escaped in the batch and in its text: one line each."""
        from twisted.logger import formatEvent

        self.log.startService()
        with capturedLogs() as events:
            self.record(sender="a\r\x1b[2Jforged")
            self.log.stopService()
        [event] = self.batches(events)
        [(_, [line])] = event[BATCH_KEY]
        self.assertIn("from=<a\\x0d\\x1b[2Jforged>", line)
        self.assertEqual(formatEvent(event), line)
