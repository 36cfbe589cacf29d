"""The algorithm interface: each algorithm declares what it observes and returns its decisions as data.

An algorithm (outlier protection, smoothing, AWQ, GPTQ, Conv rounding, bias correction, int32
biases, activation ranges) is an :class:`Algorithm` handler for one frozen config type of
:mod:`edgeq.quant.recipes`. The quantize pipeline (:mod:`edgeq.pipeline.quantize`) runs them in
the order of :mod:`edgeq.quant.handlers`, stage by stage:

1. it asks every handler of the stage for the statistics it needs (:meth:`Algorithm.requests`:
   a tensor and a kind — its range, channel maxima, channel means, Gram, Conv patch moments);
2. it runs one calibration pass that feeds them all;
3. it asks each handler in turn to :meth:`~Algorithm.decide`: the handler returns the plan with
   its decisions added — and always an :class:`~edgeq.quant.plan.AlgorithmResult` saying what it
   did, what it cost, or why it did nothing.

A handler that rewrites the graph (protection, scaling) only *decides* the rewrite; the pipeline
applies it to its working copy with the same pass the final apply step uses, and the handler
records in :class:`Stats` what the statistics of the rewritten tensors are (they follow exactly:
a Gram of ``x / s`` is the Gram of ``x`` scaled), so the next handler reads the graph and the
statistics as they will be.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import onnx_ir as ir

from edgeq.quant.plan import AlgorithmResult, QuantPlan
from edgeq.quant.profile import TargetProfile
from edgeq.quant.recipes import Algorithms, Recipe


class Stage(enum.IntEnum):
    """When a handler's statistics are gathered."""

    # A short pass (PREPASS_BATCHES batches) over the float graph, before W8A8 activation placement:
    # outlier channels are a property of the model, visible in any few batches, and the rewrites
    # they lead to (protection, smoothing) change which tensors the main pass must observe.
    PREPASS = 0
    # The full calibration pass over the graph as the prepass decisions rewrote it.
    MAIN = 1


PREPASS_BATCHES = 4  # MiniLM W8A8 mean cosine: 0.9980 with 4 of 25 batches, 0.9981 with all


@dataclass(frozen=True)
class Request:
    """One statistic a handler needs: ``kind`` of tensor ``tensor``, made by ``make`` (shared by kind and tensor)."""

    kind: str  # "range" | "absmax" | "mean" | "gram" | "patches/<node>"
    tensor: str
    make: Callable[[], object]  # a fresh statistic: ``update(x)``, ``state_nbytes()``, ``result()``


class Stats:
    """What calibration learned, by (kind, tensor), plus what follows from the decided rewrites."""

    def __init__(self, values: dict[tuple[str, str], object] | None = None, *, samples: int = 0):
        self._values = dict(values or {})
        self.samples = samples  # calibration samples behind these statistics (0: none)

    def get(self, kind: str, tensor: str):
        return self._values.get((kind, tensor))

    def put(self, kind: str, tensor: str, value) -> None:
        """Record the statistic of a tensor a rewrite creates (e.g. the Gram of ``x / s``)."""
        self._values[(kind, tensor)] = value

    def of_kind(self, kind: str) -> dict[str, object]:
        return {t: v for (k, t), v in self._values.items() if k == kind}


class Memo:
    """Results worth keeping across quantizations of the same model on the same data (the budget search
    quantizes twice): calibration statistics and per-layer results (GPTQ codes, AWQ searches, Conv
    rounding), each keyed by a fingerprint of everything it depends on, so a hit is the same answer."""

    def __init__(self) -> None:
        self._store: dict = {}
        self.hits = 0

    def get(self, key, compute):
        """The value kept under ``key``, else ``compute()`` (kept unless it is None)."""
        if key in self._store:
            self.hits += 1
            return self._store[key]
        value = compute()
        if value is not None:
            self._store[key] = value
        return value

    def put(self, key, value) -> None:
        self._store[key] = value


def fingerprint(*parts) -> str:
    """A short stable digest of arrays, strings, numbers and tuples of them."""
    import hashlib

    import numpy as np

    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.dtype).encode() + str(p.shape).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"|")
    return h.hexdigest()


@dataclass
class Context:
    """What a handler sees: the working graph (float, with the rewrites decided so far), the recipe, the target."""

    model: ir.Model
    recipe: Recipe
    profile: TargetProfile
    has_data: bool  # calibration data was given
    memo: Memo = field(default_factory=Memo)
    progress: bool = False  # show a progress bar over long per-layer work
    # for a handler that runs the quantized graph on the calibration data (seq_bias), given by the pipeline,
    # which owns the passes that write Q/DQ and the feed readers (layers above this package): the calibration
    # feeds as a list, and the model with a plan's Q/DQ written (a copy)
    calib_feeds: Callable[[], list[dict]] | None = None
    write_qdq: Callable[[ir.Model, QuantPlan], ir.Model] | None = None

    def nodes(self) -> dict[str, ir.Node]:
        return {n.name: n for n in self.model.graph}

    def bar(self, items, desc: str, unit: str):
        """``items`` (a list), behind a progress bar when asked for and when there is enough to wait for."""
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit=unit, leave=False, disable=not self.progress or len(items) < 8 or None)

    def settings(self, node: ir.Node | str) -> Algorithms:
        """The algorithm settings for one node (the recipe's, or its first matching rule's)."""
        n = node if isinstance(node, ir.Node) else self.nodes()[node]
        return self.recipe.algorithms_for(n.op_type, n.name)


class Algorithm(ABC):
    """A handler: the statistics one algorithm needs and the decisions it makes from them."""

    name: ClassVar[str]
    config_type: ClassVar[type | None] = None  # its config in Recipe.algorithms (None: always runs)
    needs_data: ClassVar[bool] = True  # without calibration data it is skipped, with a result saying so

    def enabled(self, recipe: Recipe) -> bool:
        """Whether the recipe turns it on for some node."""
        return self.config_type is None or recipe.uses(self.name)

    def stage(self, recipe: Recipe) -> Stage:
        return Stage.MAIN

    def requests(self, ctx: Context, plan: QuantPlan) -> list[Request]:
        """The statistics to gather (on ``ctx.model`` as it is at the start of this handler's stage)."""
        return []

    @abstractmethod
    def decide(self, ctx: Context, plan: QuantPlan, stats: Stats) -> QuantPlan:
        """The plan with this algorithm's decisions and its :class:`AlgorithmResult` added."""

    def skipped(self, plan: QuantPlan, why: str) -> QuantPlan:
        """The plan with a result saying why this algorithm did nothing."""
        return add_result(plan, AlgorithmResult(self.name, why, ran=False))


def add_result(plan: QuantPlan, result: AlgorithmResult) -> QuantPlan:
    return replace(plan, algorithms=plan.algorithms + (result,))


def enabled_for_all(ctx: Context, consumers, algorithm: str):
    """The config of ``algorithm`` for a tensor read by ``consumers``: on only if on for every one (the first
    one's settings)."""
    nodes = ctx.nodes()
    configs = [getattr(ctx.recipe.algorithms_for(nodes[c].op_type, c), algorithm) for c in consumers]
    return configs[0] if configs and all(c is not None for c in configs) else None
