"""`edgeq build` on a causal LM: the LLM gates, greedy generations side by side, decode speed (tiny Llama)."""

import json
import math

import numpy as np
import pytest
from tiny_llama import write_texts

from edgeq.export.causal_lm import read_facts
from edgeq.pipeline.build import build, format_summary
from edgeq.validate.llm import LLMThresholds


@pytest.fixture(scope="module")
def built(tiny_onnx, tmp_path_factory):
    path, _ = tiny_onnx
    import onnx

    facts = read_facts({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props})
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("llm_build")
    calib = write_texts(root / "calib", facts, [rng.integers(3, 256, 24).tolist() for _ in range(6)])
    evaluation = write_texts(root / "eval", facts, [rng.integers(3, 256, 20).tolist() for _ in range(4)])
    lines: list[str] = []
    # a random tiny model is not a language model (its next-token distributions are nearly flat, so
    # argmax flips easily): gates it meets (measured: ratio 1.005, top-1 0.934); the defaults are below
    out = build(str(path), targets=["android"], recipe="w8a16", calib=str(calib), data=str(evaluation),
                output=root / "dist", progress=False, say=lines.append,
                llm_thresholds=LLMThresholds(min_top1_agreement=0.85))
    return out, lines


@pytest.mark.slow
def test_an_llm_build_is_validated_with_the_llm_metrics(built):
    res, _ = built
    d = res.data
    assert d["model"]["task"] == "causal_lm" and "decoder step" in d["model"]["task_reason"]
    assert d["thresholds"] == {"max_perplexity_ratio": 1.01, "min_top1_agreement": 0.85}
    rows = {r["target"]: r for r in res.summary}
    assert set(rows) == {"onnx (host)", "android"}
    for r in rows.values():
        assert r["task"]["perplexity_ratio"] < 1.01 and r["task"]["top1_agreement"] >= 0.85, r
        assert r["passed"], r
    text = format_summary(res)
    assert "perplexity x1.00" in text and "greedy" in text and "PASS" in text


@pytest.mark.slow
def test_the_report_shows_generations_and_decode_speed(built):
    res, _ = built
    lat = res.data["latency"]
    assert lat["kind"] == "causal_lm" and lat["decode_tokens"] == 16
    assert set(lat["models"]) == {"tiny.onnx", "tiny.w8a16.android.onnx", "android/model.ort"}
    for m in lat["models"].values():
        # measured (a number), not judged: timings belong in tools/ benchmarks
        assert math.isfinite(m["median_ms"]) and m["prefill_tokens"] == 20 and m["runs"] >= 32
    html = res.report.read_text()
    assert "Greedy generations" in html and "decode ms/token" in html and "perplexity_ratio ≤ 1.01" in html
    saved = json.loads((res.path / "build.json").read_text())
    assert saved["validation"]["candidates"][0]["task"]["greedy"]


def test_llm_gates_default_per_recipe_and_the_caller_overrides_them():
    from edgeq.pipeline.build import _merge, default_llm_thresholds

    assert default_llm_thresholds("w4a16-b64").as_dict() == {"max_perplexity_ratio": 1.10, "min_top1_agreement": 0.80}
    merged = _merge(default_llm_thresholds("w4a16"), LLMThresholds(max_kld=0.1, min_top1_agreement=0.7))
    assert merged.as_dict() == {"max_perplexity_ratio": 1.10, "max_kld": 0.1, "min_top1_agreement": 0.7}
