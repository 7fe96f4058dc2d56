"""Number formats shared by every rendering of a parity report, and the terminal summary."""
from __future__ import annotations

import json
import math

from .report import ACCUMULATED, MODES, Report, encode_nonfinite, plain, worst_key


def fmt(v, digits: int = 3) -> str:
    v = plain(v)
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


def fmt_metric(name: str, v) -> str:
    """Like fmt, but a cosine near 1 is shown as 1-(1-cos): '1' alone would hide the error."""
    v = plain(v)
    if name == "cosine" and isinstance(v, float) and math.isfinite(v) and 0.999 <= v < 1.0:
        return f"1-{1.0 - v:.2g}"
    return fmt(v)


def one_minus_cosine(v) -> str:
    """1 - cosine in fmt's format, for table columns: one number format whether the cosine is exactly
    1, a hair under it or far from it (fmt_metric's "1-2e-12" turns into "1" at exactly 1)."""
    v = plain(v)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return fmt(v)
    return fmt(1.0 - float(v))


def json_text(v) -> str:
    """One value as text for JUnit properties and HTML tables: strings as they are, the rest as strict JSON."""
    v = plain(v)
    return v if isinstance(v, str) else json.dumps(encode_nonfinite(v), allow_nan=False)


def calibration_line(c: dict) -> str:
    """What `--calibrate` did to the gates (parity/calibrate.py), in one line."""
    wide = c.get("widened") or {}
    top = max((b for v in wide.values() for b in v.values()), default=None)
    return (f"gates calibrated: {c.get('layers_with_a_floor', 0)} layers have the reference's own fp32 noise floor "
            f"(against fp64); {len(wide)} gated at {fmt(c.get('factor'))} x floor"
            + (f" (up to rel_l2 <= {fmt(top)})" if top is not None else "") + ", the rest at the fixed bound")


def summary_text(report: Report, worst: int = 10) -> str:
    """Terminal summary: verdict and counts, the culprit, the worst layers by rel_l2."""
    c = report.counts()
    tol = report.tolerance
    pairing = report.inputs.get("pairing")
    out = [f"parity {report.component}: dtype {report.dtype}, device {report.device}, "
           f"modes {'+'.join(report.modes)}, seed {report.inputs.get('seed', '?')}",
           f"{'PASS' if report.passed else 'FAIL'}: {c['fail']} of {c['layers']} layers fail, "
           f"{c['pass']} pass (rel_l2 <= {fmt(tol.rel_l2)})"]
    if isinstance(pairing, str):
        out.append(f"pairing from the weights: {pairing}")
    if isinstance(report.inputs.get("calibration"), dict):
        out.append(calibration_line(report.inputs["calibration"]))
    if isinstance(report.inputs.get("first_nonfinite"), str):
        out.append(f"first inf/NaN: {report.inputs['first_nonfinite']}")
    cul = report.culprit
    out.append("culprit: none" if cul is None else f"culprit: {cul.line()}")
    fd = report.first_divergence
    if fd is not None and (cul is None or fd.index != cul.index or cul.mode != ACCUMULATED):
        out.append(f"first accumulated divergence: #{fd.index} {fd.native} (reference {fd.reference})")
    noted = [l for l in report.layers if l.note]
    for l in noted[:5]:
        out.append(f"finding: #{l.index} {l.native} (reference {l.reference}): {l.note}")
    if len(noted) > 5:
        out.append(f"... {len(noted) - 5} more findings (in the JSON report)")
    ranked = sorted(report.layers, key=worst_key, reverse=True)[:max(worst, 0)]
    if ranked:
        modes = [m for m in MODES if m in report.modes]
        wn = min(max(len(l.native) for l in ranked), 48)
        wr = min(max(len(l.reference) for l in ranked), 48)
        head = f"  {'#':>4}  {report.candidate:<{wn}}  {'reference':<{wr}}  " + "  ".join(
            f"{'rel_l2 ' + m[:3]:>11}" for m in modes) + "  status"
        out += [f"worst {len(ranked)} by rel_l2:", head]
        for l in ranked:
            vals = "  ".join(f"{fmt(l.metrics.get(m, {}).get('rel_l2')):>11}" for m in modes)
            out.append(f"  {l.index:>4}  {l.native[:wn]:<{wn}}  {l.reference[:wr]:<{wr}}  {vals}  "
                       f"{l.status}")
    return "\n".join(out)
