"""Control flow: ONNX ``If`` whose condition is known at conversion time.

The lowering folds everything it can (initializers, ``Constant``, and with fixed input shapes every
``Shape``-driven subgraph), so a condition such as "is the batch 1" or "is the sample rate 16000"
(when it is a constant) is a plain boolean by the time ``If`` is reached: the taken branch's nodes
are lowered in place, the other branch is dropped. A condition that depends on the model's
inputs at run time has no lowering (the reference executor does not run MIL control flow); the
pre-flight (:func:`if_problems`) says whether fixing input shapes would make it fold.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from targets.coreml.lower.context import Context, LoweringError, axis_name, is_known
from targets.coreml.lower.registry import lowers

ANDROID = "build for Android only (--targets android)"


@lowers("If")
def _if(ctx: Context, node, ins):
    from targets.coreml.lower import lower_nodes  # the graph walker (its module imports this one)

    cond = ins[0]
    if not is_known(cond):
        raise LoweringError(node, "the If condition depends on the model's inputs at run time, and Core ML "
                                  "programs edgeq builds have no control flow",
                            hint=f"fix the input shapes it depends on (edgeq package --shape AXIS=N), or {ANDROID}")
    taken = "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"
    branch = next(a.g for a in node.attribute if a.name == taken)
    for init in branch.initializer:
        ctx.set(init.name, numpy_helper.to_array(init))
    ctx.folded += lower_nodes(ctx, branch.node)
    return [ctx.get(o.name) for o in branch.output]


def if_problems(model: onnx.ModelProto, fixed: Mapping[str, int]) -> list[tuple[onnx.NodeProto, str, str]]:
    """(node, reason, hint) for each ``If`` whose condition cannot fold to a constant.

    A condition folds when it depends on no input value and, through ``Shape``/``Size``, only on
    input dimensions that are static or fixed (``fixed``: axis name -> size). This is decided from
    the graph's dependencies, before anything is built; a condition that passes can still fail to
    fold in the lowering (it then names the node), never the other way round.
    """
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = {vi.name: vi for vi in graph.input if vi.name not in inits}
    producers: dict[str, onnx.NodeProto] = {}
    problems = []

    def walk(nodes, outer_inits):
        scope_inits = set(outer_inits)
        for n in nodes:
            for o in n.output:
                producers[o] = n
        for n in nodes:
            if n.op_type == "If":
                why = _why_dynamic(n.input[0], producers, inputs, scope_inits, fixed)
                if why:
                    reason = f"the If condition depends on {why[0]}, so it is not known when the Core ML program is built"
                    problems.append((n, reason, why[1]))
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        walk(a.g.node, scope_inits | {i.name for i in a.g.initializer})

    walk(graph.node, inits)
    return problems


def _why_dynamic(name, producers, inputs, inits, fixed) -> tuple[str, str] | None:
    """What a value depends on at run time (a description and a hint), or None if it folds."""
    values, axes, seen = set(), set(), set()
    stack = [(name, False)]  # (value, only its shape matters)
    while stack:
        v, shape_only = stack.pop()
        if not v or (v, shape_only) in seen or v in inits:
            continue
        seen.add((v, shape_only))
        if v in inputs:
            if shape_only:
                dims = inputs[v].type.tensor_type.shape.dim
                axes |= {axis_name(v, i, d) for i, d in enumerate(dims) if not d.HasField("dim_value")
                         or d.dim_value <= 0}
            else:
                values.add(v)
            continue
        node = producers.get(v)
        if node is None or node.op_type == "Constant":
            continue
        through_shape = node.op_type in ("Shape", "Size")
        for i in node.input:
            stack.append((i, shape_only or through_shape))
    if values:
        return (f"the value of input {', '.join(repr(v) for v in sorted(values))}",
                f"Core ML programs edgeq builds cannot branch at run time: {ANDROID}")
    open_axes = sorted(a for a in axes if not isinstance(fixed.get(a), int))
    if open_axes:
        flags = " ".join(f"--shape {a}=N" for a in open_axes)
        return (f"the size of dynamic axes {', '.join(open_axes)}",
                f"fix them to the sizes the app uses (edgeq package ... {flags}) so the condition folds, or {ANDROID}")
    return None
