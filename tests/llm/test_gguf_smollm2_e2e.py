"""Recipe gguf on SmolLM2 (real model): the GGUF's Q4_1/Q8_0 integers kept, float perplexity, GGUF size."""

import json

import pytest

from edgeq.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _tensor_bytes(path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def _perplexity_ratio(candidate, reference, tmp_path) -> dict:
    out = tmp_path / f"{candidate.name}.json"
    # 20 of the 100 held-out sentences: the whole set took 6 min of the suite for the same verdict
    assert main(["validate", str(candidate), "--reference", str(reference), "--data", "smollm2", "--limit", "20",
                 "--no-intermediates", "--json", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())["candidates"][0]["task"]


def test_smollm2_keeps_the_gguf_integers_at_float_perplexity(smollm2_onnx, tmp_path):
    from samples.smollm2 import gguf_path

    q = tmp_path / "smollm2.gguf.onnx"
    plan = tmp_path / "plan.json"
    assert main(["quantize", str(smollm2_onnx), "--recipe", "gguf", "--profile", "android", "-o", str(q),
                 "--json", str(plan)]) == 0
    keep = next(a for a in json.loads(plan.read_text())["algorithms"] if a["name"] == "keep_gguf")
    # q, k and v are kept one by one (the Android file packs them after quantization)
    assert keep["summary"].startswith("kept 211 weights") and "(Q4_1 ×210, Q8_0 ×1); 0 re-quantized" in keep["summary"]
    assert q.stat().st_size <= 1.1 * _tensor_bytes(gguf_path())  # measured 1.037x
    m = _perplexity_ratio(q, smollm2_onnx, tmp_path)
    # measured 61.736 vs 61.687 (+0.08 %): the tied output layer reads int8 activations (MatMulNBits level 4)
    assert m["perplexity"] / m["reference_perplexity"] <= 1.001 and m["top1_agreement"] >= 0.97
    assert main(["package", str(q), "--target", "android", "-o", str(tmp_path / "android")]) == 0
    # the GGUF's float16 scales and minimums stay float16 in the .ort: measured 1.041x (1.21x widened to float32)
    assert (tmp_path / "android" / "model.ort").stat().st_size <= 1.1 * _tensor_bytes(gguf_path())
    ort = _perplexity_ratio(tmp_path / "android" / "model.ort", q, tmp_path)  # the .ort computes its QDQ ONNX
    assert ort["perplexity"] == pytest.approx(ort["reference_perplexity"], rel=1e-6) and ort["top1_agreement"] == 1.0
