"""
Fixtures shared by integration test modules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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
