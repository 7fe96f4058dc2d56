"""Parity metrics, tolerances, culprit selection and the report writers (JSON, JUnit, HTML, text)."""
import dataclasses
import json
import math
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from sdport.parity import metrics as M
from sdport.parity.metrics import (DEFAULT_TOLERANCES, DEFINITIONS, Tolerance, apply_overrides,
                                   check, compare, dtype_key, load_tolerances)
from sdport.parity.report import (ACCUMULATED, ISOLATED, Report, chart_svg, find_culprit,
                                  make_layer, summary_text)

FP32 = DEFAULT_TOLERANCES["fp32"]


# --- metrics -----------------------------------------------------------------------------------

def test_compare_hand_computed():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    r = torch.tensor([1.0, 2.0, 3.0, 5.0])
    m = compare(a, r)
    # d = [0, 0, 0, -1]; ||d|| = 1; ||r|| = sqrt(39); ||a|| = sqrt(30); <a,r> = 34; rmse = 1/2.
    assert m["max_abs"] == 1.0
    assert m["mean_abs"] == 0.25
    assert m["rel_l2"] == pytest.approx(1 / math.sqrt(39), rel=1e-15)
    assert m["cosine"] == pytest.approx(34 / math.sqrt(30 * 39), rel=1e-15)
    assert m["psnr_db"] == pytest.approx(20.0, rel=1e-15)  # 20 log10(5 / 0.5)
    assert m["sqnr_db"] == pytest.approx(20 * math.log10(math.sqrt(39)), rel=1e-15)
    assert m["nonfinite"] == 0
    assert set(m) == set(M.METRICS) | {"nonfinite"}
    assert set(DEFINITIONS) == set(m)


def test_compare_identical():
    r = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    m = compare(r.clone(), r)
    assert m["max_abs"] == 0 and m["mean_abs"] == 0 and m["rel_l2"] == 0
    assert m["cosine"] == pytest.approx(1.0, abs=1e-15)
    assert m["psnr_db"] == math.inf and m["sqnr_db"] == math.inf


def test_compare_zero_reference_guards():
    z = torch.zeros(4)
    both = compare(z, z)
    assert both["rel_l2"] == 0.0 and both["cosine"] == 1.0
    assert both["psnr_db"] == math.inf and both["sqnr_db"] == math.inf
    only_a = compare(torch.tensor([0.0, 1.0, 0.0, 0.0]), z)
    assert only_a["rel_l2"] == math.inf and only_a["cosine"] == 0.0
    assert only_a["psnr_db"] == -math.inf and only_a["sqnr_db"] == -math.inf
    assert not check(only_a, FP32)[0]
    only_r = compare(z, torch.tensor([0.0, 2.0, 0.0, 0.0]))
    assert only_r["rel_l2"] == 1.0 and only_r["cosine"] == 0.0
    assert only_r["sqnr_db"] == 0.0


def test_compare_opposite_sign_cosine():
    r = torch.tensor([1.0, -2.0, 3.0])
    assert compare(-r, r)["cosine"] == pytest.approx(-1.0, abs=1e-15)


def test_compare_fp16_inputs_computed_in_float64():
    # 1 + 2^-10 is exact in fp16; the error is 2^-10 everywhere. Sums over 10^5 elements in fp16
    # would overflow or round; in float64 they are exact.
    n = 100_000
    r = torch.ones(n, dtype=torch.float16)
    a = torch.full((n,), 1 + 2 ** -10, dtype=torch.float16)
    m = compare(a, r)
    assert m["max_abs"] == 2 ** -10 and m["mean_abs"] == 2 ** -10
    assert m["rel_l2"] == pytest.approx(2 ** -10, rel=1e-12)
    assert m["psnr_db"] == pytest.approx(20 * math.log10(2 ** 10), rel=1e-12)
    assert m["sqnr_db"] == pytest.approx(m["psnr_db"], rel=1e-12)  # flat signal: peak == rms
    assert all(isinstance(v, (float, int)) for v in m.values())


def test_compare_mixed_dtypes_numpy_and_bf16():
    r = np.array([1.0, 2.0, 4.0], dtype=np.float64)
    a = torch.tensor([1.0, 2.0, 4.0], dtype=torch.bfloat16)
    assert compare(a, r)["rel_l2"] == 0.0


def test_compare_counts_nonfinite_and_check_fails():
    a = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    r = torch.tensor([1.0, 1.0, 1.0, 2.0])
    m = compare(a, r)
    assert m["nonfinite"] == 2
    ok, failures = check(m, FP32)
    assert not ok and any(f.startswith("nonfinite=2") for f in failures)
    # NaN metrics never pass a bound, even when non-finite values are allowed.
    ok, failures = check(m, FP32.replace(allow_nonfinite=True))
    assert not ok and any(f.startswith("rel_l2=nan") for f in failures)


def test_compare_size_mismatch():
    with pytest.raises(ValueError, match="6 native elements vs 5"):
        compare(torch.zeros(6), torch.zeros(5))


def test_psnr_sqnr_rel_l2_identities():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(64, generator=g)
    a = r + 1e-3 * torch.randn(64, generator=g)
    m = compare(a, r)
    r64 = r.double()
    assert m["sqnr_db"] == pytest.approx(-20 * math.log10(m["rel_l2"]), rel=1e-12)
    crest = 20 * math.log10(float(r64.abs().max() / r64.pow(2).mean().sqrt()))
    assert m["psnr_db"] == pytest.approx(m["sqnr_db"] + crest, rel=1e-12)


# --- tolerances --------------------------------------------------------------------------------

def test_default_tolerances_one_per_dtype_and_ordered():
    assert set(DEFAULT_TOLERANCES) == {"fp32", "fp16", "bf16", "int8"}
    assert DEFAULT_TOLERANCES["fp32"].rel_l2 == 1e-5
    rels = [DEFAULT_TOLERANCES[k].rel_l2 for k in ("fp32", "fp16", "bf16", "int8")]
    assert rels == sorted(rels)
    assert dtype_key(torch.float16) == "fp16" and dtype_key("bfloat16") == "bf16"
    assert dtype_key("float32") == "fp32"
    with pytest.raises(ValueError, match="no default tolerance"):
        dtype_key("fp8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        FP32.rel_l2 = 1.0


def test_check_bounds_and_messages():
    good = {"max_abs": 1e-6, "mean_abs": 1e-7, "rel_l2": 1e-6, "cosine": 1.0, "psnr_db": 120.0,
            "sqnr_db": 120.0, "nonfinite": 0}
    assert check(good, FP32) == (True, [])
    bad = dict(good, rel_l2=3e-4, cosine=0.99999, psnr_db=60.0)
    ok, failures = check(bad, FP32)
    assert not ok
    assert "rel_l2=0.0003 > 1e-05" in failures
    assert "cosine=0.99999 < 0.999999" in failures
    assert "psnr_db=60 < 90" in failures
    # Bounds are inclusive; None is not gated.
    assert check(dict(good, rel_l2=1e-5), FP32)[0]
    assert check(dict(good, max_abs=1e9), FP32)[0]
    assert not check(dict(good, max_abs=1e9), FP32.replace(max_abs=1.0))[0]
    assert check({"rel_l2": 0.5}, Tolerance(rel_l2=1.0))[0]
    assert check({}, Tolerance(rel_l2=1.0)) == (False, ["rel_l2 missing"])


def test_overrides_from_strings_and_mappings():
    t = apply_overrides(FP32, ["rel_l2=1e-4", "max_abs = 0.5", "psnr_db=none"])
    assert t.rel_l2 == 1e-4 and t.max_abs == 0.5 and t.psnr_db is None
    assert t.cosine == FP32.cosine  # untouched
    assert apply_overrides(FP32, {"allow_nonfinite": "true"}).allow_nonfinite is True
    with pytest.raises(ValueError, match="unknown tolerance metric 'rel'"):
        apply_overrides(FP32, ["rel=1"])
    with pytest.raises(ValueError, match="expected metric=value"):
        apply_overrides(FP32, ["rel_l2"])
    with pytest.raises(ValueError, match="expected a number"):
        apply_overrides(FP32, ["rel_l2=tiny"])


def test_load_tolerances_json_and_toml(tmp_path):
    j = tmp_path / "tol.json"
    j.write_text(json.dumps({"max_abs": 0.1, "fp16": {"rel_l2": 2e-2, "max_abs": 0.2}}))
    t16 = load_tolerances(j, "fp16")
    assert t16.rel_l2 == 2e-2 and t16.max_abs == 0.2  # per-dtype wins over flat
    assert t16.cosine == DEFAULT_TOLERANCES["fp16"].cosine
    t32 = load_tolerances(j, torch.float32)
    assert t32.rel_l2 == 1e-5 and t32.max_abs == 0.1
    toml = tmp_path / "tol.toml"
    toml.write_text('rel_l2 = 3e-5\n[bf16]\ncosine = 0.99\npsnr_db = "none"\n')
    assert load_tolerances(toml, "fp32").rel_l2 == 3e-5
    tb = load_tolerances(toml, "bf16")
    assert tb.rel_l2 == 3e-5 and tb.cosine == 0.99 and tb.psnr_db is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fp32": {"rel_l3": 1}}))
    with pytest.raises(ValueError, match="rel_l3"):
        load_tolerances(bad, "fp32")


# --- report fixtures ---------------------------------------------------------------------------

def _metrics(rel):
    """Metrics of a synthetic pair whose rel_l2 is `rel` (0 gives identical tensors)."""
    r = torch.tensor([3.0, 4.0])  # ||r|| = 5
    a = r + torch.tensor([rel * 5.0, 0.0])
    return compare(a, r)


def _report(acc, iso=None, names=None, tol=FP32):
    layers = []
    for i, ra in enumerate(acc):
        ri = None if iso is None else iso[i]
        native = names[i] if names else f"down.{i}.res.0"
        layers.append(make_layer(i, native, f"input_blocks.{i + 1}.0", "resnet", (2, 32, 8, 8), tol,
                                 accumulated=_metrics(ra),
                                 isolated=None if ri is None else _metrics(ri)))
    modes = (ACCUMULATED,) if iso is None else (ACCUMULATED, ISOLATED)
    return Report("unet", modes, "fp32", "cpu", tol,
                  {"seed": 0, "noise": "torch.randn, CPU generator seeded 0, fp32, then .to(device)",
                   "shapes": {"x": [2, 4, 8, 8]}},
                  {"torch": torch.__version__}, tuple(layers))


# --- culprit -----------------------------------------------------------------------------------

def test_culprit_is_first_isolated_failure_not_first_accumulated():
    rep = _report(acc=[0, 1e-7, 3e-4, 5e-3, 6e-3], iso=[0, 1e-7, 1e-7, 2e-3, 1e-7])
    c = rep.culprit
    assert (c.index, c.native, c.reference, c.mode) == (3, "down.3.res.0", "input_blocks.4.0", ISOLATED)
    assert c.failures[0].startswith("rel_l2=")
    assert rep.first_divergence.index == 2
    assert not rep.passed and rep.counts() == {"layers": 5, "pass": 2, "fail": 3}


def test_culprit_accumulated_only_is_marked():
    rep = _report(acc=[0, 1e-7, 3e-4, 5e-3])
    c = rep.culprit
    assert c.index == 2 and c.mode == ACCUMULATED and "accumulated" in c.note


def test_culprit_when_error_only_accumulates():
    rep = _report(acc=[1e-6, 2e-5, 4e-5], iso=[1e-6, 1e-6, 1e-6])
    c = rep.culprit
    assert c.index == 1 and c.mode == ACCUMULATED and "isolation" in c.note


def test_no_culprit_when_all_pass():
    rep = _report(acc=[0, 1e-7, 1e-6], iso=[0, 1e-7, 1e-7])
    assert rep.culprit is None and rep.passed and find_culprit(rep.layers) is None
    assert "culprit: none" in summary_text(rep)


def test_make_layer_needs_metrics():
    with pytest.raises(ValueError, match="no metrics"):
        make_layer(0, "a", "b", "conv", (1,), FP32)


# --- writers -----------------------------------------------------------------------------------

def test_json_round_trip_and_strict(tmp_path):
    rep = _report(acc=[0, 1e-7, 3e-4, 5e-3], iso=[0, 1e-7, 2e-3, 1e-7])
    assert rep.layers[0].metrics[ACCUMULATED]["psnr_db"] == math.inf
    p = tmp_path / "r.json"
    rep.to_json(p)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    d = json.loads(p.read_text(), parse_constant=no_constants)
    assert d["culprit"]["native"] == "down.2.res.0" and d["culprit"]["mode"] == ISOLATED
    assert d["passed"] is False and d["counts"]["fail"] == 2
    assert d["definitions"] == DEFINITIONS
    back = Report.from_json(p)
    assert back == rep
    assert back.culprit == rep.culprit
    assert back.layers[0].metrics[ACCUMULATED]["psnr_db"] == math.inf


def test_json_rejects_other_documents(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{}")
    with pytest.raises(ValueError, match="not a parity report"):
        Report.from_json(p)


def test_junit_valid_and_escaped(tmp_path):
    names = ['mid.attn<0>&"q"', "down.1.res.0", "down.1\x01ctl", "up.0.conv"]
    rep = _report(acc=[0, 3e-4, 1e-7, 1e-7], iso=[0, 3e-4, 1e-7, 1e-7], names=names)
    p = tmp_path / "r.xml"
    rep.to_junit(p)
    root = ET.parse(p).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 4 and suite.get("tests") == "4" and suite.get("failures") == "1"
    assert cases[0].get("name") == '0000 mid.attn<0>&"q"'
    assert cases[0].find("failure") is None
    fail = cases[1].find("failure")
    assert "accumulated: rel_l2=" in fail.get("message") and "isolated: rel_l2=" in fail.get("message")
    assert "input_blocks.2.0" in fail.text
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["dtype"] == "fp32" and props["inputs.seed"] == "0"
    assert "down.1.res.0" in props["culprit"]


def test_html_self_contained_with_chart_and_culprit(tmp_path):
    names = ["down.0.res.0", "down.1.attn.0<q>", "down.1.res.0", "up.0.conv"]
    rep = _report(acc=[0, 1e-7, 3e-4, 5e-3], iso=[0, 1e-7, 2e-3, float("nan")], names=names)
    p = tmp_path / "r.html"
    rep.to_html(p)
    text = p.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<svg" in text and "</svg>" in text
    assert "culprit: down.1.res.0 (input_blocks.3.0)" in text  # the chart's label
    assert "down.1.attn.0&lt;q&gt;" in text and "down.1.attn.0<q>" not in text
    assert not re.search(r"https?:|//[a-z]", text, re.I)
    assert "<script" not in text and "<link" not in text and "<img" not in text
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', text))
    for k in DEFINITIONS:
        assert f"<dt>{k}</dt>" in text
    assert "CPU generator seeded 0" in text and torch.__version__ in text
    # Failing points are red; the tolerance line is drawn.
    assert 'fill="#d62728"' in text and "tolerance 1e-05" in text
    ET.fromstring(chart_svg(rep))  # the SVG is well-formed XML on its own


def test_chart_draws_exact_zeros_apart_from_the_scale():
    """rel_l2 = 0 has no log value: hollow markers in a row under the lowest gridline, labelled and
    explained in the legend, never on a gridline like a real 1e-N."""
    rep = _report(acc=[0, 1e-6, 3e-4, 0], iso=[0, 1e-6, 1e-6, 1e-6])
    svg = ET.fromstring(chart_svg(rep))
    elements = list(svg.iter())

    def y(el):
        return float(el.get("cy")) if el.tag == "circle" else float(el.get("y")) + float(el.get("height")) / 2

    # Data points are the markers with a hover title (legend symbols have none).
    markers = [el for el in elements if el.tag in ("circle", "rect") and el.find("title") is not None]
    exact = [el for el in markers if el.get("class") == "exact"]
    assert len(exact) == 3 and all(el.get("fill") == "white" for el in exact)
    assert all("(exact)" in "".join(el.itertext()) for el in exact)
    grid = [float(el.get("y1")) for el in elements if el.tag == "line" and el.get("stroke") == "#e4e4e4"]
    on_scale = [y(el) for el in markers if el.get("class") != "exact"]
    assert len(on_scale) == 5
    zero_y = {y(el) for el in exact}
    assert len(zero_y) == 1 and min(zero_y) > max(grid) and min(zero_y) > max(on_scale)
    texts = ["".join(el.itertext()) for el in elements if el.tag == "text"]
    assert "exact (0)" in texts  # the row's label on the axis
    assert any(t.startswith("exact (0):") for t in texts)  # and in the legend

    plain = ET.fromstring(chart_svg(_report(acc=[1e-6, 3e-4])))
    assert not [el for el in plain.iter() if el.get("class") == "exact"]
    assert not any("exact (0)" in "".join(el.itertext()) for el in plain.iter())


@pytest.mark.parametrize("acc", [[], [0.0, 0.0], [float("inf"), 1e-3], [float("nan")]])
def test_chart_edge_cases(acc):
    rep = _report(acc=acc)
    ET.fromstring(chart_svg(rep))
    assert summary_text(rep).startswith("parity unet")


def test_summary_text():
    rep = _report(acc=[0, 1e-7, 3e-4, 5e-3, 6e-3], iso=[0, 1e-7, 1e-7, 2e-3, 1e-7])
    s = summary_text(rep, worst=2)
    lines = s.splitlines()
    assert lines[1].startswith("FAIL: 3 of 5 layers fail, 2 pass")
    assert "culprit: #3 down.3.res.0 (reference input_blocks.4.0, resnet) [isolated]" in s
    assert "first accumulated divergence: #2 down.2.res.0" in s
    worst = lines[lines.index(next(l for l in lines if l.startswith("worst"))) + 2:]
    assert len(worst) == 2 and worst[0].split()[0] == "4" and worst[1].split()[0] == "3"
    assert summary_text(_report(acc=[0, 0])).splitlines()[1].startswith("PASS")


def test_writers_take_numpy_scalars_and_arrays(tmp_path):
    # h5py gives attributes back as NumPy values (a dump's seed is a numpy int64): every writer takes them.
    rep = dataclasses.replace(_report(acc=[0, 3e-4]), inputs={
        "seed": np.int64(7), "scale": np.float32(7.5), "flag": np.bool_(True), "shape": np.array([2, 4, 8, 8]),
        "nested": {"t": np.int32(981), "bad": np.float64("nan")}})
    rep.to_json(tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["inputs"] == {"seed": 7, "scale": 7.5, "flag": True, "shape": [2, 4, 8, 8],
                           "nested": {"t": 981, "bad": "nan"}}
    rep.to_junit(tmp_path / "r.xml")
    props = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "r.xml").getroot().iter("property")}
    assert props["inputs.seed"] == "7" and props["inputs.shape"] == "[2, 4, 8, 8]"
    rep.to_html(tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text()
    assert "seed 7 " in text and "[2, 4, 8, 8]" in text
    assert "seed 7\n" in summary_text(rep)


def test_txt2img_json_takes_numpy(tmp_path):
    from sdport.parity import txt2img_report

    class Result:
        def to_dict(self):
            return {"inputs": {"seed": np.int64(42)}, "steps": [{"t": np.int64(981), "rel_l2": np.float32(0.5)}]}

    txt2img_report.write_json(Result(), tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text()) == {"inputs": {"seed": 42},
                                                              "steps": [{"t": 981, "rel_l2": 0.5}]}


def test_cli_compare_writes_every_report_from_the_golden_file(tmp_path):
    from click.testing import CliRunner

    from sdport.cli import main

    golden = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "fixtures", "golden", "sd-tiny-unet.stats.h5")
    j, x, h = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.html"
    r = CliRunner().invoke(main, ["parity", "compare", golden, golden, "--json", str(j), "--junit", str(x),
                                  "--html", str(h)])
    assert r.exit_code == 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    d = json.loads(j.read_text())
    assert d["passed"] is True and isinstance(d["inputs"]["seed"], int)
    assert ET.parse(x).getroot().tag == "testsuites"
    assert h.read_text().rstrip().endswith("</html>")


def test_cli_compare_checks_report_paths_first(tmp_path):
    from click.testing import CliRunner

    from sdport.cli import main

    golden = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "fixtures", "golden", "sd-tiny-unet.stats.h5")
    bad = tmp_path / "missing" / "r.xml"
    r = CliRunner().invoke(main, ["parity", "compare", golden, golden, "--junit", str(bad)])
    assert r.exit_code == 2 and r.stderr == f"error: --junit {bad}: output directory {bad.parent} does not exist\n"
    assert "PASS" not in r.stdout  # refused before the comparison ran


def test_cli_compare_report_options_have_help():
    from click.testing import CliRunner

    from sdport.cli import main

    text = CliRunner().invoke(main, ["parity", "compare", "--help"]).stdout
    for opt, words in (("--json", "JSON report"), ("--junit", "JUnit XML"), ("--html", "HTML report")):
        line = next(l for l in text.splitlines() if l.strip().startswith(opt))
        assert words in line, line


def test_reference_prints_stay_out_of_the_output(tmp_path):
    pytest.importorskip("ldm")
    from click.testing import CliRunner

    from sdport.cli import main

    ckpt = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fixtures", "tiny", "sd-tiny-fp16.ckpt")
    r = CliRunner().invoke(main, ["parity", "decoder", ckpt, "--dtype", "fp32"])
    assert r.exit_code in (0, 1), r.output
    assert r.stdout.startswith("parity decoder:"), r.stdout[:300]  # ldm's "making attention of type ..." is gone
    assert "making attention" not in r.output and "Working with z" not in r.output
