"""The activation half of the QDQ pass (W8A8): Q/DQ pairs on calibrated tensors, int32 biases.

Rules it applies, from the plan:

- per :class:`~edgeq.quant.plan.ActivationDecision`, ``QuantizeLinear(x, scale, zero_point) →
  DequantizeLinear`` per tensor, uint8 asymmetric or int8 symmetric; only the consumers listed in
  the decision read the dequantized value (graph outputs and other readers keep the float
  tensor), so model inputs and outputs stay float; a consumer that is an If / Loop reads it
  wherever its subgraphs read ``x``. Marked ``edgeq.role`` activation_quantize /
  activation_dequantize with ``edgeq.source`` the float-model tensor.
- per :class:`~edgeq.quant.plan.IntegerBias`, the node's bias becomes ``DequantizeLinear(int32,
  s_in · s_w, axis 0)``, the form ONNX Runtime folds into QLinearConv / QGemm (the weight scales
  it was computed for, raised where a bias would not fit, are already in the plan's codes).

Run it after :class:`~edgeq.passes.weight_qdq.WeightQDQPass` (the bias it replaces is the one
that pass wrote, corrected or not).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq import meta
from edgeq.graph import drop_if_unused, insert_after_producer, nodes_by_name, subgraph_nodes, values_by_name
from edgeq.quant.plan import QuantPlan
from edgeq.quant.recipes import ActFormat


class ActivationQDQPass(ir.passes.InPlacePass):
    """Insert the planned activation Q/DQ pairs and the int32 biases."""

    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def requires(self, model: ir.Model) -> None:
        names = values_by_name(model.graph)
        missing = [d.tensor for d in self.plan.activations if d.tensor not in names]
        if missing:
            raise ir.passes.PreconditionError(f"decisions name tensors the model lacks: {missing[:3]}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = values_by_name(graph)
        nodes = nodes_by_name(graph)
        for d in self.plan.activations:
            x = values[d.tensor]
            qtype = np.uint8 if d.format == ActFormat.UINT8 else np.int8
            scale = ir.Value(name=f"{d.tensor}_act_scale", const_value=ir.tensor(np.array(d.scale, np.float32),
                                                                                 name=f"{d.tensor}_act_scale"))
            zp = ir.Value(name=f"{d.tensor}_act_zero_point", const_value=ir.tensor(np.array(d.zero_point, qtype),
                                                                                   name=f"{d.tensor}_act_zero_point"))
            graph.register_initializer(scale)
            graph.register_initializer(zp)
            q = ir.node("QuantizeLinear", [x, scale, zp], name=f"{d.tensor}_quantize")
            meta.mark(q, meta.Role.ACT_QUANTIZE, d.source or d.tensor)
            q.outputs[0].name = f"{d.tensor}_quantized"
            q.outputs[0].dtype = ir.DataType.UINT8 if qtype is np.uint8 else ir.DataType.INT8
            q.outputs[0].shape = x.shape
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=f"{d.tensor}_dequantize")
            meta.mark(dq, meta.Role.ACT_DEQUANTIZE, d.source or d.tensor)
            dq.outputs[0].name = f"{d.tensor}_dequantized"
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = x.shape
            insert_after_producer(graph, x, [q, dq])
            for cname in d.consumers:
                consumer = nodes[cname]
                for node in (consumer, *subgraph_nodes(consumer)):  # an If / Loop reads x in its subgraphs
                    for i, inp in enumerate(node.inputs):
                        if inp is x:
                            node.replace_input_with(i, dq.outputs[0])
        for ib in self.plan.integer_biases:
            node = nodes[ib.node]
            b = node.inputs[2]
            prefix = b.name if b.name.startswith(f"{node.name}/") else f"{node.name}/{b.name}"
            data = ir.Value(name=f"{prefix}_quantized", const_value=ir.tensor(ib.data, name=f"{prefix}_quantized"))
            sc = ir.Value(name=f"{prefix}_scale", const_value=ir.tensor(ib.scale, name=f"{prefix}_scale"))
            graph.register_initializer(data)
            graph.register_initializer(sc)
            dq = ir.node("DequantizeLinear", [data, sc], attributes={"axis": 0}, name=f"{prefix}_dequantize")
            meta.mark(dq, meta.Role.BIAS, node.name)
            dq.outputs[0].name = f"{prefix}_dequantized"
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape(list(ib.data.shape))
            graph.insert_before(node, dq)
            node.replace_input_with(2, dq.outputs[0])
            drop_if_unused(graph, b)
        return ir.passes.PassResult(model, modified=bool(self.plan.activations or self.plan.integer_biases))
