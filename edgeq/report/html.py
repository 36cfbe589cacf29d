"""The build report as one self-contained HTML file: inline CSS and SVG, no scripts, no network.

``render(data)`` takes the dict ``edgeq build`` writes as ``build.json`` (so a report can be
re-rendered from the JSON alone).
"""

from __future__ import annotations

import math
from collections import Counter
from html import escape

from edgeq.report.svg import PALETTE, bars, line_plot
from edgeq.validate.latency import top_ops
from edgeq.validate.report import format_number

PLOT_CAP_DB = 80.0

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2937}
body{margin:24px auto;padding:0 16px;max-width:1000px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}
th{background:#f3f4f6}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#15803d;font-weight:600}
.fail{color:#b91c1c;font-weight:600}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff}
.badge.pass{background:#16a34a}
.badge.fail{background:#dc2626}
.note{color:#6b7280;font-size:12.5px}
code{font-size:12.5px;background:#f3f4f6;padding:0 3px;border-radius:3px}
details{margin:6px 0}
summary{cursor:pointer;font-weight:600}
.chart{max-width:100%;height:auto}
"""


def _num(v, fmt: str = ".4g") -> str:
    return escape(format_number(v, fmt))


def _float(v) -> float:
    if isinstance(v, str):
        return {"inf": math.inf, "-inf": -math.inf}.get(v, math.nan)
    return float(v) if v is not None else math.nan


def _mb(n) -> str:
    return f"{n / 1e6:.2f}"


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict(ok: bool) -> str:
    return '<span class="pass">pass</span>' if ok else '<span class="fail">FAIL</span>'


def render(data: dict) -> str:
    m = data["model"]
    title = f"edgeq build: {m['name']} ({data['recipe']})"
    badge = f'<span class="badge {"pass" if data["passed"] else "fail"}">{"PASS" if data["passed"] else "FAIL"}</span>'
    th = ", ".join(f"{k.removeprefix('max_').removeprefix('min_')} {'≤' if k.startswith('max_') else '≥'} {v:g}"
                   for k, v in data["thresholds"].items()) or "none"
    parts = [
        f"<h1>{escape(title)} {badge}</h1>",
        f'<p class="note">targets {escape(", ".join(data["targets"]))} · built {escape(data["created"])} in '
        f'{_num(data.get("seconds"), ".1f")} s · edgeq {escape(data["edgeq_version"])} · '
        f'{escape(data["platform"])}</p>',
        _summary(data, th),
        _stages(data),
        _sizes(data),
        _fidelity(data),
        _per_layer(data),
        _plans(data),
        _latency(data),
        _provenance(data),
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f'<body>{"".join(parts)}</body></html>\n')


SUMMARY_LLM_METRICS = ("perplexity", "perplexity_ratio", "kld_mean", "top1_agreement", "greedy_agreement")


def _summary(data: dict, th: str) -> str:
    rows = []
    for r in data["summary"]:
        shown = {k: v for k, v in _scalars(r["task"]).items() if k in SUMMARY_LLM_METRICS} \
            if "perplexity_ratio" in r["task"] else _scalars(r["task"])
        if r["task"].get("per_position"):  # class scores per position: every position is one decision
            shown = {("top1_agreement_per_position" if k == "top1_agreement" else k): v for k, v in shown.items()}
        task = ", ".join(f"{k.replace('_', ' ')} {_num(v)}" for k, v in shown.items() if k != "samples")
        rows.append([f"<code>{escape(r['model'])}</code>", escape(r["target"]), _mb(r["bytes"]), _mb(r["ideal_bytes"]),
                     _num(r["sqnr_db"], ".1f"), _num(r["cosine_mean"], ".4f"), escape(task),
                     _verdict(r["passed"]) + (f' <span class="note">{escape("; ".join(r["failed"]))}</span>'
                                              if r["failed"] else "")])
    v = data["validation"]
    return ("<h2>Summary</h2>" + _table(
        ["model", "target", "size MB", "ideal MB", "min SQNR dB", "min cosine", "task metrics", "result"], rows,
        {2, 3, 4, 5})
        + f'<p class="note">Each model compared with the float ONNX <code>{escape(data["model"]["file"])}</code> '
          f'({_mb(data["model"]["bytes"])} MB) on {escape(v["data"]["source"])}, {v["data"]["feeds"]} feeds. '
          f'Gates: {escape(th)}.</p>')


def _stages(data: dict) -> str:
    rows = [[escape(s["name"]), escape(s["what"]),
             '<span class="pass">ok</span>' if s["status"] == "ok" else
             f'<span class="fail">{escape(s["status"])}</span>', _num(s["seconds"], ".1f"), escape(s.get("message", ""))]
            for s in data.get("stages", [])]
    failed = [s for s in data.get("stages", []) if s["status"] == "failed"]
    note = (f'<p class="fail">{len(failed)} stage(s) failed; everything else the build made is in this folder.</p>'
            if failed else "")
    return "<h2>Stages</h2>" + note + _table(["stage", "what", "status", "seconds", "message"], rows, {3})


def _sizes(data: dict) -> str:
    items = [(f"float {data['model']['file']}", data["model"]["bytes"] / 1e6, "#9ca3af")]
    for q in data["qdq"]:
        items.append((f"ideal ({q['profile']})", q["ideal_bytes"] / 1e6, "#d1d5db"))
        items.append((q["file"], q["bytes"] / 1e6, PALETTE[0]))
    for p in data["packages"]:
        items.append((f"{p['target']}: {p['model_file']}", p["bytes"] / 1e6, PALETTE[2]))
    rows = [[f"<code>{escape(p['target'])}/</code>",
             ", ".join(f"{escape(k)} {_mb(v)} MB" for k, v in p["file_bytes"].items()),
             escape(p.get("description", ""))] for p in data["packages"]]
    return ("<h2>Sizes against the ideal</h2>" + bars(items, unit="MB")
            + '<p class="note">Ideal: every weight at its planned bit width plus its scales, the rest float32.</p>'
            + _table(["package folder", "files", "what"], rows))


def _fidelity(data: dict) -> str:
    v = data["validation"]
    rows, checks = [], []
    for c in v["candidates"]:
        label = c["model"]["label"]
        for out, s in c["outputs"].items():
            rows.append([f"<code>{escape(label)}</code>", escape(c["model"].get("kind", "")), escape(out),
                         _num(s.get("sqnr_db"), ".2f"), _num(s.get("cosine_mean"), ".5f"),
                         _num(s.get("cosine_min"), ".5f"), _num(s.get("max_abs_err"), ".3g")])
        for k in c["checks"]:
            checks.append([f"<code>{escape(label)}</code>", escape(k["check"]), _num(k["value"]),
                           _num(k["threshold"], "g"), _verdict(k["passed"])])
    task_rows = [[f"<code>{escape(c['model']['label'])}</code>"]
                 + [_num(c["task"].get(k)) for k in _task_keys(v)] for c in v["candidates"] if _scalars(c["task"])]
    html = "<h2>Fidelity per output and per model</h2>" + _table(
        ["model", "runner", "output", "SQNR dB", "cos mean", "cos min", "max abs err"], rows, {3, 4, 5, 6})
    if task_rows:
        html += f"<p>Task metrics ({escape(v['task'])}):</p>" + _table(
            ["model", *[k.replace("_", " ") for k in _task_keys(v)]], task_rows, set(range(1, 10)))
    if checks:
        html += "<p>Gates:</p>" + _table(["model", "check", "value", "threshold", "result"], checks, {2, 3})
    return html + _generations(v)


def _scalars(task: dict) -> dict:
    """The task metrics that are numbers (a causal LM's ``greedy`` runs are shown on their own)."""
    return {k: v for k, v in task.items() if (isinstance(v, (int, float, str)) and not isinstance(v, bool)) or v is None}


def _task_keys(v: dict) -> list[str]:
    keys: list[str] = []
    for c in v["candidates"]:
        for k in _scalars(c["task"]):
            if k not in keys:
                keys.append(k)
    return keys


def _generations(v: dict) -> str:
    """A causal LM's greedy generations: the float model's and each candidate's, side by side."""
    rows = []
    for c in v["candidates"]:
        for g in c["task"].get("greedy", []):
            mark = "same" if g["equal"] else f"diverges after {g['prefix']} of {g['reference_tokens']} tokens"
            rows.append([f"<code>{escape(c['model']['label'])}</code>", escape(str(g["prompt"])),
                         escape(g.get("reference_text", "")), escape(g.get("candidate_text", "")), escape(mark)])
    if not rows:
        return ""
    return ("<p>Greedy generations (each model with its own KV cache, from the same prompts):</p>"
            + _table(["model", "prompt", "float model", "this model", "agreement"], rows))


def _per_layer(data: dict) -> str:
    v = data["validation"]
    # a quantized activation's float source: the tensor both graphs share (a scaled or protected
    # activation is quantized after the rewrite; the plan records what it came from)
    quantized = {q["file"]: {t["source"] for t in q.get("quantized_tensors", [])} for q in data["qdq"]}
    series, worst = [], []
    for c in v["candidates"]:
        if not c["intermediates"]:
            continue
        label = c["model"]["label"]
        hl = quantized.get(label, set())
        pts = [(r["name"], _float(r["sqnr_db"]), r["name"] in hl) for r in c["intermediates"]]
        series.append((f"float vs {label}", pts))
        for name, y, _ in sorted(pts, key=lambda p: p[1])[:8]:
            worst.append([f"<code>{escape(label)}</code>", f"<code>{escape(name)}</code>", _num(y, ".1f"),
                          "yes" if name in hl else ""])
    no_inter = [c["model"]["label"] for c in v["candidates"] if not c["intermediates"]]
    html = "<h2>Per-layer error</h2>"
    if series:
        html += (line_plot(series, y_cap=PLOT_CAP_DB)
                 + '<p class="note">SQNR of every float intermediate tensor the quantized ONNX shares (by name) with '
                   'the float ONNX, in graph order; large dots: activations quantized by the plan; tensors above '
                   f'{PLOT_CAP_DB:g} dB (exact or nearly: masks, shapes) are drawn at the top edge. Hover a point '
                   'for its tensor.</p>'
                 + "<details><summary>Lowest SQNR tensors</summary>"
                 + _table(["model", "tensor", "SQNR dB", "quantized activation"], worst, {2}) + "</details>")
    if no_inter and v.get("task") == "causal_lm":
        html += ('<p class="note">A causal LM is compared on its next-token distributions (logits, perplexity, '
                 'KL divergence, top-1, greedy generations: above), not tensor by tensor.</p>')
    elif no_inter:
        html += (f'<p class="note">No intermediates on the host for {escape(", ".join(no_inter))}: the package runners '
                 'run the model as a whole; their output fidelity is above.</p>')
    return html


def _plans(data: dict) -> str:
    html = "<h2>Quantization plan</h2>"
    for q in data["qdq"]:
        s = q["summary"]
        weights = [r for r in q["plan"] if "node" in r and r.get("format") not in (None, "float")]  # not notes
        floats = [r for r in q["plan"] if r.get("format") == "float" and r.get("reason") != "no constant weight"]
        rest = Counter(r["op"] for r in q["plan"] if r.get("reason") == "no constant weight")
        acts = [r for r in q["plan"] if "tensor" in r]
        wrows = [[f"<code>{escape(r['node'])}</code>", escape(r["op"]), escape(r["format"]),
                  escape("x".join(map(str, r.get("shape", [])))), _num(r.get("axis"), "d"), _num(r.get("block"), "d"),
                  escape(r.get("reason", ""))] for r in weights]
        frows = [[f"<code>{escape(r['node'])}</code>", escape(r["op"]), "float", escape(r["reason"])] for r in floats]
        arows = [[f"<code>{escape(r['tensor'])}</code>", escape(r["format"]), _num(r["scale"]),
                  _num(r["zero_point"], "d"), f"[{_num(r['range'][0])}, {_num(r['range'][1])}]",
                  escape(r.get("reason", ""))] for r in acts]
        cal = q.get("calibration")
        cov = q.get("coverage", {})
        algos = [[escape(a["name"]), "yes" if a["ran"] else "no", escape(a["summary"]),
                  escape("; ".join(a["details"][:12]) + (" ..." if len(a["details"]) > 12 else ""))]
                 for a in q.get("algorithms", [])]
        notes = [[f"<code>{escape(r['node'])}</code>", escape(r["note"])] for r in q["plan"] if "note" in r]
        html += (f"<h3><code>{escape(q['file'])}</code> (profile {escape(q['profile'])}, for "
                 f"{escape(', '.join(q['targets']))})</h3>"
                 f"<p>{cov.get('quantized', '?')} of {cov.get('quantizable', '?')} constant weights quantized; "
                 f"weights: {escape(', '.join(f'{k} {v}' for k, v in s['weights'].items()) or 'none')}; "
                 f"{s['fallbacks']} fell back; activations quantized: "
                 f"{escape(', '.join(f'{k} {v}' for k, v in s.get('activations', {}).items()) or 'none')}; "
                 f"integer ops: {s.get('integer_ops', 0)}; bias-corrected: {s.get('bias_corrected', 0)}"
                 + (f"; calibration: {escape(cal['source'])}, {cal['samples']} samples in {cal['batches']} batches"
                    if cal else "") + "</p>"
                 + "<p>What each algorithm did (or why it did nothing):</p>"
                 + _table(["algorithm", "ran", "what it did and what it cost", "decisions"], algos)
                 + (f"<details><summary>{len(notes)} plan notes</summary>" + _table(["node", "note"], notes)
                    + "</details>" if notes else "")
                 + f"<details><summary>{len(wrows)} quantized weights</summary>"
                 + _table(["node", "op", "format", "shape", "axis", "block", "why"], wrows) + "</details>"
                 + f"<details><summary>{len(frows)} weighted nodes kept float, and why</summary>"
                 + _table(["node", "op", "format", "why"], frows) + "</details>"
                 + f"<details><summary>{len(arows)} quantized activations</summary>"
                 + _table(["tensor", "format", "scale", "zero point", "range", "why"], arows, {2, 3}) + "</details>"
                 + f'<p class="note">Other nodes (no constant weight): '
                   f'{escape(", ".join(f"{k} {v}" for k, v in rest.most_common()))}</p>')
    return html


def _latency(data: dict) -> str:
    lat = data.get("latency")
    html = "<h2>Host latency (ONNX Runtime CPU)</h2>"
    if not lat:
        return html + '<p class="note">not measured</p>'
    models = lat["models"]
    if lat.get("kind") == "causal_lm":
        return html + _llm_latency(lat)
    items = [(k, v["median_ms"], PALETTE[0 if i == 0 else 2]) for i, (k, v) in enumerate(models.items())]
    shapes = lat.get("shapes") or [{"shape": "as fed", "feed_shapes": lat["feed_shapes"], "models": models}]
    rows = []
    for k in models:
        row = [f"<code>{escape(k)}</code>"]
        for m in shapes:
            v, ref = m["models"].get(k), next(iter(m["models"].values()))
            row.append("-" if v is None else f"{_num(v['median_ms'], '.2f')} ({_num(ref['median_ms'] / v['median_ms'], '.2f')}×)")
        prof = lat.get("profiles", {}).get(k, {})
        row.append(escape(top_ops(prof)) if "ops" in prof else escape(prof.get("error", "")))
        rows.append(row)
    fed = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in lat["feed_shapes"].items())
    slow = "".join(f'<p class="fail">{escape(f["model"])} is slower than float at {escape(f["shape"])} '
                   f'({_num(f["speedup"], ".2f")}× float); its time goes to: {escape(f["where"])}</p>'
                   for f in lat.get("slower", []))
    slow += "".join(f'<p class="note">not timed at {escape(s["shape"])}: {escape(s["reason"])}</p>'
                    for s in lat.get("skipped", []))
    return (html + bars(items, unit="ms") + slow
            + _table(["model", *[f"{escape(m['shape'])}: ms (× float)" for m in shapes], "where the time goes (evaluation feed)"],
                     rows, set(range(1, len(shapes) + 1)))
            + f'<p class="note">Batch 1 (the evaluation feed: {escape(fed)}; a text model also at the sequence lengths shown), runs '
              f'interleaved across models, medians, {escape(lat["threads"])} threads; where the time goes: kernel time '
              'per op type from ONNX Runtime\'s profiler. The host is not a phone: this compares the models, it does '
              'not predict device latency. Core ML packages are not timed (Core ML runs on Apple devices only).</p>')


def _llm_latency(lat: dict) -> str:
    models = lat["models"]
    base = next(iter(models.values()))
    items = [(k, v["median_ms"], PALETTE[0 if i == 0 else 2]) for i, (k, v) in enumerate(models.items())]
    rows = [[f"<code>{escape(k)}</code>", _num(v["median_ms"], ".2f"), _num(v["decode_tokens_per_s"], ".1f"),
             _num(base["median_ms"] / v["median_ms"], ".2f"), _num(v["prefill_ms"], ".1f"),
             _num(v["prefill_tokens_per_s"], ".0f"), _num(base["prefill_ms"] / v["prefill_ms"], ".2f")]
            for k, v in models.items()]
    return (bars(items, unit="ms per token")
            + _table(["model", "decode ms/token", "decode tokens/s", "decode speed-up", "prefill ms",
                      "prefill tokens/s", "prefill speed-up"], rows, set(range(1, 7)))
            + f'<p class="note">Batch 1: a {lat["prompt_tokens"]}-token prompt prefilled with an empty cache, then '
              f'{lat["decode_tokens"]} tokens decoded one at a time (medians; rounds interleaved across models; '
              f'{escape(lat["threads"])} threads). The host is not a phone: this compares the models.</p>')


def _provenance(data: dict) -> str:
    vrows = [[escape(k), escape(v) if v else '<span class="note">not installed</span>']
             for k, v in data["versions"].items()]
    hrows = [[f"<code>{escape(k)}</code>", f"<code>{escape(v)}</code>"] for k, v in sorted(data["hashes"].items())]
    return ("<h2>Versions and hashes</h2>" + _table(["package", "version"], vrows)
            + "<details><summary>sha256 of every file built</summary>" + _table(["file", "sha256"], hrows)
            + "</details>")
