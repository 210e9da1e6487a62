#!/usr/bin/env bash
# The whole test suite: ./test.sh
#
# Installs what the tests need (scripts/setup-test-env: Debian packages as
# root, Python packages in the virtualenv .venv-test/, or the one named by
# PFXPOLD_TEST_VENV), checks the code with ruff and mypy, runs the unit tests
# under Twisted trial, then every test under pytest: the unit tests again
# (they must pass under both) and the integration tests, which start real
# servers (Postfix, slapd, Redis, PostgreSQL, pfxpold itself) on loopback.
# The code under test is this checkout's, on PYTHONPATH: pfxpold is not
# installed in the test virtualenv.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-test-env
python="${PFXPOLD_TEST_VENV:-$PWD/.venv-test}/bin/python"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Lint and types first: they fail in seconds.
"$python" -m ruff check .
"$python" -m mypy pfxpold twisted/plugins
"$python" -m twisted.trial tests.unit
"$python" -m pytest -q tests
