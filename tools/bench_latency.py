#!/usr/bin/env python
"""Latency benchmark: is each quantized package faster than its float model, at the shapes users run?

    PYTHONPATH=$PWD .venv/bin/python tools/bench_latency.py --work /tmp/edgeq-latency --json latency.json
    ... --models minilm --runs 60 --threads 2,default,1
    ... --extra "minilm:w8a8 gbq=/tmp/proto.onnx"      # time a prototype graph next to the others
    ... --report latency.json                           # print the tables of a saved run again

The models are made with edgeq's own CLI into ``WORK/models`` (kept and reused; ``--rebuild``
remakes them): the float export, ``quantize --recipe w8a8 --calib SAMPLE``, ``--recipe w4a16``
(default profile: what the host runs) and ``--recipe w4a16 --profile android``, each packaged for
Android (``package --target android``: the ``.ort`` that ships). The peer is ONNX Runtime's own
``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax on the same
calibration split) of the same float model, and its ``.ort`` made by edgeq's converter.

Shapes: MiniLM at 16, 64 and 128 tokens (real text, no padding: evaluation sentences joined and
cut), EfficientNet-Lite0 at 224x224 (one evaluation crop); batch 1. For each intra-op thread
setting (``2``, ``default`` = ORT's own choice, ``1``), every model of one sample gets a session
(ORT_ENABLE_ALL, sequential) and all are timed interleaved in this one process; the table shows
the median and the ratio float/candidate (> 1 is faster than float); an ``.ort`` is also compared
with the float model converted the same way (``float .ort``: on x86 the arm-targeted conversion
drops the NCHWc Conv layout, which costs CNNs 2.6x by itself). At 1 thread the table shows the
CPU time of the run (ORT computes on the calling thread), which a busy machine barely disturbs,
and a compact table of those ratios comes first. On a loaded machine (the load average is
printed) the 2-thread wall clock is not a latency: a 2-thread run waits for its pool thread at
every parallelized kernel and that thread waits for a core, so the wall time counts parallel
sections times scheduler delay (ratios of 40x were seen); read the CPU-time table then.

Per candidate and shape, ORT's profiler gives the time per op type (each node's fastest of
``--profile-runs`` runs, 1 thread: see ``bench/timing.py``); the table lists the top op types.
``--no-fidelity`` skips the mean cosine (MiniLM) or top-1 agreement (EfficientNet) against the
float model on the sample's evaluation split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/, for `import bench`

from bench import timing  # noqa: E402
from edgeq.errors import first_line  # noqa: E402
from bench.data import MODELS, LazyFeeds  # noqa: E402
from bench.data import prepare as prepare_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MB = 1e6
SHAPES = {"minilm": (16, 64, 128), "efficientnet_lite0": (224,)}
THREADS = {"2": 2, "default": None, "1": 1}


def say(text: str = "") -> None:
    print(text, flush=True)


class Failed(Exception):
    """A model could not be made; its row shows why."""


def cli(*args: str, log: Path) -> None:
    """Run ``python -m edgeq ARGS`` with this checkout's edgeq; output to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "edgeq", *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                           cwd=REPO, check=False)
    if r.returncode:
        tail = log.read_text().strip().splitlines()[-3:]
        raise Failed(f"`edgeq {' '.join(args[:2])} ...` exited {r.returncode}: {' | '.join(tail)[-400:]}")


# ---- the models ----------------------------------------------------------------------------------

def candidates(sample: str) -> list[tuple[str, str, str]]:
    """(label, kind, recipe/profile) of every model compared, float first."""
    return [
        ("float", "float", ""),
        ("float .ort", "ort", "float"),
        ("edgeq w8a8", "onnx", "w8a8"),
        ("edgeq w8a8 .ort", "ort", "w8a8"),
        ("edgeq w4a16", "onnx", "w4a16"),
        ("edgeq w4a16 android", "onnx", "w4a16:android"),
        ("edgeq w4a16 android .ort", "ort", "w4a16:android"),
        ("ort quantize_static", "onnx", "ort-static"),
        ("ort quantize_static .ort", "ort", "ort-static"),
    ]


class Models:
    """Makes (or reuses) the files of one sample under ``work/models``; remembers failures."""

    def __init__(self, work: Path, sample: str, rebuild: bool):
        self.dir = work / "models" / sample
        self.logs = work / "logs"
        self.work, self.sample, self.rebuild = work, sample, rebuild
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)

    def _fresh(self, path: Path) -> bool:
        return path.exists() and not self.rebuild

    def float(self) -> Path:
        path = self.dir / f"{self.sample}.onnx"
        if not self._fresh(path):
            say(f"  export {self.sample} -> {path}")
            cli("export", self.sample, "-o", str(path), "--force", log=self.logs / f"{self.sample}.export.log")
        return path

    def quantized(self, recipe: str) -> Path:
        name, _, profile = recipe.partition(":")
        if name == "ort-static":
            return self._ort_static()
        path = self.dir / f"{self.sample}.{name}{'.' + profile if profile else ''}.onnx"
        if not self._fresh(path):
            args = ["quantize", str(self.float()), "--recipe", name, "--calib", self.sample, "-o", str(path), "--force"]
            if profile:
                args += ["--profile", profile]
            say(f"  quantize {self.sample} {recipe} -> {path.name}")
            cli(*args, log=self.logs / f"{path.stem}.log")
        return path

    def packaged(self, recipe: str) -> Path:
        src = self.float() if recipe == "float" else self.quantized(recipe)
        if recipe in ("float", "ort-static"):  # no edgeq plan to package: ORT's converter with edgeq's settings
            from targets.android.convert import convert

            ort_file = src.with_suffix(".ort")
            if not self._fresh(ort_file):
                say(f"  convert {src.name} -> {ort_file.name}")
                convert(src, ort_file)
            return ort_file
        folder = self.dir / f"{src.stem}.pkg"
        if not self._fresh(folder / "model.ort"):
            say(f"  package {src.name} --target android -> {folder.name}/")
            cli("package", str(src), "--target", "android", "-o", str(folder), "--force",
                log=self.logs / f"{src.stem}.package.log")
        return folder / "model.ort"

    def _ort_static(self) -> Path:
        path = self.dir / f"{self.sample}.ort_static.onnx"
        if self._fresh(path):
            return path
        from bench.proc import log_tail, run_job

        sets = prepare_data(self.work, self.sample, [], log=say)
        say(f"  ORT quantize_static {self.sample} -> {path.name}")
        job = {"tag": f"{self.sample}-ort-static", "kind": "quantize", "method": "ort-static-minmax",
               "model": self.sample, "task": MODELS[self.sample].task, "model_path": str(self.float()),
               "out_path": str(path), "calib_dir": sets["calib"]["dir"], "calib_b1_dir": sets["calib_b1"]["dir"]}
        o = run_job(job, self.logs, timeout_s=3600)
        if not o.result.get("ok"):
            raise Failed(f"ORT quantize_static failed: {o.result.get('error') or log_tail(o.log, 3)}")
        return path

    def make(self, only: set[str] | None = None) -> dict[str, dict]:
        out = {}
        for label, kind, recipe in candidates(self.sample):
            if only is not None and label not in only:
                continue
            try:
                path = self.float() if kind == "float" else self.packaged(recipe) if kind == "ort" \
                    else self.quantized(recipe)
                out[label] = {"path": str(path), "bytes": path.stat().st_size}
            except Failed as e:
                say(f"  {label}: {e}")
                out[label] = {"error": str(e)}
        return out


# ---- inputs ----------------------------------------------------------------------------------------

def feed(sample: str, shape: int) -> dict:
    import numpy as np

    if sample == "minilm":
        from samples import minilm

        text = " ".join(minilm.sentences()[-60:])  # evaluation sentences, long enough for 128 tokens
        f = minilm.tokenize([text], pad=shape)
        if not f["attention_mask"].all():
            raise SystemExit(f"the joined sentences are shorter than {shape} tokens")
        return f
    from edgeq.sources import get_sample

    image = get_sample(sample).images("evaluation", 1)[:1]
    if image.shape[-1] != shape:
        raise SystemExit(f"{sample} images are {image.shape[-1]} px, not {shape}")
    return {"image": np.ascontiguousarray(image, dtype=np.float32)}


def shape_name(sample: str, shape: int) -> str:
    return f"{shape} tok" if sample == "minilm" else f"{shape} px"


# ---- measuring -----------------------------------------------------------------------------------------

def measure(sample: str, files: dict[str, dict], args) -> dict:
    ok = {k: v["path"] for k, v in files.items() if "path" in v}
    feeds = {s: feed(sample, s) for s in SHAPES[sample]}
    latency: dict = {}
    for tname in args.threads:
        threads = THREADS[tname]
        sessions = {k: timing.session(p, threads) for k, p in ok.items()}
        for s, f in feeds.items():
            load = os.getloadavg()[0]
            t = timing.interleaved(sessions, f, runs=args.runs, warmup=args.warmup)
            row = {}
            for k, v in t.items():
                row[k] = {"median_ms": timing.median(v["wall"]), "min_ms": min(v["wall"]), "runs": len(v["wall"])}
                if threads == 1:
                    row[k]["cpu_median_ms"] = timing.median(v["cpu"])
            for k, r in row.items():
                # every model against the float ONNX; an .ort also against the float model in the
                # same format (converted the same way: on x86 that drops the NCHWc Conv layout too)
                for suffix, ref in (("", row.get("float")), ("_vs_float_ort", row.get("float .ort"))):
                    if ref is None or (suffix and not k.endswith(".ort")):
                        continue
                    r["ratio" + suffix] = ref["median_ms"] / r["median_ms"]
                    if "cpu_median_ms" in r:
                        r["cpu_ratio" + suffix] = ref["cpu_median_ms"] / r["cpu_median_ms"]
            latency.setdefault(str(s), {})[tname] = {"loadavg_1min": load, "models": row}
            kind = "cpu_ratio" if threads == 1 else "ratio"
            say(f"  timed {shape_name(sample, s)}, threads {tname} ({'CPU time' if threads == 1 else 'wall'}): "
                + ", ".join(f"{k} {r.get(kind, float('nan')):.2f}x" for k, r in row.items() if k != "float"))
        del sessions
    profiles: dict = {}
    if args.profile_runs:
        for s, f in feeds.items():
            for k, p in ok.items():
                profiles.setdefault(str(s), {})[k] = timing.profile(p, f, 1, runs=args.profile_runs)
            say(f"  profiled {shape_name(sample, s)}")
    fid = fidelity(sample, ok, args) if args.fidelity else {}
    return {"latency": latency, "profiles": profiles, "fidelity": fid}


def fidelity(sample: str, paths: dict[str, str], args) -> dict:
    from bench.evaluate import fidelity as compare

    sets = prepare_data(args.work, sample, [], log=say)
    feeds = list(LazyFeeds(sets["eval"]["dir"], limit=args.eval_batches))
    ref = timing.session(paths["float"], None)
    out = {}
    for k, p in paths.items():
        if k != "float":
            try:
                out[k] = compare(ref, timing.session(p, None), feeds, MODELS[sample].task)
            except Exception as e:  # a model ORT cannot run is a row, not a crash
                out[k] = {"error": first_line(e)}
    say(f"  fidelity on {sets['eval']['desc']}")
    return out


# ---- the report ----------------------------------------------------------------------------------------------

def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def compact(sample: str, res: dict) -> str:
    """The 1-thread CPU-time ratios and fidelity only: the table to read on a busy machine."""
    lat = res["latency"]
    key = "cosine_mean" if MODELS[sample].task == "embedding" else "top1_agreement"
    header = ["model", "MB", *(f"{shape_name(sample, int(s))} (CPU, 1 thr)" for s in lat), key.replace("_", " ")]
    rows = []
    for label, f in res["files"].items():
        if "error" in f:
            rows.append([label, "-", *(["failed"] * (len(header) - 2))])
            continue
        cells = []
        for s in lat:
            r = lat[s]["1"]["models"].get(label, {})
            cell = f"{r['cpu_ratio']:.2f}x" if "cpu_ratio" in r else "-"
            if "cpu_ratio_vs_float_ort" in r and label != "float .ort":
                cell += f" ({r['cpu_ratio_vs_float_ort']:.2f}x .ort)"
            cells.append(cell)
        fv = res["fidelity"].get(label, {})
        fid = "ref" if label == "float" else f"{fv[key]:.4f}" if key in fv else fv.get("error", "-")
        rows.append([label, f"{f['bytes'] / MB:.2f}", *cells, fid])
    return table(header, rows)


def report(results: dict, args) -> str:
    out = []
    for sample, res in results["models"].items():
        files, lat = res["files"], res["latency"]
        shapes = list(lat)
        out += ["", f"### {sample}", ""]
        header = ["model", "MB"]
        for tname in args.threads:
            for s in shapes:
                header.append(f"{shape_name(sample, int(s))}, {tname} thr" + (" (CPU ms)" if tname == "1" else ""))
        key = "cosine_mean" if MODELS[sample].task == "embedding" else "top1_agreement"
        if res["fidelity"]:
            header.append(key.replace("_", " "))
        rows = []
        for label, f in files.items():
            if "error" in f:
                rows.append([label, "-", *(["failed"] * (len(header) - 2))])
                continue
            row = [label, f"{f['bytes'] / MB:.2f}"]
            for tname in args.threads:
                for s in shapes:
                    r = lat[s][tname]["models"].get(label)
                    if r is None:
                        row.append("-")
                        continue
                    pre = "cpu_" if tname == "1" else ""
                    cell = f"{r[pre + 'median_ms']:.2f} ({r[pre + 'ratio']:.2f}x"
                    if label != "float .ort" and pre + "ratio_vs_float_ort" in r:
                        cell += f"; {r[pre + 'ratio_vs_float_ort']:.2f}x .ort"
                    row.append(cell + ")")
            if res["fidelity"]:
                fv = res["fidelity"].get(label, {})
                row.append("ref" if label == "float" else f"{fv[key]:.4f}" if key in fv else fv.get("error", "-"))
            rows.append(row)
        if "1" in args.threads:
            out += [compact(sample, res), ""]
        out.append(table(header, rows))
        loads = sorted({round(v["loadavg_1min"], 1) for s in lat.values() for v in s.values()})
        out.append(f"\nms: median of {args.runs} interleaved batch-1 runs (wall clock; 1 thread: CPU time of the run); "
                   f"(Nx) = float ONNX / model, > 1 is faster; for an .ort also (Nx .ort) = float .ort / model. "
                   f"Load average while timing: {loads[0]}-{loads[-1]} on {os.cpu_count()} CPUs.")
        if res["profiles"]:
            out += ["", (f"Top op types by time (ORT profiler, 1 thread, each node's fastest of {args.profile_runs} "
                         "runs; ms per run, share of the kernels' sum):"), ""]
            prow = []
            for s, per in res["profiles"].items():
                for label, p in per.items():
                    top = ", ".join(f"{op} {v['ms']:.2f} ({100 * v['ms'] / p['kernel_ms']:.0f}%)"
                                    for op, v in list(p["ops"].items())[:args.top])
                    prow.append([shape_name(sample, int(s)), label, f"{p['kernel_ms']:.2f}", top])
            out.append(table(["shape", "model", "kernels ms", "top op types"], prow))
    return "\n".join(out)


def environment() -> dict:
    from importlib import metadata

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=False).stdout.strip()

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "cpu": _cpu_name(), "edgeq_commit": git("rev-parse", "--short", "HEAD"),
            **{p: metadata.version(p) for p in ("onnxruntime", "onnx", "numpy")}}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--work", type=Path, default=Path("/tmp/edgeq-latency"), help="models, data and logs")
    p.add_argument("--models", default="minilm,efficientnet_lite0", help="samples to measure (comma-separated)")
    p.add_argument("--runs", type=int, default=40, help="interleaved runs per model and shape (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", default="2,default,1",
                   help="intra-op thread settings: 2, default (ORT's choice), 1 (adds CPU time)")
    p.add_argument("--profile-runs", type=int, default=20, help="runs per profile; 0 skips profiling")
    p.add_argument("--top", type=int, default=4, help="op types listed per profile")
    p.add_argument("--no-fidelity", dest="fidelity", action="store_false")
    p.add_argument("--eval-batches", type=int, default=None, help="evaluation batches for fidelity (default all)")
    p.add_argument("--only", default=None, help="measure only these labels (comma-separated; float always)")
    p.add_argument("--extra", action="append", default=[], metavar="SAMPLE:LABEL=PATH",
                   help="also time this .onnx/.ort file (a prototype) with the sample's models")
    p.add_argument("--rebuild", action="store_true", help="remake the models even if they exist")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--report", type=Path, metavar="JSON", help="print the tables of an earlier --json run and exit")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in a.models:
        if m not in SHAPES:
            p.error(f"unknown model {m!r}; known: {', '.join(SHAPES)}")
    a.threads = [t.strip() for t in a.threads.split(",") if t.strip()]
    for t in a.threads:
        if t not in THREADS:
            p.error(f"unknown thread setting {t!r}; use 2, default or 1")
    a.work = a.work.resolve()
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        for k in ("runs", "profile_runs"):
            setattr(args, k, int(saved["settings"][k]))
        args.threads = [t for t in ("2", "default", "1") if t in saved["settings"]["threads"]]
        say(report(saved, args))
        return 0
    sys.path.insert(0, str(REPO))  # samples/, targets/ for the inputs and the converter
    results = {"environment": environment(), "settings": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    started = time.time()
    for sample in args.models:
        say(f"== {sample} ==")
        only = {"float", *(s.strip() for s in args.only.split(","))} if args.only else None
        files = Models(args.work, sample, args.rebuild).make(only)
        for spec in args.extra:
            owner, _, rest = spec.partition(":")
            label, _, path = rest.partition("=")
            if owner == sample:
                if not Path(path).is_file():
                    raise SystemExit(f"--extra {spec!r}: no file {path}")
                files[label] = {"path": path, "bytes": Path(path).stat().st_size}
        results["models"][sample] = {"files": files, **measure(sample, files, args)}
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    results["wall_s"] = time.time() - started
    text = report(results, args)
    say(text)
    if args.json:
        results["table"] = text
        args.json.write_text(json.dumps(results, indent=1, default=str))
        say(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
