#!/usr/bin/env bash
# Set up (see setup.sh --test), start a throwaway PostgreSQL, and run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
if [ -z "${QCNODE_TEST_PG_URL:-}" ]; then
  eval "$(bash scripts/pg_test_server.sh start)"
  trap '[ -n "${QCNODE_TEST_PG_DIR:-}" ] && bash scripts/pg_test_server.sh stop "$QCNODE_TEST_PG_DIR"' EXIT
fi
.venv/bin/python -m pytest "$@"
