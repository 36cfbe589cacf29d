"""W8A8 matmuls in the reference executor run in integers (targets/coreml/executor/integer.py): the
numpy executor and its ONNX Runtime translation agree bit for bit on them, the result is the exact
integer formula, and it stays within about an fp16 step of the operands-in-fp16 reading."""

import numpy as np
import onnx
from coreml_models import package_and_load
from onnx import TensorProto, helper, numpy_helper

from edgeq import api
from edgeq.validate.metrics import sqnr_db
from targets.coreml.executor.integer import IntegerMatmul, integer_matmul, weight_codes
from targets.coreml.executor.to_onnx import OrtProgram, translate


def _mlp(path, seed=0):
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((64, 96)).astype(np.float32) * 0.2, rng.standard_normal(96).astype(np.float32)
    w2 = rng.standard_normal((96, 40)).astype(np.float32) * 0.1
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 7, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 7, 40])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                               numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    return str(path)


def _feeds(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 7, 64)).astype(np.float32)} for _ in range(n)]


def _package(tmp_path):
    qdq = tmp_path / "mlp.w8a8.onnx"
    api.quantize(_mlp(tmp_path / "mlp.onnx"), qdq, "w8a8", profile="ios18", calib=_feeds(8, 1))
    ex, _, _, _ = package_and_load(onnx.load(str(qdq)), tmp_path, compute="fp16")
    return ex


def test_w8a8_matmuls_run_in_integers_alike_in_both_engines(tmp_path):
    ex = _package(tmp_path)
    steps = [s for s in ex._steps if s.op.op_type == "matmul"]
    # the second layer reads quantized activations; the first reads the float input (not quantized)
    assert [isinstance(s.fn, IntegerMatmul) for s in steps] == [False, True]
    assert sum(n.op_type == "MatMulInteger" for n in translate(ex).graph.node) == 1
    outs = [s.outs[0][0] for s in steps]
    fast = OrtProgram(ex)
    for feed in _feeds(3, seed=5):
        want, got = ex.run(feed, keep=set(outs)), fast.run(feed, keep=set(outs))
        for n in [*outs, *ex.output_names]:
            np.testing.assert_array_equal(want[n], got[n], err_msg=n)


def test_the_integer_product_is_exact_and_near_the_fp16_operand_reading(tmp_path):
    ex = _package(tmp_path)
    step = next(s for s in ex._steps if isinstance(s.fn, IntegerMatmul))
    im = step.fn
    x_name = dict(step.vars)["x"]
    feed = _feeds(1, seed=9)[0]
    x = ex.run(feed, keep={x_name})[x_name].astype(np.float32)  # the dequantized input (fp16 values)
    codes = np.rint(x / im.x_scale)
    assert np.abs(x - codes * im.x_scale).max() <= im.x_scale / 16  # the code is recoverable from its fp16 value
    exact = (codes.astype(np.int64) @ im.weight.astype(np.int64)).astype(np.float32) * im.scale
    np.testing.assert_array_equal(im(x), exact)
    # the plain reading: the fp16-rounded operands multiplied in float32 (what the executor did before)
    w = (im.weight.astype(np.float32) * (im.scale / im.x_scale)).astype(np.float16).astype(np.float32)
    assert sqnr_db(x @ w, exact) >= 60


def test_only_symmetric_per_channel_int8_weights_qualify():
    rng = np.random.default_rng(0)
    data = rng.integers(-127, 128, (8, 5)).astype(np.int8)
    per_col = weight_codes("constexpr_blockwise_shift_scale", {"data": data, "scale": np.full((1, 5), 0.1, np.float32),
                                                              "offset": np.zeros((1, 5), np.int8)})
    assert per_col is not None and per_col.axis == 1 and per_col.scale.shape == (5,)
    assert integer_matmul(per_col, False, 0.5, 0, np.int8) is not None
    # scales along the reduction axis (rows of a [K, N] weight) cannot leave the sum: float path
    per_row = weight_codes("constexpr_blockwise_shift_scale",
                           {"data": data, "scale": rng.random((8, 1)).astype(np.float32)})
    assert integer_matmul(per_row, False, 0.5, 0, np.int8) is None
    assert integer_matmul(per_row, True, 0.5, 0, np.int8) is not None  # transposed: rows are the channels
    blocks = {"data": data, "scale": rng.random((8, 5)).astype(np.float32)}
    assert weight_codes("constexpr_blockwise_shift_scale", blocks) is None
    offset = {"data": data, "scale": np.ones((1, 5), np.float32), "offset": np.ones((1, 5), np.int8)}
    assert weight_codes("constexpr_blockwise_shift_scale", offset) is None
    assert weight_codes("constexpr_blockwise_shift_scale", {"data": data.astype(np.uint8),
                                                            "scale": np.ones((1, 5), np.float32)}) is None


def test_table_rows_gathered_from_codes_equal_the_expanded_table(tmp_path):
    """An int8 embedding table is not expanded at load: its rows are gathered as codes and scaled,
    the same numbers as rows of the expanded table, in both engines."""
    from targets.coreml.executor.fp16 import round_fp16
    from targets.coreml.executor.integer import IntegerGather

    rng = np.random.default_rng(3)
    table, w = rng.standard_normal((50, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    src = tmp_path / "emb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(src))
    feeds = [{"ids": rng.integers(0, 50, (2, 9)).astype(np.int64)} for _ in range(4)]
    qdq = tmp_path / "emb.w8a8.onnx"
    api.quantize(str(src), qdq, "w8a8", profile="ios18", calib=feeds)
    ex, _, _, _ = package_and_load(onnx.load(str(qdq)), tmp_path, compute="fp16")
    step = next(s for s in ex._steps if s.op.op_type == "gather")
    assert isinstance(step.fn, IntegerGather)
    table_name, out = step.op.inputs["x"], step.outs[0][0]
    assert table_name in ex._deferred  # not expanded at load
    feed = {"ids": feeds[0]["ids"].astype(np.int32)}
    got = ex.run(feed, keep={out})[out]
    expanded = ex._constant(table_name)  # the table as the program makes it (fp16 values)
    np.testing.assert_array_equal(got, round_fp16(np.take(expanded, feed["ids"], axis=0)).astype(np.float16))
    np.testing.assert_array_equal(got, OrtProgram(ex).run(feed, keep={out})[out])
