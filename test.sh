#!/usr/bin/env bash
# The whole test suite: ./test.sh
#
# Installs what the tests need (scripts/setup-test-env), runs the unit tests
# under Twisted trial, then every test under pytest: the unit tests again
# (they must pass under both) and the integration tests, which start real
# servers (Postfix, slapd, Redis, PostgreSQL, pfxpold itself) on loopback.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-test-env
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m twisted.trial tests.unit
python3 -m pytest -q tests
