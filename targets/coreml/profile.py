"""What Core ML runs, per deployment target, as data (the plan reads these; no ``if target``).

- iOS 17: int8 per-channel weights (``constexpr_affine_dequantize``) for MatMul, Gemm, Conv and
  Gather; activation ``quantize``/``dequantize`` (uint8/int8 per tensor). No int4: a blocked int4
  weight falls back to int8 and the plan says why.
- iOS 18: adds int4 blocks along the reduction axis (``constexpr_blockwise_shift_scale``), and
  int8 GRU/LSTM ``W``/``R`` (per row or int8 blocks, the recurrent check's forms) as constexpr ops
  feeding MIL's gru/lstm (``lower.recurrent``). iOS 17 keeps those weights float.
- Neither has a 4-bit float type: MXFP4 falls back (to int4 on iOS 18, to int8 on iOS 17).
"""

from __future__ import annotations

from types import MappingProxyType

from edgeq.quant.profile import TargetProfile
from edgeq.quant.recipes import ActFormat, WeightFormat

_I8, _I4, _FP4 = WeightFormat.INT8, WeightFormat.INT4, WeightFormat.MXFP4
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "Gather")
MAX_OPSET = 23  # DequantizeLinear-23 (float16 scales with output_dtype) is the newest form lowered

_NO_FP4 = "Core ML has no 4-bit float type (float4e2m1)"
_NO_INT4_17 = "iOS 17 Core ML has no int4 block weights (constexpr_blockwise_shift_scale is iOS 18+)"
RECURRENT_OPS = ("GRU", "LSTM")
_RNN_INT8 = "edgeq stores Core ML gru/lstm weights as int8 (per row or int8 blocks) on iOS 18"


def _notes(extra: dict) -> MappingProxyType:
    notes = {(op, _FP4): _NO_FP4 for op in WEIGHT_OPS}
    notes.update(extra)
    return MappingProxyType(notes)


IOS17 = TargetProfile(
    name="ios17",
    weight_formats=MappingProxyType({op: frozenset({_I8}) for op in WEIGHT_OPS}),
    activation_formats=frozenset({ActFormat.FLOAT, ActFormat.UINT8, ActFormat.INT8}),
    max_opset=MAX_OPSET,
    notes=_notes({(op, _I4): _NO_INT4_17 for op in WEIGHT_OPS}),
)

IOS18 = TargetProfile(
    name="ios18",
    weight_formats=MappingProxyType({**{op: frozenset({_I8, _I4}) for op in WEIGHT_OPS},
                                     **{op: frozenset({_I8}) for op in RECURRENT_OPS}}),
    activation_formats=frozenset({ActFormat.FLOAT, ActFormat.UINT8, ActFormat.INT8}),
    max_opset=MAX_OPSET,
    notes=_notes({**{(op, f): _RNN_INT8 for op in RECURRENT_OPS for f in (_I4, _FP4)}}),
    # the ONNX Runtime profiles' block choice (edgeq.quant.block_choice), so that an android + ios18 build
    # ships the same integers in both packages (one plan, DESIGN.md); Core ML stores a block's scale per
    # 128 weights as well as per 32 (constexpr_blockwise_shift_scale), and its speed per block size
    # cannot be measured off Apple hardware
    fast_int4_block=128,
)
