"""
Fixtures shared by several integration test modules.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.integration.deployment import Installation, install
from tests.integration.support import REPOSITORY


@pytest.fixture(scope="session")
def lookup_postgresql() -> Iterator:
    """
    A private PostgreSQL server with a C{pfxpold} database holding the
    relay-ACL table of examples/relay-acl.sql; stopped at the end of the
    session.
    """
    from tests.integration.lookup_postgresql import PostgreSQLServer

    server = PostgreSQLServer()
    try:
        server.start()
        server.execute("CREATE DATABASE pfxpold", "postgres")
        with open(os.path.join(REPOSITORY, "examples", "relay-acl.sql"), encoding="utf-8") as f:
            server.execute(f.read())
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def lookup_mariadb() -> Iterator:
    """
    A private MariaDB server with a C{pfxpold} database holding the
    relay-ACL table of examples/relay-acl.sql, read by the C{pfxpold}
    account with the password of C{server.password_file} (C{server.settings()}
    gives the sql check's keys); stopped at the end of the session.
    """
    from tests.integration.lookup_mariadb import running_relay_acl

    with running_relay_acl() as server:
        yield server


@pytest.fixture(scope="session")
def pfxpold_installation() -> Iterator[Installation]:
    """
    pfxpold built from this checkout (sdist, then a wheel from the sdist)
    and installed in one fresh virtualenv for the whole session, under a
    world-readable temporary directory outside /root so that the service
    user of the privilege tests can run it.
    """
    # Not tmp_path_factory: pytest makes its directories 0700, which the
    # unprivileged service user cannot enter.
    root = tempfile.mkdtemp(prefix="pfxpold-installation-")
    try:
        yield install(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def world_readable_tmp() -> Iterator[str]:
    """
    A temporary directory every user can traverse, for files the service
    user of the privilege tests must reach (pytest's own tmp_path is under
    a 0700 directory, so nobody could not write a log file there).
    """
    path = tempfile.mkdtemp(prefix="pfxpold-test-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
