"""QDQ patterns: weights as constexpr ops with the QDQ graph's integers, activations as quantize/dequantize.

- ``DequantizeLinear(int8/uint8 constant, scale, zero point, axis)``: iOS 17 →
  ``constexpr_affine_dequantize`` (zero point stored explicitly, zeros when the ONNX has none);
  iOS 18 → ``constexpr_blockwise_shift_scale`` (scale and zero point — its ``offset`` — reshaped to
  the data's rank, the same numbers).
- ``DequantizeLinear(int4 constant, scale, zero point, axis, block_size)`` (iOS 18 only):
  ``constexpr_blockwise_shift_scale`` with int4 data, the [.., K/block, ..] scale and the int4 zero
  point of each block as its int4 ``offset``.
- A partial last block (ONNX allows it, Core ML infers whole blocks from the shapes) is stored
  padded with zero codes and sliced back to the weight's shape after dequantization.
- Scales keep the dtype the ONNX initializer has: float32 scales are stored as float32 and the
  dequantized weight is cast to the compute dtype after — except in fp16 compute when every scale is
  exactly a float16 (a GGUF's Q8_0/Q4_0 scales, or w4a16's int8 tied table that reproduces them):
  those are stored as float16, half the bytes and the same weights (the one rounding of the exact
  product, below, is the cast's). float16 scales (DequantizeLinear-23 with
  ``output_dtype=FLOAT``) are stored as float16 in fp16 compute — the constexpr op then yields
  ``round_fp16((q - zp) * s)``, which is the fp16 rounding of the exact float32 product the ONNX
  computes (≤ 8-bit codes times an 11-bit scale fit float32 exactly) — and widened exactly to
  float32 in fp32 compute. The constexpr op is named after the DequantizeLinear output, so the
  saved package can be read back and compared with the ONNX initializers.
- ``DequantizeLinear(int32 constant)`` (a W8A8 bias, ``scale = s_in * s_w``) is folded to float32
  with ONNX semantics — the values ORT computes, bit for bit — and stored like any float constant
  (rounded to fp16 in fp16 compute).
- Activation ``QuantizeLinear``/``DequantizeLinear`` (iOS 17+ ``quantize``/``dequantize``) keep
  the ONNX zero point (uint8/int8, same integer) and run in the compute dtype: in fp32 the scale is
  the ONNX float32 scale bit for bit; in fp16 it is rounded to fp16 (MIL requires the scale in the
  input's dtype), unless it is outside fp16's normal range, where the pair runs in fp32 around
  casts. Keeping the float32 scale in fp16 compute (casts to fp32 around every pair) was measured
  and bought nothing: the codes that differ from the float32 QDQ run (≈ 1 % per quantize) come from
  the fp16 rounding of the activation itself, not of the scale (MiniLM and EfficientNet-Lite0 W8A8,
  teacher-forced: the same flip rates, the same SQNR), and the casts would break the fp16
  dequantize → conv/matmul pattern Core ML runs in int8.
"""

from __future__ import annotations

import numpy as np
import onnx

from targets.coreml.lower.context import Context, LoweringError, WeightRecord, attrs, is_known, mil_name
from targets.coreml.lower.registry import fold, lowers

HANDLED = frozenset({"DequantizeLinear", "QuantizeLinear"})
_FP16_NORMAL = (float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max))
_WEIGHT_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT4: "int4",
                 onnx.TensorProto.INT32: "int32"}


def weight_problem(init: onnx.TensorProto, deployment: int) -> tuple[str, str] | None:
    """Why the constant a DequantizeLinear reads cannot be a Core ML weight on ``deployment``, or None."""
    kind = _WEIGHT_TYPES.get(init.data_type)
    name = onnx.TensorProto.DataType.Name(init.data_type).lower()
    if init.data_type in (onnx.TensorProto.FLOAT4E2M1,):
        fallback = "int4" if deployment >= 18 else "int8"
        return ("mxfp4 (float4e2m1) weights: Core ML has no 4-bit float type",
                f"quantize for this target: edgeq quantize --profile ios{deployment} (falls back to {fallback})")
    if kind is None:
        return f"{name} weights have no Core ML constexpr form", f"quantize with --profile ios{deployment}"
    if kind == "int4" and deployment < 18:
        return ("int4 block weights need iOS 18 (constexpr_blockwise_shift_scale)",
                "package for ios18, or quantize with --profile ios17 (int4 falls back to int8)")
    return None


def scale_problem(node, data: onnx.TensorProto, scale: onnx.TensorProto | None) -> tuple[str, str] | None:
    """Why a weight's per-axis scale does not fit it (one scale per index of the axis), or None.

    Core ML infers blocks from the data and scale shapes, so 4 scales for 8 channels would silently
    become blocks of 2; ONNX (and ONNX Runtime) refuse such a per-axis DequantizeLinear."""
    if scale is None or len(scale.dims) != 1 or attrs(node).get("block_size"):
        return None
    axis = int(attrs(node).get("axis", 1))
    axis = axis + len(data.dims) if axis < 0 else axis
    if 0 <= axis < len(data.dims) and scale.dims[0] != data.dims[axis]:
        return _scale_mismatch(scale.dims[0], data.dims[axis], axis), _INVALID_QDQ
    return None


_INVALID_QDQ = "the QDQ ONNX is invalid (ONNX Runtime refuses it too): quantize the model again with edgeq"


def _scale_mismatch(n_scales: int, n: int, axis: int) -> str:
    return f"per-axis scale has {n_scales} values for the {n} indices of axis {axis}"


def _qparams(ctx: Context, node, ins):
    scale = ins[1]
    zp = ins[2] if len(ins) > 2 else None
    if not is_known(scale) or (zp is not None and not is_known(zp)):
        raise LoweringError(node, "quantization parameters computed at run time are not supported")
    a = attrs(node)
    axis = int(a.get("axis", 1))
    block = int(a.get("block_size", 0))
    out = int(a.get("output_dtype", 0))
    if out not in (0, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        raise LoweringError(node, f"output_dtype {onnx.TensorProto.DataType.Name(out)} is not supported "
                                  "(float or float16)")
    if scale.dtype not in (np.float32, np.float16):
        raise LoweringError(node, f"{scale.dtype} scales are not supported (float32 or float16)")
    return scale, zp, axis, block


@lowers("DequantizeLinear")
def _dequantize(ctx, node, ins):
    x = ins[0]
    scale, zp, axis, block = _qparams(ctx, node, ins)
    if is_known(x):
        if x.dtype == np.int32:
            return fold(node, ins, ctx.opset)
        return [_weight(ctx, node, x, scale, zp, axis, block)]
    if block:
        raise LoweringError(node, "blocked dequantization of activations is not supported")
    fp32 = _needs_fp32(ctx, scale)
    kw = _axis_kw(ctx, x, scale, axis)
    if zp is not None:
        kw["zero_point"] = zp.astype(zp.dtype)
    y = ctx.mb.dequantize(input=x, scale=scale.astype(np.float32 if fp32 else ctx.float_np), **kw)
    if fp32 and ctx.compute == "fp16":
        y = ctx.mb.cast(x=y, dtype="fp16")
    return [y]


@lowers("QuantizeLinear")
def _quantize(ctx, node, ins):
    x = ins[0]
    if is_known(x):
        return fold(node, ins, ctx.opset)
    scale, zp, axis, block = _qparams(ctx, node, ins)
    if block:
        raise LoweringError(node, "blocked quantization of activations is not supported")
    out_dtype = np.dtype(zp.dtype) if zp is not None else np.dtype(np.uint8)
    if out_dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
        raise LoweringError(node, f"activation quantization to {out_dtype} is not supported (uint8, int8)")
    fp32 = _needs_fp32(ctx, scale)
    if fp32 and ctx.compute == "fp16":
        x = ctx.mb.cast(x=x, dtype="fp32")
    kw = _axis_kw(ctx, x, scale, axis)
    if zp is not None:
        kw["zero_point"] = zp
    s = scale.astype(np.float32 if fp32 else np.float16)
    return [ctx.mb.quantize(input=x, scale=s, output_dtype=str(out_dtype), **kw)]


def _needs_fp32(ctx: Context, scale: np.ndarray) -> bool:
    if ctx.compute == "fp32":
        return True
    a = np.abs(scale.astype(np.float32))
    return bool(np.any(a < _FP16_NORMAL[0]) or np.any(a > _FP16_NORMAL[1]))


def _axis_kw(ctx: Context, x, scale: np.ndarray, axis: int) -> dict:
    return {} if scale.ndim == 0 else {"axis": axis}


def _stored_scale(scale: np.ndarray, compute: str) -> np.ndarray:
    """float32 weight scales that are all exactly float16 values, as float16 in fp16 compute (lossless)."""
    if compute == "fp16" and scale.dtype == np.float32:
        with np.errstate(over="ignore"):
            half = scale.astype(np.float16)
        if np.array_equal(half.astype(np.float32), scale):
            return half
    return scale


def _weight(ctx: Context, node, x: np.ndarray, scale: np.ndarray, zp, axis: int, block: int):
    """A constant dequantization as a constexpr op carrying the integers and scales unchanged."""
    import ml_dtypes

    mb, types = ctx.mb, ctx.types
    name = mil_name(node.output[0])
    if scale.dtype == np.float16 and ctx.compute == "fp32":
        scale = scale.astype(np.float32)  # exact: every float16 is a float32
    scale = _stored_scale(scale, ctx.compute)
    if x.dtype == np.dtype(ml_dtypes.int4):
        kind, data = "int4", x.astype(np.int8)
    elif x.dtype in (np.int8, np.uint8):
        kind, data = str(x.dtype), x
    else:
        raise LoweringError(node, f"{x.dtype} weights have no Core ML constexpr form")
    rank = data.ndim
    axis = axis + rank if axis < 0 else axis
    if kind == "int4" and ctx.deployment < 18:
        raise LoweringError(node, "int4 block weights need iOS 18 (constexpr_blockwise_shift_scale)",
                            hint="package for ios18, or quantize with --profile ios17")
    shape = tuple(data.shape)
    if scale.ndim == 1 and not block and scale.size != shape[axis]:
        raise LoweringError(node, _scale_mismatch(scale.size, shape[axis], axis), hint=_INVALID_QDQ)
    pad = 0
    if block and data.shape[axis] % block and data.shape[axis] > block:
        # Core ML infers the block from data/scale shapes: store whole blocks (zeros appended along
        # the axis, the ONNX integers unchanged in front) and slice the weight back to its shape.
        pad = -data.shape[axis] % block
        widths = [(0, 0)] * rank
        widths[axis] = (0, pad)
        data = np.pad(data, widths)
    if ctx.deployment >= 18:
        if scale.ndim == 0:
            s = scale.reshape([1] * rank)
        elif block:
            s = scale  # already [.., ceil(n/block), ..], the same rank as the data
        else:
            dims = [1] * rank
            dims[axis] = scale.size
            s = scale.reshape(dims)
        kw = {}
        if zp is not None:
            off = zp.astype(np.int8) if kind == "int4" else zp
            kw["offset"] = off.reshape(s.shape).astype(types.np_int4_dtype) if kind == "int4" else off.reshape(s.shape)
        stored = data.astype(types.np_int4_dtype) if kind == "int4" else data
        w = mb.constexpr_blockwise_shift_scale(data=stored, scale=s, name=name, **kw)
    else:
        if block:
            raise LoweringError(node, "blocked weights need iOS 18 (constexpr_blockwise_shift_scale)")
        z = zp if zp is not None else np.zeros(scale.shape, dtype=data.dtype)
        w = mb.constexpr_affine_dequantize(quantized_data=data, zero_point=z, scale=scale, axis=axis, name=name)
    if pad:
        w = mb.slice_by_index(x=w, begin=np.zeros(rank, np.int32), end=np.array(shape, np.int32),
                              name=f"{name}_unpadded")
    ctx.weights.append(WeightRecord(node.name, name, kind, shape, block or None, pad))
    if ctx.compute == "fp16" and scale.dtype != np.float16:
        w = mb.cast(x=w, dtype="fp16", name=f"{name}_fp16")
    return w
