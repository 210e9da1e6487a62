"""
Tests for L{pfxpold.captureprocess}: the daemon's side with stand-in
sockets and fork, the writer's side fed what the daemon sent. The real
fork is tested in tests/integration/test_capture_process.py.
"""

from __future__ import annotations

import os
import signal

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pfxpold import captureprocess
from pfxpold.action import Action
from pfxpold.capture import CaptureWriter
from pfxpold.captureprocess import (
    RESTART_INTERVAL,
    STOP_TIMEOUT,
    CaptureProcess,
    CaptureSink,
    MessageReader,
    encode_message,
    parse_block,
    request_block,
)
from pfxpold.chain import Decision
from pfxpold.config import CaptureSettings
from pfxpold.testing import make_request

from .tempdir import temporary_directory
from .test_capture import NOW, BrokenFile, read_lines

#: A PID that is never signalled: C{kill} is a stand-in.
PID = 4242


class Socket:
    """
    A stand-in for the daemon's end of the writer's socket.
    """

    def __init__(self) -> None:
        self.sent = bytearray()
        self.blocked = False
        self.incoming: list[bytes] = []
        self.shut = False
        self.closed = False

    def setsockopt(self, *args):
        pass

    def setblocking(self, flag):
        pass

    def fileno(self):
        return 99

    def send(self, data):
        if self.blocked:
            raise BlockingIOError()
        self.sent += data
        return len(data)

    def recv(self, size):
        return self.incoming.pop(0) if self.incoming else b""

    def shutdown(self, how):
        self.shut = True

    def close(self):
        self.closed = True


def decision(answer, by="senders"):
    action = None if answer is None else Action.parse(answer)
    return Decision(action, by, [("clients", "DUNNO")] + ([(by, answer)] if answer else []))


class ProcessTestCase(SynchronousTestCase):
    """
    A L{CaptureProcess} whose forks, sockets and signals are stand-ins,
    on a memory reactor.
    """

    def setUp(self):
        self.directory = temporary_directory(self)
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.sockets: list[Socket] = []
        self.forks = 0
        self.killed: list[tuple[int, int]] = []
        self.configuration = [None]

    def socketpair(self, *args):
        parent = Socket()
        self.sockets.append(parent)
        return parent, Socket()

    def fork(self):
        self.forks += 1
        return PID

    def process(self, batch=4, **settings):
        process = CaptureProcess(
            CaptureSettings(os.path.join(self.directory, "daemon.jsonl"), **settings),
            self.reactor,
            checks=lambda: self.configuration[0],
            batch=batch,
            fork=self.fork,
            socketpair=self.socketpair,
            kill=lambda pid, number: self.killed.append((pid, number)),
            describe=lambda configuration: {"c": {"type": "t", "fingerprint": configuration}},
        )
        process.privilegedStartService()
        process.startService()
        return process

    def written(self, data, name="written.jsonl", **settings):
        """
        What a writer process writes, given C{data} from the daemon.
        """
        path = os.path.join(self.directory, name)
        writer = CaptureWriter(CaptureSettings(path, **settings), self.reactor)
        writer._open()
        replies = []
        sink = CaptureSink(writer, replies.append)
        sink.receive(bytes(data))
        sink.finish()
        return read_lines(path)

    def stop(self, process):
        """
        Stop C{process}; its writer closes its end once it has all.
        """
        stopping = process.stopService()
        self.assertTrue(self.sockets[-1].shut)
        for reader in list(self.reactor.readers):
            reader.doRead()
        self.successResultOf(stopping)


class DaemonSideTests(ProcessTestCase):
    """
    The daemon keeps each request's lines, time and decision number and
    hands them over in batches; the writer process writes the same file
    as the daemon itself would.
    """

    def test_same_lines_as_in_process(self):
        """
        Requests parsed whole (their lines as they came) and requests
        parsed line by line (no lines kept) come out as the in-process
        writer writes them, in order, with their decisions.
        """
        process = self.process()
        direct = CaptureWriter(
            CaptureSettings(os.path.join(self.directory, "direct.jsonl")),
            self.reactor,
        )
        direct._open()
        decisions = [decision("REJECT go away"), decision("OK"), decision(None, "error")]
        for number in range(10):
            request = make_request(
                sender=f"user{number}@example.com", client_name="h\u00e9.example"
            )
            answer = decisions[number % 3]
            block = request_block(request) if number % 2 else b""
            process.record(request, answer, NOW + number, block)
            direct.record(request, answer, NOW + number)
        self.stop(process)
        direct.flush()
        written = self.written(self.sockets[0].sent)
        self.assertEqual(written, read_lines(direct.path))
        self.assertEqual(len(written), 11)
        self.assertEqual(written[2]["answer"], "OK")
        self.assertEqual(written[3]["by"], "error")
        self.assertEqual(written[10]["request"]["client_name"], "h\u00e9.example")

    def test_header_after_reload(self):
        """
        A change of the configuration in force reaches the writer before
        the next batch, which is written under a new header.
        """
        process = self.process(batch=2)
        self.configuration[0] = "one"
        for _ in range(2):
            process.record(make_request(), decision("OK"), NOW)
        self.configuration[0] = "two"
        for _ in range(2):
            process.record(make_request(), decision("OK"), NOW)
        self.stop(process)
        written = self.written(self.sockets[0].sent)
        headers = [
            (index, line["checks"]) for index, line in enumerate(written) if "checks" in line
        ]
        self.assertEqual(
            headers,
            [
                (0, {"c": {"type": "t", "fingerprint": "one"}}),
                (3, {"c": {"type": "t", "fingerprint": "two"}}),
            ],
        )

    def test_decision_numbers_used_again(self):
        """
        Past C{MAX_DECISIONS} distinct decisions, numbers start again and
        each is defined anew: every request still gets its own answer.
        """
        self.patch(captureprocess, "MAX_DECISIONS", 2)
        process = self.process(batch=3)
        answers = [f"REJECT reason {number % 5}" for number in range(12)]
        for answer in answers:
            process.record(make_request(), decision(answer), NOW)
        self.stop(process)
        written = self.written(self.sockets[0].sent)
        self.assertEqual([line["answer"] for line in written[1:]], answers)

    def test_timer_hands_over(self):
        """
        Fewer requests than a batch are handed over on the timer.
        """
        process = self.process(batch=100)
        process.record(make_request(), decision("OK"), NOW)
        self.assertEqual(self.sockets[0].sent, b"")
        self.reactor.advance(1.0)
        self.assertEqual(len(self.written(self.sockets[0].sent)), 2)
        self.stop(process)

    def test_writer_behind(self):
        """
        While the writer takes nothing, batches wait up to MAX_BACKLOG
        bytes; beyond, they are dropped, counted and logged once, and the
        catching up is logged with what was lost.
        """
        self.patch(captureprocess, "MAX_BACKLOG", 1)
        process = self.process(batch=2)
        self.sockets[0].blocked = True
        with capturedLogs() as events:
            for _ in range(6):
                process.record(make_request(), decision("OK"), NOW)
        self.assertEqual(process.dropped, 4)
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("is behind by", warning["log_format"])
        self.assertTrue(self.reactor.writers)
        self.sockets[0].blocked = False
        with capturedLogs() as events:
            for writer in list(self.reactor.writers):
                writer.doWrite()
        self.assertFalse(self.reactor.writers)
        self.assertEqual([e["count"] for e in events if "caught up" in e["log_format"]], [4])
        # The first batch went through whole.
        self.assertEqual(len(self.written(self.sockets[0].sent)), 3)
        self.stop(process)

    def test_writer_messages(self):
        """
        What the writer reports: its lost requests count in C{dropped};
        its log lines are logged by the daemon, control characters
        escaped.
        """
        process = self.process()
        self.sockets[0].incoming = [
            encode_message(("dropped", 3)) + encode_message(("log", "error", "bad\x1b[2Jthing")),
        ]
        with capturedLogs() as events:
            for reader in list(self.reactor.readers):
                reader.doRead()
        self.assertEqual(process.dropped, 3)
        [event] = [e for e in events if e.get("text")]
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertNotIn("\x1b", event["text"])
        self.assertIn("thing", event["text"])
        self.stop(process)

    def test_writer_ended_and_started_again(self):
        """
        A writer that ends unexpectedly is logged; what is recorded
        until the next one starts (RESTART_INTERVAL later) is counted as
        lost; the next one gets every decision defined anew.
        """
        process = self.process(batch=1)
        process.record(make_request(), decision("OK"), NOW)
        with capturedLogs() as events:
            for reader in list(self.reactor.readers):
                reader.doRead()
        [error] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertIn("ended unexpectedly", error["log_format"])
        self.assertEqual(error["pid"], PID)
        self.assertIsNone(process.pid)
        self.assertTrue(self.sockets[0].closed)
        process.record(make_request(), decision("OK"), NOW)
        self.assertEqual(process.dropped, 1)
        self.reactor.advance(RESTART_INTERVAL)
        self.assertEqual(self.forks, 2)
        self.assertEqual(process.pid, PID)
        process.record(make_request(), decision("REJECT no"), NOW)
        process.record(make_request(), decision("OK"), NOW)
        self.stop(process)
        written = self.written(self.sockets[1].sent)
        self.assertEqual([line.get("answer") for line in written], [None, "REJECT no", "OK"])

    def test_fork_fails(self):
        """
        A writer that cannot be started is logged; it is tried again on
        the timer, RESTART_INTERVAL later.
        """

        def fork():
            self.forks += 1
            if self.forks == 1:
                raise OSError(11, "Resource temporarily unavailable")
            return PID

        self.fork = fork
        with capturedLogs() as events:
            process = self.process()
        self.assertIn("cannot start", events[-1]["log_format"])
        self.assertIsNone(process.pid)
        self.reactor.advance(RESTART_INTERVAL)
        self.assertEqual(process.pid, PID)
        self.stop(process)

    def test_stop_timeout(self):
        """
        A writer that does not finish within STOP_TIMEOUT of the stop is
        killed, and the stop completes.
        """
        process = self.process()
        process.record(make_request(), decision("OK"), NOW)
        stopping = process.stopService()
        self.assertNoResult(stopping)
        with capturedLogs() as events:
            self.reactor.advance(STOP_TIMEOUT)
        self.assertEqual(self.killed, [(PID, signal.SIGKILL)])
        self.assertIn("did not finish", events[0]["log_format"])
        self.successResultOf(stopping)

    def test_stop_waits_for_the_backlog(self):
        """
        The stop closes the socket only once everything was sent.
        """
        process = self.process()
        self.sockets[0].blocked = True
        process.record(make_request(), decision("OK"), NOW)
        stopping = process.stopService()
        self.assertFalse(self.sockets[0].shut)
        self.sockets[0].blocked = False
        for writer in list(self.reactor.writers):
            writer.doWrite()
        self.assertTrue(self.sockets[0].shut)
        for reader in list(self.reactor.readers):
            reader.doRead()
        self.successResultOf(stopping)
        self.assertEqual(len(self.written(self.sockets[0].sent)), 2)

    def test_daemon_closes_its_copy_of_the_file(self):
        """
        Once the writer is forked, the daemon holds no descriptor of the
        capture file (a rotated file would stay on disk behind it).
        """
        process = self.process()
        self.assertIsNone(process.writer.output.stream)
        self.stop(process)


class WriterSideTests(SynchronousTestCase):
    """
    The framing, the requests' lines, and what the writer reports.
    """

    def test_messages_cut_anywhere(self):
        """
        Messages come out whole whatever the reads' sizes.
        """
        messages = [("batch", {}, [1.0], [0], [b"a=b\n"]), ("checks", {"x": 1}), ("dropped", 2)]
        data = b"".join(map(encode_message, messages))
        for size in (1, 3, 7, len(data)):
            reader = MessageReader()
            got = []
            for start in range(0, len(data), size):
                got.extend(reader.feed(data[start : start + size]))
            self.assertEqual(got, messages)

    def test_lines_round_trip(self):
        """
        A request's lines read back as its attributes, values holding
        C{=} and non-ASCII text included; bytes that are not UTF-8 read as
        the protocol reads them.
        """
        request = make_request(sender="a=b@example.com", client_name="h\u00e9.example")
        self.assertEqual(parse_block(request_block(request)), dict(request))
        self.assertEqual(parse_block(b"a=\xff\nb=\n"), {"a": "\ufffd", "b": ""})
        self.assertRaises(ValueError, parse_block, b"no equals\n")

    def test_unreadable_lines_counted(self):
        """
        Lines that are no request are counted as lost, not written.
        """
        path = os.path.join(temporary_directory(self), "c.jsonl")
        writer = CaptureWriter(CaptureSettings(path), MemoryReactorClock())
        writer._open()
        replies = []
        sink = CaptureSink(writer, replies.append)
        with capturedLogs() as events:
            sink.receive(
                encode_message(
                    (
                        "batch",
                        {0: ("OK", "default", [])},
                        [NOW, NOW],
                        [0, 0],
                        [b"garbage\n", b"a=b\n"],
                    )
                )
            )
        self.assertEqual(len(events), 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        sink.finish()
        self.assertEqual([line["request"] for line in read_lines(path)[1:]], [{"a": "b"}])
        self.assertEqual(replies, [("dropped", 1)])

    def test_failed_writes_reported(self):
        """
        Requests a failing disk loses are reported to the daemon on the
        writer's timer, once per change.
        """
        path = os.path.join(temporary_directory(self), "c.jsonl")
        writer = CaptureWriter(CaptureSettings(path), MemoryReactorClock())
        writer._open()
        writer.output.stream.close()
        writer.output.stream = BrokenFile()
        replies = []
        sink = CaptureSink(writer, replies.append)
        sink.receive(encode_message(("batch", {0: ("OK", "default", [])}, [NOW], [0], [b"a=b\n"])))
        with capturedLogs():
            sink.tick()
            sink.tick()
        self.assertEqual(replies, [("dropped", 1)])
