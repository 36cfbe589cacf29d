"""NameNodesPass: unique, non-empty node names, the same ones quantize's naming gives."""

import onnx_ir as ir

from edgeq.passes.name_nodes import NameNodesPass

TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (bool c, float[N, 4] x) => (float[N, 4] y)
{
    a = Relu (x)
    b = Neg (a)
    d = Abs (b)
    e = Relu (d)
    y = If (c) <then_branch = thenb () => (float[N, 4] t) { t = Relu (e) },
                else_branch = elseb () => (float[N, 4] f) { f = Neg (e) }>
}
"""


def test_unnamed_and_duplicate_names_get_op_type_and_position():
    model = ir.from_onnx_text(TEXT)
    nodes = list(model.graph)
    nodes[1].name = "Relu_0"  # taken later by the unnamed node 0's {op_type}_{index}: renamed
    nodes[2].name = "abs"
    nodes[3].name = "abs"  # a duplicate
    result = NameNodesPass()(model)
    assert [n.name for n in model.graph] == ["Relu_0", "Neg_1", "abs", "Relu_3", "If_4"]
    assert (result.named, result.renamed) == (4, 2)  # two main-graph nodes and one per branch unnamed


def test_subgraph_nodes_are_named_after_their_owner():
    model = ir.from_onnx_text(TEXT)
    NameNodesPass()(model)
    names = [n.name for n in ir.traversal.RecursiveGraphIterator(model.graph)]
    assert names[-2:] in (["If_4.then_branch.Relu_0", "If_4.else_branch.Neg_0"],
                          ["If_4.else_branch.Neg_0", "If_4.then_branch.Relu_0"])
    assert len(set(names)) == len(names)


def test_named_graph_is_unchanged():
    model = ir.from_onnx_text(TEXT)
    NameNodesPass()(model)
    result = NameNodesPass()(model)
    assert not result.modified and result.names == ()
