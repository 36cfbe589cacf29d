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


def ort_run(model: onnx.ModelProto, feed: dict, *, basic: bool = True) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if basic:  # exact QDQ semantics: no fusions that change numerics
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def package_and_load(model: onnx.ModelProto, folder, *, deployment: int = 18, compute: str = "fp32", shapes=None):
    """Build the .mlpackage, then load the *saved* package back into the reference executor."""
    from targets.coreml.build import build_mlpackage
    from targets.coreml.executor import Executor

    dest = folder / "m.mlpackage"
    low, facts = build_mlpackage(model, dest, deployment=deployment, compute=compute, shapes=shapes)
    return Executor.from_package(dest), low, facts, dest


def rng_array(shape, seed=0, dtype=np.float32, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)
