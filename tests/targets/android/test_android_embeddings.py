"""Embedding tables on Android: only the looked-up rows are dequantized, in the QDQ ONNX and in the
.ort, exactly what dequantizing the whole table computes (int8 rows gathered and scaled; int4 as
com.microsoft.GatherBlockQuantized on packed uint8, which the ORT format holds)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq import api
from edgeq.runtime import ort_session
from edgeq.validate.metrics import sqnr_db

V, D = 300, 64


def _embedder(path):
    rng = np.random.default_rng(7)
    table = rng.standard_normal((V, D)).astype(np.float32)
    w = (rng.standard_normal((D, 16)) / 8).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
         helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")], "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16]),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", "seq", D])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path, table


@pytest.mark.parametrize("recipe, op", [("w8a16", "Cast"), ("w4a16", "GatherBlockQuantized")])
def test_rows_are_dequantized_exactly_in_the_qdq_model_and_the_ort(tmp_path, recipe, op):
    src, table = _embedder(tmp_path / "emb.onnx")
    qdq = tmp_path / "q.onnx"
    res = api.quantize(src, qdq, recipe, profile="android", progress=False)
    embed = next(d for d in res.plan.weights if d.node == "embed")
    assert embed.format.value == ("int8" if recipe == "w8a16" else "int4")
    ops = [n.op_type for n in onnx.load(str(qdq)).graph.node]
    assert op in ops and "DequantizeLinear" not in ops[:ops.index(op) + 1]  # no whole-table dequantization
    codes = res.plan.codes["table"]
    ids = np.array([[0, 5, 299, 5, 17], [1, 2, 3, 4, 299]], np.int64)
    want = codes.dequantize()[ids]  # the dequantized table, then the lookup
    if codes.scale.dtype == np.float16:
        want = want.astype(np.float16).astype(np.float32)  # the fused Gather returns the scale's type
    got_qdq = ort_session(qdq, optimize=False).run(["e"], {"ids": ids})[0]
    np.testing.assert_array_equal(got_qdq, want)
    pkg = api.package(qdq, "android", tmp_path / "android")
    got_ort = ort_session(pkg.model_file).run(["e"], {"ids": ids})[0]
    np.testing.assert_array_equal(got_ort, want)
    assert sqnr_db(table[ids], got_ort) > (35 if recipe == "w8a16" else 15)  # int8 ~42 dB, int4 ~19 dB


@pytest.mark.parametrize("recipe", ["w4a16", "w8a16"])
def test_a_tied_table_ships_once_in_the_ort(tmp_path, recipe):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "passes"))
    from test_tied_table import V, D, _tied_lm

    src, table, _ = _tied_lm(tmp_path / "lm.onnx")
    qdq = tmp_path / "q.onnx"
    res = api.quantize(src, qdq, recipe, profile="android", progress=False)
    pkg = api.package(qdq, "android", tmp_path / "android")
    ids = np.array([[0, 5, 95, 5, 17]], np.int64)
    want = ort_session(qdq).run(None, {"input_ids": ids})
    got = ort_session(pkg.model_file).run(None, {"input_ids": ids})
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)  # the .ort computes what its QDQ model computes
    table_bytes = V * D // (2 if recipe == "w4a16" else 1)
    # one copy of the table's integers (plus scales and the small mixing weight), not two
    assert pkg.model_file.stat().st_size < 1.6 * table_bytes + 20_000, pkg.model_file.stat().st_size
    assert res.plan.coverage()["quantized"] == 2
