#!/usr/bin/env python
"""LLM quantization benchmark: edgeq against ONNX Runtime, onnxruntime-genai and llama.cpp on SmolLM2.

    PYTHONPATH=$PWD .venv/bin/python tools/bench_llm.py --work /tmp/edgeq-bench-llm --json bench_llm.json
    PYTHONPATH=$PWD .venv/bin/python tools/bench_llm.py --float smollm2.onnx --methods ort-rtn,genai-int4
    PYTHONPATH=$PWD .venv/bin/python tools/bench_llm.py --edgeq /path/to/other/checkout --reuse

One run, one held-out text: the smollm2 sample's evaluation split (10 paragraphs, 1545 predicted
tokens) and its 4 chat prompts. The reference is the float ONNX of the sample (its GGUF
dequantized, ``edgeq export smollm2``; ``--float`` copies an existing export instead of
exporting, ~10 min). Each quantization runs in its own subprocess (wall time, CPU time, peak RSS
from ``/proc`` ``VmHWM``); see ``bench/llm_methods.py`` for the methods and their settings.

Then one subprocess measures fidelity with edgeq's LLM metrics (``edgeq.validate.llm``: perplexity,
mean KL divergence to the float model's next-token distribution, teacher-forced top-1 agreement,
greedy tokens until the first divergence on the prompts) for every model, including
onnxruntime-genai's graph and llama.cpp through thin runner adapters (``bench/llm_runtimes.py``),
and one subprocess measures speed: a 38-token chat prompt's prefill, then 32 decode steps, all
models loaded in that process and run round robin (``--rounds``, medians), first with
``--threads`` intra-op threads (wall clock), then with 1 thread (wall clock and the calling
thread's CPU time, ``time.thread_time``, which a loaded machine does not inflate).

A method that fails is a row with its error, never a crash. The machine may be shared: compare
ratios, medians and the 1-thread CPU times, not absolute wall-clock milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/, for `import bench`

from bench.llm_methods import METHODS  # noqa: E402
from bench.proc import log_tail, run_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "bench" / "llm_worker.py"
MB = 1e6


def say(text: str = "") -> None:
    print(text, flush=True)


def artifact_bytes(kind: str, path: str) -> int:
    """Bytes on disk of the model files (ONNX + external data, .ort, genai model files, GGUF)."""
    p = Path(path)
    if kind == "onnx":
        from bench.sizes import file_bytes

        return file_bytes(p)
    if kind == "genai":
        cfg = json.loads((p / "genai_config.json").read_text())["model"]["decoder"]["filename"]
        return sum(f.stat().st_size for f in p.iterdir() if f.name.startswith(cfg))
    return p.stat().st_size


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for pkg in ("onnxruntime", "onnxruntime-genai", "llama-cpp-python", "onnx", "torch", "transformers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        out["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.jobs = self.work / "jobs"
        self.edgeq_root = Path(args.edgeq).resolve() if args.edgeq else REPO
        self.rows: dict[str, dict] = {}
        self.info: dict = {"versions": versions(), "edgeq_root": str(self.edgeq_root)}
        self.started = time.time()

    def env(self, edgeq: bool) -> dict:
        root = self.edgeq_root if edgeq else REPO
        return {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def job(self, job: dict, *, edgeq: bool = False, timeout: float | None = None):
        return run_job(job, self.jobs, env=self.env(edgeq), worker=WORKER, max_rss_mb=self.args.max_rss_gb * 1024,
                       timeout_s=timeout or self.args.timeout)

    # ---- inputs ------------------------------------------------------------------------------

    def float_model(self) -> Path:
        path = self.work / "models" / "float.onnx"
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.args.float:
            say(f"float model: copying {self.args.float}")
            shutil.copyfile(self.args.float, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
            self.info["float"] = {"source": str(self.args.float)}
            return path
        say("float model: python -m edgeq export smollm2 (about 10 minutes on a loaded 2-core machine)")
        o = self.job({"tag": "export", "kind": "export", "out_path": str(path)}, edgeq=True, timeout=3600)
        if not o.result.get("ok"):
            raise SystemExit(f"export failed: {o.result.get('error') or o.killed}\n{log_tail(o.log)}")
        self.info["float"] = {"source": "python -m edgeq export smollm2", "export_s": o.result["export_s"],
                              "wall_s": o.wall_s, "peak_rss_mb": o.peak_rss_mb}
        return path

    def calib_dir(self) -> Path:
        folder = self.work / "data" / "calib"
        if not folder.is_dir():
            o = self.job({"tag": "calib", "kind": "calib", "out_dir": str(folder)})
            if not o.result.get("ok"):
                raise SystemExit(f"calibration feeds failed: {o.result.get('error')}\n{log_tail(o.log)}")
        return folder

    # ---- quantize -------------------------------------------------------------------------------

    def quantize(self, methods: list[str], model: Path, hf_folder: Path, gguf: Path) -> None:
        calib = self.calib_dir() if "ort-gptq" in methods else None
        for name in methods:
            m = METHODS[name]
            row = {"method": name, "tool": m.tool, "summary": m.summary}
            self.rows[name] = row
            missing = [d for d in m.needs if not self.rows.get(d, {}).get("ok")]
            if missing:
                row.update(ok=False, error=f"needs {', '.join(missing)}, which did not run or failed")
                say(f"[{name}] skipped: {row['error']}")
                continue
            result_file = self.jobs / f"q-{name}.result.json"
            if self.args.reuse and result_file.is_file():
                old = json.loads(result_file.read_text())
                if old.get("ok") and Path(old["artifact"]).exists():
                    row.update(old["row"])
                    row["reused"] = True
                    say(f"[{name}] reused from {result_file}")
                    continue
            job = {"tag": f"q-{name}", "kind": "quantize", "method": name, "model_path": str(model),
                   "out_dir": str(self.work / "out" / name), "hf_folder": str(hf_folder), "gguf_path": str(gguf),
                   "calib_dir": str(calib) if calib else None, "gptq_feeds": self.args.gptq_feeds,
                   "inputs": {d: self.rows[d]["artifact"] for d in m.needs}}
            say(f"[{name}] {m.summary} ...")
            o = self.job(job, edgeq=m.tool == "edgeq")
            r = o.result
            row.update(ok=bool(r.get("ok")) and not o.killed, wall_s=o.wall_s, peak_rss_mb=o.peak_rss_mb,
                       cpu_s=r.get("cpu_s"), log=str(o.log))
            if row["ok"]:
                for k in ("artifact", "kind", "quantize_s", "command", "notes", "ops", "package_bytes",
                          "package_files", "edgeq_ideal_bytes"):
                    if k in r:
                        row[k] = r[k]
                row["size_bytes"] = artifact_bytes(row["kind"], row["artifact"])
                if m.tool in ("reference", "llama.cpp"):  # nothing was quantized: no process to report
                    row.update(wall_s=None, peak_rss_mb=None, cpu_s=None)
                r["row"] = row
                result_file.write_text(json.dumps(r, indent=1, default=str))
                qs = row.get("quantize_s")
                say(f"[{name}] {row['size_bytes'] / MB:.1f} MB" + (f", {qs:.1f} s, peak RSS {o.peak_rss_mb:.0f} MB"
                                                                  if qs is not None else ""))
            else:
                row["error"] = o.killed or r.get("error") or f"exit code {o.returncode}"
                row["log_tail"] = log_tail(o.log, 12)
                say(f"[{name}] FAILED: {row['error']}\n{row['log_tail']}")

    # ---- measure --------------------------------------------------------------------------------

    def models(self) -> list[dict]:
        return [{"name": n, "kind": r["kind"], "artifact": r["artifact"]} for n, r in self.rows.items() if r.get("ok")]

    def evaluate(self) -> None:
        models = self.models()
        ref = next((m for m in models if m["name"] == "float"), None)
        if ref is None:
            raise SystemExit("the float model is needed as the reference (method 'float')")
        cands = [m for m in models if m["name"] != "float"]
        say(f"fidelity: {len(cands)} models against the float reference ...")
        o = self.job({"tag": "evaluate", "kind": "evaluate", "reference": ref, "candidates": cands,
                      "max_new_tokens": self.args.new_tokens, "threads": None}, timeout=4 * 3600)
        if not o.result.get("ok"):
            say(f"fidelity job failed: {o.killed or o.result.get('error')}\n{log_tail(o.log, 12)}")
            self.info["evaluate_error"] = o.killed or o.result.get("error")
            return
        res = o.result
        self.info["evaluation"] = {k: res.get(k) for k in ("texts", "predicted_tokens", "prompts", "prompt_tokens",
                                                           "reference_perplexity")}
        self.info["evaluation"]["wall_s"] = o.wall_s
        self.rows["float"]["fidelity"] = {"ok": True, "perplexity": res.get("reference_perplexity"), "kld_mean": 0.0,
                                          "top1_agreement": 1.0, "reference": True}
        for name, m in res["models"].items():
            self.rows[name]["fidelity"] = m

    def speed(self) -> None:
        models = self.models()
        say(f"speed: {len(models)} models, {self.args.rounds} rounds round robin, {self.args.threads} threads "
            "then 1 thread ...")
        o = self.job({"tag": "speed", "kind": "speed", "models": models, "threads": self.args.threads,
                      "rounds": self.args.rounds, "decode_steps": self.args.decode_steps}, timeout=4 * 3600)
        if not o.result.get("ok"):
            say(f"speed job failed: {o.killed or o.result.get('error')}\n{log_tail(o.log, 12)}")
            self.info["speed_error"] = o.killed or o.result.get("error")
            return
        res = o.result
        self.info["speed"] = {k: res[k] for k in ("prompt", "prompt_tokens", "decode_steps", "rounds", "errors")}
        self.info["speed"]["threads"] = self.args.threads
        self.info["speed"]["wall_s"] = o.wall_s
        for threads, table in res["phases"].items():
            for name, s in table.items():
                base, _, variant = name.partition("|")  # "model|variant": the same model run another way
                key = f"speed_{variant}" if variant else "speed"
                if base in self.rows:
                    self.rows[base].setdefault(key, {})[threads] = s

    # ---- output ---------------------------------------------------------------------------------

    def table(self) -> str:
        t = self.args.threads
        head = ["method", "MB", "perplexity", "KLD", "top-1", "greedy prefix", f"prefill tok/s ({t}t)",
                f"decode ms/tok ({t}t)", "decode CPU ms/tok (1t)", "prefill CPU tok/s (1t)", "quantize s",
                "peak RSS MB"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def f(x, fmt):
            return "-" if x is None else format(x, fmt)

        ref_ppl = self.info.get("evaluation", {}).get("reference_perplexity")
        for name, r in self.rows.items():
            if not r.get("ok"):
                lines.append(f"| {name} | failed: {str(r.get('error'))[:150]} |" + " |" * (len(head) - 2))
                continue
            fid = r.get("fidelity") or {}
            sp = (r.get("speed") or {}).get(str(t), {})
            sp1 = (r.get("speed") or {}).get("1", {})
            if fid.get("ok"):
                ppl = fid["perplexity"]
                ppl_s = f"{ppl:.2f}" + (f" ({100 * (ppl / ref_ppl - 1):+.1f} %)" if ref_ppl and not fid.get("reference")
                                        else "")
                greedy = "-"
                if "greedy" in fid:
                    g = fid["greedy"]
                    greedy = (f"{sum(x['prefix'] for x in g)}/{sum(x['reference_tokens'] for x in g)} "
                              f"({sum(x['equal'] for x in g)}/{len(g)} same)")
                elif fid.get("reference"):
                    greedy = "ref"
                cells = [ppl_s, f(fid.get("kld_mean"), ".4f"), f(fid.get("top1_agreement"), ".3f"), greedy]
            else:
                err = fid.get("error", "not measured")
                cells = [f"error: {err[:80]}", "-", "-", "-"]
            q = r.get("quantize_s")
            lines.append("| " + " | ".join([
                name, f"{r['size_bytes'] / MB:.1f}", *cells, f(sp.get("prefill_tps"), ".1f"), f(sp.get("decode_ms"), ".1f"),
                f(sp1.get("decode_cpu_ms"), ".1f"), f(sp1.get("prefill_cpu_tps"), ".1f"),
                f(q, ".1f"), f(r.get("peak_rss_mb"), ".0f")]) + " |")
        return "\n".join(lines)

    def notes(self) -> list[str]:
        out = []
        for name, r in self.rows.items():
            for n in r.get("notes", []):
                out.append(f"{name}: {n}")
            if r.get("command"):
                out.append(f"{name}: command: {r['command']}")
            g = (r.get("fidelity") or {}).get("genai_runtime_greedy")
            if g:
                out.append(f"{name}: onnxruntime-genai's runtime gives the same greedy tokens as edgeq's CausalLM on "
                           f"the same file on {g['same_tokens_as_ort_driven_graph']}/{g['prompts']} prompts")
            variants = {"speed_graph_in_ort": "its graph in plain ORT driven by edgeq's CausalLM loop (no shared buffer)",
                        "speed_genai_runtime": "the package run by onnxruntime-genai's runtime (its genai_config.json)"}
            for key, what in variants.items():
                sg = r.get(key)
                if sg:
                    s2, s1 = sg.get(str(self.args.threads), {}), sg.get("1", {})
                    out.append(f"{name}: {what}: decode {s2.get('decode_ms', float('nan')):.1f} ms/token "
                               f"({self.args.threads}t), {s1.get('decode_cpu_ms', float('nan')):.1f} CPU ms/token (1t), "
                               f"prefill {s2.get('prefill_tps', float('nan')):.1f} tok/s ({self.args.threads}t), "
                               f"{s1.get('prefill_cpu_tps', float('nan')):.1f} CPU tok/s (1t)")
            if r.get("package_bytes"):
                out.append(f"{name}: whole package folder {r['package_bytes'] / MB:.1f} MB ({', '.join(r['package_files'])})")
        return out

    def write_json(self, path: Path) -> None:
        self.info["loadavg_end"] = os.getloadavg()
        self.info["total_s"] = time.time() - self.started
        data = {"info": self.info, "rows": self.rows, "table": self.table(), "notes": self.notes()}
        path.write_text(json.dumps(data, indent=1, default=str))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="methods: " + ", ".join(METHODS))
    ap.add_argument("--work", default="/tmp/edgeq-bench-llm", help="work folder (models, jobs, logs)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    ap.add_argument("--json", help="write the results as JSON")
    ap.add_argument("--float", help="an existing `edgeq export smollm2` ONNX to copy instead of exporting")
    ap.add_argument("--edgeq", help="checkout whose edgeq runs the edgeq rows (default: this one)")
    ap.add_argument("--reuse", action="store_true", help="reuse quantized models of an earlier run in --work")
    ap.add_argument("--rounds", type=int, default=5, help="speed: timed rounds per model (default 5)")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="speed: intra-op threads of the first phase")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (fidelity)")
    ap.add_argument("--gptq-feeds", type=int, default=8,
                    help="calibration feeds for ORT's GPTQ (it runs the model once per MatMul input per feed)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-fidelity", action="store_true")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="per quantization job, seconds")
    ap.add_argument("--max-rss-gb", type=float, default=12)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method {bad[0]!r}; known: {', '.join(METHODS)}")
    if "float" not in methods and not args.no_fidelity:
        methods.insert(0, "float")  # the reference
    methods = [m for m in METHODS if m in methods]  # registry order: dependencies first

    b = Bench(args)
    b.work.mkdir(parents=True, exist_ok=True)
    from samples import smollm2

    model = b.float_model()
    hf = smollm2.hf_folder()
    gguf = smollm2.gguf_path()
    b.info["hf_folder"], b.info["gguf"] = str(hf), str(gguf)
    b.quantize(methods, model, hf, gguf)
    if not args.no_fidelity:
        b.evaluate()
    if not args.no_speed:
        b.speed()
    say("\n" + b.table())
    for n in b.notes():
        say(f"- {n}")
    if args.json:
        b.write_json(Path(args.json))
        say(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
