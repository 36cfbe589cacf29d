"""The registry of op lowerings (filled by the family modules) and constant folding."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from targets.coreml.lower.context import Context, LoweringError

Lowering = Callable[[Context, onnx.NodeProto, list], list]
Check = Callable[[onnx.NodeProto, int], str | None]  # (node, iOS version) -> why it cannot be lowered

LOWERINGS: dict[str, Lowering] = {}
CHECKS: dict[str, Check] = {}


def lowers(*op_types: str, check: Check | None = None):
    """Register ``fn(ctx, node, inputs) -> outputs`` for ``op_types`` (with an optional static check).

    One lowering per op type: a second registration is an error (raised at import), naming both.
    """

    def deco(fn: Lowering) -> Lowering:
        taken = {op: LOWERINGS[op] for op in op_types if op in LOWERINGS}
        if taken:
            where = "; ".join(f"{op} by {_where(f)}" for op, f in taken.items())
            raise ValueError(f"Core ML lowering registered twice: {where}, again by {_where(fn)}")
        for op in op_types:
            LOWERINGS[op] = fn
            if check is not None:
                CHECKS[op] = check
        return fn

    return deco


def _where(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _gather_elements(node, ins):
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    data, idx = ins
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    if idx.shape != data.shape:  # ONNX allows smaller index dims off the axis
        data = data[tuple(slice(0, d) if i != axis else slice(None) for i, d in enumerate(idx.shape))]
    return [np.take_along_axis(data, idx, axis=axis)]


# ONNX reference kernels that are wrong with the numpy here get a numpy twin
_FOLDERS = {"GatherElements": _gather_elements}


def fold(node: onnx.NodeProto, ins: list, opset: int) -> list[np.ndarray]:
    """Evaluate a node whose inputs are all known, with ONNX reference semantics."""
    from onnx.reference import ReferenceEvaluator

    if node.op_type in _FOLDERS:
        return _FOLDERS[node.op_type](node, ins)

    feeds = {n: v for n, v in zip(node.input, ins) if n}
    try:
        outs = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise LoweringError(node, f"cannot fold constant node: {first}") from e
    return [np.asarray(o) for o in outs]
