"""End to end on the real samples: quantize, package for Android, run the .ort on the host.

For MiniLM and EfficientNet-Lite0 in W8A16, W8A8 and W4A16: the .ort loads and runs, matches the
QDQ ONNX at SQNR >= 50 dB (measured: identical outputs, the same graph after the same ORT
optimizations), and has the QDQ ONNX's fidelity to the float model (output and task metrics).
W8A16 and W8A8 reuse the session's quantized samples (``qdq_model`` in tests/conftest.py: int8
runs the same on the host and on Android); W4A16 is quantized with ``--profile android``, which
keeps int4 only where the ORT format can hold it.
"""
import json

import pytest

from edgeq import api, sources
from edgeq.cli import main
from edgeq.errors import UnsupportedError

pytestmark = pytest.mark.e2e

MIN_SQNR_VS_QDQ_DB = 50.0
# feeds per check: MiniLM 4 batches of 8 sentences, EfficientNet 4 batches of crops
LIMIT = 4
CASES = [(s, r) for s in ("minilm", "efficientnet_lite0") for r in ("w8a16", "w8a8", "w4a16")]


@pytest.fixture(scope="module")
def floats(minilm_onnx, effnet_onnx):
    return {"minilm": minilm_onnx, "efficientnet_lite0": effnet_onnx}


def quantized(sample, recipe, floats, qdq_model, e2e_dir):
    if recipe != "w4a16":
        return qdq_model(sample, recipe)
    qdq = e2e_dir / f"{sample}.{recipe}.android.onnx"
    if not qdq.exists():
        assert main(["quantize", str(floats[sample]), "--recipe", recipe, "--profile", "android", "-o", str(qdq)]) == 0
    return qdq


@pytest.mark.parametrize("sample,recipe", CASES, ids=[f"{s}-{r}" for s, r in CASES])
def test_ort_package_matches_the_qdq_model(sample, recipe, floats, qdq_model, e2e_dir):
    qdq = quantized(sample, recipe, floats, qdq_model, e2e_dir)
    res = api.package(qdq, "android", e2e_dir / f"pkg-{sample}-{recipe}", force=True)
    m = json.loads((res.path / "manifest.json").read_text())
    assert m["runtime"]["minimum_onnxruntime_version"] and m["quantization"]["recipe"].startswith(recipe)
    fused = set(m["operators"].get("com.microsoft", []))
    if recipe == "w4a16":
        assert "MatMulNBits" in fused and m["quantization"]["profile"] == "android"
    if recipe == "w8a8":
        assert fused & {"QLinearConv", "QGemm", "MatMulIntegerToFloat", "QLinearMatMul"}
        assert len(m["calibration_sha256"]) == 64
    else:
        assert m["calibration_sha256"] is None

    vs_qdq = api.validate([res.path], qdq, sample, limit=LIMIT, intermediates=False, progress=False)
    for name, stats in vs_qdq.candidates[0].outputs.items():
        assert stats["sqnr_db"] >= MIN_SQNR_VS_QDQ_DB, (name, stats["sqnr_db"])

    vs_float = api.validate([res.path, qdq], floats[sample], sample, limit=LIMIT, intermediates=False,
                            progress=False, task=sources.get_sample(sample).task)
    ort_c, qdq_c = vs_float.candidates
    for name in qdq_c.outputs:
        for metric in ("sqnr_db", "cosine_mean"):
            assert ort_c.outputs[name][metric] == pytest.approx(qdq_c.outputs[name][metric], abs=1e-3), (name, metric)
    assert ort_c.task.keys() == qdq_c.task.keys() and len(ort_c.task) > 1
    for metric, value in qdq_c.task.items():
        assert ort_c.task[metric] == pytest.approx(value, abs=1e-3), metric
    print(f"{sample} {recipe}: .ort {res.model_file.stat().st_size / 1e6:.1f} MB, built in {res.seconds:.1f} s; "
          f"vs QDQ {min(s['sqnr_db'] for s in vs_qdq.candidates[0].outputs.values())} dB; vs float "
          + ", ".join(f"{k} {v['sqnr_db']:.1f} dB cos {v['cosine_mean']:.4f}" for k, v in ort_c.outputs.items())
          + f"; task {ort_c.task}")


def test_host_int4_efficientnet_fails_preflight_naming_a_conv(floats, e2e_dir, tmp_path):
    # quantized for the ONNX reference evaluator (int4 Conv weights): the ORT format cannot hold them
    qdq = e2e_dir / "efficientnet_lite0.w4a16.ref.onnx"
    assert main(["quantize", str(floats["efficientnet_lite0"]), "--recipe", "w4a16", "--profile", "onnx-reference",
                 "-o", str(qdq), "--force"]) == 0
    with pytest.raises(UnsupportedError, match=r"node 'node_Conv_\d+' \(Conv\): int4 weight") as e:
        api.package(qdq, "android", tmp_path / "pkg")
    assert "--profile android" in str(e.value) and not (tmp_path / "pkg").exists()
