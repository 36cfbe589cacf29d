"""``analyze`` (and ``--budget``) on a causal LM for the Android profile: the layers are scored on the plan's own
graph, not the ORT-fused one, where q/k/v are packed into one MatMul and the AWQ scalings are folded into the
norms and the up projections' scales — there, q/k/v would vanish from the ranking and a bypassed down projection
would read its input still divided by the AWQ factor with an unscaled float weight (the exported model makes these
tests slow)."""

import numpy as np
import onnx
import pytest

from edgeq.export.causal_lm import empty_cache, step_feed
from edgeq.pipeline.analyze import sensitivity
from edgeq.pipeline.budget import search
from edgeq.pipeline.quantize import quantize_model
from edgeq.pipeline.variants import Evaluator, Variants, prepare_float

pytestmark = pytest.mark.slow

MIN_FLOAT_SQNR_DB = 100.0  # every layer bypassed = the float model; ~140 dB measured (float kernels, same ops)


@pytest.fixture(scope="module")
def feeds(tiny_onnx):
    """(calibration feeds, evaluation feeds): token sequences from position 0, disjoint seeds."""
    facts = tiny_onnx[1].facts
    calib = [step_feed(np.random.default_rng(0).integers(3, 256, (1, 24)), empty_cache(facts)) for _ in range(8)]
    rng = np.random.default_rng(1)
    evaluation = [step_feed(rng.integers(3, 256, (1, 16)), empty_cache(facts)) for _ in range(3)]
    return calib, evaluation


def test_every_projection_is_ranked_on_the_android_profile(tiny_onnx, feeds):
    calib, evaluation = feeds
    rep = sensitivity(tiny_onnx[0], "w4a16", calib=calib, data=evaluation, profile="android", progress=False)
    plan = quantize_model(tiny_onnx[0], None, "w4a16", profile="android").plan
    projections = {d.node for d in plan.weights if d.op_type == "MatMul"}
    ranked = {r.node for r in rep.layers}
    assert len(projections) == 15 and projections <= ranked, sorted(projections - ranked)  # 2 layers × 7 + output
    # one layer quantized, every other one float, is closer to the float model than all of them quantized
    # (a wrong float variant — e.g. a down projection reading an input still scaled by AWQ — breaks this)
    worse = [(r.node, round(r.only.sqnr_db, 1)) for r in rep.layers if r.only.sqnr_db < rep.full.sqnr_db]
    assert not worse, f"all quantized: {rep.full.sqnr_db:.1f} dB; alone but worse: {worse}"


def test_bypassing_every_layer_gives_back_the_float_model(tiny_onnx, feeds, tmp_path):
    calib, evaluation = feeds
    model, _, float_proto, eval_feeds, _ = prepare_float(tiny_onnx[0], evaluation, None)
    res = quantize_model(model, tmp_path / "q.onnx", "w4a16", profile="android", calib=calib, progress=False,
                         fuse=False)
    assert res.plan.scalings, "AWQ scaled no input: the test would not see a wrong float variant"
    variants = Variants(float_proto, onnx.load(str(res.path)), res.plan)
    score = Evaluator(float_proto, eval_feeds).score(variants.build_in_memory(set(), None,
                                                                              float_acts=set(variants.layers)))
    assert score.sqnr_db >= MIN_FLOAT_SQNR_DB, f"all layers float: {score.sqnr_db:.1f} dB"


def test_a_budget_met_as_is_writes_the_fused_android_graph(tiny_onnx, feeds, tmp_path):
    """--budget ranks on the plan's graph but writes what ``quantize --profile android`` writes."""
    calib, evaluation = feeds
    res = search(tiny_onnx[0], "w4a16", "sqnr>=0", tmp_path / "b.onnx", calib=calib, data=evaluation,
                 profile="android", progress=False)
    assert res.met and not res.raised
    ops = {n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node}
    assert "GroupQueryAttention" in ops and "MatMulNBits" in ops
