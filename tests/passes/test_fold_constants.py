"""FoldConstantsPass: Constant-node weights and weights computed from constants become initializers."""

import numpy as np
import onnx
import onnx_ir as ir
from import_models import assert_same_outputs, copy, floats, ops
from onnx import helper as oh
from onnx import numpy_helper as nh

from edgeq.passes.fold_constants import FoldConstantsPass


def test_constant_node_weights_become_initializers():
    # paddle2onnx's form: every weight in a Constant node (opset 11-12)
    rng = np.random.default_rng(0)
    model = ir.from_onnx_text(f"""
    <ir_version: 7, opset_import: ["" : 12]>
    g (float[N, 3, 8, 8] x) => (float[N, 5] y)
    {{
        w = Constant <value = float[4, 3, 3, 3] {{{floats(rng, 108)}}}> ()
        b = Constant <value = float[4] {{{floats(rng, 4)}}}> ()
        fc = Constant <value = float[4, 5] {{{floats(rng, 20)}}}> ()
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        p = GlobalAveragePool (c)
        f = Flatten (p)
        y = MatMul (f, fc)
    }}
    """)
    before = copy(model)
    result = FoldConstantsPass()(model)
    assert (result.lifted, result.folded) == (3, 0) and result.modified
    assert "Constant" not in ops(model)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert all(v.is_initializer() for v in (*conv.inputs[1:], matmul.inputs[1]))
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert_same_outputs(before, model, {"x": x}, min_sqnr_db=float("inf"))


def test_recurrent_weights_computed_from_initializers_are_folded_at_full_size():
    # GRU W/R built at run time: Slice + Concat + Unsqueeze of initializers of 12800 and 12288
    # elements (beyond onnxscript's default input limit of 8192); LSTM R through a Transpose
    rng = np.random.default_rng(1)
    hidden, features = 64, 64
    inits = [nh.from_array(rng.standard_normal(s).astype(np.float32) * 0.1, n) for n, s in [
        ("w_src", (3 * hidden + 8, features)), ("r_src", (3 * hidden, hidden)),
        ("lw", (1, 4 * hidden, hidden)), ("lr_t", (1, hidden, 4 * hidden))]]
    inits += [nh.from_array(np.array(v, np.int64), n) for n, v in [
        ("s0", [0]), ("s1", [2 * hidden]), ("s2", [3 * hidden]), ("ax0", [0])]]
    nodes = [
        oh.make_node("Slice", ["w_src", "s0", "s1"], ["w_zr"]),
        oh.make_node("Slice", ["w_src", "s1", "s2"], ["w_h"]),
        oh.make_node("Concat", ["w_zr", "w_h"], ["w_2d"], axis=0),
        oh.make_node("Unsqueeze", ["w_2d", "ax0"], ["w"]),
        oh.make_node("Unsqueeze", ["r_src", "ax0"], ["r"]),
        oh.make_node("GRU", ["x", "w", "r"], ["h_seq"], hidden_size=hidden),
        oh.make_node("Squeeze", ["h_seq", "ax1"], ["h"]),
        oh.make_node("Transpose", ["lr_t"], ["lr"], perm=[0, 2, 1]),
        oh.make_node("LSTM", ["h", "lw", "lr"], ["y"], hidden_size=hidden),
    ]
    inits.append(nh.from_array(np.array([1], np.int64), "ax1"))
    graph = oh.make_graph(nodes, "rnn", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", 1, features])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10))
    before = copy(model)
    result = FoldConstantsPass()(model)
    assert result.folded == 6  # 2 Slice, Concat, 2 Unsqueeze, Transpose
    for op in ("GRU", "LSTM"):
        node = next(n for n in model.graph if n.op_type == op)
        assert node.inputs[1].is_initializer() and node.inputs[2].is_initializer()
    assert sorted(ops(model)) == ["GRU", "LSTM", "Squeeze"]
    x = rng.standard_normal((5, 1, features)).astype(np.float32)
    assert_same_outputs(before, model, {"x": x}, min_sqnr_db=float("inf"))


def test_a_fold_that_would_grow_the_model_is_not_done():
    model = ir.from_onnx_text("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[1024, 1024] x) => (float[1024, 1024] y) <float[1, 4] v = {1, 2, 3, 4}, int64[2] shape = {1024, 1024}>
    {
        t = Tile (v, shape)
        e = Expand (v, shape)
        s = Add (t, e)
        y = Add (x, s)
    }
    """)
    result = FoldConstantsPass()(model)
    assert not result.folded  # 4M-element results from 4 elements: stored, they would grow the file 2**18 times
    assert ops(model) == ["Tile", "Expand", "Add", "Add"]


def test_initializers_listed_as_inputs_count_as_constants():
    # IR version 3 files list every initializer among the graph inputs
    w = nh.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    graph = oh.make_graph(
        [oh.make_node("Transpose", ["w"], ["wt"]), oh.make_node("MatMul", ["x", "wt"], ["y"])], "old",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3]),
         oh.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 3])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])], [w])
    model = ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 9)], ir_version=3))
    result = FoldConstantsPass()(model)
    assert (result.unlisted_inputs, result.folded) == (1, 1)
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert model.graph.node(0).inputs[1].is_initializer()


def test_an_if_with_a_constant_condition_becomes_its_branch():
    model = ir.from_onnx_text("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 4] x) => (float[N, 4] y) <bool c = {1}>
    {
        y = If (c) <then_branch = thenb () => (float[N, 4] t) { t = Relu (x) },
                    else_branch = elseb () => (float[N, 4] e) { e = Neg (x) }>
    }
    """)
    before = copy(model)
    FoldConstantsPass()(model)
    assert ops(model) == ["Relu"]
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    assert_same_outputs(before, model, {"x": x}, min_sqnr_db=float("inf"))


def test_the_branch_an_if_folds_away_reads_nothing_afterwards():
    # silero-vad op15: the LSTM weights' Slices of the dropped branch kept the original weights alive
    # (as readers onnx-ir still listed), so quantization later found initializers nothing read
    rng = np.random.default_rng(3)
    model = ir.from_onnx_text(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 4] x) => (float[N, 4] y) <bool c = {{1}}, float[4, 4] w1 = {{{floats(rng, 16)}}},
                                          float[4, 4] w2 = {{{floats(rng, 16)}}}>
    {{
        y = If (c) <then_branch = thenb () => (float[N, 4] t) {{ t = MatMul (x, w1) }},
                    else_branch = elseb () => (float[N, 4] e) {{ e = MatMul (x, w2) }}>
    }}
    """)
    before = copy(model)
    FoldConstantsPass()(model)
    assert ops(model) == ["MatMul"] and list(model.graph.initializers) == ["w1"]
    matmul = model.graph.node(0)
    assert [u.node for u in model.graph.inputs[0].uses()] == [matmul]
    assert [u.node for u in model.graph.initializers["w1"].uses()] == [matmul]
    x = rng.standard_normal((3, 4)).astype(np.float32)
    assert_same_outputs(before, model, {"x": x}, min_sqnr_db=float("inf"))


def test_a_clean_model_is_not_modified():
    model = ir.from_onnx_text("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 2] x) => (float[N, 2] y) <float[2, 2] w = {1, 2, 3, 4}>
    {
        y = MatMul (x, w)
    }
    """)
    proto = ir.to_proto(model).SerializeToString()
    assert not FoldConstantsPass()(model).modified
    assert ir.to_proto(model).SerializeToString() == proto


def test_a_table_read_by_a_gather_is_not_copied_by_folding_its_transpose():
    # a tied LM head: Gather reads the table for the embedding, MatMul reads it through a Transpose;
    # folding the Transpose would store the table twice
    rng = np.random.default_rng(2)
    table = nh.from_array(rng.standard_normal((64, 32)).astype(np.float32), "table")
    nodes = [oh.make_node("Gather", ["table", "ids"], ["emb"]),
             oh.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
             oh.make_node("MatMul", ["emb", "table_t"], ["logits"])]
    graph = oh.make_graph(nodes, "tied", [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, "S"])],
                          [oh.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)], [table])
    model = ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10))
    result = FoldConstantsPass()(model)
    assert result.folded == 0 and result.initializers == 1 and "Transpose" in ops(model)
