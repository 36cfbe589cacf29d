"""Fold constant per-channel ``Mul``s (input scalings, protection masks) into the node that makes their input.

Input scalings (AWQ, smoothing: :mod:`edgeq.passes.scale_inputs`) write ``Mul(x, 1/s)`` before the
MatMuls they scale, and protection writes ``Mul(x, mask)``. In the portable graph they stay separate
(every target and ``edgeq analyze`` find them by their ``edgeq.role``). On ONNX Runtime each is a kernel
call of its own, and at decode (one token) a call on a few hundred floats is mostly ORT's per-node
overhead: SmolLM2 w4a16 had 113 such Muls where the onnxruntime-genai builder's graph has none (1.4 of
14.4 ms of kernel time per token in ORT's profiler, which inflates small kernels; folding 90 of them
measured 0–3 % of decode CPU time, 1 thread). This pass moves the factor ``c`` into what computes ``x``,
where that node can take a per-channel factor:

- ``x`` is an RMS normalization's output (``SimplifiedLayerNormalization``, ORT's
  ``SkipSimplifiedLayerNormalization`` output 0, ``RMSNormalization``): its weight ``γ`` becomes ``γ·c``;
- ``x = h @ W`` or ``x = g ⊙ (h @ W)`` (a gated MLP's product, the down projection's input): ``W``'s
  columns times ``c`` — a float ``W``, or a weight-only DequantizeLinear's per-column scales (blocks along
  the input axis, or one scale per column): the integers and zero points stay as they are;
- ``x = Mul(y, c0)`` with ``c0`` constant (a protection mask before a scaling): one ``Mul(y, c0·c)``.

Each fold is exact in real arithmetic; in float32 it rounds ``γ·c`` (or ``scale·c``) once instead of the
product ``(x)·c`` — differences of an ulp, far below the int4 weights' error. A ``Mul`` whose input is read
elsewhere too, or whose factor does not run along the absorbing node's channels, is left as it is (the
attention output's scaling before ``o_proj``: ``GroupQueryAttention`` has no output scale, and its value
heads are shared by several query heads, so the factor cannot move into the value projection).

onnxscript's rewriter has no rule that moves a constant factor into a normalization's weight or a
DequantizeLinear's scales; these rules edit the constants directly with onnx_ir.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgeq.graph import constant, drop_if_unused

_RMS_NORMS = {  # (domain, op) -> index of the weight γ
    ("", "SimplifiedLayerNormalization"): 1,
    ("com.microsoft", "SimplifiedLayerNormalization"): 1,
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): 2,
    ("", "RMSNormalization"): 1,
}


@dataclasses.dataclass
class FoldScalingsResult(ir.passes.PassResult):
    folded: dict[str, int] = dataclasses.field(default_factory=dict)  # where the factors went -> how many


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _only_use_is(value: ir.Value | None, node: ir.Node) -> bool:
    return value is not None and not value.is_graph_output() and [u.node for u in value.uses()] == [node]


def _own_float_constant(value: ir.Value | None) -> np.ndarray | None:
    """The float32 array of a constant read by one node only (safe to change in place)."""
    if value is None or value.const_value is None or len(value.uses()) != 1 or value.is_graph_input():
        return None
    if value.const_value.dtype != ir.DataType.FLOAT:
        return None
    return value.const_value.numpy()


def _channel_factor(mul: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """(x, c) for ``Mul(x, c)`` with ``c`` a float32 constant along the last axis only (shape [N] or [1, .., N])."""
    if mul.op_type != "Mul" or _domain(mul) != "" or len(mul.inputs) != 2:
        return None
    for i in (0, 1):
        c, x = mul.inputs[i], mul.inputs[1 - i]
        if x is None or x.const_value is not None or c is None or c.const_value is None:
            continue
        if c.const_value.dtype != ir.DataType.FLOAT:
            return None
        arr = c.const_value.numpy()
        if arr.ndim == 0 or any(d != 1 for d in arr.shape[:-1]):
            return None
        if arr.ndim > 1 and (x.shape is None or len(x.shape) < arr.ndim):  # c may widen x's rank
            return None
        return x, arr.reshape(-1)
    return None


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=value.name)


def _into_norm(x: ir.Value, c: np.ndarray, graph: ir.Graph) -> bool:
    node = x.producer()
    index = _RMS_NORMS.get((_domain(node), node.op_type))
    if index is None or node.outputs[0] is not x or len(node.inputs) <= index:
        return False
    weight = node.inputs[index]
    if weight is None or weight.const_value is None or weight.is_graph_input() or \
            weight.const_value.dtype != ir.DataType.FLOAT:
        return False
    gamma = weight.const_value.numpy()
    if gamma.ndim != 1 or gamma.shape[0] != c.shape[0]:
        return False
    if len(weight.uses()) == 1:
        _set(weight, gamma * c)
    else:  # a weight shared by several norms (equal weights stored once): this norm gets its own
        node.replace_input_with(index, constant(graph, f"{weight.name}_{node.name}", np.ascontiguousarray(gamma * c, np.float32)))
    return True


def _projection_columns(w: ir.Value, n: int) -> list[tuple[ir.Value, int]] | None:
    """The constants holding ``W``'s per-output-column factors (value, axis of the columns) for ``W [K, n]``:
    a float constant, or a weight-only DequantizeLinear's scale; None when none can take a column factor."""
    if w.const_value is not None:
        arr = _own_float_constant(w)
        return [(w, 1)] if arr is not None and arr.ndim == 2 and arr.shape[1] == n else None
    dq = w.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or _domain(dq) != "" or len(w.uses()) != 1:
        return None
    data, scale = dq.inputs[0], dq.inputs[1] if len(dq.inputs) > 1 else None
    if data is None or data.const_value is None or len(data.const_value.shape) != 2:
        return None
    arr = _own_float_constant(scale)
    if arr is None or data.const_value.shape[1] != n:
        return None
    axis = dq.attributes.get_int("axis", 1) % 2
    if dq.attributes.get_int("block_size", 0) and axis == 0 and arr.ndim == 2 and arr.shape[1] == n:
        return [(scale, 1)]  # blocks along K: scale [K / block, N]
    if not dq.attributes.get_int("block_size", 0) and axis == 1 and arr.shape == (n,):
        return [(scale, 0)]  # one scale per output column
    return None


def _into_projection(x: ir.Value, c: np.ndarray) -> bool:
    node = x.producer()
    candidates = [node]
    if node.op_type == "Mul" and _domain(node) == "":  # a gate: g ⊙ (h @ W), either side
        candidates = [v.producer() for v in node.inputs if v is not None and v.producer() is not None
                      and _only_use_is(v, node)]
    for mm in candidates:
        if mm.op_type != "MatMul" or _domain(mm) != "" or mm.inputs[1] is None:
            continue
        out = mm.outputs[0]
        if out.shape is not None and len(out.shape) and isinstance(out.shape[-1], int) and \
                out.shape[-1] != c.shape[0]:
            continue
        targets = _projection_columns(mm.inputs[1], c.shape[0])
        if targets is None:
            continue
        for value, axis in targets:
            arr = value.const_value.numpy()
            _set(value, arr * (c if axis == arr.ndim - 1 else c[:, None]))
        return True
    return False


def _into_mul(x: ir.Value, c: np.ndarray, graph: ir.Graph) -> bool:
    inner = x.producer()
    found = _channel_factor(inner)
    if found is None:
        return False
    k = 1 if inner.inputs[1] is not found[0] else 0  # the constant's index
    c0 = inner.inputs[k]
    if found[1].size not in (1, c.size):
        return False
    merged = found[1] * c  # [N]: both factors run along the last axis, neither widens the rank (_channel_factor)
    inner.replace_input_with(k, constant(graph, f"{c0.name}_times_{inner.name}_next", np.ascontiguousarray(merged, np.float32)))
    drop_if_unused(graph, c0)
    return True


class FoldScalingsPass(ir.passes.InPlacePass):
    """Remove per-channel constant Muls by folding them into their input's producer (see the module)."""

    def call(self, model: ir.Model) -> FoldScalingsResult:
        graph = model.graph
        folded: dict[str, int] = {}
        for mul in list(graph):
            found = _channel_factor(mul)
            if found is None or mul.outputs[0].is_graph_output():
                continue
            x, c = found
            if x.producer() is None or not _only_use_is(x, mul) or not np.all(np.isfinite(c)):
                continue
            for where, fold in (("norm_weight", lambda x, c: _into_norm(x, c, graph)),
                                ("projection_columns", _into_projection),
                                ("mul", lambda x, c: _into_mul(x, c, graph))):
                if fold(x, c):
                    factor = next(v for v in mul.inputs if v is not x)
                    mul.outputs[0].replace_all_uses_with(x)
                    graph.remove(mul, safe=True)
                    drop_if_unused(graph, factor)
                    folded[where] = folded.get(where, 0) + 1
                    break
        return FoldScalingsResult(model, modified=bool(folded), folded=folded)
