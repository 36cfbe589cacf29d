"""Weight and activation quantization numerics, in pure numpy.

Every :class:`QuantizedTensor` maps 1:1 onto an ONNX ``DequantizeLinear`` node (opset 21, or 23
for float4e2m1): ``y = (x - zero_point) * scale`` in float32, with the scale either a scalar
(per-tensor), a vector of length ``shape[axis]`` (per-axis), or blocked: same rank as ``x``,
``ceil(shape[axis] / block_size)`` along ``axis`` and the ``block_size`` attribute set (the last
block may be partial). :meth:`QuantizedTensor.dequantize` computes exactly what the node computes.

Conventions:

- Rounding is half to even (``np.rint``), as in ONNX ``QuantizeLinear``.
- Codes are computed in float64 from the *stored* float32 scale, so the round-trip error bound
  holds for the scale a runtime actually reads.
- A weight scale is never 0 nor subnormal: an all-zero channel/block gets 1.0 (exact, and a
  zero scale would make the int32 bias scale ``s_in * s_w`` zero downstream); a tiny nonzero one
  is floored at the smallest normal float32, because kernels that flush subnormals to zero
  (FTZ/DAZ, common on mobile) would otherwise dequantize the whole channel to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from edgeq.errors import InputError

_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32, 2**-126
_F32_MAX = float(np.finfo(np.float32).max)
_F32_EPS = float(np.finfo(np.float32).eps)

_BITS = {"int8": 8, "uint8": 8, "int4": 4, "float4e2m1": 4}
_DATA_DTYPES = {
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "int4": np.dtype(np.int8),  # ONNX int4 values held one per int8; see pack_4bit for the wire form
    "float4e2m1": np.dtype(ml_dtypes.float4_e2m1fn),
}
_CODE_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7)}

INT4_CLIP_RATIOS = np.round(np.arange(1.0, 0.499, -0.05), 2)
"""Clip ratios tried by ``quantize_int4_blockwise(clip_search=True)``, 1.0 first (ties keep it)."""

E2M1_EMAX = 2  # exponent of the largest e2m1 value, 6 = 1.5 * 2**2
E2M1_MAX = 6.0


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on arrays is ambiguous and unhashable
class QuantizedTensor:
    """Quantized values plus the DequantizeLinear parameters that map them back to float32.

    ``data`` holds one value per element: int8 for "int8" and for "int4" (values in [-8, 7];
    ``data.astype(ml_dtypes.int4)`` is the ONNX initializer), uint8 for "uint8",
    ``ml_dtypes.float4_e2m1fn`` for "float4e2m1". ``zero_point`` None means 0 (symmetric);
    when present it has the scale's shape and the data's dtype.
    """

    data: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    block_size: int | None
    dtype: str

    def __post_init__(self) -> None:
        # Internal invariant (edgeq builds these), hence ValueError rather than InputError.
        if self.dtype not in _BITS:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(_BITS)}")
        if self.data.dtype != _DATA_DTYPES[self.dtype]:
            raise ValueError(f"{self.dtype} data must be held as {_DATA_DTYPES[self.dtype]}, got {self.data.dtype}")
        if self.scale.dtype not in (np.float32, np.float16):
            raise ValueError(f"scale must be float32 or float16, got {self.scale.dtype}")
        shape = self.data.shape
        if self.axis is None:
            if self.block_size is not None or self.scale.shape != ():
                raise ValueError("a per-tensor QuantizedTensor needs a scalar scale and no block_size")
        elif not 0 <= self.axis < len(shape):
            raise ValueError(f"axis {self.axis} out of range for shape {shape}")
        elif self.block_size is None:
            if self.scale.shape != (shape[self.axis],):
                raise ValueError(f"per-axis scale must have shape ({shape[self.axis]},), got {self.scale.shape}")
        else:
            expected = _blocked_shape(shape, self.axis, self.block_size)
            if self.scale.shape != expected:
                raise ValueError(f"blocked scale must have shape {expected}, got {self.scale.shape}")
        if self.zero_point is not None:
            if self.dtype == "float4e2m1":
                raise ValueError("float4e2m1 has no zero point")
            if self.zero_point.shape != self.scale.shape or self.zero_point.dtype != self.data.dtype:
                raise ValueError("zero_point must have the scale's shape and the data's dtype")

    @property
    def bits(self) -> int:
        return _BITS[self.dtype]

    def dequantize(self) -> np.ndarray:
        """``(data - zero_point) * scale`` in float32, as ONNX DequantizeLinear computes it."""
        x = self.data.astype(np.float32)
        if self.zero_point is not None:
            x = x - self._expand(self.zero_point).astype(np.float32)
        return (x * self._expand(self.scale)).astype(np.float32, copy=False)

    def _expand(self, p: np.ndarray) -> np.ndarray:
        """Broadcast a scale/zero point onto the data's shape, as the ONNX reference does."""
        if self.axis is None:
            return p
        if self.block_size is None:
            dims = [1] * self.data.ndim
            dims[self.axis] = p.size
            return p.reshape(dims)
        n = self.data.shape[self.axis]
        return np.repeat(p, self.block_size, axis=self.axis).take(np.arange(n), axis=self.axis)

    @property
    def nbytes_ideal(self) -> int:
        """Bytes once packed: ``bits`` per element (4-bit padded to a byte), plus scales and zero points."""
        n = math.ceil(self.bits * self.data.size / 8) + self.scale.nbytes
        if self.zero_point is not None:
            n += math.ceil(self.bits * self.zero_point.size / 8)
        return n


# --- weights ---------------------------------------------------------------------------------


def quantize_int8_per_channel(w: np.ndarray, axis: int) -> QuantizedTensor:
    """Symmetric int8, one scale per index of ``axis``: ``scale_c = max|w_c| / 127``.

    127 rather than 128 keeps the code range symmetric ([-127, 127]), so negating a weight
    negates its code and int8 kernels may assume no -128 (no overflow in their accumulators).
    """
    w64 = _check_weight(w, "quantize_int8_per_channel")
    axis = _check_axis(axis, w64.ndim, "quantize_int8_per_channel")
    other = tuple(i for i in range(w64.ndim) if i != axis)
    amax = np.max(np.abs(w64), axis=other) if other else np.abs(w64)
    scale = _safe_scale(amax / 127.0)
    dims = [1] * w64.ndim
    dims[axis] = -1
    q = np.clip(np.rint(w64 / scale.astype(np.float64).reshape(dims)), -127, 127)
    return QuantizedTensor(q.astype(np.int8), scale, None, axis, None, "int8")


def quantize_int8_blockwise(w: np.ndarray, axis: int, block_size: int) -> QuantizedTensor:
    """Symmetric int8 in blocks of ``block_size`` along ``axis``: ``scale = max|block| / 127``, codes in [-127, 127].

    For kernels that read int8 weights in blocks (MatMulNBits with 8 bits, GatherBlockQuantized).
    """
    name = "quantize_int8_blockwise"
    w64 = _check_weight(w, name)
    axis = _check_axis(axis, w64.ndim, name)
    block_size = _check_block_size(block_size, name)
    blocks, restore = _to_blocks(w64, axis, block_size)
    scale = _safe_scale(np.max(np.abs(blocks), axis=-1) / 127.0)
    q = np.clip(np.rint(blocks / scale.astype(np.float64)[..., None]), -127, 127)
    return QuantizedTensor(restore(q).astype(np.int8), np.moveaxis(scale, -1, axis).copy(), None, axis, block_size,
                           "int8")


def quantize_int4_blockwise(w: np.ndarray, axis: int, block_size: int, *, clip_search: bool = False,
                            scale_dtype=np.float32) -> QuantizedTensor:
    """Symmetric int4 in blocks of ``block_size`` along ``axis`` (last block may be partial).

    Plain: ``scale = max|block| / 7``, codes in [-7, 7]. With ``clip_search`` each block tries
    ``scale = r * max|block| / 7`` for ``r`` in :data:`INT4_CLIP_RATIOS` and keeps the ``r`` with
    the least squared error; codes then use the full [-8, 7]. Clipping a few outliers buys finer
    steps for the rest, which wins on bell-shaped weights. r = 1.0 is tried first and ties keep
    the earlier ratio, so the search is deterministic and, block by block, no worse than plain
    (as ranked in float32). ``scale_dtype`` float16 stores half-size scales (floored at the
    smallest normal float16); candidates are ranked with the stored, rounded scale.
    """
    name = "quantize_int4_blockwise"
    w64 = _check_weight(w, name)
    axis = _check_axis(axis, w64.ndim, name)
    block_size = _check_block_size(block_size, name)
    blocks, restore = _to_blocks(w64, axis, block_size)  # (..., nblocks, block_size), zero padded
    amax = np.max(np.abs(blocks), axis=-1)
    if not clip_search:
        scale = _safe_scale(amax / 7.0, scale_dtype)
    else:
        scale = _int4_clip_search(blocks, amax, scale_dtype)
    q = np.clip(np.rint(blocks / scale.astype(np.float64)[..., None]), -8, 7)
    data = restore(q).astype(np.int8)
    return QuantizedTensor(data, np.moveaxis(scale, -1, axis).copy(), None, axis, block_size, "int4")


def _int4_clip_search(blocks: np.ndarray, amax: np.ndarray, scale_dtype=np.float32) -> np.ndarray:
    """Per block, the float32 scale among the clip ratios with the least squared error."""
    # The search runs in float32 (half the memory traffic of float64): it only ranks candidates,
    # and the final codes are recomputed in float64 from the chosen stored scale.
    b32 = blocks.astype(np.float32)
    best_scale = best_err = None
    q = np.empty_like(b32)
    for r in INT4_CLIP_RATIOS:
        s = _safe_scale(amax * r / 7.0, scale_dtype)  # r = 1.0 gives exactly the plain scale
        s_b = s.astype(np.float32)[..., None]
        np.divide(b32, s_b, out=q)
        np.rint(q, out=q)
        np.clip(q, -8, 7, out=q)
        np.multiply(q, s_b, out=q)
        np.subtract(b32, q, out=q)
        np.square(q, out=q)
        err = q.sum(axis=-1, dtype=np.float64)
        if best_scale is None:
            best_scale, best_err = s, err
        else:
            better = err < best_err
            best_scale = np.where(better, s, best_scale)
            best_err = np.where(better, err, best_err)
    return best_scale


def quantize_int4_blockwise_asymmetric(w: np.ndarray, axis: int, block_size: int, *,
                                       clip_search: bool = True) -> QuantizedTensor:
    """Asymmetric int4 in blocks along ``axis``: a scale and a zero point per block.

    Per block, with ``lo = min(block, 0)`` and ``hi = max(block, 0)`` and a clip ratio ``r``:
    ``scale = (hi - lo) * r / 15`` (float32), ``z = clip(rint(-lo * r / scale), 0, 15)``,
    ``q = clip(rint(w / scale) + z, 0, 15)`` (QuantizeLinear's order: round, add, saturate), and
    ``w ≈ (q - z) * scale``. With ``clip_search`` every ratio of :data:`INT4_CLIP_RATIOS` is
    tried (1.0 first, ties keep it) and the least squared error wins. Codes and zero points are
    stored as int4 (``q - 8``, ``z - 8``). A block's full 16 levels cover its own [min, max], where
    symmetric int4 spends half its levels on a side the block may barely use: on MiniLM's
    MatMuls this lifts W4A16 mean cosine from 0.964 to 0.975.
    """
    name = "quantize_int4_blockwise_asymmetric"
    w64 = _check_weight(w, name)
    axis = _check_axis(axis, w64.ndim, name)
    block_size = _check_block_size(block_size, name)
    blocks, restore = _to_blocks(w64, axis, block_size)
    lo0 = np.minimum(blocks.min(axis=-1), 0.0)
    hi0 = np.maximum(blocks.max(axis=-1), 0.0)
    b32 = blocks.astype(np.float32)
    best = None
    for r in INT4_CLIP_RATIOS if clip_search else (1.0,):
        s = _safe_scale((hi0 - lo0) * r / 15.0)
        z = np.clip(np.rint(-(lo0 * r) / s.astype(np.float64)), 0, 15)
        q = np.clip(np.rint(b32 / s[..., None]) + z[..., None].astype(np.float32), 0, 15)
        err = np.square(b32 - (q - z[..., None].astype(np.float32)) * s[..., None]).sum(axis=-1, dtype=np.float64)
        best = keep_better(best, s, z, err)
    scale, z = best[0].astype(np.float32), best[1]
    q = np.clip(np.rint(blocks / scale.astype(np.float64)[..., None]) + z[..., None], 0, 15)
    data = (restore(q) - 8).astype(np.int8)
    zp = (np.moveaxis(z, -1, axis) - 8).astype(np.int8)
    return QuantizedTensor(data, np.moveaxis(scale, -1, axis).copy(), zp, axis, block_size, "int4")


def int4_roundtrip_f32(w: np.ndarray, axis: int, block_size: int, *, symmetric: bool = True) -> np.ndarray:
    """Plain int4 round-to-nearest and back, in float32 arithmetic: what :func:`quantize_int4_blockwise`
    (``symmetric``) or :func:`quantize_int4_blockwise_asymmetric` then ``dequantize()`` give, up to
    float32 rounding of codes at exact ties. For searches that rank many candidates (AWQ's α),
    about 3x faster than the float64 path; never for the integers that are stored."""
    blocks, restore = _to_blocks(np.asarray(w, np.float32), axis, block_size)
    if symmetric:
        s = _safe_scale(np.abs(blocks).max(axis=-1) / 7.0)[..., None]
        q = np.clip(np.rint(blocks / s), -8, 7)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        s = _safe_scale((np.maximum(blocks.max(axis=-1), 0.0) - lo) / 15.0)
        z = np.clip(np.rint(-lo / s), 0, 15)[..., None]
        s = s[..., None]
        q = np.clip(np.rint(blocks / s) + z, 0, 15) - z
    return restore(q * s)


def quantize_mxfp4(w: np.ndarray, axis: int, block_size: int = 32) -> QuantizedTensor:
    """OCP Microscaling MXFP4: float4e2m1 elements sharing a power-of-two scale per block.

    Per block (the spec fixes 32): ``X = 2**(floor(log2 max|block|) - 2)`` (2 is e2m1's emax),
    elements ``w / X`` rounded to the nearest e2m1 value, ties to even, saturating at ±6. Note the
    spec's floor puts ``max|block| / X`` in [4, 8), so the largest element saturates (losing up
    to 25%) whenever it lands in [6, 8). An all-zero block gets X = 1.

    The scale is stored as float32 (exact: a power of two, exponent clamped to float32's normal
    range). The native float8e8m0 scale converts without loss but needs DequantizeLinear opset
    24 (with ``output_dtype``); the float32 form runs at opset 23.
    """
    name = "quantize_mxfp4"
    w64 = _check_weight(w, name)
    axis = _check_axis(axis, w64.ndim, name)
    block_size = _check_block_size(block_size, name)
    blocks, restore = _to_blocks(w64, axis, block_size)
    amax = np.max(np.abs(blocks), axis=-1)
    _, e = np.frexp(amax)  # amax = m * 2**e, m in [0.5, 1): floor(log2 amax) = e - 1, exactly
    exp = np.clip(e - 1 - E2M1_EMAX, -126, 127)
    scale = np.where(amax > 0, np.ldexp(1.0, exp), 1.0).astype(np.float32)
    v = round_to_e2m1(blocks / scale.astype(np.float64)[..., None])  # exact: X is a power of two
    data = restore(v).astype(ml_dtypes.float4_e2m1fn)
    return QuantizedTensor(data, np.moveaxis(scale, -1, axis).copy(), None, axis, block_size, "float4e2m1")


def round_to_e2m1(v: np.ndarray) -> np.ndarray:
    """Round to the e2m1 grid ±{0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even code, saturating at ±6.

    The grid is uniform within each binade (step .5 below 2, 1 in [2, 4), 2 from 4), and an
    even multiple of the step there is an even code, so ``rint`` on ``v / step`` is the spec's
    round-half-to-even. -0 becomes +0 so a zero weight has code 0.
    """
    v = np.asarray(v, dtype=np.float64)
    a = np.abs(v)
    step = np.where(a < 2.0, 0.5, np.where(a < 4.0, 1.0, 2.0))
    r = np.minimum(np.rint(a / step) * step, E2M1_MAX)
    return np.copysign(r, v) + 0.0


# --- activations -----------------------------------------------------------------------------


def quantize_uint8_per_tensor(x_min: float, x_max: float) -> tuple[float, int]:
    """Asymmetric uint8 ``(scale, zero_point)`` for an observed range ``[x_min, x_max]``.

    The range is widened to include 0 so that 0 (padding, ReLU) is exact: its code is the
    integer zero point. ``scale = (max - min) / 255`` is floored at float32 eps (as PyTorch's
    observers do): a constant-zero tensor (degenerate range) still gets a positive scale, with
    zero point 0 so zero maps exactly, and the floor keeps ``s_in * s_w`` for int32 biases from
    underflowing. The scale is a float32 value returned as a Python float.
    """
    lo, hi = _check_range(x_min, x_max, "quantize_uint8_per_tensor")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32(max((hi - lo) / 255.0, _F32_EPS)))
    zero_point = int(np.clip(np.rint(-lo / scale), 0, 255))
    return scale, zero_point


def quantize_int8_symmetric_per_tensor(x_min: float, x_max: float) -> float:
    """Symmetric int8 scale ``max(|min|, |max|) / 127`` (zero point 0), floored at float32 eps."""
    lo, hi = _check_range(x_min, x_max, "quantize_int8_symmetric_per_tensor")
    return float(np.float32(max(max(abs(lo), abs(hi)) / 127.0, _F32_EPS)))


# --- packing ---------------------------------------------------------------------------------


def pack_4bit(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values two per byte as ONNX raw_data does for int4, uint4 and float4e2m1.

    Flattened in C order, element 2i in the low nibble and 2i+1 in the high nibble; an odd count
    is padded with a zero nibble. Accepts signed integers in [-8, 7] (two's complement nibbles),
    unsigned integers in [0, 15], and ``ml_dtypes.float4_e2m1fn`` (its 4-bit codes).
    """
    a = np.asarray(values)
    dt = a.dtype
    if dt == np.dtype(ml_dtypes.float4_e2m1fn):
        codes = a.view(np.uint8) & 0xF
    else:
        if dt == np.dtype(ml_dtypes.int4):
            a, dt = a.astype(np.int8), np.dtype(np.int8)
        elif dt == np.dtype(ml_dtypes.uint4):
            a, dt = a.astype(np.uint8), np.dtype(np.uint8)
        if not np.issubdtype(dt, np.integer):
            raise InputError(f"pack_4bit: cannot pack {dt} values", hint="pass integers or ml_dtypes.float4_e2m1fn")
        lo, hi = (-8, 7) if np.issubdtype(dt, np.signedinteger) else (0, 15)
        if a.size and (a.min() < lo or a.max() > hi):
            raise InputError(f"pack_4bit: {dt} values must lie in [{lo}, {hi}], got [{a.min()}, {a.max()}]")
        codes = a.astype(np.int64) & 0xF
    codes = codes.reshape(-1).astype(np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    return codes[0::2] | (codes[1::2] << 4)


# --- helpers ---------------------------------------------------------------------------------


def _check_weight(w: np.ndarray, fn: str) -> np.ndarray:
    """Validate a weight and return it as float64 (the precision the codes are computed in)."""
    if not isinstance(w, np.ndarray):
        raise InputError(f"{fn}: weight must be a numpy array, got {type(w).__name__}")
    if not (np.issubdtype(w.dtype, np.floating) or w.dtype == np.dtype(ml_dtypes.bfloat16)):
        raise InputError(f"{fn}: weight must be a float array, got {w.dtype}", hint="only float weights are quantized")
    if w.ndim == 0 or w.size == 0:
        raise InputError(f"{fn}: weight must have at least one axis and one element, got shape {list(w.shape)}")
    w64 = w.astype(np.float64)
    if not np.all(np.isfinite(w64)):
        raise InputError(f"{fn}: weight has NaN or infinite values", hint="fix the model's weights first")
    if np.max(np.abs(w64)) > _F32_MAX:
        raise InputError(f"{fn}: weight has values beyond the float32 range")
    return w64


def _check_axis(axis: int, ndim: int, fn: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise InputError(f"{fn}: axis must be an integer, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise InputError(f"{fn}: axis {axis} is out of range for a rank-{ndim} weight")
    return int(axis) % ndim


def _check_block_size(block_size: int, fn: str) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise InputError(f"{fn}: block_size must be a positive integer, got {block_size!r}")
    return int(block_size)


def _check_range(x_min: float, x_max: float, fn: str) -> tuple[float, float]:
    lo, hi = float(x_min), float(x_max)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{fn}: range [{lo}, {hi}] is not finite", hint="check the calibration data for NaN/inf")
    if lo > hi:
        raise InputError(f"{fn}: x_min {lo} is greater than x_max {hi}")
    return lo, hi


def keep_better(best: list | None, scale: np.ndarray, zero: np.ndarray, cost: np.ndarray) -> list:
    """A grid search's step: per block, the (scale, zero point, cost) of ``best`` or of this candidate,
    whichever costs less (the candidate where there is no ``best`` yet)."""
    if best is None:
        return [scale, zero, cost]
    better = cost < best[2]
    return [np.where(better, scale, best[0]), np.where(better, zero, best[1]), np.where(better, cost, best[2])]


def _safe_scale(raw: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Scales in ``dtype``: 1.0 where the block is all zero, at least the smallest normal elsewhere."""
    s = np.asarray(raw, dtype=np.float64)
    return np.where(s > 0, np.maximum(s, float(np.finfo(dtype).smallest_normal)), 1.0).astype(dtype)


def _blocked_shape(shape: tuple[int, ...], axis: int, block_size: int) -> tuple[int, ...]:
    out = list(shape)
    out[axis] = -(-shape[axis] // block_size)
    return tuple(out)


def _to_blocks(w: np.ndarray, axis: int, block_size: int):
    """View ``w`` as (..., nblocks, block_size) blocks along ``axis`` (zero padded), and the inverse."""
    moved = np.moveaxis(w, axis, -1)
    n = moved.shape[-1]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    if pad:
        moved = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,), moved.dtype)], axis=-1)
    blocks = moved.reshape(moved.shape[:-1] + (nb, block_size))

    def restore(b: np.ndarray) -> np.ndarray:
        flat = b.reshape(b.shape[:-2] + (nb * block_size,))[..., :n]
        return np.moveaxis(flat, -1, axis)

    return blocks, restore
