"""Apply input scalings (SmoothQuant, outlier smoothing, AWQ): ``Mul(x, 1/s)`` before the listed MatMuls, rows of W times ``s``.

Rules, per :class:`~edgeq.quant.plan.Scaling`: one Mul per scaled tensor, read only by the listed
consumers (other readers, such as a residual branch, keep ``x``), its output named
:func:`~edgeq.quant.smooth.scaled_name`; each consumer's weight ``W [K, N]`` becomes ``diag(s) W``.
The product is unchanged in exact arithmetic. The Mul is marked ``edgeq.role = scaling`` with
``edgeq.source`` the tensor it scales (activation placement quantizes its output as is; analyze
finds the scale there). The pass requires every weight to belong to its consumer alone (a shared
weight would be scaled twice).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq import meta
from edgeq.graph import constant, insert_after_producer, nodes_by_name, values_by_name
from edgeq.quant.plan import Scaling
from edgeq.quant.smooth import scaled_name


class ScaleInputsPass(ir.passes.InPlacePass):
    def __init__(self, scalings: tuple[Scaling, ...] | list[Scaling]):
        super().__init__()
        self.scalings = tuple(scalings)

    def requires(self, model: ir.Model) -> None:
        nodes = nodes_by_name(model.graph)
        values = values_by_name(model.graph)
        for sc in self.scalings:
            if sc.tensor not in values:
                raise ir.passes.PreconditionError(f"scaling names tensor {sc.tensor!r}, which the model lacks")
            for c in sc.consumers:
                w = nodes[c].inputs[1] if c in nodes and len(nodes[c].inputs) > 1 else None
                if w is None or w.const_value is None or len(w.uses()) != 1:
                    raise ir.passes.PreconditionError(f"{c}: weight is not a constant of its own")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = nodes_by_name(graph)
        values = values_by_name(graph)
        for sc in self.scalings:
            x = values[sc.tensor]
            inv = constant(graph, f"{sc.tensor}_smooth_inv_scale", (1.0 / sc.scale).astype(np.float32))
            mul = ir.node("Mul", [x, inv], name=f"{sc.tensor}_smooth")
            meta.mark(mul, meta.Role.SCALING, sc.tensor)
            mul.outputs[0].name = scaled_name(sc.tensor)
            mul.outputs[0].dtype = x.dtype or ir.DataType.FLOAT  # untyped (no shape inference): the weights' float
            mul.outputs[0].shape = x.shape
            insert_after_producer(graph, x, [mul])
            for c in sc.consumers:
                node = nodes[c]
                node.replace_input_with(0, mul.outputs[0])
                w = node.inputs[1]
                scaled = (w.const_value.numpy().astype(np.float32) * sc.scale[:, None]).astype(np.float32)
                w.const_value = ir.tensor(scaled, name=w.name)
        return ir.passes.PassResult(model, modified=bool(self.scalings))
