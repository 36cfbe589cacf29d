"""A tiny Llama written as a GGUF file (Q4_0, Q4_1, Q8_0 and one Q6_K tensor) and its float reference.

The file is written with the ``gguf`` package's writer the way llama.cpp's converter lays a Llama
out (``blk.N.attn_q.weight`` …, q/k rows permuted for its RoPE); the float model is those integers
dequantized (q/k rows permuted back), as transformers loads a GGUF. A Q6_K tensor is made of
fixed random bytes (the gguf package writes no K-quants) with a sane super-scale.
"""

from __future__ import annotations

import numpy as np
import torch

HEADS, KV_HEADS = 4, 2
# per layer: the GGUF type of each projection (down_proj's input dimension, 256, fits one Q6_K super-block)
LAYER_TYPES = (
    {"attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q4_1",
     "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q6_K"},
    {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1", "attn_output": "Q4_0",
     "ffn_gate": "Q8_0", "ffn_up": "Q4_1", "ffn_down": "Q4_1"},
)
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
EMBEDDING_TYPE = "Q8_0"
# every projection of a type edgeq keeps, q/k/v of one type per layer
KEPT_LAYER_TYPES = (
    {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1", "attn_output": "Q4_0",
     "ffn_gate": "Q4_1", "ffn_up": "Q8_0", "ffn_down": "Q4_1"},
    {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_0", "attn_output": "Q4_1",
     "ffn_gate": "Q8_0", "ffn_up": "Q4_1", "ffn_down": "Q4_0"},
)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k (each head's rotary halves interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q6_k(rows: int, k: int, rng) -> np.ndarray:
    """Random Q6_K bytes [rows, k/256 · 210]: ql, qh, int8 sub-scales, then a float16 super-scale of 1e-3."""
    blocks = rng.integers(0, 256, (rows, k // 256, 210), dtype=np.uint8)
    blocks[..., 192:208] = rng.integers(1, 40, (rows, k // 256, 16), dtype=np.uint8)  # positive sub-scales
    blocks[..., 208:210] = np.array([1e-3], np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def tiny_gguf(path, seed: int = 0, scale: float = 10.0, layer_types=LAYER_TYPES):
    """Write the GGUF to ``path``; return the float reference (a transformers Llama) and {GGUF tensor: type}.

    ``layer_types``: per layer, the GGUF type of each projection (:data:`LAYER_TYPES`, :data:`KEPT_LAYER_TYPES`).
    """
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=len(layer_types),
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    params = dict(model.named_parameters())
    writer = gguf.GGUFWriter(str(path), "llama")
    types = {}

    def put(name: str, hf_name: str, qtype: str, heads: int | None = None):
        w = params[hf_name].detach().numpy().astype(np.float32) * scale
        rows = permute(w, heads) if heads else w
        kind = gguf.GGMLQuantizationType[qtype]
        raw = _q6_k(*rows.shape, rng) if qtype == "Q6_K" else gguf.quants.quantize(rows, kind)
        values = gguf.quants.dequantize(raw, kind).reshape(rows.shape).astype(np.float32)
        with torch.no_grad():
            params[hf_name].copy_(torch.from_numpy(unpermute(values, heads) if heads else values))
        writer.add_tensor(name, raw, raw_dtype=kind)
        types[name] = qtype

    put("token_embd.weight", "model.embed_tokens.weight", EMBEDDING_TYPE)
    for i, layer in enumerate(layer_types):
        for short, qtype in layer.items():
            heads = HEADS if short == "attn_q" else KV_HEADS if short == "attn_k" else None
            put(f"blk.{i}.{short}.weight", f"model.layers.{i}.{HF_NAMES[short]}.weight", qtype, heads)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.tie_weights()
    return model, types
