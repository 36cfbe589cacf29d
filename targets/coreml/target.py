"""The iOS targets: ``ios17`` and ``ios18`` Core ML packages behind :class:`targets.base.Target`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnx

from edgeq.errors import InputError
from targets.base import Problem, Target
from targets.coreml import profile as profiles
from targets.coreml.lower import LoweringError, unsupported_nodes
from targets.coreml.lower.context import mil_name

COMPUTE = ("fp16", "fp32")


class CoreMLTarget(Target):
    """A Core ML ML program (``.mlpackage``) for one minimum iOS version.

    Options: ``compute`` — ``"fp16"`` (default: what the GPU and Neural Engine run) or ``"fp32"``;
    ``shapes`` — named dynamic axes fixed to a size (``{"batch": 1, "sequence": 128}``: every
    Shape-driven subgraph folds away, the model can run on the Neural Engine) or given a
    ``(lower, upper)`` range. Axes not listed stay flexible in 1..1024.
    """

    deployment = 18

    def __init__(self, *, compute: str = "fp16", shapes: Mapping[str, int | tuple[int, int]] | None = None):
        if compute not in COMPUTE:
            raise InputError(f"unknown compute precision {compute!r}", hint="use fp16 or fp32")
        for axis, v in (shapes or {}).items():
            ok = isinstance(v, int) and v > 0 or (isinstance(v, (tuple, list)) and len(v) == 2
                                                  and 0 < int(v[0]) <= int(v[1]))
            if not ok:
                raise InputError(f"shape for axis {axis!r} must be a size or a (lower, upper) range, got {v!r}")
        self.compute = compute
        self.shapes = dict(shapes or {})

    @property
    def profile(self):
        return profiles.IOS18 if self.deployment >= 18 else profiles.IOS17

    def preflight(self, model: onnx.ModelProto) -> list[Problem]:
        problems = [Problem(n.name, n.op_type, reason, hint)
                    for n, reason, hint in unsupported_nodes(model, deployment=self.deployment)]
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset > 23:
            problems.append(Problem("", "model", f"ONNX opset {opset} is newer than the lowering knows (≤ 23)"))
        return problems

    def build(self, model_path: Path, model: onnx.ModelProto, folder: Path) -> tuple[Path, dict]:
        from targets.coreml.build import build_mlpackage

        dest = folder / f"{mil_name(Path(model_path).stem.split('.')[0])}.mlpackage"
        try:
            _, facts = build_mlpackage(model, dest, deployment=self.deployment, compute=self.compute,
                                       shapes=self.shapes, source_name=Path(model_path).name)
        except LoweringError as e:
            raise LoweringError(e.node, f"cannot package for {self.name}: {e.reason}", hint=e.hint) from e
        facts["runtime"] = {"package": "Core ML", "minimum_ios": f"{self.deployment}.0",
                            "minimum_macos": "14.0" if self.deployment == 17 else "15.0"}
        return dest, facts

    def readme(self, manifest: dict) -> str:
        from targets.coreml.readme import render

        return render(manifest)


class IOS17Target(CoreMLTarget):
    name = "ios17"
    description = "Core ML ML program for iOS 17+ (int8 weights; activation quantize/dequantize)"
    deployment = 17


class IOS18Target(CoreMLTarget):
    name = "ios18"
    description = "Core ML ML program for iOS 18+ (int8 and int4-block weights)"
    deployment = 18
