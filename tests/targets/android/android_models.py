"""Tiny models for the Android target tests, built inline with onnx.helper (fixed seeds).

The QDQ models are written by hand in the form edgeq's weight pass produces (int8 symmetric
per channel; int4 symmetric blocks of 32 along K, opset 21), so these tests do not depend on
the quantizer.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

METADATA = {"edgeq.recipe": "w8a16", "edgeq.profile": "android",
            "edgeq.summary": '{"fallbacks": 0, "recipe": "w8a16", "weights": {"int8": 2}}'}


def _model(nodes, inputs, outputs, inits, opset=21, domains=(), metadata=None):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    *(helper.make_opsetid(d, 1) for d in domains)])
    model.ir_version = 10
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    return model


def _save(model, path):
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def dq_weight(name, w, bits, axis):
    """DequantizeLinear(int8 per channel | int4 blocks of 32) of the float weight ``w``; (node, inits)."""
    if bits == 8:
        amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
        scale = (np.maximum(amax, 1e-8) / 127).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        inits = [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_s")]
        attrs = {"axis": axis}
    else:
        moved = np.moveaxis(w, axis, 0)
        k = moved.shape[0]
        blocks = moved.reshape(k // 32, 32, *moved.shape[1:])
        scale = (np.maximum(np.abs(blocks).max(axis=1), 1e-8) / 7).astype(np.float32)
        q = np.clip(np.round(blocks / scale[:, None]), -8, 7).reshape(moved.shape)
        q = np.moveaxis(q, 0, axis).astype(np.int64)
        scale = np.moveaxis(scale, 0, axis)
        inits = [helper.make_tensor(f"{name}_q", TensorProto.INT4, list(w.shape), q.flatten().tolist()),
                 numpy_helper.from_array(np.ascontiguousarray(scale), f"{name}_s")]
        attrs = {"axis": axis, "block_size": 32}
    node = helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [f"{name}_dq"],
                            name=f"{name}_dequantize", **attrs)
    return node, inits


def qdq_mlp(path, bits=8, act="Sigmoid", seed=0, metadata=METADATA):
    """x: float[batch, 64] → MatMul 64x64 → act → MatMul 64x32 → y: float[batch, 32], weights behind DQ."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, 64)).astype(np.float32) / 8
    w2 = rng.standard_normal((64, 32)).astype(np.float32) / 8
    axis = 1 if bits == 8 else 0
    d1, i1 = dq_weight("fc1_w", w1, bits, axis)
    d2, i2 = dq_weight("fc2_w", w2, bits, axis)
    nodes = [d1, helper.make_node("MatMul", ["x", "fc1_w_dq"], ["h"], name="fc1"),
             helper.make_node(act, ["h"], ["a"], name="act"),
             d2, helper.make_node("MatMul", ["a", "fc2_w_dq"], ["y"], name="fc2")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], i1 + i2, metadata=metadata)
    return _save(model, path)


def qdq_convnet(path, bits=8, seed=0):
    """image: float[batch, 32, 8, 8] → Conv 32→16 3x3 → Relu → GlobalAveragePool → logits[batch, 16, 1, 1]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 32, 3, 3)).astype(np.float32) / 20
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) / 10, "conv_b")
    d, inits = dq_weight("conv_w", w, bits, 0 if bits == 8 else 1)
    nodes = [d, helper.make_node("Conv", ["image", "conv_w_dq", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["logits"], name="pool")]
    model = _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 32, 8, 8])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 16, 1, 1])], inits + [b],
                   metadata={"edgeq.recipe": f"w{bits}a16"})
    return _save(model, path)


def float_mlp(path, seed=0):
    """The float model of :func:`qdq_mlp` (for quantizer round trips)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) / 8, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32) / 8, "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Sigmoid", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], [w1, w2])
    return _save(model, path)


def float_convnet(path, seed=0):
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((16, 32, 3, 3)).astype(np.float32) / 20, "conv.weight")
    nodes = [helper.make_node("Conv", ["image", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["logits"], name="pool")]
    model = _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 32, 8, 8])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 16, 1, 1])], [w])
    return _save(model, path)


def with_extra_node(path, node, inputs, outputs, domains=(), opset=21):
    """A one-node model of any op, with the given graph inputs/outputs (name, elem type, shape)."""
    model = _model([node], [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                   [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], [], opset=opset, domains=domains)
    onnx.save(model, str(path))
    return path


def qdq_a8_convnet(path, seed=0, act_type=TensorProto.UINT8):
    """W8A8 static QDQ: Q/DQ on the image and the Conv output (uint8 or int8), int8 per-channel weights."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 32, 3, 3)).astype(np.float32) / 20
    d, inits = dq_weight("conv_w", w, 8, 0)
    zp_in = 128 if act_type == TensorProto.UINT8 else 0
    inits += [numpy_helper.from_array(np.array(4.0 / 255, np.float32), "x_s"),
              helper.make_tensor("x_zp", act_type, [], [zp_in]),
              numpy_helper.from_array(np.array(2.0 / 255, np.float32), "c_s"),
              helper.make_tensor("c_zp", act_type, [], [zp_in])]
    nodes = [helper.make_node("QuantizeLinear", ["image", "x_s", "x_zp"], ["image_q"], name="image_quantize"),
             helper.make_node("DequantizeLinear", ["image_q", "x_s", "x_zp"], ["image_dq"], name="image_dequantize"),
             d, helper.make_node("Conv", ["image_dq", "conv_w_dq"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "c_s", "c_zp"], ["c_q"], name="c_quantize"),
             helper.make_node("DequantizeLinear", ["c_q", "c_s", "c_zp"], ["c_dq"], name="c_dequantize"),
             helper.make_node("GlobalAveragePool", ["c_dq"], ["logits"], name="pool")]
    model = _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 32, 8, 8])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 16, 1, 1])], inits,
                   metadata={"edgeq.recipe": "w8a8", "edgeq.calibration_sha256": "0" * 64})
    return _save(model, path)
