"""Export an ``nn.Module`` to ONNX and prove the export computes what torch computes.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), followed by
onnxscript's optimizer. Only when that path fails does edgeq fall back to the TorchScript
exporter, and it says so in the result. Every export is then run in ONNX Runtime on the example
inputs and on fresh random inputs of other sizes along each dynamic axis; an output whose SQNR
against torch is below ``min_sqnr_db`` fails the export, and nothing is written.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeq import onnx_io
from edgeq._quiet import quiet
from edgeq.errors import ExportError, InputError
from edgeq.specs import DEFAULT_DYNAMIC_SIZE, TensorSpec, check_feed
from edgeq.validate.metrics import sqnr_db

DEFAULT_OPSET = 21  # blocked INT4 DequantizeLinear needs opset 21


@dataclass(frozen=True)
class ExportCheck:
    """ONNX vs torch on one feed and one output."""

    feed: str
    output: str
    shape: tuple[int, ...]
    sqnr_db: float
    max_abs_err: float


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_torch` wrote and how it knows the file is right."""

    path: Path
    files: tuple[Path, ...]
    exporter: str  # "dynamo" or "torchscript"
    fallback_reason: str | None
    opset: int
    inputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    checks: tuple[ExportCheck, ...] = field(default=())
    seconds: float = 0.0

    @property
    def min_sqnr_db(self) -> float:
        return min((c.sqnr_db for c in self.checks), default=float("inf"))


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise InputError(
            "exporting a PyTorch model needs torch, which is not installed",
            hint="pip install torch==2.13.0 'edgeq[torch]'",
        ) from e
    return torch


def summarize_exception(e: BaseException, limit: int = 400) -> str:
    """One line out of a (often very long) torch exception."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines()]
    if "## Exception summary" in lines:  # torch.onnx's exporter report
        rest = [ln for ln in lines[lines.index("## Exception summary") + 1 :] if ln]
        if rest:
            text = rest[0]
    else:
        text = next((ln for ln in lines if ln), type(e).__name__)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = re.sub(r"^<class '([\w.]+)'>: ", lambda m: m.group(1).rsplit(".", 1)[-1] + ": ", text)
    return (text[: limit - 3] + "...") if len(text) > limit else text


def _flatten_outputs(out) -> tuple[list, list[str] | None]:
    """Tensors out of a module's return value, with names when it returned a mapping."""
    torch = _import_torch()
    if isinstance(out, torch.Tensor):
        return [out], None
    if isinstance(out, Mapping):
        names, tensors = [], []
        for k, v in out.items():
            if not isinstance(v, torch.Tensor):
                raise ExportError(
                    f"the model returned a dict whose value {k!r} is a {type(v).__name__}; edgeq exports "
                    "models that return tensors, tuples/lists of tensors or a dict of tensors"
                )
            names.append(str(k))
            tensors.append(v)
        return tensors, names
    if isinstance(out, (tuple, list)):
        tensors = []
        for v in out:
            sub, _ = _flatten_outputs(v)
            tensors.extend(sub)
        return tensors, None
    raise ExportError(
        f"the model returned a {type(out).__name__}; edgeq can export models that return tensors, "
        "tuples/lists of tensors or a dict of tensors"
    )


def run_torch(module, feed: Mapping[str, np.ndarray], input_names: Sequence[str]) -> list[np.ndarray]:
    """Run ``module`` on ``feed`` (positional in ``input_names`` order) and return numpy outputs."""
    torch = _import_torch()
    args = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_names)
    with torch.no_grad():
        out = module(*args)
    tensors, _ = _flatten_outputs(out)
    return [t.detach().cpu().numpy() for t in tensors]


def _default_output_names(module, example: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> list[str]:
    torch = _import_torch()
    args = tuple(torch.from_numpy(example[s.name]) for s in specs)
    with torch.no_grad():
        out = module(*args)
    tensors, names = _flatten_outputs(out)
    if names:
        return names
    return ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]


def _dynamo_export(module, args, specs, output_names, opset):
    torch = _import_torch()
    dims: dict[str, object] = {}
    dynamic_shapes = []
    for s in specs:
        axes = {}
        for axis, name in s.dynamic_axes.items():
            if name not in dims:
                dims[name] = torch.export.Dim(name)
            axes[axis] = dims[name]
        dynamic_shapes.append(axes or None)
    program = torch.onnx.export(
        module,
        args,
        input_names=[s.name for s in specs],
        output_names=list(output_names),
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=tuple(dynamic_shapes) if dims else None,
        optimize=True,
        verbose=False,
    )
    return program.model


def _torchscript_export(module, args, specs, output_names, opset, tmpdir: Path) -> ir.Model:
    torch = _import_torch()
    dynamic_axes = {s.name: dict(s.dynamic_axes) for s in specs if s.dynamic_axes}
    path = tmpdir / "torchscript.onnx"
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=[s.name for s in specs],
        output_names=list(output_names),
        opset_version=opset,
        dynamo=False,
        dynamic_axes=dynamic_axes or None,
    )
    model = onnx_io.load_ir(path)
    path.unlink()
    return model


def _clean(model: ir.Model) -> ir.Model:
    """Constant folding and common-subexpression cleanup with onnxscript's optimizer."""
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


def _check_against_torch(
    module, path: Path, specs: Sequence[TensorSpec], output_names: Sequence[str], example, *, random_checks, seed
) -> list[ExportCheck]:
    from edgeq.runtime import ort_session

    sess = ort_session(path, what=" (the exported model)", error=ExportError,
                       hint="the exporter wrote a graph ONNX Runtime refuses; try --opset or the TorchScript exporter")
    onnx_outputs = [o.name for o in sess.get_outputs()]
    feeds: list[tuple[str, dict]] = [("example", example)]
    rng = np.random.default_rng(seed)
    names = sorted({d for s in specs for d in s.dynamic_axes.values()})
    example_sizes = {}
    for s in specs:
        for axis, d in s.dynamic_axes.items():
            example_sizes[d] = example[s.name].shape[axis]
    for k in range(random_checks):
        sizes = {d: example_sizes.get(d, DEFAULT_DYNAMIC_SIZE) + k + 1 for d in names}
        label = f"random {k + 1}" + (f" ({', '.join(f'{d}={v}' for d, v in sizes.items())})" if sizes else "")
        feeds.append((label, {s.name: s.random(rng, sizes) for s in specs}))
    checks = []
    for label, feed in feeds:
        want = run_torch(module, feed, [s.name for s in specs])
        try:
            got = sess.run(onnx_outputs, feed)
        except Exception as e:
            raise ExportError(
                f"the exported ONNX fails in ONNX Runtime on the {label} inputs: {summarize_exception(e)}",
                hint="a dynamic axis may have been fixed during export; check the input spec",
            ) from e
        for name, w, g in zip(output_names, want, got):
            if w.shape != g.shape:
                raise ExportError(
                    f"output {name!r} has shape {list(g.shape)} in ONNX but {list(w.shape)} in torch "
                    f"on the {label} inputs",
                    hint="a dynamic axis was probably fixed at its example size during export",
                )
            err = np.abs(w.astype(np.float64) - g.astype(np.float64)) if w.size else np.zeros(1)
            checks.append(ExportCheck(label, name, tuple(w.shape), sqnr_db(w, g), float(np.nanmax(err))))
    return checks


def export_torch(
    module,
    inputs: Sequence[TensorSpec],
    output: str | os.PathLike,
    *,
    example_inputs: Mapping[str, np.ndarray] | None = None,
    sizes: Mapping[str, int] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    fallback: bool = True,
    check: bool = True,
    min_sqnr_db: float = 60.0,
    random_checks: int = 2,
    seed: int = 0,
    force: bool = False,
    verbose: bool = False,
    external_data_threshold: int = onnx_io.EXTERNAL_DATA_THRESHOLD_BYTES,
) -> ExportResult:
    """Export ``module`` to ONNX at ``output``, check it against torch, and return what happened.

    ``inputs`` name the positional arguments of ``module.forward`` in order; string dimensions
    are dynamic axes. Example inputs come from ``example_inputs`` or are drawn from the specs
    (dynamic axes at ``sizes``). Raises :class:`ExportError` if neither exporter can export the
    model or the ONNX output differs from torch, :class:`InputError` for bad specs or paths.
    """
    t0 = time.perf_counter()
    out_path = onnx_io.check_output_path(output, force=force)
    torch = _import_torch()
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module to export, got {type(module).__name__}")
    specs = list(inputs)
    if not specs:
        raise InputError("no input specs given", hint="describe each input, e.g. --input x:float32[batch,3,224,224]")
    if len({s.name for s in specs}) != len(specs):
        raise InputError("input names must be unique", hint=", ".join(s.name for s in specs))
    module = module.eval()
    if example_inputs is None:
        rng = np.random.default_rng(seed)
        example = {s.name: s.random(rng, sizes) for s in specs}
    else:
        example = {k: np.asarray(v) for k, v in example_inputs.items()}
    check_feed(example, specs, where="example inputs")
    spec_text = ", ".join(str(s) for s in specs)
    try:
        names = list(output_names) if output_names else _default_output_names(module, example, specs)
    except ExportError:
        raise
    except Exception as e:
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in example.items())
        drawn = sorted({d for s in specs for d in s.dynamic_axes.values()}) if example_inputs is None else []
        at = ", ".join(f"{d}={int((sizes or {}).get(d, DEFAULT_DYNAMIC_SIZE))}" for d in drawn)
        raise InputError(
            f"the model fails on example inputs built from the spec ({spec_text}), shapes {shapes}"
            f"{f' (dynamic axes at {at})' if at else ''}: {summarize_exception(e)}",
            hint=("give the dynamic axes sizes the model accepts (edgeq export --dim NAME=SIZE; edgeq build takes "
                  "them from the first --calib or --data feed), or " if drawn else "")
            + "check the input names, shapes and dtypes against what forward() expects",
        ) from e
    args = tuple(torch.from_numpy(example[s.name]) for s in specs)

    exporter, fallback_reason = "dynamo", None
    with onnx_io.atomic_output(out_path, force=force) as tmp:
        with quiet(verbose):
            try:
                model = _dynamo_export(module, args, specs, names, opset)
            except Exception as e:
                fallback_reason = summarize_exception(e)
                if not fallback:
                    raise ExportError(
                        f"torch.export could not export the model: {fallback_reason}",
                        hint="fix the model for torch.export, or allow the TorchScript fallback",
                    ) from e
                exporter = "torchscript"
                try:
                    model = _torchscript_export(module, args, specs, names, opset, tmp)
                except Exception as e2:
                    raise ExportError(
                        f"the model cannot be exported: torch.export failed ({fallback_reason}) and the "
                        f"TorchScript exporter failed too ({summarize_exception(e2)})",
                        hint="make forward() traceable: no data-dependent Python control flow or non-tensor outputs",
                    ) from e2
            model = _clean(model)
        model.metadata_props["edgeq.exporter"] = exporter
        model.metadata_props["edgeq.inputs"] = spec_text
        files = onnx_io.write_ir(model, tmp / out_path.name, external_data_threshold=external_data_threshold)
        checks: list[ExportCheck] = []
        if check:
            checks = _check_against_torch(
                module, tmp / out_path.name, specs, names, example, random_checks=random_checks, seed=seed + 1
            )
            bad = [c for c in checks if not (c.sqnr_db >= min_sqnr_db)]
            if bad:
                c = bad[0]
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                why = " — the TorchScript fallback may have frozen input-dependent values" if exporter == "torchscript" else ""
                raise ExportError(
                    f"the exported ONNX does not match torch: output {c.output!r} on the {c.feed} inputs has "
                    f"SQNR {c.sqnr_db:.1f} dB < {min_sqnr_db:g} dB, max abs error {c.max_abs_err:.3g}{more}{why}",
                    hint="nothing was written",
                )
    final_files = tuple(out_path.parent / f.name for f in files)
    return ExportResult(
        path=out_path,
        files=final_files,
        exporter=exporter,
        fallback_reason=fallback_reason,
        opset=opset,
        inputs=tuple(specs),
        output_names=tuple(names),
        checks=tuple(checks),
        seconds=time.perf_counter() - t0,
    )
