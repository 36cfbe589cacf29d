"""The Android plan's transformer fusions on the tiny Llama as edgeq exports it: every layer fused
(GroupQueryAttention with rotary inside and packed QKV, SkipSimplifiedLayerNormalization), the same numbers as the
unfused graph in ONNX Runtime, and attention left unfused-by-GQA when its mask is not plain causal."""

import collections

import numpy as np
import onnx_ir as ir
import pytest

from edgeq.export.causal_lm import empty_cache, past_names, present_names, read_facts, step_feed
from edgeq.passes.fuse_for_ort import FuseForOrtPass, canonical_sum_dims
from edgeq.runtime import ort_session
from edgeq.validate.metrics import sqnr_db

MIN_SQNR_DB = 60.0  # float kernels vs float small ops: ~115 dB measured on SmolLM2


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def _outputs(path, feed, names):
    return dict(zip(names, ort_session(path).run(names, feed)))


def _check_same_numbers(ref_path, fused_path, facts):
    names = ["logits", *present_names(facts.num_layers)]
    ids = np.random.default_rng(0).integers(3, 256, (1, 12)).astype(np.int64)
    prefill = step_feed(ids, empty_cache(facts))
    past = _outputs(ref_path, step_feed(ids[:, :-1], empty_cache(facts)), names)
    decode = step_feed(ids[:, -1:], dict(zip(past_names(facts.num_layers), (past[n] for n in names[1:]))))
    for label, feed in (("prefill", prefill), ("decode after 11", decode)):
        want, got = _outputs(ref_path, feed, names), _outputs(fused_path, feed, names)
        worst = min((sqnr_db(want[n], got[n]), n) for n in names)
        assert worst[0] >= MIN_SQNR_DB, f"{label}: {worst[1]} at {worst[0]:.1f} dB"


@pytest.mark.slow
def test_every_layer_of_the_tiny_llama_fuses_and_computes_the_same(tiny_onnx, tmp_path):
    path, res = tiny_onnx
    facts = res.facts
    model = ir.load(path)
    result = FuseForOrtPass()(model)
    ops = _ops(model)
    layers = facts.num_layers
    assert ops["GroupQueryAttention"] == layers
    # every RMSNorm: the first plain, the rest (second per layer, next layer's first, final) with the residual Add
    assert ops["SimplifiedLayerNormalization"] == 1 and ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    # nothing of attention or rotary is left as small ops
    assert not {"Softmax", "IsNaN", "Neg", "RotaryEmbedding", "MultiHeadAttention", "Pow", "ReduceMean"} & set(ops)
    assert result.fused["gqa"] == layers and result.fused["cos_sin_cache_from_mul"] == 2 * layers
    # per layer one packed query/key/value MatMul, the attention output and 3 MLP ones; + output layer, rotary angles
    assert result.fused["packed_qkv_for_gqa"] == layers and ops["MatMul"] == 5 * layers + 2
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.inputs[1] is None and gqa.inputs[2] is None  # packed
    assert gqa.attributes.get_int("do_rotary") == 1
    assert gqa.attributes.get_int("num_heads") == facts.num_attention_heads
    assert gqa.attributes.get_int("kv_num_heads") == facts.num_kv_heads
    # the graph's inputs and outputs are the ones edgeq's generate loop feeds
    assert [v.name for v in model.graph.inputs] == [v.name for v in ir.load(path).graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in ir.load(path).graph.outputs]
    fused = tmp_path / "fused.onnx"
    ir.save(model, fused)
    _check_same_numbers(path, fused, read_facts(model.metadata_props))


@pytest.mark.slow
def test_attention_whose_mask_is_not_plain_causal_is_not_fused_into_gqa(tiny_onnx, tmp_path):
    """GroupQueryAttention drops the mask; a mask with one more term (here ``And True``, as a sliding
    window would add one) must keep it: the layers become MultiHeadAttention with the mask instead."""
    path, res = tiny_onnx
    model = ir.load(path)
    where = [n for n in model.graph if n.op_type == "Where" and n.inputs[0].producer() is not None
             and n.inputs[0].producer().op_type in ("Expand", "And")]
    assert len(where) == 1  # one additive mask shared by every layer
    true = ir.Value(name="extra_term", const_value=ir.tensor(np.array(True)))
    model.graph.register_initializer(true)
    extra = ir.node("And", [where[0].inputs[0], true])
    model.graph.insert_before(where[0], extra)
    where[0].replace_input_with(0, extra.outputs[0])
    masked = tmp_path / "masked.onnx"
    ir.save(model, masked)

    fused_model = ir.load(masked)
    result = FuseForOrtPass()(fused_model)
    ops = _ops(fused_model)
    assert "gqa" not in result.fused and ops["GroupQueryAttention"] == 0
    assert ops["MultiHeadAttention"] == res.facts.num_layers
    fused = tmp_path / "fused.onnx"
    ir.save(fused_model, fused)
    _check_same_numbers(masked, fused, res.facts)


def test_symbolic_sums_are_spelled_one_way():
    import onnx

    model = ir.from_proto(onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[b, past] a, float[b, seq] x) => (float[b, total] y, float[b, total] z) {
            y = Concat <axis = 1> (x, a)
            z = Concat <axis = 1> (a, x)
        }
    """))
    y, z = model.graph.outputs
    y.shape = ir.Shape(["b", "seq + past"])  # how torch's exporter wrote it on 6 of SmolLM2's 30 layers
    z.shape = ir.Shape(["b", "past + seq"])
    assert canonical_sum_dims(model) == 1
    assert y.shape == z.shape and str(y.shape[1]) == "past + seq"
    assert canonical_sum_dims(model) == 0
