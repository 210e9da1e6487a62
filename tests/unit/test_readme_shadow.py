"""
The README's "Changing policy safely" walk-through, continued with a
shadow check: the new map of the relay-acl example, added as the README
shows, changes no answer, logs the lines the README's grep prints, is
counted apart from the real verdicts, and decides once its one word says
C{enforce}.
"""

from __future__ import annotations

import os
import re
import shutil

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.config import load_configuration
from pfxpold.metrics import Metrics
from pfxpold.testing import make_request

from .tempdir import temporary_directory
from .test_readme_replay import DAY, EXAMPLES, MORNING, README

MARKER = "before the `relay-acl` check, add the new map\nas a shadow check, then reload:"
GREP_MARKER = (
    "would have refused while `relay-acl` accepted them are these (time stamps\nleft out):"
)


def block_after(marker: str, language: str) -> str:
    """
    The README's C{language} block that follows C{marker} and an empty line.
    """
    with open(README, encoding="utf-8") as f:
        text = f.read()
    match = re.search(re.escape(marker) + rf"\n\n```{language}\n(.*?)```", text, re.DOTALL)
    if match is None:
        raise AssertionError(f"no {language} block after {marker!r} in README.md")
    return match.group(1)


class ReadmeShadowTests(SynchronousTestCase):
    """
    The walk-through's shadow check does what the README says.
    """

    def setUp(self):
        self.directory = temporary_directory(self)
        for name in ("relay-acl-file.toml", "relay-acl.map"):
            shutil.copy(os.path.join(EXAMPLES, name), self.directory)
        with open(os.path.join(self.directory, "relay-acl.map")) as f:
            new_map = f.read().replace(
                "bulk.mail.example.com   newsletter@example.com",
                "bulk2.mail.example.com  newsletter@example.com",
            )
        self.assertIn("bulk2.mail", new_map)
        with open(os.path.join(self.directory, "relay-acl-new.map"), "w") as f:
            f.write(new_map)
        with open(os.path.join(self.directory, "relay-acl-file.toml")) as f:
            self.example = f.read()
        self.shadow = block_after(MARKER, "toml")
        self.assertIn('mode = "shadow"', self.shadow)

    def configuration(self, shadow_check: str):
        """
        The example with C{shadow_check} before its relay-acl check.
        """
        first = '[[check]]\nname = "relay-acl"\n'
        self.assertEqual(self.example.count(first), 1)
        path = os.path.join(self.directory, "pfxpold.toml")
        with open(path, "w") as f:
            f.write(self.example.replace(first, shadow_check + "\n" + first))
        clock = Clock()
        clock.advance(MORNING)
        return load_configuration(path, clock)

    def day(self, configuration) -> tuple[list[str], list[str]]:
        """
        The answers to the walk-through's day, and the log's lines.
        """
        answers = []
        with capturedLogs() as events:
            for _, address, name, sender, recipient in DAY:
                request = make_request(
                    client_address=address,
                    client_name=name,
                    reverse_client_name=name,
                    sender=sender,
                    recipient=recipient,
                )
                answers.append(str(configuration.chain.decide(request).action))
        return answers, [formatEvent(event) for event in events]

    def test_shadow_then_enforce(self):
        """
        In shadow, the answers are the example's; one shadow line per
        request, and the README's grep finds exactly the README's lines;
        the verdicts are counted as shadow ones only. Switched to enforce,
        the new map's answers are sent.
        """
        plain = load_configuration(os.path.join(self.directory, "relay-acl-file.toml"), Clock())
        old_answers, _ = self.day(plain)
        configuration = self.configuration(self.shadow)
        metrics = Metrics(Clock())
        configuration.chain.observer = metrics
        answers, lines = self.day(configuration)
        self.assertEqual(answers, old_answers)
        shadow_lines = [line for line in lines if line.startswith("shadow check relay-acl-new ")]
        self.assertEqual(len(shadow_lines), len(DAY))
        command, *printed = block_after(GREP_MARKER, "text").splitlines()
        pattern = re.fullmatch(r"\$ grep '([^']+)' pfxpold\.log", command)
        assert pattern is not None, command
        self.assertEqual([line for line in lines if pattern.group(1) in line], printed)
        self.assertEqual(len(printed), 3)
        self.assertEqual(
            metrics.shadow_verdicts,
            {
                ("relay-acl-new", "OK", "false"): 4,
                ("relay-acl-new", "REJECT", "true"): 3,
                ("relay-acl-new", "REJECT", "false"): 1,
            },
        )
        self.assertNotIn("relay-acl-new", metrics.checks)

        enforcing = self.shadow.replace('mode = "shadow"', 'mode = "enforce"')
        answers, lines = self.day(self.configuration(enforcing))
        newsletter = [index for index, entry in enumerate(DAY) if entry[2].startswith("bulk.")]
        self.assertEqual(len(newsletter), 3)
        for index, (old, new) in enumerate(zip(old_answers, answers, strict=True)):
            if index in newsletter:
                self.assertEqual((old, new.split()[0]), ("OK", "REJECT"))
            else:
                self.assertEqual(new, old)
        self.assertFalse([line for line in lines if "shadow check" in line])
