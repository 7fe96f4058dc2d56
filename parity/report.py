"""Parity report: the data model (layers in execution order with their metrics, the culprit) and its
writers: JSON, JUnit XML, one self-contained HTML page, and a terminal summary.

Two comparison modes per layer (see the metric legend in the report itself):
- accumulated: both models ran end to end on the same inputs; a layer's error includes upstream error.
- isolated: the native layer re-ran on the reference's recorded input; the error is the layer's own.
The culprit is the first layer in execution order whose isolated metrics break tolerance.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
import math
import platform
import re
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .metrics import DEFINITIONS, Tolerance, check, tolerance_from_dict, tolerance_to_dict

ACCUMULATED = "accumulated"
ISOLATED = "isolated"
MODES = (ACCUMULATED, ISOLATED)
FORMAT = "sdport.parity.report"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One native layer paired with its reference module, in execution order."""

    index: int
    native: str                      # native module name, e.g. "down.1.res.0"
    reference: str                   # reference module name, e.g. "input_blocks.4.0"
    kind: str                        # block kind from the mapping table ("resnet", "attention", ...)
    shape: tuple[int, ...]           # output shape compared
    metrics: dict[str, dict]         # mode -> metrics from metrics.compare
    failures: dict[str, tuple[str, ...]]  # mode -> failed checks (empty tuple when it passed)

    @property
    def status(self) -> str:
        return "fail" if any(self.failures.values()) else "pass"

    def failed(self, mode: str) -> bool:
        return bool(self.failures.get(mode))


def make_layer(index: int, native: str, reference: str, kind: str, shape: Sequence[int],
               tol: Tolerance, accumulated: Mapping | None = None,
               isolated: Mapping | None = None) -> LayerRecord:
    """A layer record with its metrics per mode gated against `tol`."""
    metrics, failures = {}, {}
    for mode, m in ((ACCUMULATED, accumulated), (ISOLATED, isolated)):
        if m is None:
            continue
        metrics[mode] = dict(m)
        failures[mode] = tuple(check(m, tol)[1])
    if not metrics:
        raise ValueError(f"layer {native!r}: no metrics for any mode")
    return LayerRecord(int(index), native, reference, kind, tuple(int(s) for s in shape),
                       metrics, failures)


@dataclasses.dataclass(frozen=True)
class Culprit:
    """The layer to look at first. `mode` says which metrics convicted it: "isolated" (its own
    error) or "accumulated" (only end-to-end error was available or broke tolerance)."""

    index: int
    native: str
    reference: str
    kind: str
    mode: str
    failures: tuple[str, ...]
    note: str = ""

    def line(self) -> str:
        return (f"#{self.index} {self.native} (reference {self.reference}, {self.kind}) "
                f"[{self.mode}] {'; '.join(self.failures)}" + (f" -- {self.note}" if self.note else ""))


def _culprit_from(layer: LayerRecord, mode: str, note: str = "") -> Culprit:
    return Culprit(layer.index, layer.native, layer.reference, layer.kind, mode,
                   layer.failures[mode], note)


def find_culprit(layers: Sequence[LayerRecord]) -> Culprit | None:
    """First layer whose isolated metrics fail; without isolated metrics (or when no layer fails
    in isolation but some fail accumulated), the first failing accumulated layer, marked as such;
    None when everything passes."""
    if any(ISOLATED in l.metrics for l in layers):
        for l in layers:
            if l.failed(ISOLATED):
                return _culprit_from(l, ISOLATED)
    for l in layers:
        if l.failed(ACCUMULATED):
            note = ("no layer fails in isolation: the error accumulates across layers"
                    if any(ISOLATED in x.metrics for x in layers) else "accumulated mode only")
            return _culprit_from(l, ACCUMULATED, note)
    return None


def collect_versions(**extra: str) -> dict[str, str]:
    """Python, platform and the versions of the packages that matter, without importing them."""
    v = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("sdport", "torch", "numpy", "h5py", "stable-diffusion-sdkit", "transformers",
                 "diffusers"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    v.update({k: str(x) for k, x in extra.items()})
    return v


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclasses.dataclass(frozen=True)
class Report:
    component: str                   # "unet", "text_model", "decoder", ...
    modes: tuple[str, ...]           # subset of MODES that ran
    dtype: str                       # "fp32", "fp16", ...
    device: str                      # "cpu", "cuda:0", ...
    tolerance: Tolerance
    inputs: dict                     # seed, how noise was drawn, input shapes
    versions: dict
    layers: tuple[LayerRecord, ...]  # execution order
    created: str = dataclasses.field(default_factory=_now)

    # --- derived -------------------------------------------------------------------------
    @property
    def culprit(self) -> Culprit | None:
        return find_culprit(self.layers)

    @property
    def first_divergence(self) -> LayerRecord | None:
        """First layer whose accumulated metrics fail (where end-to-end outputs part ways)."""
        return next((l for l in self.layers if l.failed(ACCUMULATED)), None)

    @property
    def passed(self) -> bool:
        return all(l.status == "pass" for l in self.layers)

    def counts(self) -> dict[str, int]:
        n_fail = sum(l.status == "fail" for l in self.layers)
        return {"layers": len(self.layers), "pass": len(self.layers) - n_fail, "fail": n_fail}

    # --- dict / JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        c = self.culprit
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "component": self.component, "modes": list(self.modes), "dtype": self.dtype,
            "device": self.device, "created": self.created,
            "passed": self.passed, "counts": self.counts(),
            "culprit": None if c is None else {**dataclasses.asdict(c), "failures": list(c.failures)},
            "tolerance": tolerance_to_dict(self.tolerance),
            "definitions": dict(DEFINITIONS),
            "inputs": self.inputs, "versions": self.versions,
            "layers": [{"index": l.index, "native": l.native, "reference": l.reference,
                        "kind": l.kind, "shape": list(l.shape), "status": l.status,
                        "metrics": l.metrics,
                        "failures": {m: list(f) for m, f in l.failures.items()}}
                       for l in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Report":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a parity report: format={d.get('format')!r}, expected {FORMAT!r}")
        layers = tuple(
            LayerRecord(l["index"], l["native"], l["reference"], l["kind"], tuple(l["shape"]),
                        {m: dict(v) for m, v in l["metrics"].items()},
                        {m: tuple(f) for m, f in l["failures"].items()})
            for l in d["layers"])
        return cls(d["component"], tuple(d["modes"]), d["dtype"], d["device"],
                   tolerance_from_dict(d["tolerance"]), d["inputs"], d["versions"], layers,
                   d["created"])

    def to_json(self, path) -> None:
        # Strict JSON (other tools read it): non-finite floats become the strings "inf"/"-inf"/"nan".
        text = json.dumps(_encode_nonfinite(self.to_dict()), indent=1, allow_nan=False)
        Path(path).write_text(text + "\n")

    @classmethod
    def from_json(cls, path) -> "Report":
        return cls.from_dict(_decode_nonfinite(json.loads(Path(path).read_text())))

    # --- other writers -------------------------------------------------------------------
    def to_junit(self, path) -> None:
        Path(path).write_bytes(junit_xml(self))

    def to_html(self, path) -> None:
        Path(path).write_text(html_page(self), encoding="utf-8")


_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _plain(x):
    """A NumPy scalar or array (h5py hands attributes back as such: a dump's seed is a numpy int64) as
    the Python number or list json and the other writers take; anything else unchanged."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return x


def _encode_nonfinite(x):
    x = _plain(x)
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {_plain(k): _encode_nonfinite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode_nonfinite(v) for v in x]
    return x


def _json_text(v) -> str:
    """One value as text for JUnit properties and HTML tables: strings as they are, the rest as strict JSON."""
    v = _plain(v)
    return v if isinstance(v, str) else json.dumps(_encode_nonfinite(v), allow_nan=False)


def _decode_metrics(m: dict) -> dict:
    return {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in m.items()}


def _decode_nonfinite(d: dict) -> dict:
    # Only metric values are floats that may be non-finite; decode exactly those.
    for l in d.get("layers", []):
        l["metrics"] = {mode: _decode_metrics(m) for mode, m in l["metrics"].items()}
    return d


# ---------------------------------------------------------------------------------------------
# Formatting helpers


def _fmt(v, digits: int = 3) -> str:
    v = _plain(v)
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}"


def _fmt_metric(name: str, v) -> str:
    """Like _fmt, but a cosine near 1 is shown as 1-(1-cos): '1' alone would hide the error."""
    v = _plain(v)
    if name == "cosine" and isinstance(v, float) and math.isfinite(v) and 0.999 <= v < 1.0:
        return f"1-{1.0 - v:.2g}"
    return _fmt(v)


def _worst_key(l: LayerRecord) -> float:
    vals = [m.get("rel_l2", math.nan) for m in l.metrics.values()]
    # NaN is the worst of all: it means the output is garbage.
    return max((math.inf if math.isnan(v) else v) for v in vals)


def summary_text(report: Report, worst: int = 10) -> str:
    """Terminal summary: verdict and counts, the culprit, the worst layers by rel_l2."""
    c = report.counts()
    tol = report.tolerance
    out = [f"parity {report.component}: dtype {report.dtype}, device {report.device}, "
           f"modes {'+'.join(report.modes)}, seed {report.inputs.get('seed', '?')}",
           f"{'PASS' if report.passed else 'FAIL'}: {c['fail']} of {c['layers']} layers fail, "
           f"{c['pass']} pass (rel_l2 <= {_fmt(tol.rel_l2)})"]
    cul = report.culprit
    out.append("culprit: none" if cul is None else f"culprit: {cul.line()}")
    fd = report.first_divergence
    if fd is not None and (cul is None or fd.index != cul.index or cul.mode != ACCUMULATED):
        out.append(f"first accumulated divergence: #{fd.index} {fd.native} (reference {fd.reference})")
    ranked = sorted(report.layers, key=_worst_key, reverse=True)[:max(worst, 0)]
    if ranked:
        modes = [m for m in MODES if m in report.modes]
        wn = min(max(len(l.native) for l in ranked), 48)
        wr = min(max(len(l.reference) for l in ranked), 48)
        head = f"  {'#':>4}  {'native':<{wn}}  {'reference':<{wr}}  " + "  ".join(
            f"{'rel_l2 ' + m[:3]:>11}" for m in modes) + "  status"
        out += [f"worst {len(ranked)} by rel_l2:", head]
        for l in ranked:
            vals = "  ".join(f"{_fmt(l.metrics.get(m, {}).get('rel_l2')):>11}" for m in modes)
            out.append(f"  {l.index:>4}  {l.native[:wn]:<{wn}}  {l.reference[:wr]:<{wr}}  {vals}  "
                       f"{l.status}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# JUnit XML

_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _x(s) -> str:
    """Text safe for XML 1.0 (ElementTree escapes <>&\" but passes control characters through)."""
    return _XML_BAD.sub("?", str(s))


def junit_xml(report: Report) -> bytes:
    """One testsuite per report, one testcase per layer; a failing layer carries a <failure> whose
    message names each metric that broke and in which mode."""
    c = report.counts()
    suite_name = f"sdport.parity.{report.component}.{report.dtype}"
    root = ET.Element("testsuites", name="sdport parity", tests=str(c["layers"]),
                      failures=str(c["fail"]), errors="0")
    suite = ET.SubElement(root, "testsuite", name=_x(suite_name), tests=str(c["layers"]),
                          failures=str(c["fail"]), errors="0", skipped="0", time="0",
                          timestamp=_x(report.created))
    props = ET.SubElement(suite, "properties")
    cul = report.culprit
    for k, v in [("component", report.component), ("dtype", report.dtype),
                 ("device", report.device), ("modes", "+".join(report.modes)),
                 ("culprit", "none" if cul is None else cul.line())] + \
            [(f"inputs.{k}", _json_text(v))
             for k, v in report.inputs.items()] + \
            [(f"versions.{k}", v) for k, v in report.versions.items()]:
        ET.SubElement(props, "property", name=_x(k), value=_x(v))
    for l in report.layers:
        tc = ET.SubElement(suite, "testcase", classname=_x(suite_name),
                           name=_x(f"{l.index:04d} {l.native}"), time="0")
        detail = "\n".join(
            f"{m}: " + ", ".join(f"{k}={_fmt_metric(k, v)}" for k, v in l.metrics[m].items())
            for m in MODES if m in l.metrics)
        if l.status == "fail":
            msg = "; ".join(f"{m}: {', '.join(f)}" for m, f in l.failures.items() if f)
            fail = ET.SubElement(tc, "failure", message=_x(msg), type="ToleranceExceeded")
            fail.text = _x(f"native {l.native} vs reference {l.reference} ({l.kind}, shape "
                           f"{list(l.shape)})\n{detail}")
        out = ET.SubElement(tc, "system-out")
        out.text = _x(f"reference {l.reference}; kind {l.kind}; shape {list(l.shape)}\n{detail}")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


# ---------------------------------------------------------------------------------------------
# HTML

_COLORS = {ACCUMULATED: "#1f77b4", ISOLATED: "#e08a00"}
_RED = "#d62728"


def _e(s) -> str:
    return html.escape(str(_plain(s)), quote=True)


# Height of the chart's row for exact zeros, under the log scale.
_ZERO_ROW = 26


def chart_svg(report: Report, width: int = 1000, height: int = 360) -> str:
    """Per-layer rel_l2 in execution order, log-scale y, tolerance line, failing layers red, the
    culprit marked and labelled. Exact zeros (no log value) get hollow markers in their own row
    under the scale, labelled "exact (0)". Plain inline SVG; hover titles give each point's numbers."""
    layers = report.layers
    L, R, T, B = 72, 20, 34, 48
    pw, ph = width - L - R, height - T - B
    modes = [m for m in MODES if m in report.modes]
    thr = report.tolerance.rel_l2
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-label="rel_l2 per layer">',
             f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="#fbfbfb" stroke="#bbb"/>']
    if not layers:
        parts.append(f'<text x="{L + pw / 2}" y="{T + ph / 2}" text-anchor="middle">no layers</text>')
        return "\n".join(parts + ["</svg>"])

    vals = [l.metrics[m]["rel_l2"] for l in layers for m in modes if m in l.metrics]
    finite_pos = [v for v in vals if math.isfinite(v) and v > 0] + ([thr] if thr else [])
    lo = math.floor(math.log10(min(finite_pos))) if finite_pos else -8
    hi = math.ceil(math.log10(max(finite_pos))) if finite_pos else 0
    if hi <= lo:
        hi = lo + 1
    lo -= 1  # a decade of room under the smallest value
    # A log scale has no place for 0: exact zeros get a row of their own under the scale.
    zeros = any(v == 0 for v in vals)
    zh = _ZERO_ROW if zeros else 0
    sh = ph - zh  # height of the log scale
    y_sep = T + sh + 5  # a dashed line apart from the lowest gridline
    y_zero = (y_sep + T + ph) / 2

    def y_of(v: float) -> float:
        if math.isnan(v) or v == math.inf:
            return T  # off the scale: pinned to the top
        if v <= 0:
            return y_zero
        lv = min(max(math.log10(v), lo), hi)
        return T + sh * (hi - lv) / (hi - lo)

    n = len(layers)

    def x_of(i: int) -> float:
        return L + pw * (i + 0.5) / n

    # Decade grid and labels.
    step = max(1, math.ceil((hi - lo) / 10))
    for d in range(lo, hi + 1, step):
        y = y_of(10.0 ** d)
        parts.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{L - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">1e{d}</text>')
    if zeros:
        parts.append(f'<line x1="{L}" y1="{y_sep:.1f}" x2="{L + pw}" y2="{y_sep:.1f}" stroke="#999" '
                     f'stroke-dasharray="2 3"/>')
        parts.append(f'<text x="{L - 6}" y="{y_zero + 4:.1f}" class="tick" text-anchor="end">exact (0)</text>')
    parts.append(f'<text x="16" y="{T + sh / 2}" class="axis" text-anchor="middle" '
                 f'transform="rotate(-90 16 {T + sh / 2})">rel_l2 (log)</text>')
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
        parts.append(f'<line x1="{L}" y1="{yt:.1f}" x2="{L + pw}" y2="{yt:.1f}" stroke="{_RED}" '
                     f'stroke-dasharray="6 4" stroke-width="1.2"/>')
        parts.append(f'<text x="{L + pw - 4}" y="{yt - 5:.1f}" class="tick" fill="{_RED}" '
                     f'text-anchor="end">tolerance {_fmt(thr)}</text>')

    cul = report.culprit
    if cul is not None:
        ci = next(i for i, l in enumerate(layers) if l.index == cul.index)
        xc = x_of(ci)
        anchor, dx = ("start", 6) if ci < n * 0.6 else ("end", -6)
        label = f"culprit: {cul.native} ({cul.reference}) [{cul.mode}]"
        parts.append(f'<line x1="{xc:.1f}" y1="{T}" x2="{xc:.1f}" y2="{T + ph}" stroke="{_RED}" '
                     f'stroke-width="1.5" opacity="0.6"/>')
        parts.append(f'<text x="{xc + dx:.1f}" y="{T + 14}" class="culprit" fill="{_RED}" '
                     f'text-anchor="{anchor}">{_e(label)}</text>')

    r = 3.5 if n <= 80 else 2.5 if n <= 300 else 1.8
    for m in modes:
        # The line joins runs of values on the scale; it does not dive into the exact-zero row.
        runs, run = [], []
        for i, l in enumerate(layers):
            if m not in l.metrics:
                continue
            v = l.metrics[m]["rel_l2"]
            if v == 0:
                runs, run = runs + [run], []
            else:
                run.append((x_of(i), y_of(v)))
        for pts in runs + [run]:
            if len(pts) > 1:
                d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                parts.append(f'<polyline points="{d}" fill="none" stroke="{_COLORS[m]}" '
                             f'stroke-width="1.2" opacity="0.7"/>')
        for i, l in enumerate(layers):
            if m not in l.metrics:
                continue
            v = l.metrics[m]["rel_l2"]
            bad = l.failed(m)
            tip = (f"#{l.index} {l.native} | ref {l.reference} | {l.kind} | {m} rel_l2={_fmt(v)}"
                   + (" (exact)" if v == 0 else "")
                   + (" | FAIL: " + "; ".join(l.failures[m]) if bad else ""))
            color = _RED if bad else _COLORS[m]
            # Hollow markers for exact zeros, filled ones for values on the scale.
            paint = (f'fill="white" stroke="{color}" stroke-width="1.5" class="exact"' if v == 0
                     else f'fill="{color}"')
            shape = "circle" if m == ACCUMULATED else "rect"
            x, y = x_of(i), y_of(v)
            if shape == "circle":
                el = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" {paint}'
            else:  # isolated points are squares, so both modes stay readable where they overlap
                el = f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}" {paint}'
            parts.append(f'{el}><title>{_e(tip)}</title></{shape}>')

    # Legend.
    lx = L + 8
    for m in modes:
        sym = (f'<circle cx="{lx + 5}" cy="{T - 14}" r="4" fill="{_COLORS[m]}"/>' if m == ACCUMULATED
               else f'<rect x="{lx + 1}" y="{T - 18}" width="8" height="8" fill="{_COLORS[m]}"/>')
        parts.append(sym + f'<text x="{lx + 14}" y="{T - 10}" class="tick">{m}</text>')
        lx += 110
    parts.append(f'<circle cx="{lx + 5}" cy="{T - 14}" r="4" fill="{_RED}"/>'
                 f'<text x="{lx + 14}" y="{T - 10}" class="tick">fails tolerance</text>')
    if zeros:
        lx += 120
        parts.append(f'<circle cx="{lx + 5}" cy="{T - 14}" r="3.5" fill="white" stroke="#555" stroke-width="1.5"/>'
                     f'<text x="{lx + 14}" y="{T - 10}" class="tick">exact (0): rel_l2 = 0, drawn in the row '
                     f'under the scale</text>')
    parts.append("</svg>")
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd}
.badge{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600}
.pass{background:#2ca02c} .fail{background:#d62728}
.meta{color:#555;font-size:14px} .culpritbox{background:#fff3f3;border-left:4px solid #d62728;padding:8px 12px;margin:12px 0}
.okbox{background:#f3fff3;border-left:4px solid #2ca02c;padding:8px 12px;margin:12px 0}
svg.chart{width:100%;max-width:1150px;height:auto;font-size:11px} .tick{font-size:11px;fill:#444} .axis{font-size:12px;fill:#333}
.culprit{font-size:12px;font-weight:600}
table{border-collapse:collapse;font-size:12.5px} th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
th{background:#f4f4f4;position:sticky;top:0} td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
tr.failrow{background:#fff0f0} tr.culpritrow{background:#ffd9d9;font-weight:600} td.bad{color:#d62728;font-weight:600}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.scroll{overflow-x:auto}
dl{display:grid;grid-template-columns:max-content auto;gap:3px 14px;font-size:13.5px} dt{font-weight:600}
"""

_TABLE_METRICS = ("rel_l2", "cosine", "max_abs", "psnr_db")


def _kv_table(d: Mapping) -> str:
    rows = "".join(f"<tr><th>{_e(_plain(k))}</th><td><code>{_e(_json_text(v))}"
                   f"</code></td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def html_page(report: Report) -> str:
    """One self-contained HTML page: verdict, culprit, chart, layer table, legend, inputs, versions."""
    c = report.counts()
    cul = report.culprit
    modes = [m for m in MODES if m in report.modes]
    title = f"sdport parity: {report.component} ({report.dtype}, {report.device})"
    verdict = "PASS" if report.passed else "FAIL"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
           f'<h1>{_e(title)} <span class="badge {verdict.lower()}">{verdict}</span></h1>',
           f'<div class="meta">modes: {_e(" + ".join(modes))} &middot; {c["layers"]} layers: '
           f'{c["pass"]} pass, {c["fail"]} fail &middot; seed {_e(report.inputs.get("seed", "?"))} '
           f'&middot; {_e(report.created)}</div>']
    if cul is None:
        out.append('<div class="okbox">No layer breaks tolerance.</div>')
    else:
        out.append(f'<div class="culpritbox"><b>Culprit</b> ({_e(cul.mode)}): layer '
                   f'<a href="#layer-{cul.index}">#{cul.index}</a> native <code>{_e(cul.native)}</code>'
                   f' &larr; reference <code>{_e(cul.reference)}</code> ({_e(cul.kind)}): '
                   f'{_e("; ".join(cul.failures))}'
                   + (f"<br><i>{_e(cul.note)}</i>" if cul.note else "") + "</div>")
    tol = {k: v for k, v in tolerance_to_dict(report.tolerance).items() if v is not None}
    out.append(f'<div class="meta">tolerance ({_e(report.dtype)}): '
               + ", ".join(f"{_e(k)} {'&ge;' if k in ('cosine', 'psnr_db', 'sqnr_db') else '&le;'} "
                           f"{_e(_fmt_metric(k, v))}" if not isinstance(v, bool) else f"{_e(k)}={v}"
                           for k, v in tol.items()) + "</div>")

    out += ["<h2>rel_l2 per layer</h2>", chart_svg(report)]

    # Layer table.
    head = "<tr><th>#</th><th>native</th><th>reference</th><th>kind</th><th>shape</th>" + "".join(
        f"<th>{_e(m[:3])} {_e(k)}</th>" for m in modes for k in _TABLE_METRICS) + "<th>status</th></tr>"
    rows = []
    for l in report.layers:
        cls = "culpritrow" if cul is not None and l.index == cul.index else (
            "failrow" if l.status == "fail" else "")
        cells = []
        for m in modes:
            mm = l.metrics.get(m, {})
            broken = {f.split("=")[0].split(" ")[0] for f in l.failures.get(m, ())}
            for k in _TABLE_METRICS:
                bad = ' bad' if k in broken else ''
                cells.append(f'<td class="num{bad}">{_e(_fmt_metric(k, mm.get(k)))}</td>')
        rows.append(f'<tr id="layer-{l.index}" class="{cls}"><td class="num">{l.index}</td>'
                    f"<td><code>{_e(l.native)}</code></td><td><code>{_e(l.reference)}</code></td>"
                    f"<td>{_e(l.kind)}</td><td>{_e('x'.join(map(str, l.shape)))}</td>"
                    + "".join(cells) + f"<td>{_e(l.status)}</td></tr>")
    out += ["<h2>Layers</h2>", f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>']

    out.append("<h2>Metrics</h2><dl>" + "".join(
        f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in DEFINITIONS.items())
        + f"<dt>{ACCUMULATED}</dt><dd>both models run end to end on the same inputs; a layer's "
          "error includes everything upstream</dd>"
        + f"<dt>{ISOLATED}</dt><dd>the native layer re-runs on the reference's recorded input; "
          "the error is the layer's own. The culprit is the first layer whose isolated error "
          "breaks tolerance.</dd></dl>")
    out += ["<h2>Inputs</h2>", _kv_table(report.inputs),
            "<h2>Versions</h2>", _kv_table(report.versions), "</body></html>"]
    return "\n".join(out)
