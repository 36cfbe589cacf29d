"""Float ONNX → QDQ ONNX in three steps: calibrate and decide (the plan), then apply it.

:func:`quantize_model` reads::

    model = import_onnx(path)           # weights as initializers, opset 21, BatchNorm folded, names
    plan  = make_plan(model, recipe, profile)          # weight formats, or float and why
    plan  = decide(model, plan, recipe, profile, data) # the algorithms, stage by stage
    apply_plan(model, plan, ...)                       # one declared pass pipeline

:func:`decide` never edits the user's model: it works on a copy. For each stage (see
:class:`~edgeq.quant.algorithms.Stage`) it gathers every statistic the stage's handlers request in
one calibration pass, then lets each handler decide in order; a rewrite a handler decides
(protection, scaling) is applied to the copy with the pass the apply step uses, so the next
handler and the next stage see the graph as it will be written. W8A8 therefore reads its data
twice: a short prepass (outlier channels) and the full pass (activation ranges on the rewritten
graph); weight-only recipes read it once.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeq import onnx_io
from edgeq.errors import InputError, UnsupportedError
from edgeq.passes.fuse_for_ort import FuseForOrtPass
from edgeq.pipeline.apply import apply_plan, rewrite_passes, with_qdq
from edgeq.pipeline.import_onnx import import_onnx
from edgeq.quant.activations import place_activations
from edgeq.quant.algorithms import PREPASS_BATCHES, Context, Memo, Stage, Stats
from edgeq.quant.calibrate import CalibrationTable, calibrate
from edgeq.quant.handlers import handlers_for
from edgeq.quant.plan import ImportStep, QuantPlan, WeightDecision, make_plan, weight_sites
from edgeq.quant.profile import ONNXRUNTIME_CPU, PROFILES, TargetProfile
from edgeq.quant.recipes import Recipe, WeightFormat, resolve_recipe
from edgeq.quant.weights import planned_bytes
from edgeq.runtime import single_threaded_blas
from edgeq.validate.feeds import open_feeds

NO_DATA = "not run — no calibration data (pass --calib)"


@dataclass(frozen=True)
class QuantizeResult:
    path: Path | None
    plan: QuantPlan
    float_bytes: int
    quantized_bytes: int
    ideal_bytes: int  # every weight at its planned bit width plus scales; the rest float32
    seconds: float
    calibration: CalibrationTable | None = None


def resolve_profile(profile: str | TargetProfile | None) -> TargetProfile:
    if profile is None:
        return ONNXRUNTIME_CPU
    if isinstance(profile, TargetProfile):
        return profile
    if profile in PROFILES:
        return PROFILES[profile]
    from edgeq import plugins

    if profile in plugins.target_names():  # a target's own profile: android, ios17, ios18, ...
        return plugins.load_target(profile).profile
    raise InputError(f"unknown target profile {profile!r}",
                     hint=f"use one of {', '.join([*PROFILES, *plugins.target_names()])}")


def quantize_model(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None,
    recipe: str | Recipe,
    *,
    block: int | None = None,
    profile: str | TargetProfile | None = None,
    calib=None,
    force: bool = False,
    progress: bool = True,
    memo: Memo | None = None,
    fuse: bool = True,
) -> QuantizeResult:
    """Quantize the ONNX file at ``model_path`` with ``recipe``; write the QDQ model to ``output``.

    ``calib`` (a sample name, ``.npz`` file or folder, or an iterable of feeds) is the calibration
    data, required by recipes that quantize activations and used by the data-aware algorithms.
    With ``output=None`` only the plan is made (``--explain``), without calibration. ``fuse=False``
    skips the profile's ONNX Runtime fusions (see :func:`fused_after_quantization`): the graph is then
    the one the plan names, layer by layer, with the same integers.
    """
    return quantize_for_profiles(model_path, [(profile, output)], recipe, block=block, calib=calib, force=force,
                                 progress=progress, memo=memo, fuse=fuse)[0]


def quantize_for_profiles(
    model_path: str | os.PathLike,
    targets: Sequence[tuple[str | TargetProfile | None, str | os.PathLike | None]],
    recipe: str | Recipe,
    *,
    block: int | None = None,
    calib=None,
    force: bool = False,
    progress: bool = True,
    memo: Memo | None = None,
    fuse: bool = True,
) -> list[QuantizeResult]:
    """One QDQ model per ``(profile, output)`` from one calibration (see :func:`decide`).

    Where the profiles run the same formats, their weights carry the same integers. ``fuse``: as in
    :func:`quantize_model`.
    """
    t0 = time.perf_counter()
    rec = resolve_recipe(recipe, block=block)
    profiles = [resolve_profile(p) for p, _ in targets]
    outputs = [o for _, o in targets]
    for output in outputs:
        if output is not None:
            onnx_io.check_output_path(output, force=force)
    if any(o is not None for o in outputs) and rec.needs_calibration and calib is None:
        raise InputError(f"recipe {rec.name} quantizes activations and needs calibration data",
                         hint="pass --calib (a sample name such as minilm, an .npz file or a folder of them)")
    model = load_model(model_path)
    float_bytes = onnx_io.tensor_bytes(model)
    # every profile plans on the portable graph: ORT's fusions are applied to its quantized graph afterwards
    plans = share_layouts([replace(make_plan(model, rec, profile=prof), imported=model.meta.get(IMPORT_STEPS, ()))
                           for prof in profiles], profiles)
    for plan in plans:
        _check_weights_finite(model, plan)
    _check_float32_weights(model, plans[0], model_path)
    ideals = [planned_bytes(plan, model) for plan in plans]
    if any(o is not None for o in outputs):
        for plan in plans:
            _check_something_quantized(model, plan, rec, model_path)
    if all(o is None for o in outputs):  # --explain: the plan and the placement, no data
        if rec.quantizes_activations:
            plans = [replace(plan, floats=plan.floats + place_activations(model, plan, rec, prof).notes)
                     for plan, prof in zip(plans, profiles)]
        return [QuantizeResult(None, plan, float_bytes, 0, ideal, time.perf_counter() - t0)
                for plan, ideal in zip(plans, ideals)]
    with single_threaded_blas():  # calibration alternates ORT runs with numpy statistics: see its docstring
        decided = decide(model, plans, rec, profiles, calib, progress=progress, memo=memo)
    results = []
    for i, ((plan, table), output) in enumerate(zip(decided, outputs)):
        ideal = planned_bytes(plan, model)  # as decided: an algorithm may keep a weight float (recurrent_check)
        qdq = model if i == len(decided) - 1 else model.clone()  # the last may edit it
        apply_plan(qdq, plan, rec, table)
        if fuse:
            qdq, plan = fused_after_quantization(qdq, plan, profiles[i])
        files = onnx_io.save_ir(qdq, output, force=force)
        size = sum(f.stat().st_size for f in files)
        results.append(QuantizeResult(Path(output), plan, float_bytes, size, ideal, time.perf_counter() - t0, table))
    return results


def share_layouts(plans: list[QuantPlan], profiles: Sequence[TargetProfile]) -> list[QuantPlan]:
    """The plans of one build with one layout per weight, so that every package carries the same integers.

    Profiles may lay out the same format differently where one runtime's kernel needs blocks and the
    other's form reads either: a tied embedding/output table is int8 in blocks along its rows on ONNX
    Runtime (GatherBlockQuantized and MatMulNBits read one packed table) and int8 per row elsewhere.
    Where a weight has the same format in every plan and some plans store it in blocks, the plans whose
    form is a DequantizeLinear (``dq``, ``tied_dq``) on a profile that runs int4 blocks for its ops (so its
    runtime dequantizes blocks: ONNX Runtime, Core ML iOS 18) take those blocks; otherwise each keeps its own.
    """
    if len(plans) < 2:
        return plans
    by_weight: dict[str, list[tuple[int, int]]] = {}
    for i, plan in enumerate(plans):
        for j, d in enumerate(plan.weights):
            by_weight.setdefault(d.weight, []).append((i, j))
    changed: dict[int, dict[int, WeightDecision]] = {}
    for where in by_weight.values():
        ds = [(i, j, plans[i].weights[j]) for i, j in where]
        if len({d.format for _, _, d in ds}) != 1:
            continue
        blocked = {(d.axis, d.block) for _, _, d in ds if d.block}
        if len(blocked) != 1 or all(d.block for _, _, d in ds):
            continue
        (axis, block), = blocked
        donor = next(plans[i].profile for i, _, d in ds if d.block)
        rows = [(i, j, d) for i, j, d in ds if not d.block]
        if not all(d.form in ("dq", "tied_dq") and profiles[i].supports(d.op_type, WeightFormat.INT4)
                   for i, _, d in rows):
            continue
        for i, j, d in rows:
            changed.setdefault(i, {})[j] = replace(
                d, axis=axis, block=block,
                reason=f"{d.reason}; blocks of {block} as on {donor} (the same integers in every package)")
    return [replace(plan, weights=tuple(changed[i].get(j, d) for j, d in enumerate(plan.weights)))
            if i in changed else plan for i, plan in enumerate(plans)]


def load_model(path: str | os.PathLike) -> ir.Model:
    """The float model as the plan sees it: through the import stage (weights as initializers, opset
    ≥ 21, BatchNorm folded, dims and nodes named). The import's steps are in ``model.meta``."""
    result = import_onnx(path)
    result.model.meta[IMPORT_STEPS] = result.steps
    return result.model


IMPORT_STEPS = "edgeq.import_steps"  # ir.Model.meta key (in memory only): the import's ImportSteps


def fused_after_quantization(qdq: ir.Model, plan: QuantPlan, profile: TargetProfile) -> tuple[ir.Model, QuantPlan]:
    """A quantized model with its transformer layers fused into ONNX Runtime's kernels, and the plan with that
    step added: a causal LM's RMSNorm, rotary embedding and attention (GroupQueryAttention, its query/key/value
    projections packed into one quantized MatMul) on every ``profile.ort_fusions`` profile; any other model's
    LayerNorm + residual, attention and GELU where ``profile.fuse_encoders`` too.

    Done after quantization, not before planning: the fused ops read the same quantized MatMuls (the packed
    projection's integers are its three projections' side by side), and the calibration and the weights'
    integers stay those of the unfused graph that other targets (Core ML) plan on too, so one build
    calibrates once for all and ships the same integers in every package. The model is returned unchanged
    where nothing matched.
    """
    causal_lm = CAUSAL_LM_KEY in qdq.metadata_props
    if not profile.ort_fusions or not (causal_lm or profile.fuse_encoders):
        return qdq, plan
    fused = qdq.clone()
    res = FuseForOrtPass()(fused)
    if not res.modified:
        return qdq, plan
    return fused, replace(plan, imported=(*plan.imported, _fusion_step(profile, res, " (on the quantized graph)")))


def _fusion_step(profile: TargetProfile, res, where: str) -> ImportStep:
    made = ", ".join(f"{op} {k}" for op, k in sorted(res.ops.items()))
    return ImportStep(f"fuse for {profile.name}{where}", sum(res.fused.values()),
                      f"onnxscript ORT fusions: {made}" if res.modified else "no transformer pattern matched")


def _calibration_feeds(calib):
    """The calibration feeds as a list, read when a handler asks (seq_bias runs the quantized graph on them)."""

    def read() -> list[dict]:
        feeds, _ = open_feeds(calib, split="calibration")
        return [dict(f) for f in feeds]

    return read


CAUSAL_LM_KEY = "edgeq.causal_lm"  # model metadata the causal LM export writes (edgeq.export.causal_lm)


@dataclass
class _Lane:
    """One profile's decisions in progress: its plan and its working copy of the graph."""

    plan: QuantPlan
    ctx: Context
    base: tuple = ()  # what made the lane's starting graph (the import's and fusion's steps)
    table: CalibrationTable | None = None
    stats: Stats | None = None

    def rewrites(self) -> tuple:
        """What has been rewritten so far: lanes with equal rewrites (and the same base graph) have identical
        working graphs."""
        return (self.base, tuple((p.tensor, p.consumers, p.channels.tobytes()) for p in self.plan.protections),
                tuple((s.tensor, s.consumers, s.scale.tobytes()) for s in self.plan.scalings))


def decide(models: ir.Model | Sequence[ir.Model], plans: Sequence[QuantPlan], recipe: Recipe,
           profiles: Sequence[TargetProfile], calib, *,
           progress: bool = True, memo: Memo | None = None) -> list[tuple[QuantPlan, CalibrationTable | None]]:
    """Every algorithm's decisions for each (plan, profile), stage by stage; ``model`` is not changed.

    Profiles whose working graphs are identical at a stage's start (the same rewrites so far)
    share that stage's calibration pass: the union of their requests is observed once. ``memo``
    (kept by a caller that quantizes the same model on the same data again, e.g. the budget
    search) reuses statistics already gathered and per-layer results already computed. Returns
    each finished plan with the table of its last calibration pass (None without data).
    """
    memo = memo or Memo()
    models = [models] * len(plans) if isinstance(models, ir.Model) else list(models)
    feeds = _calibration_feeds(calib) if calib is not None else None
    lanes = [_Lane(plan, Context(m.clone(), recipe, prof, has_data=calib is not None, memo=memo, progress=progress,
                                 calib_feeds=feeds, write_qdq=with_qdq),
                   tuple(m.meta.get(IMPORT_STEPS, ())))
             for m, plan, prof in zip(models, plans, profiles)]
    handlers = handlers_for(recipe)
    for stage in Stage:
        todo = []
        for h in (h for h in handlers if h.stage(recipe) == stage):
            if h.needs_data and calib is None:
                for lane in lanes:
                    lane.plan = h.skipped(lane.plan, NO_DATA)
            else:
                todo.append(h)
        groups: dict[tuple, list[_Lane]] = {}
        for lane in lanes:
            groups.setdefault(lane.rewrites(), []).append(lane)
        for rewrites, group in groups.items():
            table, values = _observe(group, todo, stage, calib, progress, memo, (stage, rewrites))
            for lane in group:
                lane.stats = Stats(values, samples=table.samples if table else 0)
                lane.table = table or lane.table
        for h in todo:
            for lane in lanes:
                before = len(lane.plan.protections), len(lane.plan.scalings)
                lane.plan = h.decide(lane.ctx, lane.plan, lane.stats)
                new = replace(lane.plan, protections=lane.plan.protections[before[0]:],
                              scalings=lane.plan.scalings[before[1]:])
                if new.protections or new.scalings:  # the next handler reads the graph as it will be written
                    ir.passes.Sequential(*rewrite_passes(new))(lane.ctx.model)
    return [(lane.plan, lane.table) for lane in lanes]


def _observe(group: list[_Lane], handlers, stage: Stage, calib, progress: bool, memo: Memo, where):
    """One calibration pass over the group's (identical) working graph for every request of ``handlers``
    that ``memo`` does not already hold (statistics of the same tensors of the same graph, same data)."""
    requests = {}
    for lane in group:
        for h in handlers:
            for r in h.requests(lane.ctx, lane.plan):
                requests.setdefault((r.kind, r.tensor), r)
    known = {key: memo.get(("stats", where, key), lambda: None) for key in requests}
    todo = {key: r for key, r in requests.items() if known[key] is None}
    table = memo.get(("table", where), lambda: None)
    if todo:
        objects = {key: r.make() for key, r in todo.items()}
        by_tensor: dict[str, list] = {}
        for (_, tensor), obj in objects.items():
            by_tensor.setdefault(tensor, []).append(obj)
        feeds, desc = open_feeds(calib, split="calibration")
        if stage == Stage.PREPASS:
            feeds = itertools.islice(feeds, PREPASS_BATCHES)
        proto = ir.to_proto(group[0].ctx.model)
        table = calibrate(proto, by_tensor, feeds, specs=onnx_io.io_specs(proto), source=desc, progress=progress)
        del proto
        memo.put(("table", where), table)
        for key, obj in objects.items():
            result = obj.result()
            known[key] = result if result is not None else _NOTHING
            memo.put(("stats", where, key), known[key])
    values = {k: v for k, v in known.items() if v is not None and v is not _NOTHING}
    return table, values


_NOTHING = object()  # memo: a statistic that saw nothing usable (so it is not gathered again)


def _check_something_quantized(model: ir.Model, plan: QuantPlan, recipe: Recipe, path) -> None:
    """A recipe that asks for quantized weights and finds none fails instead of writing a float model."""
    if plan.weights or recipe.default.weights.value == "float" and not recipe.rules:
        return
    name = Path(str(path)).name
    cov = plan.coverage()
    left = set(plan.weighted_float)
    if left and all(n.reason.startswith("excluded by") for n in plan.floats if n.node in left):
        return  # the recipe's own rules keep every weight float (e.g. what a --budget search chose)
    if cov["quantizable"]:
        raise UnsupportedError(f"{name}: recipe {recipe.name} left all {cov['quantizable']} weights float for profile "
                               f"{plan.profile}: {plan.float_reasons()}",
                               hint="see `edgeq quantize --explain`; change the recipe (or its rules) or the target")
    inside = _weights_in_subgraphs(model)
    if inside:
        raise UnsupportedError(f"{name}: its weights are inside subgraphs ({inside}); edgeq quantizes the "
                               "main graph's weights only", hint=_SUBGRAPH_HINT)
    ops = Counter(n.op_type for n in model.graph)
    listed = ", ".join(f"{op} ×{k}" if k > 1 else op for op, k in ops.most_common(8))
    raise UnsupportedError(f"{name} has no constant weight edgeq can quantize (Conv, ConvTranspose, MatMul, Gemm, "
                           f"Gather, GRU, LSTM with a constant weight); its nodes: {listed}",
                           hint="check that the weights are in the file; nothing was written")


_SUBGRAPH_HINT = ("export the branch your app runs as a model of its own (e.g. the PyTorch model for that input, "
                  "with torch.onnx.export) and quantize that; nothing was written")


def _weights_in_subgraphs(model: ir.Model) -> str:
    """Which If / Loop nodes of the main graph hold weighted ops in their subgraphs, and the graph
    inputs their condition comes from (silero-vad's whole network sits in the branches of an If on
    its ``sr`` input); "" if none do."""
    from edgeq.graph import subgraph_nodes

    inputs = {id(v) for v in model.graph.inputs}
    out = []
    for node in model.graph:
        ops = Counter(n.op_type for n in subgraph_nodes(node) if weight_sites(n))  # as the plan finds them
        if not ops:
            continue
        listed = ", ".join(f"{op} ×{k}" if k > 1 else op for op, k in sorted(ops.items()))
        decided = sorted(_graph_inputs_behind(node.inputs[0], inputs)) if node.inputs and node.inputs[0] else []
        when = f", condition from input {', '.join(repr(n) for n in decided)}" if decided else ""
        out.append(f"{node.op_type} {node.name!r}: {listed}{when}")
    return "; ".join(out)


def _graph_inputs_behind(value: ir.Value, inputs: set[int]) -> set[str]:
    """Names of the graph inputs ``value`` is computed from."""
    names, todo, seen = set(), [value], set()
    while todo:
        v = todo.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in inputs:
            names.add(v.name)
        elif v.producer() is not None:
            todo.extend(v.producer().inputs)
    return names


def _check_float32_weights(model: ir.Model, plan: QuantPlan, path) -> None:
    """A model that computes in float16 / bfloat16 is refused before calibration: the quantized graph's
    scales, biases and activations are float32 (its Conv would read float16 and float32 at once: a
    file ONNX Runtime cannot load), and ONNX Runtime's CPU kernels have no float16 Conv."""
    narrow = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    found = []
    for d in plan.weights:
        v = model.graph.initializers.get(d.weight)
        if v is not None and v.dtype in narrow:
            found.append(f"{d.node} ({d.op_type}, {v.dtype.name.lower()})")
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise UnsupportedError(f"{Path(str(path)).name} computes in 16-bit floats: weights of "
                               f"{', '.join(found[:3])}{more}; edgeq quantizes float32 models",
                               hint="export the model in float32 (e.g. model.float() before torch.onnx.export) and "
                                    "feed float32 data; nothing was written")


def _check_weights_finite(model: ir.Model, plan: QuantPlan) -> None:
    for d in plan.weights:
        v = model.graph.initializers.get(d.weight)
        if v is None or v.const_value is None:
            continue
        w = v.const_value.numpy()
        if not np.all(np.isfinite(w)):
            raise InputError(f"weight {d.weight} of node {d.node} ({d.op_type}) has NaN or infinite values",
                             hint="fix the model's weights (or exclude the node with a recipe rule)")
