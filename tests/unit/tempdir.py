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


EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")


def sqlite_database(path: str, script: str = os.path.join(EXAMPLES, "relay-acl.sql")) -> str:
    """
    Create the SQLite database at C{path} from the SQL C{script} (by
    default the examples' relay ACL): the sql check opens its database
    when the configuration is loaded.
    """
    import sqlite3

    with open(script, encoding="utf-8") as f:
        sql = f.read()
    connection = sqlite3.connect(path)
    try:
        connection.executescript(sql)
    finally:
        connection.close()
    return path


def examples_copy(test: SynchronousTestCase) -> str:
    """
    A copy of examples/ removed when C{test} ends, with the SQLite database
    the README tells users to create beside it (relay-acl.sqlite).
    """
    path = os.path.join(temporary_directory(test), "examples")
    shutil.copytree(EXAMPLES, path)
    sqlite_database(os.path.join(path, "relay-acl.sqlite"))
    return path
