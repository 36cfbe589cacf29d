"""Quantization numerics: error bounds, SQNR per format, axis layouts, and ONNX DequantizeLinear parity.

Every numeric check states its threshold. SQNR thresholds sit a little below the value measured
on the seeded data (given next to each), so a regression in the numerics fails them.
"""

from dataclasses import FrozenInstanceError

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as onh
from onnx.reference import ReferenceEvaluator

from edgeq.errors import InputError
from edgeq.quant.formats import (
    QuantizedTensor,
    pack_4bit,
    quantize_int4_blockwise,
    quantize_int4_blockwise_asymmetric,
    quantize_int8_per_channel,
    quantize_int8_symmetric_per_tensor,
    quantize_mxfp4,
    quantize_uint8_per_tensor,
    round_to_e2m1,
)
from edgeq.validate.metrics import sqnr_db

E2M1_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)

# --- strategies ------------------------------------------------------------------------------

_f32 = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_subnormal=False)
weights = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40), elements=_f32)


def _expanded_scale(q: QuantizedTensor) -> np.ndarray:
    """The scale of every element, in float64 (written independently of QuantizedTensor's own)."""
    s = q.scale.astype(np.float64)
    if q.block_size is not None:
        s = np.repeat(s, q.block_size, axis=q.axis)[(slice(None),) * q.axis + (slice(0, q.data.shape[q.axis]),)]
    elif q.axis is not None:
        s = s.reshape([-1 if i == q.axis else 1 for i in range(q.data.ndim)])
    return np.broadcast_to(s, q.data.shape)


def _rounding_slack(dq: np.ndarray) -> np.ndarray:
    """Half a float32 ulp of each output: DQ itself rounds the product code * scale to float32."""
    return 0.5 * np.spacing(np.abs(dq.astype(np.float32))).astype(np.float64)


# --- round-trip error bounds -----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(weights, st.data())
def test_int8_round_trip_within_half_a_step(w, data):
    axis = data.draw(st.integers(-w.ndim, w.ndim - 1))
    q = quantize_int8_per_channel(w, axis)
    dq = q.dequantize()
    assert dq.dtype == np.float32 and q.scale.shape == (w.shape[axis],) and q.axis == axis % w.ndim
    assert q.data.min() >= -127 and q.data.max() <= 127  # the symmetric range, never -128
    # threshold: |w - dq| <= scale/2 per element, plus DQ's own float32 rounding of the product
    err = np.abs(w.astype(np.float64) - dq)
    assert np.all(err <= _expanded_scale(q) / 2 + _rounding_slack(dq))


@settings(max_examples=60, deadline=None)
@given(weights, st.data())
def test_int4_round_trip_within_half_a_step(w, data):
    axis = data.draw(st.integers(0, w.ndim - 1))
    block = data.draw(st.integers(1, 48))
    q = quantize_int4_blockwise(w, axis, block)
    dq = q.dequantize()
    assert q.data.dtype == np.int8 and q.data.min() >= -7 and q.data.max() <= 7  # -8 only via clip search
    # threshold: |w - dq| <= scale/2 per element, plus DQ's own float32 rounding of the product
    err = np.abs(w.astype(np.float64) - dq)
    assert np.all(err <= _expanded_scale(q) / 2 + _rounding_slack(dq))


def _e2m1_error_bound(a: np.ndarray) -> np.ndarray:
    """Worst rounding error, in units of the block scale X, for an element of magnitude a = |w|/X.

    The grid step is 0.5 below 2, 1 in [2, 4), 2 from 4, so round-to-nearest is off by at most
    half a step; above 6 the element saturates and is off by a - 6 (< 2, since a < 8 by the
    choice of X).
    """
    half_step = np.where(a < 2, 0.25, np.where(a < 4, 0.5, 1.0))
    return np.maximum(half_step, a - 6)


@settings(max_examples=60, deadline=None)
@given(weights, st.data())
def test_mxfp4_round_trip_within_half_a_grid_step(w, data):
    axis = data.draw(st.integers(0, w.ndim - 1))
    block = data.draw(st.sampled_from([1, 7, 32]))
    q = quantize_mxfp4(w, axis, block)
    dq = q.dequantize()
    x = _expanded_scale(q)
    assert np.all(np.log2(q.scale) == np.round(np.log2(q.scale)))  # powers of two
    a = np.abs(w.astype(np.float64)) / x
    assert np.all(a < 8)  # X = 2**(floor(log2 amax) - 2) puts every |w|/X below 8
    # threshold: exact bound, no slack: X is a power of two, so code * X is exact in float32
    err = np.abs(w.astype(np.float64) - dq)
    assert np.all(err <= x * _e2m1_error_bound(a))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda nb: st.tuples(
            hnp.arrays(np.float64, (nb, 32), elements=st.sampled_from(list(np.r_[E2M1_GRID, -E2M1_GRID[1:]]))),
            hnp.arrays(np.int64, (nb, 1), elements=st.integers(-30, 30)),
        )
    )
)
def test_mxfp4_represents_grid_values_exactly(args):
    vals, k = args
    w = (vals * np.exp2(k)).astype(np.float32)  # each block: e2m1 values times one power of two
    # threshold: exact equality
    assert np.array_equal(quantize_mxfp4(w, axis=1).dequantize(), w)


def test_e2m1_rounding_is_nearest_ties_to_even_and_saturating():
    mids = (E2M1_GRID[:-1] + E2M1_GRID[1:]) / 2  # the ties: .25 .75 1.25 1.75 2.5 3.5 5
    assert round_to_e2m1(mids).tolist() == [0, 1, 1, 2, 2, 4, 4]  # to the even code
    assert round_to_e2m1(np.array([6.9, 7.0, 100.0, -1e30])).tolist() == [6, 6, 6, -6]
    v = np.linspace(-10, 10, 40001)  # includes every tie; ml_dtypes' cast is RNE + saturating too
    assert np.array_equal(round_to_e2m1(v), v.astype(ml_dtypes.float4_e2m1fn).astype(np.float64))
    assert np.signbit(round_to_e2m1(np.array([-0.0, -0.1]))).tolist() == [False, False]


# --- SQNR on seeded weights ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian():
    return np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)  # a MatMul [K, N]


@pytest.fixture(scope="module")
def heavy_tailed():
    return np.random.default_rng(0).standard_t(3, (256, 512)).astype(np.float32)


def test_sqnr_per_format_on_gaussian_weights(gaussian):
    w = gaussian
    # thresholds (dB) a little below the measured values on this seed (in the comments)
    assert sqnr_db(w, quantize_int8_per_channel(w, 1).dequantize()) >= 42.0  # 43.09
    assert sqnr_db(w, quantize_int4_blockwise(w, 0, 32).dequantize()) >= 19.5  # 20.26
    assert sqnr_db(w, quantize_int4_blockwise(w, 0, 32, clip_search=True).dequantize()) >= 20.5  # 21.20
    assert sqnr_db(w, quantize_mxfp4(w, 0).dequantize()) >= 18.0  # 18.78


def test_sqnr_per_format_on_heavy_tailed_weights(heavy_tailed):
    w = heavy_tailed  # Student-t, 3 degrees of freedom
    assert sqnr_db(w, quantize_int8_per_channel(w, 1).dequantize()) >= 34.0  # 35.21
    assert sqnr_db(w, quantize_int4_blockwise(w, 0, 32).dequantize()) >= 16.0  # 16.78
    assert sqnr_db(w, quantize_int4_blockwise(w, 0, 32, clip_search=True).dequantize()) >= 17.0  # 17.52
    assert sqnr_db(w, quantize_mxfp4(w, 0).dequantize()) >= 16.3  # 16.98


@pytest.mark.parametrize("dist", ["gaussian", "heavy_tailed"])
def test_clip_search_lowers_error(dist, request):
    w = request.getfixturevalue(dist)
    plain = quantize_int4_blockwise(w, 0, 32)
    searched = quantize_int4_blockwise(w, 0, 32, clip_search=True)
    sse = lambda q: float(np.sum((w.astype(np.float64) - q.dequantize()) ** 2))  # noqa: E731
    assert sse(searched) < sse(plain)  # threshold: strictly lower total squared error
    assert searched.data.min() == -8  # clipped blocks use the full [-8, 7] range
    assert np.all(searched.scale <= plain.scale)  # every ratio tried is <= 1
    again = quantize_int4_blockwise(w, 0, 32, clip_search=True)
    assert np.array_equal(again.scale, searched.scale) and np.array_equal(again.data, searched.data)


def test_clip_search_on_an_embedding_sized_table():
    # speed is measured in tools/ benchmarks, not asserted here; this checks the layout at full size
    w = (np.random.default_rng(0).standard_normal((30522, 384)) * 0.05).astype(np.float32)
    q = quantize_int4_blockwise(w, 1, 32, clip_search=True)
    assert q.scale.shape == (30522, 12) and q.data.shape == w.shape


# --- axis layouts ----------------------------------------------------------------------------


def test_conv_oihw_per_output_channel():
    w = np.random.default_rng(1).standard_normal((16, 8, 3, 3)).astype(np.float32)
    q = quantize_int8_per_channel(w, 0)
    assert q.scale.shape == (16,) and q.axis == 0 and q.block_size is None
    np.testing.assert_array_equal(q.scale, (np.abs(w).reshape(16, -1).max(1) / 127).astype(np.float32))
    assert np.all(np.abs(q.data).reshape(16, -1).max(1) == 127)  # each channel's max hits the end code


def test_matmul_kn_per_column():
    w = np.random.default_rng(2).standard_normal((64, 48)).astype(np.float32)
    q = quantize_int8_per_channel(w, 1)
    assert q.scale.shape == (48,)
    np.testing.assert_array_equal(q.scale, (np.abs(w).max(0) / 127).astype(np.float32))
    assert quantize_int8_per_channel(w, -1).axis == 1  # negative axes are normalised


def test_matmul_blocked_along_k_with_a_partial_last_block():
    w = np.random.default_rng(3).standard_normal((80, 24)).astype(np.float32)  # K=80: blocks of 32, 32, 16
    q = quantize_int4_blockwise(w, 0, 32)
    assert q.scale.shape == (3, 24) and q.block_size == 32 and q.data.shape == (80, 24)
    for b, rows in enumerate([slice(0, 32), slice(32, 64), slice(64, 80)]):
        np.testing.assert_array_equal(q.scale[b], (np.abs(w[rows]).max(0) / 7).astype(np.float32))


def test_embedding_blocked_along_d():
    w = np.random.default_rng(4).standard_normal((50, 72)).astype(np.float32)  # [V, D]: 32, 32, 8
    q4, mx = quantize_int4_blockwise(w, 1, 32), quantize_mxfp4(w, 1)
    for q in (q4, mx):
        assert q.scale.shape == (50, 3) and q.axis == 1 and q.data.shape == (50, 72)
    tail_max = np.abs(w[:, 64:]).max(1)  # the partial block's own max sets its scale
    np.testing.assert_array_equal(q4.scale[:, 2], (tail_max / 7).astype(np.float32))
    np.testing.assert_array_equal(mx.scale[:, 2], np.exp2(np.floor(np.log2(tail_max)) - 2).astype(np.float32))


def test_block_larger_than_the_axis_is_one_block():
    w = np.random.default_rng(5).standard_normal((10, 4)).astype(np.float32)
    q = quantize_int4_blockwise(w, 0, 128)
    assert q.scale.shape == (1, 4)


# --- ONNX DequantizeLinear parity ------------------------------------------------------------


def _dq_model(q: QuantizedTensor, opset: int, *, scale: np.ndarray | None = None, **extra) -> onnx.ModelProto:
    """One DequantizeLinear node over initializers holding ``q`` in its ONNX form."""
    store = (lambda a: a.astype(ml_dtypes.int4)) if q.dtype == "int4" else (lambda a: a)
    inits = [onh.from_array(store(q.data), "W"), onh.from_array(q.scale if scale is None else scale, "S")]
    inputs = ["W", "S"]
    if q.zero_point is not None:
        inits.append(onh.from_array(store(q.zero_point), "Z"))
        inputs.append("Z")
    attrs = dict(extra)
    if q.axis is not None:
        attrs["axis"] = q.axis
    if q.block_size is not None:
        attrs["block_size"] = q.block_size
    node = oh.make_node("DequantizeLinear", inputs, ["Y"], **attrs)
    y = oh.make_tensor_value_info("Y", TensorProto.FLOAT, list(q.data.shape))
    graph = oh.make_graph([node], "dq", [], [y], initializer=inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10 if opset <= 21 else 11)
    onnx.checker.check_model(model, full_check=True)
    return model


def _reference(model: onnx.ModelProto) -> np.ndarray:
    return ReferenceEvaluator(model).run(None, {})[0]


def _onnxruntime(model: onnx.ModelProto) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the DQ kernel itself
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


_rng = np.random.default_rng(7)
_INT8_CASES = {
    "conv_oihw_axis0": quantize_int8_per_channel(_rng.standard_normal((6, 3, 3, 3)).astype(np.float32), 0),
    "matmul_kn_axis1": quantize_int8_per_channel(_rng.standard_normal((20, 12)).astype(np.float32), 1),
}
_INT4_CASES = {
    "matmul_k_axis0_partial": quantize_int4_blockwise(_rng.standard_normal((80, 24)).astype(np.float32), 0, 32),
    "embedding_d_axis1_partial": quantize_int4_blockwise(_rng.standard_normal((9, 72)).astype(np.float32), 1, 32),
    "clip_search": quantize_int4_blockwise(_rng.standard_normal((64, 16)).astype(np.float32), 0, 16, clip_search=True),
    "asymmetric_partial": quantize_int4_blockwise_asymmetric(_rng.standard_normal((80, 24)).astype(np.float32), 0, 32),
    "asymmetric_one_sided": quantize_int4_blockwise_asymmetric(np.abs(_rng.standard_normal((64, 8))).astype(np.float32),
                                                               0, 32, clip_search=False),
}


@pytest.mark.parametrize("case", [*_INT8_CASES, *_INT4_CASES])
def test_dequantize_matches_onnx_reference_and_onnxruntime(case):
    q = {**_INT8_CASES, **_INT4_CASES}[case]
    model = _dq_model(q, 21)
    ours = q.dequantize()
    # threshold: bit-exact in both (same float32 formula)
    np.testing.assert_array_equal(_reference(model), ours, strict=True)
    np.testing.assert_array_equal(_onnxruntime(model), ours, strict=True)


@settings(max_examples=60, deadline=None)
@given(weights, st.data())
def test_asymmetric_int4_round_trip_within_half_a_step(w, data):
    axis = data.draw(st.integers(0, w.ndim - 1))
    block = data.draw(st.integers(1, 48))
    q = quantize_int4_blockwise_asymmetric(w, axis, block, clip_search=False)
    dq = q.dequantize()
    assert q.zero_point is not None and q.zero_point.shape == q.scale.shape
    assert q.data.min() >= -8 and q.data.max() <= 7 and q.zero_point.min() >= -8 and q.zero_point.max() <= 7
    # threshold: without clipping every value lies in its block's grid: |w - dq| <= scale/2 (+ float32 slack)
    err = np.abs(w.astype(np.float64) - dq)
    slack = _rounding_slack(dq) + 1e-6 * _expanded_scale(q)  # the scale itself is rounded to float32
    assert np.all(err <= _expanded_scale(q) / 2 + slack)


def test_asymmetric_int4_beats_symmetric_on_one_sided_blocks():
    w = np.abs(np.random.default_rng(11).standard_normal((256, 32))).astype(np.float32)  # e.g. after a ReLU
    sym = sqnr_db(w, quantize_int4_blockwise(w, 0, 32, clip_search=True).dequantize())
    asym = sqnr_db(w, quantize_int4_blockwise_asymmetric(w, 0, 32).dequantize())
    assert asym >= sym + 4  # 16 levels over [0, max] instead of 8: measured about +6 dB


def test_float16_scales_match_dequantize_linear_23_output_dtype():
    w = np.random.default_rng(12).standard_normal((12, 96)).astype(np.float32)
    q = quantize_int4_blockwise(w, 1, 32, clip_search=True, scale_dtype=np.float16)
    assert q.scale.dtype == np.float16
    model = _dq_model(q, 23, output_dtype=TensorProto.FLOAT)
    # threshold: bit-exact in both (float16 scale widened to float32, then the same product)
    np.testing.assert_array_equal(_reference(model), q.dequantize(), strict=True)
    np.testing.assert_array_equal(_onnxruntime(model), q.dequantize(), strict=True)


@settings(max_examples=30, deadline=None)
@given(weights, st.data())
def test_dequantize_matches_onnx_reference_for_any_layout(w, data):
    axis = data.draw(st.integers(0, w.ndim - 1))
    block = data.draw(st.integers(1, 40))
    fmt = data.draw(st.sampled_from(["int8", "int4", "mxfp4"]))
    if fmt == "int8":
        q, opset = quantize_int8_per_channel(w, axis), 21
    elif fmt == "int4":
        q, opset = quantize_int4_blockwise(w, axis, block, clip_search=data.draw(st.booleans())), 21
    else:
        q, opset = quantize_mxfp4(w, axis, block), 23
    # threshold: bit-exact
    np.testing.assert_array_equal(_reference(_dq_model(q, opset)), q.dequantize(), strict=True)


@pytest.mark.parametrize("shape,axis", [((64, 24), 0), ((9, 72), 1), ((5, 33), 1)])
def test_mxfp4_matches_onnx_reference_opset23(shape, axis):
    w = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    q = quantize_mxfp4(w, axis)
    assert q.data.dtype == ml_dtypes.float4_e2m1fn
    # threshold: bit-exact (ONNX Runtime CPU has no float4e2m1 DequantizeLinear to compare with)
    np.testing.assert_array_equal(_reference(_dq_model(q, 23)), q.dequantize(), strict=True)


def test_mxfp4_scale_as_float8e8m0_needs_opset24():
    q = quantize_mxfp4(np.random.default_rng(9).standard_normal((64, 8)).astype(np.float32), 0)
    e8m0 = q.scale.astype(ml_dtypes.float8_e8m0fnu)
    np.testing.assert_array_equal(e8m0.astype(np.float32), q.scale)  # lossless: powers of two
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError), match="float8e8m0"):
        _dq_model(q, 23, scale=e8m0)
    model = _dq_model(q, 24, scale=e8m0, output_dtype=TensorProto.FLOAT)
    np.testing.assert_array_equal(_reference(model), q.dequantize())  # threshold: bit-exact


# --- activations -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6))
def test_uint8_range_covers_the_observed_range_and_zero(a, b):
    lo, hi = min(a, b), max(a, b)
    scale, zp = quantize_uint8_per_tensor(lo, hi)
    assert scale > 0 and scale == float(np.float32(scale)) and 0 <= zp <= 255 and isinstance(zp, int)
    assert (zp - zp) * scale == 0.0  # zero is code zp exactly
    # threshold: the representable [(-zp) s, (255-zp) s] reaches the widened range to within
    # half a step, plus the float32 rounding of the scale (2**-24 relative, times 255 steps)
    slack = scale / 2 + 255 * scale * 2**-23
    assert -zp * scale <= min(lo, 0.0) + slack
    assert (255 - zp) * scale >= max(hi, 0.0) - slack


def test_uint8_degenerate_and_one_sided_ranges():
    eps = float(np.finfo(np.float32).eps)
    assert quantize_uint8_per_tensor(0.0, 0.0) == (eps, 0)  # constant zero: tiny scale, zero exact
    assert quantize_uint8_per_tensor(3.0, 3.0) == (float(np.float32(3 / 255)), 0)  # widened to [0, 3]
    assert quantize_uint8_per_tensor(-2.0, -1.0)[1] == 255  # widened to [-2, 0]
    # zp comes from the stored float32 scale: 1 / fl32(2/255) = 127.4999..., so 127
    assert quantize_uint8_per_tensor(-1.0, 1.0) == (float(np.float32(2 / 255)), 127)


def test_uint8_params_in_onnxruntime_quantize_linear():
    lo, hi = -0.7, 3.1
    scale, zp = quantize_uint8_per_tensor(lo, hi)
    x = oh.make_tensor_value_info("X", TensorProto.FLOAT, [3])
    y = oh.make_tensor_value_info("Y", TensorProto.FLOAT, [3])
    inits = [onh.from_array(np.array(scale, np.float32), "S"), onh.from_array(np.array(zp, np.uint8), "Z")]
    nodes = [
        oh.make_node("QuantizeLinear", ["X", "S", "Z"], ["Q"]),
        oh.make_node("DequantizeLinear", ["Q", "S", "Z"], ["Y"]),
    ]
    graph = oh.make_graph(nodes, "qdq", [x], [y], initializer=inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"X": np.array([lo, 0.0, hi], np.float32)})[0]
    assert out[1] == 0.0  # threshold: zero exact
    np.testing.assert_allclose(out[[0, 2]], [lo, hi], rtol=0, atol=scale / 2)  # threshold: half a step


def test_int8_symmetric_per_tensor_scale():
    assert quantize_int8_symmetric_per_tensor(-2.54, 1.0) == float(np.float32(2.54 / 127))
    assert quantize_int8_symmetric_per_tensor(0.0, 0.0) == float(np.finfo(np.float32).eps)


# --- zeros -----------------------------------------------------------------------------------


def test_zero_channels_and_blocks_get_scale_one():
    w = np.random.default_rng(10).standard_normal((64, 6)).astype(np.float32)
    w[:, 2] = 0.0  # a dead output channel
    w[32:, 4] = -0.0  # one zero block along K
    q8 = quantize_int8_per_channel(w, 1)
    assert q8.scale[2] == 1.0 and np.all(q8.data[:, 2] == 0)
    blocked = [quantize_int4_blockwise(w, 0, 32, clip_search=c) for c in (False, True)] + [quantize_mxfp4(w, 0)]
    for q in blocked:
        assert q.scale[0, 2] == q.scale[1, 2] == q.scale[1, 4] == 1.0
        assert np.all(q.data[:, 2].astype(np.float32) == 0) and np.all(q.data[32:, 4].astype(np.float32) == 0)
    assert np.all(quantize_mxfp4(w, 0).data[32:, 4].view(np.uint8) == 0)  # -0 stored as +0
    z = np.zeros((4, 8), np.float32)
    for q in (quantize_int8_per_channel(z, 0), quantize_int4_blockwise(z, 1, 4), quantize_mxfp4(z, 1, 4)):
        assert np.all(q.scale == 1.0) and np.array_equal(q.dequantize(), z)


def test_tiny_weights_never_get_a_subnormal_scale():
    w = np.full((2, 4), 1e-40, np.float32)  # subnormal weights: max/127 would be subnormal too
    tiny = np.finfo(np.float32).tiny
    for q in (quantize_int8_per_channel(w, 0), quantize_int4_blockwise(w, 1, 4), quantize_mxfp4(w, 1, 4)):
        assert np.all(q.scale >= tiny)


# --- packing ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=7), elements=st.integers(-8, 7)))
def test_pack_4bit_matches_onnx_int4_and_uint4(v):
    assert pack_4bit(v).tobytes() == onh.from_array(v.astype(ml_dtypes.int4), "x").raw_data
    assert pack_4bit(v.astype(ml_dtypes.int4)).tobytes() == onh.from_array(v.astype(ml_dtypes.int4), "x").raw_data
    u = (v.astype(np.int16) + 8).astype(np.uint8)
    assert pack_4bit(u).tobytes() == onh.from_array(u.astype(ml_dtypes.uint4), "x").raw_data


def test_pack_4bit_matches_onnx_float4e2m1():
    v = np.array([0.5, 1, -1.5, 6, 3], np.float32).astype(ml_dtypes.float4_e2m1fn)
    assert pack_4bit(v).tobytes() == bytes.fromhex("217b05") == onh.from_array(v, "x").raw_data
    q = quantize_mxfp4(np.random.default_rng(11).standard_normal((7, 33)).astype(np.float32), 1)
    assert pack_4bit(q.data).tobytes() == onh.from_array(q.data, "x").raw_data


def test_nbytes_ideal():
    w = np.random.default_rng(12).standard_normal((80, 24)).astype(np.float32)
    assert quantize_int4_blockwise(w, 0, 32).nbytes_ideal == 80 * 24 // 2 + 3 * 24 * 4
    assert quantize_int8_per_channel(w, 1).nbytes_ideal == 80 * 24 + 24 * 4
    assert quantize_mxfp4(w[:, :1][:33], 0).nbytes_ideal == 17 + 2 * 4  # 33 nibbles pad to 17 bytes


def test_quantized_tensor_is_frozen_and_checked():
    q = quantize_int8_per_channel(np.ones((3, 2), np.float32), 0)
    with pytest.raises(FrozenInstanceError):
        q.axis = 1
    with pytest.raises(ValueError, match="per-axis scale"):
        QuantizedTensor(q.data, q.scale, None, 1, None, "int8")
    with pytest.raises(ValueError, match="float4e2m1"):
        QuantizedTensor(q.data, np.array(1.0, np.float32), None, None, None, "float4e2m1")


# --- bad input -------------------------------------------------------------------------------

_W = np.ones((4, 8), np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: quantize_int8_per_channel([[1.0, 2.0]], 0), "numpy array"),
        (lambda: quantize_int8_per_channel(np.ones((2, 2), np.int32), 0), "float array"),
        (lambda: quantize_int8_per_channel(np.array(1.0, np.float32), 0), "at least one axis"),
        (lambda: quantize_int8_per_channel(np.ones((0, 3), np.float32), 0), "one element"),
        (lambda: quantize_int8_per_channel(np.array([1.0, np.nan], np.float32), 0), "NaN"),
        (lambda: quantize_mxfp4(np.array([1.0, np.inf], np.float32), 0), "NaN or infinite"),
        (lambda: quantize_int8_per_channel(np.array([1e300]), 0), "float32 range"),
        (lambda: quantize_int8_per_channel(_W, 2), "axis 2 is out of range"),
        (lambda: quantize_int8_per_channel(_W, -3), "axis -3 is out of range"),
        (lambda: quantize_int8_per_channel(_W, True), "axis must be an integer"),
        (lambda: quantize_int4_blockwise(_W, 1.0, 4), "axis must be an integer"),
        (lambda: quantize_int4_blockwise(_W, 1, 0), "block_size must be a positive integer"),
        (lambda: quantize_int4_blockwise(_W, 1, -32), "block_size"),
        (lambda: quantize_mxfp4(_W, 1, 32.0), "block_size"),
        (lambda: quantize_uint8_per_tensor(1.0, -1.0), "greater than x_max"),
        (lambda: quantize_uint8_per_tensor(float("nan"), 1.0), "not finite"),
        (lambda: quantize_int8_symmetric_per_tensor(0.0, float("inf")), "not finite"),
        (lambda: pack_4bit(np.array([8], np.int8)), r"\[-8, 7\]"),
        (lambda: pack_4bit(np.array([16], np.uint8)), r"\[0, 15\]"),
        (lambda: pack_4bit(np.array([0.5], np.float32)), "cannot pack float32"),
    ],
)
def test_bad_input_raises_input_error(call, match):
    with pytest.raises(InputError, match=match):
        call()
