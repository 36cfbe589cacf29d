"""LLM validation metrics on the tiny Llama (torch step module behind the runner interface)."""

import numpy as np
import pytest
import torch
from tiny_llama import texts, tiny_llama, torch_causal_lm

from edgeq.errors import InputError
from edgeq.export.causal_lm import empty_cache, generation_facts, step_feed
from edgeq.validate import llm


def test_perplexity_is_exp_of_the_mean_nll(torch_lm, tiny_model):
    seqs = texts()
    nll, n = 0.0, 0
    for ids in seqs:  # independently: torch's cross entropy on the plain forward
        with torch.no_grad():
            logits = tiny_model(torch.tensor([ids])).logits[0, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        n += len(ids) - 1
    assert llm.perplexity(torch_lm, seqs) == pytest.approx(np.exp(nll / n), rel=1e-6)


def test_a_model_against_itself(torch_lm, tiny_model):
    report = llm.validate_causal_lm(torch_lm.runner, [torch_causal_lm(tiny_model).runner], texts(),
                                    prompts=[[5, 6, 7], [100, 3]], max_new_tokens=8, progress=False)
    m = report.candidates[0].task
    assert m["kld_mean"] == 0.0 and m["kld_max"] == 0.0
    assert m["top1_agreement"] == 1.0 and m["perplexity_ratio"] == 1.0
    assert m["greedy_agreement"] == 1.0 and m["greedy_equal"] == 2
    assert m["tokens"] == sum(len(s) - 1 for s in texts())


def test_a_perturbed_copy_differs(torch_lm):
    noisy = tiny_llama()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.ndim == 2:
                p.add_(0.05 * p.std() * torch.randn_like(p))
    th = llm.LLMThresholds(max_perplexity_ratio=1.5, max_kld=1e-9, min_top1_agreement=0.5)
    report = llm.validate_causal_lm(torch_lm.runner, [torch_causal_lm(noisy).runner], texts(),
                                    prompts=[[5, 6, 7]], max_new_tokens=8, thresholds=th, progress=False)
    m = report.candidates[0].task
    assert m["kld_mean"] > 0 and m["perplexity"] != m["reference_perplexity"]
    checks = {c["check"]: c["passed"] for c in report.candidates[0].checks}
    assert checks == {"perplexity_ratio": True, "kld_mean": False, "top1_agreement": True}
    assert not report.passed
    text = llm.format_llm_report(report)
    assert "FAIL kld_mean" in text and "result: FAIL" in text


def test_feeds_must_start_a_text(tiny_model):
    facts = generation_facts(tiny_model)
    whole = step_feed(np.array([[5, 6, 7, 8]]), empty_cache(facts))
    assert llm.sequences_from_feeds([whole]) == [[5, 6, 7, 8]]
    mid = dict(whole, position_ids=whole["position_ids"] + 4)
    with pytest.raises(InputError, match="does not start a text"):
        llm.sequences_from_feeds([mid])


def test_common_prefix():
    assert llm.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert llm.common_prefix([1, 2], [1, 2]) == 2
    assert llm.common_prefix([], [3]) == 0


@pytest.mark.slow
def test_cli_validate_detects_a_causal_lm(tiny_onnx, tiny_model, tmp_path, capsys):
    """`edgeq validate` on explicit-cache graphs prints the LLM metrics and applies the LLM gates."""
    from edgeq.cli import main

    path, _ = tiny_onnx
    facts = generation_facts(tiny_model)
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i, ids in enumerate(texts()):
        np.savez(feeds / f"{i}.npz", **step_feed(np.array([ids]), empty_cache(facts)))
    argv = ["validate", str(path), "--reference", str(path), "--data", str(feeds), "--no-progress"]
    assert main([*argv, "--max-perplexity-ratio", "1.0", "--min-greedy-agreement", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "pass perplexity_ratio = 1 (<= 1)" in out and "result: PASS" in out
    assert main([*argv, "--max-kld", "-1"]) == 1  # an impossible gate fails with exit code 1
