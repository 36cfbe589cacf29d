#!/usr/bin/env bash
# The README's test command: set up .venv, then run the whole suite (unit + end-to-end on the
# real samples) on two pytest-xdist workers (EDGEQ_TEST_WORKERS=0 runs it in one process; the machine
# this is sized for has 2 cores). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -n "${EDGEQ_TEST_WORKERS:-2}" --dist loadgroup "$@"
