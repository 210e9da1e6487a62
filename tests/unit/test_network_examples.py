"""
The ldap, dnsbl, http and spf sample configurations: the README shows each
exactly as shipped in examples/, and each loads as it stands.
"""

import os
import re

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.config import load_configuration

REPOSITORY = os.path.join(os.path.dirname(__file__), "..", "..")
EXAMPLES = ("ldap", "dnsbl", "http", "spf")


def readme_block(name: str) -> str:
    """The ```toml block of the README that starts with # examples/NAME.toml."""
    with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    match = re.search(
        r"```toml\n# examples/" + re.escape(name) + r"\.toml\n(.*?)```", readme, re.DOTALL
    )
    assert match is not None, f"README has no block for examples/{name}.toml"
    return match.group(1)


class NetworkExampleTests(SynchronousTestCase):
    def test_readme_matches_files(self):
        """Each README sample is the example file, word for word."""
        for name in EXAMPLES:
            with open(os.path.join(REPOSITORY, "examples", f"{name}.toml"), encoding="utf-8") as f:
                self.assertEqual(readme_block(name), f.read(), name)

    def test_examples_load(self):
        """Each example builds its checks without touching the network."""
        expected = {
            "ldap": ["ldap"],
            "dnsbl": ["dnsbl"],
            "http": ["rest", "soap"],
            "spf": ["spf"],
        }
        for name in EXAMPLES:
            clock = Clock()
            path = os.path.join(REPOSITORY, "examples", f"{name}.toml")
            configuration = load_configuration(path, clock)
            self.assertEqual([entry.name for entry in configuration.chain.entries], expected[name])
            self.assertEqual(clock.getDelayedCalls(), [])
