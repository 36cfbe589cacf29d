"""``edgeq build``: one command from a model to validated device packages and a report.

The stages, each a call into the Python API (nothing here re-implements a stage):

1. export — a PyTorch model or sample → float ONNX (an ONNX file starts at 2);
2. quantize — once per distinct target profile (Android and iOS run different integer ops, so
   their W8A8 plans differ), calibrated on the sample's calibration split or ``calib``;
3. package — each target, from the QDQ ONNX made for its profile;
4. validate — every QDQ ONNX and every package against the float ONNX on the evaluation data,
   with pass/fail thresholds (the recipe's defaults, or the caller's);
5. latency — batch-1 host latency of the float and quantized models in ONNX Runtime;
6. report — ``build.json`` for machines and one self-contained ``report.html`` for people.

Everything is written into a temporary folder beside the output and moved into place only when
complete: an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq import __version__, api, onnx_io, sources
from edgeq._quiet import quiet
from edgeq.errors import InputError
from edgeq.validate import Thresholds

DEFAULT_MODEL = "minilm"
DEFAULT_TARGETS = ("android", "ios18")
DEFAULT_RECIPE = "w8a8"
# Default gates per preset recipe: each output's mean per-sample cosine to the float model.
# Measured on the samples: MiniLM w8a8 0.998, EfficientNet-Lite0 w8a8 ≈ 0.995 (19.7 dB).
DEFAULT_MIN_COSINE = {"w8a8": 0.99, "w8a16": 0.999, "w4a16": 0.98, "mxfp4": 0.95}
DEFAULT_MIN_COSINE_OTHER = 0.98
# and for a classifier, top-1 agreement with the float model (EfficientNet-Lite0 w8a8: 0.94)
DEFAULT_MIN_TOP1 = 0.9
REPORT_HTML = "report.html"
REPORT_JSON = "build.json"
VERSION_PACKAGES = ("onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", "torch", "coremltools", "transformers")


@dataclass
class BuildResult:
    """What ``build`` wrote: the output folder, the report data (``build.json``) and the verdict."""

    path: Path
    data: dict
    seconds: float
    passed: bool
    summary: list[dict] = field(default_factory=list)

    @property
    def report(self) -> Path:
        return self.path / REPORT_HTML


def versions() -> dict[str, str | None]:
    """Installed versions of edgeq, Python and the libraries it uses (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"edgeq": __version__, "python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def default_thresholds(recipe_name: str, task: str) -> Thresholds:
    """The gates of a preset (``w4a16-b32`` is ``w4a16``); other recipes get the general default."""
    return Thresholds(
        min_cosine=DEFAULT_MIN_COSINE.get(recipe_name.split("-")[0], DEFAULT_MIN_COSINE_OTHER),
        min_top1_agreement=DEFAULT_MIN_TOP1 if task == "classification" else None,
    )


def _merge(default: Thresholds, given: Thresholds | None) -> Thresholds:
    if given is None:
        return default
    return Thresholds(*(g if g is not None else d for g, d in zip(
        (given.min_sqnr_db, given.min_cosine, given.min_top1_agreement),
        (default.min_sqnr_db, default.min_cosine, default.min_top1_agreement))))


def check_output_dir(path: str | os.PathLike, *, force: bool) -> Path:
    """Fail before any work when the build folder cannot be written."""
    out = Path(path)
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise InputError(f"output {out} is the current folder or holds it", hint="give a new folder, e.g. -o dist/")
    return onnx_io.check_output_folder(out, force=force)


def _model_name(model, sample) -> str:
    if sample is not None:
        return sample.name
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        if Path(text).exists():
            return Path(text).name.split(".")[0] or "model"
        return text.rpartition(":")[2].rpartition(".")[2] or "model"
    return type(model).__name__.lower()


def _copy_onnx(src: Path, dst: Path) -> None:
    """Copy an ONNX file with its external data files."""
    import onnx

    shutil.copyfile(src, dst)
    proto = onnx.load(str(src), load_external_data=False)
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location" and not (dst.parent / e.value).exists():
                    shutil.copyfile(src.parent / e.value, dst.parent / e.value)


def _batch1(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v[:1] if getattr(v, "ndim", 0) >= 1 and v.shape[0] > 1 else v) for k, v in feed.items()
            if not k.startswith("__")}


def host_latency(models: Mapping[str, Path], feed: Mapping[str, np.ndarray], *, runs: int = 20,
                 budget_s: float = 6.0) -> dict[str, dict]:
    """Median batch-1 latency (ms) of each model in ONNX Runtime CPU, runs interleaved across models."""
    import onnxruntime as ort

    sessions = {}
    for label, path in models.items():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if Path(path).suffix == ".ort":
            so.add_session_config_entry("session.load_model_format", "ORT")
        sessions[label] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm up
        s.run(None, dict(feed))
    t_end = time.perf_counter() + budget_s
    for i in range(runs):
        for label, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, dict(feed))
            times[label].append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() > t_end:
            break
    return {k: {"median_ms": statistics.median(v), "runs": len(v)} for k, v in times.items()}


def _sizes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


class _Stages:
    """One line per stage as it starts, one as it ends (progress bars of the stage in between)."""

    def __init__(self, total: int, say: Callable[[str], None]):
        self.total, self.n, self.say = total, 0, say
        self.timings: dict[str, float] = {}

    def run(self, name: str, what: str, fn: Callable, done: Callable[[object], str] | None = None):
        self.n += 1
        self.say(f"[{self.n}/{self.total}] {name:<9} {what}")
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.timings[f"{name}: {what}"] = round(dt, 2)
        self.say(f"      {'':<9} done in {dt:.1f} s" + (f": {done(out)}" if done else ""))
        return out


def build(
    model=None,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    recipe: str = DEFAULT_RECIPE,
    block: int | None = None,
    calib=None,
    data=None,
    output: str | os.PathLike = "dist",
    force: bool = False,
    thresholds: Thresholds | None = None,
    inputs: Sequence[str] | None = None,
    limit: int | None = None,
    calib_limit: int | None = None,
    latency: bool = True,
    verbose: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> BuildResult:
    """Export (when needed), quantize, package each target, validate, and write the report.

    ``model``: a sample name (default ``minilm``), a ``package.module:callable`` factory (with
    ``inputs``), an ``nn.Module`` (with ``inputs``) or an ONNX file. ``calib`` and ``data``
    default to the sample's calibration and evaluation splits; ``limit``/``calib_limit`` keep
    only the first N feeds. ``thresholds`` override the recipe's default gates field by field.
    """
    from edgeq import plugins
    from edgeq.quant.recipes import resolve_recipe

    t_start = time.perf_counter()
    model = DEFAULT_MODEL if model is None else model
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise InputError("no targets given", hint=f"e.g. --targets {','.join(DEFAULT_TARGETS)}")
    out = check_output_dir(output, force=force)
    tgts = [plugins.load_target(t) for t in targets]  # an unknown target fails before any work
    rec = resolve_recipe(recipe, block=block)
    obj, sample = api.resolve_model(model)
    is_onnx = isinstance(obj, Path)
    if is_onnx and obj.suffix.lower() != ".onnx":
        raise InputError(f"{obj} is not an .onnx file", hint="give an ONNX file, a sample, or a PyTorch factory")
    if not is_onnx and sample is None and not inputs:
        raise InputError("no input specs for the PyTorch model", hint="give --input name:dtype[dims] for each input")
    calib = calib if calib is not None else sample
    if rec.needs_calibration and calib is None:
        raise InputError(f"recipe {rec.name} quantizes activations and needs calibration data",
                         hint="pass --calib (a sample name, an .npz file or a folder of them)")
    data = data if data is not None else sample
    if data is None:
        raise InputError("no evaluation data to validate the packages on",
                         hint="pass --data (a sample name, an .npz file or a folder of them)")
    task = sample.task if sample is not None else "generic"
    th = _merge(default_thresholds(rec.name, task), thresholds)
    name = _model_name(model, sample)
    if calib_limit is not None and calib is not None:
        from edgeq.validate.feeds import open_feeds

        raw, _ = open_feeds(calib, split="calibration")
        calib = [f for _, f in zip(range(calib_limit), raw)]

    if not verbose:
        try:
            import onnxruntime as ort

            ort.set_default_logger_severity(3)
        except ImportError:
            pass
    profiles: dict[str, list] = {}
    for t in tgts:
        profiles.setdefault(t.profile.name, []).append(t)
    stages = _Stages(1 + len(profiles) + len(tgts) + 1 + int(latency) + 1, say)
    with onnx_io.atomic_folder(out) as tmp:
        data_out = _run(stages, tmp, obj, sample, model, is_onnx, name, inputs, rec, recipe, block, profiles, tgts,
                        calib, data, task, th, limit, latency, verbose, progress)
        data_out["seconds"] = round(time.perf_counter() - t_start, 1)
        data_out["stages"] = stages.timings
        stages.run("report", f"{REPORT_HTML} and {REPORT_JSON}", lambda: _write_reports(tmp, data_out))
        data_out["seconds"] = round(time.perf_counter() - t_start, 1)
        (tmp / REPORT_JSON).write_text(_to_json(data_out))
    return BuildResult(out, data_out, time.perf_counter() - t_start, data_out["passed"], data_out["summary"])


def _to_json(data: dict) -> str:
    from edgeq.validate.report import to_json

    return to_json(data) + "\n"


def _write_reports(folder: Path, data: dict) -> None:
    from edgeq.report.html import render

    (folder / REPORT_HTML).write_text(render(data), encoding="utf-8")
    (folder / REPORT_JSON).write_text(_to_json(data))


def _run(stages, tmp, obj, sample, model, is_onnx, name, inputs, rec, recipe, block, profiles, tgts, calib, data,
         task, th, limit, latency, verbose, progress) -> dict:
    # 1. export
    float_path = tmp / f"{name}.onnx"
    if is_onnx:
        stages.run("export", f"{obj} is ONNX: copied", lambda: _copy_onnx(obj, float_path))
        source = {"kind": "onnx", "path": str(obj)}
    else:
        res = stages.run(
            "export", f"{name} -> {float_path.name}",
            lambda: api.export(sample if sample is not None else model, float_path, inputs=inputs, verbose=verbose),
            lambda r: f"{r.exporter} exporter, opset {r.opset}, {_sizes(float_path) / 1e6:.1f} MB, "
                      f"min SQNR vs torch {min((c.sqnr_db for c in r.checks), default=float('nan')):.1f} dB")
        source = {"kind": "sample" if sample is not None else "pytorch", "name": name,
                  "exporter": res.exporter, "opset": res.opset,
                  "checks": [c.__dict__ for c in res.checks]}

    # 2. quantize, once per target profile
    qdqs: dict[str, dict] = {}
    for prof, ts in profiles.items():
        qpath = tmp / f"{name}.{rec.name}.{prof}.onnx"

        def _quantize(qpath=qpath, prof=prof):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return api.quantize(float_path, qpath, recipe, block=block, profile=prof, calib=calib,
                                    progress=progress)

        q = stages.run("quantize", f"{rec.name} for {', '.join(t.name for t in ts)} -> {qpath.name}", _quantize,
                       lambda r: f"{r.quantized_bytes / 1e6:.2f} MB (ideal {r.ideal_bytes / 1e6:.2f} MB), "
                                 + ", ".join(f"{k} {v}" for k, v in r.plan.summary()["weights"].items())
                                 + (f"; {r.calibration.samples} calibration samples" if r.calibration else ""))
        qdqs[prof] = {"file": qpath.name, "profile": prof, "targets": [t.name for t in ts],
                      "bytes": q.quantized_bytes, "ideal_bytes": q.ideal_bytes, "float_bytes": q.float_bytes,
                      "summary": q.plan.summary(), "plan": q.plan.rows(),
                      "quantized_tensors": [a.tensor for a in q.plan.activations],
                      "calibration": ({"source": _describe(calib), "batches": q.calibration.batches,
                                       "samples": q.calibration.samples, "sha256": q.calibration.data_sha256}
                                      if q.calibration else None),
                      "seconds": round(q.seconds, 2)}

    # 3. package each target
    packages: list[dict] = []
    for t in tgts:
        q = qdqs[t.profile.name]

        def _package(t=t, q=q):
            with quiet(verbose):
                return api.package(tmp / q["file"], t, tmp / t.name)

        p = stages.run("package", f"{t.name} <- {q['file']}", _package,
                       lambda r: f"{r.model_file.relative_to(tmp)} {_sizes(r.model_file) / 1e6:.2f} MB")
        packages.append({"target": t.name, "folder": t.name, "model_file": str(p.model_file.relative_to(tmp)),
                         "qdq": q["file"], "bytes": _sizes(p.model_file), "ideal_bytes": q["ideal_bytes"],
                         "files": p.manifest.get("files", {}), "file_bytes": p.manifest.get("file_bytes", {}),
                         "runtime": p.manifest.get("runtime", {}), "description": t.description,
                         "seconds": round(p.seconds, 2)})

    # 4. validate every QDQ ONNX and every package against the float ONNX
    cand_paths = [tmp / q["file"] for q in qdqs.values()] + [tmp / p["folder"] for p in packages]
    cand_labels = [q["file"] for q in qdqs.values()] + [p["model_file"] for p in packages]

    def _validate():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return api.validate(cand_paths, float_path, data, task=task, thresholds=th, limit=limit,
                                progress=progress)

    rep = stages.run("validate", f"{len(cand_paths)} models vs {float_path.name}", _validate,
                     lambda r: "PASS" if r.passed else "FAIL")
    vdict = rep.as_dict()
    for c, label in zip(vdict["candidates"], cand_labels):
        c["model"]["label"] = label

    # 5. host latency (ORT CPU, batch 1)
    lat = None
    if latency:
        from edgeq.validate.feeds import load_feeds

        def _latency():
            feeds, _ = load_feeds(data, onnx_io.io_specs(onnx_io.read_onnx(float_path)), limit=1)
            models = {float_path.name: float_path, **{q["file"]: tmp / q["file"] for q in qdqs.values()}}
            models.update({p["model_file"]: tmp / p["model_file"] for p in packages
                           if p["model_file"].endswith(".ort")})
            return {"feed_shapes": {k: list(v.shape) for k, v in _batch1(feeds[0]).items()},
                    "threads": "ONNX Runtime default", "models": host_latency(models, _batch1(feeds[0]))}

        lat = stages.run("latency", "ONNX Runtime CPU, batch 1", _latency,
                         lambda r: ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in r["models"].items()))

    # the summary: one row per QDQ ONNX and per package
    summary = []
    by_label = {c["model"]["label"]: c for c in vdict["candidates"]}
    for q in qdqs.values():
        summary.append(_row(q["file"], "onnx (host)", q["bytes"], q["ideal_bytes"], by_label[q["file"]]))
    for p in packages:
        summary.append(_row(p["model_file"], p["target"], p["bytes"], p["ideal_bytes"], by_label[p["model_file"]]))
    hashes = {f.name: onnx_io.file_sha256(f) for f in [float_path, *(tmp / q["file"] for q in qdqs.values())]}
    for p in packages:
        hashes.update({f"{p['folder']}/{k}": v for k, v in p["files"].items()})
    return {
        "edgeq_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": name, **source, "file": float_path.name, "bytes": _sizes(float_path), "task": task},
        "recipe": rec.name,
        "targets": [t.name for t in tgts],
        "thresholds": th.as_dict(),
        "qdq": list(qdqs.values()),
        "packages": packages,
        "validation": vdict,
        "latency": lat,
        "summary": summary,
        "passed": rep.passed,
        "versions": versions(),
        "platform": f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]}",
        "hashes": hashes,
    }


def _describe(data) -> str:
    if isinstance(data, sources.Sample):
        return f"sample {data.name} (calibration set)"
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    return "feeds from Python"


def _row(label: str, target: str, size: int, ideal: int, cand: dict) -> dict:
    outputs = cand["outputs"]
    return {
        "model": label,
        "target": target,
        "bytes": size,
        "ideal_bytes": ideal,
        "sqnr_db": min((o["sqnr_db"] for o in outputs.values()), default=None),
        "cosine_mean": min((o.get("cosine_mean", 1.0) for o in outputs.values()), default=None),
        "task": cand.get("task", {}),
        "passed": cand["passed"],
        "failed": [c["check"] for c in cand["checks"] if not c["passed"]],
    }


def format_summary(result: BuildResult) -> str:
    """The table printed at the end of a build."""
    d = result.data
    lines = [f"{'model':<40} {'target':<12} {'size MB':>8} {'ideal MB':>8} {'SQNR dB':>8} {'cosine':>8}  result"]
    lines.append("-" * len(lines[0]))
    for r in result.summary:
        extra = ""
        if "top1_agreement" in r["task"]:
            extra = f" top-1 {r['task']['top1_agreement']:.3f}"
        lines.append(f"{r['model'][:40]:<40} {r['target']:<12} {r['bytes'] / 1e6:8.2f} {r['ideal_bytes'] / 1e6:8.2f} "
                     f"{_f(r['sqnr_db'], '.1f'):>8} {_f(r['cosine_mean'], '.4f'):>8}  "
                     f"{'pass' if r['passed'] else 'FAIL: ' + '; '.join(r['failed'])}{extra}")
    th = ", ".join(f"{k} {v:g}" for k, v in d["thresholds"].items())
    lines.append(f"float model {d['model']['file']}: {d['model']['bytes'] / 1e6:.2f} MB; gates: {th}")
    lines.append(f"built {result.path}/ in {result.seconds:.1f} s: report {result.report}; "
                 + ("PASS" if result.passed else "FAIL"))
    return "\n".join(lines)


def _f(v, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, fmt)


__all__ = ["BuildResult", "build", "format_summary", "versions"]
