#!/usr/bin/env bash
# The README's main job: set up .venv, then take the bundled MiniLM sample through every stage
# edgeq has today (export → validate against torch → weight-only int4 → validate), writing into
# ./out/minilm/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
EDGEQ=.venv/bin/edgeq
OUT=out/minilm
mkdir -p "$OUT"
"$EDGEQ" export minilm -o "$OUT/minilm.onnx" --force --json "$OUT/export.json"
"$EDGEQ" validate "$OUT/minilm.onnx" --reference minilm --min-sqnr 60 --min-cosine 0.9999 --json "$OUT/validate.json"
"$EDGEQ" quantize "$OUT/minilm.onnx" --recipe w4a16 --block 32 -o "$OUT/minilm.w4a16.onnx" --force \
    --json "$OUT/quantize.json"
"$EDGEQ" validate "$OUT/minilm.w4a16.onnx" --reference "$OUT/minilm.onnx" --data minilm --task embedding \
    --no-intermediates --json "$OUT/validate.w4a16.json"
echo "done: $OUT/minilm.onnx and $OUT/minilm.w4a16.onnx, reports (JSON) in $OUT/"
