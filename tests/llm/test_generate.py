"""The generation loop with a KV cache, and `edgeq generate`, on the tiny Llama."""

import subprocess
import sys

import pytest
import torch

from edgeq.cli import main
from edgeq.export.causal_lm import TOKENIZER_KEY
from edgeq.generate import CausalLM, load_tokenizer, prompt_ids
from edgeq.validate.runners import OnnxRunner


def _teacher_forced_argmax(model, prompt, tokens):
    """One forward pass over prompt + generated tokens: the argmax after each position."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_greedy_loop_equals_teacher_forced_argmax(torch_lm, tiny_model):
    prompt = [9, 41, 7, 200, 13]
    gen = torch_lm.generate(prompt, 20, stop_ids=[])
    assert len(gen.tokens) == 20 and len(set(gen.tokens)) > 3  # not a degenerate repetition
    assert gen.tokens == _teacher_forced_argmax(tiny_model, prompt, gen.tokens)
    assert gen.times.prefill_tokens == 5 and gen.times.decode_tokens == 19


def test_generation_stops_at_eos(torch_lm):
    prompt = [9, 41, 7, 200, 13]
    first = torch_lm.generate(prompt, 5, stop_ids=[]).tokens
    gen = torch_lm.generate(prompt, 5, stop_ids=[first[2]])
    assert gen.tokens == first[:3] and gen.stopped_by == "eos"


@pytest.mark.slow
def test_onnx_greedy_loop_equals_teacher_forced_argmax(tiny_onnx, tiny_model):
    lm = CausalLM(OnnxRunner(tiny_onnx[0]))
    assert lm.eos_token_ids == (2,)
    prompt = [9, 41, 7, 200, 13]
    gen = lm.generate(prompt, 24, stop_ids=[])
    assert gen.tokens == _teacher_forced_argmax(tiny_model, prompt, gen.tokens)


@pytest.mark.slow
def test_cli_generate_with_the_tokenizer_from_the_metadata(tiny_onnx, tiny_model, capsys):
    path, _ = tiny_onnx
    assert main(["generate", str(path), "--prompt", "w5 w6 w7", "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    lm = CausalLM(OnnxRunner(path))
    tok, source = load_tokenizer(path, lm.metadata)
    assert source == f"the model's metadata ({TOKENIZER_KEY})"
    ids = prompt_ids(tok, "w5 w6 w7")
    assert ids == [1, 5, 6, 7, 2, 1]  # the chat template: <s> w5 w6 w7 </s> <s>
    want = lm.generate(ids, 8, stop_ids=[2]).tokens
    assert out.strip() == tok.decode([t for t in want if t != 2], skip_special_tokens=True)
    assert "prefill 6 tokens" in err and "tokens/s" in err


@pytest.mark.slow
def test_ort_format_keeps_the_metadata_and_generates_the_same(tiny_onnx, tmp_path):
    """The .ort conversion carries metadata: a .ort finds its facts and tokenizer like its ONNX."""
    from targets.android.runner import OrtFormatRunner

    path, _ = tiny_onnx
    subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(path),
                    "--output_dir", str(tmp_path), "--optimization_style", "Fixed"], check=True, capture_output=True)
    ort_lm = CausalLM(OrtFormatRunner(tmp_path / "tiny.ort"))
    onnx_lm = CausalLM(OnnxRunner(path))
    assert ort_lm.facts == onnx_lm.facts and TOKENIZER_KEY in ort_lm.metadata
    prompt = [9, 41, 7, 200, 13]
    assert ort_lm.generate(prompt, 16, stop_ids=[]).tokens == onnx_lm.generate(prompt, 16, stop_ids=[]).tokens


def test_a_tokenizer_beside_the_model_wins(tmp_path):
    from tiny_llama import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    tok, source = load_tokenizer(tmp_path / "model.ort", {TOKENIZER_KEY: "not read"})
    assert source == str(tmp_path / "tokenizer.json") and tok("w9").input_ids == [9]


@pytest.mark.slow
def test_a_tokenizer_of_another_model_is_refused(tiny_onnx, tmp_path, capsys):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "big": 999}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
    shutil.copy(tiny_onnx[0], tmp_path / "tiny.onnx")
    assert main(["generate", str(tmp_path / "tiny.onnx"), "--prompt", "big", "--no-chat"]) == 2
    assert "gives token id 999, but tiny.onnx has a vocabulary of 256" in capsys.readouterr().err
