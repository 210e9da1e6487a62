"""
Helpers for the lookup checks' unit tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase


def temporary_path(case: SynchronousTestCase, name: str = "file") -> str:
    """
    A path C{name} in a new directory that is removed after the test.

    Unlike C{mktemp()}, which is relative to the working directory (the
    repository itself under pytest), this never leaves files behind.
    """
    directory = tempfile.mkdtemp(prefix="pfxpold-test-")
    case.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, name)
