"""Tiny float models for the W8A8 tests, built with onnx.helper and fixed seeds."""

import numpy as np
import onnx
from onnx import helper as oh
from onnx import numpy_helper as nh


def _init(name, a):
    return nh.from_array(np.asarray(a, np.float32), name)


def cnn(path, *, seed=0, dw_outlier=False):
    """x[N,3,16,16] → Conv3x3 → Clip(0,6) → DWConv → Clip → Conv1x1 (+ residual Add) → Conv1x1 → GAP → Flatten → Gemm."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)) * 0.4
    w2 = rng.standard_normal((8, 1, 3, 3)) * 0.5
    if dw_outlier:
        w2[0, 0, 0, 0] = 12.0  # a high-pass kernel with one large tap: rounding shifts the output mean
        w2[0, 0, 0, 1] = -11.0
    w3 = rng.standard_normal((8, 8, 1, 1)) * 0.4
    w4 = rng.standard_normal((16, 8, 1, 1)) * 0.4
    wf = rng.standard_normal((5, 16)) * 0.5
    inits = [
        _init("w1", w1), _init("b1", rng.standard_normal(8) * 0.1),
        _init("w2", w2), _init("b2", rng.standard_normal(8) * 0.1),
        _init("w3", w3), _init("b3", rng.standard_normal(8) * 0.1),
        _init("w4", w4), _init("b4", rng.standard_normal(16) * 0.1),
        _init("wf", wf), _init("bf", rng.standard_normal(5) * 0.1),
        _init("zero", 0.0), _init("six", 6.0),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Clip", ["c1", "zero", "six"], ["r1"], name="clip1"),
        oh.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dwconv"),
        oh.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="clip2"),
        oh.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="project"),
        oh.make_node("Add", ["c3", "r1"], ["s"], name="residual"),
        oh.make_node("Conv", ["s", "w4", "b4"], ["c4"], name="expand"),
        oh.make_node("Relu", ["c4"], ["r4"], name="relu4"),
        oh.make_node("GlobalAveragePool", ["r4"], ["g"], name="gap"),
        oh.make_node("Flatten", ["g"], ["f"], name="flatten"),
        oh.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    graph = oh.make_graph(nodes, "cnn", [oh.make_tensor_value_info("x", 1, ["batch", 3, 16, 16])],
                          [oh.make_tensor_value_info("y", 1, ["batch", 5])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def encoder_block(path, *, seed=0, outlier_channel=None):
    """x[B,S,16] → LayerNorm → MatMul(+bias Add) → Relu → MatMul → residual Add → LayerNorm; a mask input too.

    ``outlier_channel``: make LayerNorm's gamma large on that channel (an activation outlier).
    """
    rng = np.random.default_rng(seed)
    d, h = 16, 32
    gamma = np.ones(d)
    if outlier_channel is not None:
        gamma[outlier_channel] = 40.0
    inits = [
        _init("gamma", gamma), _init("beta", np.zeros(d)),
        _init("w1", rng.standard_normal((d, h)) * 0.3), _init("b1", rng.standard_normal(h) * 0.1),
        _init("w2", rng.standard_normal((h, d)) * 0.3), _init("b2", rng.standard_normal(d) * 0.1),
        _init("neg", -3.4028234663852886e38), _init("one", 1.0),
    ]
    nodes = [
        oh.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln1"),
        oh.make_node("MatMul", ["ln", "w1"], ["m1"], name="ffn1"),
        oh.make_node("Add", ["m1", "b1"], ["a1"], name="ffn1_bias"),
        oh.make_node("Relu", ["a1"], ["r1"], name="act"),
        oh.make_node("MatMul", ["r1", "w2"], ["m2"], name="ffn2"),
        oh.make_node("Add", ["m2", "b2"], ["a2"], name="ffn2_bias"),
        oh.make_node("Add", ["a2", "x"], ["res"], name="residual"),
        # an additive mask as transformers export it: (1 - mask) * finfo.min, then added
        oh.make_node("Sub", ["one", "mask"], ["inv"], name="inv_mask"),
        oh.make_node("Mul", ["inv", "neg"], ["bias"], name="mask_bias"),
        oh.make_node("Add", ["res", "bias"], ["masked"], name="apply_mask"),
        oh.make_node("MatMul", ["masked", "w2t"], ["y"], name="head"),
    ]
    inits.append(_init("w2t", rng.standard_normal((d, 4)) * 0.3))
    graph = oh.make_graph(
        nodes, "enc",
        [oh.make_tensor_value_info("x", 1, ["batch", "seq", d]), oh.make_tensor_value_info("mask", 1, ["batch", "seq", 1])],
        [oh.make_tensor_value_info("y", 1, ["batch", "seq", 4])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def cnn_feeds(n=6, seed=1, batch=4):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def encoder_feeds(n=6, seed=1):
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        seq = 5 + i  # variable sequence lengths
        mask = np.ones((2, seq, 1), np.float32)
        mask[1, seq - 2:] = 0.0
        feeds.append({"x": rng.standard_normal((2, seq, 16)).astype(np.float32), "mask": mask})
    return feeds


def conv_if(path, *, seed=0):
    """x[N,4,L] → Conv1d → Relu → Conv1d → Relu → If(L == 1: Squeeze; else ReduceMean over L) → MatMul:
    silero-vad's decoder, whose If branches read the encoder's last Relu output from the graph around them."""
    rng = np.random.default_rng(seed)
    then_branch = oh.make_graph(
        [oh.make_node("Squeeze", ["r", "axis2"], ["sq"], name="squeeze_in_then")], "then", [],
        [oh.make_tensor_value_info("sq", 1, None)], [nh.from_array(np.array([2], np.int64), "axis2")])
    else_branch = oh.make_graph(
        [oh.make_node("ReduceMean", ["r", "axis2_e"], ["mean"], keepdims=0, name="mean_in_else")], "else", [],
        [oh.make_tensor_value_info("mean", 1, None)], [nh.from_array(np.array([2], np.int64), "axis2_e")])
    inits = [_init("w0", rng.standard_normal((4, 4, 3)) * 0.4), _init("b0", rng.standard_normal(4) * 0.1),
             _init("w", rng.standard_normal((8, 4, 3)) * 0.4), _init("b", rng.standard_normal(8) * 0.1),
             _init("wf", rng.standard_normal((8, 3)) * 0.5),
             nh.from_array(np.array(2, np.int64), "two"), nh.from_array(np.array(1, np.int64), "one")]
    nodes = [
        oh.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1], name="conv0"),
        oh.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        oh.make_node("Conv", ["r0", "w", "b"], ["c"], pads=[1, 1], name="conv"),
        oh.make_node("Relu", ["c"], ["r"], name="relu"),
        oh.make_node("Shape", ["r"], ["shape"], name="shape"),
        oh.make_node("Gather", ["shape", "two"], ["length"], name="length"),
        oh.make_node("Equal", ["length", "one"], ["single"], name="is_single"),
        oh.make_node("If", ["single"], ["pooled"], then_branch=then_branch, else_branch=else_branch, name="pool"),
        oh.make_node("MatMul", ["pooled", "wf"], ["y"], name="fc"),
    ]
    graph = oh.make_graph(nodes, "conv_if", [oh.make_tensor_value_info("x", 1, ["batch", 4, "length"])],
                          [oh.make_tensor_value_info("y", 1, ["batch", 3])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def conv_if_feeds(n=6, seed=1, length=16):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 4, length)).astype(np.float32)} for _ in range(n)]
