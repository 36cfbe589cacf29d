"""The activation half of the QDQ pass (W8A8): Q/DQ pairs on calibrated tensors, int32 biases.

Rules it applies, per :class:`~edgeq.quant.activations.ActivationDecision`:

- ``QuantizeLinear(x, scale, zero_point) → DequantizeLinear`` per tensor, uint8 asymmetric or
  int8 symmetric; only the consumers listed in the decision read the dequantized value (graph
  outputs and other readers keep the float tensor), so model inputs and outputs stay float.
- A Conv or Gemm whose input is quantized and whose weight is int8 gets its float bias stored as
  ``int32`` at scale ``s_in · s_w`` per output channel behind a DequantizeLinear, the form ONNX
  Runtime folds into QLinearConv / QGemm. Where a bias would not fit (a near-dead channel: tiny
  weights, real bias) that channel's weight scale is raised until it fits (recorded).

Run it after :class:`~edgeq.passes.weight_qdq.WeightQDQPass`: bias scales read the weight scales
that pass stored.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq.passes._graph import insert_after_producer, values_by_name
from edgeq.quant.activations import ActivationDecision
from edgeq.quant.recipes import ActFormat

_INT32_MAX = 2**31 - 1
_BIAS_LIMIT = 2**30  # int32 biases stay below this: headroom for the accumulation on top


def _weight_scale(node: ir.Node) -> np.ndarray | None:
    """The scale of the int8 weight DequantizeLinear feeding ``node`` (input 1), if any."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    dq = w.producer() if w is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
        return None
    if dq.inputs[0].const_value.dtype != ir.DataType.INT8 or "block_size" in dq.attributes:
        return None
    return dq.inputs[1].const_value.numpy().astype(np.float32)


class ActivationQDQPass(ir.passes.InPlacePass):
    """Insert the planned activation Q/DQ pairs and quantize the biases they make integer."""

    def __init__(self, decisions: tuple[ActivationDecision, ...], *, bias: bool = True):
        super().__init__()
        self.decisions = decisions
        self.bias = bias
        self.float_biases: list[str] = []  # nodes whose bias would overflow int32
        self.raised_scales: list[tuple[str, int]] = []  # (node, channels) whose weight scale was raised for the bias

    def requires(self, model: ir.Model) -> None:
        names = {o.name for n in model.graph for o in n.outputs} | {v.name for v in model.graph.inputs}
        missing = [d.tensor for d in self.decisions if d.tensor not in names]
        if missing:
            raise ir.passes.PreconditionError(f"decisions name tensors the model lacks: {missing[:3]}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = values_by_name(graph)
        nodes = {n.name: n for n in graph}
        quantized_input: dict[str, float] = {}  # consumer node -> input scale, for biases
        for d in self.decisions:
            x = values[d.tensor]
            qtype = np.uint8 if d.format == ActFormat.UINT8 else np.int8
            scale = ir.Value(name=f"{d.tensor}_act_scale", const_value=ir.tensor(np.array(d.scale, np.float32),
                                                                                 name=f"{d.tensor}_act_scale"))
            zp = ir.Value(name=f"{d.tensor}_act_zero_point", const_value=ir.tensor(np.array(d.zero_point, qtype),
                                                                                   name=f"{d.tensor}_act_zero_point"))
            graph.register_initializer(scale)
            graph.register_initializer(zp)
            q = ir.node("QuantizeLinear", [x, scale, zp], name=f"{d.tensor}_quantize")
            q.outputs[0].name = f"{d.tensor}_quantized"
            q.outputs[0].dtype = ir.DataType.UINT8 if qtype is np.uint8 else ir.DataType.INT8
            q.outputs[0].shape = x.shape
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=f"{d.tensor}_dequantize")
            dq.outputs[0].name = f"{d.tensor}_dequantized"
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = x.shape
            insert_after_producer(graph, x, [q, dq])
            for cname in d.consumers:
                consumer = nodes[cname]
                for i, inp in enumerate(consumer.inputs):
                    if inp is x:
                        consumer.replace_input_with(i, dq.outputs[0])
                        if i == 0:
                            quantized_input[cname] = d.scale
        if self.bias:
            for cname, s_in in quantized_input.items():
                node = nodes[cname]
                if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2:
                    self._quantize_bias(graph, node, s_in)
        return ir.passes.PassResult(model, modified=bool(self.decisions))

    def _raise_weight_scale(self, node: ir.Node, need: np.ndarray) -> np.ndarray | None:
        """Raise the int8 weight scale of ``node`` to at least ``need`` per channel; requantize the codes."""
        dq = node.inputs[1].producer()
        codes = dq.inputs[0].const_value.numpy().astype(np.float64)
        old = dq.inputs[1].const_value.numpy().astype(np.float64)
        axis = dq.attributes.get_int("axis", 1)
        if old.size == 1:
            new = np.array(max(float(old.reshape(())), float(need.max())), np.float32)
            shape = ()
        else:
            if old.shape != need.shape:
                return None
            new = np.maximum(old, need).astype(np.float32)
            shape = [1] * codes.ndim
            shape[axis] = -1
        raised = np.nonzero(new.reshape(-1) > old.reshape(-1))[0]
        requantized = np.clip(np.rint(codes * old.reshape(shape) / new.astype(np.float64).reshape(shape)), -127, 127)
        dq.inputs[0].const_value = ir.tensor(requantized.astype(np.int8), name=dq.inputs[0].name)
        dq.inputs[1].const_value = ir.tensor(new, name=dq.inputs[1].name)
        self.raised_scales.append((node.name, int(raised.size)))
        return new

    def _quantize_bias(self, graph: ir.Graph, node: ir.Node, s_in: float) -> None:
        b = node.inputs[2]
        s_w = _weight_scale(node)
        if b is None or b.const_value is None or s_w is None:
            return
        bias = b.const_value.numpy().astype(np.float32)
        need = np.abs(bias.astype(np.float64)) / (float(np.float32(s_in)) * _BIAS_LIMIT)
        if np.any(need > s_w):
            # A near-dead channel (tiny weights) with a real bias: at s_in*s_w its bias would not
            # fit int32, and ONNX Runtime would clip it when it folds the bias itself. Coarsen that
            # channel's weight scale until the bias fits; its small weights lose a little precision.
            s_w = self._raise_weight_scale(node, need)
            if s_w is None:
                self.float_biases.append(node.name)
                return
        scale = (np.float32(s_in) * s_w).astype(np.float32)
        if scale.size == 1:
            scale = np.full(bias.shape, scale.reshape(()), np.float32)
        q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
        if np.abs(q).max(initial=0) > _INT32_MAX:
            self.float_biases.append(node.name)
            return
        prefix = b.name if b.name.startswith(f"{node.name}/") else f"{node.name}/{b.name}"
        data = ir.Value(name=f"{prefix}_quantized", const_value=ir.tensor(q.astype(np.int32), name=f"{prefix}_quantized"))
        sc = ir.Value(name=f"{prefix}_scale", const_value=ir.tensor(scale, name=f"{prefix}_scale"))
        graph.register_initializer(data)
        graph.register_initializer(sc)
        dq = ir.node("DequantizeLinear", [data, sc], attributes={"axis": 0}, name=f"{prefix}_dequantize")
        dq.outputs[0].name = f"{prefix}_dequantized"
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape(list(bias.shape))
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
        if not b.uses() and b.name in graph.initializers and not b.is_graph_output():
            graph.initializers.pop(b.name)
