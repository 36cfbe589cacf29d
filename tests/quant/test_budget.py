"""Accuracy budget search: meets the budget, raises the layer that matters, explains it, repeats itself."""

import json
import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

from edgeq.pipeline.budget import parse_budget, search
from edgeq.cli import main
from edgeq.errors import InputError
from edgeq.quant.recipes import GPTQConfig, preset
from w8a8_models import encoder_block, encoder_feeds


def _feeds(n=6, seed=1):
    feeds = encoder_feeds(n, seed=seed)
    for f in feeds:
        f["mask"][:] = 1.0
    return feeds


def _planted(path):
    """ffn2 with a weight 7× the rest: under int4 (no protection) it is the layer that breaks."""
    path = encoder_block(path)
    m = onnx.load(path)
    for i, t in enumerate(m.graph.initializer):
        if t.name == "w2":
            a = nh.to_array(t).copy()
            a[7, 5] = 6.0
            m.graph.initializer[i].CopyFrom(nh.from_array(a, "w2"))
    onnx.save(m, path)
    return path


# a plain ladder: int4 -> int8 -> float (GPTQ in act order rounds the planted weight first and hides it)
W4 = preset("w4a16").with_algorithms(awq=None, gptq=GPTQConfig())


def test_budget_is_met_by_raising_the_planted_layer_first(tmp_path):
    src = _planted(tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    res = search(src, W4, "sqnr>=23", out, data=_feeds(4, seed=5), calib=_feeds(), rank_limit=None, progress=False)
    assert res.met and res.final >= 23 > res.base
    assert res.raised and res.raised[0].node == "ffn2" and res.raised[0].level == "int8"
    assert res.raised[0].rank == 1 and res.raised[0].added_bytes > 0
    assert len(res.raised) == 1  # not everything: ffn2 alone is enough (23.2 dB measured)
    assert out.exists() and res.final_bytes >= res.base_bytes
    text = res.format()
    assert "MET" in text and "ffn2" in text and "rank   1" in text
    assert 'name = "^ffn2$"' in res.recipe_toml and 'weights = "int8"' in res.recipe_toml
    again = search(src, W4, "sqnr>=23", tmp_path / "q2.onnx", data=_feeds(4, seed=5), calib=_feeds(),
                   rank_limit=None, progress=False)
    assert [r.as_dict() for r in again.raised] == [r.as_dict() for r in res.raised]  # deterministic
    assert again.final == res.final


def test_w8a8_ladder_and_a_budget_already_met(tmp_path):
    src = encoder_block(tmp_path / "m.onnx")
    res = search(src, preset("w8a8"), "cosine>=0.5", None, data=_feeds(3, seed=5), calib=_feeds(), progress=False)
    assert res.met and res.raised == [] and res.final == res.base
    hard = search(src, preset("w8a8"), "sqnr>=45", None, data=_feeds(3, seed=5), calib=_feeds(), progress=False)
    assert hard.met and hard.raised
    assert {r.level for r in hard.raised} <= {"float input", "float"}


def test_a_budget_only_float_meets_raises_every_layer_and_the_cli_reports_it(tmp_path, capsys):
    src = encoder_block(tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **_feeds(1)[0])
    code = main(["quantize", src, "--recipe", "w8a16", "--budget", "sqnr>=400", "--data", str(tmp_path / "d.npz"),
                 "-o", str(tmp_path / "q.onnx"), "--json", str(tmp_path / "r.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "MET" in out and "layers left above the recipe's precision (3)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["met"] is True and report["budget"] == "sqnr>=400"
    assert sorted(r["node"] for r in report["raised"]) == ["ffn1", "ffn2", "head"]
    assert {r["level"] for r in report["raised"]} == {"float"}


@pytest.mark.parametrize("text", ["cosine>0.9", "accuracy>=0.9", "cosine>=1.5", ""])
def test_bad_budgets_are_named(text):
    with pytest.raises(InputError, match="budget"):
        parse_budget(text)


def test_top1_budget_needs_class_scores(tmp_path):
    src = encoder_block(tmp_path / "m.onnx")  # output [batch, seq, 4]: 4 scores per position
    assert search(src, "w8a16", "top1_agreement>=0.5", None, data=_feeds(2), progress=False).met
    w = nh.from_array(np.ones((4, 1), np.float32), "w")
    g = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                               [onnx.helper.make_tensor_value_info("x", 1, ["b", 4])],
                               [onnx.helper.make_tensor_value_info("y", 1, ["b", 1])], [w])
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)]), tmp_path / "r.onnx")
    with pytest.raises(InputError, match="top1_agreement needs a classifier"):
        search(tmp_path / "r.onnx", "w8a16", "top1_agreement>=0.5", None,
               data=[{"x": np.ones((2, 4), np.float32)}], progress=False)


def test_the_written_model_is_what_its_printed_rules_give_and_data_is_read_once(tmp_path, monkeypatch):
    """The final quantization reuses the first one's statistics (no second pass over the data), and the
    model written equals `quantize` with the printed rules pasted into the recipe."""
    from edgeq.pipeline import quantize as qmod
    from edgeq.pipeline.quantize import quantize_model

    passes = []
    real = qmod.calibrate
    monkeypatch.setattr(qmod, "calibrate", lambda *a, **k: passes.append(1) or real(*a, **k))
    src = _planted(tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    res = search(src, "w4a16", "sqnr>=23", out, data=_feeds(4, seed=5), calib=_feeds(), rank_limit=None,
                 progress=False)
    assert res.met and res.raised and len(passes) == 1
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "w4a16-b32+budget"\n[default]\nweights = "int4"\n[algorithms]\nawq = true\ngptq = {act_order = true}\n'
                      + res.recipe_toml)
    again = tmp_path / "again.onnx"
    quantize_model(src, again, recipe, calib=_feeds(), progress=False)
    strip = lambda p: onnx.load(str(p)).graph.SerializeToString()  # noqa: E731  (metadata names the recipe)
    assert strip(again) == strip(out)
