"""The iOS targets: ``ios17`` and ``ios18`` Core ML packages behind :class:`targets.base.Target`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx

from edgeq.errors import InputError
from edgeq.onnx_io import default_opset
from targets.base import Problem, Target
from targets.coreml import profile as profiles
from targets.coreml.lower import LoweringError, unsupported_nodes
from targets.coreml.lower.context import axis_name, mil_name

COMPUTE = ("fp16", "fp32")


class CoreMLTarget(Target):
    """A Core ML ML program (``.mlpackage``) for one minimum iOS version.

    Options (keyword arguments; an unknown one is an :class:`InputError` naming it):

    - ``compute`` — ``"fp16"`` (default: what the GPU and Neural Engine run) or ``"fp32"``.
    - ``shapes`` — named dynamic axes (the ONNX ``dim_param``) fixed to a size
      (``{"batch": 1, "sequence": 128}``: every Shape-driven subgraph folds away, the model can run
      on the Neural Engine) or given a ``(lower, upper)`` range. Axes not listed stay flexible in
      1..1024; naming an axis the model does not have fails in pre-flight.

    - ``max_context`` — a causal LM (edgeq's explicit-cache graph) is packaged for iOS 18 with its
      KV cache as Core ML state of this many positions (default 2048 or the model's limit,
      whichever is smaller; :mod:`targets.coreml.lower.stateful`), with its tokenizer and
      generation config. iOS 17 has no state: the cache stays explicit inputs and outputs.

    ``edgeq package --compute fp32 --shape batch=1 --shape sequence=1:512`` (``--max-context N``)
    passes these through :meth:`configure`.
    """

    deployment = 18
    OPTIONS: ClassVar[dict[str, str]] = {"compute": "fp16 | fp32", "shapes": "{axis: size | (lower, upper)}",
                                         "max_context": "KV cache positions of a causal LM (iOS 18 state)"}

    def __init__(self, *, compute: str = "fp16", shapes: Mapping[str, int | tuple[int, int]] | None = None,
                 max_context: int | None = None, **unknown):
        if unknown:
            raise InputError(f"target {self.name} has no option {', '.join(repr(k) for k in sorted(unknown))}",
                             hint="options: " + "; ".join(f"{k} ({v})" for k, v in self.OPTIONS.items()))
        if compute not in COMPUTE:
            raise InputError(f"unknown compute precision {compute!r} for target {self.name}", hint="use fp16 or fp32")
        if shapes is not None and not isinstance(shapes, Mapping):
            raise InputError(f"shapes must map axis names to sizes or ranges, got {shapes!r}")
        if max_context is not None and not (isinstance(max_context, (int, np.integer)) and max_context >= 2
                                            and not isinstance(max_context, bool)):
            raise InputError(f"max_context must be a number of positions >= 2, got {max_context!r}",
                             hint="e.g. --max-context 2048")
        if max_context is not None and self.deployment < 18:
            raise InputError(f"target {self.name} cannot keep a KV cache as state (Core ML states need iOS 18)",
                             hint="package for ios18, or leave out --max-context")
        self.compute = compute
        self.shapes = {axis: _axis_option(axis, v) for axis, v in (shapes or {}).items()}
        self.max_context = None if max_context is None else int(max_context)

    def configure(self, **options) -> CoreMLTarget:
        """A copy of this target with ``options`` changed (validated like the constructor's)."""
        return type(self)(**{"compute": self.compute, "shapes": self.shapes, "max_context": self.max_context,
                             **options})

    @property
    def profile(self):
        return profiles.IOS18 if self.deployment >= 18 else profiles.IOS17

    def acceptance(self, qdq_path: Path, package, float_path: Path, feeds: list) -> list[dict]:
        """A W8A8 package (activations quantized) is judged segment by segment against its QDQ ONNX and
        by its fidelity next to the QDQ ONNX's (:mod:`targets.coreml.acceptance`): fp16 moves
        activations across code boundaries, so end to end it cannot match the exact QDQ math."""
        if not package.manifest.get("qdq_summary", {}).get("activation_qdq"):
            return []
        from targets.coreml.acceptance import w8a8_acceptance

        return [{**c, "op": ">="} for c in w8a8_acceptance(qdq_path, package.model_file, float_path, feeds).checks]

    def preflight(self, model: onnx.ModelProto) -> list[Problem]:
        self._check_axes(model)
        self.kv_cache(model)  # a bad max_context fails here, before anything is written
        problems = [Problem(n.name, n.op_type, reason, hint)
                    for n, reason, hint in unsupported_nodes(model, deployment=self.deployment, shapes=self.shapes)]
        opset = default_opset(model)
        if opset > self.profile.max_opset:
            problems.append(Problem("", "model", f"ONNX opset {opset} is newer than the lowering knows "
                                                 f"(≤ {self.profile.max_opset})",
                                    f"export the model at opset {self.profile.max_opset} or lower, or convert "
                                    "it with onnx.version_converter"))
        return problems

    @staticmethod
    def _axis_names(model: onnx.ModelProto) -> set[str]:
        """The model's dynamic axes, by the names ``shapes`` takes (see lower.context.axis_name)."""
        inits = {i.name for i in model.graph.initializer}
        return {axis_name(vi.name, i, d)
                for vi in model.graph.input if vi.name not in inits
                for i, d in enumerate(vi.type.tensor_type.shape.dim)
                if not (d.HasField("dim_value") and d.dim_value > 0)}

    def _check_axes(self, model: onnx.ModelProto) -> None:
        """Every axis named in ``shapes`` must be a dynamic axis of a model input."""
        axes = self._axis_names(model)
        unknown = sorted(set(self.shapes) - axes)
        if unknown:
            raise InputError(f"the model has no dynamic axis {', '.join(repr(a) for a in unknown)} (shapes option)",
                             hint=f"its dynamic axes: {', '.join(sorted(axes)) or 'none (every input shape is fixed)'}")

    def kv_cache(self, model: onnx.ModelProto):
        """The KV cache as states for a causal LM graph on iOS 18, else None (see ``max_context``)."""
        from targets.coreml.llm import max_positions
        from targets.coreml.lower.stateful import cache_spec, is_causal_lm_graph

        if self.deployment < 18 or not is_causal_lm_graph(model):
            if self.max_context is not None:
                raise InputError("max_context applies to causal LMs exported by edgeq (an explicit KV cache); "
                                 "this model has none", hint="leave out --max-context")
            return None
        return cache_spec(model, self.max_context, max_positions(model))

    def build(self, model_path: Path, model: onnx.ModelProto, folder: Path) -> tuple[Path, dict]:
        from targets.coreml.build import build_mlpackage
        from targets.coreml.llm import write_llm_files

        dest = folder / f"{mil_name(Path(model_path).stem.split('.')[0])}.mlpackage"
        kv_cache = self.kv_cache(model)
        try:
            _, facts = build_mlpackage(model, dest, deployment=self.deployment, compute=self.compute,
                                       shapes=self.shapes, source_name=Path(model_path).name, kv_cache=kv_cache)
        except LoweringError as e:
            raise LoweringError(e.node, f"cannot package for {self.name}: {e.reason}", hint=e.hint) from e
        facts["options"] = {"compute": self.compute,
                            "shapes": {k: list(v) if isinstance(v, tuple) else v for k, v in self.shapes.items()}}
        if kv_cache is not None:
            facts.update(write_llm_files(model, folder, dest.name, kv_cache))
            facts["options"]["max_context"] = kv_cache.max_context  # the one used (given or default)
        facts["runtime"] = {"package": "Core ML", "minimum_ios": f"{self.deployment}.0",
                            "minimum_macos": "14.0" if self.deployment == 17 else "15.0"}
        return dest, facts

    def readme(self, manifest: dict) -> str:
        from targets.coreml.llm import readme_section
        from targets.coreml.readme import render

        return render(manifest) + (readme_section(manifest) if "causal_lm" in manifest else "")


def _axis_option(axis: str, v) -> int | tuple[int, int]:
    """A fixed size (int > 0) or a (lower, upper) range with 0 < lower <= upper."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0:
        return int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(b, (int, np.integer)) for b in v):
        lo, hi = int(v[0]), int(v[1])
        if 0 < lo <= hi:
            return (lo, hi) if lo < hi else lo
    raise InputError(f"shape for axis {axis!r} must be a size > 0 or a (lower, upper) range with "
                     f"0 < lower <= upper, got {v!r}", hint="e.g. --shape batch=1 --shape sequence=1:512")


class IOS17Target(CoreMLTarget):
    name = "ios17"
    description = "Core ML ML program for iOS 17+ (int8 weights; activation quantize/dequantize)"
    deployment = 17


class IOS18Target(CoreMLTarget):
    name = "ios18"
    description = "Core ML ML program for iOS 18+ (int8 and int4-block weights)"
    deployment = 18
