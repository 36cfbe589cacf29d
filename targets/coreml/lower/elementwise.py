"""Elementwise ops: arithmetic, activations, comparisons, logic, Where, Cast, Clip."""

from __future__ import annotations

import numpy as np

from targets.coreml.lower.context import FP16_MAX, Context, LoweringError, attr_str, attrs, is_known
from targets.coreml.lower.registry import lowers

_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Pow": "pow",
    "Equal": "equal", "Greater": "greater", "GreaterOrEqual": "greater_equal",
    "Less": "less", "LessOrEqual": "less_equal",
    "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor",
}


def binary(ctx: Context, op: str, a, b, name=None):
    kw = {"name": name} if name else {}
    return getattr(ctx.mb, op)(x=ctx.var(a), y=ctx.var(b), **kw)


@lowers(*_BINARY)
def _binary(ctx, node, ins):
    a, b = ins
    if node.op_type == "Pow" and is_known(b) and b.size == 1 and float(b.reshape(())) == 2.0:
        return [ctx.mb.mul(x=a, y=a)]  # x² exactly as ONNX computes it, without pow's exp/log
    return [binary(ctx, _BINARY[node.op_type], a, b)]


@lowers("Div")
def _div(ctx, node, ins):
    a, b = ins
    probe = a if not is_known(a) else b
    if ctx.is_float(probe):
        return [binary(ctx, "real_div", a, b)]
    return [binary(ctx, "floor_div", a, b)]  # integer shape arithmetic: operands are non-negative


_UNARY = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Exp": "exp", "Log": "log",
    "Abs": "abs", "Sqrt": "sqrt", "Floor": "floor", "Ceil": "ceil", "Sin": "sin", "Cos": "cos",
    "Reciprocal": "inverse", "Sign": "sign", "Softplus": "softplus", "Round": "round",
}


@lowers(*_UNARY)
def _unary(ctx, node, ins):
    return [getattr(ctx.mb, _UNARY[node.op_type])(x=ctx.var(ins[0]))]


@lowers("Neg")
def _neg(ctx, node, ins):
    x = ins[0]
    return [ctx.mb.mul(x=x, y=ctx.const(np.array(-1, dtype=ctx.np_dtype(x))))]


@lowers("Constant")
def _constant(ctx, node, ins):  # no inputs: always folded before it gets here
    from targets.coreml.lower.registry import fold

    return fold(node, ins, ctx.opset)


@lowers("Identity")
def _identity(ctx, node, ins):
    return [ins[0]]


def _gelu_check(node, deployment):
    mode = attr_str(node, "approximate", "none")
    return None if mode in ("none", "tanh") else f"Gelu approximate={mode!r} is not supported"


@lowers("Gelu", check=_gelu_check)
def _gelu(ctx, node, ins):
    mode = "TANH_APPROXIMATION" if attr_str(node, "approximate", "none") == "tanh" else "EXACT"
    return [ctx.mb.gelu(x=ins[0], mode=mode)]


@lowers("LeakyRelu")
def _leaky(ctx, node, ins):
    return [ctx.mb.leaky_relu(x=ins[0], alpha=float(attrs(node).get("alpha", 0.01)))]


@lowers("PRelu")
def _prelu(ctx, node, ins):
    """MIL prelu where it applies (rank 4, one slope per channel of axis 1, the slope known); else
    ``select(x >= 0, x, x * slope)`` for any rank and any broadcastable slope (e.g. after Linear)."""
    x, slope = ins
    xs = ctx.shape(x)
    if is_known(slope) and len(xs) == 4 and xs[1] is not None and np.ndim(slope) <= 4:
        s = np.asarray(slope, np.float32)
        full = (1,) * (4 - s.ndim) + s.shape  # ONNX broadcasts the slope from the right
        if s.size == 1 or (full[0] == 1 and full[2:] == (1, 1) and full[1] == xs[1]):
            return [ctx.mb.prelu(x=x, alpha=ctx.const(np.broadcast_to(s.reshape(-1), (xs[1],)).copy()))]
    zero = ctx.const(np.array(0, np.float32))
    return [ctx.mb.select(cond=ctx.mb.greater_equal(x=x, y=zero), a=x, b=binary(ctx, "mul", x, slope))]


@lowers("HardSigmoid")
def _hard_sigmoid(ctx, node, ins):
    a = attrs(node)
    return [ctx.mb.sigmoid_hard(x=ins[0], alpha=float(a.get("alpha", 0.2)), beta=float(a.get("beta", 0.5)))]


@lowers("HardSwish")
def _hard_swish(ctx, node, ins):
    x = ins[0]
    return [ctx.mb.mul(x=x, y=ctx.mb.sigmoid_hard(x=x, alpha=1.0 / 6.0, beta=0.5))]


def _bound(ctx: Context, v, default: float):
    if v is None:
        return default
    if not is_known(v):
        return v
    return float(v.reshape(()))


@lowers("Clip")
def _clip(ctx, node, ins):
    x = ins[0]
    a = attrs(node)
    lo = ins[1] if len(ins) > 1 else None
    hi = ins[2] if len(ins) > 2 else None
    if ctx.opset < 11:
        lo = np.array(a.get("min", -np.inf), np.float32)
        hi = np.array(a.get("max", np.inf), np.float32)
    big = FP16_MAX if ctx.compute == "fp16" else float(np.finfo(np.float32).max)
    if ctx.is_float(x) and (lo is None or is_known(lo)) and (hi is None or is_known(hi)):
        lo_v = max(_bound(ctx, lo, -big), -big)
        hi_v = min(_bound(ctx, hi, big), big)
        if lo_v == 0.0 and hi_v == big:
            return [ctx.mb.relu(x=x)]
        return [ctx.mb.clip(x=x, alpha=ctx.float_np(lo_v), beta=ctx.float_np(hi_v))]
    y = x
    if lo is not None:
        y = binary(ctx, "maximum", y, lo.astype(ctx.np_dtype(x)) if is_known(lo) else lo)
    if hi is not None:
        y = binary(ctx, "minimum", y, hi.astype(ctx.np_dtype(x)) if is_known(hi) else hi)
    return [y]


@lowers("Max", "Min")
def _max_min(ctx, node, ins):
    op = "maximum" if node.op_type == "Max" else "minimum"
    y = ins[0]
    for other in ins[1:]:
        y = binary(ctx, op, y, other)
    return [ctx.var(y)]


@lowers("Not")
def _not(ctx, node, ins):
    return [ctx.mb.logical_not(x=ins[0])]


@lowers("IsNaN")
def _isnan(ctx, node, ins):
    x = ins[0]
    return [ctx.mb.not_equal(x=x, y=x)]  # MIL has no isnan: NaN is the only value unequal to itself


@lowers("Where")
def _where(ctx, node, ins):
    c, a, b = ins
    return [ctx.mb.select(cond=ctx.var(c), a=ctx.var(a), b=ctx.var(b))]


_CAST_TO = {
    1: "float", 10: "float", 11: "float", 16: "float",
    6: "int32", 7: "int32", 12: "int32", 13: "int32", 5: "int32", 3: "int32", 2: "int32", 4: "int32",
    9: "bool",
}


def _cast_check(node, deployment):
    to = attrs(node).get("to")
    return None if to in _CAST_TO else f"Cast to ONNX type {to} has no Core ML equivalent"


@lowers("Cast", check=_cast_check)
def _cast(ctx, node, ins):
    x = ins[0]
    kind = _CAST_TO.get(attrs(node)["to"])
    if kind is None:
        raise LoweringError(node, f"Cast to ONNX type {attrs(node)['to']} has no Core ML equivalent")
    dtype = ctx.compute if kind == "float" else kind
    have = {"f": ctx.compute, "i": "int32", "u": "int32", "b": "bool"}[ctx.np_dtype(x).kind]
    if have == dtype and ctx.np_dtype(x).kind != "u":
        return [x]
    return [ctx.mb.cast(x=x, dtype=dtype)]
