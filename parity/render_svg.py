"""Inline SVG charts of parity reports: a log-scale y axis with rows of their own for values it cannot
place (exact zeros under it, inf / nan over it), shared by the per-layer and the per-step charts."""
from __future__ import annotations

import html
import math

from .render_text import fmt
from .report import ACCUMULATED, ISOLATED, MODES, Report

COLORS = {ACCUMULATED: "#1f77b4", ISOLATED: "#e08a00"}
RED = "#d62728"
GRID = "#e4e4e4"
ZERO_ROW = 26      # height of the row for exact zeros, under the log scale
NONFINITE_ROW = 22  # height of the row for inf / nan, over it


def esc(s) -> str:
    return html.escape(str(s), quote=True)


class LogScale:
    """Decades from a decade under the smallest positive value to the largest, mapped into
    [top, top + height] with `pad` pixels kept free at both ends of the scale so that a marker of
    radius < pad on the top or bottom decade is drawn whole inside the plot."""

    def __init__(self, values, top: float, height: float, pad: float, extra=()):
        vals = [float(v) for v in values]
        pos = [v for v in vals if math.isfinite(v) and v > 0] + [float(e) for e in extra if e]
        self.lo = math.floor(math.log10(min(pos))) if pos else -8
        self.hi = math.ceil(math.log10(max(pos))) if pos else 0
        if self.hi <= self.lo:
            self.hi = self.lo + 1
        self.lo -= 1  # a decade of room under the smallest value
        self.zeros = any(v <= 0 for v in vals)
        self.nonfinite = any(math.isnan(v) or v == math.inf for v in vals)
        nf = NONFINITE_ROW if self.nonfinite else 0
        zh = ZERO_ROW if self.zeros else 0
        self.top, self.bottom = top, top + height
        self.y_hi, self.y_lo = top + nf + pad, top + height - zh - pad  # the decades' extent
        self.y_sep_nonfinite = top + nf                # dashed lines that set the rows apart
        self.y_sep_zero = top + height - zh
        self.y_nonfinite = top + nf / 2
        self.y_zero = (self.y_sep_zero + self.bottom) / 2

    def decades(self) -> range:
        return range(self.lo, self.hi + 1, max(1, math.ceil((self.hi - self.lo) / 10)))

    def y(self, v: float) -> float:
        v = float(v)
        if math.isnan(v) or v == math.inf:
            return self.y_nonfinite
        if v <= 0:
            return self.y_zero
        lv = min(max(math.log10(v), self.lo), self.hi)
        return self.y_hi + (self.y_lo - self.y_hi) * (self.hi - lv) / (self.hi - self.lo)

    def axis(self, left: float, right: float, label: str) -> list[str]:
        """Gridlines, decade labels, the special rows' separators and labels, the rotated axis label."""
        parts = []
        for d in self.decades():
            y = self.y(10.0 ** d)
            parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="{GRID}"/>')
            parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">1e{d}</text>')
        for on, y_sep, y_row, text in ((self.zeros, self.y_sep_zero, self.y_zero, "exact (0)"),
                                       (self.nonfinite, self.y_sep_nonfinite, self.y_nonfinite, "inf / nan")):
            if on:
                parts.append(f'<line x1="{left}" y1="{y_sep:.1f}" x2="{right}" y2="{y_sep:.1f}" stroke="#999" '
                             f'stroke-dasharray="2 3"/>')
                parts.append(f'<text x="{left - 6}" y="{y_row + 4:.1f}" class="tick" text-anchor="end">{text}</text>')
        yc = (self.y_hi + self.y_lo) / 2
        parts.append(f'<text x="16" y="{yc:.1f}" class="axis" text-anchor="middle" '
                     f'transform="rotate(-90 16 {yc:.1f})">{esc(label)}</text>')
        return parts


def all_exact(report: Report) -> bool:
    """Every layer's rel_l2 is exactly 0 in every mode it ran (there is at least one layer)."""
    vals = [m.get("rel_l2") for l in report.layers for m in l.metrics.values()]
    return bool(vals) and all(v == 0 for v in vals)


def chart_svg(report: Report, width: int = 1000, height: int = 360) -> str:
    """Per-layer rel_l2 in execution order, log-scale y, tolerance line, failing layers red, the
    culprit marked and labelled. Exact zeros (no log value) get hollow markers in their own row
    under the scale, labelled "exact (0)": an accumulated one is a ring wide enough to show the
    isolated square inside it. inf / nan sit in a row over the scale. Plain inline SVG; hover titles
    give each point's numbers. A report whose values are all exact gets a line that says so instead."""
    layers = report.layers
    L, R, T, B = 72, 20, 34, 48
    pw, ph = width - L - R, height - T - B
    modes = [m for m in MODES if m in report.modes]
    thr = report.tolerance.rel_l2
    if all_exact(report):
        h = 56
        return (f'<svg class="chart" viewBox="0 0 {width} {h}" width="{width}" height="{h}" role="img" '
                f'aria-label="rel_l2 per layer">\n<rect x="{L}" y="8" width="{pw}" height="{h - 16}" '
                f'fill="#f3fff3" stroke="#bbb"/>\n<text x="{L + pw / 2}" y="{h / 2 + 5}" class="axis" '
                f'text-anchor="middle">all {len(layers)} layers exact: rel_l2 = 0 in every mode '
                f'({esc(" and ".join(modes))}), nothing to draw on a log scale</text>\n</svg>')
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-label="rel_l2 per layer">',
             f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="#fbfbfb" stroke="#bbb"/>']
    if not layers:
        parts.append(f'<text x="{L + pw / 2}" y="{T + ph / 2}" text-anchor="middle">no layers</text>')
        return "\n".join(parts + ["</svg>"])

    n = len(layers)
    r = 3.5 if n <= 80 else 2.5 if n <= 300 else 1.8
    ring = r * 1.42 + 1.5  # an exact accumulated ring clears the isolated square (half diagonal r * 1.41)
    vals = [l.metrics[m]["rel_l2"] for l in layers for m in modes if m in l.metrics]
    scale = LogScale(vals, T, ph, pad=ring + 2, extra=[thr])
    y_of = scale.y

    def x_of(i: int) -> float:
        return L + pw * (i + 0.5) / n

    parts += scale.axis(L, L + pw, "rel_l2 (log)")
    # Layer ticks: about ten, at round numbers.
    xt = max(1, 10 ** math.floor(math.log10(max(n / 10, 1))))
    while n / xt > 12:
        xt *= 2
    for i in range(0, n, xt):
        x = x_of(i)
        parts.append(f'<line x1="{x:.1f}" y1="{T + ph}" x2="{x:.1f}" y2="{T + ph + 4}" stroke="#888"/>')
        parts.append(f'<text x="{x:.1f}" y="{T + ph + 16}" class="tick" text-anchor="middle">'
                     f'{layers[i].index}</text>')
    parts.append(f'<text x="{L + pw / 2}" y="{height - 8}" class="axis" text-anchor="middle">'
                 f'layer, in execution order</text>')

    if thr:
        yt = y_of(thr)
        parts.append(f'<line x1="{L}" y1="{yt:.1f}" x2="{L + pw}" y2="{yt:.1f}" stroke="{RED}" '
                     f'stroke-dasharray="6 4" stroke-width="1.2"/>')
        # Under the line when over it would run into the legend above the plot.
        ty = yt - 5 if yt - 5 >= T + 12 else yt + 13
        parts.append(f'<text x="{L + pw - 4}" y="{ty:.1f}" class="tick" fill="{RED}" '
                     f'text-anchor="end">tolerance {fmt(thr)}</text>')

    cul = report.culprit
    if cul is not None:
        ci = next(i for i, l in enumerate(layers) if l.index == cul.index)
        xc = x_of(ci)
        anchor, dx = ("start", 6) if ci < n * 0.6 else ("end", -6)
        label = f"culprit: {cul.native} ({cul.reference}) [{cul.mode}]"
        parts.append(f'<line x1="{xc:.1f}" y1="{T}" x2="{xc:.1f}" y2="{T + ph}" stroke="{RED}" '
                     f'stroke-width="1.5" opacity="0.6"/>')
        parts.append(f'<text x="{xc + dx:.1f}" y="{T + 14}" class="culprit" fill="{RED}" '
                     f'text-anchor="{anchor}">{esc(label)}</text>')

    for m in modes:
        # The line joins runs of values on the scale; it does not dive into the rows under or over it.
        runs, run = [], []
        for i, l in enumerate(layers):
            if m not in l.metrics:
                continue
            v = l.metrics[m]["rel_l2"]
            if v == 0 or not math.isfinite(v):
                runs, run = runs + [run], []
            else:
                run.append((x_of(i), y_of(v)))
        for pts in runs + [run]:
            if len(pts) > 1:
                d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                parts.append(f'<polyline points="{d}" fill="none" stroke="{COLORS[m]}" '
                             f'stroke-width="1.2" opacity="0.7"/>')
        for i, l in enumerate(layers):
            if m not in l.metrics:
                continue
            v = l.metrics[m]["rel_l2"]
            bad = l.failed(m)
            tip = (f"#{l.index} {l.native} | ref {l.reference} | {l.kind} | {m} rel_l2={fmt(v)}"
                   + (" (exact)" if v == 0 else "")
                   + (" | FAIL: " + "; ".join(l.failures[m]) if bad else ""))
            color = RED if bad else COLORS[m]
            # Hollow markers for exact zeros, filled ones for values on the scale.
            paint = (f'fill="white" stroke="{color}" stroke-width="1.5" class="exact"' if v == 0
                     else f'fill="{color}"')
            x, y = x_of(i), y_of(v)
            if m == ACCUMULATED:
                shape = "circle"
                el = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{ring if v == 0 else r:.2f}" {paint}'
            else:  # isolated points are squares, so both modes stay readable where they overlap
                shape = "rect"
                el = f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" {paint}'
            parts.append(f'{el}><title>{esc(tip)}</title></{shape}>')

    # Legend.
    lx = L + 8
    for m in modes:
        sym = (f'<circle cx="{lx + 5}" cy="{T - 14}" r="4" fill="{COLORS[m]}"/>' if m == ACCUMULATED
               else f'<rect x="{lx + 1}" y="{T - 18}" width="8" height="8" fill="{COLORS[m]}"/>')
        parts.append(sym + f'<text x="{lx + 14}" y="{T - 10}" class="tick">{m}</text>')
        lx += 110
    parts.append(f'<circle cx="{lx + 5}" cy="{T - 14}" r="4" fill="{RED}"/>'
                 f'<text x="{lx + 14}" y="{T - 10}" class="tick">fails tolerance</text>')
    if scale.zeros:
        lx += 120
        parts.append(f'<circle cx="{lx + 5}" cy="{T - 14}" r="3.5" fill="white" stroke="#555" stroke-width="1.5"/>'
                     f'<text x="{lx + 14}" y="{T - 10}" class="tick">exact (0): rel_l2 = 0, in the row under '
                     f'the scale; accumulated a ring, isolated a square</text>')
    parts.append("</svg>")
    return "\n".join(parts)
