"""Causal-LM export with the KV cache, on a tiny random Llama (and SmolLM2 end to end)."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from edgeq.errors import InputError
from edgeq.export import causal_lm as cl
from edgeq.validate.metrics import sqnr_db

MIN_SQNR_DB = 60.0  # fp32 export vs torch: measured ~130 dB on the tiny model


def test_step_module_equals_the_model_forward(tiny_model):
    """The explicit-cache wrapper at empty past computes what the plain forward computes."""
    facts = cl.generation_facts(tiny_model)
    step = cl.step_module(tiny_model)
    ids = np.array([[5, 17, 99, 3, 250, 8, 42]], np.int64)
    feed = cl.step_feed(ids, cl.empty_cache(facts))
    with torch.no_grad():
        out = step(*(torch.from_numpy(feed[s.name]) for s in cl.input_specs(facts)))
        want = tiny_model(torch.from_numpy(ids)).logits
    assert len(out) == 1 + 2 * facts.num_layers
    assert torch.equal(out[0], want)
    assert out[1].shape == (1, facts.num_kv_heads, 7, facts.head_dim)


def test_facts_of_the_tiny_llama(tiny_model):
    f = cl.generation_facts(tiny_model)
    assert (f.num_layers, f.num_attention_heads, f.num_kv_heads, f.head_dim, f.vocab_size) == (2, 4, 2, 16, 256)
    assert f.tied_embeddings and f.eos_token_ids == (2,) and f.bos_token_id == 1 and f.max_positions == 512
    assert cl.CausalLMFacts.from_dict(json.loads(json.dumps(f.as_dict()))) == f


def test_a_module_that_is_not_a_causal_lm_is_refused(tmp_path):
    with pytest.raises(InputError, match="not a transformers causal LM"):
        cl.export_causal_lm(torch.nn.Linear(4, 4), tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_a_folded_copy_of_the_tied_table_is_replaced_by_a_transpose():
    """If constant folding stored the output layer as table^T, the copy goes and a Transpose reads the table."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((16, 4)).astype(np.float32)
    x = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, 3]))
    t = ir.Value(name="table", const_value=ir.tensor(table, name="table"))
    tt = ir.Value(name="table_t", const_value=ir.tensor(np.ascontiguousarray(table.T), name="table_t"))
    gather = ir.node("Gather", [t, x], attributes={"axis": 0})
    mm = ir.node("MatMul", [gather.outputs[0], tt])
    mm.outputs[0].name = "logits"
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[gather, mm], initializers=[t, tt], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    facts = cl.CausalLMFacts("llama", 1, 1, 1, 4, 4, 16, None, None, (), None, True, False, False)
    assert "removed" in cl._tied_storage(model, facts)
    assert list(model.graph.initializers) == ["table"]
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString())
    ids = np.array([[1, 5, 9]], np.int64)
    np.testing.assert_array_equal(sess.run(None, {"input_ids": ids})[0], table[ids] @ table.T)


@pytest.mark.slow
def test_export_names_dims_and_metadata(tiny_onnx):
    path, res = tiny_onnx
    m = onnx.load(str(path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*m.graph.input, *m.graph.output]}
    assert list(dims) == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                          "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value",
                          "logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert dims["input_ids"] == dims["position_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert dims["logits"] == ["batch", "sequence", 256]
    assert dims["present.0.key"] == ["batch", 2, "total_sequence", 16]
    assert m.opset_import[0].version == 21
    meta = {p.key: p.value for p in m.metadata_props}
    facts = cl.read_facts(meta)
    assert facts == res.facts and facts.has_tokenizer and facts.has_chat_template
    files = cl.read_tokenizer_files(meta)
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    assert meta[cl.SOURCE_KEY] == "folder tiny-llama-hf"


@pytest.mark.slow
def test_export_matches_torch_at_empty_and_real_past(tiny_onnx):
    _, res = tiny_onnx
    feeds = {c.feed for c in res.checks}
    assert any(f.startswith("prefill (past 0") for f in feeds)
    assert any(f.startswith("decode (past") for f in feeds) and any(f.startswith("chunk (past") for f in feeds)
    assert all(c.sqnr_db >= MIN_SQNR_DB for c in res.checks), [(c.feed, c.output, c.sqnr_db) for c in res.checks]


@pytest.mark.slow
def test_prefill_then_decode_in_ort_equals_one_torch_pass(tiny_onnx, tiny_model):
    """ORT with its own cache (prefill 6 tokens, then 1 + 3 tokens) vs one torch forward over all 10."""
    path, _ = tiny_onnx
    facts = cl.generation_facts(tiny_model)
    sess = ort.InferenceSession(str(path))
    names = [o.name for o in sess.get_outputs()]
    ids = np.array([[7, 33, 250, 4, 90, 18, 200, 61, 5, 128]], np.int64)
    past, got = cl.empty_cache(facts), []
    for chunk in (ids[:, :6], ids[:, 6:7], ids[:, 7:]):
        out = dict(zip(names, sess.run(names, cl.step_feed(chunk, past))))
        got.append(out["logits"])
        past = {p: out[o] for p, o in zip(cl.past_names(2), cl.present_names(2))}
    with torch.no_grad():
        want = tiny_model(torch.from_numpy(ids)).logits.numpy()
    assert sqnr_db(want, np.concatenate(got, axis=1)) >= MIN_SQNR_DB


@pytest.mark.slow
def test_tied_table_is_stored_once(tiny_onnx, tiny_model):
    path, res = tiny_onnx
    m = onnx.load(str(path))
    table = tiny_model.get_input_embeddings().weight.detach().numpy()
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    same = [n for n, a in inits.items() if a.shape in (table.shape, table.T.shape)
            and (np.array_equal(a, table) or np.array_equal(a, table.T))]
    assert len(same) == 1, same
    readers = sorted(n.op_type for n in m.graph.node if same[0] in n.input)
    assert readers == ["Gather", "Transpose"]
    assert res.tied_storage == "one initializer: Gather + Transpose→MatMul"
