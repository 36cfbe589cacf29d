"""Apply SmoothQuant decisions: ``Mul(x, 1/s)`` before the listed MatMuls, rows of W times ``s``.

Rules: one Mul per smoothed tensor, read only by the listed consumers (other readers, such as a
residual branch, keep ``x``); each consumer's weight ``W [K, N]`` becomes ``diag(s) W``. The
product is unchanged in exact arithmetic; the pass requires every weight to belong to its
consumer alone (a shared weight would be scaled twice).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq.passes._graph import constant, insert_after_producer, values_by_name
from edgeq.quant.smooth import ROLE_KEY, Smoothing


class SmoothQuantPass(ir.passes.InPlacePass):
    def __init__(self, smoothings: list[Smoothing]):
        super().__init__()
        self.smoothings = smoothings

    def requires(self, model: ir.Model) -> None:
        nodes = {n.name: n for n in model.graph}
        for sm in self.smoothings:
            for c in sm.consumers:
                w = nodes[c].inputs[1]
                if w is None or w.const_value is None or len(w.uses()) != 1:
                    raise ir.passes.PreconditionError(f"{c}: weight is not a constant of its own")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph}
        values = values_by_name(graph)
        for sm in self.smoothings:
            x = values[sm.tensor]
            inv = constant(graph, f"{sm.tensor}_smooth_inv_scale", (1.0 / sm.scale).astype(np.float32))
            mul = ir.node("Mul", [x, inv], name=f"{sm.tensor}_smooth")
            mul.metadata_props[ROLE_KEY] = "smoothing"  # placement quantizes its output as is
            mul.outputs[0].name = f"{sm.tensor}_smoothed"
            mul.outputs[0].dtype = x.dtype or ir.DataType.FLOAT  # untyped (no shape inference): the weights' float
            mul.outputs[0].shape = x.shape
            insert_after_producer(graph, x, [mul])
            for c in sm.consumers:
                node = nodes[c]
                node.replace_input_with(0, mul.outputs[0])
                w = node.inputs[1]
                scaled = (w.const_value.numpy().astype(np.float32) * sm.scale[:, None]).astype(np.float32)
                w.const_value = ir.tensor(scaled, name=w.name)
        return ir.passes.PassResult(model, modified=bool(self.smoothings))
