"""Which task metrics a model gets: the caller's choice, a sample's declared task, or its output.

A classifier is recognised from its graph: one output of shape ``[batch, classes]`` (classes ≥ 2,
a fixed size) computed by a layer that produces scores — Gemm, MatMul (+ Add), Softmax,
LogSoftmax or Sigmoid at the end of the graph, possibly behind a Flatten/Reshape/Squeeze. A
sequence of class scores — one output of shape ``[batch, positions, classes]`` from Softmax or
LogSoftmax (a CTC text recognizer's per-frame characters, a token classifier's tags) — is a
classifier too, judged per position (:class:`~edgeq.validate.metrics.ClassifierStats` reads the last
axis); a rank-3 MatMul output is not taken for one (it may be hidden states). An embedding model
ends in a normalisation (Div / LpNormalization / ReduceMean pooling) and is not taken for a
classifier. A causal LM is the explicit-cache decoder step of
:mod:`edgeq.export.causal_lm`. When detection is unsure the task stays ``generic`` and the report says
how to ask for classification explicitly.
"""

from __future__ import annotations

import onnx

from edgeq.errors import InputError
from edgeq.onnx_io import default_opset
from edgeq.sources import TASKS

_SCORE_OPS = {"Gemm", "MatMul", "Softmax", "LogSoftmax", "Sigmoid"}
_PASS_THROUGH = {"Flatten", "Reshape", "Squeeze", "Identity"}
_PROBABILITY_OPS = {"Softmax", "LogSoftmax"}  # the only producers taken for per-position class scores


def detect_task(model: onnx.ModelProto) -> tuple[str, str]:
    """(task, why) from the graph of ``model``."""
    from edgeq.export.causal_lm import is_causal_lm_io

    outputs = list(model.graph.output)
    if is_causal_lm_io([i.name for i in model.graph.input], [o.name for o in outputs]):
        return "causal_lm", "a decoder step with an explicit KV cache (input_ids, past_key_values.* -> logits)"
    if len(outputs) != 1:
        return "generic", f"{len(outputs)} outputs (a classifier has one score output)"
    out = outputs[0]
    dims = out.type.tensor_type.shape.dim
    producer = {o: n for n in model.graph.node for o in n.output}
    if len(dims) == 3:
        return _per_position(out, dims, producer, default_opset(model))
    if len(dims) != 2:
        return "generic", f"output {out.name!r} has rank {len(dims)}, not [batch, classes]"
    classes = dims[1].dim_value if dims[1].HasField("dim_value") else 0
    if classes < 2:
        return "generic", f"output {out.name!r} has {classes or 'a dynamic number of'} values per sample"
    node, seen = producer.get(out.name), 0
    while node is not None and node.op_type in _PASS_THROUGH and seen < 4:
        node, seen = producer.get(node.input[0]), seen + 1
    if node is not None and node.op_type == "Add":  # MatMul + bias
        node = next((producer[i] for i in node.input if i in producer and producer[i].op_type == "MatMul"), node)
    if node is None or node.op_type not in _SCORE_OPS:
        op = node.op_type if node is not None else "a graph input"
        return "generic", f"output {out.name!r} [batch, {classes}] comes from {op}, not a score layer"
    return "classification", f"output {out.name!r} [batch, {classes}] from {node.op_type}"


def _per_position(out, dims, producer, opset: int) -> tuple[str, str]:
    """A ``[batch, positions, classes]`` output: class scores per position when a Softmax/LogSoftmax makes it
    over the last axis (before opset 13 the default axis 1 normalises positions and classes together)."""
    classes = dims[2].dim_value if dims[2].HasField("dim_value") else 0
    node = producer.get(out.name)
    op = node.op_type if node is not None else "a graph input"
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1) if node else None
    if classes < 2 or op not in _PROBABILITY_OPS or axis not in (-1, 2):
        return "generic", (f"output {out.name!r} has rank 3 from {op}: not [batch, classes], nor class "
                           "probabilities per position (Softmax/LogSoftmax over a last axis of fixed size)")
    return "classification", (f"output {out.name!r} [batch, positions, {classes}] from {op}: "
                              "class scores per position (top-1 judged per position)")


def resolve_task(task: str, *, sample=None, model: onnx.ModelProto | None = None,
                 wants_top1: bool = False) -> tuple[str, str]:
    """(task, why): ``task`` unless ``auto``; then the sample's, else detected from ``model``.

    ``wants_top1`` (a top-1 gate was asked for) makes an undetected model a classifier when its
    output has the shape of one.
    """
    if task not in ("auto", *TASKS):
        raise InputError(f"unknown task {task!r}", hint=f"use auto, {', '.join(TASKS)}")
    if task != "auto":
        return task, "given"
    if sample is not None:
        return sample.task, f"declared by sample {sample.name}"
    if model is None:
        if wants_top1:
            return "classification", "a top-1 agreement gate was given"
        return "generic", "no sample declares it (pass --task classification for a classifier)"
    found, why = detect_task(model)
    if found == "generic" and wants_top1:
        return "classification", f"a top-1 agreement gate was given ({why})"
    if found == "generic":
        why += "; pass --task classification if it is one"
    return found, f"detected: {why}"
