"""
Temporary files for unit tests.

trial's C{mktemp()} makes paths relative to the working directory, which
under pytest is the checkout: these are made in the system's temporary
directory instead and removed after the test.
"""

import os
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


def temporary_path(test: SynchronousTestCase, name: str = "file") -> str:
    """
    A path C{name} in a new directory removed when C{test} ends; nothing is
    created at the path itself.
    """
    return os.path.join(temporary_directory(test), name)


def secret_file(test: SynchronousTestCase, secret: str) -> str:
    """
    A file holding C{secret} on its first line, removed when C{test} ends.
    """
    path = temporary_path(test, "secret")
    with open(path, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    return path
