"""Writers for a sampler-parity run (parity/txt2img.py): terminal summary, JSON, side-by-side PNG, HTML.

The PNG is reference | native | difference heatmap, each H x W. The heatmap is |native - reference|
(largest over R, G, B, in decoder units where the image spans [-1, 1]) divided by its maximum, on a
black-red-yellow-white scale; the text chunk `sdport:diff_scale` says what white stands for.
"""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import torch

from ..models import images
from .render_html import e, kv_table, layer_section, metric_cell, page_start
from .render_svg import COLORS, RED, LogScale
from .render_text import fmt, fmt_metric
from .report import ACCUMULATED, ISOLATED, encode_nonfinite, worst_key
from .txt2img import FREE, TEACHER, Txt2ImgResult

PANELS = "reference | native | |native - reference| heatmap"


# ---------------------------------------------------------------------------------------------
# Terminal


def steps_text(s: dict) -> str:
    """The sampler steps run, and what --steps asked where the spacing ran another number (ldm: 150 runs 167)."""
    n = s.get("latent_steps", s["steps"])
    return f"{s['sampler']} {n} steps" + (f" (--steps {s['steps']}, {s.get('spacing', 'ldm')} spacing)"
                                          if n != s["steps"] else "")


def summary(result: Txt2ImgResult, worst: int = 3) -> str:
    s, g = result.settings, result.gate
    out = [f"parity txt2img: {steps_text(s)}"
           + (f" (eta {s['eta']})" if s["sampler"] == "ddim" else "")
           + f", scale {s['scale']}, {s['width']}x{s['height']}, seed {result.inputs['seed']}; native {result.dtype} "
           f"on {result.device} vs reference fp32",
           f"gate ({g['dtype']}): teacher-forced latent rel_l2 <= {fmt(g['latent'].rel_l2)} at every step, "
           f"image psnr_db >= {fmt(g['image_psnr_db'])}",
           f"  {'step':>4} {'t':>5}  {'free rel_l2':>11} {'free psnr':>9}  {'tf rel_l2':>11} {'tf psnr':>9}  status"]
    for r in result.steps:
        f, t = r[FREE], r[TEACHER]
        out.append(f"  {r['step']:>4} {r['t']:>5}  {fmt(f['rel_l2']):>11} {fmt(f['psnr_db']):>9}  "
                   f"{fmt(t['rel_l2']):>11} {fmt(t['psnr_db']):>9}  {'FAIL' if r['failures'] else 'pass'}")
    im = result.image
    out.append(f"image: psnr_db {fmt(im['psnr_db'])}, rel_l2 {fmt(im['rel_l2'])}, max_abs {fmt(im['max_abs'])}"
               f" ({'FAIL' if im['failures'] else 'pass'})")
    c = result.conditioning
    out.append("text encoders: " + ", ".join(f"{k} rel_l2 {fmt(v['rel_l2'])}" for k, v in c.items()))
    for step, res in result.layers.items():
        rep = res.report
        cul = rep.culprit
        ranked = sorted(rep.layers, key=worst_key, reverse=True)[:worst]
        out.append(f"UNet layers at step {step} (t={result.steps[step]['t']}): {rep.counts()['fail']} of "
                   f"{rep.counts()['layers']} fail; culprit: {'none' if cul is None else cul.line()}")
        for l in ranked:
            vals = ", ".join(f"{m[:3]} {fmt(v.get('rel_l2'))}" for m, v in l.metrics.items())
            out.append(f"    worst: {l.native} ({l.reference}) rel_l2 {vals}")
    for note in result.notes:
        out.append(f"note: {note}")
    out.append("PASS" if result.passed else f"FAIL: {len(result.failures)} gate(s) broken; first: {result.failures[0]}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# JSON


def write_json(result: Txt2ImgResult, path) -> None:
    """Strict JSON; non-finite numbers as the strings "inf" / "-inf" / "nan", as parity reports."""
    Path(path).write_text(json.dumps(encode_nonfinite(result.to_dict()), indent=1, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------
# PNG


def _hot(h: torch.Tensor) -> torch.Tensor:
    """[1, 1, H, W] in [0, 1] -> [1, 3, H, W] in [0, 1]: black, red, yellow, white."""
    return torch.cat([(3 * h).clamp(0, 1), (3 * h - 1).clamp(0, 1), (3 * h - 2).clamp(0, 1)], dim=1)


def side_by_side(reference: torch.Tensor, native: torch.Tensor) -> tuple[torch.Tensor, str]:
    """([1, 3, H, 3W] in [-1, 1], the heatmap's scale as text)."""
    d = (native.float() - reference.float()).abs().amax(dim=1, keepdim=True)  # [1, 1, H, W]
    peak = float(d.max())
    if peak > 0 and math.isfinite(peak):
        heat = _hot(d / peak)
        scale = (f"white = {peak:.3g} (decoder units, image range [-1, 1]; {peak * 127.5:.3g} of 255 levels), "
                 f"black = 0: amplified {2 / peak:.3g}x")
    else:
        heat = torch.zeros_like(reference)
        scale = "identical images: all black" if peak == 0 else f"non-finite difference ({peak})"
    panel = torch.cat([reference.clamp(-1, 1), native.clamp(-1, 1), heat * 2 - 1], dim=3)  # [1, 3, H, 3W]
    return panel, scale


def png_text(result: Txt2ImgResult, scale: str) -> dict[str, str]:
    s = result.settings
    return {"sdport:panels": PANELS, "sdport:diff_scale": scale,
            "sdport:image_psnr_db": fmt(result.image["psnr_db"], 6), "prompt": result.inputs["prompt"],
            "negative": result.inputs["negative"], "seed": str(result.inputs["seed"]), "sampler": s["sampler"],
            "steps": str(s["steps"]), "scale": repr(float(s["scale"])), "dtype": result.dtype,
            "device": result.device, "model": result.inputs["checkpoint"]}


def write_png(result: Txt2ImgResult, path) -> str:
    """The side-by-side PNG; returns the heatmap's scale."""
    panel, scale = side_by_side(result.reference_image, result.native_image)
    images.write_png(panel, path, png_text(result, scale))
    return scale


# ---------------------------------------------------------------------------------------------
# HTML


def steps_svg(result: Txt2ImgResult, width: int = 900, height: int = 300) -> str:
    """rel_l2 per step, free-running and teacher-forced, log scale, with the gate line."""
    L, R, T, B = 72, 16, 26, 40
    pw, ph = width - L - R, height - T - B
    series = {FREE: COLORS[ACCUMULATED], TEACHER: COLORS[ISOLATED]}
    thr = result.gate["latent"].rel_l2
    r = 3.5
    scale = LogScale([r_[k]["rel_l2"] for r_ in result.steps for k in series], T, ph, pad=r + 2, extra=[thr])
    n = len(result.steps)

    def x_of(i):
        return L + pw * (i + 0.5) / n

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">']
    parts += scale.axis(L, L + pw, "latent rel_l2 (log)")
    if thr:
        y = scale.y(thr)
        parts.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="{RED}" '
                     f'stroke-dasharray="6 4"/><text x="{L + pw - 4}" y="{y - 5:.1f}" class="tick" fill="{RED}" '
                     f'text-anchor="end">gate {fmt(thr)}</text>')
    for i, r_ in enumerate(result.steps):
        if n <= 60 or i % max(1, n // 10) == 0:
            parts.append(f'<text x="{x_of(i):.1f}" y="{T + ph + 16}" class="tick" text-anchor="middle">{r_["step"]}</text>')
    parts.append(f'<text x="{L + pw / 2}" y="{height - 6}" class="axis" text-anchor="middle">step</text>')
    for k, colour in series.items():
        pts = [(x_of(i), scale.y(r_[k]["rel_l2"])) for i, r_ in enumerate(result.steps)]
        parts.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}" fill="none" '
                     f'stroke="{colour}" stroke-width="1.5"/>')
        for (x, y), r_ in zip(pts, result.steps):
            bad = k == TEACHER and r_["failures"]
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{RED if bad else colour}">'
                         f'<title>step {r_["step"]} t={r_["t"]} {k} rel_l2={fmt(r_[k]["rel_l2"])}</title></circle>')
    lx = L + 8
    for k, colour in series.items():
        parts.append(f'<circle cx="{lx + 5}" cy="{T - 12}" r="4" fill="{colour}"/>'
                     f'<text x="{lx + 14}" y="{T - 8}" class="tick">{k}</text>')
        lx += 130
    parts.append("</svg>")
    return "\n".join(parts)


# A panel smaller than this (the tiny models' 16..64 px images) is enlarged on the page.
VIEW_MIN_PX = 256


def view_factor(height: int, width: int) -> int:
    """The integer factor that brings an image's smaller side to at least VIEW_MIN_PX (1 when it is)."""
    return max(1, math.ceil(VIEW_MIN_PX / max(1, min(height, width))))


def _png_data_uri(result: Txt2ImgResult) -> tuple[str, str, int, tuple[int, int]]:
    """The side-by-side panel as a data URI, enlarged by whole pixels (nearest neighbour: no
    interpolation invents detail) when it is small; (uri, heatmap scale, factor, (H, W) of one panel)."""
    from PIL import Image

    panel, scale = side_by_side(result.reference_image, result.native_image)
    img = Image.fromarray(images.to_uint8(panel), "RGB")
    h, w3 = img.height, img.width
    k = view_factor(h, w3 // 3)
    if k > 1:
        img = img.resize((w3 * k, h * k), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), scale, k, (h, w3 // 3)


def rows_note(result: Txt2ImgResult) -> str:
    """What the step table's rows are, and why there are more than --steps asked where there are."""
    s, n = result.settings, len(result.steps)
    out = f"{n} rows, one per sampler step run (step i: the latent after the UNet call at timestep t)"
    if n != s["steps"]:
        ts = list(result.inputs.get("timesteps") or [])
        stride = abs(ts[0] - ts[1]) if len(ts) > 1 else None
        why = (f"--steps {s['steps']} with {s.get('spacing', 'ldm')} spacing"
               + (f" takes every {stride}th timestep (the schedule's length // --steps), which gives {n}"
                  if stride else f" gives {n} timesteps")
               + (f" (t = {', '.join(map(str, ts))})" if ts and n <= 12 else "")
               + f", so the table has {abs(n - s['steps'])} row{'s' if abs(n - s['steps']) > 1 else ''} "
                 f"{'more' if n > s['steps'] else 'fewer'} than --steps; --spacing linspace|leading|trailing "
                 f"runs exactly {s['steps']}")
        out += f". {why}"
    return out + "."


def html_page(result: Txt2ImgResult) -> str:
    s = result.settings
    title = f"sdport parity txt2img: {steps_text(s)} ({result.dtype}, {result.device})"
    out = page_start(title, result.passed)
    out.append(f'<div class="meta">prompt {e(repr(result.inputs["prompt"]))} &middot; scale {e(s["scale"])} &middot; '
               f'{s["width"]}x{s["height"]} &middot; seed {e(result.inputs["seed"])} &middot; gate {e(result.gate["dtype"])}: '
               f'teacher-forced rel_l2 &le; {e(fmt(result.gate["latent"].rel_l2))}, image psnr_db &ge; '
               f'{e(fmt(result.gate["image_psnr_db"]))}</div>')
    if result.failures:
        out.append('<div class="culpritbox">' + "<br>".join(e(f) for f in result.failures[:20]) + "</div>")
    else:
        out.append('<div class="okbox">Every gate holds.</div>')
    uri, scale, k, (h, w) = _png_data_uri(result)
    shown = (f"shown at {k}x (nearest neighbour: each pixel a {k}x{k} block) because the images are {w}x{h}; "
             "the PNG file keeps their size" if k > 1 else f"each {w}x{h}")
    out += ["<h2>Images</h2>", f'<div class="meta">{e(PANELS)}; {e(shown)}; heatmap {e(scale)}</div>',
            f'<img src="{uri}" width="{3 * w * k}" height="{h * k}" style="image-rendering:pixelated;max-width:100%;'
            f'height:auto" alt="{e(PANELS)}">',
            kv_table({k_: fmt_metric(k_, v) if isinstance(v, float) else v for k_, v in result.image.items()})]
    out += ["<h2>rel_l2 per step</h2>", steps_svg(result)]
    cols = ("rel_l2", "cosine", "psnr_db")
    head = "<tr><th>step</th><th>t</th>" + "".join(
        f"<th>{e(m)} {'1-cos' if k == 'cosine' else e(k)}</th>" for m in ("free", "tf") for k in cols) + "<th>status</th></tr>"
    rows = []
    for r in result.steps:
        cells = "".join(metric_cell(k, r[m][k]) for m in (FREE, TEACHER) for k in cols)
        rows.append(f'<tr class="{"failrow" if r["failures"] else ""}"><td class="num">{r["step"]}</td>'
                    f'<td class="num">{r["t"]}</td>{cells}<td>{"FAIL" if r["failures"] else "pass"}</td></tr>')
    out += [f'<div class="meta">{e(rows_note(result))} 1-cos: 1 - cosine.</div>',
            f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>']
    for step, res in result.layers.items():
        rep = res.report
        c = rep.counts()
        out += [f"<h2>UNet layers at step {step} (t={result.steps[step]['t']})</h2>",
                f'<div class="meta">{c["layers"]} layers: {c["pass"]} pass, {c["fail"]} fail &middot; modes '
                f'{e(" + ".join(rep.modes))}</div>']
        out += layer_section(rep, getattr(res, "unpaired", None), anchor=f"step-{step}-layer-", heading="h3",
                             short_table=True)
    defs = result.to_dict()["definitions"]
    out += ["<h2>Definitions</h2><dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in defs.items())
            + "</dl>", "<h2>Text encoders</h2>", kv_table(result.conditioning),
            "<h2>Inputs</h2>", kv_table(result.inputs), "<h2>Notes</h2>", kv_table(dict(enumerate(result.notes))),
            "<h2>Versions</h2>", kv_table(result.versions), "</body></html>"]
    return "\n".join(x for x in out if x)


def write_html(result: Txt2ImgResult, path) -> None:
    Path(path).write_text(html_page(result), encoding="utf-8")
