"""
Temporary directories for unit tests that need files.

trial's C{mktemp()} makes paths relative to the working directory, which
under pytest is the checkout: these are made in the system's temporary
directory instead and removed after the test.
"""

import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase


def temporary_directory(test: SynchronousTestCase) -> str:
    """
    A new empty directory, removed when C{test} ends.
    """
    path = tempfile.mkdtemp(prefix="pfxpold-test-")
    test.addCleanup(shutil.rmtree, path, True)
    return path
