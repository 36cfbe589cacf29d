"""The weight half of the QDQ pass: store each planned weight quantized, behind a DequantizeLinear.

Rules it applies, per :class:`~edgeq.quant.plan.WeightDecision`:

- int8: symmetric per-channel ``DequantizeLinear(int8, scale[C], axis)``.
- int4: symmetric blocks ``DequantizeLinear(int4, scale, axis, block_size)`` (opset 21); for a
  MatMul the block axis is K, the form ONNX Runtime fuses into MatMulNBits.
- mxfp4: ``DequantizeLinear(float4e2m1, scale, axis, block_size=32)`` (opset 23). Where the plan
  says so (the profile's ``gather_block_quantized``), an embedding Gather becomes
  ``com.microsoft.GatherBlockQuantized`` instead, which ONNX Runtime runs.
- Gemm with ``transB=1`` and blocked weights: the weight is stored transposed and ``transB``
  cleared, so the blocks run along K as the fused kernels expect.
- Every consumer gets its own initializers (ORT does not fuse DQ nodes that share them); the
  float weight is removed once nothing reads it.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from edgeq.quant import formats
from edgeq.quant.plan import QuantPlan, WeightDecision
from edgeq.quant.recipes import WeightFormat

MXFP4_DQ_OPSET = 23  # DequantizeLinear gained float4e2m1 in opset 23


def quantize_weight(w: np.ndarray, d: WeightDecision) -> formats.QuantizedTensor:
    """The plan's integers for one weight (shared with targets: one source of truth)."""
    if d.transpose:
        w = w.T
    if d.format == WeightFormat.INT8:
        return formats.quantize_int8_per_channel(w, d.axis)
    if d.format == WeightFormat.INT4:
        return formats.quantize_int4_blockwise(w, d.axis, d.block, clip_search=d.clip_search)
    if d.format == WeightFormat.MXFP4:
        return formats.quantize_mxfp4(w, d.axis, d.block)
    raise ValueError(f"not a weight format: {d.format}")


def _storage(q: formats.QuantizedTensor) -> np.ndarray:
    if q.dtype == "int4":
        return q.data.astype(ml_dtypes.int4)
    return q.data


class WeightQDQPass(ir.passes.InPlacePass):
    """Quantize the weights a plan lists; leave every other node as it is."""

    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def requires(self, model: ir.Model) -> None:
        names = {n.name for n in model.graph}
        missing = [d.node for d in self.plan.weights if d.node not in names]
        if missing:
            raise ir.passes.PreconditionError(f"plan names nodes the model lacks: {missing[:3]}")

    def ensures(self, model: ir.Model) -> None:
        for init in model.graph.initializers.values():
            if not init.uses() and not init.is_graph_output():
                raise ir.passes.PostconditionError(f"initializer {init.name} left without a reader")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = {n.name: n for n in graph}
        needs_ms = needs_23 = False
        for d in self.plan.weights:
            node = by_name[d.node]
            value = node.inputs[d.input_index]
            q = quantize_weight(value.const_value.numpy().astype(np.float32), d)
            prefix = f"{d.node}/{d.weight}"
            data = ir.Value(name=f"{prefix}_quantized", const_value=ir.tensor(_storage(q), name=f"{prefix}_quantized"))
            scale = ir.Value(name=f"{prefix}_scale", const_value=ir.tensor(q.scale.astype(np.float32), name=f"{prefix}_scale"))
            graph.register_initializer(data)
            graph.register_initializer(scale)
            if d.form == "gather_block_quantized":
                gbq = ir.node(
                    "GatherBlockQuantized", [data, node.inputs[1], scale], domain="com.microsoft",
                    attributes={"gather_axis": 0, "quantize_axis": d.axis, "block_size": d.block},
                    name=f"{d.node}/gather_block_quantized",
                )
                graph.insert_before(node, gbq)
                out = node.outputs[0]
                new_out = gbq.outputs[0]
                new_out.dtype = ir.DataType.FLOAT  # the output type is the scale's
                new_out.shape = out.shape
                out.replace_all_uses_with(new_out)
                if out.is_graph_output():
                    idx = [o for o in graph.outputs].index(out)
                    graph.outputs[idx] = new_out
                new_out.name = out.name
                graph.remove(node, safe=True)
                needs_ms = True
            else:
                attrs = {"axis": d.axis}
                if d.block:
                    attrs["block_size"] = d.block
                dq = ir.node("DequantizeLinear", [data, scale], attributes=attrs, name=f"{prefix}_dequantize")
                dq.outputs[0].name = f"{prefix}_dequantized"
                dq.outputs[0].dtype = ir.DataType.FLOAT
                dq.outputs[0].shape = ir.Shape(list(q.data.shape))
                graph.insert_before(node, dq)
                node.replace_input_with(d.input_index, dq.outputs[0])
                if d.transpose:
                    node.attributes["transB"] = ir.AttrInt64("transB", 0)
            needs_23 |= d.format == WeightFormat.MXFP4 and d.form == "dq"
            if not value.uses() and value.name in graph.initializers and not value.is_graph_output():
                graph.initializers.pop(value.name)
        if needs_ms:
            graph.opset_imports.setdefault("com.microsoft", 1)
            model.opset_imports.setdefault("com.microsoft", 1)
        if needs_23 and model.opset_imports.get("", 0) < MXFP4_DQ_OPSET:
            # opsets 22-23 only widened type lists of the ops edgeq emits; no semantics changed
            model.opset_imports[""] = MXFP4_DQ_OPSET
            graph.opset_imports[""] = MXFP4_DQ_OPSET
        return ir.passes.PassResult(model, modified=bool(self.plan.weights))
