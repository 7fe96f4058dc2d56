"""A parity report as one self-contained HTML page (no scripts, no external resources), and the pieces
the sampler report (txt2img_report) builds its page from: the style sheet, key-value tables and the
per-layer section (verdict, chart, layer table)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from .metrics import DEFINITIONS, tolerance_to_dict
from .render_svg import all_exact, chart_svg, esc
from .render_text import fmt_metric, json_text, one_minus_cosine
from .report import ACCUMULATED, ISOLATED, MODES, Report, plain

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
.badge{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600}
.pass{background:#2ca02c} .fail{background:#d62728}
.meta{color:#555;font-size:14px;margin:4px 0} .culpritbox{background:#fff3f3;border-left:4px solid #d62728;padding:8px 12px;margin:12px 0}
.okbox{background:#f3fff3;border-left:4px solid #2ca02c;padding:8px 12px;margin:12px 0}
svg.chart{width:100%;max-width:1150px;height:auto;font-size:11px} .tick{font-size:11px;fill:#444} .axis{font-size:12px;fill:#333}
.culprit{font-size:12px;font-weight:600}
table{border-collapse:collapse;font-size:12.5px} th,td{padding:3px 6px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0} td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.na{color:#666;font-style:italic;font-size:12px}
tr.failrow{background:#fff0f0} tr.culpritrow{background:#ffd9d9;font-weight:600} td.bad{color:#d62728;font-weight:600}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.scroll{overflow-x:auto} .scroll.short{max-height:480px;overflow-y:auto;border:1px solid #eee}
dl{display:grid;grid-template-columns:max-content auto;gap:3px 14px;font-size:13.5px} dt{font-weight:600}
"""

TABLE_METRICS = ("rel_l2", "cosine", "max_abs", "psnr_db")
_HEAD = {"cosine": "1-cos"}  # cosine columns show 1 - cosine: one number format at and near 1
_BREAK = re.compile(r"(?<=[.,/])")


def e(s) -> str:
    """HTML-escaped text of a value (NumPy values as Python ones)."""
    return esc(plain(s))


def breakable(name: str) -> str:
    """A dotted module name, escaped, with line-break opportunities after its dots and commas, so
    the long reference names wrap inside their column instead of widening the table."""
    return "<wbr>".join(e(p) for p in _BREAK.split(str(name)))


def kv_table(d: Mapping) -> str:
    rows = "".join(f"<tr><th>{e(k)}</th><td><code>{e(json_text(v))}"
                   f"</code></td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def page_start(title: str, passed: bool) -> list[str]:
    verdict = "PASS" if passed else "FAIL"
    return ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
            f'<h1>{e(title)} <span class="badge {verdict.lower()}">{verdict}</span></h1>']


def metric_cell(name: str, v, bad: bool = False) -> str:
    text = one_minus_cosine(v) if name == "cosine" else fmt_metric(name, v)
    return f'<td class="num{" bad" if bad else ""}">{e(text)}</td>'


def _reason(l, mode: str, unpaired: Mapping[str, str]) -> str:
    # The harness keys unpaired layers by module name; the whole model ("") is displayed "(model)".
    why = unpaired.get(l.native) or (unpaired.get("") if l.native == "(model)" else None)
    return why or f"no {mode} metrics for this layer (the JSON report's \"unpaired\" says why)"


def layer_table(report: Report, unpaired: Mapping[str, str] | None = None, anchor: str = "layer-") -> str:
    """One row per layer: index and status first (they stay in view at any width), the names (which
    wrap), then each mode's metrics; a mode the layer has no metrics for spans its columns with the
    reason."""
    unpaired = unpaired or {}
    cul = report.culprit
    modes = [m for m in MODES if m in report.modes]
    head = (f"<tr><th>#</th><th>status</th><th>{e(report.candidate)}</th><th>reference</th><th>kind</th><th>shape</th>"
            + "".join(f"<th>{e(m[:3])} {e(_HEAD.get(k, k))}</th>" for m in modes for k in TABLE_METRICS)
            + "</tr>")
    rows = []
    for l in report.layers:
        cls = "culpritrow" if cul is not None and l.index == cul.index else (
            "failrow" if l.status == "fail" else "")
        cells = []
        for m in modes:
            if m not in l.metrics:
                cells.append(f'<td class="na" colspan="{len(TABLE_METRICS)}">{e(_reason(l, m, unpaired))}</td>')
                continue
            mm = l.metrics[m]
            broken = {f.split("=")[0].split(" ")[0] for f in l.failures.get(m, ())}
            cells += [metric_cell(k, mm.get(k), k in broken) for k in TABLE_METRICS]
        rows.append(f'<tr id="{anchor}{l.index}" class="{cls}"><td class="num">{l.index}</td><td>{e(l.status)}</td>'
                    f"<td><code>{breakable(l.native)}</code>" + (f"<br><i>{e(l.note)}</i>" if l.note else "")
                    + f"</td><td><code>{breakable(l.reference)}</code></td>"
                    f"<td>{e(l.kind)}</td><td>{e('x'.join(map(str, l.shape)))}</td>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def verdict_box(report: Report, anchor: str = "layer-") -> str:
    cul = report.culprit
    if cul is not None:
        return (f'<div class="culpritbox"><b>Culprit</b> ({e(cul.mode)}): layer '
                f'<a href="#{anchor}{cul.index}">#{cul.index}</a> {e(report.candidate)} <code>{e(cul.native)}</code>'
                f' &larr; reference <code>{e(cul.reference)}</code> ({e(cul.kind)}): '
                f'{e("; ".join(cul.failures))}' + (f"<br><i>{e(cul.note)}</i>" if cul.note else "") + "</div>")
    if all_exact(report):
        return (f'<div class="okbox">No layer breaks tolerance: all {len(report.layers)} layers are exact '
                "(rel_l2 = 0 in every mode).</div>")
    return '<div class="okbox">No layer breaks tolerance.</div>'


def tolerance_line(report: Report) -> str:
    tol = {k: v for k, v in tolerance_to_dict(report.tolerance).items() if v is not None}
    return (f'<div class="meta">tolerance ({e(report.dtype)}): '
            + ", ".join(f"{e(k)} {'&ge;' if k in ('cosine', 'psnr_db', 'sqnr_db') else '&le;'} "
                        f"{e(fmt_metric(k, v))}" if not isinstance(v, bool) else f"{e(k)}={v}"
                        for k, v in tol.items()) + "</div>")


def unobserved_list(report: Report, unpaired: Mapping[str, str] | None) -> str:
    """Pairs that have no row at all (nothing could be compared), with the reason; "" when none."""
    rows = {l.native for l in report.layers}
    rest = {k: v for k, v in (unpaired or {}).items() if k not in rows and not (k == "" and "(model)" in rows)}
    if not rest:
        return ""
    return (f'<div class="meta">not observable ({len(rest)}):</div><table>'
            + "".join(f"<tr><td><code>{breakable(k or '(model)')}</code></td><td>{e(v)}</td></tr>"
                      for k, v in rest.items()) + "</table>")


def layer_section(report: Report, unpaired: Mapping[str, str] | None = None, anchor: str = "layer-",
                  heading: str = "h2", short_table: bool = False) -> list[str]:
    """Verdict, tolerance, chart and layer table of one per-layer comparison. `anchor` prefixes the row
    ids (a page with several comparisons gives each its own); `short_table` scrolls the table in a box."""
    return [verdict_box(report, anchor), tolerance_line(report),
            f"<{heading}>rel_l2 per layer</{heading}>", chart_svg(report),
            f"<{heading}>Layers</{heading}>",
            f'<div class="scroll{" short" if short_table else ""}">{layer_table(report, unpaired, anchor)}</div>',
            unobserved_list(report, unpaired)]


def definitions() -> str:
    return ("<h2>Metrics</h2><dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in DEFINITIONS.items())
            + "<dt>1-cos</dt><dd>the tables' cosine columns: 1 - cosine, so that every row shows the "
              "error in the same format</dd>"
            + f"<dt>{ACCUMULATED}</dt><dd>both models run end to end on the same inputs; a layer's "
              "error includes everything upstream</dd>"
            + f"<dt>{ISOLATED}</dt><dd>the native layer re-runs on the reference's recorded input; "
              "the error is the layer's own. The culprit is the first layer whose isolated error "
              "breaks tolerance.</dd></dl>")


def html_page(report: Report, unpaired: Mapping[str, str] | None = None) -> str:
    """One self-contained HTML page: verdict, culprit, chart, layer table, legend, inputs, versions."""
    c = report.counts()
    modes = [m for m in MODES if m in report.modes]
    title = f"sdport parity: {report.component} ({report.dtype}, {report.device})"
    out = page_start(title, report.passed)
    out.append(f'<div class="meta">modes: {e(" + ".join(modes))} &middot; {c["layers"]} layers: '
               f'{c["pass"]} pass, {c["fail"]} fail &middot; seed {e(report.inputs.get("seed", "?"))} '
               f'&middot; {e(report.created)}</div>')
    out += layer_section(report, unpaired)
    out += [definitions(), "<h2>Inputs</h2>", kv_table(report.inputs),
            "<h2>Versions</h2>", kv_table(report.versions), "</body></html>"]
    return "\n".join(x for x in out if x)


def write_html(report: Report, path, unpaired: Mapping[str, str] | None = None) -> None:
    Path(path).write_text(html_page(report, unpaired), encoding="utf-8")
