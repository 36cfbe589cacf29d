"""Recurrent layers checked on their own outputs (edgeq.quant.recurrent): an LSTM whose int8 weights
break it keeps them float, with the measured number; a well-conditioned one stays int8."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper as oh
from onnx import numpy_helper as nh

import edgeq
from edgeq.quant.recurrent import MIN_LAYER_SQNR_DB
from edgeq.validate.metrics import sqnr_db

HIDDEN, FEATURES, STEPS = 16, 6, 40


def _model(path, *, quiet_band_weight: float):
    """x[steps, batch, 6] -> LSTM -> y. Like GE2E's first layer on linear-mel power: feature 5 is a
    quiet band (rms 0.002) read with a weight of ``quiet_band_weight`` in every row, which sets each
    row's int8 step; the loud bands (rms ~1) carry weights below 1."""
    rng = np.random.default_rng(0)
    w = rng.uniform(-1, 1, (1, 4 * HIDDEN, FEATURES)) * 0.8
    w[0, :, 5] = quiet_band_weight * np.sign(rng.standard_normal(4 * HIDDEN))
    r = rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) * 0.35
    graph = oh.make_graph([oh.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=HIDDEN, name="lstm")], "g",
                          [oh.make_tensor_value_info("x", 1, [STEPS, "batch", FEATURES])],
                          [oh.make_tensor_value_info("Y", 1, None)],
                          [nh.from_array(w.astype(np.float32), "W"), nh.from_array(r.astype(np.float32), "R")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), path)
    return str(path)


def _feeds(n, seed):
    rng = np.random.default_rng(seed)
    scale = np.array([1.0, 0.8, 1.2, 0.6, 1.0, 0.002], np.float32)
    return [{"x": (np.abs(rng.standard_normal((STEPS, 4, FEATURES))) * scale).astype(np.float32)} for _ in range(n)]


def _y(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0].reshape(-1) for f in feeds])


def test_an_lstm_that_int8_weights_break_keeps_them_float(tmp_path):
    src = _model(tmp_path / "m.onnx", quiet_band_weight=60.0)
    out = tmp_path / "q.onnx"
    res = edgeq.quantize(src, out, "w8a16", calib=_feeds(4, 1), profile="onnxruntime-cpu", force=True, progress=False)
    assert not [d for d in res.plan.weights if d.node == "lstm"]
    note = next(n.reason for n in res.plan.floats if n.node == "lstm")
    assert "kept float" in note and "dB from float" in note
    assert res.plan.coverage() == {"quantized": 0, "quantizable": 2}
    assert "1 kept float" in res.plan.result("recurrent_check").summary
    ev = _feeds(3, 7)
    assert sqnr_db(_y(src, ev), _y(out, ev)) == float("inf")  # float weights: the float layer


def test_a_well_conditioned_lstm_keeps_int8_weights(tmp_path):
    src = _model(tmp_path / "m.onnx", quiet_band_weight=0.9)
    out = tmp_path / "q.onnx"
    res = edgeq.quantize(src, out, "w8a16", calib=_feeds(4, 1), profile="onnxruntime-cpu", force=True, progress=False)
    assert sorted(d.input_index for d in res.plan.weights if d.node == "lstm") == [1, 2]
    result = res.plan.result("recurrent_check")
    assert result.ran and "all ≥" in result.summary
    ev = _feeds(3, 7)
    assert sqnr_db(_y(src, ev), _y(out, ev)) >= MIN_LAYER_SQNR_DB
