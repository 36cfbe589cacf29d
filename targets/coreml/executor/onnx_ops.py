"""MIL ops as ONNX nodes for :mod:`.to_onnx`: each translation computes, in float32, what the
numpy executor's implementation of the op computes (:mod:`.ops_math`, :mod:`.ops_nn`,
:mod:`.ops_tensor`), leaving the fp16 rounding of its result to the caller.

A value of the program is held as the executor's fast path holds it: fp16 and fp32 values as
float32, integers and booleans as themselves. A translation raises :class:`Untranslatable` for a
form it does not cover (e.g. a parameter ONNX needs as an attribute that the program computes).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from targets.coreml.executor.integer import IntegerGather, IntegerMatmul

OPSET = 21
_INT_MAX = np.iinfo(np.int64).max
_INT_MIN = np.iinfo(np.int64).min
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL,
              np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
              np.dtype(np.int16): TensorProto.INT16, np.dtype(np.uint16): TensorProto.UINT16}


class Untranslatable(Exception):
    """The program (or one op of it) has no translation here: run it with the numpy executor."""


def held(dtype) -> np.dtype:
    """The dtype the graph holds a MIL value of ``dtype`` in (fp16 values as float32, like the executor)."""
    d = np.dtype(dtype)
    return np.dtype(np.float32) if d.kind == "f" else d


class Graph:
    """ONNX nodes and initializers under construction, with the held dtype of every value."""

    def __init__(self):
        self.nodes, self.inits = [], []
        self.dtype: dict[str, np.dtype] = {}
        self._n = 0
        self._consts: dict = {}
        self._held: list = []  # large constants keyed by id(): kept alive so that no id is reused
        # dequantized values of fused quantize pairs -> their centered codes (float32 integers)
        self.codes: dict[str, str] = {}

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"_{hint}_{self._n}"

    def node(self, op: str, inputs, dtype, *, out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        self.dtype[out] = np.dtype(dtype)
        return out

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value)
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32, copy=False)
        if arr.dtype not in ONNX_TYPE:
            raise Untranslatable(f"a constant of dtype {arr.dtype}")
        small = arr.size <= 16
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if small else (id(value), arr.dtype.str)
        if key in self._consts:
            return self._consts[key]
        name = self.fresh("const")
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        self.dtype[name] = arr.dtype
        self._consts[key] = name
        if not small:
            self._held.append(value)
        return name

    def cast(self, name: str, dtype) -> str:
        dtype = np.dtype(dtype)
        if self.dtype[name] == dtype:
            return name
        return self.node("Cast", [name], dtype, to=ONNX_TYPE[dtype])

    def i64(self, name: str) -> str:
        return self.cast(name, np.int64)


class OpArgs:
    """One executor step as the translators see it: its arguments by MIL parameter name."""

    def __init__(self, g: Graph, step, names: dict, mixed: dict, ranks: dict):
        self.g, self.step, self._ranks = g, step, ranks
        self.kind = step.op.op_type
        self._vars = {}
        for param, ref in step.vars:
            if isinstance(ref, str):
                self._vars[param] = names.get(ref)  # None: a fused quantize's codes (see _fake_quantize)
            else:  # a list parameter: variables and constants read by name
                self._vars[param] = [names[r] if r in names else g.const(mixed[r]) for r in ref]
        self.consts = step.consts
        self.out_dtypes = [held(d) if d is not None else None for _, d, _ in step.outs]

    def rank(self, p: str) -> int | None:
        """The declared rank of a variable argument (None when unknown)."""
        ref = dict(self.step.vars).get(p)
        return self._ranks.get(ref) if isinstance(ref, str) else None

    def has(self, p: str) -> bool:
        return p in self._vars or (p in self.consts and self.consts[p] is not None)

    def const(self, p: str, default=None):
        """A parameter that must be a constant (an ONNX attribute, a layout): its value."""
        if p in self._vars:
            raise Untranslatable(f"MIL {self.kind} with a computed {p!r}")
        v = self.consts.get(p, default)
        return default if v is None else v

    def arg(self, p: str, dtype=None) -> str | None:
        """A tensor argument's ONNX name (constants as initializers), cast to ``dtype`` if given."""
        if p in self._vars:
            name = self._vars[p]
            return self.g.cast(name, dtype) if dtype is not None else name
        v = self.consts.get(p)
        if v is None:
            return None
        return self.g.const(v, dtype)

    def args(self, p: str) -> list[str]:
        if p in self._vars:
            return list(self._vars[p])
        return [self.g.const(v) for v in self.consts.get(p, [])]

    def ints(self, p: str, default=None) -> list[int] | None:
        v = self.const(p, default)
        return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]

    def var_dtype(self, p: str):
        return self.g.dtype[self._vars[p]] if p in self._vars else np.asarray(self.consts[p]).dtype

    def node(self, op, inputs, dtype=None, **attrs) -> str:
        return self.g.node(op, inputs, dtype if dtype is not None else self.out_dtypes[0], **attrs)

    def finish(self, name: str) -> str:
        """``name`` as the op's first output dtype."""
        return self.g.cast(name, self.out_dtypes[0])


# --- translations: each returns the ONNX name(s) of the op's outputs, in their held dtypes ---------

def _operands(o: OpArgs, params) -> tuple[list[str], np.dtype]:
    """Elementwise operands in one compute dtype: float32 when any is a float (numpy's f32)."""
    types = [o.var_dtype(p) for p in params if o.has(p)]
    computed = [o.var_dtype(p) for p in params if p in o._vars] or types  # a variable's integer type wins
    compute = np.dtype(np.float32) if any(np.dtype(t).kind == "f" for t in types) else np.dtype(computed[0])
    return [o.arg(p, compute) for p in params], compute


_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "real_div": "Div", "pow": "Pow", "maximum": "Max",
           "minimum": "Min", "equal": "Equal", "greater": "Greater", "greater_equal": "GreaterOrEqual",
           "less": "Less", "less_equal": "LessOrEqual", "logical_and": "And", "logical_or": "Or",
           "logical_xor": "Xor"}
_COMPARE = {"equal", "not_equal", "greater", "greater_equal", "less", "less_equal"}


def _binary(o: OpArgs):
    (x, y), compute = _operands(o, ("x", "y"))
    if o.kind in ("logical_and", "logical_or", "logical_xor"):
        x, y, compute = o.g.cast(x, np.bool_), o.g.cast(y, np.bool_), np.dtype(np.bool_)
    if o.kind == "real_div" and compute.kind != "f":
        raise Untranslatable("MIL real_div on integers")
    if o.kind == "not_equal":
        return o.finish(o.node("Not", [o.node("Equal", [x, y], np.bool_)], np.bool_))
    return o.finish(o.node(_BINARY[o.kind], [x, y], np.bool_ if o.kind in _COMPARE else compute))


_UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "erf": "Erf", "exp": "Exp", "abs": "Abs",
          "sqrt": "Sqrt", "floor": "Floor", "ceil": "Ceil", "sin": "Sin", "cos": "Cos", "sign": "Sign",
          "softplus": "Softplus", "round": "Round", "identity": "Identity", "logical_not": "Not"}


def _unary(o: OpArgs):
    (x,), compute = _operands(o, ("x",))
    if o.kind == "logical_not":
        x, compute = o.g.cast(x, np.bool_), np.dtype(np.bool_)
    return o.finish(o.node(_UNARY[o.kind], [x], compute))


def _float_x(o: OpArgs) -> str:
    return o.arg("x", np.float32)


def _eps(o: OpArgs, default) -> str:
    return o.arg("epsilon", np.float32) if o.has("epsilon") else o.g.const(np.float32(default))


def _rsqrt(o: OpArgs):  # 1 / sqrt(x + eps)
    s = o.node("Sqrt", [o.node("Add", [_float_x(o), _eps(o, 1e-12)], np.float32)], np.float32)
    return o.finish(o.node("Div", [o.g.const(np.float32(1)), s], np.float32))


def _inverse(o: OpArgs):  # 1 / (x + eps)
    return o.finish(o.node("Div", [o.g.const(np.float32(1)), o.node("Add", [_float_x(o), _eps(o, 1e-4)], np.float32)],
                           np.float32))


def _log(o: OpArgs):  # log(x + eps)
    return o.finish(o.node("Log", [o.node("Add", [_float_x(o), _eps(o, 1e-45)], np.float32)], np.float32))


def _square(o: OpArgs):
    x = _float_x(o)
    return o.finish(o.node("Mul", [x, x], np.float32))


def _silu(o: OpArgs):
    x = _float_x(o)
    return o.finish(o.node("Mul", [x, o.node("Sigmoid", [x], np.float32)], np.float32))


def _gelu(o: OpArgs):
    x, mode = _float_x(o), str(o.const("mode", "EXACT"))
    if mode == "EXACT":
        return o.finish(o.node("Gelu", [x], np.float32))
    if mode == "TANH_APPROXIMATION":
        return o.finish(o.node("Gelu", [x], np.float32, approximate="tanh"))
    s = o.node("Sigmoid", [o.node("Mul", [x, o.g.const(np.float32(1.702))], np.float32)], np.float32)
    return o.finish(o.node("Mul", [x, s], np.float32))


def _clip(o: OpArgs):
    x = _float_x(o)
    if all(p not in o._vars and np.asarray(o.consts.get(p)).size == 1 for p in ("alpha", "beta")):
        lo, hi = (o.g.const(np.asarray(o.consts[p], np.float32).reshape(())) for p in ("alpha", "beta"))
        return o.finish(o.node("Clip", [x, lo, hi], np.float32))
    lo = o.node("Max", [x, o.arg("alpha", np.float32)], np.float32)
    return o.finish(o.node("Min", [lo, o.arg("beta", np.float32)], np.float32))


def _sigmoid_hard(o: OpArgs):
    return o.finish(o.node("HardSigmoid", [_float_x(o)], np.float32, alpha=float(o.const("alpha", 0.2)),
                           beta=float(o.const("beta", 0.5))))


def _leaky_relu(o: OpArgs):
    return o.finish(o.node("LeakyRelu", [_float_x(o)], np.float32, alpha=float(o.const("alpha", 0.01))))


def _prelu(o: OpArgs):  # max(x, 0) + min(x, 0) * alpha, alpha per channel (axis 1)
    x = _float_x(o)
    zero = o.g.const(np.float32(0))
    neg = o.node("Mul", [o.node("Min", [x, zero], np.float32), _per_channel(o, x, o.const("alpha"))], np.float32)
    return o.finish(o.node("Add", [o.node("Max", [x, zero], np.float32), neg], np.float32))


def _per_channel(o: OpArgs, x: str, v: np.ndarray) -> str:
    """``v`` [C] laid along axis 1 of ``x`` (any rank >= 2): reshaped in the graph from x's rank."""
    v = np.asarray(v, np.float32).reshape(-1)
    if v.size == 1:
        return o.g.const(v.reshape(()))
    g = o.g
    rank = g.node("Shape", [g.node("Shape", [x], np.int64)], np.int64)  # [rank]
    ones = g.node("ConstantOfShape", [g.node("Sub", [rank, g.const(np.array([2], np.int64))], np.int64)], np.int64,
                  value=numpy_helper.from_array(np.array([1], np.int64)))
    shape = g.node("Concat", [g.const(np.array([1, -1], np.int64)), ones], np.int64, axis=0)
    return g.node("Reshape", [g.const(v), shape], np.float32)


def _select(o: OpArgs):
    (a, b), _ = _operands(o, ("a", "b"))
    return o.finish(o.node("Where", [o.arg("cond", np.bool_), a, b], o.g.dtype[a]))


_CAST_TO = {"fp16": np.float32, "fp32": np.float32, "int32": np.int32, "bool": np.bool_, "int8": np.int8,
            "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}


def _cast(o: OpArgs):
    to = str(o.const("dtype"))
    if to not in _CAST_TO:
        raise Untranslatable(f"MIL cast to {to}")
    x = o.arg("x")
    # float -> integer truncates (numpy: trunc then astype; ONNX Cast truncates); fp16 is a rounding after
    return o.finish(o.g.cast(x, _CAST_TO[to]))


def _axes_const(o: OpArgs, p: str):
    v = o.const(p)
    return None if v is None else np.asarray(v, np.int64).reshape(-1)


def _softmax(o: OpArgs):
    return o.finish(o.node("Softmax", [_float_x(o)], np.float32, axis=int(o.const("axis", -1))))


def _layer_norm(o: OpArgs):
    """Over trailing axes: ORT's LayerNormalization (it takes the variance as E[x²] - E[x]², the
    executor as E[(x - mean)²]: float32 rounding apart, see the module docstring); over other axes,
    written out as the executor computes it."""
    x = _float_x(o)
    axes = _axes_const(o, "axes")
    if axes is None:
        raise Untranslatable("MIL layer_norm over every axis")
    g = o.g
    rank = o.rank("x")
    if rank is not None:
        norm = sorted(int(a) % rank for a in axes)
        if norm == list(range(norm[0], rank)):
            gamma = o.arg("gamma", np.float32) if o.has("gamma") else None
            if gamma is None:
                raise Untranslatable("MIL layer_norm without gamma")
            inputs = [x, gamma] + ([o.arg("beta", np.float32)] if o.has("beta") else [])
            eps = float(np.asarray(o.const("epsilon", 1e-5), np.float32).reshape(-1)[0])
            return o.finish(g.node("LayerNormalization", inputs, np.float32, axis=norm[0], epsilon=eps))
    ax = g.const(axes)
    mean = g.node("ReduceMean", [x, ax], np.float32, keepdims=1)
    d = g.node("Sub", [x, mean], np.float32)
    var = g.node("ReduceMean", [g.node("Mul", [d, d], np.float32), ax], np.float32, keepdims=1)
    y = g.node("Div", [d, g.node("Sqrt", [g.node("Add", [var, _eps(o, 1e-5)], np.float32)], np.float32)], np.float32)
    if o.has("gamma"):
        y = g.node("Mul", [y, o.arg("gamma", np.float32)], np.float32)
    if o.has("beta"):
        y = g.node("Add", [y, o.arg("beta", np.float32)], np.float32)
    return o.finish(y)


def _batch_norm(o: OpArgs):
    x = _float_x(o)
    eps = np.float32(o.const("epsilon", 1e-5))
    std = np.sqrt(np.asarray(o.const("variance"), np.float32).reshape(-1) + eps)  # numpy's float32, as the executor
    y = o.node("Div", [o.node("Sub", [x, _per_channel(o, x, o.const("mean"))], np.float32), _per_channel(o, x, std)],
               np.float32)
    if o.has("gamma"):
        y = o.node("Mul", [y, _per_channel(o, x, o.const("gamma"))], np.float32)
    if o.has("beta"):
        y = o.node("Add", [y, _per_channel(o, x, o.const("beta"))], np.float32)
    return o.finish(y)


_REDUCE = {"reduce_mean": "ReduceMean", "reduce_sum": "ReduceSum", "reduce_max": "ReduceMax",
           "reduce_min": "ReduceMin", "reduce_prod": "ReduceProd", "reduce_l2_norm": "ReduceL2"}


def _reduce(o: OpArgs):
    (x,), compute = _operands(o, ("x",))
    axes = _axes_const(o, "axes")
    inputs = [x] if axes is None else [x, o.g.const(axes)]
    return o.finish(o.node(_REDUCE[o.kind], inputs, compute, keepdims=int(bool(o.const("keep_dims", False)))))


def _arg_reduce(o: OpArgs):
    axis, keep = int(o.const("axis", -1)), int(bool(o.const("keep_dims", False)))
    op = "ArgMax" if o.kind == "reduce_argmax" else "ArgMin"
    return o.finish(o.node(op, [_float_x(o)], np.int64, axis=axis, keepdims=keep, select_last_index=0))


def param_along(o: OpArgs, p: str, x: str, axis) -> str:
    """A per-axis (de)quantization parameter laid along ``axis`` of ``x`` (numpy's _expand_param)."""
    v = np.asarray(o.const(p))
    arr = v.astype(np.float32)
    if v.ndim == 0 or axis is None:
        return o.g.const(arr)
    arr = arr.reshape(-1)
    axis = int(axis)
    if axis < 0:
        raise Untranslatable("MIL (de)quantize with a negative axis")
    return _along(o, x, arr, axis)


def _along(o: OpArgs, x: str, v: np.ndarray, axis: int) -> str:
    g = o.g
    rank = g.node("Shape", [g.node("Shape", [x], np.int64)], np.int64)
    tail = g.node("ConstantOfShape", [g.node("Sub", [rank, g.const(np.array([axis + 1], np.int64))], np.int64)],
                  np.int64, value=numpy_helper.from_array(np.array([1], np.int64)))
    shape = g.node("Concat", [g.const(np.array([1] * axis + [-1], np.int64)), tail], np.int64, axis=0)
    return g.node("Reshape", [g.const(v), shape], np.float32)


def _quantize(o: OpArgs):  # rint(x / s) + zp, clipped to the integer range, as ops_math._quantize
    x = o.arg("input", np.float32)
    dt = np.dtype(str(o.const("output_dtype")))
    axis = o.const("axis")
    t = o.node("Round", [o.node("Div", [x, param_along(o, "scale", x, axis)], np.float32)], np.float32)
    if o.has("zero_point"):
        t = o.node("Add", [t, param_along(o, "zero_point", x, axis)], np.float32)
    info = np.iinfo(dt)
    t = o.node("Clip", [t, o.g.const(np.float32(info.min)), o.g.const(np.float32(info.max))], np.float32)
    return o.finish(o.g.cast(t, dt))


def _dequantize(o: OpArgs):  # (q - zp) * s, as ops_math._dequantize
    x = o.arg("input", np.float32)
    axis = o.const("axis")
    if o.has("zero_point"):
        x = o.node("Sub", [x, param_along(o, "zero_point", x, axis)], np.float32)
    return o.finish(o.node("Mul", [x, param_along(o, "scale", x, axis)], np.float32))


def _matmul(o: OpArgs):
    if isinstance(o.step.fn, IntegerMatmul):
        return _integer_matmul(o, o.step.fn)
    x, y = o.arg("x", np.float32), o.arg("y", np.float32)
    tx, ty = bool(o.const("transpose_x", False)), bool(o.const("transpose_y", False))
    if not (tx or ty):
        return o.finish(o.node("MatMul", [x, y], np.float32))
    # ORT's FusedMatMul: a matmul with either operand's last two axes swapped, at any rank
    return o.finish(o.g.node("FusedMatMul", [x, y], np.float32, domain="com.microsoft", alpha=1.0,
                             transA=int(tx), transB=int(ty)))


def _integer_matmul(o: OpArgs, im: IntegerMatmul):
    """As :class:`.integer.IntegerMatmul`: the codes read back, ``MatMulInteger`` (exact int32 sums),
    then the float32 scales."""
    x = o.arg("x", np.float32)
    c = o.g.codes.get(x)  # a fused pair's codes: what rint(x / scale), clipped, gives back (same scale, range)
    if c is None:
        c = o.node("Round", [o.node("Div", [x, o.g.const(im.x_scale)], np.float32)], np.float32)
        c = o.node("Clip", [c, o.g.const(im.lo), o.g.const(im.hi)], np.float32)
    if im.zero_point:
        c = o.node("Add", [c, o.g.const(np.float32(im.zero_point))], np.float32)
    a = o.g.cast(c, im.codes_dtype)
    acc = o.node("MatMulInteger", [a, o.g.const(im.weight), o.g.const(np.asarray(im.zero_point, im.codes_dtype))],
                 np.int32)
    return o.finish(o.node("Mul", [o.g.cast(acc, np.float32), o.g.const(im.scale)], np.float32))


def _linear(o: OpArgs):
    w = np.asarray(o.const("weight"), np.float32)
    y = o.node("MatMul", [_float_x(o), o.g.const(np.ascontiguousarray(w.T))], np.float32)
    if o.has("bias"):
        y = o.node("Add", [y, o.arg("bias", np.float32)], np.float32)
    return o.finish(y)


def _spatial(o: OpArgs, n: int) -> dict:
    """Strides, dilations and padding of a conv / pool as ONNX attributes."""
    pad_type = str(o.const("pad_type", "valid"))
    attrs = {"strides": o.ints("strides") or [1] * n}
    if pad_type == "custom":
        p = o.ints("pad") or [0] * (2 * n)
        attrs["pads"] = [p[2 * i] for i in range(n)] + [p[2 * i + 1] for i in range(n)]
    elif pad_type == "valid":
        attrs["pads"] = [0] * (2 * n)
    elif pad_type in ("same", "same_lower"):
        attrs["auto_pad"] = "SAME_UPPER" if pad_type == "same" else "SAME_LOWER"
    else:
        raise Untranslatable(f"pad_type {pad_type}")
    return attrs


def _conv(o: OpArgs):
    w = np.asarray(o.const("weight"), np.float32)
    n = w.ndim - 2
    attrs = _spatial(o, n)
    attrs["dilations"] = o.ints("dilations") or [1] * n
    attrs["group"] = int(o.const("groups", 1))
    inputs = [_float_x(o), o.g.const(w)]
    if o.has("bias"):  # ORT adds it to the finished sum, as the executor does (and fuses Conv + Add so)
        inputs.append(o.g.const(np.asarray(o.const("bias"), np.float32).reshape(-1)))
    return o.finish(o.node("Conv", inputs, np.float32, **attrs))


def _pool(o: OpArgs):
    if bool(o.const("ceil_mode", False)):
        raise Untranslatable(f"MIL {o.kind} with ceil_mode")
    k = o.ints("kernel_sizes")
    attrs = {"kernel_shape": k, **_spatial(o, len(k))}
    if o.kind == "avg_pool":
        attrs["count_include_pad"] = 0 if bool(o.const("exclude_padding_from_average", False)) else 1
        if "auto_pad" in attrs and attrs["count_include_pad"]:
            raise Untranslatable("MIL avg_pool with same padding counted in the average")
    return o.finish(o.node("MaxPool" if o.kind == "max_pool" else "AveragePool", [_float_x(o)], np.float32, **attrs))


# --- shape and indexing ---------------------------------------------------------------------------

def _reshape(o: OpArgs):
    if "shape" not in o._vars:
        shape = o.ints("shape")
        if 0 in shape:  # MIL iOS 17 counts a 0's axis from the right; ONNX from the left
            raise Untranslatable("MIL reshape with a 0 in its shape")
        return o.node("Reshape", [o.arg("x"), o.g.const(np.array(shape, np.int64))])
    return o.node("Reshape", [o.arg("x"), o.g.i64(o.arg("shape"))])


def _slice_by_index(o: OpArgs):
    x = o.arg("x")
    g = o.g
    begin_v, end_v = o.consts.get("begin"), o.consts.get("end")
    n = len(np.asarray(begin_v).reshape(-1)) if begin_v is not None else (
        len(np.asarray(end_v).reshape(-1)) if end_v is not None else None)
    stride = o.ints("stride")
    if n is None:
        if stride is None:
            raise Untranslatable("MIL slice_by_index with computed begin and end and no stride")
        n = len(stride)
    stride = stride or [1] * n
    bm = [bool(v) for v in np.asarray(o.const("begin_mask", [False] * n)).reshape(-1)]
    em = [bool(v) for v in np.asarray(o.const("end_mask", [False] * n)).reshape(-1)]
    sm = [bool(v) for v in np.asarray(o.const("squeeze_mask", [False] * n)).reshape(-1)]
    lo = [(_INT_MAX if s < 0 else 0) for s in stride]  # a masked begin: the first element in the walk
    hi = [(_INT_MIN if s < 0 else _INT_MAX) for s in stride]  # a masked end: past the last one

    def bounds(p, values, mask, default):
        if p not in o._vars:
            v = np.asarray(values, np.int64).reshape(-1)
            return g.const(np.where(mask, default, v).astype(np.int64)), v
        v = g.i64(o.arg(p))
        if any(mask):
            v = g.node("Where", [g.const(np.array(mask)), g.const(np.array(default, np.int64)), v], np.int64)
        return v, None

    starts, b_const = bounds("begin", begin_v, bm, lo)
    # a squeezed axis takes index begin; its end is begin + 1 (or the end for begin -1)
    ends_mask = [e or s for e, s in zip(em, sm)]
    ends, _ = bounds("end", end_v, ends_mask, hi)
    if any(sm):
        if b_const is None:
            raise Untranslatable("MIL slice_by_index squeezing at a computed index")
        fixed = np.asarray(np.where(ends_mask, hi, 0), np.int64)
        for i, s in enumerate(sm):
            if s:
                fixed[i] = b_const[i] + 1 if b_const[i] != -1 else _INT_MAX
        if "end" in o._vars:
            ends = g.node("Where", [g.const(np.array(sm)), g.const(fixed), ends], np.int64)
        else:
            ends = g.const(np.where(sm, fixed, np.where(em, hi, np.asarray(end_v, np.int64).reshape(-1))))
    y = g.node("Slice", [x, starts, ends, g.const(np.arange(n, dtype=np.int64)), g.const(np.array(stride, np.int64))],
               g.dtype[x])
    if any(sm):
        y = g.node("Squeeze", [y, g.const(np.array([i for i, s in enumerate(sm) if s], np.int64))], g.dtype[x])
    return y


def _slice_by_size(o: OpArgs):  # x[b : b + size] per leading axis, size -1: to the end
    x, g = o.arg("x"), o.g
    if "begin" in o._vars or "size" in o._vars:
        b, sz = g.i64(o.arg("begin")), g.i64(o.arg("size"))
        e = g.node("Where", [g.node("Equal", [sz, g.const(np.array(-1, np.int64))], np.bool_),
                             g.const(np.array(_INT_MAX, np.int64)), g.node("Add", [b, sz], np.int64)], np.int64)
    else:
        bv, zv = np.asarray(o.ints("begin"), np.int64), np.asarray(o.ints("size"), np.int64)
        b, e = g.const(bv), g.const(np.where(zv == -1, _INT_MAX, bv + zv))
    return g.node("Slice", [x, b, e], g.dtype[x])  # no axes: the first len(begin) axes


def _gather(o: OpArgs):
    if isinstance(o.step.fn, IntegerGather):  # rows of codes, then their scales
        im, idx = o.step.fn, o.arg("indices", np.int64)
        rows = o.g.cast(o.g.node("Gather", [o.g.const(im.codes), idx], np.int8, axis=0), np.float32)
        scale = o.g.node("Gather", [o.g.const(im.scale), idx], np.float32, axis=0) if im.scale.shape[0] > 1 \
            else o.g.const(im.scale[0])
        return o.finish(o.node("Mul", [rows, scale], np.float32))
    if int(o.const("batch_dims", 0)):
        raise Untranslatable("MIL gather with batch_dims")
    x = o.arg("x")
    return o.finish(o.g.node("Gather", [x, o.arg("indices", np.int64)], o.g.dtype[x], axis=int(o.const("axis", 0))))


def _gather_along_axis(o: OpArgs):
    x = o.arg("x")
    return o.finish(o.g.node("GatherElements", [x, o.arg("indices", np.int64)], o.g.dtype[x],
                             axis=int(o.const("axis", 0))))


def _gather_nd(o: OpArgs):
    x = o.arg("x")
    return o.finish(o.g.node("GatherND", [x, o.arg("indices", np.int64)], o.g.dtype[x],
                             batch_dims=int(o.const("batch_dims", 0))))


def _squeeze(o: OpArgs):
    x, axes = o.arg("x"), _axes_const(o, "axes")
    return o.g.node("Squeeze", [x] if axes is None else [x, o.g.const(axes)], o.g.dtype[x])


def _expand_dims(o: OpArgs):
    x = o.arg("x")
    return o.g.node("Unsqueeze", [x, o.g.const(_axes_const(o, "axes"))], o.g.dtype[x])


def _transpose(o: OpArgs):
    x = o.arg("x")
    perm = o.ints("perm")
    return o.g.node("Transpose", [x], o.g.dtype[x], perm=[p % len(perm) for p in perm])


def _concat(o: OpArgs):
    if bool(o.const("interleave", False)):
        raise Untranslatable("MIL concat with interleave")
    vals = o.args("values")
    dt = o.out_dtypes[0]
    return o.g.node("Concat", [o.g.cast(v, dt) for v in vals], dt, axis=int(o.const("axis")))


def _stack(o: OpArgs):
    axis = o.g.const(np.array([int(o.const("axis"))], np.int64))
    dt = o.out_dtypes[0]
    vals = [o.g.node("Unsqueeze", [o.g.cast(v, dt), axis], dt) for v in o.args("values")]
    return o.g.node("Concat", vals, dt, axis=int(o.const("axis")))


def _fill(o: OpArgs):
    value = o.arg("value", o.out_dtypes[0]) if o.has("value") else o.g.const(np.zeros((), o.out_dtypes[0]))
    return o.node("Expand", [value, o.g.i64(o.arg("shape"))])


def _range(o: OpArgs):
    dt = o.out_dtypes[0]
    scalar = o.g.const(np.zeros(0, np.int64))
    parts = [o.g.node("Reshape", [o.arg(p, dt), scalar], dt) for p in ("start", "end", "step")]
    return o.node("Range", parts)


def _shape(o: OpArgs):
    return o.finish(o.g.node("Shape", [o.arg("x")], np.int64))


def _split(o: OpArgs):
    x, g = o.arg("x"), o.g
    axis = int(o.const("axis"))
    outs = [g.fresh("split") for _ in o.step.outs]
    if o.has("split_sizes"):
        inputs = [x, g.const(np.asarray(o.ints("split_sizes"), np.int64))]
        attrs = {}
    else:
        inputs, attrs = [x], {"num_outputs": int(o.const("num_splits"))}
    g.nodes.append(helper.make_node("Split", inputs, outs, name=outs[0], axis=axis, **attrs))
    for n in outs:
        g.dtype[n] = g.dtype[x]
    return outs


def _tile(o: OpArgs):
    x = o.arg("x")
    return o.g.node("Tile", [x, o.g.i64(o.arg("reps"))], o.g.dtype[x])


def _pad(o: OpArgs):
    x, g = o.arg("x"), o.g
    p = o.ints("pad")
    n = len(p) // 2
    mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(str(o.const("mode", "constant")))
    if mode is None:
        raise Untranslatable(f"MIL pad mode {o.const('mode')}")
    pads = g.const(np.array(p[0::2] + p[1::2], np.int64))
    axes = g.const(np.arange(-n, 0, dtype=np.int64))
    inputs = [x, pads, o.arg("constant_val", g.dtype[x]) if mode == "constant" and o.has("constant_val") else "", axes]
    return g.node("Pad", inputs, g.dtype[x], mode=mode)


def _reverse(o: OpArgs):
    x, g = o.arg("x"), o.g
    axes = _axes_const(o, "axes")
    if axes is None:
        raise Untranslatable("MIL reverse over every axis")
    k = len(axes)
    return g.node("Slice", [x, g.const(np.full(k, -1, np.int64)), g.const(np.full(k, _INT_MIN, np.int64)),
                            g.const(axes), g.const(np.full(k, -1, np.int64))], g.dtype[x])


TRANSLATIONS = {
    **dict.fromkeys(_BINARY, _binary), "not_equal": _binary,
    **dict.fromkeys(_UNARY, _unary),
    "rsqrt": _rsqrt, "inverse": _inverse, "log": _log, "square": _square, "silu": _silu, "gelu": _gelu,
    "clip": _clip, "sigmoid_hard": _sigmoid_hard, "leaky_relu": _leaky_relu, "prelu": _prelu, "select": _select,
    "cast": _cast, "softmax": _softmax, "layer_norm": _layer_norm, "batch_norm": _batch_norm,
    **dict.fromkeys(_REDUCE, _reduce), "reduce_argmax": _arg_reduce, "reduce_argmin": _arg_reduce,
    "quantize": _quantize, "dequantize": _dequantize, "matmul": _matmul, "linear": _linear, "conv": _conv,
    "max_pool": _pool, "avg_pool": _pool,
    "reshape": _reshape, "slice_by_index": _slice_by_index, "slice_by_size": _slice_by_size, "gather": _gather,
    "gather_along_axis": _gather_along_axis, "gather_nd": _gather_nd, "squeeze": _squeeze,
    "expand_dims": _expand_dims, "transpose": _transpose, "concat": _concat, "stack": _stack, "fill": _fill,
    "range_1d": _range, "shape": _shape, "split": _split, "tile": _tile, "pad": _pad, "reverse": _reverse,
}
