"""The plan's integers for a weight, and what a plan's weights weigh.

:func:`quantize_weight` is round-to-nearest in the plan's format and layout — the integers a
weight gets when no algorithm chose others, shared with the targets and with analyze (one source
of truth). :func:`planned_bytes` is the one size model: each weight at its planned bit width with
its scales and zero points, everything else float32.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edgeq.quant import formats
from edgeq.quant.recipes import WeightFormat

FP16_SCALE_LIMIT = 6.0e4  # float16 scales must stay finite

BITS = {WeightFormat.INT8: 8, WeightFormat.INT4: 4, WeightFormat.MXFP4: 4, WeightFormat.FLOAT: 32}


def quantize_weight(w: np.ndarray, d) -> formats.QuantizedTensor:
    """Round-to-nearest of ``w`` (as stored in the graph) per the :class:`~edgeq.quant.plan.WeightDecision` ``d``."""
    if d.transpose:
        w = w.T
    if d.format == WeightFormat.INT8:
        if d.block:  # tables a blocked kernel reads (tied embedding / output layer)
            return formats.quantize_int8_blockwise(w, d.axis, d.block)
        return formats.quantize_int8_per_channel(w, d.axis)
    if d.format == WeightFormat.INT4:
        if not d.symmetric:
            return formats.quantize_int4_blockwise_asymmetric(w, d.axis, d.block, clip_search=d.clip_search)
        fp16 = d.scale_dtype == "float16" and np.abs(w).max(initial=0.0) / 7.0 < FP16_SCALE_LIMIT
        return formats.quantize_int4_blockwise(w, d.axis, d.block, clip_search=d.clip_search,
                                               scale_dtype=np.float16 if fp16 else np.float32)
    if d.format == WeightFormat.MXFP4:
        return formats.quantize_mxfp4(w, d.axis, d.block)
    raise ValueError(f"not a weight format: {d.format}")


def roundtrip_for_search(w: np.ndarray, d) -> np.ndarray:
    """``quantize_weight(w, d).dequantize()``, fast where a float32 path exists (plain int4 with
    float32 scales): for searches ranking candidates, not for the stored integers."""
    if d.format == WeightFormat.INT4 and not (d.clip_search or d.transpose) and d.scale_dtype == "float32":
        return formats.int4_roundtrip_f32(w, d.axis, d.block, symmetric=d.symmetric)
    return quantize_weight(w, d).dequantize()


def weight_bytes(shape: Iterable[int], fmt: WeightFormat, *, axis: int | None = None, block: int | None = None,
                 symmetric: bool = True, scale_dtype: str = "float32") -> int:
    """Bytes of one weight of ``shape`` stored in ``fmt``: codes, scales and (int4) zero points."""
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape)) if shape else 1
    if fmt == WeightFormat.FLOAT:
        return 4 * n
    total = n * BITS[fmt] // 8
    groups = -(-n // block) if block else (shape[axis] if axis is not None else 1)
    if fmt == WeightFormat.INT8 and block:
        return total + groups * 4
    scale_bytes = 1 if fmt == WeightFormat.MXFP4 else 2 if scale_dtype == "float16" else 4
    return total + groups * scale_bytes + (0 if symmetric else -(-groups // 2))  # int4 zero points: 4 bits


def decision_bytes(d) -> int:
    """:func:`weight_bytes` of a :class:`~edgeq.quant.plan.WeightDecision`."""
    return weight_bytes(d.shape, d.format, axis=d.axis, block=d.block, symmetric=d.symmetric, scale_dtype=d.scale_dtype)


def planned_bytes(plan, model) -> int:
    """Bytes of the model's initializers with each planned weight at its bit width (scales included), the rest as stored."""
    planned = {d.weight: d for d in plan.weights}
    total = 0
    for v in model.graph.initializers.values():
        d = planned.get(v.name)
        if d is not None:
            total += decision_bytes(d)
        elif v.const_value is not None:
            total += v.const_value.nbytes
    return total
