"""MIL elementwise, activation, normalization, reduction and (de)quantization ops in numpy.

Each function takes the op's parameters by their MIL names and computes in float32 (float64 for
nothing); the executor rounds the result to the dtype the program declares.
"""

from __future__ import annotations

import math

import numpy as np


def f32(a):
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _erf_coefficients(degree: int = 16, limit: float = 4.0) -> tuple[np.ndarray, float]:
    """Power-basis coefficients of erf(x)/x as a polynomial in u = 2 x²/limit² - 1 on |x| <= limit.

    A Chebyshev least-squares fit to math.erf at 400 Chebyshev nodes (in float64); evaluated in
    float32 it is within 2e-7 of erf (float32's own spacing near 1 is 6e-8), and beyond ``limit``
    erf is 1 to within 2e-8. Why not scipy.special.erf: it is scalar code, 13 ms per 725k
    elements here (GELU in every transformer layer), where this is vectorised float32 arithmetic.
    """
    from numpy.polynomial import chebyshev

    u = np.cos(np.pi * (np.arange(400) + 0.5) / 400)
    x = np.sqrt((u + 1) * limit**2 / 2)
    g = np.array([math.erf(v) / v if v > 0 else 2 / math.sqrt(math.pi) for v in x])
    return chebyshev.cheb2poly(chebyshev.chebfit(u, g, degree)).astype(np.float32), limit


_ERF_POLY, _ERF_LIMIT = _erf_coefficients()


def _erf(x: np.ndarray) -> np.ndarray:
    x = np.clip(f32(x), -_ERF_LIMIT, _ERF_LIMIT).astype(np.float32, copy=False)
    u = np.square(x)
    u *= np.float32(2 / _ERF_LIMIT**2)
    u -= np.float32(1)
    acc = np.full_like(u, _ERF_POLY[-1])
    for c in _ERF_POLY[-2::-1]:  # Horner, in place
        acc *= u
        acc += c
    acc *= x
    return np.clip(acc, -1, 1, out=acc)


def _binary(fn):
    return lambda x, y: fn(f32(x), f32(y))


def _unary(fn):
    return lambda x: fn(f32(x))


def _real_div(x, y):
    with np.errstate(divide="ignore", invalid="ignore"):
        return f32(x) / f32(y)


def _floor_div(x, y):
    x, y = f32(x), f32(y)
    return np.floor_divide(x, y) if np.asarray(x).dtype.kind in "iu" else np.floor(x / y)


def _pow(x, y):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.power(f32(x), f32(y))


def _inverse(x, epsilon=1e-4):
    return 1.0 / (f32(x) + np.float32(epsilon))


def _log(x, epsilon=1e-45):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(f32(x) + np.float32(epsilon))


def _rsqrt(x, epsilon=1e-12):
    return 1.0 / np.sqrt(f32(x) + np.float32(epsilon))


def _sigmoid(x):
    x = f32(x)
    e = np.exp(-np.abs(x))  # never overflows: 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) below
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32)


def _gelu(x, mode="EXACT"):
    x = f32(x)
    if mode == "EXACT":
        return 0.5 * x * (1 + _erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + 0.044715 * x**3)))
    return x * _sigmoid(1.702 * x)


def _softplus(x):
    x = f32(x)
    return np.logaddexp(0, x).astype(np.float32)


def _clip(x, alpha, beta):
    return np.clip(f32(x), f32(alpha), f32(beta))


def _sigmoid_hard(x, alpha=0.2, beta=0.5):
    return np.clip(f32(alpha) * f32(x) + f32(beta), 0, 1)


def _leaky_relu(x, alpha=0.01):
    x = f32(x)
    return np.where(x >= 0, x, x * f32(alpha))


def _select(cond, a, b):
    return np.where(cond, f32(a), f32(b))


def _cast(x, dtype):
    to = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_, "int8": np.int8,
          "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}[str(dtype)]
    x = np.asarray(x)
    if x.dtype.kind == "f" and np.dtype(to).kind in "iu":
        x = np.trunc(x)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond fp16's range: inf, as Core ML casts
        return x.astype(to)


def _softmax(x, axis=-1):
    x = f32(x)
    m = np.max(x, axis=int(axis), keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.exp(x - m)
        return e / np.sum(e, axis=int(axis), keepdims=True)


def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    x = f32(x)
    axes = tuple(int(a) for a in np.atleast_1d(axes)) if axes is not None else tuple(range(x.ndim))
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + f32(epsilon))
    if gamma is not None:
        y = y * f32(gamma)
    if beta is not None:
        y = y + f32(beta)
    return y


def _channel(v, ndim):
    return f32(v).reshape([1, -1] + [1] * (ndim - 2))


def _batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    x = f32(x)
    y = (x - _channel(mean, x.ndim)) / np.sqrt(_channel(variance, x.ndim) + f32(epsilon))
    if gamma is not None:
        y = y * _channel(gamma, x.ndim)
    if beta is not None:
        y = y + _channel(beta, x.ndim)
    return y


def _instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    x = f32(x)
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + f32(epsilon))
    if gamma is not None:
        y = y * _channel(gamma, x.ndim)
    if beta is not None:
        y = y + _channel(beta, x.ndim)
    return y


def _reduce(fn):
    def run(x, axes=None, keep_dims=False):
        x = f32(x)
        ax = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
        return fn(x, axis=ax, keepdims=bool(keep_dims))

    return run


def _l2(x, axis, keepdims):
    return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims))


def _expand_param(p, x, axis):
    p = np.asarray(p)
    if p.ndim == 0 or axis is None:
        return p
    dims = [1] * x.ndim
    dims[int(axis)] = p.size
    return p.reshape(dims)


def _quantize(input, scale, output_dtype, zero_point=None, axis=None):
    x = f32(input)
    dt = np.dtype(str(output_dtype))
    lo, hi = np.iinfo(dt).min, np.iinfo(dt).max
    s = _expand_param(f32(scale), x, axis)
    t = np.divide(x, s, dtype=np.float32)
    np.rint(t, out=t)
    if zero_point is not None:
        t += _expand_param(zero_point, x, axis).astype(np.float32)
    np.clip(t, lo, hi, out=t)
    return t.astype(dt)


def _dequantize(input, scale, zero_point=None, axis=None):
    x = np.asarray(input).astype(np.float32)
    s = _expand_param(f32(scale), x, axis)
    if zero_point is not None:
        x -= _expand_param(zero_point, x, axis).astype(np.float32)
    x *= s
    return x.astype(np.asarray(scale).dtype, copy=False)


def _constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    q = np.asarray(quantized_data).astype(np.float32)
    zp = _expand_param(zero_point, q, axis).astype(np.float32)
    s = _expand_param(scale, q, axis)
    return ((q - zp) * s.astype(np.float32)).astype(np.asarray(scale).dtype)


def _repeat_blocks(p, shape):
    for ax, (n, m) in enumerate(zip(shape, p.shape)):
        if m != n:
            p = np.repeat(p, n // m, axis=ax)
    return p


def _blocks_along(p, shape):
    """A per-block parameter laid out over ``shape``: broadcast where it has one block per axis or one
    per index (per channel: no copy), repeated otherwise."""
    p = np.asarray(p)
    if all(m in (1, n) for n, m in zip(shape, p.shape)):
        return p
    return _repeat_blocks(p, shape)


def _constexpr_blockwise_shift_scale(data, scale, offset=None):
    d = np.asarray(data).astype(np.float32)
    if offset is not None and np.any(offset):
        d -= _blocks_along(np.asarray(offset).astype(np.float32), d.shape)
    d *= _blocks_along(np.asarray(scale).astype(np.float32), d.shape)
    return d.astype(np.asarray(scale).dtype, copy=False)


def _silu(x):
    x = f32(x)
    return x * _sigmoid(x)


def _prelu(x, alpha):
    """One slope per channel (axis 1), as MIL defines it: max(x, 0) + min(x, 0) * alpha."""
    x = f32(x)
    a = f32(alpha).reshape([1, -1] + [1] * (x.ndim - 2))
    return np.maximum(x, 0) + np.minimum(x, 0) * a


def _arg_reduce(fn):
    def run(x, axis=-1, keep_dims=False, output_dtype="int32"):
        out = fn(f32(x), axis=int(axis))
        return (np.expand_dims(out, int(axis)) if bool(keep_dims) else out).astype(str(output_dtype))

    return run


def _constexpr_lut_to_dense(indices, lut, shape=None, vector_axis=None):
    """Palettized weights: iOS 16 form (``indices`` packed into bytes, one ``lut``, the output ``shape``)
    or iOS 18 form (``indices`` one per element, a LUT per block: ``lut`` [*blocks, palettes, vector])."""
    lut = np.asarray(lut)
    if shape is not None:
        from coremltools.optimize._utils import restore_elements_from_packed_bits

        dims = [int(d) for d in np.asarray(shape).reshape(-1)]
        bits = int(np.log2(lut.size))
        idx = restore_elements_from_packed_bits(np.asarray(indices, np.uint8), bits, int(np.prod(dims)), False)
        return lut.reshape(-1)[np.asarray(idx, np.int64)].reshape(dims)
    idx = np.asarray(indices).astype(np.int64)
    k = idx.ndim
    # each element's block along every axis, broadcast against the indices
    blocks = tuple((np.arange(n) // (n // g)).reshape([-1 if i == a else 1 for i in range(k)])
                   for a, (n, g) in enumerate(zip(idx.shape, lut.shape[:k])))
    vals = lut[(*blocks, idx)]  # [*indices.shape, vector]
    if vals.shape[-1] == 1:
        return vals[..., 0]
    axis = int(vector_axis) % k
    vals = np.moveaxis(vals, -1, axis + 1)
    return vals.reshape(*idx.shape[:axis], idx.shape[axis] * vals.shape[axis + 1], *idx.shape[axis + 1 :])


OPS = {
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply), "real_div": _real_div,
    "floor_div": _floor_div, "pow": _pow, "maximum": _binary(np.maximum), "minimum": _binary(np.minimum),
    "mod": _binary(np.mod),
    "equal": _binary(np.equal), "not_equal": _binary(np.not_equal), "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal), "less": _binary(np.less), "less_equal": _binary(np.less_equal),
    "logical_and": _binary(np.logical_and), "logical_or": _binary(np.logical_or),
    "logical_xor": _binary(np.logical_xor), "logical_not": _unary(np.logical_not),
    "relu": _unary(lambda x: np.maximum(x, 0)), "sigmoid": _sigmoid, "tanh": _unary(np.tanh), "erf": _unary(_erf),
    "exp": _unary(np.exp), "log": _log, "abs": _unary(np.abs), "sqrt": _unary(np.sqrt), "rsqrt": _rsqrt,
    "floor": _unary(np.floor), "ceil": _unary(np.ceil), "sin": _unary(np.sin), "cos": _unary(np.cos),
    "inverse": _inverse, "sign": _unary(np.sign), "softplus": _softplus, "round": _unary(np.rint),
    "silu": _silu, "prelu": _prelu, "square": _unary(np.square),
    "reduce_argmax": _arg_reduce(np.argmax), "reduce_argmin": _arg_reduce(np.argmin),
    "gelu": _gelu, "clip": _clip, "sigmoid_hard": _sigmoid_hard, "leaky_relu": _leaky_relu,
    "select": _select, "cast": _cast, "identity": lambda x: x,
    "softmax": _softmax, "layer_norm": _layer_norm, "batch_norm": _batch_norm, "instance_norm": _instance_norm,
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum), "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min), "reduce_prod": _reduce(np.prod), "reduce_l2_norm": _reduce(_l2),
    "quantize": _quantize, "dequantize": _dequantize,
    "constexpr_affine_dequantize": _constexpr_affine_dequantize,
    "constexpr_blockwise_shift_scale": _constexpr_blockwise_shift_scale,
    "constexpr_lut_to_dense": _constexpr_lut_to_dense,
}

# How the fast path may split an op's work over threads (see Executor): an elementwise op over
# these (numpy-broadcast) operands, every other array parameter a scalar ...
_UNARY = ("relu", "sigmoid", "silu", "square", "tanh", "erf", "exp", "log", "abs", "sqrt", "rsqrt", "floor", "ceil", "sin", "cos",
          "inverse", "sign", "softplus", "round", "gelu", "clip", "sigmoid_hard", "leaky_relu", "cast",
          "logical_not")
_BINARY = ("add", "sub", "mul", "real_div", "floor_div", "pow", "maximum", "minimum", "mod", "equal", "not_equal",
           "greater", "greater_equal", "less", "less_equal", "logical_and", "logical_or", "logical_xor")
ELEMENTWISE = {**{op: ("x",) for op in _UNARY}, **{op: ("x", "y") for op in _BINARY},
               "select": ("cond", "a", "b"), "quantize": ("input",), "dequantize": ("input",)}
# ... or an op on ``x`` that reduces along the axes its parameter names, independently across the others
ROWWISE = {"softmax": "axis", "layer_norm": "axes"}
