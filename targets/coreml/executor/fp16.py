"""Rounding float32 arrays to float16 precision while keeping them float32.

The fast path of the reference executor stores an fp16 program's tensors as float32 arrays whose
values are exactly representable in float16, so no op has to convert its inputs back from
float16. numpy's float16 casts are scalar code (an fp16 round trip costs ~25x a float32 add),
so the rounding here is float32 arithmetic, vectorised:

- Veltkamp's splitting, ``t = (2**13 + 1) * x``, ``hi = t - (t - x)``, is ``x`` rounded to nearest,
  ties to even, to 24 - 13 = 11 significant bits: float16's precision for its normal numbers.
- Below float16's smallest normal number (``2**-14``) the spacing is fixed, ``2**-24``: those
  elements are ``rint(x * 2**24) * 2**-24`` (exact scalings around a ties-to-even rounding; the
  sign of a zero is kept).
- Values that round beyond float16's largest finite number become ±inf, as a float16 cast makes
  them.

The result equals ``x.astype(float16).astype(float32)`` bit for bit, -0.0, inf and nan included
(tested on every float16 value, every midpoint and their neighbours, and random bit patterns).
"""

from __future__ import annotations

import numpy as np

FP16_MAX = 65504.0
_SPLIT = np.float32(2**13 + 1)
_TINY = np.float32(2.0**-14)  # float16's smallest normal number
_SUB = np.float32(2.0**24)  # 1 / float16's subnormal spacing
_SUB_INV = np.float32(2.0**-24)
_OVERFLOW = np.float32(65520.0)  # the midpoint between 65504 and 65536: rounds to inf (ties to even)
_SPARSE = 0.005  # up to this share of subnormal-range elements, patch them by index


def round_fp16(x: np.ndarray, out: np.ndarray | None = None, *, normal: bool = False) -> np.ndarray:
    """``x`` (float32) rounded to the nearest float16 value, as float32, into ``out`` (may be ``x``) or a new array.

    ``normal=True``: the caller knows every nonzero ``|x|`` is within float16's normal range
    (``2**-14`` to 65504, e.g. integers times a normal scale), so only Veltkamp's three passes run.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty_like(x)
    if x.size == 0:
        return out
    if normal:
        t = np.multiply(x, _SPLIT)
        np.subtract(t, x, out=out)
        return np.subtract(t, out, out=out)
    a = np.abs(x)
    small = np.less(a, _TINY)
    n_small = np.count_nonzero(small)
    big = np.flatnonzero(a >= _OVERFLOW) if not a.max() < _OVERFLOW else None  # (a.max() is nan with a nan)
    big_vals = np.copysign(np.float32(np.inf), x.reshape(-1)[big]) if big is not None else None
    sub = where = None
    with np.errstate(over="ignore", invalid="ignore"):
        if n_small > _SPARSE * x.size:
            # split x into its subnormal-range part and the rest (zeros keep x's sign in both)
            sub = np.multiply(x, small, out=a)
            normal = np.multiply(x, np.logical_not(small, out=small))
            sub *= _SUB
        else:
            normal = x
            if n_small:
                where = np.flatnonzero(small)
                sub = x.reshape(-1)[where] * _SUB
        if sub is not None:
            np.rint(sub, out=sub)
            sub *= _SUB_INV
        t = np.multiply(normal, _SPLIT)
        np.subtract(t, normal, out=out)
        np.subtract(t, out, out=out)
        if where is not None:
            out.reshape(-1)[where] = sub
        elif sub is not None:
            out += sub  # each element is zero in one of the two parts
    if big is not None:
        out.reshape(-1)[big] = big_vals
    return out
