"""Accuracy budget: the smallest package that meets ``cosine>=X`` / ``sqnr>=X`` / ``top1_agreement>=X``.

The search starts from the recipe's own (lowest) precision everywhere and raises layers one step
at a time up a ladder the recipe and target allow:

- int4 weights → int8 weights → float (weight-only recipes);
- W8A8 → int8 weights with a float input (the layer's activation Q/DQ bypassed) → float.

It quantizes once (one calibration) and scores variants of that QDQ graph on the evaluation
feeds, as ``edgeq analyze`` does. Each option — a layer at one of its steps — has a *gain*: the
output SQNR (dB, worst output) with only that layer raised to that step, over the SQNR with none
raised (a continuous measure whatever the budget's metric: top-1 agreement on a few feeds cannot
tell most layers apart), and a *cost*: the bytes it adds (a float input adds none; it is charged
the layer's int8 weight bytes, for the work that leaves the integer kernels). Options are ranked
by gain per cost (ties by name), each layer taking the highest step among its chosen options, and
the shortest prefix of that ranking that meets the budget (its own metric, on all evaluation
feeds) is found by bisection.
The chosen layers become recipe rules (exact node names), the model is quantized again with them
and the result is measured; should it miss the budget (a re-calibrated W8A8 graph can differ a
little from its variant), the next layer in the ranking is added. Everything is ordered and
seeded, so the same inputs give the same answer.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeq import onnx_io
from edgeq.errors import InputError
from edgeq.pipeline.quantize import fused_after_quantization, quantize_model, resolve_profile
from edgeq.pipeline.variants import Evaluator, InMemoryModel, Variants, prepare_float
from edgeq.quant.algorithms import Memo
from edgeq.quant.recipes import (
    FLOAT,
    ActFormat,
    Recipe,
    Rule,
    WeightFormat,
    exact_name_pattern,
    exact_name_rule,
    resolve_recipe,
)
from edgeq.quant.weights import weight_bytes

METRICS = ("cosine", "sqnr", "top1_agreement")
_BUDGET = re.compile(r"^\s*(cosine|sqnr|top1_agreement)\s*>=\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Budget:
    metric: str
    minimum: float

    def met(self, value: float) -> bool:
        return not math.isnan(value) and value >= self.minimum

    def __str__(self) -> str:
        return f"{self.metric}>={self.minimum:g}"


def parse_budget(text: str) -> Budget:
    """``"cosine>=0.995"``, ``"sqnr>=30"`` or ``"top1_agreement>=0.98"``."""
    m = _BUDGET.match(text or "")
    if not m:
        raise InputError(f"cannot read the budget {text!r}",
                         hint='write METRIC>=VALUE with METRIC one of cosine, sqnr, top1_agreement, e.g. "cosine>=0.995"')
    try:
        value = float(m.group(2))
    except ValueError:
        raise InputError(f"budget value {m.group(2)!r} is not a number") from None
    metric = m.group(1)
    if metric in ("cosine", "top1_agreement") and not -1.0 <= value <= 1.0:
        raise InputError(f"a {metric} budget must be at most 1, got {value}")
    return Budget(metric, value)


@dataclass(frozen=True)
class Raised:
    """A layer the search left above the recipe's precision, and why."""

    node: str
    op_type: str
    level: str  # "int8" | "float input" | "float"
    added_bytes: int
    alone: float  # output SQNR (dB) on the ranking feeds with only this layer raised to ``level``
    rank: int  # the option's place in the ranking by gain per cost (1 = first); 0: added after the final check

    def as_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "level": self.level, "added_bytes": self.added_bytes,
                "sqnr_alone_db": self.alone, "rank": self.rank}


@dataclass
class BudgetResult:
    model: str
    recipe: str
    budget: Budget
    met: bool
    base: float  # the metric with every layer at the recipe's precision
    final: float  # the metric of the written model
    raised: list[Raised] = field(default_factory=list)
    base_bytes: int = 0
    final_bytes: int = 0
    variants_scored: int = 0
    seconds: float = 0.0
    output: str | None = None
    recipe_toml: str = ""
    rank_reference: float = float("nan")  # output SQNR on the ranking feeds with no layer raised
    rank_feeds: int = 0

    def as_dict(self) -> dict:
        return {"model": self.model, "recipe": self.recipe, "budget": str(self.budget), "met": self.met,
                "base": self.base, "final": self.final, "base_bytes": self.base_bytes,
                "final_bytes": self.final_bytes, "raised": [r.as_dict() for r in self.raised],
                "variants_scored": self.variants_scored, "seconds": round(self.seconds, 2), "output": self.output,
                "rank_reference": self.rank_reference, "rank_feeds": self.rank_feeds,
                "recipe_toml": self.recipe_toml}

    def format(self) -> str:
        m = self.budget.metric
        lines = [f"budget {self.budget} on {self.model} with {self.recipe}: "
                 f"{'MET' if self.met else 'NOT MET'} — {m} {self.base:.5g} with every layer at the recipe's "
                 f"precision, {self.final:.5g} in the written model",
                 f"size: {self.base_bytes / 1e6:.2f} MB → {self.final_bytes / 1e6:.2f} MB; "
                 f"{self.variants_scored} variants scored in {self.seconds:.1f} s"]
        if self.raised:
            lines.append(f"layers left above the recipe's precision ({len(self.raised)}), in ranking order "
                         f"(ranked by output SQNR gain per added byte on {self.rank_feeds} feeds, "
                         f"{self.rank_reference:.1f} dB with none raised):")
            w = min(max(len(r.node) for r in self.raised), 50)
            for r in self.raised:
                why = f"rank {r.rank:>3}: raised alone, SQNR {r.alone:.1f} dB" if r.rank else "added after the check"
                lines.append(f"  {r.node[:w]:<{w}}  {r.op_type:<8} → {r.level:<11} +{r.added_bytes / 1024:8.1f} KB  {why}")
        else:
            lines.append("no layer needed raising")
        return "\n".join(lines)


def _ladder(fmt: WeightFormat, has_act: bool) -> list[str]:
    """The steps above a layer's planned precision."""
    if has_act:
        return ["float input", "float"]
    if fmt in (WeightFormat.INT4, WeightFormat.MXFP4):
        return ["int8", "float"]
    return ["float"]


def _weight_elems(shape) -> int:
    return int(np.prod(shape)) if shape else 0


def _added_bytes(d, level: str) -> int:
    """Bytes added by raising the layer of decision ``d`` to ``level`` (the size model of edgeq.quant.weights)."""
    if level == "float input":
        return 0
    now = weight_bytes(d.shape, d.format, axis=d.axis, block=d.block, symmetric=d.symmetric, scale_dtype=d.scale_dtype)
    fmt = WeightFormat.INT8 if level == "int8" else WeightFormat.FLOAT
    channel_axis = 1 if d.op_type == "MatMul" else 0  # int8: one scale per output channel
    return max(weight_bytes(d.shape, fmt, axis=channel_axis) - now, 0)


def _cost(d, level: str) -> int:
    """What raising costs, in bytes: the added weight bytes; a float input (no added bytes) costs the
    layer's int8 weight bytes, a stand-in for the work that leaves the integer kernels."""
    return _weight_elems(d.shape) if level == "float input" else _added_bytes(d, level)


def search(model, recipe, budget: str | Budget, output=None, *, calib=None, data=None, profile=None,
           block: int | None = None, limit: int | None = None, rank_limit: int | None = 4, force: bool = False,
           progress: bool = True) -> BudgetResult:
    """Find the smallest quantization of the float ONNX ``model`` that meets ``budget`` (see the module doc).

    ``data`` is the evaluation data (default: the sample named like the model file); ``limit``
    caps its feeds for the whole search, ``rank_limit`` the feeds used for the per-layer ranking.
    With ``output`` the final QDQ model is written there.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    b = parse_budget(budget) if isinstance(budget, str) else budget
    rec = resolve_recipe(recipe, block=block)
    if output is not None:
        onnx_io.check_output_path(output, force=force)
    model, data, float_proto, feeds, _ = prepare_float(model, data, limit)
    if calib is None and rec.uses_calibration:
        calib = data
    full_eval = Evaluator(float_proto, feeds)
    rank_eval = full_eval.subset(rank_limit)
    if b.metric == "top1_agreement" and not full_eval.has_class_scores:
        raise InputError("top1_agreement needs a classifier output (class scores on the last axis)",
                         hint="use a cosine or sqnr budget for this model")

    memo = Memo()  # the final quantization reuses the base one's statistics and per-layer results
    with tempfile.TemporaryDirectory(prefix="edgeq-budget-") as tmp:
        # variants are built on the graph the plan names, layer by layer: the profile's ORT fusions (packed
        # projections, scalings folded into norms) come only on the file written
        base_res = quantize_model(model, os.path.join(tmp, "base.onnx"), rec, block=block, profile=profile,
                                  calib=calib, force=True, progress=progress, memo=memo, fuse=False)
        base_ir = onnx_io.load_ir(base_res.path)
    qdq = ir.to_proto(base_ir)
    plan = base_res.plan
    variants = Variants(float_proto, qdq, plan)
    layers = list(variants.layers)
    decision = {d.node: d for d in plan.weights}
    has_act = {c for a in plan.activations for c in a.consumers}
    ladders = {L: _ladder(decision[L].format, L in has_act) for L in layers}

    def build(state: dict[str, str]) -> InMemoryModel:
        fl = {L for L, s in state.items() if s == "float"}
        fin = {L for L, s in state.items() if s == "float input"}
        i8 = {L for L, s in state.items() if s == "int8"}
        return variants.build_in_memory(set(layers) - fl, None, float_acts=fin | fl, int8=i8)

    base_score = full_eval.score(build({})).metric(b.metric)
    raised: list[Raised] = []
    state: dict[str, str] = {}
    ranking: list[tuple[str, str, float]] = []  # (layer, level, SQNR with it alone), in ranking order
    rank_ref = float("nan")
    if not b.met(base_score):
        # every (layer, step) on its own against the recipe-everywhere model, on the ranking feeds
        rank_ref = rank_eval.score(build({})).sqnr_db
        options = []
        todo = [(L, j) for L in layers for j in range(len(ladders[L]))]
        for L, j in tqdm(todo, desc="ranking layers", unit="variant", disable=not progress or None, leave=False):
            level = ladders[L][j]
            alone = rank_eval.score(build({L: level})).sqnr_db
            gain = alone - rank_ref
            cost = max(_cost(decision[L], level), 1)
            # options that gain nothing on the ranking feeds come last, cheapest first: a budget on
            # another metric (or on all feeds) may still need them
            options.append((0, -gain / cost, 0, L, j, level, alone) if gain > 0 else
                           (1, 0.0, cost, L, j, level, alone))
        options.sort(key=lambda t: t[:5])
        ranking = [(L, level, alone) for *_, L, _, level, alone in options]

        def state_of(n: int) -> dict[str, str]:
            st: dict[str, str] = {}
            for L, level, _ in ranking[:n]:  # a layer takes the highest step among its chosen options
                if L not in st or ladders[L].index(level) > ladders[L].index(st[L]):
                    st[L] = level
            return st

        # bisection for the shortest prefix meeting the budget (assumes raising more is not worse)
        lo, hi = 1, len(ranking)
        if b.met(full_eval.score(build(state_of(hi))).metric(b.metric)):
            while lo < hi:
                mid = (lo + hi) // 2
                if b.met(full_eval.score(build(state_of(mid))).metric(b.metric)):
                    hi = mid
                else:
                    lo = mid + 1
        state = state_of(hi)

    # the real model: the raised layers as recipe rules, quantized and measured again
    def with_rules(st: dict[str, str]) -> Recipe:
        rules = []
        for L in sorted(st):
            spec = decision[L]
            base_spec, _ = rec.spec_for(spec.op_type, L)
            lv = st[L]
            new = FLOAT if lv == "float" else replace(base_spec, activations=ActFormat.FLOAT) if lv == "float input" \
                else replace(base_spec, weights=WeightFormat.INT8)
            rules.append(Rule(new, (), exact_name_pattern(L)))
        return replace(rec, name=f"{rec.name}+budget", rules=tuple(rules) + rec.rules)

    rank_of = {(L, lv): i for i, (L, lv, _) in enumerate(ranking, 1)}
    alone_of = {(L, lv): a for L, lv, a in ranking}
    extra = [x for x in ranking if x[0] not in state]
    with tempfile.TemporaryDirectory(prefix="edgeq-budget-") as tmp:
        final_file, res, final = None, base_res, base_score  # nothing raised: the base model, fused below
        while state:
            path = os.path.join(tmp, "final.onnx")
            res = quantize_model(model, path, with_rules(state), block=block, profile=profile, calib=calib,
                                 force=True, progress=progress, memo=memo)
            final_file = Path(path).read_bytes()
            final = full_eval.score(final_file).metric(b.metric)
            if b.met(final) or not extra:
                break
            L, lv, _ = extra.pop(0)
            state = {**state, L: lv}
        if output is not None:  # written whole, then renamed into place: never half-written
            onnx_io.check_output_path(output, force=force)
            if final_file is None:
                final_file = ir.to_proto(fused_after_quantization(base_ir, base_res.plan,
                                                                  resolve_profile(profile))[0]).SerializeToString()
            staged = Path(str(output) + ".partial")
            staged.write_bytes(final_file)
            os.replace(staged, output)
    for L in sorted(state, key=lambda n: rank_of.get((n, state[n]), 10 ** 6)):
        raised.append(Raised(L, decision[L].op_type, state[L], _added_bytes(decision[L], state[L]),
                             alone_of.get((L, state[L]), float("nan")), rank_of.get((L, state[L]), 0)))
    return BudgetResult(str(model), rec.name, b, b.met(final), base_score, final, raised,
                        base_res.quantized_bytes, res.quantized_bytes,
                        full_eval.runs + (rank_eval.runs if rank_eval is not full_eval else 0),
                        time.perf_counter() - t0, str(output) if output is not None else None, _toml(state),
                        rank_ref, len(rank_eval.feeds))


def _toml(state: dict[str, str]) -> str:
    """The raised layers as ``[[rules]]`` to paste into a recipe file (they load back: tested)."""
    bodies = {"int8": 'weights = "int8"', "float input": 'activations = "float"',
              "float": 'weights = "float"\nactivations = "float"'}
    return "\n".join(exact_name_rule(L, bodies[state[L]]) for L in sorted(state))
