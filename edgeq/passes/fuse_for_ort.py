"""Fuse a transformer's small ops into the kernels ONNX Runtime has, with onnxscript's ORT fusions.

Rules (onnxscript ``rewriter.ort_fusions``, applied in its order): RMSNorm →
``SimplifiedLayerNormalization``, residual Add + RMSNorm → ``SkipSimplifiedLayerNormalization``
(LayerNorm too), rotary position embedding → ``RotaryEmbedding`` (and its cos/sin cache),
scaled dot-product attention → ``GroupQueryAttention`` (rotary inside, shared key/value heads) or
``MultiHeadAttention``, GELU → ``Gelu``/``BiasGelu``. Where onnxscript's rules miss what torch's
exporter and transformers 5 write, :mod:`edgeq.passes.ort_llm_rules` adds variants of them (the
rotary cos/sin cache, GQA only under a causal mask) and packs the query/key/value projections into
one MatMul as onnxruntime-genai does; symbolic dims are spelled one way first (onnxscript compares
them as strings). Every fusion is exact in float up to the kernels' rounding (the tests check ≥ 60
dB; ~117 dB measured on SmolLM2).

What it leaves alone, and why: onnxscript's own ``optimize_for_ort`` also runs its generic
optimizer (constant folding without a guard for shared weights) and the ``FusedMatMul`` rules,
which turn the output layer's ``Transpose → MatMul`` into a ``FusedMatMul`` — then the embedding
table tied to it could no longer be stored once. Those two steps are skipped; unused nodes are
removed and fusion helper functions inlined instead. Last, :mod:`edgeq.passes.fold_scalings` moves
the input scalings' (AWQ) per-channel Muls into the fused norms' weights and the projections' scales
(one kernel call less each, per token). Nor does it run onnxscript's packed
``Attention`` rule (BERT-style): it concatenates the query/key/value weights into an input of the
contrib op, where no quantized weight can go (a DequantizeLinear there would run every time);
``MultiHeadAttention`` with its bias keeps the three projections as MatMuls, quantized as usual.

Where it runs (ONNX Runtime profiles, ``edgeq.pipeline.quantize.fused_after_quantization``): on the quantized
graph, after the plan was made and applied on the portable one — a causal language model on every ONNX Runtime
profile, any other model (BERT-like encoders: ``SkipLayerNormalization``, ``MultiHeadAttention``, ``BiasGelu``)
on the android profile. Weight-only recipes put no Q/DQ on attention or normalization, and the quantized
MatMuls stay in place (a causal LM's query/key/value DequantizeLinears are packed into one, their integers side
by side), so one calibration and one set of integers serve the Core ML package too.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import onnx_ir as ir
import onnx_ir.passes.common as common_passes


@dataclasses.dataclass
class FuseForOrtResult(ir.passes.PassResult):
    fused: dict[str, int] = dataclasses.field(default_factory=dict)  # fusion -> how many times it applied
    ops: dict[str, int] = dataclasses.field(default_factory=dict)  # com.microsoft op types made


def canonical_sum_dims(model: ir.Model) -> int:
    """Spell every symbolic dimension that is a sum of names one way (terms sorted); how many changed.

    onnxscript's fusions compare symbolic dimensions as strings, and torch's exporter writes the
    same sum in either order (SmolLM2: ``past_sequence + sequence`` on most layers, ``sequence +
    past_sequence`` on 6 of 30, whose attention then failed to fuse). Only sums are rewritten —
    no symbolic-algebra library is a dependency, and the exporter writes no other expressions here.
    """
    changed = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for v in node.outputs:
            if v.shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value and "+" in d.value
                                          for d in v.shape):
                continue
            dims = [ir.SymbolicDim(_sorted_sum(d.value)) if isinstance(d, ir.SymbolicDim) and d.value else d
                    for d in v.shape]
            if [getattr(d, "value", d) for d in dims] != [getattr(d, "value", d) for d in v.shape]:
                v.shape = ir.Shape(dims)
                changed += 1
    return changed


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


def _sorted_sum(expr: str) -> str:
    terms = [t.strip() for t in expr.split("+")]
    if len(terms) < 2 or not all(_NAME.fullmatch(t) for t in terms):
        return expr
    return " + ".join(sorted(terms))


class FuseForOrtPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> FuseForOrtResult:
        from onnxscript.rewriter._fusion_utils import apply_fusion_rules
        from onnxscript.rewriter.ort_fusions import shape_optimization
        from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
        from onnxscript.rewriter.ort_fusions.cos_sin_cache import fuse_cos_sin_cache
        from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
        from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
        from onnxscript.rewriter.ort_fusions.gqa_packed_qkv import fuse_qkv_gqa
        from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
        from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
        from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
        from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
        from onnxscript.rewriter.ort_fusions.rotary_embedding import (
            fuse_partial_rotary_embedding,
            fuse_rotary_embedding,
        )
        from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
        from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha
        from onnxscript.rewriter.ort_fusions.skip_normalization import (
            fuse_skip_layer_normalization,
            fuse_skip_rms_normalization,
        )

        from edgeq.passes import ort_llm_rules as llm
        from edgeq.passes.fold_scalings import FoldScalingsPass

        before = collections.Counter((n.domain, n.op_type) for n in model.graph)
        common_passes.ShapeInferencePass()(model)
        canonical_sum_dims(model)
        shape_optimization.rules.apply_to_model(model)
        fused = {}
        for name, fn, kwargs in (
            ("erf_gelu", fuse_erfgelu, {}), ("rms_normalization", fuse_rms_normalization, {}),
            ("skip_layer_normalization", fuse_skip_layer_normalization, {}),
            ("skip_rms_normalization", fuse_skip_rms_normalization, {}),
            ("rotary_embedding", fuse_rotary_embedding, {}), ("cos_sin_cache", fuse_cos_sin_cache, {}),
            ("cos_sin_cache_from_mul", apply_fusion_rules(llm.cos_sin_cache_rules), {}),
            ("partial_rotary_embedding", fuse_partial_rotary_embedding, {}),
            ("sdpa", fuse_sdpa, {"apply_shape_inference": True}),
            ("gqa", apply_fusion_rules(llm.gqa_rules), {}),  # onnxscript's rule, with a working mask check
            ("pack_qkv_projections", apply_fusion_rules(llm.pack_qkv_rules), {"apply_shape_inference": True}),
            ("packed_qkv_for_gqa", fuse_qkv_gqa, {}), ("mha1", fuse_mha1, {}), ("mha2", fuse_mha2, {}),
            ("mha_scale", fuse_mha_scale, {}),
        ):
            fused[name] = fn(model, **kwargs)
        if fused["mha1"] or fused["mha2"]:
            fused["mha_bias"] = fuse_mha_bias(model)
        fused["gelu"] = fuse_gelu(model)
        fused["bias_gelu"] = fuse_bias_gelu(model)
        fused["sdpa_via_mha"] = replace_sdpa_by_mha(model)
        common_passes.InlinePass()(model)  # fusion helper functions nothing consumed
        # one copy of what every fused layer computes alike (GQA's sequence lengths from position_ids)
        common_passes.CommonSubexpressionEliminationPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.RemoveUnusedFunctionsPass()(model)
        # the fusions' small constants (axes, shapes) as initializers, like the import stage leaves them
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        # the scalings' and protection masks' Muls into the fused norms' weights and the projections' scales
        folded = FoldScalingsPass()(model).folded
        fused.update({f"fold_scaling_into_{k}": v for k, v in folded.items()})
        after = collections.Counter((n.domain, n.op_type) for n in model.graph)
        made = {op: k for (domain, op), k in after.items() if k > before.get((domain, op), 0) and
                op not in ("Reshape", "Transpose", "Concat", "Shape", "Gather", "Unsqueeze", "Slice")}
        return FuseForOrtResult(model, modified=any(fused.values()), fused={k: v for k, v in fused.items() if v},
                                ops=made)
