"""W8A8 on tiny models: where the Q/DQ pairs go, that ONNX Runtime fuses them into integer
kernels, that the numbers hold (SQNR thresholds stated per test), and the algorithms that
serve it (outlier smoothing, bias correction) reduce the error they target."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import optimized_ops
from w8a8_models import cnn, cnn_feeds, conv_if, conv_if_feeds, encoder_block, encoder_feeds

import edgeq
from edgeq.errors import InputError
from edgeq.quant.recipes import BiasCorrectionConfig, SmoothingConfig, preset
from edgeq.validate.metrics import sqnr_db


def _outputs(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0].reshape(-1) for f in feeds])  # sequence lengths differ


def _q(src, dst, recipe="w8a8", calib=None, **kw):
    return edgeq.quantize(src, dst, recipe, calib=calib, force=True, progress=False, **kw)


def test_cnn_placement_fusion_and_fidelity(tmp_path):
    src = cnn(tmp_path / "cnn.onnx")
    out = tmp_path / "cnn.w8a8.onnx"
    res = _q(src, out, calib=cnn_feeds())
    acts = {a.tensor: a for a in res.plan.activations}
    # Clip(0, 6) after a Conv is fused: no Q/DQ on the Conv output, the range stays in [0, 6] with zp 0
    assert "c1" not in acts and "c2" not in acts
    assert acts["r1"].zero_point == 0 and acts["r1"].hi <= 6.0 + 1e-6
    # the residual Add feeds a quantized Conv, so it is quantized with both its inputs
    assert "residual" in res.plan.integer_nodes and {"c3", "s"} <= acts.keys()
    # Flatten is same-scale: its input shares the scale of its output
    assert acts["g"].scale == acts["f"].scale and acts["g"].group == acts["f"].group
    # the model input stays float by default (the first Conv reads it in float)
    assert "x" not in acts
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QLinearConv") == 3 and "QLinearAdd" in ops and "QGemm" in ops
    assert "QLinearGlobalAveragePool" in ops
    eval_feeds = cnn_feeds(4, seed=7)  # evaluation data apart from calibration
    assert sqnr_db(_outputs(src, eval_feeds), _outputs(out, eval_feeds)) >= 25  # measured ~31 dB


def test_bias_is_int32_at_input_times_weight_scale(tmp_path):
    src = cnn(tmp_path / "cnn.onnx")
    out = tmp_path / "q.onnx"
    res = _q(src, out, calib=cnn_feeds())
    m = onnx.load(str(out))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    conv = next(n for n in m.graph.node if n.name == "project")
    producers = {o: n for n in m.graph.node for o in n.output}
    bias_dq, w_dq = producers[conv.input[2]], producers[conv.input[1]]
    assert inits[bias_dq.input[0]].dtype == np.int32
    s_in = next(a.scale for a in res.plan.activations if a.tensor == "r2")
    expect = (np.float32(s_in) * inits[w_dq.input[1]]).astype(np.float32)
    np.testing.assert_array_equal(inits[bias_dq.input[1]], expect)


def test_transformer_block_keeps_masked_tensors_float(tmp_path):
    src = encoder_block(tmp_path / "enc.onnx")
    out = tmp_path / "enc.w8a8.onnx"
    res = _q(src, out, calib=encoder_feeds())
    quantized = {a.tensor for a in res.plan.activations}
    assert "masked" not in quantized and "res" not in quantized
    reasons = " ".join(n.reason for n in res.plan.floats)
    assert "masking constants" in reasons
    # MatMul bias Adds feed no quantized op: MatMuls get quantized inputs and float outputs
    ops = optimized_ops(out, tmp_path)
    assert ops.count("MatMulIntegerToFloat") == 2
    feeds = encoder_feeds(4, seed=9)
    ref, got = _outputs(src, feeds), _outputs(out, feeds)
    valid = np.abs(ref) < 1e30
    assert sqnr_db(ref[valid], got[valid]) >= 25  # measured ~33 dB


def test_outlier_smoothing_reduces_error_on_a_planted_outlier_channel(tmp_path):
    src = encoder_block(tmp_path / "enc.onnx", outlier_channel=3)
    feeds, ev = encoder_feeds(6), encoder_feeds(4, seed=5)
    ref = _outputs(src, ev)
    valid = np.abs(ref) < 1e30
    base = preset("w8a8").with_algorithms(protect=None)  # smoothing measured on its own
    errs = {}
    for smoothing in ("off", "outliers"):
        rec = base.with_algorithms(smoothing=SmoothingConfig() if smoothing == "outliers" else None)
        out = tmp_path / f"{smoothing}.onnx"
        res = _q(src, out, rec, calib=feeds)
        errs[smoothing] = sqnr_db(ref[valid], _outputs(out, ev)[valid])
        smoothed = [a.tensor for a in res.plan.activations if a.source != a.tensor]  # made by a scaling
        assert bool(smoothed) == (smoothing == "outliers")
    assert errs["outliers"] >= errs["off"] + 3  # the outlier channel no longer sets the range


def test_bias_correction_reduces_error_on_a_planted_mean_shift(tmp_path):
    src = cnn(tmp_path / "cnn.onnx", dw_outlier=True)
    feeds, ev = cnn_feeds(6), cnn_feeds(4, seed=3)
    ref = _outputs(src, ev)
    rec = preset("w8a16")
    errs = {}
    for on in (False, True):
        out = tmp_path / f"bc{on}.onnx"
        res = _q(src, out, rec.with_algorithms(bias_correction=BiasCorrectionConfig() if on else None), calib=feeds)
        assert bool(res.plan.biases) == on
        errs[on] = sqnr_db(ref, _outputs(out, ev))
    assert errs[True] > errs[False]


def test_w8a8_without_calibration_data_is_a_clear_error(tmp_path):
    src = cnn(tmp_path / "cnn.onnx")
    with pytest.raises(InputError, match="needs calibration data"):
        _q(src, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("feeds, message", [
    ([], "no calibration feeds"),
    ([{"x": np.zeros((2, 3, 8, 8), np.float32)}], "x"),
    ([{"image": np.zeros((2, 3, 16, 16), np.float32)}], "x"),
])
def test_bad_calibration_data_writes_nothing(tmp_path, feeds, message):
    src = cnn(tmp_path / "cnn.onnx")
    with pytest.raises(InputError, match=message):
        _q(src, tmp_path / "q.onnx", calib=feeds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


def test_nan_weights_are_named(tmp_path):
    src = cnn(tmp_path / "cnn.onnx")
    m = onnx.load(src)
    w = next(t for t in m.graph.initializer if t.name == "w3")
    a = onnx.numpy_helper.to_array(w).copy()
    a[0, 0, 0, 0] = np.nan
    w.CopyFrom(onnx.numpy_helper.from_array(a, "w3"))
    onnx.save(m, src)
    with pytest.raises(InputError, match="w3.*project.*NaN"):
        _q(src, tmp_path / "q.onnx", "w8a16")
    assert not (tmp_path / "q.onnx").exists()


def test_near_dead_channel_bias_fits_int32_by_raising_its_weight_scale(tmp_path):
    src = cnn(tmp_path / "cnn.onnx")
    m = onnx.load(src)
    inits = {t.name: t for t in m.graph.initializer}
    w = onnx.numpy_helper.to_array(inits["w3"]).copy()
    b = onnx.numpy_helper.to_array(inits["b3"]).copy()
    w[2] *= 1e-9  # a dead channel that still carries a bias
    b[2] = 3.0
    inits["w3"].CopyFrom(onnx.numpy_helper.from_array(w, "w3"))
    inits["b3"].CopyFrom(onnx.numpy_helper.from_array(b, "b3"))
    onnx.save(m, src)
    out = tmp_path / "q.onnx"
    res = _q(src, out, calib=cnn_feeds())
    assert any(n.node == "project" and "raised on 1 channel" in n.reason for n in res.plan.notes)
    q = onnx.load(str(out))
    q_inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    bias_dq = producers[next(n for n in q.graph.node if n.name == "project").input[2]]
    bias_q = q_inits[bias_dq.input[0]]
    assert bias_q.dtype == np.int32 and np.abs(bias_q).max() <= 2**30
    # ONNX Runtime's own bias folding (basic level) must not change the numbers: nothing clips
    feeds = cnn_feeds(2, seed=4)
    runs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        s = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
        runs.append(np.concatenate([s.run(None, f)[0] for f in feeds]))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_a_quantized_conv_output_read_inside_if_branches(tmp_path):
    """silero-vad op15: the Conv's output must be quantized (QLinearConv needs a Q after it) and the
    If branches read it from the graph around them; they read the dequantized value."""
    src = conv_if(tmp_path / "conv_if.onnx")
    out = tmp_path / "q.onnx"
    res = _q(src, out, calib=conv_if_feeds(), profile="onnxruntime-cpu")
    act = next(a for a in res.plan.activations if a.tensor == "r")
    assert "pool" in act.consumers  # the If node stands for the reads inside its branches
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    pool = next(n for n in m.graph.node if n.name == "pool")
    branch_reads = {i for a in pool.attribute for n in a.g.node for i in n.input}
    assert "r_dequantized" in branch_reads and "r" not in branch_reads
    assert optimized_ops(out, tmp_path).count("QLinearConv") == 1  # the second Conv, between quantized tensors
    for length in (16, 1):  # both branches
        feeds = conv_if_feeds(4, seed=7, length=length)
        assert sqnr_db(_outputs(src, feeds), _outputs(out, feeds)) >= 25
