"""The stages of ``edgeq build`` (see :mod:`edgeq.pipeline.build`), run in order into one folder."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from edgeq import __version__, onnx_io, sources
from edgeq._quiet import quiet
from edgeq.errors import UnsupportedError
from edgeq.export import export_model
from edgeq.pipeline.build import (
    BuildConfig,
    PackageArtifact,
    QDQArtifact,
    _Inputs,
    _sizes,
    _Stages,
    versions,
)
from edgeq.pipeline.package import package_model
from edgeq.validate.run import validate_models
from targets.base import Target

LLM_PROMPT_TOKENS = 32  # causal LMs: prefill a prompt of this many tokens of the first evaluation text,
LLM_DECODE_TOKENS = 16  # then time this many decode steps


def run_stages(cfg: BuildConfig, inp: _Inputs, stages: _Stages, tmp: Path, profiles: list[str]) -> dict:
    """Run export → quantize → package → validate → latency; return the report data (``build.json``)."""
    float_path = tmp / f"{inp.name}.onnx"
    source = stages.run("export", _export_what(inp, float_path), lambda: _export(cfg, inp, float_path),
                        lambda s: s.get("summary", ""), fatal=True)
    qdqs = stages.run("quantize", f"{inp.recipe.name} for {', '.join(profiles)} (one calibration)",
                      lambda: _quantize(cfg, inp, tmp, float_path, profiles), _quantize_done, fatal=True)
    packages: list[PackageArtifact] = []
    for t in inp.targets:
        q = qdqs[t.profile.name]

        def _package(t=t, q=q):
            with quiet(cfg.verbose):
                return package_model(tmp / q.file, t, tmp / t.name)

        res = stages.run("package", f"{t.name} <- {q.file}", _package,
                         lambda r: f"{r.model_file.relative_to(tmp)} {_sizes(r.model_file) / 1e6:.2f} MB")
        if res is not None:
            packages.append(PackageArtifact(t.name, t.description, q, res, tmp))
    labels = [q.file for q in qdqs.values()] + [p.model_file for p in packages]
    paths = [tmp / q.file for q in qdqs.values()] + [tmp / p.target for p in packages]
    vdict = stages.run("validate", f"{len(paths)} models vs {float_path.name}",
                       lambda: _validate(cfg, inp, float_path, paths, labels, packages, tmp),
                       lambda v: "PASS" if v["passed"] else "FAIL")
    if vdict is None:
        vdict = {"candidates": [], "data": {"source": str(inp.data), "feeds": 0}, "task": inp.task, "passed": False}
    lat = None
    if cfg.latency:
        per = " per decoded token" if inp.task == "causal_lm" else ""
        lat = stages.run("latency", "ONNX Runtime CPU, batch 1", lambda: _latency(inp, float_path, qdqs, packages, tmp),
                         lambda r: ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in r["models"].items()) + per)
    summary = _summary(qdqs, packages, vdict, lat)
    hashes = {f.name: onnx_io.file_sha256(f) for f in [float_path, *(tmp / q.file for q in qdqs.values())]}
    for p in packages:
        hashes.update({f"{p.target}/{k}": v for k, v in p.result.manifest.get("files", {}).items()})
    failed = [r for r in stages.records if r.status == "failed"]
    return {
        "edgeq_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": inp.name, **source, "file": float_path.name, "bytes": _sizes(float_path),
                  "task": inp.task, "task_reason": inp.task_reason},
        "recipe": inp.recipe.name,
        "targets": [t.name for t in inp.targets],
        "thresholds": inp.thresholds.as_dict(),
        "qdq": [q.as_dict() for q in qdqs.values()],
        "packages": [p.as_dict() for p in packages],
        "validation": vdict,
        "latency": lat,
        "summary": summary,
        "passed": bool(vdict.get("passed")) and not failed and len(packages) == len(inp.targets),
        "versions": versions(),
        "platform": f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]}",
        "hashes": hashes,
    }


def _export_what(inp: _Inputs, float_path: Path) -> str:
    return f"{inp.obj} is ONNX: copied" if isinstance(inp.obj, Path) else f"{inp.name} -> {float_path.name}"


def _export(cfg: BuildConfig, inp: _Inputs, float_path: Path) -> dict:
    if isinstance(inp.obj, Path):
        onnx_io.copy_onnx(inp.obj, float_path)
        return {"kind": "onnx", "path": str(inp.obj)}
    sizes = _axis_sizes(inp.calib if inp.calib is not None else inp.data, cfg.inputs) if inp.sample is None else None
    res = export_model(inp.sample if inp.sample is not None else cfg.model, float_path, inputs=cfg.inputs,
                       sizes=sizes, verbose=cfg.verbose)
    worst = min((c.sqnr_db for c in res.checks), default=float("nan"))
    return {"kind": "sample" if inp.sample is not None else "pytorch", "name": inp.name, "exporter": res.exporter,
            "opset": res.opset, "checks": [c.__dict__ for c in res.checks],
            "summary": f"{res.exporter} exporter, opset {res.opset}, {_sizes(float_path) / 1e6:.1f} MB, "
                       f"min SQNR vs torch {worst:.1f} dB"}


def _axis_sizes(calib, inputs) -> dict[str, int] | None:
    """The dynamic axes' sizes in the first calibration (else evaluation) feed, for the export's example inputs: a
    fully convolutional model (MTCNN's P-Net, [batch,3,height,width]) fails at the default size 2."""
    from edgeq.specs import TensorSpec
    from edgeq.validate.feeds import open_feeds

    if calib is None or not inputs or isinstance(calib, Iterator):
        return None  # a one-shot iterator of feeds: its first feed belongs to the calibration
    specs = [TensorSpec.parse(s) if isinstance(s, str) else s for s in inputs]
    feed = next(iter(open_feeds(calib, split="calibration")[0]), None)
    if feed is None:
        return None
    sizes = {}
    for spec in specs:
        shape = getattr(feed.get(spec.name), "shape", None)
        if shape is not None and len(shape) == len(spec.shape):
            sizes.update({d: int(shape[i]) for i, d in spec.dynamic_axes.items() if d not in sizes})
    return sizes or None


def _quantize(cfg: BuildConfig, inp: _Inputs, tmp: Path, float_path: Path, profiles: list[str]) -> dict[str, QDQArtifact]:
    from edgeq.pipeline.quantize import quantize_for_profiles

    files = {prof: f"{inp.name}.{inp.recipe.name}.{prof}.onnx" for prof in profiles}
    results = quantize_for_profiles(float_path, [(prof, tmp / files[prof]) for prof in profiles], inp.recipe,
                                    calib=inp.calib, progress=cfg.progress)
    out = {}
    for prof, res in zip(profiles, results):
        cov = res.plan.coverage()
        if cov["quantizable"] and not cov["quantized"]:
            raise UnsupportedError(f"recipe {inp.recipe.name} quantized none of the {cov['quantizable']} weights of "
                                   f"{float_path.name} for {prof}: {res.plan.float_reasons()}",
                                   hint="see `edgeq quantize --explain`; change the recipe or its rules")
        targets = tuple(t.name for t in inp.targets if t.profile.name == prof)
        out[prof] = QDQArtifact(files[prof], prof, targets, res, _describe(inp.calib))
    return out


def _quantize_done(qdqs: dict[str, QDQArtifact]) -> str:
    parts = []
    for q in qdqs.values():
        r = q.result
        cov = r.plan.coverage()
        parts.append(f"{q.file} {r.quantized_bytes / 1e6:.2f} MB (ideal {r.ideal_bytes / 1e6:.2f} MB), "
                     f"{cov['quantized']}/{cov['quantizable']} weights quantized")
    first = next(iter(qdqs.values())).result
    cal = f"; {first.calibration.samples} calibration samples" if first.calibration else ""
    return "; ".join(parts) + cal


ACCEPTANCE_FEEDS = 4  # evaluation feeds a target's own acceptance checks run on


def _validate(cfg: BuildConfig, inp: _Inputs, float_path: Path, paths: list[Path], labels: list[str],
              packages: list[PackageArtifact], tmp: Path) -> dict:
    if inp.task == "causal_lm":
        rep = validate_models(paths, float_path, inp.data, task="causal_lm", llm_thresholds=inp.thresholds,
                              limit=cfg.limit, progress=cfg.progress)
    else:
        rep = validate_models(paths, float_path, inp.data, task=inp.task, thresholds=inp.thresholds,
                              limit=cfg.limit, progress=cfg.progress)
    vdict = rep.as_dict()
    for c, label in zip(vdict["candidates"], labels):
        c["model"]["label"] = label
    if inp.task != "causal_lm":
        _target_acceptance(cfg, inp, float_path, packages, tmp, vdict)
        if inp.recipe.quantizes_activations:  # a failed W8A8 file: which activations cost it (a note)
            from edgeq.validate.activation_noise import activation_noise
            from edgeq.validate.feeds import open_feeds

            for c, path in zip(vdict["candidates"], paths):
                if not c["passed"] and path.suffix == ".onnx":
                    noise = activation_noise(float_path, path, open_feeds(inp.data)[0])
                    if noise is not None:
                        c["activation_noise"] = noise.note(inp.thresholds.min_sqnr_db)
    return vdict


def _target_acceptance(cfg: BuildConfig, inp: _Inputs, float_path: Path, packages: list[PackageArtifact],
                       tmp: Path, vdict: dict) -> None:
    """Each target's own checks on its package (Core ML W8A8: segments vs the QDQ ONNX), added to its row."""
    from edgeq.validate.feeds import load_feeds

    feeds = None
    by_label = {c["model"]["label"]: c for c in vdict["candidates"]}
    for p in packages:
        target = next(t for t in inp.targets if t.name == p.target)
        if type(target).acceptance is Target.acceptance or p.model_file not in by_label:
            continue
        if feeds is None:
            specs = onnx_io.io_specs(onnx_io.read_onnx(float_path))
            feeds, _ = load_feeds(inp.data, specs, split="evaluation", limit=min(cfg.limit or ACCEPTANCE_FEEDS,
                                                                                 ACCEPTANCE_FEEDS))
        with quiet(cfg.verbose):
            checks = target.acceptance(tmp / p.qdq.file, p.result, float_path, list(feeds))
        cand = by_label[p.model_file]
        cand["checks"] += checks
        cand["passed"] = all(c["passed"] for c in cand["checks"])
    vdict["passed"] = all(c["passed"] for c in vdict["candidates"])


def _latency(inp: _Inputs, float_path: Path, qdqs: dict, packages: list, tmp: Path) -> dict:
    from edgeq.validate.feeds import load_feeds
    from edgeq.validate.latency import batch_of_one, causal_lm_latency, latency_report

    specs = onnx_io.io_specs(onnx_io.read_onnx(float_path))
    feeds, _ = load_feeds(inp.data, specs, limit=1)
    models = {float_path.name: float_path, **{q.file: tmp / q.file for q in qdqs.values()}}
    models.update({p.model_file: tmp / p.model_file for p in packages if p.model_file.endswith(".ort")})
    if inp.task == "causal_lm":  # a phone prefills a prompt, then decodes one token at a time
        from edgeq.validate.llm import sequences_from_feeds

        prompt = sequences_from_feeds(feeds)[0][:LLM_PROMPT_TOKENS]
        return {"kind": "causal_lm", "prompt_tokens": len(prompt), "decode_tokens": LLM_DECODE_TOKENS,
                "threads": "ONNX Runtime default",
                "models": causal_lm_latency(models, prompt, decode_tokens=LLM_DECODE_TOKENS)}
    return latency_report(models, batch_of_one(feeds[0], specs), specs)


def _summary(qdqs: dict, packages: list, vdict: dict, lat: dict | None) -> list[dict]:
    by_label = {c["model"]["label"]: c for c in vdict["candidates"]}
    rows = []
    for q in qdqs.values():
        rows.append(_row(q.file, "onnx (host)", q.result.quantized_bytes, q.result.ideal_bytes, by_label.get(q.file), q))
    for p in packages:
        rows.append(_row(p.model_file, p.target, _sizes(p.result.model_file), p.qdq.result.ideal_bytes,
                         by_label.get(p.model_file), p.qdq))
    for r in rows:  # quantized must mean faster: where it is not, the row says so and where the time goes
        slow = [s for s in (lat or {}).get("slower", []) if s["model"] == r["model"]]
        if slow:
            at = ", ".join(f"{s['shape']} ({s['speedup']:.2f}x)" for s in slow)
            r["notes"].append(f"slower than float at {at}; its time goes to: {slow[0]['where']}")
    return rows


def _row(label: str, target: str, size: int, ideal: int, cand: dict | None, qdq: QDQArtifact) -> dict:
    cov = qdq.result.plan.coverage()
    if cand is None:
        return {"model": label, "target": target, "bytes": size, "ideal_bytes": ideal, "sqnr_db": None,
                "cosine_mean": None, "task": {}, "passed": False, "failed": ["not validated (see the stages)"],
                "notes": [], "coverage": cov}
    outputs = {k: o for k, o in cand["outputs"].items() if o.get("gated", True)}  # a state: judged as carried
    notes = list(dict.fromkeys(c["note"] for c in cand["checks"] if c.get("note")))  # an output and its carried twin
    if cand.get("activation_noise"):
        notes.append(cand["activation_noise"])
    return {
        "model": label,
        "target": target,
        "bytes": size,
        "ideal_bytes": ideal,
        "sqnr_db": min((o["sqnr_db"] for o in outputs.values()), default=None),
        "cosine_mean": min((o["cosine_mean"] for o in outputs.values() if "cosine_mean" in o), default=None),
        "task": cand.get("task", {}),
        "passed": cand["passed"],
        "failed": [c["check"] + (f" ({c['note']})" if c.get("note") else "") for c in cand["checks"]
                   if not c["passed"]],
        "notes": notes,
        "coverage": cov,
    }


def _describe(data) -> str | None:
    if data is None:
        return None
    if isinstance(data, sources.Sample):
        return f"sample {data.name} (calibration set)"
    if isinstance(data, (str, Path)):
        return str(data)
    return "feeds from Python"
