"""Tiny inline-SVG charts for the HTML report: horizontal bars and a line plot. No scripts, no network."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def bars(items: Sequence[tuple[str, float, str]], *, unit: str = "", width: int = 720, row: int = 26,
         label_width: int = 260) -> str:
    """Horizontal bars: (label, value, color) per row, value printed at the bar's end."""
    if not items:
        return ""
    top = max(v for _, v, _ in items) or 1.0
    plot = width - label_width - 90
    h = row * len(items) + 8
    parts = [f'<svg class="chart" role="img" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
             f'viewBox="0 0 {width} {h}">']
    for i, (label, v, color) in enumerate(items):
        y = 4 + i * row
        w = max(1.0, plot * v / top)
        parts.append(f'<text x="{label_width - 8}" y="{y + row * 0.62:.1f}" text-anchor="end" font-size="12">'
                     f'{escape(label)}</text>')
        parts.append(f'<rect x="{label_width}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" fill="{color}">'
                     f'<title>{escape(label)}: {_fmt(v)} {escape(unit)}</title></rect>')
        parts.append(f'<text x="{label_width + w + 6:.1f}" y="{y + row * 0.62:.1f}" font-size="12">'
                     f'{_fmt(v)} {escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_plot(series: Sequence[tuple[str, Sequence[tuple[str, float, bool]]]], *, width: int = 960,
              height: int = 320, y_label: str = "SQNR (dB)", x_label: str = "tensor, in graph order",
              y_cap: float | None = None) -> str:
    """Series of (name, [(point label, y, highlighted)]) against their index; highlighted points are dots.

    Values above ``y_cap`` and non-finite ones (an exact match: infinite SQNR) are drawn at the top edge.
    """
    pts = [y for _, s in series for _, y, _ in s if math.isfinite(y)]
    if not pts:
        return '<p class="note">no intermediate tensors were compared</p>'
    lo, hi = min(0.0, min(pts)), max(pts)
    if y_cap is not None:
        hi = min(hi, y_cap)
    hi = hi + max(1.0, 0.05 * (hi - lo))
    n = max(len(s) for _, s in series)
    left, right, top, bottom = 56, 16, 14, 44
    pw, ph = width - left - right, height - top - bottom

    def X(i: int) -> float:
        return left + (pw * i / max(1, n - 1))

    def Y(v: float) -> float:
        v = hi if not math.isfinite(v) else min(v, hi)
        return top + ph * (1 - (v - lo) / (hi - lo))

    parts = [f'<svg class="chart" role="img" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    step = _nice_step((hi - lo) / 6)
    t = math.ceil(lo / step) * step
    while t <= hi:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>')
        t += step
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle" font-size="12">{escape(x_label)} '
                 f'(0..{n - 1})</text>')
    parts.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 14 {top + ph / 2})">{escape(y_label)}</text>')
    for k, (name, s) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        path = " ".join(f"{'M' if i == 0 else 'L'}{X(i):.1f},{Y(y):.1f}" for i, (_, y, _) in enumerate(s))
        parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for i, (label, y, hl) in enumerate(s):
            r = 3.2 if hl else 1.6
            parts.append(f'<circle cx="{X(i):.1f}" cy="{Y(y):.1f}" r="{r}" fill="{color}">'
                         f'<title>{escape(name)}: {escape(label)}: {_fmt(y)} dB</title></circle>')
        ly = top + 14 + 16 * k
        parts.append(f'<rect x="{left + pw - 250}" y="{ly - 9}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{left + pw - 236}" y="{ly}" font-size="12">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _nice_step(raw: float) -> float:
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag
