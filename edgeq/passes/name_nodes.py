"""Unique, non-empty node names: plans, reports and ``--explain`` refer to nodes by name."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir


@dataclasses.dataclass
class NameNodesResult(ir.passes.PassResult):
    named: int = 0  # nodes that had no name
    renamed: int = 0  # nodes whose name an earlier node already had
    names: tuple[str, ...] = ()  # the names given


class NameNodesPass(ir.passes.InPlacePass):
    """Give every unnamed or duplicate-named node a name no other node of the model has.

    Rules:

    - Main graph, in order: a node keeps a non-empty name that no earlier node took; otherwise it
      becomes ``{op_type}_{i}`` (``i``: its position in the main graph), with ``_1``, ``_2``, ...
      appended until unique. This is the naming ``edgeq.quant.quantize.name_nodes`` applies, so a
      graph whose nodes are already named keeps its names, and one named by either gets the same.
    - Then the nodes of subgraphs (``If`` branches, ``Loop``/``Scan`` bodies), graph by graph: the
      same rule with ``{owner node}.{attribute}.{op_type}_{j}`` as the base, ``j`` the position
      in that subgraph.
    """

    def call(self, model: ir.Model) -> NameNodesResult:
        taken: set[str] = set()
        counts = [0, 0]  # named, renamed
        given: list[str] = []
        pending: list[tuple[str, ir.Graph]] = [("", model.graph)]
        while pending:  # the main graph first, then subgraphs in the order their owners appear
            prefix, graph = pending.pop(0)
            for i, node in enumerate(graph):
                if not node.name or node.name in taken:
                    counts[bool(node.name)] += 1
                    base = f"{prefix}{node.op_type}_{i}"
                    name, k = base, 1
                    while name in taken:
                        name, k = f"{base}_{k}", k + 1
                    node.name = name
                    given.append(name)
                taken.add(node.name)
                for attr in node.attributes.values():
                    if attr.type == ir.AttributeType.GRAPH:
                        pending.append((f"{node.name}.{attr.name}.", attr.as_graph()))
                    elif attr.type == ir.AttributeType.GRAPHS:
                        pending.extend((f"{node.name}.{attr.name}{j}.", g) for j, g in enumerate(attr.as_graphs()))
        named, renamed = counts
        return NameNodesResult(model, modified=bool(given), named=named, renamed=renamed, names=tuple(given))

    def ensures(self, model: ir.Model) -> None:
        names = [n.name for n in ir.traversal.RecursiveGraphIterator(model.graph)]
        if not all(names) or len(set(names)) != len(names):
            raise ir.passes.PostconditionError("node names are not unique and non-empty")

