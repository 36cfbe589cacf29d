"""The quantize pipeline's shape: calibrate → decide (one handler per algorithm, each with a result)
→ apply; decide never edits the user's model; calibration passes are counted; profiles share them."""

import typing

import helpers
import numpy as np
import onnx
import pytest
from w8a8_models import cnn, cnn_feeds, encoder_block, encoder_feeds

from edgeq.pipeline.quantize import decide, load_model, quantize_for_profiles
from edgeq.quant.handlers import HANDLERS, ORDER
from edgeq.quant.plan import make_plan
from edgeq.quant.profile import ONNXRUNTIME_CPU
from edgeq.quant.recipes import Algorithms, preset


def test_one_handler_per_algorithm_config():
    hints = typing.get_type_hints(Algorithms)
    configs = {next(a for a in typing.get_args(hints[f]) if a is not type(None)) for f in Algorithms.__dataclass_fields__}
    assert set(HANDLERS) == configs
    assert len({h.name for h in ORDER}) == len(ORDER)


@pytest.fixture
def count_calibrations(monkeypatch):
    return helpers.count_calibrations(monkeypatch)


@pytest.mark.parametrize("recipe, passes", [("w8a8", 2), ("w4a16", 1), ("w8a16", 0)])
def test_decide_leaves_the_model_alone_and_reads_the_data_as_often_as_said(tmp_path, recipe, passes,
                                                                             count_calibrations):
    path = encoder_block(tmp_path / "enc.onnx", outlier_channel=3)
    model = load_model(path)
    before = onnx.printer.to_text(__import__("onnx_ir").to_proto(model).graph)
    rec = preset(recipe)
    [(plan, table)] = decide(model, [make_plan(model, rec, profile=ONNXRUNTIME_CPU)], rec, [ONNXRUNTIME_CPU],
                             encoder_feeds(6), progress=False)
    assert onnx.printer.to_text(__import__("onnx_ir").to_proto(model).graph) == before
    assert len(count_calibrations) == passes  # W8A8: a 4-batch prepass + the full pass; weight-only: one
    if recipe == "w8a8":
        assert count_calibrations == [4, 6]
    names = [r.name for r in plan.algorithms]
    # every enabled algorithm says what it did (the sequence-start check speaks for causal LMs only)
    assert names == [h.name for h in ORDER if h().enabled(rec) and h.name != "sequence_starts"]
    assert set(plan.codes) == {d.weight for d in plan.weights}


def test_without_data_each_data_aware_algorithm_says_it_did_not_run(tmp_path):
    model = load_model(encoder_block(tmp_path / "enc.onnx"))
    rec = preset("w4a16")
    [(plan, table)] = decide(model, [make_plan(model, rec)], rec, [ONNXRUNTIME_CPU], None, progress=False)
    assert table is None
    results = {r.name: r for r in plan.algorithms}
    assert not results["awq"].ran and "no calibration data" in results["awq"].summary
    assert not results["gptq"].ran and results["rounding"].ran


@pytest.mark.parametrize("make, feeds, passes", [(cnn, cnn_feeds, 1), (encoder_block, encoder_feeds, 2)])
def test_profiles_share_one_calibration_and_carry_the_same_integers(tmp_path, count_calibrations, make, feeds,
                                                                      passes):
    from targets.android.profile import ANDROID
    from targets.coreml.profile import IOS18

    src = make(tmp_path / "m.onnx")
    outs = [tmp_path / "a.onnx", tmp_path / "i.onnx"]
    res = quantize_for_profiles(src, [(ANDROID, outs[0]), (IOS18, outs[1])], "w8a8", calib=feeds(4),
                                progress=False)
    # the CNN needs only the main pass, the encoder a prepass too (outlier channels): each once for both
    assert len(count_calibrations) == passes
    a, i = res[0].plan, res[1].plan
    assert a.profile == "android" and i.profile == "ios18"
    for w in set(a.codes) & set(i.codes):  # bit for bit: one calibration, one set of decisions
        np.testing.assert_array_equal(a.codes[w].data, i.codes[w].data)
        np.testing.assert_array_equal(a.codes[w].scale, i.codes[w].scale)
    assert set(a.codes) == set(i.codes)


def test_a_causal_lm_calibrated_without_sequence_starts_is_warned_about():
    """Feeds from mid-text only (smallest position 5): the plan says the first token's activations are missing."""
    import onnx_ir as ir

    from edgeq.quant.algorithms import Context, Stats
    from edgeq.quant.plan import QuantPlan
    from edgeq.quant.sequence_starts import SequenceStarts

    g = ir.Graph([ir.Value(name="input_ids"), ir.Value(name="position_ids"), ir.Value(name="past_key_values.0.key")],
                 [], nodes=[])
    ctx = Context(ir.Model(g, ir_version=10), preset("w4a16"), ONNXRUNTIME_CPU, has_data=True)
    h = SequenceStarts()
    assert [r.tensor for r in h.requests(ctx, None)] == ["position_ids"]
    plan = QuantPlan("r", "p", (), ())
    late = h.decide(ctx, plan, Stats({("smallest", "position_ids"): 5}))
    assert "WARNING: no calibration feed starts a sequence" in late.algorithms[0].summary
    ok = h.decide(ctx, plan, Stats({("smallest", "position_ids"): 0}))
    assert ok.algorithms[0].ran and "position 0" in ok.algorithms[0].summary
