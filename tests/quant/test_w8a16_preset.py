"""The w8a16 preset: with calibration data its int8 Conv codes are chosen for the layer output and the
Conv/Gemm biases absorb the mean error of rounding; without data it is plain nearest rounding, and a
MatMul-only model is quantized the same either way."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper as oh
from onnx import numpy_helper as nh
from w8a8_models import encoder_block, encoder_feeds

import edgeq
from edgeq.quant.recipes import preset
from edgeq.validate.metrics import sqnr_db

CIN, COUT = 32, 8


def _pointwise(path):
    """x[N, 32, 8, 8] -> 1×1 Conv (+bias) -> y. Output channel o has one large weight (on the quiet input
    channel o) and 31 small ones under half its int8 step: nearest rounding sets them all to zero (as on
    PP-OCRv4 rec's 1×1 Convs), and their inputs share a large common component, so the lost
    contributions add up to most of the output."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((COUT, CIN)) * 0.08 + 0.05).astype(np.float32)
    w[np.arange(COUT), np.arange(COUT)] = 30.0  # int8 step 30/127 = 0.24: most |small| < 0.12
    b = rng.standard_normal(COUT).astype(np.float32)
    graph = oh.make_graph([oh.make_node("Conv", ["x", "w", "b"], ["y"], name="pw")], "g",
                          [oh.make_tensor_value_info("x", 1, ["n", CIN, 8, 8])],
                          [oh.make_tensor_value_info("y", 1, None)],
                          [nh.from_array(w[:, :, None, None], "w"), nh.from_array(b, "b")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9), path)
    return str(path)


def _feeds(n, seed):
    rng = np.random.default_rng(seed)  # a shared component per position, a mean of 1, a little noise per channel
    quiet = np.where(np.arange(CIN) < COUT, 0.02, 1.0)[None, :, None, None]  # the large weights' inputs
    return [{"x": (quiet * (1.0 + rng.standard_normal((4, 1, 8, 8)) + 0.3 * rng.standard_normal((4, CIN, 8, 8))))
             .astype(np.float32)} for _ in range(n)]


def _run(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0] for f in feeds])


PRESET_ALGORITHMS = ("conv_rounding", "bias_correction")


def _ran(res) -> dict[str, bool]:
    return {a.name: a.ran for a in res.plan.algorithms if a.name in PRESET_ALGORITHMS}


def test_with_data_the_preset_rounds_convs_for_their_output_and_corrects_biases(tmp_path):
    src = _pointwise(tmp_path / "pw.onnx")
    calib, held_out = _feeds(6, 1), _feeds(4, 2)
    ref = _run(src, held_out)
    nearest = edgeq.quantize(src, tmp_path / "nearest.onnx", "w8a16", force=True, progress=False)  # no data
    assert _ran(nearest) == {"conv_rounding": False, "bias_correction": False}
    aware = edgeq.quantize(src, tmp_path / "aware.onnx", "w8a16", calib=calib, force=True, progress=False)
    assert _ran(aware) == {"conv_rounding": True, "bias_correction": True}
    assert all(a.nodes == ("pw",) for a in aware.plan.algorithms if a.name in PRESET_ALGORITHMS)
    db_nearest, db_aware = sqnr_db(ref, _run(tmp_path / "nearest.onnx", held_out)), \
        sqnr_db(ref, _run(tmp_path / "aware.onnx", held_out))
    # measured: nearest 13.4 dB, conv rounding + bias correction 27.1 dB on the held-out feeds
    assert db_nearest < 16 and db_aware >= db_nearest + 10, (db_nearest, db_aware)
    # each alone helps too: the bias takes the mean of the lost contributions (measured 16.3 dB), the codes
    # their variation as well (26.1 dB)
    gain = {"conv_rounding": 10.0, "bias_correction": 2.0}
    for only in PRESET_ALGORITHMS:
        rec = preset("w8a16").with_algorithms(**{a: None for a in PRESET_ALGORITHMS if a != only})
        edgeq.quantize(src, tmp_path / f"{only}.onnx", rec, calib=calib, force=True, progress=False)
        assert sqnr_db(ref, _run(tmp_path / f"{only}.onnx", held_out)) >= db_nearest + gain[only], only


def test_a_matmul_only_model_is_the_same_with_or_without_data(tmp_path):
    src = encoder_block(tmp_path / "enc.onnx")
    feeds = encoder_feeds()
    edgeq.quantize(src, tmp_path / "a.onnx", "w8a16", force=True, progress=False)
    res = edgeq.quantize(src, tmp_path / "b.onnx", "w8a16", calib=feeds, force=True, progress=False)
    assert _ran(res) == {"conv_rounding": False, "bias_correction": False}  # nothing to do: no Conv, no Gemm
    a, b = onnx.load(tmp_path / "a.onnx"), onnx.load(tmp_path / "b.onnx")
    assert {t.name: t.raw_data for t in a.graph.initializer} == {t.name: t.raw_data for t in b.graph.initializer}
