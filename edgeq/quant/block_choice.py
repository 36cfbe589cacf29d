"""The int4 block size per layer: the target's faster block where the layer's output stays accurate.

A blocked int4 weight's block size trades accuracy for speed. Small blocks (32) follow the weights
more closely; on ONNX Runtime's x86 ``MatMulNBits`` kernel block 128 runs 1.3-1.5x faster than
block 32 at MiniLM's shapes, and MatMulNBits is about three quarters of a W4A16 encoder's time.
Whether a layer can afford the larger block is a property of its weights and of the inputs it
sees, so it is decided per layer from calibration statistics, never by layer name:

For an int4 MatMul/Gemm weight ``W [K, N]`` read as ``y = x · W``, with ``H = E[x xᵀ]`` the Gram of
its input on the calibration data (the statistic AWQ and GPTQ use too, so no extra pass), the
predicted output SQNR of rounding ``W`` to ``Ŵ`` is ``10·log10(tr(Wᵀ H W) / tr(ΔWᵀ H ΔW))``. Both
block sizes are rounded to nearest in the plan's own format (clip search, zero points); the layer
takes the larger block when its SQNR there is at least ``min_sqnr_db`` and at most ``max_loss_db``
below its SQNR at its own block (:class:`~edgeq.quant.recipes.BlockChoiceConfig`). GPTQ and AWQ
then run at the block chosen, and improve either block about alike.

Why a floor and not only a loss: on MiniLM every layer loses 1.4-2.6 dB going from block 32 to
128 (the loss barely tells layers apart), while the SQNR at block 128 ranges from 15 to 30 dB;
the noise a layer adds to the network is what its SQNR bounds. The loss limit keeps a layer
whose weights suit small blocks unusually well (outlier weights) at its block. The default floor,
22 dB, was measured on MiniLM W4A16 (android, 1-thread CPU time, with the encoder fusion): 12 of 36
weights at block 128, mean cosine 0.9884 -> 0.9865, 1.14x -> 1.25x float at 128 tokens; 21 dB:
20 weights, 0.9858, 1.30x; 23 dB: 7 weights, 0.9874.

The larger block is the profile's ``fast_int4_block`` (a profile without one: nothing to choose).
A recipe turns the choice off with ``block_choice = false`` (per layer in a rule's
``algorithms``), and ``--block`` pins the block for every layer.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edgeq.quant.algorithms import Algorithm, Context, Request, Stats, add_result, fingerprint
from edgeq.quant.gptq import gptq_inputs, output_error, reduction_axis
from edgeq.quant.plan import AlgorithmResult, QuantPlan, WeightDecision
from edgeq.quant.recipes import BlockChoiceConfig, WeightFormat
from edgeq.quant.sequence_starts import is_causal_lm
from edgeq.quant.stats import Gram
from edgeq.quant.weights import quantize_weight


# Causal LMs keep the recipe's block. Measured on SmolLM2-135M W4A16 (android): only the 30 down_proj
# weights have K divisible by 128; the choice moved 2 of them (predicted 22.2 and 23.5 dB at block 128)
# and perplexity went from x1.136 to x1.173 of float (KL 0.156 -> 0.164): the layer's own output SQNR
# does not predict that, and no speed gain was measured for it (decode runs M = 1; not timed here).
CAUSAL_LM = "causal LMs keep the recipe's block (measured on SmolLM2: perplexity x1.136 -> x1.173 for 2 layers)"


def predicted_sqnr_db(w: np.ndarray, d: WeightDecision, gram: np.ndarray) -> float:
    """The layer output's SQNR (dB) when ``w`` (as stored in the graph) is rounded to nearest per ``d``,
    for inputs whose Gram is ``gram``: ``tr(Wᵀ H W) / tr(ΔWᵀ H ΔW)``."""
    stored = w.T if d.transpose else w
    k_axis = reduction_axis(d)
    signal = output_error(np.zeros_like(stored), stored, gram, k_axis)
    noise = output_error(stored, quantize_weight(w, d).dequantize(), gram, k_axis)
    if signal <= 0.0:
        return float("inf")  # a layer whose output is zero on the calibration data: any block is exact
    return float(10.0 * np.log10(signal / max(noise, signal * 1e-30)))


def _candidates(ctx: Context, plan: QuantPlan) -> dict[str, tuple[WeightDecision, str, int]]:
    """node -> (its int4 decision, the tensor whose Gram it needs, the larger block) where a choice exists."""
    if is_causal_lm(ctx):
        return {}  # see CAUSAL_LM
    inputs = gptq_inputs(ctx.model, plan)
    out = {}
    for d in plan.weights:
        cfg = ctx.settings(d.node).block_choice if d.node in inputs else None
        if cfg is None or d.format != WeightFormat.INT4 or d.form != "dq" or d.op_type not in ("MatMul", "Gemm"):
            continue
        big = ctx.profile.fast_int4_block
        stored = d.shape[::-1] if d.transpose else d.shape  # the 2-D weight as quantized
        k = stored[reduction_axis(d)]
        if big is None or big <= d.block or k % big:  # whole blocks only: a partial one would read as a small block
            continue
        out[d.node] = (d, inputs[d.node], big)
    return out


class BlockChoice(Algorithm):
    """Block choice (config :class:`~edgeq.quant.recipes.BlockChoiceConfig`): before AWQ and GPTQ, which then
    run at the block chosen."""

    name = "block_choice"
    config_type = BlockChoiceConfig

    def requests(self, ctx: Context, plan: QuantPlan) -> list[Request]:
        return [Request("gram", t, Gram) for t in sorted({t for _, t, _ in _candidates(ctx, plan).values()})]

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        candidates = _candidates(ctx, plan)
        if not candidates and is_causal_lm(ctx):
            return self.skipped(plan, f"nothing to do: {CAUSAL_LM}")
        if not candidates:
            return self.skipped(plan, f"nothing to do: {ctx.profile.name} runs no int4 block faster than another"
                                if ctx.profile.fast_int4_block is None else
                                "nothing to do: no int4 MatMul/Gemm weight with a block smaller than the faster one")
        nodes = ctx.nodes()
        chosen: dict[str, WeightDecision] = {}
        details = []
        for node, (d, tensor, big) in ctx.bar(sorted(candidates.items()), "block choice", "weight"):
            gram = stats.get("gram", tensor)
            if gram is None:
                details.append(f"{node}: block {d.block} kept (input Gram unusable)")
                continue
            w = nodes[node].inputs[d.input_index].const_value.numpy().astype(np.float32)
            large = replace(d, block=big)
            small_db, large_db = ctx.memo.get(
                ("block_choice", fingerprint(w, gram, repr(d), big)),
                lambda: (predicted_sqnr_db(w, d, gram), predicted_sqnr_db(w, large, gram)))
            cfg = ctx.settings(node).block_choice
            loss = small_db - large_db
            if large_db >= cfg.min_sqnr_db and loss <= cfg.max_loss_db:
                why = (f"block {big} (block choice: predicted output SQNR {large_db:.1f} dB >= {cfg.min_sqnr_db:g} dB, "
                       f"{small_db:.1f} dB at block {d.block}; {ctx.profile.name} runs block {big} faster)")
                chosen[node] = replace(large, reason=f"{d.reason}; {why}")
                details.append(f"{node}: {why}")
            else:
                details.append(f"{node}: block {d.block} kept (predicted output SQNR {small_db:.1f} dB, at block {big} "
                               f"{large_db:.1f} dB: " + (f"below {cfg.min_sqnr_db:g} dB)" if large_db < cfg.min_sqnr_db
                                                         else f"{loss:.2f} dB lost > {cfg.max_loss_db:g} dB)"))
        weights = tuple(chosen.get(d.node, d) for d in plan.weights)  # one decision per MatMul/Gemm node
        bigs = sorted({d.block for d in chosen.values()})
        summary = (f"{len(chosen)} of {len(candidates)} int4 MatMul/Gemm weights at block "
                   f"{'/'.join(map(str, bigs)) or max(b for _, _, b in candidates.values())} "
                   f"(their predicted output SQNR stays >= the limit; {stats.samples} calibration samples)")
        return add_result(replace(plan, weights=weights),
                          AlgorithmResult(self.name, summary, nodes=tuple(sorted(chosen)), details=tuple(details)))
