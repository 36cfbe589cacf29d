"""Remove nodes that copy their input at inference: Identity, and Dropout outside training."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass
class RemoveIdentityResult(ir.passes.PassResult):
    removed: dict[str, int] = dataclasses.field(default_factory=dict)  # op type -> nodes removed
    kept: tuple[tuple[str, str], ...] = ()  # (node name, why it stays)


class RemoveIdentityPass(ir.passes.InPlacePass):
    """Bypass every ``Identity`` and every inference ``Dropout``, in all graphs.

    Rules:

    - ``y = Identity(x)`` and ``y = Dropout(x, ...)`` in inference (Dropout-7/10: always;
      Dropout-12+: no ``training_mode`` input or a constant false one; any version: a constant
      ratio of 0; Dropout-1/6: ``is_test=1``) with its mask output unused: every reader of ``y``
      reads ``x``, the node goes.
    - When ``y`` is an output of its graph, ``x`` takes ``y``'s name, so the graph's outputs keep
      their names. That needs ``x`` produced by a node of the same graph and not itself a graph
      output; otherwise the node stays (a graph output cannot be one of the graph's inputs, an
      outer-scope value of a subgraph, or another output under a second name).

    onnx-ir's ``IdentityEliminationPass`` is not used: it raises on a subgraph output that is the
    Identity of an outer-scope value (silero-vad's ``If`` branches), and knows no Dropout.
    """

    def call(self, model: ir.Model) -> RemoveIdentityResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        removed: dict[str, int] = {}
        kept: list[tuple[str, str]] = []
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("Identity", "Dropout"):
                continue
            why = _dropout_in_training(node, opset) if node.op_type == "Dropout" else None
            why = why or _bypass(node)
            if why:
                kept.append((node.name or node.op_type, why))
            else:
                removed[node.op_type] = removed.get(node.op_type, 0) + 1
        return RemoveIdentityResult(model, modified=bool(removed), removed=removed, kept=tuple(kept))


def _dropout_in_training(node: ir.Node, opset: int) -> str | None:
    """Why this Dropout may drop values, or None when it copies its input."""
    if len(node.outputs) > 1 and node.outputs[1] is not None and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return "its mask output is used"
    ratio = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if ratio is None and "ratio" in node.attributes:
        ratio = np.asarray(node.attributes["ratio"].as_float())
    if ratio is not None and ratio.size == 1 and float(ratio.reshape(())) == 0.0:
        return None
    if opset < 7:
        attr = node.attributes.get("is_test")
        return None if attr is not None and attr.as_int() else "is_test is not set (training mode)"
    if opset < 12 or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    mode = _constant(node.inputs[2])
    if mode is None:
        return "training_mode is not a constant"
    return "training_mode is true" if bool(mode.reshape(-1)[0]) else None


def _constant(v: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer (not overridable as an input) or of a Constant node's output."""
    if v is None or v.is_graph_input():
        return None
    if v.const_value is not None:
        return v.const_value.numpy()
    producer = v.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def _bypass(node: ir.Node) -> str | None:
    """Remove ``node`` (output 0 equals input 0), or say why it must stay."""
    x, y = node.inputs[0] if node.inputs else None, node.outputs[0]
    graph = node.graph
    if x is None or graph is None:
        return "it has no input"
    if y.is_graph_output():
        producer = x.producer()
        if producer is None or producer.graph is not graph:
            return "its output is a graph output and its input is not computed in the same graph"
        if x.is_graph_output():
            return "its input is also a graph output"
        # keep the better-known shape and type under the output's name
        if x.shape is None:
            x.shape = y.shape
        if x.type is None:
            x.type = y.type
        name = y.name
        ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
        x.name = name
    else:
        ir.convenience.replace_all_uses_with(y, x)
    graph.remove(node, safe=True)
    return None
