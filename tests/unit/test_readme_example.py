"""
The README's "Writing your own check" example works as printed: its check
module and its trial test module are taken from the README, imported, and
the test is run.
"""

import os
import re
import sys
import unittest

from twisted.trial.unittest import SynchronousTestCase

from tests.unit.tempdir import temporary_directory

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def python_block(marker: str) -> str:
    """The README's python block whose first line is C{marker}."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL):
        if block.startswith(marker + "\n"):
            return block
    raise AssertionError(f"no python block starting with {marker!r} in README.md")


class ReadmeExampleTests(SynchronousTestCase):
    def test_example_check_and_its_tests_pass(self):
        """The example check loads, and the example's two trial tests pass."""
        directory = temporary_directory(self)
        package = os.path.join(directory, "mycompany")
        os.makedirs(os.path.join(package, "test"))
        for path in ("__init__.py", os.path.join("test", "__init__.py")):
            open(os.path.join(package, path), "w").close()
        with open(os.path.join(package, "policy.py"), "w") as f:
            f.write(python_block("# mycompany/policy.py"))
        with open(os.path.join(package, "test", "test_policy.py"), "w") as f:
            f.write(python_block("# mycompany/test/test_policy.py"))
        sys.path.insert(0, directory)
        self.addCleanup(sys.path.remove, directory)
        self.addCleanup(
            lambda: [
                sys.modules.pop(name) for name in list(sys.modules) if name.startswith("mycompany")
            ]
        )
        from mycompany.test import test_policy  # type: ignore[import-not-found]

        suite = unittest.TestLoader().loadTestsFromTestCase(test_policy.RelayCheckTests)
        result = unittest.TestResult()
        suite.run(result)
        self.assertEqual((result.testsRun, result.failures, result.errors), (2, [], []))
