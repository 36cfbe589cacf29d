#!/usr/bin/env bash
# Install edgeq with everything its samples and tests need into ./.venv (idempotent).
# torch is installed first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[all]"
echo "edgeq installed in .venv ($(.venv/bin/edgeq --version))"
