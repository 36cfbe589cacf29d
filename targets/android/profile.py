"""What ONNX Runtime Mobile on Android runs, as data.

The ``onnxruntime-android`` AAR is a full ONNX Runtime build: the same CPU kernels as the host
package, including the ``com.microsoft`` contrib ops (MatMulNBits, QLinear*, GatherBlockQuantized)
and the quantization fusions. What differs from the host is the file that ships, an ``.ort``
(ORT format) file, and that format stores no 4-bit tensors (see :mod:`targets.android.ortformat`).
Hence the weight formats, per op:

- MatMul, Gemm: int8 and int4. The converter fuses DequantizeLinear → MatMul/Gemm into
  ``com.microsoft.MatMulNBits`` whose packed weights are uint8, so int4 weights survive.
- Gather (embedding tables): int8 (the rows gathered, then scaled) and int4 as
  ``com.microsoft.GatherBlockQuantized`` on packed uint8 data, which the ORT format holds.
- Conv, ConvTranspose, GRU, LSTM: int8 only. An int4 (or mxfp4) weight there stays a 4-bit
  initializer, which the ORT format cannot hold: the plan falls back to int8 and says why.
- MXFP4 nowhere: no float4e2m1 in the ORT format (and ORT CPU has no DequantizeLinear for it).

Activation formats and the W8A8 placement rules are ORT CPU's (it is the same runtime).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from edgeq.quant.profile import ONNXRUNTIME_CPU, WEIGHT_ONLY_OPS
from edgeq.quant.recipes import WeightFormat

_I8, _I4, _FP4 = WeightFormat.INT8, WeightFormat.INT4, WeightFormat.MXFP4

_NO_4BIT = ("the ORT format (.ort) has no 4-bit tensor type: only MatMul/Gemm int4 weights ship "
            "(packed into MatMulNBits when converted)")
_NO_FP4 = "the ORT format (.ort) has no float4e2m1 tensor type"

ANDROID = dataclasses.replace(
    ONNXRUNTIME_CPU,
    name="android",
    fuse_encoders=True,  # the .ort is Android's alone: its encoders get ORT's fused kernels (MiniLM W4A16 +5 %)
    weight_formats=MappingProxyType({
        "MatMul": frozenset({_I8, _I4}),
        "Gemm": frozenset({_I8, _I4}),
        "Conv": frozenset({_I8}),
        "Gather": frozenset({_I8, _I4}),  # int4 tables as GatherBlockQuantized: packed uint8 ships in .ort
        **{op: frozenset({_I8}) for op in WEIGHT_ONLY_OPS},
    }),
    gather_forms=MappingProxyType({_I8: "gather_rows", _I4: "gather_block_quantized"}),
    tied_forms=MappingProxyType({f: ("tied_gbq", "tied_matmulnbits") for f in (_I8, _I4)}),
    notes=MappingProxyType({
        ("Conv", _I4): f"int4 Conv weights cannot ship on Android: {_NO_4BIT}",
        **{(op, _FP4): f"mxfp4 cannot ship on Android: {_NO_FP4} (and ORT has no DequantizeLinear kernel for it)"
           for op in ("MatMul", "Gemm", "Conv")},
        ("Gather", _FP4): f"mxfp4 embeddings cannot ship on Android: {_NO_FP4}",
        **{(op, _I4): f"int4 {op} weights cannot ship on Android: {_NO_4BIT}" for op in WEIGHT_ONLY_OPS},
        **{(op, _FP4): f"mxfp4 cannot ship on Android: {_NO_FP4}" for op in WEIGHT_ONLY_OPS},
    }),
)

# How the .ort is made: the settings of `python -m onnxruntime.tools.convert_onnx_models_to_ort
# --optimization_style Fixed --target_platform arm` (see targets/android/README.md for why).
OPTIMIZATION_LEVEL = "all"
DISABLED_OPTIMIZERS = ("NchwcTransformer",)  # x86-only layout; the converter drops it for arm
# A QDQ that stores constants as float16 read through a Cast (recipe gguf: the GGUF's float16 scales and
# minimums) keeps them float16 in the .ort: these two would widen them to float32 initializers. SmolLM2 gguf:
# .ort 116.8 -> 100.2 MB (1.21x -> 1.038x the GGUF's tensor bytes), logits identical, decode 16.9 -> 19.9 CPU
# ms/token (1 thread; the casts run on every call, as an .ort is not optimized again at load; float: 37.7)
KEEP_FLOAT16_DISABLED = ("ConstantFolding", "FuseFp16InitializerToFp32NodeTransformer")
SESSION_CONFIG = MappingProxyType({
    "session.qdqisint8allowed": "1",  # arm runs int8 QDQ kernels; keep int8 (no s8→u8 rewrite)
})
