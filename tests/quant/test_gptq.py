"""GPTQ: error-compensated rounding lowers the layer's output error, in the plan's own format."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import InputError
from edgeq.quant import gptq
from edgeq.quant.plan import WeightDecision
from edgeq.pipeline.quantize import quantize_model
from edgeq.quant.recipes import AWQConfig, GPTQConfig, WeightFormat, preset
from edgeq.quant.weights import quantize_weight

K, N = 96, 24


def correlated_inputs(rows: int, seed: int = 0) -> np.ndarray:
    """Inputs on a low-dimensional subspace plus a little noise: what real layer inputs look like."""
    basis = np.random.default_rng(1234).standard_normal((6, K))  # one subspace for every draw
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, 6)) @ basis + 0.05 * rng.standard_normal((rows, K))).astype(np.float32)


def decision(fmt: WeightFormat, **kw) -> WeightDecision:
    if fmt == WeightFormat.INT4:
        kw = {"axis": 0, "block": 32, "clip_search": True, "symmetric": False, **kw}
    else:
        kw = {"axis": 1, **kw}
    return WeightDecision("mm", "MatMul", 1, "w", (K, N), fmt, **kw)


def gram(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64).T @ x / len(x)


@pytest.mark.parametrize("d", [decision(WeightFormat.INT4), decision(WeightFormat.INT4, symmetric=True),
                               decision(WeightFormat.INT8)], ids=["int4-asym", "int4-sym", "int8"])
def test_gptq_lowers_output_error_on_held_out_inputs(d):
    w = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
    calib, held_out = correlated_inputs(2000), correlated_inputs(2000, seed=7)
    q_rtn = quantize_weight(w, d)
    q_gptq = gptq.gptq_quantize(w, d, gptq.prepare_hessian(gram(calib), 0.01))
    # same storage layout as round-to-nearest: targets read it the same way
    assert q_gptq.data.shape == q_rtn.data.shape and q_gptq.scale.shape == q_rtn.scale.shape
    assert q_gptq.dtype == q_rtn.dtype and (q_gptq.zero_point is None) == (q_rtn.zero_point is None)
    lo, hi = (-8, 7) if d.format == WeightFormat.INT4 else (-127, 127)
    assert q_gptq.data.min() >= lo and q_gptq.data.max() <= hi
    err = {name: np.mean((held_out @ w - held_out @ q.dequantize()) ** 2) for name, q in
           (("rtn", q_rtn), ("gptq", q_gptq))}
    assert err["gptq"] < 0.5 * err["rtn"], err  # measured: about 10x lower on this data


def _outlier_inputs(rows: int, seed: int) -> np.ndarray:
    """Correlated inputs with a few channels 8x larger than the rest (what act order is for)."""
    x = correlated_inputs(rows, seed)
    x[:, [3, 40, 77]] *= 8.0
    return x


@pytest.mark.parametrize("d", [decision(WeightFormat.INT4), decision(WeightFormat.INT8)], ids=["int4-asym", "int8"])
def test_act_order_rounds_the_largest_inputs_first_in_the_same_format(d):
    w = np.random.default_rng(5).standard_normal((K, N)).astype(np.float32)
    calib, held_out = _outlier_inputs(2000, 0), _outlier_inputs(2000, 7)
    h = gram(calib)
    order = gptq.act_order(h)
    assert set(order[:3]) == {3, 40, 77}
    plain = gptq.gptq_quantize(w, d, gptq.prepare_hessian(h, 0.01))
    ordered = gptq.gptq_quantize(w, d, gptq.prepare_hessian(h[np.ix_(order, order)], 0.01), order)
    assert ordered.data.shape == plain.data.shape and ordered.scale.shape == plain.scale.shape
    if d.format == WeightFormat.INT4:  # static groups: block grids chosen before compensation, as nearest does
        np.testing.assert_array_equal(ordered.scale, quantize_weight(w, d).scale)
    err = {name: np.mean((held_out @ w - held_out @ q.dequantize()) ** 2)
           for name, q in (("rtn", quantize_weight(w, d)), ("plain", plain), ("ordered", ordered))}
    assert err["ordered"] < 0.5 * err["rtn"] and err["ordered"] < 1.2 * err["plain"], err


def test_act_order_in_the_weight_order_is_plain_gptq_for_int8():
    w = np.random.default_rng(6).standard_normal((K, N)).astype(np.float32)
    u = gptq.prepare_hessian(gram(correlated_inputs(500)), 0.01)
    d = decision(WeightFormat.INT8)
    a, b = gptq.gptq_quantize(w, d, u), gptq.gptq_quantize(w, d, u, np.arange(K))
    np.testing.assert_array_equal(a.data, b.data)


def test_uncorrelated_inputs_give_round_to_nearest():
    """With a diagonal Hessian there is nothing to compensate: GPTQ is plain rounding, bit for bit."""
    w = np.random.default_rng(2).standard_normal((K, N)).astype(np.float32)
    h = np.diag(np.random.default_rng(3).uniform(0.5, 2.0, K))
    for d in (decision(WeightFormat.INT4), decision(WeightFormat.INT8)):
        a, b = gptq.gptq_quantize(w, d, gptq.prepare_hessian(h, 0.01)), quantize_weight(w, d)
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.scale, b.scale)


def test_transposed_gemm_layout_matches_round_to_nearest_layout():
    w = np.random.default_rng(4).standard_normal((N, K)).astype(np.float32)  # Gemm transB=1: [N, K]
    d = WeightDecision("g", "Gemm", 1, "w", (N, K), WeightFormat.INT4, axis=0, block=32, clip_search=True,
                       transpose=True, symmetric=False)
    q = gptq.gptq_quantize(w, d, gptq.prepare_hessian(gram(correlated_inputs(500)), 0.01))
    assert q.data.shape == (K, N) and q.scale.shape == (K // 32, N)
    d8 = WeightDecision("g", "Gemm", 1, "w", (N, K), WeightFormat.INT8, axis=0)
    q8 = gptq.gptq_quantize(w, d8, gptq.prepare_hessian(gram(correlated_inputs(500)), 0.01))
    assert q8.data.shape == (N, K) and q8.scale.shape == (N,)
    assert np.abs(q8.dequantize() - w).max() <= q8.scale.max() * 4  # compensation moves weights a few steps at most


def test_hessian_factor_handles_dead_inputs_and_rank_deficiency():
    x = correlated_inputs(10)  # 10 rows, K = 96: rank 10
    x[:, 5] = 0.0  # an input never seen
    u = gptq.prepare_hessian(gram(x), 0.01)
    assert u is not None and np.allclose(u, np.triu(u)) and np.all(np.isfinite(u))
    assert gptq.prepare_hessian(np.zeros((K, K)), 0.01) is None
    assert gptq.prepare_hessian(np.full((K, K), np.nan), 0.01) is None


def _matmul_model(path) -> str:
    rng = np.random.default_rng(5)
    w1 = numpy_helper.from_array((rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, str(path))
    return str(path)


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_w4a16_recipe_uses_gptq_when_calibration_is_given(tmp_path):
    src = _matmul_model(tmp_path / "m.onnx")
    calib = [{"x": correlated_inputs(64, seed=s)} for s in range(8)]
    ev = correlated_inputs(500, seed=99)
    ref = _run(src, ev)
    rec = preset("w4a16").with_algorithms(awq=None)  # GPTQ on its own
    assert preset("w4a16").algorithms.gptq == GPTQConfig(act_order=True)
    err = {}
    for rounding in ("nearest", "gptq"):
        out = tmp_path / f"{rounding}.onnx"
        res = quantize_model(src, out, rec.with_algorithms(gptq=GPTQConfig() if rounding == "gptq" else None),
                             calib=calib, progress=False)
        gptq = res.plan.result("gptq")
        assert sorted(gptq.nodes if gptq else []) == (["mm1", "mm2"] if rounding == "gptq" else [])
        err[rounding] = float(np.mean((_run(out, ev) - ref) ** 2))
    assert err["gptq"] < 0.7 * err["nearest"], err
    assert any(line.startswith("gptq: 2 MatMul/Gemm weights") for line in res.plan.algorithm_lines())
    assert res.plan.summary()["gptq"] == 2


def test_w4a16_without_calibration_rounds_to_nearest_and_says_so(tmp_path):
    src = _matmul_model(tmp_path / "m.onnx")
    res = quantize_model(src, tmp_path / "q.onnx", "w4a16", progress=False)
    assert not res.plan.result("gptq").ran and res.calibration is None
    assert any("gptq: not run" in a and "--calib" in a for a in res.plan.algorithm_lines())
    assert any("awq: not run" in a for a in res.plan.algorithm_lines())
    assert "gptq: not run" in res.plan.explain()


def test_awq_scales_up_the_rows_of_a_planted_high_energy_channel(tmp_path):
    """A few input channels with 20× the energy of the rest: AWQ gives their weight rows finer steps."""
    src = _matmul_model(tmp_path / "m.onnx")
    loud = np.ones(K, np.float32)
    loud[[3, 40, 77]] = 20.0

    def data(n, seed):
        return (np.random.default_rng(seed).standard_normal((n, K)) * loud).astype(np.float32)

    calib = [{"x": data(64, s)} for s in range(8)]
    ev = data(500, 99)
    ref = _run(src, ev)
    err = {}
    for on in (False, True):
        out = tmp_path / f"awq{on}.onnx"
        rec = preset("w4a16").with_algorithms(gptq=None, awq=AWQConfig() if on else None)  # AWQ on its own
        res = quantize_model(src, out, rec, calib=calib, progress=False)
        err[on] = float(np.mean((_run(out, ev) - ref) ** 2))
    assert any(a.startswith("awq: 1 of 2 MatMul inputs scaled") or a.startswith("awq: 2 of 2") for a in res.plan.algorithm_lines())
    assert err[True] < 0.9 * err[False], err  # measured: 0.83x the mean squared error of nearest rounding


def test_awq_is_refused_for_w8a8():
    with pytest.raises(InputError, match="awq is for weight-only recipes"):
        preset("w8a8").with_algorithms(awq=AWQConfig())
