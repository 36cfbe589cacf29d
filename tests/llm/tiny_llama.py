"""A tiny randomly initialised Llama (transformers) and a word-level tokenizer for it, built in code."""

from __future__ import annotations

import numpy as np
import torch

VOCAB = 256
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> {% endif %}")


def tiny_llama(seed: int = 0, scale: float = 10.0):
    """2 layers, hidden 64, 4 query heads sharing 2 KV heads, vocabulary 256, tied embeddings.

    ``scale`` multiplies the random weight matrices (the default init gives nearly flat distributions
    and repeated greedy tokens; x10 gives peaked, input-dependent ones).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(scale)
    return model


def tiny_tokenizer():
    """Word-level: <unk>, <s>, </s>, then the words w3 .. w255 (split on whitespace), a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=CHAT_TEMPLATE)


def write_texts(folder, facts, texts):
    """One ``.npz`` feed per token list in ``folder`` (an empty cache: each text starts a sequence)."""
    from edgeq.export.causal_lm import empty_cache, step_feed

    folder.mkdir()
    for i, ids in enumerate(texts):
        np.savez(folder / f"text{i:02d}.npz", **step_feed(np.asarray([ids]), empty_cache(facts)))
    return folder


def torch_causal_lm(model):
    from edgeq.export.causal_lm import LOGITS, generation_facts, input_specs, present_names, step_module
    from edgeq.generate import CausalLM
    from edgeq.validate.runners import TorchRunner

    facts = generation_facts(model)
    runner = TorchRunner(step_module(model), input_specs=input_specs(facts),
                         output_names=[LOGITS, *present_names(facts.num_layers)], label="tiny llama (torch)")
    return CausalLM(runner, facts)


def texts(n: int = 6, seed: int = 3) -> list[list[int]]:
    """Fixed random token sequences of a few lengths."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, int(rng.integers(5, 24))).tolist() for _ in range(n)]
