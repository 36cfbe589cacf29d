"""Float ONNX → QDQ ONNX: plan with a recipe and a target profile, then apply the plan."""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from edgeq import onnx_io
from edgeq.errors import InputError
from edgeq.passes.activation_qdq import ActivationQDQPass
from edgeq.passes.protect import ProtectOutliersPass
from edgeq.passes.smooth_quant import SmoothQuantPass
from edgeq.passes.weight_qdq import WeightQDQPass
from edgeq.quant import rounding
from edgeq.quant.activations import decide_activations, place_activations
from edgeq.quant import awq, gptq
from edgeq.quant.calibrate import CalibrationTable, calibrate
from edgeq.quant.plan import NodeNote, QuantPlan, make_plan
from edgeq.quant.protect import choose_protections, masked_name, protection_candidates
from edgeq.quant.profile import ONNXRUNTIME_CPU, PROFILES, TargetProfile
from edgeq.quant.recipes import Recipe, WeightFormat, resolve_recipe
from edgeq.quant.smooth import smoothing_candidates, smoothing_scales
from edgeq.validate.feeds import open_feeds


SMOOTHING_BATCHES = 4  # batches the smoothing pass looks at (MiniLM cosine: 0.9980 with 4 of 25, 0.9981 with all)


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
) -> QuantizeResult:
    """Quantize the ONNX file at ``model_path`` with ``recipe``; write the QDQ model to ``output``.

    ``calib`` (a sample name, ``.npz`` file or folder, or an iterable of feeds) is streamed once
    through the float model for recipes that quantize activations. With ``output=None`` only
    the plan is made (``--explain``), without calibration.
    """
    t0 = time.perf_counter()
    rec = resolve_recipe(recipe, block=block)
    prof = resolve_profile(profile)
    if output is not None:
        onnx_io.check_output_path(output, force=force)
    if output is not None and rec.needs_calibration and calib is None:
        raise InputError(f"recipe {rec.name} quantizes activations and needs calibration data",
                         hint="pass --calib (a sample name such as minilm, an .npz file or a folder of them)")
    model = onnx_io.load_ir(model_path)
    float_bytes = onnx_io.tensor_bytes(model)
    name_nodes(model)
    plan = make_plan(model, rec, profile=prof)
    _check_weights_finite(model, plan)
    ideal = ideal_bytes(plan, model)
    placement = place_activations(model, plan, rec, prof) if rec.quantizes_activations else None
    if output is None:
        if placement is not None:
            plan = replace(plan, floats=plan.floats + placement.notes)
        return QuantizeResult(None, plan, float_bytes, 0, ideal, time.perf_counter() - t0)
    table = None
    input_means: dict[str, np.ndarray] = {}
    rounded: dict[str, rounding.RoundedWeight] = {}
    gptq_factors: dict[str, np.ndarray] = {}
    gram_of: dict[str, str] = {}
    algorithms: list[str] = []
    wants_gptq = rec.rounding == "gptq" and bool(_gptq_inputs(model, plan))
    wants_awq = rec.awq and bool(awq.awq_candidates(model, plan))
    wants_protect = rec.protect_outliers and bool(protection_candidates(model, plan))
    for name, wanted in (("gptq", wants_gptq), ("awq", wants_awq), ("protect", wants_protect)):
        if wanted and calib is None:
            algorithms.append(f"{name}: not run — no calibration data (pass --calib)")
    if rec.needs_calibration or ((wants_gptq or wants_awq or wants_protect) and calib is not None):
        absmax: dict[str, np.ndarray] = {}
        if placement is not None and (rec.smoothing != "off" or wants_protect):
            # W8A8: outlier channels are a property of the model, visible in any few batches: a
            # short first pass finds them, the full pass then calibrates the rewritten graph.
            candidates = smoothing_candidates(model, placement) if rec.smoothing != "off" else []
            to_protect = protection_candidates(model, plan) if wants_protect else {}
            watch = sorted({t for t, _ in candidates} | set(to_protect))
            if watch:
                raw, desc = open_feeds(calib, split="calibration")
                proto = ir.to_proto(model)
                pre = calibrate(proto, [], itertools.islice(raw, SMOOTHING_BATCHES), specs=onnx_io.io_specs(proto),
                                config=rec.calibration, source=desc, progress=progress, channels=watch)
                del proto
                # a tensor with masking constants stays float later anyway: leave it alone
                absmax = {t: a for t, a in pre.channel_absmax.items() if t not in pre.channel_masked}
                if to_protect:
                    absmax = _protect(model, rec, to_protect, absmax, algorithms)
                    placement = place_activations(model, plan, rec, prof)
                if rec.smoothing != "off":
                    candidates = [(t, c) for t, c in smoothing_candidates(model, placement) if t in absmax]
                    SmoothQuantPass(smoothing_scales(model, candidates, absmax, rec.smoothing, rec.smoothing_alpha))(model)
                    placement = place_activations(model, plan, rec, prof)
        weight_only = placement is None
        to_protect = protection_candidates(model, plan) if wants_protect and weight_only else {}
        mean_of = _bias_correction_inputs(model, plan) if rec.bias_correction else {}
        gram_of = _gptq_inputs(model, plan) if wants_gptq else {}  # after smoothing: the tensors MatMuls now read
        awq_of = awq.awq_candidates(model, plan) if wants_awq else {}
        moments = rounding.moments_for(model, plan, rec.conv_rounding)
        raw, desc = open_feeds(calib, split="calibration")
        proto = ir.to_proto(model)
        tensors = placement.tensors if placement is not None else []
        table = calibrate(proto, tensors, raw, specs=onnx_io.io_specs(proto), config=rec.calibration,
                          source=desc, progress=progress, dtypes={t: onnx.TensorProto.FLOAT for t in tensors},
                          means=sorted(set(mean_of.values())), grams=sorted(set(gram_of.values()) | set(awq_of)),
                          channels=sorted(to_protect), taps=rounding.taps(moments))
        del proto
        rounded = rounding.round_weights(model, plan, moments, centered=set(mean_of))
        input_means = {node: table.channel_mean[t] for node, t in mean_of.items() if t in table.channel_mean}
        grams = dict(table.gram)
        if to_protect:  # weight-only: protect from the full calibration's maxima, then follow the Grams
            absmax = {t: a for t, a in table.channel_absmax.items() if t not in table.channel_masked}
            for p in _apply_protection(model, rec, to_protect, absmax, algorithms):
                g = grams.get(p.tensor)
                if g is not None:  # the quantized MatMuls read x with channels P zeroed
                    g = g.copy()
                    g[p.channels, :] = 0.0
                    g[:, p.channels] = 0.0
                    grams[masked_name(p.tensor)] = g
        if wants_awq:
            awq_of = awq.awq_candidates(model, plan)
            scalings, alphas = awq.awq_scales(model, awq_of, grams)
            SmoothQuantPass(scalings)(model)
            for sm in scalings:  # the MatMuls now read x / s: their Gram follows exactly
                grams[f"{sm.tensor}_smoothed"] = awq.scaled_gram(grams[sm.tensor], sm.scale)
            algorithms.append(f"awq: {len(scalings)} of {len(awq_of)} MatMul inputs scaled"
                              + (f" (α {min(alphas.values()):g}–{max(alphas.values()):g})" if alphas else ""))
        gram_of = _gptq_inputs(model, plan) if wants_gptq else {}
        factors = {t: gptq.prepare_hessian(grams[t], rec.gptq_damp) for t in set(gram_of.values()) if t in grams}
        gptq_factors = {node: factors[t] for node, t in gram_of.items() if factors.get(t) is not None}
        if placement is not None:
            decisions, dropped = decide_activations(placement, table)
            op_of = {n.name: n.op_type for n in model.graph}
            dropped = tuple(replace(n, op_type=n.op_type or op_of.get(n.node, "")) for n in dropped)
            plan = replace(plan, activations=decisions, floats=plan.floats + placement.notes + dropped,
                           integer_nodes=_still_integer(placement.integer_nodes, decisions))
    weight_pass = WeightQDQPass(plan, input_means=input_means, gptq_factors=gptq_factors,
                               quantized={k: r.quantized for k, r in rounded.items()})
    weight_pass(model)
    if wants_gptq and table is not None:
        done = weight_pass.gptq_nodes
        algorithms.append(f"gptq: {len(done)} MatMul/Gemm weights rounded with error compensation "
                          f"(damp {rec.gptq_damp:g}, {table.samples} calibration samples)")
        skipped = sorted(set(gram_of) - set(done))
        if skipped:
            algorithms.append(f"gptq: {len(skipped)} weights rounded to nearest (input Gram unusable): "
                              + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    plan = replace(plan, bias_corrected=tuple(weight_pass.bias_corrected), gptq=tuple(weight_pass.gptq_nodes),
                   algorithms=plan.algorithms + tuple(algorithms), notes=plan.notes + rounding.notes(rounded))
    if plan.activations:
        act_pass = ActivationQDQPass(plan.activations)
        act_pass(model)
        if act_pass.raised_scales:
            plan = replace(plan, notes=plan.notes + tuple(
                NodeNote(n, "", f"weight scale raised on {k} channel(s) so the int32 bias fits (near-dead channels)")
                for n, k in act_pass.raised_scales))
        if act_pass.float_biases:
            plan = replace(plan, floats=plan.floats + tuple(
                NodeNote(n, "", "bias kept float: it does not fit int32 at scale s_in*s_w") for n in act_pass.float_biases))
    model.metadata_props["edgeq.recipe"] = rec.name
    model.metadata_props["edgeq.profile"] = prof.name
    model.metadata_props["edgeq.summary"] = json.dumps(plan.summary(), sort_keys=True)
    if table is not None:
        model.metadata_props["edgeq.calibration_sha256"] = table.data_sha256
        model.metadata_props["edgeq.calibration"] = json.dumps(
            {"method": rec.calibration.method, "batches": table.batches, "samples": table.samples}, sort_keys=True)
    files = onnx_io.save_ir(model, output, force=force)
    size = sum(f.stat().st_size for f in files)
    return QuantizeResult(Path(output), plan, float_bytes, size, ideal, time.perf_counter() - t0, table)


def _bias_correction_inputs(model: ir.Model, plan: QuantPlan) -> dict[str, str]:
    """node -> the input tensor whose channel means bias correction needs (Conv/Gemm with a constant bias)."""
    nodes = {n.name: n for n in model.graph}
    out = {}
    for d in plan.weights:
        n = nodes[d.node]
        if n.op_type in ("Conv", "Gemm") and len(n.inputs) > 2 and n.inputs[2] is not None \
                and n.inputs[2].const_value is not None and n.inputs[0] is not None and n.inputs[0].const_value is None:
            out[d.node] = n.inputs[0].name
    return out


def _protect(model: ir.Model, rec: Recipe, candidates, absmax: dict[str, np.ndarray], algorithms: list[str]
             ) -> dict[str, np.ndarray]:
    """Apply outlier protection; returns ``absmax`` extended with the masked tensors' maxima."""
    absmax = dict(absmax)
    for p in _apply_protection(model, rec, candidates, absmax, algorithms):
        a = absmax[p.tensor].copy()
        a[p.channels] = 0.0  # exactly what the mask leaves
        absmax[masked_name(p.tensor)] = a
    return absmax


def _apply_protection(model: ir.Model, rec: Recipe, candidates, absmax, algorithms: list[str]):
    """Choose and apply outlier protection from channel maxima; returns the protections."""
    chosen = choose_protections(model, {t: c for t, c in candidates.items() if t in absmax}, absmax,
                                ratio=rec.protect_ratio, max_channels=rec.protect_max_channels)
    ProtectOutliersPass(chosen)(model)
    algorithms.extend(_protection_lines(chosen, len(candidates)))
    return chosen


def _protection_lines(chosen, candidates: int) -> list[str]:
    channels = sum(p.channels.size for p in chosen)
    kb = sum(p.float_bytes for p in chosen) / 1024
    macs = sum(p.macs_per_row for p in chosen)
    return [f"protect: {channels} outlier channels of {len(chosen)} of {candidates} MatMul inputs run in float "
            f"(+{kb:.1f} KB float weights, +{macs} MACs per token/pixel)"] + [f"  protected {p.describe()}" for p in chosen]


def _gptq_inputs(model: ir.Model, plan: QuantPlan) -> dict[str, str]:
    """node -> the activation tensor whose Gram GPTQ needs: MatMul/Gemm ``x · W`` with a 2-D int weight."""
    nodes = {n.name: n for n in model.graph}
    out = {}
    for d in plan.weights:
        n = nodes[d.node]
        if not gptq.supports(d, d.shape) or d.input_index != 1:
            continue
        if n.op_type == "Gemm" and n.attributes.get_int("transA", 0):
            continue
        x = n.inputs[0]
        if x is not None and x.const_value is None:
            out[d.node] = x.name
    return out


def _still_integer(integer_nodes, decisions) -> tuple[str, ...]:
    """Integer ops all of whose quantized inputs survived calibration."""
    fed: dict[str, int] = {}
    for d in decisions:
        for c in d.consumers:
            fed[c] = fed.get(c, 0) + 1
    return tuple(n for n in integer_nodes if n in fed)


def _check_weights_finite(model: ir.Model, plan: QuantPlan) -> None:
    for d in plan.weights:
        v = model.graph.initializers.get(d.weight)
        if v is None or v.const_value is None:
            continue
        w = v.const_value.numpy()
        if not np.all(np.isfinite(w)):
            raise InputError(f"weight {d.weight} of node {d.node} ({d.op_type}) has NaN or infinite values",
                             hint="fix the model's weights (or exclude the node with a recipe rule)")


def name_nodes(model: ir.Model) -> None:
    """Give every unnamed (or duplicate-named) node a unique name: plans and reports refer to nodes by name."""
    taken: set[str] = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in taken:
            base = f"{node.op_type}_{i}"
            name, k = base, 1
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        taken.add(node.name)


def ideal_bytes(plan: QuantPlan, model: ir.Model) -> int:
    """Bytes of the weights at their planned bit width (scales and int4 zero points included), the rest float32."""
    bits = {WeightFormat.INT8: 8, WeightFormat.INT4: 4, WeightFormat.MXFP4: 4}
    planned = {d.weight: d for d in plan.weights}
    total = 0
    for v in model.graph.initializers.values():
        n = v.const_value.size if v.const_value is not None else 0
        d = planned.get(v.name)
        if d is None:
            total += v.const_value.nbytes if v.const_value is not None else 0
            continue
        total += n * bits[d.format] // 8
        groups = -(-n // d.block) if d.block else d.shape[d.axis]
        scale_bytes = 1 if d.format == WeightFormat.MXFP4 else 2 if d.scale_dtype == "float16" else 4
        total += groups * scale_bytes + (0 if d.symmetric else -(-groups // 2))  # int4 zero points: 4 bits
    return total
