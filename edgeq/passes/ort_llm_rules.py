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

And one rule onnxscript has no counterpart for: **packing the query, key and value projections**
(:class:`PackQKVProjections`) into one MatMul whose output onnxscript's ``fuse_qkv_gqa`` then feeds
to GroupQueryAttention packed, as onnxruntime-genai's builder writes it (one weight read per layer
instead of three; 1 kernel instead of 3 at decode). onnxscript's rule only recognizes an already
packed projection; it never concatenates weights. It packs float weights and, on a quantized graph,
weight-only DequantizeLinears (their integers, scales and zero points side by side), so the fusion
can run after quantization and the packed weight holds the very integers the unfused graph (and the
Core ML package made from it) holds.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.ort_fusions import gqa
from onnxscript.rewriter.ort_fusions.cos_sin_cache import CosSinCacheFusion

from edgeq import meta

PACKED_SOURCE = " + "  # the edgeq.source of a packed projection's DequantizeLinear: its three MatMuls, in column order


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
        # key positions along the last axis, query positions along the one before: kv <= q is causal
        if not (_ir_utils.get_dim(query_index, -1) == 1 and _ir_utils.get_dim(kv_index, -2) == 1
                and _ir_utils.get_dim(kv_index, -1) != 1):
            return result.fail("the comparison is not key index (columns) <= query index (rows)",
                               [kv_index, query_index])
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


def _projection_weight(w: ir.Value) -> tuple[list[np.ndarray], dict] | str:
    """A projection's weight ``[K, N]`` as arrays to concatenate along N (its float value, or a weight-only
    DequantizeLinear's integers, scale and zero point) and the attributes of that DequantizeLinear; or why not."""
    if w.const_value is not None:
        t = w.const_value
        if t.dtype != ir.DataType.FLOAT or len(t.shape) != 2:
            return "not a float 2-D constant"
        return [t.numpy()], {}
    node = w.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return "neither a constant nor a DequantizeLinear of one"
    if len(w.uses()) != 1 or any(v is None or v.const_value is None or len(v.uses()) != 1 for v in node.inputs):
        return "its DequantizeLinear reads values other than its own constants"
    arrays = [v.const_value.numpy() for v in node.inputs]
    attrs = {k: a.value for k, a in node.attributes.items()}
    data, scale = arrays[0], arrays[1]
    axis = attrs.get("axis", 1) % 2 if data.ndim == 2 else None
    blocked = attrs.get("block_size") and axis == 0 and scale.ndim == 2
    per_column = not attrs.get("block_size") and axis == 1 and scale.ndim == 1
    if data.ndim != 2 or not (blocked or per_column):
        return "not blocks along K or one scale per output column"
    return arrays, attrs


def _concat_columns(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays of three projections side by side: a [K, N] weight or a [K/block, N] scale along N, a
    per-column [N] scale along its only axis."""
    return np.concatenate(arrays, axis=arrays[0].ndim - 1)


class PackQKVProjections(pattern.RewriteRuleClassBase):
    """``GQA(x @ Wq, x @ Wk, x @ Wv, ...)`` → ``qkv = x @ [Wq|Wk|Wv]`` and three Slices of it (which
    onnxscript's ``fuse_qkv_gqa`` folds into a packed GroupQueryAttention).

    The weights are float constants, or (on a quantized graph) each the DequantizeLinear of its own
    integers with the same format: then the packed weight is one DequantizeLinear of the three's integers,
    scales and zero points side by side, which ONNX Runtime fuses into one MatMulNBits. Exact either way:
    every output column is the same dot product, and blocks run along the input axis, per output column,
    so the packed integers are the three projections' own, bit for bit.
    """

    def pattern(self, op, x, wq, wk, wv, past_key, past_value, seqlens_k, total_seq_length, cos, sin):
        return op.GroupQueryAttention(op.MatMul(x, wq), op.MatMul(x, wk), op.MatMul(x, wv), past_key, past_value,
                                      seqlens_k, total_seq_length, cos, sin, _domain="com.microsoft",
                                      _allow_other_attributes=True, _outputs=["attention", "present_key",
                                                                              "present_value"])

    def check(self, context, wq, wk, wv, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        parts = [_projection_weight(w) for w in (wq, wk, wv)]
        why = next((p for p in parts if isinstance(p, str)), None)
        if why is not None:
            return result.fail(f"a projection weight is {why}", [wq, wk, wv])
        arrays = [p[0] for p in parts]
        if len({repr(p[1]) for p in parts}) != 1 or len({len(a) for a in arrays}) != 1:
            return result.fail("the projections are stored in different formats", [wq, wk, wv])
        if any(len({a[i].dtype for a in arrays}) != 1 for i in range(len(arrays[0]))):
            return result.fail("the projections are stored in different types", [wq, wk, wv])
        if len({a[0].shape[0] for a in arrays}) != 1:
            return result.fail("the projections have different input sizes", [wq, wk, wv])
        if any(a[i].shape[:-1] != arrays[0][i].shape[:-1] for a in arrays for i in range(1, len(a))):
            return result.fail("the projections' scales have different layouts", [wq, wk, wv])
        if any(len(w.uses()) != 1 for w in (wq, wk, wv)):
            return result.fail("a projection weight is read elsewhere too", [wq, wk, wv])
        return result

    def rewrite(self, op, x, wq, wk, wv, past_key, past_value, seqlens_k, total_seq_length, cos, sin,
                attention, **_):
        parts = [_projection_weight(w) for w in (wq, wk, wv)]
        attrs = parts[0][1]
        name = (wq.producer().inputs[0].name if attrs else wq.name) + "_qkv_packed"
        suffixes = ("", "_scale", "_zero_point")
        packed = [op.initializer(ir.tensor(_concat_columns([p[0][i] for p in parts]), name=name + suffixes[i]))
                  for i in range(len(parts[0][0]))]
        if attrs:
            weight = op.DequantizeLinear(*packed, **attrs)
            sources = [w.producer().metadata_props.get(meta.SOURCE, w.name) for w in (wq, wk, wv)]
            meta.mark(weight.producer(), meta.Role.WEIGHT, PACKED_SOURCE.join(sources))
            weight.dtype, weight.shape = ir.DataType.FLOAT, ir.Shape(packed[0].const_value.shape)
        else:
            weight = packed[0]
        qkv = op.MatMul(x, weight)
        bounds = np.cumsum([0] + [p[0][0].shape[1] for p in parts])
        axis, step = op.Constant(value_ints=[2]), op.Constant(value_ints=[1])  # as fuse_qkv_gqa expects them
        q, k, v = (op.Slice(qkv, op.Constant(value_ints=[int(a)]), op.Constant(value_ints=[int(b)]), axis, step)
                   for a, b in itertools.pairwise(bounds))
        return op.GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_seq_length, cos, sin,
                                      **attention.producer().attributes, _domain="com.microsoft", _outputs=3)


pack_qkv_rules = pattern.RewriteRuleSet([PackQKVProjections.rule()])
