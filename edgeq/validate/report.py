"""Validation results for people (a terminal table) and for machines (JSON)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from edgeq.onnx_io import atomic_output
from edgeq.validate.compare import ValidationReport


def format_number(v, fmt: str = ".4g") -> str:
    """A number for people: ``-`` for a missing one, ``inf``/``-inf``/``nan`` spelled out, strings as they are."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, fmt)


_num = format_number


def format_report(report: ValidationReport, *, worst: int = 5) -> str:
    """A readable table: one row per candidate output, task metrics, worst intermediates, checks."""
    lines = [f"reference: {report.reference['label']} ({report.reference['kind']})"]
    shapes = report.data.get("input_shapes", {})
    shape_text = "; ".join(
        f"{k} " + (", ".join("x".join(map(str, s)) for s in v[:4]) + (f" (+{len(v) - 4} more)" if len(v) > 4 else ""))
        for k, v in shapes.items()
    )
    lines.append(f"data: {report.data['source']}, {report.data['feeds']} feeds; shapes: {shape_text}")
    header = f"{'candidate':<28} {'output':<18} {'SQNR dB':>8} {'cos mean':>9} {'cos min':>9} {'max abs err':>11}"
    lines += ["", header, "-" * len(header)]
    for c in report.candidates:
        for name, s in c.outputs.items():
            lines.append(
                f"{c.runner['label'][:28]:<28} {name[:18]:<18} {_num(s['sqnr_db'], '.1f'):>8} "
                f"{_num(s.get('cosine_mean'), '.6f'):>9} {_num(s.get('cosine_min'), '.6f'):>9} "
                f"{_num(s['max_abs_err'], '.3g'):>11}"
            )
    for c in report.candidates:
        label = c.runner["label"]
        if c.runner.get("note"):  # e.g. which engine ran the candidate, and why
            lines.append(f"{label}: {c.runner['note']}")
        if c.task:
            parts = [f"{k} {_num(v, '.4f') if isinstance(v, float) else v}" for k, v in c.task.items()]
            lines.append(f"{label}: {report.task_kind}: " + ", ".join(parts))
        if c.intermediates:
            ranked = sorted(c.intermediates, key=lambda r: r["sqnr_db"])
            lines.append(f"{label}: {len(c.intermediates)} intermediate tensors matched by name; lowest SQNR:")
            for r in ranked[:worst]:
                lines.append(f"    {_num(r['sqnr_db'], '8.1f')} dB  {r['name']}")
        for chk in c.checks:
            mark = "pass" if chk["passed"] else "FAIL"
            value = chk["note"] if chk.get("note") else _num(chk["value"], ".4g")
            lines.append(f"{label}: {mark} {chk['check']} = {value} (>= {chk['threshold']:g})")
    if any(c.checks for c in report.candidates):
        lines.append("result: " + ("PASS" if report.passed else "FAIL"))
    return "\n".join(lines)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def to_json(data: dict) -> str:
    """JSON text; non-finite floats become the strings "inf", "-inf", "nan"."""
    return json.dumps(_jsonable(data), indent=2, sort_keys=False)


def write_json(data: dict, path: str | os.PathLike, *, force: bool = True) -> Path:
    """Write ``data`` as JSON atomically."""
    dest = Path(path)
    with atomic_output(dest, force=force) as tmp:
        (tmp / dest.name).write_text(to_json(data) + "\n")
    return dest
