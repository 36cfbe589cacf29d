"""Fold inference BatchNormalization into the weights before it: the weights edgeq quantizes
are the folded ones, and a BatchNormalization left in the graph is a float op on every target."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import (
    RULE_NAME_TAG,
    MatchingTracer,
    MatchResult,
    MatchStatus,
    RewriteRuleClassBase,
    RewriteRuleSet,
)
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

WEIGHTED = ("Conv", "ConvTranspose", "Gemm")
_LIBRARY_RULES = RewriteRuleSet(
    [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule])


@dataclasses.dataclass
class FoldBatchNormResult(ir.passes.PassResult):
    folded: dict[str, int] = dataclasses.field(default_factory=dict)  # op folded into -> count
    prepared: int = 0  # bias Adds absorbed and MatMuls made Gemm so that a BatchNormalization could fold
    kept: tuple[tuple[str, str], ...] = ()  # (BatchNormalization name, why it stays)


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold each BatchNormalization that follows a Conv, ConvTranspose, Gemm or 2-D MatMul.

    Rules:

    1. Preparation (edgeq's rules, only where a foldable BatchNormalization reads the result):
       a per-channel constant ``Add`` after a Conv/ConvTranspose becomes the Conv's bias (paddle2onnx
       writes ``ConvTranspose → Add(bias) → BatchNormalization``); ``MatMul(x, W)`` with ``x`` of
       rank 2 and constant ``W``, alone or followed by a per-channel constant ``Add``, becomes
       ``Gemm(x, W, bias)``.
    2. onnxscript's rules fold ``BatchNormalization(Conv | ConvTranspose | Gemm)``:
       ``W' = W · γ/√(σ²+ε)`` along the output channels, ``b' = (b − μ) · γ/√(σ²+ε) + β``, when the
       weights and the BatchNormalization's parameters are initializers no other node reads.
    3. The folded node keeps the name of the weighted node it replaces.
    4. A BatchNormalization left is reported with the reason onnxscript's matcher gives, or the op
       it follows.
    """

    def call(self, model: ir.Model) -> FoldBatchNormResult:
        origin: dict[str, str] = {}  # value name -> the weighted node computing it, before the rewrites
        bn_outputs: set[str] = set()
        for bn in _batchnorms(model):
            node = _weighted_producer(bn)
            if node is not None:
                bn_outputs.add(bn.outputs[0].name)
                for v in (node.outputs[0], bn.inputs[0], bn.outputs[0]):
                    origin[v.name] = node.name
        prepared = _PREPARATION_RULES.apply_to_model(model)
        count = _LIBRARY_RULES.apply_to_model(model)
        common_passes.RemoveUnusedNodesPass()(model)
        folded: dict[str, int] = {}
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type not in WEIGHTED or RULE_NAME_TAG not in node.metadata_props:
                continue
            name = node.outputs[0].name
            if name in origin:  # the rewriter names a new node after its rule; plans use the original name
                node.name = origin[name]
            if name in bn_outputs:
                folded[node.op_type] = folded.get(node.op_type, 0) + 1
        return FoldBatchNormResult(model, modified=bool(count or prepared), folded=folded, prepared=prepared,
                                   kept=_why_kept(model))


def _batchnorms(model: ir.Model) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph)
            if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]


def _weighted_producer(bn: ir.Node) -> ir.Node | None:
    """The Conv/ConvTranspose/Gemm/MatMul whose output reaches ``bn`` (through one Add at most)."""
    node = bn.inputs[0].producer() if bn.inputs and bn.inputs[0] is not None else None
    if node is not None and node.op_type == "Add":
        node = next((p for p in (v.producer() for v in node.inputs if v is not None)
                     if p is not None and p.op_type in (*WEIGHTED, "MatMul")), None)
    return node if node is not None and node.op_type in (*WEIGHTED, "MatMul") else None


def _why_kept(model: ir.Model) -> tuple[tuple[str, str], ...]:
    tracer = MatchingTracer()  # with a tracer, the rules only match: nothing is rewritten
    _LIBRARY_RULES.apply_to_model(model, tracer=tracer)
    reasons: dict[int, str] = {}  # BatchNormalization -> why its rule's check failed
    for records in tracer.best_matches_map.values():
        for rec in records:
            if rec.status >= MatchStatus.CONDITION_FAILED and rec.match_result is not None:
                reasons.setdefault(id(rec.root_node), rec.match_result.reason)
    kept = []
    for bn in _batchnorms(model):
        producer = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if reasons.get(id(bn)):
            why = reasons[id(bn)]
        elif producer is None:
            why = "it reads a graph input or an initializer"
        elif producer.op_type in WEIGHTED:
            why = f"its {producer.op_type} {producer.name!r} does not match the folding pattern"
        else:
            why = f"it follows {producer.op_type} {producer.name!r}, which has no weights to fold into"
        kept.append((bn.name, why))
    return tuple(kept)


def _foldable_batchnorm_reads(value: ir.Value) -> bool:
    """``value`` is read only by a BatchNormalization whose parameters are constant initializers."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return False
    bn, index = uses[0]
    return (bn.op_type == "BatchNormalization" and index == 0 and len(bn.inputs) == 5
            and all(v is not None and v.is_initializer() and v.const_value is not None and not v.is_graph_input()
                    for v in bn.inputs[1:]))


def _per_channel(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``c`` as a ``[channels]`` vector if it broadcasts along axis 1 of a rank-``rank`` tensor only."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(s != 1 for i, s in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.ascontiguousarray(np.broadcast_to(c.reshape(shape[1]), (channels,)))


def _constant(v: ir.Value) -> np.ndarray | None:
    return v.const_value.numpy() if v.const_value is not None and not v.is_graph_input() else None


class _BiasAddIntoConv(RewriteRuleClassBase):
    """``Add(Conv(x, W[, b]), c)`` → ``Conv(x, W, b + c)`` when ``c`` is per output channel and a
    foldable BatchNormalization reads the sum."""

    op_type: ClassVar = "Conv"

    def pattern(self, op, x, c):
        conv = getattr(op, self.op_type)(x, _allow_other_inputs=True, _outputs=["conv_out"])
        return op.Add(conv, c, _outputs=["add_out"])

    def check(self, context, x, c, conv_out, add_out) -> MatchResult:
        result = MatchResult()
        if not _foldable_batchnorm_reads(add_out):
            return result.fail("no foldable BatchNormalization reads the sum")
        if len(conv_out.producer().inputs[1].uses()) != 1:
            return result.fail("the weight is shared with another node")
        if self._bias(conv_out.producer(), c) is None:
            return result.fail("the added value is not a per-channel constant, or the bias is not constant")
        return result

    @staticmethod
    def _bias(conv: ir.Node, c: ir.Value) -> np.ndarray | None:
        w, cv = _constant(conv.inputs[1]), _constant(c)
        if w is None or cv is None:
            return None
        channels = w.shape[0] if conv.op_type == "Conv" else w.shape[1] * conv.attributes.get_int("group", 1)
        vec = _per_channel(cv, w.ndim, channels)
        if vec is None:
            return None
        if len(conv.inputs) < 3 or conv.inputs[2] is None:
            return vec
        b = _constant(conv.inputs[2])
        return None if b is None else b + vec

    def rewrite(self, op, x, c, conv_out, add_out):
        conv = conv_out.producer()
        bias = op.initializer(ir.tensor(self._bias(conv, c)), name=_fresh(conv.graph, f"{conv.inputs[1].name}_bias"))
        return op.op(conv.op_type, x, conv.inputs[1], bias, **conv.attributes)


class _BiasAddIntoConvTranspose(_BiasAddIntoConv):
    """The same for ``ConvTranspose``."""

    op_type: ClassVar = "ConvTranspose"


def _fresh(graph: ir.Graph | None, base: str) -> str:
    """An initializer name ``graph`` does not use (the rewriter would overwrite one that exists)."""
    taken = graph.initializers if graph is not None else {}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _matmul_weight_problem(x: ir.Value, w: ir.Value) -> str | None:
    wv = _constant(w)
    if wv is None or wv.ndim != 2:
        return "the weight is not a constant matrix"
    if len(w.uses()) != 1:
        return "the weight is shared with another node"
    if x.shape is None or len(x.shape) != 2:
        return "the input is not known to be of rank 2"
    return None


class _MatMulAddToGemm(RewriteRuleClassBase):
    """``Add(MatMul(x[N,K], W[K,C]), c)`` → ``Gemm(x, W, c[C])`` when a foldable BatchNormalization reads it."""

    def pattern(self, op, x, w, c):
        return op.Add(op.MatMul(x, w, _outputs=["mm_out"]), c, _outputs=["add_out"])

    def check(self, context, x, w, c, mm_out, add_out) -> MatchResult:
        result = MatchResult()
        why = _matmul_weight_problem(x, w)
        if why:
            return result.fail(why)
        if not _foldable_batchnorm_reads(add_out):
            return result.fail("no foldable BatchNormalization reads the sum")
        cv = _constant(c)
        if cv is None or _per_channel(cv, 2, _constant(w).shape[1]) is None:
            return result.fail("the added value is not a per-channel constant")
        return result

    def rewrite(self, op, x, w, c, mm_out, add_out):
        vec = _per_channel(_constant(c), 2, _constant(w).shape[1])
        return op.Gemm(x, w, op.initializer(ir.tensor(vec), name=_fresh(mm_out.producer().graph, f"{w.name}_bias")))


class _MatMulToGemm(RewriteRuleClassBase):
    """``MatMul(x[N,K], W[K,C])`` → ``Gemm(x, W)`` when a foldable BatchNormalization reads it."""

    def pattern(self, op, x, w):
        return op.MatMul(x, w, _outputs=["mm_out"])

    def check(self, context, x, w, mm_out) -> MatchResult:
        result = MatchResult()
        why = _matmul_weight_problem(x, w)
        if why:
            return result.fail(why)
        if not _foldable_batchnorm_reads(mm_out):
            return result.fail("no foldable BatchNormalization reads the product")
        return result

    def rewrite(self, op, x, w, mm_out):
        return op.Gemm(x, w)


_PREPARATION_RULES = RewriteRuleSet([
    *_BiasAddIntoConv.rule().commute(), *_BiasAddIntoConvTranspose.rule().commute(),
    *_MatMulAddToGemm.rule().commute(), _MatMulToGemm.rule(),
])
