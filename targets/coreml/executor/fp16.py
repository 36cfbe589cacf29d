"""Rounding float32 arrays to float16 precision while keeping them float32.

The fast path of the reference executor stores an fp16 program's tensors as float32 arrays whose
values are exactly representable in float16, so no op has to convert its inputs back from
float16. numpy's float16 casts are scalar code (an fp16 round trip costs ~25x a float32 add),
so the rounding here is float32 arithmetic, three vectorised passes in the common case:

- Veltkamp's splitting, ``t = (2**13 + 1) * x``, ``hi = t - (t - x)``, is ``x`` rounded to nearest,
  ties to even, to 24 - 13 = 11 significant bits: float16's precision for its normal numbers.
- Below float16's smallest normal number (``2**-14``) the spacing is fixed (``2**-24``): those
  elements are rounded as ``(x + c) - c`` with ``c = ±0.5``, whose float32 spacing is ``2**-24``.
  When more than 1 % of the elements are that small (softmax outputs), every element is rounded
  as ``(x + c) - c`` with ``c = ±2**(e + 13)``, ``e`` the element's exponent but at least -14: the
  sum lies in ``c``'s binade, whose float32 spacing is float16's at ``x`` (slower per element,
  no per-element patching).
- Values that round beyond float16's largest finite number become ±inf, as a float16 cast makes
  them.

The result equals ``x.astype(float16).astype(float32)`` bit for bit, -0.0, inf and nan included
(tested on every float16 midpoint and on random float32 bit patterns).
"""

from __future__ import annotations

import numpy as np

FP16_MAX = 65504.0
_SPLIT = np.float32(2**13 + 1)
_TINY = np.float32(2.0**-14)  # float16's smallest normal number
_OVERFLOW = np.float32(65520.0)  # the midpoint between 65504 and 65536: rounds to inf (ties to even)
_HALF = np.float32(0.5)  # float32 spacing just above 0.5 is 2**-24, float16's subnormal spacing
_PATCH_FRACTION = 0.01  # above this share of subnormal-range elements, round by exponent instead
_EXP = np.uint32(0x7F800000)
_SIGN = np.uint32(0x80000000)
_MIN_EXP = np.uint32((127 - 14) << 23)  # float16's smallest normal exponent, in float32 exponent bits
_SHIFT = np.uint32(13 << 23)  # float32 has 13 more fraction bits than float16


def round_fp16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` (float32) rounded to the nearest float16 value, as float32, into ``out`` (may be ``x``) or a new array."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty_like(x)
    if x.size == 0:
        return out
    a = np.abs(x)
    small = a < _TINY
    n_small = np.count_nonzero(small)
    if n_small > _PATCH_FRACTION * x.size:
        return _round_by_exponent(x, a, out)
    small = np.flatnonzero(small) if n_small else None
    top = a.max()
    big = np.flatnonzero(a >= _OVERFLOW) if not top < _OVERFLOW else None  # (top is nan if x has one)
    flat = x.reshape(-1)
    patches = []  # computed before ``out`` (which may be ``x``) is written
    if small is not None:
        xs = flat[small]
        c = np.copysign(_HALF, xs)
        patches.append((small, np.copysign((xs + c) - c, xs)))  # copysign: -0.0 for tiny negatives
    if big is not None:
        patches.append((big, np.copysign(np.float32(np.inf), flat[big])))
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.multiply(x, _SPLIT)
        np.subtract(t, x, out=out)
        np.subtract(t, out, out=out)
    flat_out = out.reshape(-1)
    for where, vals in patches:
        flat_out[where] = vals
    return out


def _round_by_exponent(x: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32)
    sign = bits & _SIGN
    c = bits & _EXP
    np.maximum(c, _MIN_EXP, out=c)
    c += _SHIFT  # exponents beyond float16's range wrap around here: those elements are patched below
    c |= sign
    cf = c.view(np.float32)
    big = np.flatnonzero(a >= _OVERFLOW) if not a.max() < _OVERFLOW else None
    big_vals = np.copysign(np.float32(np.inf), x.reshape(-1)[big]) if big is not None else None
    with np.errstate(over="ignore", invalid="ignore"):
        np.add(x, cf, out=out)
        out -= cf
    out.view(np.uint32)[...] |= sign  # -0.0 for tiny negatives
    if big is not None:
        out.reshape(-1)[big] = big_vals
    return out
