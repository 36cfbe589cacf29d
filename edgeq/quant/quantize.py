"""Float ONNX → QDQ ONNX: plan with a recipe and a target profile, then apply the plan."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from edgeq import onnx_io
from edgeq.errors import UnsupportedError
from edgeq.passes.weight_qdq import WeightQDQPass
from edgeq.quant.plan import QuantPlan, make_plan
from edgeq.quant.profile import ONNXRUNTIME_CPU, PROFILES, TargetProfile
from edgeq.quant.recipes import Recipe, WeightFormat, resolve_recipe


@dataclass(frozen=True)
class QuantizeResult:
    path: Path | None
    plan: QuantPlan
    float_bytes: int
    quantized_bytes: int
    ideal_bytes: int  # every weight at its planned bit width plus scales; the rest float32
    seconds: float


def resolve_profile(profile: str | TargetProfile | None) -> TargetProfile:
    if profile is None:
        return ONNXRUNTIME_CPU
    if isinstance(profile, TargetProfile):
        return profile
    if profile not in PROFILES:
        from edgeq.errors import InputError

        raise InputError(f"unknown target profile {profile!r}", hint=f"use one of {', '.join(PROFILES)}")
    return PROFILES[profile]


def quantize_model(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None,
    recipe: str | Recipe,
    *,
    block: int | None = None,
    profile: str | TargetProfile | None = None,
    calib=None,
    force: bool = False,
) -> QuantizeResult:
    """Quantize the ONNX file at ``model_path`` with ``recipe``; write the QDQ model to ``output``.

    With ``output=None`` only the plan is made (``--explain``).
    """
    t0 = time.perf_counter()
    rec = resolve_recipe(recipe, block=block)
    prof = resolve_profile(profile)
    if output is not None:
        onnx_io.check_output_path(output, force=force)
    model = onnx_io.load_ir(model_path)
    float_bytes = onnx_io.tensor_bytes(model)
    name_nodes(model)
    plan = make_plan(model, rec, profile=prof)
    ideal = ideal_bytes(plan, model)
    if output is None:
        return QuantizeResult(None, plan, float_bytes, 0, ideal, time.perf_counter() - t0)
    if rec.needs_calibration:
        raise UnsupportedError(
            f"recipe {rec.name} quantizes activations, which needs calibration: not available in this version yet",
            hint="use a weight-only recipe (w8a16, w4a16, mxfp4)",
        )
    WeightQDQPass(plan)(model)
    model.metadata_props["edgeq.recipe"] = rec.name
    model.metadata_props["edgeq.profile"] = prof.name
    files = onnx_io.save_ir(model, output, force=force)
    size = sum(f.stat().st_size for f in files)
    return QuantizeResult(Path(output), plan, float_bytes, size, ideal, time.perf_counter() - t0)


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
    """Bytes of the weights at their planned bit width (scales included), the rest float32."""
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
        total += groups * (1 if d.format == WeightFormat.MXFP4 else 4)
    return total
