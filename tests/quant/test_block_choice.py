"""The int4 block choice: the target's faster block (128) where a layer's predicted output SQNR stays high
and loses little, its own block (32) where not; visible in the plan; off or pinned by the recipe."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import helper as oh
from onnx import numpy_helper as nh

from edgeq.errors import InputError
from edgeq.pipeline.quantize import decide, load_model, quantize_model
from edgeq.quant.block_choice import predicted_sqnr_db
from edgeq.quant.plan import make_plan
from edgeq.quant.profile import ONNX_REFERENCE, ONNXRUNTIME_CPU
from edgeq.quant.recipes import load_recipe, preset
from edgeq.quant.weights import quantize_weight
from edgeq.validate.metrics import sqnr_db

K, N = 256, 16


def _on_grid(rng, block: int, scales) -> np.ndarray:
    """[K, N] weights exactly on an asymmetric int4 grid per ``block`` rows (each block holds codes -8 and 7),
    the block's step taken from ``scales`` in turn."""
    codes = rng.integers(-8, 8, (K, N)).astype(np.float32)
    codes[0::block], codes[1::block] = -8.0, 7.0
    step = np.repeat(np.resize(np.asarray(scales, np.float32), K // block), block)[:, None]
    return codes * step * 0.01


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    spiky = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    spiky[rng.integers(0, 128, N), np.arange(N)] = 2.0  # one large weight per column in rows 0-127
    spiky[128 + rng.integers(0, 128, N), np.arange(N)] = -2.0  # and in rows 128-255
    return {
        "w_grid": _on_grid(rng, 128, [1.0]),  # exact at block 128 and at 32: harmless
        "w_spiky": spiky,  # block 128 puts the spike's step on 127 small weights: low SQNR
        "w_steps": _on_grid(rng, 32, [1.0, 1.3, 1.0, 1.3]),  # exact at 32 only: high SQNR at 128, a large loss
    }


def _model(path, weights) -> str:
    names = list(weights)
    nodes = [oh.make_node("MatMul", ["x", w], [f"y_{w}"], name=f"mm_{w}") for w in names]
    graph = oh.make_graph(nodes, "three", [oh.make_tensor_value_info("x", 1, ["rows", K])],
                          [oh.make_tensor_value_info(f"y_{w}", 1, ["rows", N]) for w in names],
                          [nh.from_array(a, w) for w, a in weights.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def _feeds(n: int = 6, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((64, K)).astype(np.float32)} for _ in range(n)]


def _blocks(plan) -> dict[str, int]:
    return {d.node: d.block for d in plan.weights}


@pytest.fixture
def tiny(tmp_path):
    return _model(tmp_path / "three.onnx", _weights())


def _decide(path, recipe, profile=ONNXRUNTIME_CPU):
    model = load_model(path)
    [(plan, _)] = decide(model, [make_plan(model, recipe, profile=profile)], recipe, [profile], _feeds(),
                         progress=False)
    return plan


def test_the_faster_block_goes_where_it_is_harmless_and_nowhere_else(tiny):
    plan = _decide(tiny, preset("w4a16"))
    assert _blocks(plan) == {"mm_w_grid": 128, "mm_w_spiky": 32, "mm_w_steps": 32}
    result = plan.result("block_choice")
    assert result.ran and result.nodes == ("mm_w_grid",)
    lines = "\n".join(result.details)
    assert "mm_w_spiky: block 32 kept" in lines and "below 22 dB" in lines
    assert "mm_w_steps: block 32 kept" in lines and "dB lost > 3 dB" in lines
    grid = next(d for d in plan.weights if d.node == "mm_w_grid")
    assert "block choice" in grid.reason and grid.block == 128
    assert "block 128" in plan.explain()
    # AWQ and GPTQ rounded at the block chosen: the stored codes are blocked by 128 (2 blocks along K)
    assert plan.codes["w_grid"].block_size == 128 and plan.codes["w_grid"].scale.shape[0] == K // 128


def test_predicted_sqnr_is_the_measured_output_sqnr_on_the_calibration_rows(tmp_path):
    w = _weights()["w_spiky"]
    x = np.concatenate([f["x"] for f in _feeds()])
    gram = (x.astype(np.float64).T @ x) / len(x)
    plan = make_plan(load_model(_model(tmp_path / "one.onnx", {"w": w})), preset("w4a16"))
    [d] = plan.weights
    for block in (32, 128):
        at = replace(d, block=block)
        w_hat = quantize_weight(w, at).dequantize()
        assert predicted_sqnr_db(w, at, gram) == pytest.approx(sqnr_db(x @ w, x @ w_hat), abs=1e-3)


def test_the_recipe_turns_it_off_pins_the_block_or_pins_one_layer(tiny, tmp_path):
    off = preset("w4a16").with_algorithms(block_choice=None)
    assert set(_blocks(_decide(tiny, off)).values()) == {32}
    pinned = preset("w4a16", block=64)  # --block 64: every layer at 64, no choice
    assert pinned.algorithms.block_choice is None and set(_blocks(_decide(tiny, pinned)).values()) == {64}
    toml = tmp_path / "r.toml"
    toml.write_text('[default]\nweights = "int4"\n[algorithms]\nblock_choice = {min_sqnr_db = 22.0}\n'
                    '[[rules]]\nname = "^mm_w_grid$"\nalgorithms = {block_choice = false}\n')
    plan = _decide(tiny, load_recipe(toml))
    assert _blocks(plan)["mm_w_grid"] == 32
    toml.write_text('[default]\nweights = "int4"\n[algorithms]\nblock_choice = {min_sqnr_db = "high"}\n')
    with pytest.raises(InputError, match="min_sqnr_db must be a number"):
        load_recipe(toml)


def test_a_target_without_a_faster_block_keeps_the_recipe_block(tiny):
    plan = _decide(tiny, preset("w4a16"), profile=ONNX_REFERENCE)
    assert set(_blocks(plan).values()) == {32}
    assert not plan.result("block_choice").ran and "runs no int4 block faster" in plan.result("block_choice").summary


def test_the_written_model_dequantizes_each_weight_at_its_block(tiny, tmp_path):
    res = quantize_model(tiny, tmp_path / "q.onnx", "w4a16", calib=_feeds(), progress=False)
    model = onnx.load(str(res.path))
    blocks = [{a.name: a.i for a in n.attribute}.get("block_size") for n in model.graph.node
              if n.op_type == "DequantizeLinear"]
    assert sorted(blocks) == [32, 32, 128]


def test_a_causal_lm_keeps_the_recipe_block(tmp_path):
    """A graph with a causal LM's inputs (position_ids, past_key_values.*): no block choice (see CAUSAL_LM)."""
    path = _model(tmp_path / "lm.onnx", _weights())
    model = onnx.load(path)
    model.graph.input.extend([oh.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, ["b", "s"]),
                              oh.make_tensor_value_info("past_key_values.0.key", 1, ["b", 1, "p", 4])])
    onnx.save(model, path)
    feeds = [{**f, "position_ids": np.zeros((1, 64), np.int64),
              "past_key_values.0.key": np.zeros((1, 1, 1, 4), np.float32)} for f in _feeds()]
    model = load_model(path)
    recipe = preset("w4a16")
    [(plan, _)] = decide(model, [make_plan(model, recipe)], recipe, [ONNXRUNTIME_CPU], feeds, progress=False)
    assert set(_blocks(plan).values()) == {32}
    assert not plan.result("block_choice").ran and "causal LMs keep" in plan.result("block_choice").summary


def test_android_and_ios18_choose_the_same_blocks_and_integers(tiny, tmp_path):
    """One plan for both packages (DESIGN.md): the block choice is the same on both targets, bit for bit."""
    from edgeq.pipeline.quantize import quantize_for_profiles
    from targets.android.profile import ANDROID
    from targets.coreml.profile import IOS18

    a, i = (r.plan for r in quantize_for_profiles(tiny, [(ANDROID, tmp_path / "a.onnx"), (IOS18, tmp_path / "i.onnx")],
                                                  "w4a16", calib=_feeds(), progress=False))
    assert _blocks(a) == _blocks(i) and 128 in _blocks(a).values()
    assert set(a.codes) == set(i.codes)
    for w in a.codes:
        np.testing.assert_array_equal(a.codes[w].data, i.codes[w].data)
        np.testing.assert_array_equal(a.codes[w].scale, i.codes[w].scale)
