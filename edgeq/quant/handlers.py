"""The algorithms in the order they decide, one handler per config type.

Keeping a GGUF's integers comes first: every later algorithm leaves a weight with codes alone.
Order matters where one algorithm reads what another decided: protection first (the MatMuls then
read the masked tensor), smoothing next, the int4 block size per layer before AWQ and GPTQ (which
round at the block chosen), AWQ next (its scales see the protected tensor),
activation ranges on the graph as rewritten, then the weight codes (Conv rounding, GPTQ, nearest
for the rest), the recurrent layers checked with their codes, and last the biases, which read the
final codes: bias correction, the int32 biases, then the sequential correction, which runs the
quantized graph as it will be written (int32 biases included).
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np

from edgeq.quant.activations import ActivationRanges
from edgeq.quant.algorithms import Algorithm, Context, Stats, add_result
from edgeq.quant.awq import AWQHandler
from edgeq.quant.bias import BiasCorrectionHandler, IntegerBiasHandler
from edgeq.quant.block_choice import BlockChoice
from edgeq.quant.gptq import GPTQHandler
from edgeq.quant.keep_gguf import KeepGGUF
from edgeq.quant.plan import AlgorithmResult, QuantPlan
from edgeq.quant.protect import ProtectHandler
from edgeq.quant.recipes import Recipe
from edgeq.quant.recurrent import RecurrentCheck
from edgeq.quant.rounding import ConvRoundingHandler
from edgeq.quant.seq_bias import SequentialBiasCorrection
from edgeq.quant.sequence_starts import SequenceStarts
from edgeq.quant.smooth import SmoothingHandler
from edgeq.quant.weights import quantize_weight


class NearestRounding(Algorithm):
    """Every planned weight no algorithm chose codes for is rounded to nearest in its format."""

    name = "rounding"
    needs_data = False

    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        nodes = ctx.nodes()
        codes = dict(plan.codes)
        chosen = len(codes)
        for d in plan.weights:
            if d.weight not in codes:
                w = nodes[d.node].inputs[d.input_index].const_value.numpy().astype(np.float32)
                codes[d.weight] = quantize_weight(w, d)
        summary = f"{len(codes) - chosen} weights rounded to nearest" + (
            f", {chosen} with codes chosen by the algorithms above" if chosen else "")
        return add_result(replace(plan, codes=MappingProxyType(codes)),
                          AlgorithmResult(self.name, summary, ran=bool(codes)))


ORDER: tuple[type[Algorithm], ...] = (
    KeepGGUF, SequenceStarts, ProtectHandler, SmoothingHandler, BlockChoice, AWQHandler, ActivationRanges,
    ConvRoundingHandler, GPTQHandler,
    NearestRounding, RecurrentCheck, BiasCorrectionHandler, IntegerBiasHandler, SequentialBiasCorrection,
)

# one handler per config type of Recipe.algorithms (tests/quant/test_algorithms.py checks there is one each)
HANDLERS = {h.config_type: h for h in ORDER if h.config_type is not None}


def handlers_for(recipe: Recipe) -> list[Algorithm]:
    """The handlers a recipe turns on, in deciding order."""
    return [h() for h in ORDER if h().enabled(recipe)]
