"""The sweep's renderings: the summary page (one heatmap per run of each cell's worst gate margin,
failing cells linked to their reports), JUnit (one case per cell) and the terminal lines."""
from __future__ import annotations

import html
import math
from xml.sax.saxutils import quoteattr

from ..render_junit import xml_text

CLIP = 3.0  # decades: the colour scale saturates past +-3 (1000x headroom or excess)


def fmt_margin(m) -> str:
    if m is None:
        return "-"
    if isinstance(m, float) and math.isinf(m):
        return "+inf" if m > 0 else "-inf"
    if isinstance(m, float) and math.isnan(m):
        return "nan"
    return f"{m:+.2f}"


def colour(record: dict) -> str:
    """Green for headroom, red for excess (deeper with the margin), grey for an error cell."""
    m = record.get("worst_margin")
    if record.get("status") == "error" or m is None or (isinstance(m, float) and math.isnan(m)):
        return "#9e9e9e"
    x = max(-CLIP, min(CLIP, m)) / CLIP
    if record.get("status") == "fail" and x >= 0:  # a fail the margins cannot see: as red as any
        x = -1.0
    if x >= 0:  # white -> green
        r, g, b = 255 - int(160 * x), 255 - int(55 * x), 255 - int(160 * x)
    else:       # pink -> red
        x = -x
        r, g, b = 255 - int(40 * x), 200 - int(170 * x), 200 - int(170 * x)
    return f"#{r:02x}{g:02x}{b:02x}"


def _rows_cols(records: list[dict]):
    """Rows: checkpoint and every axis but the last; columns: the last axis (or one column)."""
    axes = records[0]["axes"]
    col_axis = axes[-1] if axes else None
    row_axes = axes[:-1]

    def val(r, a):
        v = r["params"][a]
        return v if isinstance(v, (int, float, str)) else repr(v)

    rows, cols = [], []
    for r in records:
        rk = (r["checkpoint"]["name"], *[str(val(r, a)) for a in row_axes])
        ck = str(val(r, col_axis)) if col_axis else ""
        rows.append(rk) if rk not in rows else None
        cols.append(ck) if ck not in cols else None
    return col_axis, row_axes, rows, cols, val


def heatmap(run: str, records: list[dict]) -> str:
    col_axis, row_axes, rows, cols, val = _rows_cols(records)
    grid = {}
    for r in records:
        rk = (r["checkpoint"]["name"], *[str(val(r, a)) for a in row_axes])
        grid[(rk, str(val(r, col_axis)) if col_axis else "")] = r
    e = html.escape
    head = "".join(f"<th>{e(a)}</th>" for a in ("checkpoint", *row_axes))
    head += "".join(f"<th class=col>{e(f'{col_axis}={c}' if col_axis else 'cell')}</th>" for c in cols)
    body = []
    for rk in rows:
        tds = "".join(f"<td class=key>{e(v)}</td>" for v in rk)
        for c in cols:
            r = grid.get((rk, c))
            if r is None:
                tds += "<td class=none>not run</td>"
                continue
            text = "error" if r["status"] == "error" else fmt_margin(r.get("worst_margin"))
            title = r["error"] if r["status"] == "error" else (r.get("worst_where") or "")
            if r["status"] == "fail" and r.get("failures"):
                title += " | " + r["failures"][0]
            inner = e(text)
            link = r.get("html") or r.get("report")
            if link:
                inner = f"<a href={quoteattr(link)}>{inner}</a>"
            tds += (f"<td class='m {e(r['status'])}' style='background:{colour(r)}' title={quoteattr(title)}>"
                    f"{inner}</td>")
        body.append(f"<tr>{tds}</tr>")
    kind = records[0]["kind"]
    fixed = {k: v for k, v in records[0]["params"].items() if k not in records[0]["axes"]}
    fixed_text = ", ".join(f"{k}={v}" for k, v in fixed.items())
    return (f"<h2>{e(run)} <span class=kind>parity {e(kind)}</span></h2><p class=meta>fixed: {e(fixed_text)}</p>"
            f"<table class=grid><tr>{head}</tr>{''.join(body)}</table>")


CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:26px 0 6px;border-bottom:1px solid #ddd}
.kind{color:#666;font-weight:normal;font-size:14px} .meta{color:#555;font-size:13px;margin:4px 0}
table.grid{border-collapse:collapse;font-size:13px} .grid th,.grid td{border:1px solid #ccc;padding:5px 9px}
.grid th{background:#f4f4f4} td.key{font-family:ui-monospace,monospace} td.m{text-align:center;
font-family:ui-monospace,monospace;min-width:64px} td.fail,td.error{font-weight:bold;outline:2px solid #b00020}
td.m a{color:inherit} td.none{color:#999} .bad{color:#b00020} .ok{color:#2c7a2c}
.legend span{display:inline-block;width:26px;height:14px;vertical-align:middle;border:1px solid #ccc}
ul.fails{font-size:13px} ul.fails code{font-size:12px}"""


def summary_html(name: str, records: list[dict], runs: list[str], executor: str, counts: dict) -> str:
    e = html.escape
    verdict = "all cells pass" if counts["fail"] == counts["error"] == 0 else \
        f"{counts['fail']} failing, {counts['error']} error"
    legend = "".join(f"<span style='background:{colour({'status': 'pass' if m >= 0 else 'fail', 'worst_margin': m})}'>"
                     f"</span> {m:+g} " for m in (-3, -1, 0, 1, 3))
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>sweep {e(name)}</title><style>{CSS}</style>"
             f"</head><body><h1>sweep {e(name)}: <span class={'ok' if verdict == 'all cells pass' else 'bad'}>"
             f"{e(verdict)}</span></h1>",
             f"<p class=meta>{counts['cells']} cells: {counts['pass']} pass, {counts['fail']} fail, "
             f"{counts['error']} error; {counts['computed']} computed now, {counts['reused']} from the store; "
             f"{e(executor)}</p>",
             "<p class=meta>Each cell shows its worst gate margin in decades of headroom: log10(bound / value) "
             "for upper bounds (rel_l2), (value - bound) / 20 for dB bounds (psnr_db), through 1 - cosine for "
             "cosine; negative fails. Hover for where it is; click for the cell's report. "
             f"<span class=legend>{legend}</span> <span class=legend><span style='background:#9e9e9e'></span> "
             "error</span></p>"]
    for run in runs:
        rs = [r for r in records if r["run"] == run]
        if rs:
            parts.append(heatmap(run, rs))
    bad = [r for r in records if r["status"] != "pass"]
    if bad:
        parts.append("<h2>Failing and error cells</h2><ul class=fails>")
        for r in bad:
            why = r["error"] if r["status"] == "error" else "; ".join(r.get("failures") or [])[:300]
            link = r.get("html")
            label = f"<a href={quoteattr(link)}>{e(r['label'])}</a>" if link else e(r["label"])
            parts.append(f"<li>{label} <b>{e(r['status'])}</b>: <code>{e(why)}</code></li>")
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "".join(parts)


def junit_xml(name: str, records: list[dict], runs: list[str]) -> str:
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<testsuites name={quoteattr("sdport sweep " + name)} tests="{len(records)}" '
           f'failures="{sum(r["status"] == "fail" for r in records)}" '
           f'errors="{sum(r["status"] == "error" for r in records)}">']
    for run in runs:
        rs = [r for r in records if r["run"] == run]
        if not rs:
            continue
        out.append(f'  <testsuite name={quoteattr(run)} tests="{len(rs)}" '
                   f'failures="{sum(r["status"] == "fail" for r in rs)}" '
                   f'errors="{sum(r["status"] == "error" for r in rs)}">')
        for r in rs:
            t = f' time="{r["seconds"]:.3f}"' if isinstance(r.get("seconds"), (int, float)) else ""
            out.append(f'    <testcase classname={quoteattr("sweep." + run)} name={quoteattr(r["label"])}{t}>')
            if r["status"] == "fail":
                msg = "; ".join(r.get("failures") or []) or "a gate fails"
                out.append(f'      <failure message={quoteattr(xml_text(msg[:500]))}>'
                           f'{html.escape(xml_text(msg))}</failure>')
            elif r["status"] == "error":
                out.append(f'      <error message={quoteattr(xml_text(r["error"] or ""))}/>')
            out.append(f'      <system-out>{html.escape(xml_text("worst margin " + fmt_margin(r.get("worst_margin")) + " at " + (r.get("worst_where") or "-") + "; report " + str(r.get("report"))))}</system-out>')
            out.append("    </testcase>")
        out.append("  </testsuite>")
    out.append("</testsuites>\n")
    return "\n".join(out)
