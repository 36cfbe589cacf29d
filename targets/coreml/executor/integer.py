"""W8A8 matmuls in integers: the reference executor's semantics for a ``matmul`` whose input is an
activation ``dequantize`` (8-bit codes, one scale) and whose weight is an int8 ``constexpr``
(symmetric, one scale per output channel); and gathers from int8 tables without expanding them.

Such a product is computed as Core ML's int8-int8 path computes it (the Neural Engine of A17 Pro /
M4 and later runs W8A8 linear layers on the codes): the exact integer sum of code products, times
the activation scale times the channel's weight scale, then rounded to the program's dtype. The
plain reading (operands dequantized to fp16, then a float32 product) rounds each operand to fp16
first; the two differ by about one fp16 step of the output (~65 dB on MiniLM's layers), far below
what 8-bit activations cost (~30 dB). Why this reading: ONNX Runtime computes it with its int8
kernels (``MatMulInteger``, 3-4x faster than a float32 GEMM on this kind of CPU), which is what
brings the iOS package's validation within 2x of the Android package's; the numpy executor computes
the same sums exactly in float64, so the two engines agree bit for bit on these ops.

:class:`IntegerGather` changes nothing in the numbers: it gathers rows of codes and scales them.

The codes are read back from the dequantized input: a dequantized 8-bit code rounded to fp16 is
within 1/16 of a scale step of ``code * scale``, so ``rint(x / scale)`` is the code (clipped to the
codes' range, so a forced value that is not a dequantized code stays in range too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# constexpr ops whose int8 codes, scales and offsets the executor can keep (see weight_codes)
CONSTEXPR = ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize")


@dataclass(frozen=True)
class WeightCodes:
    """A constant weight as int8 codes times one float32 scale per index of ``axis``."""

    codes: np.ndarray  # int8, the weight's shape
    scale: np.ndarray  # float32, one per index of ``axis``
    axis: int


@dataclass(eq=False)
class IntegerMatmul:
    """``matmul(dequantize(codes), W)`` in integers; called as the executor calls the op's function."""

    x_scale: np.float32
    lo: np.float32  # the centered codes' range: code - zero point
    hi: np.float32
    zero_point: int
    codes_dtype: np.dtype  # int8 or uint8: the activation codes' dtype
    weight: np.ndarray  # int8 [K, N]
    scale: np.ndarray  # float32 [N]: x_scale * the weight's channel scales, rounded once to float32
    _w64: np.ndarray | None = field(default=None, init=False, repr=False)  # made on the first numpy run

    def codes(self, x) -> np.ndarray:
        """The centered activation codes (float32 integers) of a dequantized input."""
        return np.clip(np.rint(np.asarray(x, np.float32) / self.x_scale), self.lo, self.hi)

    def __call__(self, x, **_constants):
        c = self.codes(x)
        k = self.weight.shape[0]
        # float64 sums of products of 8-bit integers are exact (|sum| < 2**53), as ORT's int32 ones
        if self._w64 is None:
            self._w64 = self.weight.astype(np.float64)
        acc = (c.reshape(-1, k).astype(np.float64) @ self._w64).astype(np.float32)
        return acc.reshape(*c.shape[:-1], self.weight.shape[1]) * self.scale


@dataclass(eq=False)
class IntegerGather:
    """``gather(W, indices, axis=0)`` of an int8 constexpr table: the rows of codes gathered, then
    scaled. The same numbers as gathering rows of the expanded table (the expansion is elementwise,
    so it commutes with the gather), without expanding the whole table at load."""

    codes: np.ndarray  # int8 [V, D]
    scale: np.ndarray  # float32: [V, 1] (one per row) or [1, D] (one per column)

    def __call__(self, indices, **_constants):
        idx = np.asarray(indices).astype(np.int64)
        rows = np.take(self.codes, idx, axis=0).astype(np.float32)
        rows *= np.take(self.scale, idx, axis=0) if self.scale.shape[0] > 1 else self.scale[0]
        return rows


def weight_codes(op_type: str, args: dict) -> WeightCodes | None:
    """The int8 codes of a folded constexpr weight when they are symmetric (offset / zero point 0)
    with one scale per channel of one axis of a 2-d weight; else None."""
    if op_type == "constexpr_blockwise_shift_scale":
        data, scale, offset = args.get("data"), args.get("scale"), args.get("offset")
    elif op_type == "constexpr_affine_dequantize":
        data, scale, offset = args.get("quantized_data"), args.get("scale"), args.get("zero_point")
    else:
        return None
    if data is None or scale is None:
        return None
    data, scale = np.asarray(data), np.asarray(scale)
    if data.dtype != np.int8 or data.ndim != 2 or (offset is not None and np.any(np.asarray(offset) != 0)):
        return None
    if op_type == "constexpr_affine_dequantize":
        axis = int(args.get("axis", 0)) % 2
        if scale.size not in (1, data.shape[axis]):
            return None
        return WeightCodes(data, np.broadcast_to(scale.astype(np.float32).reshape(-1), (data.shape[axis],)), axis)
    if scale.ndim != 2:
        return None
    per = [a for a in range(2) if scale.shape[a] != 1]
    if len(per) > 1 or (per and scale.shape[per[0]] != data.shape[per[0]]):
        return None  # blocks along the reduction: not one scale per channel
    axis = per[0] if per else 1
    return WeightCodes(data, scale.astype(np.float32).reshape(-1).repeat(data.shape[axis] // scale.size), axis)


def integer_matmul(weight: WeightCodes, transpose_y: bool, x_scale, zero_point, codes_dtype) -> IntegerMatmul | None:
    """The integer form of ``matmul(x, y)`` for ``y`` = ``weight`` (transposed when ``transpose_y``)
    and ``x`` dequantized with ``x_scale`` / ``zero_point`` from ``codes_dtype`` codes; None when the
    weight's scales run along the reduction axis."""
    codes, axis = (weight.codes.T, 1 - weight.axis) if transpose_y else (weight.codes, weight.axis)
    n = codes.shape[1]
    if axis == 1:
        scale = np.broadcast_to(weight.scale, (n,))
    elif np.all(weight.scale == weight.scale[0]):
        scale = np.full(n, weight.scale[0], np.float32)
    else:
        return None
    info = np.iinfo(codes_dtype)
    x_scale = np.float32(x_scale)
    return IntegerMatmul(x_scale, np.float32(info.min - zero_point), np.float32(info.max - zero_point),
                         int(zero_point), np.dtype(codes_dtype), np.ascontiguousarray(codes),
                         (x_scale * scale.astype(np.float32)).astype(np.float32))
