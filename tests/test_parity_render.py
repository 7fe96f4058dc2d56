"""The renderings of parity reports: the HTML page and its chart, JUnit times, the sampler report's page."""
import ast
import base64
import io
import math
import os
import re
import types
import xml.etree.ElementTree as ET

import pytest
import torch

from sdport.parity.metrics import DEFAULT_TOLERANCES, Tolerance, compare
from sdport.parity.report import ACCUMULATED, ISOLATED, Report, chart_svg, make_layer

FP32 = DEFAULT_TOLERANCES["fp32"]
PARITY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parity")


def _metrics(rel):
    r = torch.tensor([3.0, 4.0])
    return compare(r + torch.tensor([rel * 5.0, 0.0]), r)


def _report(acc, iso=None, names=None, refs=None, seconds=None):
    layers = []
    for i, ra in enumerate(acc):
        layers.append(make_layer(i, names[i] if names else f"down.{i}.res.0",
                                 refs[i] if refs else f"input_blocks.{i + 1}.0", "resnet", (2, 32, 8, 8), FP32,
                                 accumulated=None if ra is None else _metrics(ra),
                                 isolated=None if iso is None or iso[i] is None else _metrics(iso[i]),
                                 **({} if seconds is None else {"seconds": seconds[i]})))
    modes = (ACCUMULATED,) if iso is None else (ACCUMULATED, ISOLATED)
    return Report("unet", modes, "fp32", "cpu", FP32, {"seed": 0}, {"torch": torch.__version__}, tuple(layers))


def _markers(svg):
    return [el for el in svg.iter() if el.tag in ("circle", "rect") and el.find("title") is not None]


def _extent(el):
    """(top, bottom, radius-ish) of a data marker."""
    if el.tag == "circle":
        cy, r = float(el.get("cy")), float(el.get("r"))
        return cy - r, cy + r
    y, h = float(el.get("y")), float(el.get("height"))
    return y, y + h


# --- module structure ----------------------------------------------------------------------------

def test_report_modules_import_no_private_names():
    """The report's renderers share public helpers: none imports another module's _private names."""
    own = ["report.py", "txt2img_report.py"] + sorted(f for f in os.listdir(PARITY) if f.startswith("render_"))
    assert "render_html.py" in own and "render_junit.py" in own
    for f in own:
        tree = ast.parse(open(os.path.join(PARITY, f)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{f} imports {private} from .{node.module}"


# --- HTML layer table ----------------------------------------------------------------------------

def test_layer_table_status_first_and_names_wrap(tmp_path):
    """At 1400 px the table must not need sideways scrolling to show a layer's verdict: status comes
    right after the index, and long module names can break at their dots."""
    ref = "output_blocks.2.1.transformer_blocks.0.attn1.{to_q,to_k,to_v}"
    rep = _report([1e-7, 3e-4], [1e-7, 1e-7], names=["up.0.attn.0.blocks.0.attn1.qkv", "up.0.res.0"],
                  refs=[ref, "output_blocks.2.0"])
    p = tmp_path / "r.html"
    rep.to_html(p)
    text = p.read_text()
    table = text[text.index("<table><tr><th>#</th>"):]
    table = table[:table.index("</table>")]
    heads = re.findall(r"<th>([^<]*)</th>", table.split("</tr>")[0])
    assert heads[:2] == ["#", "status"]
    row = re.search(r'<tr id="layer-1"[^>]*>(.*?)</tr>', table).group(1)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", row)[:2] == ["1", "fail"]
    # No unbreakable run of text in the table is longer than a short name part.
    words = re.sub(r"<wbr>", " ", re.sub(r"<(?!wbr)[^>]*>", " ", table)).split()
    assert max(map(len, words)) <= 24, max(words, key=len)


def test_not_observable_cells_give_the_reason(tmp_path):
    rep = _report([1e-7, None], [1e-7, 2e-7])
    why = "native module is not called as a module: no accumulated metrics"
    p = tmp_path / "r.html"
    rep.to_html(p, unpaired={"down.1.res.0": why, "down.9.gone": "reference module did not run"})
    text = p.read_text()
    row = re.search(r'<tr id="layer-1"[^>]*>(.*?)</tr>', text).group(1)
    assert why in row and ">-<" not in row
    assert "down.<wbr>9.<wbr>gone" in text and "reference module did not run" in text  # a pair without a row
    rep.to_html(p)  # without the reasons: still no bare "-"
    row = re.search(r'<tr id="layer-1"[^>]*>(.*?)</tr>', p.read_text()).group(1)
    assert "no accumulated metrics" in row and ">-<" not in row


def test_cosine_columns_in_one_format(tmp_path):
    rep = _report([0, 1e-7, 0.5])
    p = tmp_path / "r.html"
    rep.to_html(p)
    text = p.read_text()
    assert "<th>acc 1-cos</th>" in text
    cells = [re.search(r'<tr id="layer-%d"[^>]*>(.*?)</tr>' % i, text).group(1) for i in range(3)]
    cos = [re.findall(r'<td class="num[^"]*">([^<]*)</td>', c)[2] for c in cells]
    assert cos[0] == "0" and not any(c.startswith("1-") for c in cos)
    assert float(cos[2]) == pytest.approx(1 - _metrics(0.5)["cosine"], rel=1e-2)


# --- chart ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("acc", [[1.0, 1e-6], [1e-6, 1e-5], [float("nan"), 1e-6], [float("inf"), 0.0]])
def test_chart_draws_every_marker_whole_inside_the_plot(acc):
    svg = ET.fromstring(chart_svg(_report(acc)))
    plot = next(el for el in svg.iter() if el.tag == "rect" and el.get("fill") == "#fbfbfb")
    top, bottom = float(plot.get("y")), float(plot.get("y")) + float(plot.get("height"))
    for el in _markers(svg):
        t, b = _extent(el)
        assert top <= t and b <= bottom, (el.attrib, top, bottom)
    grid = [float(el.get("y1")) for el in svg.iter() if el.tag == "line" and el.get("stroke") == "#e4e4e4"]
    for el in _markers(svg):  # a non-finite value is not drawn on a decade, as if it were 1e-N
        if "nan" in "".join(el.itertext()) or "=inf" in "".join(el.itertext()):
            t, b = _extent(el)
            assert b < min(grid)


def test_chart_exact_zero_of_both_modes_shows_both():
    """An accumulated exact zero (ring) stays visible around an isolated one (square) at the same layer."""
    svg = ET.fromstring(chart_svg(_report([0, 1e-6], [0, 1e-7])))
    exact = [el for el in _markers(svg) if el.get("class") == "exact"]
    circle = next(el for el in exact if el.tag == "circle")
    square = next(el for el in exact if el.tag == "rect")
    half_diagonal = float(square.get("width")) / 2 * math.sqrt(2)
    assert float(circle.get("r")) - float(circle.get("stroke-width")) / 2 > half_diagonal
    assert float(circle.get("cx")) == pytest.approx(float(square.get("x")) + float(square.get("width")) / 2)


def test_all_exact_component_says_so(tmp_path):
    rep = _report([0, 0, 0], [0, 0, 0])
    svg = chart_svg(rep)
    ET.fromstring(svg)
    assert "all 3 layers exact" in svg and "<title>" not in svg
    p = tmp_path / "r.html"
    rep.to_html(p)
    assert "all 3 layers are exact" in p.read_text()
    assert "layers exact" not in chart_svg(_report([0, 1e-7]))


# --- JUnit times ------------------------------------------------------------------------------------

def test_junit_times_are_the_layers_measured_seconds(tmp_path):
    rep = _report([1e-7, 3e-4], seconds=[0.25, 0.5])
    rep.to_junit(tmp_path / "r.xml")
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert [float(c.get("time")) for c in suite.findall("testcase")] == [0.25, 0.5]
    assert float(suite.get("time")) == 0.75
    rep.to_json(tmp_path / "r.json")
    assert [l.seconds for l in Report.from_json(tmp_path / "r.json").layers] == [0.25, 0.5]
    # Not measured: no time at all rather than a false 0.
    _report([1e-7]).to_junit(tmp_path / "n.xml")
    root = ET.parse(tmp_path / "n.xml").getroot()
    assert all(el.get("time") is None for el in root.iter())


def test_lap_clock_charges_each_layer_the_time_since_the_previous(monkeypatch):
    from sdport.parity import report

    now = iter([10.0, 10.5, 11.5, 20.0, 20.25])
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(now))
    clock = report.LapClock()   # 10.0
    clock.lap("a")              # 10.5: a 0.5
    clock.lap("b")              # 11.5: b 1.0
    clock.restart()             # 20.0: the gap between passes is no layer's
    clock.lap("a")              # 20.25: a 0.75 in all
    assert clock.seconds == {"a": 0.75, "b": 1.0}


# --- sampler report -----------------------------------------------------------------------------------

def _step(i, t, rel, cos):
    m = {"rel_l2": rel, "cosine": cos, "psnr_db": 120.0}
    return {"step": i, "t": t, "free": dict(m), "teacher_forced": {**m, "start_max_abs": 0.0}, "failures": []}


def _txt2img_result(size=16, steps=6, timesteps=(997, 831, 665, 499, 333, 167, 1)):
    from sdport.parity.txt2img import Txt2ImgResult

    rep = _report([1e-7, 2e-7], [0, 1e-7])
    img = torch.zeros(1, 3, size, size)
    return Txt2ImgResult(
        inputs={"prompt": "a red cube", "negative": "", "seed": 42, "checkpoint": "x.ckpt", "timesteps": list(timesteps)},
        settings={"sampler": "plms", "steps": steps, "spacing": "ldm", "scale": 7.5, "eta": 0.0, "height": size,
                  "width": size, "latent_steps": len(timesteps), "layer_steps": [0]},
        device="cpu", dtype="fp32", gate={"dtype": "fp32", "latent": Tolerance(rel_l2=1e-5), "image_psnr_db": 60.0},
        steps=[_step(i, t, 1e-6, 1.0 if i == 0 else 1 - 1e-12) for i, t in enumerate(timesteps)],
        image={"psnr_db": 125.0, "rel_l2": 1e-6, "failures": []}, conditioning={},
        layers={0: types.SimpleNamespace(report=rep, unpaired={}, to_dict=rep.to_dict)},
        notes=[], versions={}, reference_image=img, native_image=img)


def test_txt2img_html_steps_chart_and_table():
    from sdport.parity import txt2img_report

    res = _txt2img_result()
    svg = ET.fromstring(txt2img_report.steps_svg(res))
    texts = ["".join(el.itertext()) for el in svg.iter() if el.tag.endswith("text")]  # namespaced
    assert any("rel_l2" in t for t in texts)  # the y axis says what it measures
    text = txt2img_report.html_page(res)
    # 7 rows under a 6-step request: the page says where the seventh comes from.
    assert "7 rows" in text and "--steps 6" in text and "every 166th" in text and "1 row more" in text
    # The cosine column in one number format, exact or not.
    assert "<th>tf 1-cos</th>" in text
    row0 = re.search(r"<tr class=\"\"><td class=\"num\">0</td>(.*?)</tr>", text).group(1)
    row1 = re.search(r"<tr class=\"\"><td class=\"num\">1</td>(.*?)</tr>", text).group(1)
    assert re.findall(r">([^<]*)</td>", row0)[2] == "0" and re.findall(r">([^<]*)</td>", row1)[2] == "1e-12"


def test_txt2img_html_layer_steps_as_table_and_chart():
    from sdport.parity import txt2img_report

    text = txt2img_report.html_page(_txt2img_result())
    section = text[text.index("UNet layers at step 0"):text.index("<h2>Definitions")]
    assert "<pre>" not in section
    assert 'id="step-0-layer-0"' in section and 'id="step-0-layer-1"' in section
    assert section.count("<svg") == 1 and "<th>status</th>" in section


def test_txt2img_html_small_images_upscaled_nearest(tmp_path):
    from PIL import Image

    from sdport.parity import txt2img_report

    res = _txt2img_result(size=16)
    res.reference_image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    text = txt2img_report.html_page(res)
    uri = re.search(r'<img src="data:image/png;base64,([^"]+)"', text).group(1)
    img = Image.open(io.BytesIO(base64.b64decode(uri)))
    assert img.size == (3 * 256, 256)
    px = img.load()
    assert all(px[x, y] == px[0, 0] for x in range(16) for y in range(16))  # one 16x16 block per pixel
    assert "shown at 16x (nearest neighbour" in text and "16x16" in text
    big = txt2img_report.html_page(_txt2img_result(size=256))
    assert "nearest neighbour" not in big
