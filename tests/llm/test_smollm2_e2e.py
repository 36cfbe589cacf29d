"""SmolLM2-135M-Instruct end to end: export with the cache, generation, LLM validation (real model)."""

import json

import numpy as np
import onnx
import pytest

from edgeq.cli import main
from edgeq.export.causal_lm import read_facts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_sample_texts_are_disjoint_and_start_at_position_0():
    from samples.smollm2 import SmolLM2Sample, calibration_texts, evaluation_texts

    assert not set(calibration_texts()) & set(evaluation_texts())
    assert len(evaluation_texts()) == 100
    s = SmolLM2Sample()
    for split in ("calibration", "evaluation"):
        feeds = s.feeds(split, count=3)
        assert all(f["position_ids"][0, 0] == 0 and f["past_key_values.0.key"].shape[2] == 0 for f in feeds)
    assert sum(f["input_ids"].shape[1] for f in s.feeds("evaluation")) == 1555
    assert sum(f["input_ids"].shape[1] for f in s.feeds("evaluation", group=1)) == 1571


def test_export_matches_torch_and_keeps_the_table_tied(smollm2_onnx, e2e_dir):
    report = json.loads((e2e_dir / "smollm2.export.json").read_text())
    assert {c["feed"].split(" (")[0] for c in report["checks"]} == {"example", "prefill", "chunk", "decode"}
    assert min(c["sqnr_db"] for c in report["checks"]) >= 100  # measured 116-136 dB
    assert report["tied_storage"] == "one initializer: Gather + Transpose→MatMul"
    m = onnx.load(str(smollm2_onnx), load_external_data=False)
    facts = read_facts({p.key: p.value for p in m.metadata_props})
    assert (facts.num_layers, facts.num_kv_heads, facts.head_dim, facts.vocab_size) == (30, 3, 64, 49152)
    assert facts.eos_token_ids == (2,) and facts.has_chat_template and facts.tied_embeddings
    tables = [i for i in m.graph.initializer if list(i.dims) in ([49152, 576], [576, 49152])]
    assert len(tables) == 1


def test_generate_answers_paris(smollm2_onnx, capsys):
    assert main(["generate", str(smollm2_onnx), "--prompt", "What is the capital of France?"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "The capital of France is Paris."
    assert "tokens/s" in err


def test_validate_the_float_onnx_against_torch(smollm2_onnx, tmp_path):
    """The float ONNX is the torch model: same perplexity, same argmax, same greedy answers."""
    out = tmp_path / "v.json"
    assert main(["validate", str(smollm2_onnx), "--reference", "smollm2", "--max-perplexity-ratio", "1.001",
                 "--min-top1-agreement", "0.999", "--min-greedy-agreement", "1.0", "--max-kld", "1e-6",
                 "--json", str(out), "--no-progress"]) == 0
    m = json.loads(out.read_text())["candidates"][0]["task"]
    assert m["tokens"] == 1545 and m["perplexity"] == pytest.approx(61.69, rel=5e-3)
    assert np.isclose(m["perplexity"], m["reference_perplexity"], rtol=1e-4)


def test_the_gguf_loader_gives_the_sample_weights():
    """`edgeq export model.gguf` reads the file like the sample's cached folder does (same fp32 weights)."""
    import torch

    from edgeq.export.causal_lm import is_causal_lm_source, load_causal_lm
    from samples.smollm2 import SmolLM2Sample, gguf_path

    assert is_causal_lm_source(gguf_path())
    direct = load_causal_lm(gguf_path())
    cached = SmolLM2Sample().load_causal_lm()
    a, b = direct.model.state_dict(), cached.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert direct.tokenizer.chat_template == cached.tokenizer.chat_template
    assert direct.source == "gguf SmolLM2-135M-Instruct.Q4_1.gguf"
