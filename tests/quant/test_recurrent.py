"""Recurrent layers checked on their own outputs (edgeq.quant.recurrent): an LSTM whose per-row int8 weights
break it gets int8 blocks where they suffice, else keeps only the weight that breaks it float, with the
measured numbers; a well-conditioned one stays int8 per row."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper as oh
from onnx import numpy_helper as nh

import edgeq
from edgeq.quant.recurrent import BLOCK, MIN_LAYER_SQNR_DB
from edgeq.validate.metrics import sqnr_db

HIDDEN, FEATURES, STEPS = 16, 6, 40


def _model(path, *, quiet_band_weight: float, features: int = FEATURES, quiet: slice = slice(5, 6)):
    """x[steps, batch, features] -> LSTM -> y. Like GE2E's first layer on linear-mel power: the ``quiet``
    features (rms 0.002) are read with a weight of ``quiet_band_weight`` in every row, which sets each
    row's int8 step; the loud bands (rms ~1) carry weights below 1."""
    rng = np.random.default_rng(0)
    w = rng.uniform(-1, 1, (1, 4 * HIDDEN, features)) * 0.8
    w[0, :, quiet] = quiet_band_weight * np.sign(rng.standard_normal((4 * HIDDEN, len(range(features)[quiet]))))
    r = rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) * 0.35
    graph = oh.make_graph([oh.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=HIDDEN, name="lstm")], "g",
                          [oh.make_tensor_value_info("x", 1, [STEPS, "batch", features])],
                          [oh.make_tensor_value_info("Y", 1, None)],
                          [nh.from_array(w.astype(np.float32), "W"), nh.from_array(r.astype(np.float32), "R")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), path)
    return str(path)


def _feeds(n, seed, scale=(1.0, 0.8, 1.2, 0.6, 1.0, 0.002)):
    rng = np.random.default_rng(seed)
    scale = np.asarray(scale, np.float32)
    return [{"x": (np.abs(rng.standard_normal((STEPS, 4, len(scale)))) * scale).astype(np.float32)} for _ in range(n)]


def _y(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0].reshape(-1) for f in feeds])


def test_an_lstm_whose_input_weights_int8_breaks_keeps_only_those_float(tmp_path):
    # one quiet feature among 6: no block along the input separates it, so W stays float; R is fine in int8
    src = _model(tmp_path / "m.onnx", quiet_band_weight=60.0)
    out = tmp_path / "q.onnx"
    res = edgeq.quantize(src, out, "w8a16", calib=_feeds(4, 1), profile="onnxruntime-cpu", force=True, progress=False)
    assert [d.weight for d in res.plan.weights if d.node == "lstm"] == ["R"]
    note = next(n.reason for n in res.plan.floats if n.node == "lstm")
    assert note.startswith("weights kept float (W)") and "int8 per row" in note and "dB" in note
    assert res.plan.coverage() == {"quantized": 1, "quantizable": 2}
    assert "1 below 30 dB per row, now 1: W float, the rest int8 blocks of 32" in res.plan.result("recurrent_check").summary
    ev = _feeds(3, 7)
    assert sqnr_db(_y(src, ev), _y(out, ev)) >= MIN_LAYER_SQNR_DB


def test_an_lstm_that_per_row_int8_breaks_gets_blocks_along_the_input(tmp_path):
    # 32 loud features, then 32 quiet ones with large weights: per-row steps are set by the quiet half,
    # blocks of 32 along the input give each half its own step
    scale = [1.0] * 32 + [0.002] * 32
    src = _model(tmp_path / "m.onnx", quiet_band_weight=60.0, features=64, quiet=slice(32, 64))
    out = tmp_path / "q.onnx"
    cal, ev = _feeds(4, 1, scale), _feeds(3, 7, scale)
    res = edgeq.quantize(src, out, "w8a16", calib=cal, profile="onnxruntime-cpu", force=True, progress=False)
    ds = {d.weight: d for d in res.plan.weights if d.node == "lstm"}
    assert sorted(ds) == ["R", "W"] and ds["W"].block == BLOCK and ds["W"].axis == 2
    assert "int8 blocks of 32" in ds["W"].reason
    m = onnx.load(str(out))
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in
              next(x for x in m.graph.node if x.op_type == "LSTM").input[1:2])
    assert {a.name: a.i for a in dq.attribute} == {"axis": 2, "block_size": BLOCK}
    assert sqnr_db(_y(src, ev), _y(out, ev)) >= MIN_LAYER_SQNR_DB


def test_a_well_conditioned_lstm_keeps_int8_weights(tmp_path):
    src = _model(tmp_path / "m.onnx", quiet_band_weight=0.9)
    out = tmp_path / "q.onnx"
    res = edgeq.quantize(src, out, "w8a16", calib=_feeds(4, 1), profile="onnxruntime-cpu", force=True, progress=False)
    assert sorted(d.input_index for d in res.plan.weights if d.node == "lstm") == [1, 2]
    result = res.plan.result("recurrent_check")
    assert result.ran and "all ≥" in result.summary
    ev = _feeds(3, 7)
    assert sqnr_db(_y(src, ev), _y(out, ev)) >= MIN_LAYER_SQNR_DB
