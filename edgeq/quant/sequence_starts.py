"""Causal LMs: does the calibration data include the start of a sequence?

A language model's first token behaves unlike the rest: SmolLM2's layer-11 ``down_proj`` input
reaches ~3100 on position 0 and ~8 elsewhere (a massive activation). Statistics gathered only from
the middle of texts miss it, and a plan built from them breaks the model (perplexity 37.6 → 229
measured). This check watches ``position_ids`` during calibration and says whether any feed started
at position 0 — a warning in the plan when none did.
"""

from __future__ import annotations

import numpy as np

from edgeq.quant.algorithms import Algorithm, Context, Request, Stats, add_result
from edgeq.quant.plan import AlgorithmResult, QuantPlan

POSITIONS = "position_ids"


class _Smallest:
    """The smallest value a tensor took."""

    def __init__(self) -> None:
        self.value: int | None = None

    def update(self, x: np.ndarray) -> None:
        if np.size(x):
            low = int(np.min(x))
            self.value = low if self.value is None else min(self.value, low)

    def state_nbytes(self) -> int:
        return 8

    def result(self) -> int | None:
        return self.value


def is_causal_lm(ctx: Context) -> bool:
    names = {v.name for v in ctx.model.graph.inputs}
    return POSITIONS in names and any(n.startswith("past_key_values.") for n in names)


class SequenceStarts(Algorithm):
    """Checks that causal LM calibration feeds include position 0 (always on; silent for other models)."""

    name = "sequence_starts"
    needs_data = False

    def requests(self, ctx: Context, plan: QuantPlan) -> list[Request]:
        return [Request("smallest", POSITIONS, _Smallest)] if is_causal_lm(ctx) and ctx.has_data else []

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        if not is_causal_lm(ctx) or not ctx.has_data:
            return plan
        first = stats.get("smallest", POSITIONS)
        if first == 0:
            return add_result(plan, AlgorithmResult(self.name, "calibration feeds start sequences (position 0): the "
                                                               "first token's massive activations are in the statistics"))
        return add_result(plan, AlgorithmResult(
            self.name, f"WARNING: no calibration feed starts a sequence (smallest position {first}): the first "
                       "token's massive activations are missing from the statistics and the plan may break the "
                       "model; calibrate on texts fed from their first token with an empty cache", ran=False))
