"""Target profiles: which weight and activation formats a runtime can run, per op, as data.

The plan asks a profile, never an ``if target == ...``: a format the profile does not list for
an op falls back along ``FALLBACK`` (mxfp4 → int4 → int8 → float), and the plan records why.
Targets define their own profiles; the host profile here describes ONNX Runtime CPU, the
runtime edgeq validates with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from edgeq.quant.recipes import ActFormat, WeightFormat

FALLBACK = {
    WeightFormat.MXFP4: WeightFormat.INT4,
    WeightFormat.INT4: WeightFormat.INT8,
    WeightFormat.INT8: WeightFormat.FLOAT,
}


@dataclass(frozen=True)
class TargetProfile:
    """What one runtime runs: weight formats per op type, activation formats, opset."""

    name: str
    weight_formats: Mapping[str, frozenset[WeightFormat]]
    activation_formats: frozenset[ActFormat] = frozenset({ActFormat.FLOAT, ActFormat.UINT8, ActFormat.INT8})
    max_opset: int = 23
    # How a quantized embedding table (Gather on axis 0) is read, per format: "dq" (DequantizeLinear
    # of the whole table, then Gather: what every runtime runs, but the whole table is dequantized on
    # every run), "gather_rows" (Gather the int8 rows and their scales, then Cast and Mul: standard
    # ONNX, only the looked-up rows dequantized) or "gather_block_quantized" (com.microsoft's fused
    # kernel on packed uint8 / float4 data). Formats not listed: "dq".
    gather_forms: Mapping[WeightFormat, str] = field(default_factory=dict)
    # A table tied between an embedding Gather and an output MatMul (read through Transpose), per
    # format: (the Gather's form, the MatMul's form). "tied_gbq" + "tied_matmulnbits": ONNX Runtime's
    # GatherBlockQuantized and MatMulNBits read ONE packed initializer (stored once in .onnx and .ort);
    # formats not listed: "tied_dq" (one DequantizeLinear feeding both readers).
    tied_forms: Mapping[WeightFormat, tuple[str, str]] = field(default_factory=dict)
    notes: Mapping[tuple[str, WeightFormat], str] = field(default_factory=dict)
    # W8A8 placement, as data. Anchors take quantized inputs (weighted ops with int8 weights);
    # integer ops have integer kernels and are quantized when their output feeds a quantized
    # input; same-scale ops run on the integers unchanged (input and output share one scale);
    # fused activations (Relu, Clip) disappear into the anchor before them, with the output
    # range kept inside the clip range.
    anchor_ops: frozenset[str] = frozenset({"Conv", "MatMul", "Gemm"})
    integer_ops: frozenset[str] = frozenset()
    same_scale_ops: frozenset[str] = frozenset()
    fused_activations: frozenset[str] = frozenset({"Relu", "Clip"})
    # anchors whose output is quantized even when no consumer needs it (the kernel needs Q on both sides)
    quantized_outputs: frozenset[str] = frozenset()
    # fuse transformer layers into ONNX Runtime's kernels (edgeq.passes.fuse_for_ort) on the quantized
    # graph, so the plan and calibration stay those of the portable graph other targets share: a causal
    # LM's RMSNorm, rotary embedding and attention (its query/key/value integers packed into one MatMul);
    # any other model's normalization, attention and GELU
    ort_fusions: bool = False
    # ... and for models other than causal LMs, only where the profile's file is not also meant for other
    # targets: the host profile's QDQ ONNX is the portable one (the README tour packages one file for
    # Android and iOS, and Core ML has no lowering for ORT's contrib ops); the android profile fuses
    fuse_encoders: bool = False
    # ops whose weight-only quantization has no fast kernel here, and what that costs (a plan note)
    slow_weight_only: Mapping[str, str] = field(default_factory=dict)
    # int4 weights of these ops store float16 scales (DequantizeLinear-23 with output_dtype float).
    # Not for ops ORT fuses into MatMulNBits: its fusion fails on float16 scales (ORT 1.32).
    fp16_scale_ops: frozenset[str] = frozenset()
    # an int4 MatMul/Gemm block size this runtime runs faster than smaller blocks: the plan's block
    # choice (edgeq.quant.block_choice) moves layers to it where they lose little. None: no such block.
    fast_int4_block: int | None = None

    def supports(self, op_type: str, fmt: WeightFormat) -> bool:
        return fmt == WeightFormat.FLOAT or fmt in self.weight_formats.get(op_type, frozenset())

    def why_not(self, op_type: str, fmt: WeightFormat) -> str:
        note = self.notes.get((op_type, fmt))
        return note or f"{self.name} does not run {fmt.value} weights for {op_type}"


_I8, _I4, _FP4 = WeightFormat.INT8, WeightFormat.INT4, WeightFormat.MXFP4

# ORT's QDQ fusions (checked on 1.32 CPU): QLinearAdd/Mul/Concat/AveragePool/GlobalAveragePool/
# Sigmoid/LeakyRelu/Softmax; the QDQ pairs around MaxPool, Reshape, Transpose, ... are dropped
# and the op runs on the int8 tensor.
ORT_INTEGER_OPS = frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax"})
ORT_SAME_SCALE_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Resize"})

# Weight-only ops: no integer kernel reads their input, a DequantizeLinear feeds them the weight
# (ConvTranspose, GRU, LSTM, RNN: W and R).
WEIGHT_ONLY_OPS = ("ConvTranspose", "GRU", "LSTM", "RNN")

_SLOW_CONV = ("ONNX Runtime has no weight-only Conv kernel: the weight is dequantized on every run (measured on "
              "EfficientNet-Lite0: about +10 % on Android, 2.6x slower on x86 hosts, where the float model uses "
              "NCHWc); smaller, not faster — a W8A8 recipe runs it as QLinearConv")

ONNXRUNTIME_CPU = TargetProfile(
    name="onnxruntime-cpu",
    weight_formats=MappingProxyType({
        "MatMul": frozenset({_I8, _I4}),
        "Gemm": frozenset({_I8, _I4}),
        "Conv": frozenset({_I8}),
        "Gather": frozenset({_I8, _I4, _FP4}),
        **{op: frozenset({_I8, _I4}) for op in WEIGHT_ONLY_OPS},
    }),
    # measured (MiniLM, 16 tokens, 1-thread CPU time): the table dequantized whole was 33 % of a W8A8
    # run and 80 % of a W4A16 run; gathering the rows first: W8A8 1.04x → 1.8x float, W4A16 → 1.3x
    gather_forms=MappingProxyType({_I8: "gather_rows", _I4: "gather_block_quantized", _FP4: "gather_block_quantized"}),
    tied_forms=MappingProxyType({f: ("tied_gbq", "tied_matmulnbits") for f in (_I8, _I4)}),
    integer_ops=ORT_INTEGER_OPS,
    same_scale_ops=ORT_SAME_SCALE_OPS,
    quantized_outputs=frozenset({"Conv"}),
    ort_fusions=True,
    fp16_scale_ops=frozenset({"Gather"}),
    # MatMulNBits (accuracy level 4) on x86 with AVX-512 VNNI, 1 thread, MiniLM's shapes: block 128 is 1.3-1.5x
    # the speed of block 32, 256 no faster than 128 (notes/latency.md). arm64's kernels were not measured.
    fast_int4_block=128,
    slow_weight_only=MappingProxyType({"Conv": _SLOW_CONV, "ConvTranspose": _SLOW_CONV}),
    notes=MappingProxyType({
        ("Conv", _I4): "int4 Conv weights are dequantized on every run in ONNX Runtime, 7x the time of int8 "
                       "per-channel (EfficientNet-Lite0 W4A16 ran at 0.31x float)",
        ("MatMul", _FP4): "mxfp4 not runnable here: ONNX Runtime CPU has no DequantizeLinear for float4e2m1",
        ("Gemm", _FP4): "mxfp4 not runnable here: ONNX Runtime CPU has no DequantizeLinear for float4e2m1",
        ("Conv", _FP4): "mxfp4 not runnable here: ONNX Runtime CPU has no DequantizeLinear for float4e2m1",
    }),
)

# onnx.reference.ReferenceEvaluator runs DequantizeLinear on float4e2m1 (opset 23): the DQ-23 form.
ONNX_REFERENCE = TargetProfile(
    name="onnx-reference",
    weight_formats=MappingProxyType({op: frozenset({_I8, _I4, _FP4})
                                     for op in ("MatMul", "Gemm", "Conv", "Gather", *WEIGHT_ONLY_OPS)}),
    integer_ops=ORT_INTEGER_OPS,
    same_scale_ops=ORT_SAME_SCALE_OPS,
)

PROFILES = {p.name: p for p in (ONNXRUNTIME_CPU, ONNX_REFERENCE)}
