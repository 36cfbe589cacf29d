"""What the Android plan does for decode speed, on the tiny Llama with AWQ: the scalings' Muls end in the fused
norms' weights and the up projections' scales (only the attention output's stays: GroupQueryAttention cannot take
it), the graph computes what the same quantization without the fold computes, and onnxruntime-genai is told to share
past/present buffers only where every layer is GroupQueryAttention (the exported model makes these tests slow)."""

import collections

import numpy as np
import onnx
import pytest

from edgeq import meta
from edgeq.export.causal_lm import empty_cache, past_names, present_names, step_feed
from edgeq.passes import fold_scalings
from edgeq.pipeline.quantize import quantize_model
from edgeq.runtime import ort_session
from edgeq.validate.metrics import sqnr_db
from targets.android.llm import shares_cache_buffers

pytestmark = pytest.mark.slow

MIN_SQNR_DB = 100.0  # float kernels (ORT optimizations off); ~125 dB measured on SmolLM2 w4a16


@pytest.fixture(scope="module")
def both(tiny_onnx, tmp_path_factory):
    """The tiny Llama quantized w4a16 for android with AWQ (calibration texts), with and without the fold."""
    path, res = tiny_onnx
    root = tmp_path_factory.mktemp("fold")
    rng = np.random.default_rng(0)
    calib = [step_feed(rng.integers(3, 256, (1, 24)), empty_cache(res.facts)) for _ in range(8)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fold_scalings.FoldScalingsPass, "call",
                   lambda self, model: fold_scalings.FoldScalingsResult(model, modified=False))
        unfolded = quantize_model(path, root / "unfolded.onnx", "w4a16", profile="android", calib=calib,
                                  progress=False)
    folded = quantize_model(path, root / "folded.onnx", "w4a16", profile="android", calib=calib, progress=False)
    return unfolded, folded, res.facts


def _scaling_muls(path) -> collections.Counter:
    """The scaling Muls by the op that makes their input."""
    g = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    return collections.Counter(producer.get(n.input[0], "input") for n in g.node
                               if n.op_type == "Mul" and meta.role_of(meta.proto_props(n)) == meta.Role.SCALING)


def test_only_the_attention_outputs_scaling_stays(both):
    unfolded, folded, _ = both
    assert unfolded.plan.scalings  # AWQ scaled some inputs, and the same ones both times
    assert [(s.tensor, s.consumers, s.scale.tobytes()) for s in folded.plan.scalings] == \
        [(s.tensor, s.consumers, s.scale.tobytes()) for s in unfolded.plan.scalings]
    before, after = _scaling_muls(unfolded.path), _scaling_muls(folded.path)
    assert before["SkipSimplifiedLayerNormalization"] + before["SimplifiedLayerNormalization"] > 0
    assert set(after) <= {"GroupQueryAttention"} and after["GroupQueryAttention"] == before["GroupQueryAttention"]


def test_the_folded_graph_computes_what_the_unfolded_one_does(both):
    unfolded, folded, facts = both
    names = ["logits", *present_names(facts.num_layers)]
    ref, new = (ort_session(str(r.path), optimize=False) for r in (unfolded, folded))
    ids = np.random.default_rng(1).integers(3, 256, (1, 12)).astype(np.int64)
    past = dict(zip(names, ref.run(names, step_feed(ids[:, :-1], empty_cache(facts)))))
    decode = step_feed(ids[:, -1:], dict(zip(past_names(facts.num_layers), (past[n] for n in names[1:]))))
    for label, feed in (("prefill", step_feed(ids, empty_cache(facts))), ("decode after 11", decode)):
        want, got = (dict(zip(names, s.run(names, feed))) for s in (ref, new))
        worst = min((sqnr_db(want[n], got[n]), n) for n in names)
        assert worst[0] >= MIN_SQNR_DB, f"{label}: {worst[1]} at {worst[0]:.1f} dB"


def test_genai_shares_cache_buffers_only_when_gqa_writes_every_present(both, tiny_onnx):
    _, folded, _ = both
    assert shares_cache_buffers(onnx.load(str(folded.path)))
    assert not shares_cache_buffers(onnx.load(str(tiny_onnx[0])))  # the export: attention as small ops + Concat
