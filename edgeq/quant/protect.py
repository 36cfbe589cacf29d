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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgeq.quant.plan import QuantPlan
from edgeq.quant.recipes import WeightFormat

PERCENTILE = 90.0


@dataclass(frozen=True)
class Protection:
    """Channels ``channels`` of ``tensor`` bypass quantization for the MatMuls ``consumers``."""

    tensor: str
    consumers: tuple[str, ...]
    channels: np.ndarray  # int64, sorted
    scores: np.ndarray  # the score of each protected channel (× the 90th percentile)
    float_bytes: int  # the protected weight rows, float32
    macs_per_row: int  # extra multiply-adds per input row (token / pixel)

    def describe(self) -> str:
        chans = ", ".join(f"{int(c)} ({s:.0f}×)" for c, s in zip(self.channels, self.scores))
        return (f"{self.tensor}: channels {chans} for {', '.join(self.consumers)}; "
                f"+{self.float_bytes / 1024:.1f} KB float, +{self.macs_per_row} MACs per row")


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
                       *, ratio: float, max_channels: int) -> list[Protection]:
    """The channels to protect per candidate, from calibration channel maxima and the weights."""
    nodes = {n.name: n for n in model.graph}
    result = []
    for tensor, consumers in sorted(candidates.items()):
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
