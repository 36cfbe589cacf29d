"""Tiny ONNX models for the Core ML target tests, and a helper that packages and reloads them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
               np.dtype(np.int32): TensorProto.INT32, np.dtype(np.bool_): TensorProto.BOOL}


def single_op(op: str, inputs: dict, attrs: dict | None = None, *, outputs: int = 1, opset: int = 21,
              dynamic: dict | None = None, extra_nodes=()) -> tuple[onnx.ModelProto, dict]:
    """One ``op`` node; ``inputs`` maps name -> ("input", array) for a graph input (the array is the
    feed) or ("const", array) for an initializer. ``dynamic`` names axes of inputs: {name: {axis: "batch"}}."""
    graph_in, inits, feed = [], [], {}
    for name, (kind, arr) in inputs.items():
        if kind == "absent":  # an optional input left out
            continue
        arr = np.asarray(arr)
        if kind == "const":
            inits.append(numpy_helper.from_array(arr, name))
            continue
        dims = list(arr.shape)
        for axis, label in (dynamic or {}).get(name, {}).items():
            dims[axis] = label
        graph_in.append(helper.make_tensor_value_info(name, _NP_TO_ONNX[arr.dtype], dims))
        feed[name] = arr
    outs = [f"y{i}" if outputs > 1 else "y" for i in range(outputs)]
    node = helper.make_node(op, [n if inputs[n][0] != "absent" else "" for n in inputs], outs, name=f"{op.lower()}_node", **(attrs or {}))
    nodes = [*extra_nodes, node]
    graph = helper.make_graph(nodes, op.lower(), graph_in,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, feed


def ort_session(model, *, exact: bool = True):
    """ORT on ``model`` (a ModelProto or a path). ``exact``: no graph optimizations at all, i.e. the
    QDQ graph's own semantics, DequantizeLinear + float op + QuantizeLinear. Even the basic level
    changes them: ORT 1.32's WeightBiasQuantization (a basic-level QDQ pass) turns a float Conv
    bias behind quantized input and weight into int32 with scale s_in * s_w, saturating it
    (EfficientNet-Lite0 W8A8: a dead channel's bias -3.74 runs as -0.64; 33 dB off at the logits)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def ort_run(model: onnx.ModelProto, feed: dict, *, exact: bool = True) -> list[np.ndarray]:
    return ort_session(model, exact=exact).run(None, feed)


def ort_values(model: onnx.ModelProto, feed: dict, names) -> dict[str, np.ndarray]:
    """Intermediate values of the exact ORT run, by ONNX name (added as graph outputs)."""
    m = onnx.shape_inference.infer_shapes(model)
    have = {o.name for o in m.graph.output}
    types = {v.name: v for v in m.graph.value_info}
    for n in names:
        if n not in have:
            m.graph.output.append(types[n])
    outs = ort_session(m).run(None, feed)
    return dict(zip([o.name for o in m.graph.output], outs))


def tiny_cnn(path, seed: int = 0) -> str:
    """x[batch,3,12,12] → Conv3x3(+b) → Clip(0,6) → depthwise Conv(+b) → Clip → Conv1x1(+b) → GAP →
    Flatten → Gemm(+b): W8A8 gives it activation Q/DQ pairs, int8 weights with zero points and int32
    biases."""
    rng = np.random.default_rng(seed)

    def init(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", (8, 3, 3, 3), 0.4), init("b1", (8,), 0.1), init("w2", (8, 1, 3, 3), 0.5),
             init("b2", (8,), 0.1), init("w3", (12, 8, 1, 1), 0.4), init("b3", (12,), 0.1),
             init("wf", (5, 12), 0.5), init("bf", (5,), 0.1),
             numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(6), "six")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Clip", ["c1", "zero", "six"], ["r1"], name="clip1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dwconv"),
        helper.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="clip2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="project"),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 12, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])
    graph = helper.make_graph(nodes, "cnn", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def cnn_feeds(n: int = 3, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


def package_and_load(model: onnx.ModelProto, folder, *, deployment: int = 18, compute: str = "fp32", shapes=None):
    """Build the .mlpackage, then load the *saved* package back into the reference executor."""
    from targets.coreml.build import build_mlpackage
    from targets.coreml.executor import Executor

    dest = folder / "m.mlpackage"
    low, facts = build_mlpackage(model, dest, deployment=deployment, compute=compute, shapes=shapes)
    return Executor.from_package(dest), low, facts, dest


def rng_array(shape, seed=0, dtype=np.float32, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


# CASES of test_coreml_ops whose MIL program has no ONNX translation (the runner falls back to numpy)
UNTRANSLATED = {"avg_pool_ceil_exclude_pad": "ceil_mode", "conv_transpose": "conv_transpose",
                "resize_linear_align_corners": "upsample_bilinear", "resize_linear_half_pixel": "upsample_bilinear",
                "resize_nearest": "upsample_nearest_neighbor"}


def translated_run(ex, feed, case: str):
    """The program of executor ``ex`` translated to ONNX Runtime, run on ``feed``; None (after checking
    the reason given) for a case listed in UNTRANSLATED."""
    import pytest

    from targets.coreml.executor.to_onnx import OrtProgram, Untranslatable

    if case in UNTRANSLATED:
        with pytest.raises(Untranslatable, match=UNTRANSLATED[case]):
            OrtProgram(ex)
        return None
    return OrtProgram(ex).run(feed)
