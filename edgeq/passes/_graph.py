"""Graph plumbing shared by the passes that insert nodes next to an activation."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every graph input and node output, by name."""
    values = {v.name: v for v in graph.inputs}
    values.update({o.name: o for n in graph for o in n.outputs})
    return values


def insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert ``nodes`` right after ``value``'s producer (first in the graph for a graph input)."""
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), nodes)
    else:
        graph.insert_after(producer, nodes)


def constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``name`` and return its value."""
    v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(v)
    return v
