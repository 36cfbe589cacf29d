"""Outlier protection: the few input channels that break low-precision MatMuls leave the integer path.

A handful of channels decide most of a transformer MatMul's quantization error: activation
outlier channels (a LayerNorm or GELU channel whose range is 5-50× the rest: the per-tensor
activation scale is spent on them) and super weights (a weight row far above the others: its
column's per-channel or per-block scale is spent on it). For an activation ``x`` read by
MatMuls ``x · W`` the graph computes instead (LLM.int8()-style mixed decomposition, Dettmers et
al., 2022)::

    Q(x ⊙ m) · Q(W ⊙ m[:, None])  +  x[..., P] · W[P, :]      (m: 0 on the protected channels P)

so the quantized product covers the ordinary channels only (finer activation and weight grids)
and the protected channels run exactly, in float, through a ``[tokens, |P|] × [|P|, N]`` MatMul.
Channels are chosen per activation by ``score_k = max(max|x_k| / p90(max|x|), max|W_k,:| /
p90(max|W_j,:|))`` over the MatMuls reading it: ``score > ratio``, at most ``max_channels``,
highest first. The cost (float bytes and extra multiply-adds per token) is reported.

Statistics: the channel maxima of each candidate tensor — from the short prepass for W8A8 (the
smoothing and the activation ranges that follow are computed on the protected graph), from the
one calibration pass for weight-only recipes. The masked tensor's maxima and Gram follow exactly
(the protected channels zeroed), so later algorithms read them without another pass.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from edgeq.quant.algorithms import Algorithm, Context, Request, Stage, Stats, add_result, enabled_for_all
from edgeq.quant.plan import AlgorithmResult, Protection, QuantPlan
from edgeq.quant.recipes import MASSIVE_RATIO, ProtectConfig, Recipe, WeightFormat
from edgeq.quant.stats import ChannelAbsMax

PERCENTILE = 90.0


def protection_candidates(model: ir.Model, plan: QuantPlan) -> dict[str, tuple[str, ...]]:
    """Activation tensor -> the quantized MatMuls reading it (2-D constant weights of their own)."""
    nodes = {n.name: n for n in model.graph}
    out: dict[str, list[str]] = {}
    for d in plan.weights:
        n = nodes[d.node]
        if n.op_type != "MatMul" or d.input_index != 1 or d.form != "dq" or d.format == WeightFormat.FLOAT:
            continue
        x, w = n.inputs[0], n.inputs[1]
        if x is None or x.const_value is not None or len(w.const_value.shape) != 2 or len(w.uses()) != 1:
            continue
        out.setdefault(x.name, []).append(d.node)
    return {t: tuple(c) for t, c in out.items()}


def _ratio(v: np.ndarray) -> np.ndarray:
    ref = float(np.percentile(v, PERCENTILE))
    return v / ref if ref > 0 else np.zeros_like(v)


def choose_protections(model: ir.Model, candidates: dict[str, tuple[str, ...]], absmax: dict[str, np.ndarray],
                       *, ratio: float = 4.0, max_channels: int = 4,
                       configs: dict[str, ProtectConfig] | None = None) -> list[Protection]:
    """The channels to protect per candidate, from calibration channel maxima and the weights.

    ``configs`` gives a tensor its own ratio / max_channels (else ``ratio``, ``max_channels``).
    """
    nodes = {n.name: n for n in model.graph}
    result = []
    for tensor, consumers in sorted(candidates.items()):
        if configs is not None and tensor in configs:
            ratio, max_channels = configs[tensor].ratio, configs[tensor].max_channels
        a = absmax.get(tensor)
        weights = [nodes[c].inputs[1].const_value.numpy() for c in consumers]
        if a is None or any(w.shape[0] != a.shape[0] for w in weights):
            continue
        w_rows = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        score = np.maximum(_ratio(a.astype(np.float64)), _ratio(w_rows.astype(np.float64)))
        order = np.argsort(-score, kind="stable")[:max_channels]
        chosen = np.sort(order[score[order] > ratio])
        if chosen.size == 0 or chosen.size >= a.shape[0]:
            continue
        n_out = sum(int(w.shape[1]) for w in weights)
        result.append(Protection(tensor, consumers, chosen.astype(np.int64), score[chosen],
                                 float_bytes=4 * chosen.size * n_out, macs_per_row=chosen.size * n_out))
    return result


def masked_name(tensor: str) -> str:
    """The name of ``tensor`` with its protected channels zeroed (what the quantized MatMuls read)."""
    return f"{tensor}_protected"


class ProtectHandler(Algorithm):
    """Outlier protection (config :class:`~edgeq.quant.recipes.ProtectConfig`)."""

    name = "protect"
    config_type = ProtectConfig

    def stage(self, recipe: Recipe) -> Stage:
        return Stage.PREPASS if recipe.quantizes_activations else Stage.MAIN

    def _candidates(self, ctx: Context, plan: QuantPlan) -> dict[str, tuple[str, ...]]:
        return {t: c for t, c in protection_candidates(ctx.model, plan).items()
                if enabled_for_all(ctx, c, "protect") is not None}

    def requests(self, ctx: Context, plan: QuantPlan) -> list[Request]:
        return [Request("absmax", t, ChannelAbsMax) for t in sorted(self._candidates(ctx, plan))]

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        candidates = self._candidates(ctx, plan)
        if not candidates:
            return self.skipped(plan, "nothing to do: no MatMul with a quantized constant weight of its own")
        absmax = stats.of_kind("absmax")
        configs = {t: enabled_for_all(ctx, c, "protect") for t, c in candidates.items()}
        chosen = choose_protections(ctx.model, {t: c for t, c in candidates.items() if t in absmax}, absmax,
                                    configs=configs)
        for p in chosen:  # what the quantized MatMuls will read: x with channels P zeroed
            a = absmax[p.tensor].copy()
            a[p.channels] = 0.0
            stats.put("absmax", masked_name(p.tensor), a)
            g = stats.get("gram", p.tensor)
            if g is not None:
                g = g.copy()
                g[p.channels, :] = 0.0
                g[:, p.channels] = 0.0
                stats.put("gram", masked_name(p.tensor), g)
        channels = sum(p.channels.size for p in chosen)
        kb = sum(p.float_bytes for p in chosen) / 1024
        macs = sum(p.macs_per_row for p in chosen)
        result = AlgorithmResult(
            self.name, f"{channels} outlier channels of {len(chosen)} of {len(candidates)} MatMul inputs run in float "
                       f"(+{kb:.1f} KB float weights, +{macs} MACs per token/pixel)",
            nodes=tuple(c for p in chosen for c in p.consumers),
            details=tuple(("protected massive activation " if float(p.scores.max()) >= MASSIVE_RATIO else "protected ")
                          + p.describe() for p in chosen))
        return add_result(replace(plan, protections=plan.protections + tuple(chosen)), result)
