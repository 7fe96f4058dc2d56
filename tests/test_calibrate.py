"""`--calibrate`: gates at no less than twice the reference's own fp32 noise floor, the floor measured
against the reference in float64 on the same inputs (parity/calibrate.py)."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

from sdport.parity import calibrate, harness
from sdport.parity.metrics import DEFAULT_TOLERANCES
from sdport.parity.report import Report, make_layer

from conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

FP32 = DEFAULT_TOLERANCES["fp32"]
SMALL = {"batch": 1, "size": 8}  # an 8x8 latent: every decoder layer, a quarter of the work


def test_a_widened_gate_moves_every_bound_by_the_same_factor():
    assert calibrate.widened(FP32, 4e-6) is None  # 2 x floor is under the fixed bound
    w = calibrate.widened(FP32, 1e-5)
    assert w.rel_l2 == pytest.approx(2e-5)
    assert w.psnr_db == pytest.approx(FP32.psnr_db - 20 * math.log10(2))
    assert 1 - w.cosine == pytest.approx((1 - FP32.cosine) * 4)
    assert calibrate.widened(FP32, math.nan) is None
    assert calibrate.widened(FP32.replace(rel_l2=None), 1.0) is None


def _result(rows):
    layers = tuple(make_layer(i, n, n, "conv", (1,), FP32, accumulated=m, isolated=m)
                   for i, (n, m) in enumerate(rows))
    return harness.ParityResult(Report("decoder", ("accumulated", "isolated"), "fp32", "cpu", FP32, {}, {}, layers),
                                {}, {})


def _m(rel):
    return {"rel_l2": rel, "cosine": 1 - rel ** 2 / 2, "psnr_db": 200.0, "nonfinite": 0}


def test_each_layer_is_gated_at_its_own_floor_and_the_culprit_follows():
    r = _result([("a", _m(1.5e-5)), ("b.{to_k,to_v}", _m(1.5e-5)), ("c", _m(3e-5)), ("d", _m(1.2e-5))])
    assert r.report.culprit.native == "a"
    floors = {"a": {"accumulated": 1e-5, "isolated": 1e-5},
              "b.to_k": {"accumulated": 2e-6, "isolated": 2e-6}, "b.to_v": {"accumulated": 1e-5, "isolated": 1e-5},
              "c": {"accumulated": 1e-5, "isolated": 1e-5}}
    c = calibrate.calibrate(r, floors).report
    status = {l.native: l.status for l in c.layers}
    # a: 1.5 floors (pass); b: fused, the larger part's floor (pass); c: 3 floors (fail); d: no floor,
    # fixed gate (fail)
    assert status == {"a": "pass", "b.{to_k,to_v}": "pass", "c": "fail", "d": "fail"}
    assert c.culprit.native == "c" and "rel_l2=3e-05 > 2e-05" in c.culprit.failures
    cal = c.inputs["calibration"]
    assert cal["layers_without"] == ["d"] and set(cal["widened"]) == {"a", "b.{to_k,to_v}", "c"}
    assert cal["floors"]["b.{to_k,to_v}"]["isolated"] == 1e-5


def test_the_floor_is_the_reference_against_itself_in_float64(variants):
    """The floors in the report are measured, not assumed: the decoder's output floor equals an
    independent fp32-vs-fp64 run of ldm's decoder, and every layer's floor is above zero (a float64
    run that silently stayed fp32 would show exactly 0) and far under the fixed bound on tiny models."""
    from sdport.parity.reference.load import load_reference

    ckpt = variants["lightning"]
    r = harness.run_parity("decoder", ckpt, port="diffusers", calibrate=True, **SMALL)
    assert r.report.passed
    floors = r.report.inputs["calibration"]["floors"]
    assert len(floors) == len(r.report.layers)
    ref, cfg, fmt = load_reference("decoder", ckpt)
    latent = harness.draw_inputs("decoder", cfg, **SMALL)[0]["latent"]
    with torch.no_grad():
        r32 = ref.decode(latent).double()
        r64 = calibrate.ReferencePort("decoder", ref, fmt)(latent)
    assert r64.dtype == torch.float64
    want = float((r32 - r64).norm() / r64.norm())
    assert floors["(model)"]["accumulated"] == pytest.approx(want, rel=1e-3)
    assert all(0 < v < 1e-5 for f in floors.values() for v in f.values()), floors


PORT = textwrap.dedent('''
    import torch
    from sdport.parity.ports.diffusers import build


    def clean(checkpoint, component):
        return build(checkpoint, component)


    def conv_1e4(checkpoint, component):
        m = build(checkpoint, component)
        with torch.no_grad():
            m.decoder.up_blocks[1].resnets[0].conv1.weight.mul_(1 + 1e-4)
        return m
''')


def test_a_small_planted_fault_still_fails_calibrated_and_a_clean_port_passes(variants, tmp_path):
    port = tmp_path / "port.py"
    port.write_text(PORT)
    ckpt = variants["lightning"]
    clean = harness.run_parity("decoder", ckpt, port=f"torch:{port}:clean", calibrate=True, **SMALL)
    assert clean.report.passed
    bad = harness.run_parity("decoder", ckpt, port=f"torch:{port}:conv_1e4", calibrate=True, **SMALL)
    c = bad.report.culprit
    assert not bad.report.passed and c.mode == "isolated" and c.native == "decoder.up_blocks.1.resnets.0.conv1", c


def test_native_unet_calibrated_reports_its_floors_in_every_summary(variants, tmp_path):
    code, out, err = run_cli("parity", "unet", variants["lightning"], "--calibrate", "--batch", "1", "--size", "8",
                             "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "gates calibrated:" in out and "noise floor" in out
    rep = Report.from_json(tmp_path / "r.json")
    cal = rep.inputs["calibration"]
    # fused native layers (q/k/v) take their parts' floors
    assert any(k.endswith("{to_q,to_k,to_v}") for k in cal["floors"])
    assert cal["layers_with_a_floor"] >= 0.9 * len(rep.layers)


def test_a_dump_cannot_be_calibrated(variants, tmp_path):
    code, out, err = run_cli("parity", "decoder", variants["lightning"], "--port", f"dump:{tmp_path / 'd.h5'}",
                             "--calibrate")
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "--calibrate" in err
