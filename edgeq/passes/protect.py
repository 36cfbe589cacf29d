"""Apply outlier protection decisions (see :mod:`edgeq.quant.protect`).

Rules, per :class:`~edgeq.quant.plan.Protection` of tensor ``x`` (channels ``P`` on the last
axis): one ``Mul(x, m)`` (``m`` zero on ``P``; its output named
:func:`~edgeq.quant.protect.masked_name`) and one ``Gather(x, P, axis=-1)``; per consumer
``y = x · W``: the consumer reads the masked tensor, its weight rows ``P`` become zero (they no
longer stretch the weight grid), and ``y + Gather(x, P) · W[P, :]`` replaces ``y`` for every
reader (the tensor name ``y`` moves to the sum). The product is unchanged in exact arithmetic.
Every inserted node is marked with its ``edgeq.role`` (protection, protection_gather,
protection_matmul, protection_add) and ``edgeq.source`` = ``x``; the added MatMul is not in the
plan, so it stays float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq import meta
from edgeq.graph import constant, insert_after_producer, nodes_by_name, values_by_name
from edgeq.quant.plan import Protection
from edgeq.quant.protect import masked_name


class ProtectOutliersPass(ir.passes.InPlacePass):
    def __init__(self, protections: tuple[Protection, ...] | list[Protection]):
        super().__init__()
        self.protections = tuple(protections)

    def requires(self, model: ir.Model) -> None:
        nodes = nodes_by_name(model.graph)
        values = values_by_name(model.graph)
        for p in self.protections:
            if p.tensor not in values:
                raise ir.passes.PreconditionError(f"protection names tensor {p.tensor!r}, which the model lacks")
            for c in p.consumers:
                node = nodes.get(c)
                if node is None or node.op_type != "MatMul" or node.inputs[1] is None \
                        or node.inputs[1].const_value is None or node.inputs[0] is not values[p.tensor]:
                    raise ir.passes.PreconditionError(f"{c}: not a MatMul of {p.tensor!r} with a constant weight")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = nodes_by_name(graph)
        values = values_by_name(graph)
        for p in self.protections:
            x = values[p.tensor]
            dtype = x.dtype or ir.DataType.FLOAT  # untyped (no shape inference): the weights' float
            mask = np.ones(nodes[p.consumers[0]].inputs[1].const_value.shape[0], np.float32)  # K: x's last axis
            mask[p.channels] = 0.0
            m = constant(graph, f"{p.tensor}_protect_mask", mask)
            idx = constant(graph, f"{p.tensor}_protect_channels", p.channels.astype(np.int64))
            mul = ir.node("Mul", [x, m], name=f"{p.tensor}_protect")
            meta.mark(mul, meta.Role.PROTECT_MASK, p.tensor)
            self._describe(mul.outputs[0], masked_name(p.tensor), dtype, x.shape)
            gather = ir.node("Gather", [x, idx], attributes={"axis": -1}, name=f"{p.tensor}_protect_gather")
            meta.mark(gather, meta.Role.PROTECT_GATHER, p.tensor)
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
                meta.mark(mm, meta.Role.PROTECT_MATMUL, p.tensor)
                y = node.outputs[0]
                self._describe(mm.outputs[0], f"{c}/protected_part", dtype, None)
                add = ir.node("Add", [y, mm.outputs[0]], name=f"{c}/protect_add")
                meta.mark(add, meta.Role.PROTECT_ADD, p.tensor)
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
