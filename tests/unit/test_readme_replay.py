"""
The README's "Changing policy safely" walk-through prints what
C{pfxpold-replay} prints: a capture of the relay-acl example's day is
written as the daemon writes it, replayed through the changed map the
README shows, and the output compared with the README's block.
"""

from __future__ import annotations

import io
import os
import re
import shutil

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.capture import CaptureWriter
from pfxpold.config import CaptureSettings, load_configuration
from pfxpold.replay import FAILED, make_parser, run
from pfxpold.testing import make_request

from .tempdir import temporary_directory

HERE = os.path.dirname(__file__)
README = os.path.join(HERE, "..", "..", "README.md")
EXAMPLES = os.path.join(HERE, "..", "..", "examples")

#: 2026-12-01 09:00:00 UTC.
MORNING = 1796115600.0

#: The captured day: (seconds after MORNING, client address, client name,
#: sender, recipient).
DAY = [
    (0, "192.0.2.10", "scanner.example.com", "scanner@example.com", "it@example.com"),
    (60, "192.0.2.40", "app1.example.com", "orders@example.com", "customer1@example.org"),
    (120, "198.51.100.5", "bulk.mail.example.com", "newsletter@example.com", "reader1@example.org"),
    (121, "198.51.100.5", "bulk.mail.example.com", "newsletter@example.com", "reader2@example.net"),
    (122, "198.51.100.5", "bulk.mail.example.com", "newsletter@example.com", "reader3@example.org"),
    (300, "203.0.113.9", "unknown", "ceo@example.com", "victim@example.org"),
    (3600, "192.0.2.40", "app1.example.com", "", "customer2@example.org"),
    (3700, "192.0.2.10", "scanner.example.com", "scanner@example.com", "hr@example.com"),
]


def readme_block(marker: str) -> str:
    """
    The README's text block that follows the line C{marker}.
    """
    with open(README, encoding="utf-8") as f:
        text = f.read()
    match = re.search(re.escape(marker) + r"\n```(?:text)?\n(.*?)```", text, re.DOTALL)
    if match is None:
        raise AssertionError(f"no block after {marker!r} in README.md")
    return match.group(1)


def capture_day(directory: str) -> str:
    """
    Serve the captured day with the relay-acl example, capturing it.
    """
    clock = Clock()
    clock.advance(MORNING)
    configuration = load_configuration(os.path.join(directory, "relay-acl-file.toml"), clock)
    # As with [server] capture in the file: each check's verdict is kept.
    configuration.chain.record_verdicts = True
    writer = CaptureWriter(
        CaptureSettings(os.path.join(directory, "capture.jsonl")),
        clock,
        checks=lambda: configuration,
    )
    writer.startService()
    for at, address, name, sender, recipient in DAY:
        clock.advance(MORNING + at - clock.seconds())
        request = make_request(
            client_address=address,
            client_name=name,
            reverse_client_name=name,
            sender=sender,
            recipient=recipient,
        )
        writer.record(request, configuration.chain.decide(request), clock.seconds())
    writer.stopService()
    return writer.path


class ReadmeReplayTests(SynchronousTestCase):
    """
    The walk-through's replay prints what the README shows.
    """

    def test_replay_output(self):
        """
        The bulk mailer renamed in a new map: the README's command prints
        the README's report and fails the accept-to-refuse gate.
        """
        directory = temporary_directory(self)
        for name in ("relay-acl-file.toml", "relay-acl.map"):
            shutil.copy(os.path.join(EXAMPLES, name), directory)
        capture_day(directory)
        with open(os.path.join(directory, "relay-acl.map")) as f:
            new_map = f.read().replace(
                "bulk.mail.example.com   newsletter@example.com",
                "bulk2.mail.example.com  newsletter@example.com",
            )
        self.assertIn("bulk2.mail", new_map)
        with open(os.path.join(directory, "relay-acl-new.map"), "w") as f:
            f.write(new_map)
        with open(os.path.join(directory, "relay-acl-file.toml")) as f:
            config = f.read().replace('"relay-acl.map"', '"relay-acl-new.map"')
        with open(os.path.join(directory, "relay-acl-new.toml"), "w") as f:
            f.write(config)
        command = readme_block("The new map, replayed:").splitlines()
        self.assertEqual(command[0], "$ pfxpold-replay --config relay-acl-new.toml capture.jsonl")
        previous = os.getcwd()
        os.chdir(directory)
        self.addCleanup(os.chdir, previous)
        arguments = make_parser().parse_args(command[0].split()[2:])
        out, err = io.StringIO(), io.StringIO()
        status = self.successResultOf(
            Deferred.fromCoroutine(run(Clock(), arguments, out, err))
        )
        printed = "\n".join(command[1:]) + "\n"
        self.assertEqual(out.getvalue() + err.getvalue() + f"$ echo $?\n{status}\n", printed)
        self.assertEqual(status, FAILED)
