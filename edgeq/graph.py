"""Graph plumbing shared by the decisions and the passes: lookups by name, subgraph nodes,
insertion after a producer, constants."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def nodes_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    """Every node of the graph, by name (edgeq names every node at import)."""
    return {n.name: n for n in graph}


def subgraph_nodes(node: ir.Node):
    """Every node inside ``node``'s subgraphs (an If's branches, a Loop's body), at any depth."""
    for attr in node.attributes.values():
        graphs = (attr.value if attr.type == ir.AttributeType.GRAPHS else
                  [attr.value] if attr.type == ir.AttributeType.GRAPH else [])
        for g in graphs:
            yield from ir.traversal.RecursiveGraphIterator(g)


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


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the initializer ``value`` once nothing reads it (and it is no graph output)."""
    if not value.uses() and value.name in graph.initializers and not value.is_graph_output():
        graph.initializers.pop(value.name)
