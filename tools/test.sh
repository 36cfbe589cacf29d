#!/usr/bin/env bash
# The README's test command: set up .venv, then run the whole suite (unit + end-to-end on the
# real samples). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest "$@"
