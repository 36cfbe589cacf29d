"""The weight half of the QDQ pass: store each planned weight's integers behind a DequantizeLinear.

Rules it applies, per :class:`~edgeq.quant.plan.WeightDecision`, with the integers the plan holds
for the weight (``plan.codes``, by weight name: nearest rounding, GPTQ or Conv rounding, decided before any edit):

- int8: symmetric per-channel ``DequantizeLinear(int8, scale[C], zero_point 0, axis)`` (an explicit
  zero point: ORT fuses Gemm into QGemm only with one).
- int4: blocks ``DequantizeLinear(int4, scale, [zero_point], axis, block_size)`` (opset 21); for a
  MatMul the block axis is K, the form ONNX Runtime fuses into MatMulNBits. float16 scales use
  DequantizeLinear-23's ``output_dtype`` (opset raised to 23).
- mxfp4: ``DequantizeLinear(float4e2m1, scale, axis, block_size=32)`` (opset 23). Where the plan
  says so (``form = "gather_block_quantized"``), an embedding Gather becomes
  ``com.microsoft.GatherBlockQuantized`` instead, which ONNX Runtime runs.
- Gemm with ``transB=1`` and blocked weights: the weight is stored transposed and ``transB``
  cleared, so the blocks run along K as the fused kernels expect.
- A corrected bias in the plan (``plan.biases``) replaces the node's bias input.
- Every consumer gets its own initializers (ORT does not fuse DQ nodes that share them); the
  float weight is removed once nothing reads it. Each DequantizeLinear (or GatherBlockQuantized)
  is marked ``edgeq.role = weight`` (``gather_quantized``) with ``edgeq.source`` = its node.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from edgeq import meta
from edgeq.passes._graph import drop_if_unused, nodes_by_name
from edgeq.quant import formats
from edgeq.quant.plan import QuantPlan
from edgeq.quant.recipes import WeightFormat

MXFP4_DQ_OPSET = 23  # DequantizeLinear gained float4e2m1 and output_dtype in opset 23


def _as_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    return values.astype(ml_dtypes.int4) if dtype == "int4" else values


def _storage(q: formats.QuantizedTensor) -> np.ndarray:
    return _as_storage(q.data, q.dtype)


class WeightQDQPass(ir.passes.InPlacePass):
    """Store the weights a plan lists with the plan's integers; leave every other node as it is."""

    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def requires(self, model: ir.Model) -> None:
        nodes = nodes_by_name(model.graph)
        missing = [d.node for d in self.plan.weights if d.node not in nodes]
        if missing:
            raise ir.passes.PreconditionError(f"plan names nodes the model lacks: {missing[:3]}")
        uncoded = [d.weight for d in self.plan.weights if d.weight not in self.plan.codes]
        if uncoded:
            raise ir.passes.PreconditionError(f"plan has no integers for {uncoded[:3]} (decide before applying)")

    def ensures(self, model: ir.Model) -> None:
        for init in model.graph.initializers.values():
            if not init.uses() and not init.is_graph_output():
                raise ir.passes.PostconditionError(f"initializer {init.name} left without a reader")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = nodes_by_name(graph)
        needs_ms = needs_23 = False
        for d in self.plan.weights:
            node = by_name[d.node]
            value = node.inputs[d.input_index]
            q = self.plan.codes[d.weight]
            prefix = f"{d.node}/{d.weight}"
            if d.node in self.plan.biases:
                b = node.inputs[2]
                name = f"{node.name}/{b.name}_corrected"
                corrected = ir.Value(name=name, const_value=ir.tensor(self.plan.biases[d.node], name=name))
                graph.register_initializer(corrected)
                node.replace_input_with(2, corrected)
                drop_if_unused(graph, b)
            data = ir.Value(name=f"{prefix}_quantized", const_value=ir.tensor(_storage(q), name=f"{prefix}_quantized"))
            half = q.scale.dtype == np.float16
            scale = ir.Value(name=f"{prefix}_scale", const_value=ir.tensor(q.scale if half else q.scale.astype(np.float32),
                                                                         name=f"{prefix}_scale"))
            graph.register_initializer(data)
            graph.register_initializer(scale)
            if d.form == "gather_block_quantized":
                gbq = ir.node(
                    "GatherBlockQuantized", [data, node.inputs[1], scale], domain="com.microsoft",
                    attributes={"gather_axis": 0, "quantize_axis": d.axis, "block_size": d.block},
                    name=f"{d.node}/gather_block_quantized",
                )
                meta.mark(gbq, meta.Role.GATHER_QUANTIZED, d.node)
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
                if half:  # float16 scales, float32 output: DequantizeLinear-23's output_dtype
                    attrs["output_dtype"] = ir.DataType.FLOAT.value
                    needs_23 = True
                inputs = [data, scale]
                if q.zero_point is not None or q.dtype == "int8":
                    zp = q.zero_point if q.zero_point is not None else np.zeros(q.scale.shape, np.int8)
                    zp_value = ir.Value(name=f"{prefix}_zero_point",
                                        const_value=ir.tensor(_as_storage(zp, q.dtype), name=f"{prefix}_zero_point"))
                    graph.register_initializer(zp_value)
                    inputs.append(zp_value)
                dq = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{prefix}_dequantize")
                meta.mark(dq, meta.Role.WEIGHT, d.node)
                dq.outputs[0].name = f"{prefix}_dequantized"
                dq.outputs[0].dtype = ir.DataType.FLOAT
                dq.outputs[0].shape = ir.Shape(list(q.data.shape))
                graph.insert_before(node, dq)
                node.replace_input_with(d.input_index, dq.outputs[0])
                if d.transpose:
                    node.attributes["transB"] = ir.AttrInt64("transB", 0)
            needs_23 |= d.format == WeightFormat.MXFP4 and d.form == "dq"
            drop_if_unused(graph, value)
        if needs_ms:
            graph.opset_imports.setdefault("com.microsoft", 1)
            model.opset_imports.setdefault("com.microsoft", 1)
        if needs_23 and model.opset_imports.get("", 0) < MXFP4_DQ_OPSET:
            # opsets 22-23 only widened type lists of the ops edgeq emits; no semantics changed
            model.opset_imports[""] = MXFP4_DQ_OPSET
            graph.opset_imports[""] = MXFP4_DQ_OPSET
        return ir.passes.PassResult(model, modified=bool(self.plan.weights))
