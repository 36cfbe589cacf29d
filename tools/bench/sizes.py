"""File size and the ideal size of a quantized ONNX model, for any tool's output.

The ideal follows edgeq's ``QuantizeResult.ideal_bytes``: every quantized weight at its bit
width plus its scales, every other initializer as stored. Zero points are not counted (the
ideal is symmetric), nor graph overhead, nor a float copy kept beside a quantized weight. What
counts as a quantized weight is read from the graph, whatever the tool:

- ``DequantizeLinear`` data (int8/int4/fp4 ...), and a float weight feeding ``QuantizeLinear``
  (NNCF's form: the weight stays float in the file, the ideal counts it at the Q output width);
- ``MatMulNBits`` B (``bits`` per element of K x N), ``GatherBlockQuantized`` data;
- ``MatMulInteger`` / ``ConvInteger`` / ``QLinear*`` weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

_BITS = {
    TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
    TensorProto.INT16: 16, TensorProto.UINT16: 16, TensorProto.FLOAT16: 16, TensorProto.BFLOAT16: 16,
    TensorProto.FLOAT: 32, TensorProto.INT32: 32, TensorProto.UINT32: 32,
    TensorProto.DOUBLE: 64, TensorProto.INT64: 64, TensorProto.UINT64: 64, TensorProto.BOOL: 8,
}
for _n in ("FLOAT4E2M1", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0"):
    if hasattr(TensorProto, _n):
        _BITS[getattr(TensorProto, _n)] = 4 if _n.startswith("FLOAT4") else 8

# op type -> (weight input index, scale input indices, zero-point input indices)
_WEIGHT_SITES = {
    "DequantizeLinear": (0, (1,), (2,)),
    "MatMulInteger": (1, (), (2, 3)),
    "ConvInteger": (1, (), (2, 3)),
    "QLinearConv": (3, (1, 4, 6), (2, 5, 7)),
    "QLinearMatMul": (3, (1, 4, 6), (2, 5, 7)),
    "DynamicQuantizeMatMul": (1, (2,), (3,)),
    "MatMulNBits": (1, (2,), (3,)),
    "GatherBlockQuantized": (0, (2,), (3,)),
}


def file_bytes(path: str | Path) -> int:
    """The model file plus any external-data files next to it that it names."""
    p = Path(path)
    total = p.stat().st_size
    m = onnx.load(str(p), load_external_data=False)
    locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum((p.parent / loc).stat().st_size for loc in locations if (p.parent / loc).exists())


def _elements(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1


def _stored_bytes(t: TensorProto) -> int:
    return _elements(t) * _BITS.get(t.data_type, 32) // 8


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def ideal_bytes(path: str | Path) -> dict:
    """The ideal byte count of the model at ``path`` and how many weights were counted quantized."""
    m = onnx.load(str(path), load_external_data=True)
    inits = {t.name: t for t in m.graph.initializer}
    role: dict[str, tuple[str, int]] = {}  # name -> (role, bits); first role wins
    quantized = 0

    def mark(name: str, kind: str, bits: int = 0) -> None:
        if name and name in inits and name not in role:
            role[name] = (kind, bits)

    for node in m.graph.node:
        if node.op_type == "QuantizeLinear" and node.input and node.input[0] in inits:
            zp = inits.get(node.input[2]) if len(node.input) > 2 else None
            out_type = zp.data_type if zp is not None else _attr(node, "output_dtype", 0) or TensorProto.UINT8
            mark(node.input[0], "weight", _BITS.get(out_type, 8))
            for i in (1,):
                mark(node.input[i], "scale")
            if len(node.input) > 2:
                mark(node.input[2], "zero_point")
            continue
        site = _WEIGHT_SITES.get(node.op_type)
        if site is None:
            continue
        w, scales, zps = site
        ins = list(node.input)
        if w < len(ins) and ins[w] in inits:
            t = inits[ins[w]]
            if node.op_type == "MatMulNBits":
                bits = int(_attr(node, "bits", 4))
                mark(ins[w], "packed", int(_attr(node, "K")) * int(_attr(node, "N")) * bits // 8)
            elif node.op_type == "GatherBlockQuantized" and t.data_type == TensorProto.UINT8:
                mark(ins[w], "packed", _elements(t))  # two int4 (or one uint8) per byte, as stored
            else:
                mark(ins[w], "weight", _BITS.get(t.data_type, 32))
        for i in scales:
            if i < len(ins):
                mark(ins[i], "scale")
        for i in zps:
            if i < len(ins):
                mark(ins[i], "zero_point")

    total = 0
    for name, t in inits.items():
        kind, bits = role.get(name, ("other", 0))
        if kind == "weight":
            total += _elements(t) * bits // 8
            quantized += bits < 32
        elif kind == "packed":
            total += bits
            quantized += 1
        elif kind == "zero_point":
            continue
        else:  # scales and everything else, as stored
            total += _stored_bytes(t)
    return {"ideal_bytes": int(total), "quantized_weights": int(quantized)}
