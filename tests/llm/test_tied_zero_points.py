"""An int4 table tied between the embedding and the output layer, with a zero point per block (the
asymmetric spec): ONNX Runtime's GatherBlockQuantized and MatMulNBits read the same integers and each its
own copy of the zero points, and both give what the plan's dequantized table gives."""

import numpy as np
import onnx
import pytest
from helpers import tied_lm

from edgeq import api
from edgeq.export.causal_lm import empty_cache, read_facts, step_feed
from edgeq.pipeline.quantize import quantize_model
from edgeq.runtime import ort_session
from targets.android import ortformat
from targets.android.profile import ANDROID

V, D = 80, 96  # 3 blocks of 32 per row: an odd count, MatMulNBits' zero points padded with a nibble

TIED_INT4 = 'name = "w4-tied4"\n[default]\nweights = "int4"\ntied_table = "int4"\n'
FLOAT_MIX = '[[rules]]\nop = ["MatMul"]\nname = "^mix$"\nweights = "float"\n'


def _recipe(path, extra: str = ""):
    path.write_text(TIED_INT4 + extra + FLOAT_MIX)
    return path


def _accuracy_level(model: onnx.ModelProto, level: int) -> bytes:
    """``model`` with its MatMulNBits at ``level`` (0: float32 activations, to compare with the reference)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in out.graph.node:
        if n.op_type == "MatMulNBits":
            next(a for a in n.attribute if a.name == "accuracy_level").i = level
    return out.SerializeToString()


def test_the_tied_int4_table_with_zero_points_reads_exactly_its_dequantized_table(tmp_path):
    rng = np.random.default_rng(7)
    table = (rng.standard_normal((V, D)) + rng.uniform(-1.5, 1.5, (V, 1))).astype(np.float32)  # off-centre rows
    mix = (np.eye(D) + rng.standard_normal((D, D)) / 5).astype(np.float32)
    src = tied_lm(tmp_path / "lm.onnx", table, mix, outputs=("e", "h"))
    out = tmp_path / "q.onnx"
    res = quantize_model(src, out, _recipe(tmp_path / "r.toml"), profile=ANDROID, progress=False)
    tied = [d for d in res.plan.weights if d.weight == "table"]
    assert {(d.op_type, d.form) for d in tied} == {("Gather", "tied_gbq"), ("MatMul", "tied_matmulnbits")}
    assert not any(d.symmetric for d in tied)
    codes = res.plan.codes["table"]
    assert codes.zero_point is not None and codes.zero_point.shape == (V, D // 32)
    assert len(np.unique(codes.zero_point)) > 3  # the rows' offsets moved the zero points
    model = onnx.load(str(out))
    ops = {n.op_type: n for n in model.graph.node}
    gbq, mnb = ops["GatherBlockQuantized"], ops["MatMulNBits"]
    assert gbq.input[0] == mnb.input[1]  # one packed table
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits[gbq.input[3]].shape == (V, D // 32, 1) and inits[mnb.input[3]].shape == (V, 2)
    ids = np.array([[0, 5, V - 1, 5, 17, 42]], np.int64)
    deq = codes.dequantize()
    for level in (0, 4):
        sess = ort_session(_accuracy_level(model, level), optimize=False)
        e, hid, logits = sess.run(["e", "h", "logits"], {"input_ids": ids})
        np.testing.assert_array_equal(e, deq[ids])  # the Gather's rows: exactly the dequantized table's
        ref = hid.astype(np.float64) @ deq.T.astype(np.float64)
        err = np.abs(logits - ref).max() / np.abs(ref).max()
        # level 0: float32 sums; level 4, as shipped: int8 activations
        assert err < (1e-5 if level == 0 else 0.02), (level, err)
    # the zero points pay: off-centre rows are closer to the float table than with symmetric blocks
    sym = quantize_model(src, tmp_path / "sym.onnx", _recipe(tmp_path / "sym.toml", "asymmetric = false\n"),
                         profile=ANDROID, progress=False).plan.codes["table"]
    assert sym.zero_point is None
    err_asym, err_sym = (float(np.square(q.dequantize() - table).mean()) for q in (codes, sym))
    assert err_asym < 0.8 * err_sym, (err_asym, err_sym)


@pytest.mark.slow
def test_the_tiny_llamas_tied_int4_table_keeps_its_zero_points_in_the_ort(tiny_onnx, tmp_path):
    """The tiny Llama, w4a16 with an int4 tied table, packaged for Android: the .ort (after ORT's conversion)
    gives the QDQ model's logits, prefill and a decode step."""
    path, _ = tiny_onnx
    qdq = tmp_path / "tiny.tied4.onnx"
    recipe = tmp_path / "tied4.toml"
    recipe.write_text(TIED_INT4)
    res = api.quantize(path, qdq, recipe, profile="android", progress=False)
    assert all(not d.symmetric for d in res.plan.weights if d.form.startswith("tied_"))
    pkg = api.package(qdq, "android", tmp_path / "android")
    packed_input = {"GatherBlockQuantized": 0, "MatMulNBits": 1}
    ops = [n for n in onnx.load(str(qdq)).graph.node if n.op_type in packed_input and len(n.input) == 4
           and n.input[packed_input[n.op_type]].endswith("lm_head.weight_quantized")]
    assert sorted(n.op_type for n in ops) == ["GatherBlockQuantized", "MatMulNBits"]
    # the .ort stores the table's scales once (float [V, D/32]); their 3-D view for the Gather is made at run time
    table = res.plan.codes[next(d.weight for d in res.plan.weights if d.form == "tied_gbq")]
    v, nb = table.scale.shape
    floats = [t.dims for t in ortformat.tensors(pkg.model_file.read_bytes()) if t.data_type == onnx.TensorProto.FLOAT]
    assert floats.count((v, nb)) == 1 and (v, nb, 1) not in floats
    qdq_sess, ort_sess = ort_session(qdq), ort_session(pkg.model_file)
    facts = read_facts(qdq_sess.get_modelmeta().custom_metadata_map)
    names = [o.name for o in qdq_sess.get_outputs()]
    ids = np.random.default_rng(2).integers(3, 256, (1, 9))
    feed = step_feed(ids, empty_cache(facts))
    want, got = qdq_sess.run(None, feed), ort_sess.run(names, feed)
    np.testing.assert_array_equal(got[0], want[0])
    past = dict(zip([n.replace("present", "past_key_values") for n in names[1:]], want[1:]))
    step = step_feed(np.array([[7]]), past)
    np.testing.assert_array_equal(ort_sess.run(names, step)[0], qdq_sess.run(None, step)[0])


def test_the_ios18_package_reads_the_tied_int4_table_with_its_zero_points(tmp_path):
    """Core ML (iOS 18): the tied table is one DequantizeLinear with zero points (``tied_dq``), lowered to one
    constexpr the embedding and the output layer read; fp32 compute gives the dequantized table's rows."""
    from edgeq.validate.metrics import sqnr_db
    from targets.coreml import IOS18Target
    from targets.coreml.runner import MLPackageRunner

    rng = np.random.default_rng(7)
    table = (rng.standard_normal((V, D)) + rng.uniform(-1.5, 1.5, (V, 1))).astype(np.float32)
    mix = (np.eye(D) + rng.standard_normal((D, D)) / 5).astype(np.float32)
    src = tied_lm(tmp_path / "lm.onnx", table, mix, outputs=("e", "h"))
    qdq = tmp_path / "q.onnx"
    res = api.quantize(src, qdq, _recipe(tmp_path / "r.toml"), profile="ios18", progress=False)
    tied = [d for d in res.plan.weights if d.weight == "table"]
    assert {d.form for d in tied} == {"tied_dq"} and not any(d.symmetric for d in tied)
    dq = [n for n in onnx.load(str(qdq)).graph.node
          if n.op_type == "DequantizeLinear" and n.input[0] == "table_quantized"]
    assert len(dq) == 1 and len(dq[0].input) == 3  # one table, with its zero points
    pkg = IOS18Target(compute="fp32").package(qdq, tmp_path / "pkg")
    ids = np.array([[0, 5, V - 1, 5, 17, 42]], np.int64)
    got = MLPackageRunner(pkg.model_file).run({"input_ids": ids})
    want = dict(zip(["logits", "e"], ort_session(qdq, optimize=False).run(["logits", "e"], {"input_ids": ids})))
    np.testing.assert_array_equal(got["e"], res.plan.codes["table"].dequantize()[ids])
    assert sqnr_db(want["logits"], got["logits"]) >= 90
