#!/usr/bin/env bash
# The README's main job: set up .venv, then `edgeq build` with no arguments: the bundled MiniLM
# sample exported (checked against torch), quantized (w8a8, calibrated on its calibration split),
# packaged for Android (ONNX Runtime Mobile) and iOS 18 (Core ML), every package validated against
# the float model on the evaluation split, into ./out/ with the report out/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/edgeq build -o out --force
