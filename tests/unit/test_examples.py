"""
Every sample configuration in examples/ loads as shipped.
"""

import glob
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.config import load_configuration
from tests.unit.tempdir import examples_copy

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


class ExampleConfigurationTests(SynchronousTestCase):
    def test_examples_exist(self):
        """The sample configuration the README points to is there."""
        self.assertTrue(os.path.exists(os.path.join(EXAMPLES, "pfxpold.toml")))

    def test_every_example_loads(self):
        """Each examples/*.toml builds a configuration with at least one check."""
        paths = sorted(glob.glob(os.path.join(examples_copy(self), "*.toml")))
        self.assertTrue(paths)
        for path in paths:
            configuration = load_configuration(path, Clock())
            self.assertTrue(configuration.chain.entries, path)
