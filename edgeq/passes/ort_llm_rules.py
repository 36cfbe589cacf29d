"""Variants of onnxscript's ORT fusion rules for the graphs torch 2.9+ and transformers 5 export.

onnxscript's rules (``rewriter.ort_fusions``) were written against earlier exports. Two of their
patterns miss a current export of a Llama-style decoder, and these rules cover the difference
while reusing onnxscript's own rule classes (their rewrites, and every check that still applies):

- **rotary cos/sin cache** (``CosSinCacheFusion``): transformers computes the angles as
  ``inv_freq[1,E,1] @ position_ids[B,1,S]`` then transposes; the exporter turns this
  rank-1 product into ``Cast(Unsqueeze(position_ids, -1)) * inv_freq`` — no MatMul, no Transpose.
- **GroupQueryAttention** (``GroupQueryAttention``): the fused op takes the sequence lengths from
  ``position_ids`` and drops the attention mask, so the mask must be the plain causal + padding
  mask. onnxscript 0.7's rule means to check that but does not (it tests its mask match ``is
  None``; a failed match is a falsy result, not None) and it knows only the mask older transformers
  built (Trilu/Add/Equal). Here the mask must match either that pattern or the one transformers 5
  builds, ``Where(And(kv_index <= query_index, attention_mask[b, kv_index]), 0, lowest)``; a
  sliding-window or other extra term in the mask does not match and the layer is not fused. Like
  onnxscript's rule, the fused op ignores padding in ``attention_mask``: right for the unpadded
  batches edgeq's generate loop and validation run, not for left-padded batches.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.ort_fusions import gqa
from onnxscript.rewriter.ort_fusions.cos_sin_cache import CosSinCacheFusion


class CosSinCacheFromMul(CosSinCacheFusion):
    """The rotary angles as ``Cast(Unsqueeze(position_ids, [-1])) * inv_freq`` ([B, S, E]) → ORT's
    ``RotaryEmbedding(x, position_ids, cos_cache, sin_cache)``; the cache is built as onnxscript builds it."""

    def __init__(self):
        super().__init__("CosSinCacheFromMul")

    def pattern(self, op, x, inv_freq, position_ids, interleaved, num_heads, axes):
        positions = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)  # [B, S, 1]
        freqs = op.Mul(positions, inv_freq)  # [B, S, E]
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), [1])
        sin = op.Unsqueeze(op.Sin(emb), [1])
        return op.RotaryEmbedding(x, cos, sin, interleaved=interleaved, num_heads=num_heads,
                                  _domain="ai.onnxruntime._fusion")

    def check(self, context, inv_freq, position_ids, axes, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not _ir_utils.has_rank(position_ids, 2):
            return result.fail("position_ids is not [batch, sequence]", position_ids)
        if not (_ir_utils.is_singleton_value(axes, 2) or _ir_utils.is_singleton_value(axes, -1)):
            return result.fail("position_ids are not unsqueezed on their last axis", axes)
        freq = inv_freq.const_value
        if freq is None or freq.dtype != ir.DataType.FLOAT:
            return result.fail("inv_freq is not a float constant", inv_freq)
        if freq.numpy().size != freq.numpy().shape[-1]:
            return result.fail("inv_freq is not a vector [E] (or [1, 1, E])", inv_freq)
        return result

    def rewrite(self, op, x, inv_freq, position_ids, interleaved, num_heads, **_):
        return super().rewrite(op, x, inv_freq, position_ids, interleaved, num_heads, freqs=None, dtype=None)


cos_sin_cache_rules = pattern.RewriteRuleSet([CosSinCacheFromMul.rule()], commute=True)


def _is_model_input(value: ir.Value | None, name: str, model: ir.Model) -> bool:
    return value is not None and value.name == name and value in model.graph.inputs


def _from_range(value: ir.Value | None) -> bool:
    """``value`` is a Range (plus an offset), possibly unsqueezed or reshaped: a token index."""
    while value is not None and value.producer() is not None:
        node = value.producer()
        if node.op_type == "Range":
            return True
        if node.op_type not in ("Unsqueeze", "Reshape", "Add", "Cast"):
            return False
        value = node.inputs[0]
    return False


class _CausalPaddingMask(pattern.PatternBase):
    """transformers 5's additive mask: 0 where ``kv_index <= query_index`` and the key is not padding."""

    def pattern(self, op, kv_index, query_index, true, attention_mask, indices, shape, zero, lowest):
        causal = op.LessOrEqual(kv_index, query_index)
        causal = pattern.OrValue([op.And(true, causal), causal])
        padding = op.GatherND(op.Cast(attention_mask, to=ir.DataType.BOOL), indices, batch_dims=0)
        allowed = op.And(causal, padding)
        allowed = pattern.OrValue([op.Expand(allowed, shape), allowed])
        return op.Where(allowed, zero, lowest)

    def check(self, context, kv_index, query_index, attention_mask, zero, lowest, true=None, **_):
        result = pattern.MatchResult()
        if not _is_model_input(attention_mask, "attention_mask", context.model):
            return result.fail("the padding is not read from the model input attention_mask", attention_mask)
        if not (_from_range(kv_index) and _from_range(query_index)):
            return result.fail("the causal comparison is not between token indices", [kv_index, query_index])
        if true is not None and not _ir_utils.is_singleton_value(true, True):
            return result.fail("the causal term is combined with something other than True", true)
        if _ir_utils.get_singleton_value(zero) != 0:
            return result.fail("allowed positions do not add 0", zero)
        low = _ir_utils.get_singleton_value(lowest)
        if low is None or not (low == -np.inf or low == np.finfo(np.float32).min):
            return result.fail("masked positions do not add the lowest float", lowest)
        return result


_causal_padding_mask = _CausalPaddingMask()


class GroupQueryAttentionCausal(gqa.GroupQueryAttention):
    """onnxscript's GQA rule, fused only where the mask is the causal + padding mask (see above)."""

    def check(self, context, mask, **kwargs):
        node = mask.producer() if mask is not None else None
        if node is None:
            return pattern.MatchResult().fail("no attention mask", mask)
        if not any(p.match(context.model, context.graph_or_function, node, check_nodes_are_removable=False)
                   for p in (_causal_padding_mask, gqa._causal_mask_pattern)):
            return pattern.MatchResult().fail("the attention mask is not the causal + padding mask", mask)
        return super().check(context, mask=mask, **kwargs)


gqa_rules = pattern.RewriteRuleSet([GroupQueryAttentionCausal.rule()])
