"""Per-layer sensitivity (`edgeq analyze`): a planted sensitive layer ranks first, variants are exact."""

import json
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper as nh

from edgeq.pipeline.analyze import sensitivity
from edgeq.pipeline import variants
from edgeq.pipeline.variants import Variants
from edgeq.cli import main
from edgeq.errors import InputError
from edgeq.pipeline.quantize import load_model, quantize_model
from edgeq.quant.recipes import preset

from w8a8_models import cnn, cnn_feeds, conv_if, conv_if_feeds, encoder_block, encoder_feeds


def _feeds():
    feeds = encoder_feeds()
    for f in feeds:
        f["mask"][:] = 1.0  # no masked positions: the output stays finite and SQNR is meaningful
    return feeds


def _plant(path, weight="w2", index=(0, 5), value=40.0):
    """A super weight: one large entry in a MatMul weight ruins the rounding of its block/channel."""
    m = onnx.load(path)
    for i, t in enumerate(m.graph.initializer):
        if t.name == weight:
            a = nh.to_array(t).copy()
            a[index] = value
            m.graph.initializer[i].CopyFrom(nh.from_array(a, weight))
    onnx.save(m, path)
    return path


# outlier protection would take the planted weight out of the int8 path (tests/quant/test_protect.py):
# analyze is measured here on the plain recipe
W8A8_PLAIN = preset("w8a8").with_algorithms(protect=None)
W4A16_PLAIN = preset("w4a16").with_algorithms(protect=None)  # (protection would take the planted weight out)


@pytest.mark.parametrize("recipe", [W4A16_PLAIN, W8A8_PLAIN], ids=["w4a16", "w8a8"])
def test_planted_super_weight_ranks_first(tmp_path, recipe):
    clean = encoder_block(tmp_path / "clean.onnx")
    planted = _plant(encoder_block(tmp_path / "planted.onnx"))
    before = sensitivity(clean, recipe, data=_feeds(), progress=False)
    after = sensitivity(planted, recipe, data=_feeds(), progress=False)
    assert before.layers[0].node != "ffn2"
    top = after.layers[0]
    assert top.node == "ffn2" and top.op_type == "MatMul"
    assert top.only.sqnr_db < min(r.only.sqnr_db for r in after.layers[1:]) - 3
    # leaving the planted layer float recovers most of the error of the full recipe
    assert top.all_but.sqnr_db > after.full.sqnr_db + 3
    by_cos = sensitivity(planted, recipe, data=_feeds(), progress=False, rank_by="cosine")
    assert by_cos.layers[0].node == "ffn2"


def test_deterministic_and_limit(tmp_path):
    path = _plant(encoder_block(tmp_path / "m.onnx"))
    a = sensitivity(path, W8A8_PLAIN, data=_feeds(), limit=3, progress=False).as_dict()
    b = sensitivity(path, W8A8_PLAIN, data=_feeds(), limit=3, progress=False).as_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b and a["feeds"] == 3 and [r["node"] for r in a["layers"]] == ["ffn2", "head", "ffn1"]


def _embedder(path):
    """ids → Gather(table) → MatMul: the embedding forms (int8 rows gathered, int4 fused Gather)."""
    rng = np.random.default_rng(4)
    table, w = rng.standard_normal((50, 32)).astype(np.float32), rng.standard_normal((32, 16)).astype(np.float32)
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
         onnx.helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")], "emb",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "seq"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", 16])],
        [onnx.numpy_helper.from_array(table, "table"), onnx.numpy_helper.from_array(w, "w")])
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)]), str(path))
    return path


def _ids(n: int = 3):
    rng = np.random.default_rng(5)
    return [{"ids": rng.integers(0, 50, (2, 7)).astype(np.int64)} for _ in range(n)]


@pytest.mark.parametrize("make,feeds,recipe", [(cnn, cnn_feeds, "w8a8"), (encoder_block, _feeds, "w8a8"),
                                               (encoder_block, _feeds, "w4a16"), (_embedder, _ids, "w8a16"),
                                               (_embedder, _ids, "w4a16")])
def test_variants_bypass_exactly(tmp_path, monkeypatch, make, feeds, recipe):
    """Nothing quantized reproduces the float model (SmoothQuant kept exact); everything reproduces the QDQ file."""
    path = make(tmp_path / "m.onnx")
    res = quantize_model(path, tmp_path / "q.onnx", recipe, calib=feeds(), force=True, progress=False)
    fm = load_model(path)
    import onnx_ir as ir

    v = Variants(ir.to_proto(fm), onnx.load(str(res.path)), res.plan)
    assert v.layers

    def run(model, feed):
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        return sess.run(None, feed)[0]

    feed = feeds()[0]
    ref = run(path, feed)
    none = run(v.build(set(), set()), feed)
    np.testing.assert_allclose(none, ref, rtol=1e-4, atol=1e-4)
    full = run(v.build(set(v.layers), None), feed)
    np.testing.assert_array_equal(full, run(str(res.path), feed))
    # the same variants with their large initializers shared in memory (what analyze and --budget run)
    monkeypatch.setattr(variants, "_MIN_SHARED_BYTES", 0)  # share every numpy-typed initializer, however small
    nothing, everything = v.build_in_memory(set(), set()), v.build_in_memory(set(v.layers), None)
    assert nothing.names and everything.names
    np.testing.assert_array_equal(nothing.session().run(None, feed)[0], none)
    np.testing.assert_array_equal(everything.session().run(None, feed)[0], full)
    assert not np.allclose(full, ref, rtol=1e-6, atol=1e-6)


def test_cli_table_and_json(tmp_path, capsys):
    path = cnn(tmp_path / "cnn.onnx")
    data = tmp_path / "feeds"
    data.mkdir()
    for i, f in enumerate(cnn_feeds(n=3)):
        np.savez(data / f"{i}.npz", **f)
    out = tmp_path / "sens.json"
    code = main(["analyze", str(path), "--recipe", "w8a16", "--data", str(data), "--limit", "2", "--json", str(out),
                 "--no-progress"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "rank" in text and "dwconv" in text and "all but: SQNR" in text
    report = json.loads(out.read_text())
    assert report["feeds"] == 2 and report["recipe"] == "w8a16"
    assert sorted(r["node"] for r in report["layers"]) == ["conv1", "dwconv", "expand", "fc", "project"]
    sqnrs = [r["only"]["sqnr_db"] for r in report["layers"]]
    assert sqnrs == sorted(sqnrs)


def test_bad_inputs(tmp_path, capsys):
    path = cnn(tmp_path / "cnn.onnx")
    feeds = tmp_path / "f.npz"
    np.savez(feeds, **cnn_feeds(n=1)[0])
    cases = [
        ([str(path), "--recipe", "w3", "--data", str(feeds)], "unknown recipe 'w3'"),
        ([str(path), "--recipe", "w8a16"], "no evaluation data"),
        ([str(path), "--recipe", "w8a16", "--data", str(tmp_path / "missing")], "missing"),
        ([str(tmp_path / "nope.onnx"), "--recipe", "w8a16", "--data", str(feeds)], "not found"),
        ([str(path), "--recipe", "w8a16", "--data", str(feeds), "--limit", "0"], "--limit"),
    ]
    for argv, msg in cases:
        code = main(["analyze", *argv, "--no-progress"])
        _, err = capsys.readouterr()
        assert code == 2 and msg in err, (argv, err)
    with pytest.raises(InputError, match="rank"):
        sensitivity(path, "w8a16", data=cnn_feeds(n=1), rank_by="mse", progress=False)


def test_variants_of_a_model_with_if_branches_keep_what_the_branches_read(tmp_path):
    # silero-vad op15: the If branches read the encoder output and constants of the main graph; a
    # variant kept only what main-graph nodes read (ONNX Runtime: "must be topologically sorted")
    src = conv_if(tmp_path / "conv_if.onnx")
    rep = sensitivity(src, preset("w8a8"), calib=conv_if_feeds(), data=conv_if_feeds(3, seed=7), progress=False)
    assert {r.node for r in rep.layers} == {"conv0", "conv", "fc"}
    assert all(np.isfinite(r.only.sqnr_db) and np.isfinite(r.all_but.sqnr_db) for r in rep.layers)
