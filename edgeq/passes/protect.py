"""Apply outlier protection decisions (see :mod:`edgeq.quant.protect`).

Per protected tensor ``x`` (channels ``P`` on the last axis): one ``Mul(x, m)`` (``m`` zero on
``P``, marked so activation placement quantizes its output as is) and one ``Gather(x, P, axis=-1)``;
per consumer ``y = x · W``: the consumer reads the masked tensor, its weight rows ``P`` become
zero (they no longer stretch the weight grid), and ``y + Gather(x, P) · W[P, :]`` replaces ``y``
for every reader. The product is unchanged in exact arithmetic. The added MatMul is not in the
plan, so it stays float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq.passes._graph import constant, insert_after_producer, values_by_name
from edgeq.quant.protect import Protection, masked_name
from edgeq.quant.smooth import ROLE_KEY


class ProtectOutliersPass(ir.passes.InPlacePass):
    def __init__(self, protections: list[Protection]):
        super().__init__()
        self.protections = protections

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph}
        values = values_by_name(graph)
        for p in self.protections:
            x = values[p.tensor]
            dtype = x.dtype or ir.DataType.FLOAT  # untyped (no shape inference): the weights' float
            mask = np.ones(nodes[p.consumers[0]].inputs[1].const_value.shape[0], np.float32)  # K: x's last axis
            mask[p.channels] = 0.0
            m = constant(graph, f"{p.tensor}_protect_mask", mask)
            idx = constant(graph, f"{p.tensor}_protect_channels", p.channels.astype(np.int64))
            mul = ir.node("Mul", [x, m], name=f"{p.tensor}_protect")
            mul.metadata_props[ROLE_KEY] = "protection"
            self._describe(mul.outputs[0], masked_name(p.tensor), dtype, x.shape)
            gather = ir.node("Gather", [x, idx], attributes={"axis": -1}, name=f"{p.tensor}_protect_gather")
            self._describe(gather.outputs[0], f"{p.tensor}_protected_channels", dtype, None)
            insert_after_producer(graph, x, [mul, gather])
            for c in p.consumers:
                node = nodes[c]
                w = node.inputs[1]
                full = w.const_value.numpy().astype(np.float32)
                rows = constant(graph, f"{c}/protected_rows", full[p.channels].copy())
                kept = full.copy()
                kept[p.channels] = 0.0
                w.const_value = ir.tensor(kept, name=w.name)
                node.replace_input_with(0, mul.outputs[0])
                mm = ir.node("MatMul", [gather.outputs[0], rows], name=f"{c}/protect_matmul")
                y = node.outputs[0]
                self._describe(mm.outputs[0], f"{c}/protected_part", dtype, None)
                add = ir.node("Add", [y, mm.outputs[0]], name=f"{c}/protect_add")
                add.metadata_props[ROLE_KEY] = "protection"
                graph.insert_after(node, [mm, add])
                y.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
                add.replace_input_with(0, y)
                out_name = y.name
                y.name = f"{out_name}_unprotected"
                self._describe(add.outputs[0], out_name, dtype, y.shape)  # readers keep the tensor name
        return ir.passes.PassResult(model, modified=bool(self.protections))

    @staticmethod
    def _describe(v: ir.Value, name: str, dtype, shape) -> None:
        v.name = name
        v.dtype = dtype
        if shape is not None:
            v.shape = shape
