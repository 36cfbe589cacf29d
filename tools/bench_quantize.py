#!/usr/bin/env python
"""Quantization benchmark: edgeq against ONNX Runtime's quantizer and NNCF, side by side.

    .venv/bin/python tools/bench_quantize.py --work /tmp/edgeq-bench --json bench.json
    .venv/bin/python tools/bench_quantize.py --quick --models efficientnet_lite0 --methods edgeq-w8a16,ort-dynamic
    .venv/bin/python tools/bench_quantize.py --models minilm --methods edgeq-w4a16,ort-gptq-b32,ort-hqq-b32

Models: the bundled samples ``minilm`` (all-MiniLM-L6-v2) and ``efficientnet_lite0``, exported
once with ``edgeq.export`` into the work folder. Every method quantizes the same float ONNX file
with the sample's calibration split, in its own subprocess; then a second subprocess compares
the result with fp32 on the evaluation split (never seen by calibration) and times batch-1 CPU
inference, interleaved with fp32, in ONNX Runtime (ORT_ENABLE_ALL, fixed intra-op threads).

Per method: quantize wall time, peak RSS of its process, file size against the ideal (weights at
their bit width plus scales), fidelity (MiniLM: mean / min cosine of the embeddings to fp32;
EfficientNet: top-1 agreement and logit SQNR), and speed against fp32 (ratio of medians; > 1 is
faster). ``--rss-samples 100,400`` adds the calibration peak-RSS study: edgeq W8A8 and ORT MinMax
on 100 and 400 calibration samples. A method that fails is a row with its error, never a crash.
The machine may be shared: read ratios and medians, not absolute milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/, for `import bench`

from bench import data as bdata  # noqa: E402
from bench import nncf_env  # noqa: E402
from bench.data import MODELS  # noqa: E402
from bench.methods import DEFAULT_METHODS, METHODS, RSS_METHODS  # noqa: E402
from bench.proc import log_tail, run_job  # noqa: E402
from bench.sizes import file_bytes, ideal_bytes  # noqa: E402
from edgeq.validate.report import format_number

REPO = Path(__file__).resolve().parents[1]
MB = 1e6


def say(text: str = "") -> None:
    print(text, flush=True)


def _list(text: str, known, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad:
        raise SystemExit(f"unknown {what} {bad[0]!r}; known: {', '.join(known)}")
    return items


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.jobs = self.work / "jobs"
        self.rows: list[dict] = []
        self.rss_rows: list[dict] = []
        self.models: dict[str, dict] = {}
        self.nncf_python: str | None = None
        self.nncf_status = "not requested"
        self.started = time.time()
        self.env_start = environment()

    # ---- setup ----------------------------------------------------------------------------

    def model_path(self, model: str) -> Path:
        return self.work / "models" / f"{model}.onnx"

    def prepare(self, models: list[str], methods: list[str]) -> None:
        for model in models:
            path = self.model_path(model)
            if not path.exists():
                say(f"exporting {model} with edgeq.export -> {path}")
                path.parent.mkdir(parents=True, exist_ok=True)
                o = run_job({"tag": f"export-{model}", "kind": "export", "model": model, "out_path": str(path)},
                            self.jobs, timeout_s=self.args.timeout, max_rss_mb=self.args.max_rss_gb * 1024)
                if not o.result.get("ok"):
                    raise SystemExit(f"export of {model} failed: {o.result.get('error') or log_tail(o.log)}")
            rss_counts = self.rss_counts(methods)
            sets = bdata.prepare(self.work, model, rss_counts, log=say)
            self.models[model] = {"path": str(path), "size_bytes": file_bytes(path),
                                  "ideal_bytes": ideal_bytes(path)["ideal_bytes"], "data": sets}
        if "nncf-int8" in methods:
            if self.args.setup_nncf and not self.args.nncf_python:
                self.nncf_python, self.nncf_status = nncf_env.find(self.work)
                if self.nncf_python is None:
                    self.nncf_python, self.nncf_status = nncf_env.setup(self.work, log=say)
            else:
                self.nncf_python, self.nncf_status = nncf_env.find(self.work, self.args.nncf_python)
            say(f"NNCF: {self.nncf_status}")

    def rss_counts(self, methods: list[str]) -> list[int]:
        if not any(m in RSS_METHODS for m in methods):
            return []
        return [int(n) for n in self.args.rss_samples.split(",") if n.strip()]

    # ---- jobs -----------------------------------------------------------------------------

    def quantize(self, model: str, method: str, calib_set: str, tag: str) -> dict:
        m = METHODS[method]
        sets = self.models[model]["data"]
        job = {
            "tag": tag, "kind": "quantize", "method": method, "model": model, "task": MODELS[model].task,
            "model_path": self.models[model]["path"], "out_path": str(self.work / "out" / model / f"{tag}.onnx"),
            "calib_dir": sets[calib_set]["dir"], "calib_b1_dir": sets["calib_b1"]["dir"],
        }
        row = {"method": method, "model": model, "tool": m.tool, "summary": m.summary, "calib_set": calib_set,
               "calib_data": sets[calib_set]["desc"] if m.calibrated or m.tool == "edgeq" else None}
        python = sys.executable
        if m.python == "nncf":
            if self.nncf_python is None:
                return {**row, "ok": False, "stage": "setup", "error": self.nncf_status}
            python = self.nncf_python
        o = run_job(job, self.jobs, python=python, max_rss_mb=self.args.max_rss_gb * 1024, timeout_s=self.args.timeout)
        res = o.result
        row.update({"wall_s": o.wall_s, "peak_rss_mb": o.peak_rss_mb, "log": str(o.log), "out_path": job["out_path"]})
        if o.killed or not res.get("ok"):
            Path(job["out_path"]).unlink(missing_ok=True)
            err = o.killed or res.get("error") or f"worker exited {o.returncode}: {log_tail(o.log, 3)}"
            etype = res.get("error_type")
            row.update({"ok": False, "stage": "quantize", "error": f"{etype}: {err}" if etype and not o.killed else err,
                        "hint": res.get("hint"), "traceback": res.get("traceback")})
            return row
        row.update({
            "ok": True, "time_s": res["quantize_s"], "prep_s": res.get("prep_s"),
            "rss_before_mb": res.get("rss_before_mb"), "size_bytes": res["size_bytes"],
            "ideal_bytes": res["ideal_bytes"], "quantized_weights": res["quantized_weights"],
            "tool_ideal_bytes": res.get("tool_ideal_bytes"), "notes": res.get("notes", []),
            "plan": res.get("plan"), "calibration": res.get("calibration"),
        })
        if not res["quantized_weights"]:
            row["notes"].append("no weight was quantized: the model has no op this quantizer handles "
                                "(EfficientNet's classifier is a Gemm, its other weights Conv)")
        return row

    def evaluate(self, model: str, cand_path: str, tag: str) -> dict:
        sets = self.models[model]["data"]
        job = {
            "tag": tag, "kind": "evaluate", "model": model, "task": MODELS[model].task,
            "fp32_path": self.models[model]["path"], "cand_path": cand_path,
            "eval_dir": sets["eval"]["dir"], "latency_dir": sets["latency"]["dir"],
            "eval_limit": self.args.eval_batches, "latency_runs": self.args.latency_runs, "threads": self.args.threads,
        }
        o = run_job(job, self.jobs, max_rss_mb=self.args.max_rss_gb * 1024, timeout_s=self.args.timeout)
        if o.killed or not o.result.get("ok"):
            r = o.result
            err = o.killed or (f"{r.get('error_type')}: {r.get('error')}" if r.get("error") else log_tail(o.log, 3))
            return {"eval_ok": False, "eval_error": f"ORT cannot run it: {err}"}
        r = o.result
        return {"eval_ok": True, "fidelity": r["fidelity"], "latency": r["latency"],
                "optimized_ops": r["optimized_ops"], "session_load_s": r["session_load_s"],
                "session_note": r.get("session_note")}

    def record(self, row: dict) -> None:
        self.rows.append(row)
        say("  " + " | ".join(format_row(row)))
        self.write_json()

    def run_model(self, model: str, methods: list[str]) -> None:
        say(f"\n== {model} ==")
        info = self.models[model]
        fp32 = {"method": "fp32", "model": model, "tool": "-",
                "summary": "the float export (latency row: fp32 against itself)",
                "ok": True, "size_bytes": info["size_bytes"], "ideal_bytes": info["ideal_bytes"]}
        fp32.update(self.evaluate(model, info["path"], f"{model}-fp32-eval"))
        self.record(fp32)
        for method in methods:
            row = self.quantize(model, method, "calib", f"{model}-{method}")
            if row["ok"]:
                row.update(self.evaluate(model, row["out_path"], f"{model}-{method}-eval"))
            self.record(row)
            if not row["ok"] and METHODS[method].retry_fixed_length and "calib_fixed" in info["data"]:
                fixed = info["data"]["calib_fixed"]
                say(f"  {method} failed on varying sequence lengths; again on fixed-length padding: {fixed['desc']}")
                row2 = self.quantize(model, method, "calib_fixed", f"{model}-{method}-fixed")
                row2["variant"] = f"all padded to {json.loads(fixed['shapes'][0])[-1]} tokens"
                if row2["ok"]:
                    row2.update(self.evaluate(model, row2["out_path"], f"{model}-{method}-fixed-eval"))
                self.record(row2)

    def run_rss(self, models: list[str], methods: list[str]) -> None:
        counts = self.rss_counts(methods)
        chosen = [m for m in RSS_METHODS if m in methods]
        if not counts or not chosen:
            return
        say(f"\n== calibration peak RSS vs sample count ({', '.join(map(str, counts))}) ==")
        for model in models:
            for n in counts:
                for method in chosen:
                    row = self.quantize(model, method, f"rss{n}", f"{model}-{method}-rss{n}")
                    row["samples"] = self.models[model]["data"][f"rss{n}"]["samples"]
                    Path(row["out_path"]).unlink(missing_ok=True)
                    self.rss_rows.append(row)
                    say("  " + " | ".join(format_rss_row(row)))
                    self.write_json()

    # ---- output ---------------------------------------------------------------------------

    def write_json(self) -> None:
        if not self.args.json:
            return
        out = {
            "config": {k: v for k, v in vars(self.args).items()},
            "environment": self.env_start,
            "environment_now": environment(),  # the tree may change under a long run
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)),
            "elapsed_s": time.time() - self.started,
            "nncf": self.nncf_status,
            "models": self.models,
            "rows": self.rows,
            "rss_scaling": self.rss_rows,
        }
        p = Path(self.args.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=str))
        tmp.replace(p)


def _fidelity(row: dict) -> str:
    f = row.get("fidelity")
    if not f:
        return "-"
    if "cosine_mean" in f:
        return f"cos {f['cosine_mean']:.4f} mean / {f['cosine_min']:.4f} min"
    return f"top1 {100 * f['top1_agreement']:.1f}% / {f['sqnr_db']:.1f} dB"


def label(row: dict) -> str:
    return row["method"] + (f" ({row['variant']})" if row.get("variant") else "")


_num = format_number


COLUMNS = ("method", "model", "time s", "peak RSS MB", "size MB", "ideal MB", "fidelity vs fp32", "speed vs fp32")


def format_row(row: dict) -> list[str]:
    name = label(row)
    lat = row.get("latency")
    speed = f"{lat['speedup']:.2f}x ({lat['cand_ms']:.1f} ms)" if lat else "-"
    if not row["ok"]:
        return [name, row["model"], "-", _num(row.get("peak_rss_mb"), ".0f"), "-", "-",
                "FAILED: " + row["error"][:60], "-"]
    fid = _fidelity(row) if row.get("eval_ok", True) else "FAILED to run: " + row["eval_error"][:50]
    return [name, row["model"], _num(row.get("time_s"), ".1f"), _num(row.get("peak_rss_mb"), ".0f"),
            _num(row["size_bytes"] / MB, ".2f"), _num(row["ideal_bytes"] / MB, ".2f"), fid, speed]


RSS_COLUMNS = ("method", "model", "calib samples", "time s", "peak RSS MB", "RSS before MB", "status")


def format_rss_row(row: dict) -> list[str]:
    status = "ok" if row["ok"] else "FAILED: " + row["error"][:70]
    return [row["method"], row["model"], str(row.get("samples", "?")), _num(row.get("time_s"), ".1f"),
            _num(row.get("peak_rss_mb"), ".0f"), _num(row.get("rss_before_mb"), ".0f"), status]


def table(columns, rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def environment() -> dict:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.strip()

    return {
        "python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
        "edgeq_commit": git("rev-parse", "--short", "HEAD"), "edgeq_tree_dirty": bool(git("status", "--porcelain")),
        **{p: version(p) for p in ("onnxruntime", "onnx", "numpy", "torch", "onnx-ir", "nncf")},
    }


def report(bench: Bench) -> str:
    out = ["", "## Quantization benchmark", "",
           table(COLUMNS, [format_row(r) for r in bench.rows]), ""]
    a = bench.args
    out.append(f"time: the tool's quantize call(s) in a fresh process (ORT static and dynamic rows include its "
               f"pre-processing); peak RSS: that whole process. fidelity on the evaluation split"
               f"{f' (first {a.eval_batches} batches)' if a.eval_batches else ''}; speed: fp32/candidate median "
               f"batch-1 latency, {a.latency_runs} interleaved runs, {a.threads} intra-op thread(s), ORT_ENABLE_ALL "
               f"(the fp32 row is fp32 against itself: the noise floor).")
    if bench.rss_rows:
        out += ["", "## Calibration peak RSS vs calibration sample count", "",
                table(RSS_COLUMNS, [format_rss_row(r) for r in bench.rss_rows])]
    fails = [r for r in bench.rows + bench.rss_rows if not r["ok"] or not r.get("eval_ok", True)]
    if fails:
        out += ["", "## Failures", ""]
        for r in fails:
            what = f"{label(r)} / {r['model']}"
            if "samples" in r:
                what += f" / {r['samples']} samples"
            msg = r.get("error") or r.get("eval_error")
            out.append(f"- {what} [{r.get('stage', 'evaluate')}]: {msg}")
    notes = [(r, n) for r in bench.rows for n in [*(r.get("notes") or []), r.get("session_note")] if n]
    if notes:
        out += ["", "## Notes", ""]
        seen = set()
        for r, n in notes:
            if (label(r), r["model"], n) not in seen:
                seen.add((label(r), r["model"], n))
                out.append(f"- {label(r)} / {r['model']}: {n}")
    fused = [r for r in bench.rows if r.get("optimized_ops")]
    if fused:
        out += ["", "## Quantized ops in ORT's optimized graph", ""]
        for r in fused:
            ops = ", ".join(f"{k} {v}" for k, v in r["optimized_ops"].items())
            out.append(f"- {label(r)} / {r['model']}: {ops}")
    out.append(f"\nNNCF: {bench.nncf_status}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="methods: " + ", ".join(METHODS))
    ap.add_argument("--work", default="/tmp/edgeq-bench",
                    help="work folder: exported models, data, outputs, logs (reused)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated; default {','.join(MODELS)}")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated; default: all")
    ap.add_argument("--json", help="write the results as JSON here (updated after every row)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 3 evaluation batches, 10 latency runs, no RSS study")
    ap.add_argument("--threads", type=int, default=1,
                    help="ORT intra-op threads for the latency/fidelity sessions (default 1)")
    ap.add_argument("--latency-runs", type=int, help="timed batch-1 runs per model (default 100; --quick 10)")
    ap.add_argument("--eval-batches", type=int, help="limit evaluation batches (default all; --quick 3)")
    ap.add_argument("--rss-samples", default=None,
                    help="calibration sample counts for the peak-RSS study of edgeq-w8a8 and ort-static-minmax "
                         "(default 100,400; '' or --quick: skip)")
    ap.add_argument("--max-rss-gb", type=float, default=10.0,
                    help="kill a job whose resident memory passes this (default 10)")
    ap.add_argument("--timeout", type=float, default=1800, help="kill a job running longer than this many seconds")
    ap.add_argument("--nncf-python",
                    help="a Python interpreter that imports nncf (default: this one, or <work>/nncf-venv)")
    ap.add_argument("--setup-nncf", action="store_true",
                    help="install NNCF into <work>/nncf-venv if pip can do it without replacing torch")
    args = ap.parse_args(argv)
    if args.latency_runs is None:
        args.latency_runs = 10 if args.quick else 100
    if args.eval_batches is None and args.quick:
        args.eval_batches = 3
    if args.rss_samples is None:
        args.rss_samples = "" if args.quick else "100,400"
    models = _list(args.models, MODELS, "model")
    methods = _list(args.methods, METHODS, "method")

    bench = Bench(args)
    bench.work.mkdir(parents=True, exist_ok=True)
    say(f"work folder {bench.work}; models {', '.join(models)}; methods {', '.join(methods)}")
    bench.prepare(models, methods)
    for model in models:
        bench.run_model(model, methods)
    bench.run_rss(models, methods)
    bench.write_json()
    say(report(bench))
    if args.json:
        say(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
