"""Normalizations and reductions: LayerNormalization, Softmax, Reduce*, InstanceNormalization."""

from __future__ import annotations

import numpy as np

from targets.coreml.lower.context import FP16_TINY, Context, LoweringError, attrs, is_known
from targets.coreml.lower.registry import lowers


def epsilon(ctx: Context, eps: float):
    """An epsilon in the compute dtype; never rounded to 0 in fp16 (the smallest subnormal instead)."""
    if ctx.compute == "fp16" and eps > 0 and np.float16(eps) == 0:
        return np.float16(FP16_TINY)
    return ctx.float_np(eps)


@lowers("LayerNormalization")
def _layer_norm(ctx, node, ins):
    x, gamma = ins[0], ins[1]
    beta = ins[2] if len(ins) > 2 else None
    a = attrs(node)
    if len(node.output) > 1 and any(node.output[1:]):
        raise LoweringError(node, "LayerNormalization mean/inv-std outputs are not supported")
    rank = ctx.rank(x)
    axis = int(a.get("axis", -1))
    axis = axis + rank if axis < 0 else axis
    kw = {}
    if gamma is not None:
        if not is_known(gamma):
            raise LoweringError(node, "LayerNormalization with a computed scale is not supported")
        kw["gamma"] = ctx.const(gamma)
    if beta is not None:
        if not is_known(beta):
            raise LoweringError(node, "LayerNormalization with a computed bias is not supported")
        kw["beta"] = ctx.const(beta)
    eps = float(a.get("epsilon", 1e-5))
    return [ctx.mb.layer_norm(x=x, axes=list(range(axis, rank)), epsilon=epsilon(ctx, eps), **kw)]


@lowers("InstanceNormalization")
def _instance_norm(ctx, node, ins):
    x, gamma, beta = ins
    eps = float(attrs(node).get("epsilon", 1e-5))
    return [ctx.mb.instance_norm(x=x, gamma=ctx.const(gamma), beta=ctx.const(beta), epsilon=epsilon(ctx, eps))]


@lowers("Softmax")
def _softmax(ctx, node, ins):
    x = ins[0]
    axis = int(attrs(node).get("axis", -1 if ctx.opset >= 13 else 1))
    if ctx.opset < 13 and axis != ctx.rank(x) - 1 and axis != -1:
        raise LoweringError(node, "Softmax before opset 13 (flattening semantics) is supported on the last axis only")
    return [ctx.mb.softmax(x=x, axis=axis)]


_REDUCE = {
    "ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max", "ReduceMin": "reduce_min",
    "ReduceL2": "reduce_l2_norm", "ReduceProd": "reduce_prod",
}
_AXES_AS_INPUT = {"ReduceSum": 13}  # the others take axes as an input from opset 18


@lowers(*_REDUCE)
def _reduce(ctx, node, ins):
    x = ins[0]
    a = attrs(node)
    keep = bool(a.get("keepdims", 1))
    if ctx.opset >= _AXES_AS_INPUT.get(node.op_type, 18):
        axes = ins[1] if len(ins) > 1 else None
        if axes is not None and not is_known(axes):
            raise LoweringError(node, "reduction axes computed at run time are not supported")
        axes = None if axes is None or axes.size == 0 else [int(v) for v in axes.reshape(-1)]
    else:
        axes = a.get("axes")
        axes = None if axes is None else [int(v) for v in axes]
    if axes is None:
        if a.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(ctx.rank(x)))
    return [getattr(ctx.mb, _REDUCE[node.op_type])(x=x, axes=axes, keep_dims=keep)]
