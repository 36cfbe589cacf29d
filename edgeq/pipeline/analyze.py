"""Per-layer sensitivity: how much output error each weighted layer's quantization causes.

The model is quantized once with the full recipe (calibration runs once). Each variant is then
derived from that QDQ graph by bypassing quantization: a bypassed layer gets its float node back
(original weights and bias, with an input scaling's exact row scaling kept),
and a bypassed activation Q/DQ pair routes its consumer to the float tensor. Activation Q/DQ pairs
belong to the node that reads them. For every layer L two variants run on the evaluation feeds:

- *only L*: L's weights and input activations quantized, everything else float;
- *all but L*: the full QDQ model with L back in float.

Errors are measured against the float model (SQNR over all feeds and the mean per-sample cosine;
with several outputs, the worst output). Rows are ranked most sensitive first: lowest SQNR with
only L quantized, then highest SQNR with all but L.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

from edgeq import onnx_io
from edgeq.errors import InputError
from edgeq.pipeline.quantize import quantize_model
from edgeq.pipeline.variants import Evaluator, Score, Variants, nan_low, prepare_float
from edgeq.quant.recipes import WeightFormat, resolve_recipe


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    op_type: str
    format: str
    only: Score  # only this layer quantized
    all_but: Score  # everything but this layer quantized

    def as_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "format": self.format,
                "only": self.only.as_dict(), "all_but": self.all_but.as_dict()}


@dataclass
class SensitivityReport:
    model: str
    recipe: str
    data: str
    feeds: int
    full: Score  # the whole recipe applied
    layers: list[LayerSensitivity] = field(default_factory=list)
    seconds: float = 0.0
    rank_by: str = "sqnr"

    def as_dict(self) -> dict:
        return {"model": self.model, "recipe": self.recipe, "data": self.data, "feeds": self.feeds,
                "rank_by": self.rank_by,
                "full": self.full.as_dict(), "layers": [row.as_dict() for row in self.layers],
                "seconds": round(self.seconds, 2)}

    def format(self) -> str:
        w = max([len("node"), *(len(r.node) for r in self.layers)])
        w = min(w, 60)
        lines = [
            f"sensitivity of {self.model} to {self.recipe} on {self.data} ({self.feeds} feeds); "
            f"all quantized: SQNR {self.full.sqnr_db:.1f} dB, cosine {self.full.cosine:.5f}; "
            f"ranked by {self.rank_by} with only the layer quantized, most sensitive first",
            f"{'rank':>4}  {'node':<{w}}  {'op':<10} {'format':<14} {'only: SQNR':>11} {'cosine':>9}"
            f"  {'all but: SQNR':>13} {'cosine':>9}",
        ]
        for i, r in enumerate(self.layers, 1):
            lines.append(f"{i:>4}  {r.node[:w]:<{w}}  {r.op_type:<10} {r.format:<14} {r.only.sqnr_db:>8.1f} dB "
                         f"{r.only.cosine:>9.5f}  {r.all_but.sqnr_db:>10.1f} dB {r.all_but.cosine:>9.5f}")
        if not self.layers:
            lines.append("  (no layer has quantized weights under this recipe)")
        return "\n".join(lines)


def sensitivity(model, recipe, calib=None, data=None, limit: int | None = None, progress: bool = True,
                *, block: int | None = None, profile=None, rank_by: str = "sqnr") -> SensitivityReport:
    """Rank the weighted layers of the float ONNX ``model`` by their sensitivity to ``recipe``.

    ``data`` (sample name, ``.npz`` file or folder, or an iterable of feeds) is the evaluation
    data; it defaults to the sample named like the model file (``minilm.onnx`` → ``minilm``).
    ``calib`` defaults to ``data`` (a sample's calibration split) for recipes that need it.
    ``limit`` uses only the first N evaluation feeds. ``rank_by`` is ``sqnr`` or ``cosine``
    (the metric the ranking sorts on, most sensitive first; the other breaks ties).
    """
    t0 = time.perf_counter()
    if rank_by not in ("sqnr", "cosine"):
        raise InputError(f"cannot rank by {rank_by!r}", hint="use sqnr or cosine")
    rec = resolve_recipe(recipe, block=block)
    model, data, float_proto, feeds, desc = prepare_float(model, data, limit)
    if calib is None and rec.uses_calibration:
        calib = data

    with tempfile.TemporaryDirectory(prefix="edgeq-analyze-") as tmp:
        # the plan's own graph: the profile's ORT fusions pack projections into one MatMul and fold scalings
        # into norms, so layers would no longer be found (or bypassed) one by one; the integers are the same
        res = quantize_model(model, os.path.join(tmp, "model.qdq.onnx"), rec, block=block, profile=profile,
                             calib=calib, force=True, progress=progress, fuse=False)
        qdq = onnx_io.read_onnx(res.path)
    plan = res.plan

    score = Evaluator(float_proto, feeds).score
    variants = Variants(float_proto, qdq, plan)
    full = score(variants.build_in_memory(set(variants.layers), None))

    fmt = _formats(plan)
    op_of = {d.node: d.op_type for d in plan.weights}
    rows = []
    from tqdm import tqdm

    for layer in tqdm(variants.layers, desc="sensitivity", unit="layer", disable=not progress or None, leave=False):
        only = score(variants.build_in_memory({layer}, {layer}))
        rest = set(variants.layers) - {layer}
        all_but = score(variants.build_in_memory(rest, None, float_acts={layer}))
        rows.append(LayerSensitivity(layer, op_of[layer], fmt[layer], only, all_but))
    first, second = ("sqnr_db", "cosine") if rank_by == "sqnr" else ("cosine", "sqnr_db")
    rows.sort(key=lambda r: (nan_low(getattr(r.only, first)), -nan_low(getattr(r.all_but, first)),
                             nan_low(getattr(r.only, second)), r.node))
    return SensitivityReport(str(model), rec.name, desc, len(feeds), full, rows, time.perf_counter() - t0, rank_by)


def _formats(plan) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for d in plan.weights:
        f = d.format.value + (f"/b{d.block}" if d.block and d.format in (WeightFormat.INT4, WeightFormat.MXFP4) else "")
        out.setdefault(d.node, []).append(f)
    acts: dict[str, set[str]] = {}
    for a in plan.activations:
        for c in a.consumers:
            acts.setdefault(c, set()).add(a.format.value)
    return {n: ",".join(fs) + ("".join(f" a:{x}" for x in sorted(acts.get(n, ())))) for n, fs in out.items()}
