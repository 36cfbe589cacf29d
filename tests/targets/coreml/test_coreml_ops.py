"""Op-level: each ONNX op, lowered to MIL, saved, loaded back and run by the reference executor,
against ONNX Runtime on the same inputs.

Thresholds: fp32 compute ≥ 90 dB SQNR (only float summation order differs); fp16 compute
≥ 45 dB (fp16 storage of every tensor, ≈ 11 bits). The fp32 test also runs the program translated
to ONNX Runtime (targets.coreml.executor.to_onnx) against the numpy executor: ≥ 120 dB (measured
≥ 139 dB: ORT's and numpy's float32 kernels sum in another order; most cases are bit-identical).
"""

import numpy as np
import pytest
from coreml_models import ort_run, package_and_load, rng_array, single_op, translated_run

from edgeq.validate.metrics import sqnr_db

X4 = rng_array((2, 4, 9, 9), 1)


def _w(shape, seed=2):
    return rng_array(shape, seed, scale=0.5)


CASES = {
    "conv_groups_stride_pads": ("Conv", {"x": ("input", X4), "w": ("const", _w((6, 2, 3, 3))), "b": ("const", _w((6,)))},
                                {"group": 2, "strides": [2, 2], "pads": [1, 0, 1, 2]}),
    "conv_depthwise_dilated": ("Conv", {"x": ("input", X4), "w": ("const", _w((4, 1, 3, 3)))},
                               {"group": 4, "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "conv_same_upper_stride": ("Conv", {"x": ("input", X4), "w": ("const", _w((3, 4, 2, 2)))},
                               {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "conv_1x1": ("Conv", {"x": ("input", X4), "w": ("const", _w((8, 4, 1, 1)))}, {}),
    "conv_1d": ("Conv", {"x": ("input", rng_array((2, 3, 11), 3)), "w": ("const", _w((5, 3, 3)))}, {"pads": [1, 1]}),
    "conv_transpose": ("ConvTranspose", {"x": ("input", X4), "w": ("const", _w((4, 3, 3, 3))), "b": ("const", _w((3,)))},
                       {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    "max_pool": ("MaxPool", {"x": ("input", X4)}, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "avg_pool_ceil_exclude_pad": ("AveragePool", {"x": ("input", X4)},
                                  {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "global_avg_pool": ("GlobalAveragePool", {"x": ("input", X4)}, {}),
    "resize_nearest": ("Resize", {"x": ("input", X4), "roi": ("absent", None),
                                  "scales": ("const", np.array([1, 1, 2, 2], np.float32))},
                       {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    "resize_linear_half_pixel": ("Resize", {"x": ("input", X4), "roi": ("absent", None),
                                            "scales": ("const", np.array([1, 1, 2, 2], np.float32))},
                                 {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}),
    "resize_linear_align_corners": ("Resize", {"x": ("input", X4), "roi": ("absent", None),
                                               "scales": ("const", np.array([1, 1, 2, 2], np.float32))},
                                    {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    "batch_norm": ("BatchNormalization", {"x": ("input", X4), "s": ("const", _w((4,))), "b": ("const", _w((4,), 3)),
                                          "m": ("const", _w((4,), 4)), "v": ("const", np.abs(_w((4,), 5)) + 0.5)}, {}),
    "gemm_transb_alpha_beta": ("Gemm", {"a": ("input", rng_array((5, 7), 1)), "b": ("const", _w((3, 7))),
                                        "c": ("const", _w((3,)))}, {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    "matmul_batched": ("MatMul", {"a": ("input", rng_array((2, 3, 5, 7), 1)), "b": ("input", rng_array((2, 3, 7, 4), 2))}, {}),
    "softmax": ("Softmax", {"x": ("input", X4)}, {"axis": 1}),
    "layer_norm": ("LayerNormalization", {"x": ("input", X4), "g": ("const", _w((9,))), "b": ("const", _w((9,), 3))},
                   {"axis": -1, "epsilon": 1e-5}),
    "gelu_exact": ("Gelu", {"x": ("input", X4)}, {}),
    "gelu_tanh": ("Gelu", {"x": ("input", X4)}, {"approximate": "tanh"}),
    "erf": ("Erf", {"x": ("input", X4)}, {}),
    "hard_swish": ("HardSwish", {"x": ("input", X4 * 4)}, {}),
    "hard_sigmoid": ("HardSigmoid", {"x": ("input", X4 * 4)}, {"alpha": 0.25, "beta": 0.4}),
    "sigmoid": ("Sigmoid", {"x": ("input", X4)}, {}),
    "tanh": ("Tanh", {"x": ("input", X4)}, {}),
    "relu": ("Relu", {"x": ("input", X4)}, {}),
    "clip_relu6": ("Clip", {"x": ("input", X4 * 5), "lo": ("const", np.float32(0)), "hi": ("const", np.float32(6))}, {}),
    "pow_square": ("Pow", {"x": ("input", X4), "p": ("const", np.float32(2))}, {}),
    "sqrt": ("Sqrt", {"x": ("input", np.abs(X4) + 0.1)}, {}),
    "div": ("Div", {"x": ("input", X4), "d": ("const", np.abs(_w((9,))) + 0.5)}, {}),
    "sub_broadcast": ("Sub", {"x": ("input", X4), "d": ("const", _w((4, 1, 1)))}, {}),
    "reduce_mean": ("ReduceMean", {"x": ("input", X4), "axes": ("const", np.array([2, 3]))}, {"keepdims": 1}),
    "reduce_sum": ("ReduceSum", {"x": ("input", X4), "axes": ("const", np.array([1]))}, {"keepdims": 0}),
    "reduce_l2": ("ReduceL2", {"x": ("input", X4), "axes": ("const", np.array([-1]))}, {"keepdims": 1}),
    "where": ("Where", {"c": ("input", X4 > 0), "a": ("input", X4), "b": ("const", np.float32(-1.5))}, {}),
    "transpose": ("Transpose", {"x": ("input", X4)}, {"perm": [0, 2, 3, 1]}),
    "slice_steps": ("Slice", {"x": ("input", X4), "s": ("const", np.array([1, -7])), "e": ("const", np.array([9, 100])),
                              "a": ("const", np.array([2, 3])), "st": ("const", np.array([2, 1]))}, {}),
    "gather_negative": ("Gather", {"x": ("input", X4), "i": ("const", np.array([[0, -1], [2, 1]]))}, {"axis": 2}),
    "gather_elements": ("GatherElements", {"x": ("input", X4), "i": ("const", np.random.default_rng(0).integers(0, 9, (2, 4, 9, 3)))},
                        {"axis": 3}),
    "concat": ("Concat", {"a": ("input", X4), "b": ("const", _w((2, 1, 9, 9)))}, {"axis": 1}),
    "expand": ("Expand", {"x": ("input", rng_array((4, 1, 1), 1)), "s": ("const", np.array([2, 4, 3, 5]))}, {}),
    "unsqueeze": ("Unsqueeze", {"x": ("input", rng_array((2, 3, 4), 1)), "a": ("const", np.array([-1, 1]))}, {}),
    "squeeze": ("Squeeze", {"x": ("input", rng_array((2, 1, 3, 1), 1)), "a": ("const", np.array([1, 3]))}, {}),
    "flatten": ("Flatten", {"x": ("input", X4)}, {"axis": 2}),
    "pad_reflect": ("Pad", {"x": ("input", X4), "p": ("const", np.array([0, 0, 1, 2, 0, 0, 2, 1]))}, {"mode": "reflect"}),
    "tile": ("Tile", {"x": ("input", rng_array((2, 3), 1)), "r": ("const", np.array([2, 3]))}, {}),
    "prelu_per_channel": ("PRelu", {"x": ("input", X4), "s": ("const", _w((4, 1, 1)))}, {}),
    "prelu_after_linear": ("PRelu", {"x": ("input", rng_array((5, 7), 1)), "s": ("const", _w((7,)))}, {}),
    "prelu_scalar_rank3": ("PRelu", {"x": ("input", rng_array((2, 3, 5), 1)), "s": ("const", _w((1,)))}, {}),
    "prelu_per_channel_rank3": ("PRelu", {"x": ("input", rng_array((2, 3, 5), 1)), "s": ("const", _w((3, 1)))}, {}),
    "prelu_last_axis_rank4": ("PRelu", {"x": ("input", X4), "s": ("const", _w((9,)))}, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime_fp32(case, tmp_path):
    op, inputs, attrs = CASES[case]
    model, feed = single_op(op, inputs, attrs)
    expected = ort_run(model, feed)[0]
    ex, _, _, _ = package_and_load(model, tmp_path, compute="fp32")
    got = ex.run(feed)["y"]
    assert got.shape == expected.shape
    assert sqnr_db(expected, got) >= 90
    translated = translated_run(ex, feed, case)
    if translated is not None:
        assert translated["y"].dtype == got.dtype and sqnr_db(got, translated["y"]) >= 120


@pytest.mark.parametrize("case", ["conv_groups_stride_pads", "layer_norm", "softmax", "gelu_exact", "resize_linear_half_pixel",
                                  "matmul_batched", "avg_pool_ceil_exclude_pad", "prelu_per_channel",
                                  "prelu_after_linear"])
def test_op_matches_onnxruntime_fp16(case, tmp_path):
    op, inputs, attrs = CASES[case]
    model, feed = single_op(op, inputs, attrs)
    expected = ort_run(model, feed)[0]
    ex, _, _, _ = package_and_load(model, tmp_path, compute="fp16")
    got = ex.run(feed)["y"]
    assert sqnr_db(expected, got) >= 45


@pytest.mark.parametrize("zp_dtype", [np.uint8, np.int8])
def test_activation_quantize_dequantize_is_exact(zp_dtype, tmp_path):
    """QuantizeLinear → DequantizeLinear as MIL quantize/dequantize: the same codes as ORT (fp32)."""
    x = rng_array((3, 5, 7), 4, scale=2.0)
    zp = np.array(128 if zp_dtype == np.uint8 else 0, dtype=zp_dtype)
    model, feed = _qdq_model(x, zp)
    expected = ort_run(model, feed)[0]
    ex, low, _, _ = package_and_load(model, tmp_path, compute="fp32", deployment=17)
    assert low.mil_ops.get("quantize") == 1 and low.mil_ops.get("dequantize") == 1
    np.testing.assert_array_equal(ex.run(feed)["y"], expected)


def _qdq_model(x, zp):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                          [numpy_helper.from_array(np.array(0.03, np.float32), "s"), numpy_helper.from_array(zp, "zp")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m)
    return m, {"x": x}
