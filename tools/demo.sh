#!/usr/bin/env bash
# The README's main job: set up .venv, then take the bundled MiniLM sample through every stage
# edgeq has today (export → validate against torch), writing into ./out/minilm/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
EDGEQ=.venv/bin/edgeq
OUT=out/minilm
mkdir -p "$OUT"
"$EDGEQ" export minilm -o "$OUT/minilm.onnx" --force --json "$OUT/export.json"
"$EDGEQ" validate "$OUT/minilm.onnx" --reference minilm --min-sqnr 60 --min-cosine 0.9999 --json "$OUT/validate.json"
echo "done: $OUT/minilm.onnx, reports $OUT/export.json and $OUT/validate.json"
