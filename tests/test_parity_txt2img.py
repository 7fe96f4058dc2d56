"""`sdport parity txt2img`: ldm's sampler against the native pipeline from one x_T, on the tiny fixtures."""
from __future__ import annotations

import json
import shutil

import h5py
import pytest
import torch
from PIL import Image

from sdport.models.samplers import linear_schedule
from sdport.parity.metrics import DEFAULT_TOLERANCES, IMAGE_PSNR_DB, METRICS
from sdport.parity.txt2img import reference_schedule

from conftest import run_cli

PROMPT = "a photograph of an astronaut riding a horse"
STEPS = 5


def _cli(ckpt, h5, *extra):
    return run_cli("parity", "txt2img", ckpt, "--h5", h5, "--prompt", PROMPT, "--steps", STEPS, *extra)


@pytest.mark.parametrize("sampler,eta,hw,layer_steps", [("plms", 0.0, (16, 16), "0,4"), ("ddim", 0.5, (16, 24), "2")])
def test_fp32_run_passes_with_a_report_per_step(variants, converted, tmp_path, sampler, eta, hw, layer_steps):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    rc, out, err = _cli(variants["lightning"], converted["lightning"], "--sampler", sampler, "--eta", eta,
                        "--height", hw[0], "--width", hw[1], "--layer-steps", layer_steps, "--json", js, "--png", png)
    assert rc == 0, out + err
    assert "\nPASS\n" in out
    r = json.loads(js.read_text())
    assert r["passed"] and r["failures"] == [] and r["settings"]["sampler"] == sampler
    assert r["gate"] == {"dtype": "fp32", "latent": r["gate"]["latent"], "image_psnr_db": IMAGE_PSNR_DB["fp32"]}
    assert r["gate"]["latent"]["rel_l2"] == DEFAULT_TOLERANCES["fp32"].rel_l2
    steps = r["steps"]
    assert [s["step"] for s in steps] == list(range(STEPS))
    assert [s["t"] for s in steps] == [801, 601, 401, 201, 1]  # ldm's uniform DDIM timesteps, descending
    for s in steps:
        for mode in ("free", "teacher_forced"):
            assert set(METRICS) <= set(s[mode]), (s["step"], mode)
            assert 0 < s[mode]["rel_l2"] < 1e-5  # not bit-equal (different kernels), well inside the gate
        assert s["teacher_forced"]["start_max_abs"] == 0.0  # PLMS' replayed history reproduces the reference
        assert s["failures"] == []
    # a non-degenerate image, the same on both sides
    assert r["image"]["reference_std"] > 0.05
    assert r["image"]["psnr_db"] >= IMAGE_PSNR_DB["fp32"] and set(METRICS) <= set(r["image"])
    assert [l["step"] for l in r["layers_at_steps"]] == [int(s) for s in layer_steps.split(",")]
    assert all(l["passed"] and l["culprit"] is None and l["report"]["counts"]["layers"] > 100
               for l in r["layers_at_steps"])
    with Image.open(png) as im:
        assert im.size == (3 * hw[1], hw[0])  # reference | native | heatmap
        assert "white =" in im.text["sdport:diff_scale"] and im.text["prompt"] == PROMPT


def _planted(h5_path, tmp_path) -> str:
    """A copy of the layout with one ResBlock's conv2 weight scaled by 1.01."""
    h5 = str(tmp_path / "planted.h5")
    shutil.copy(h5_path, h5)
    with h5py.File(h5, "r+") as f:
        d = f["unet"]["down.0.res.0.conv2.weight"]
        d[...] = d[...] * 1.01
    return h5


def test_planted_unet_fault_fails_and_is_named(variants, converted, tmp_path):
    # conv2 of a ResBlock: its output joins the skip path. (conv1 scaled by 1.01 is caught layer by layer,
    # but the GroupNorm after it all but undoes a uniform scale: the latents stay within 1e-5.)
    h5 = _planted(converted["lightning"], tmp_path)
    js = tmp_path / "r.json"
    rc, out, err = _cli(variants["lightning"], h5, "--height", 16, "--width", 16, "--layer-steps", "2", "--json", js)
    assert rc == 1, out + err
    r = json.loads(js.read_text())
    assert not r["passed"]
    # every step but the last fails alone: at t = 1 the update hardly depends on eps (alpha-bar ~ 1)
    assert all(s["failures"] and s["failures"][0].startswith("rel_l2=") for s in r["steps"][:-1])
    (layers,) = r["layers_at_steps"]
    assert layers["step"] == 2 and not layers["passed"]
    assert layers["culprit"].startswith("#") and " down.0.res.0.conv2 (reference input_blocks.1.0.out_layers.3" \
        in layers["culprit"]
    assert "culprit: #" in out and "down.0.res.0.conv2" in out
    assert "\nFAIL: " in out


def test_bf16_fails_the_fp32_gate_with_a_report(variants, converted, tmp_path):
    js = tmp_path / "r.json"
    rc, out, err = _cli(variants["lightning"], converted["lightning"], "--height", 16, "--width", 16, "--dtype", "bf16",
                        "--gate", "fp32", "--layer-steps", "none", "--json", js)
    assert rc == 1, out + err
    r = json.loads(js.read_text())
    assert r["dtype"] == "bf16" and r["gate"]["dtype"] == "fp32" and not r["passed"]
    assert len(r["steps"]) == STEPS and r["layers_at_steps"] == []
    assert any(f.startswith("image: image psnr_db=") for f in r["failures"])
    # the same figures are within bf16's own gate
    tf = max(s["teacher_forced"]["rel_l2"] for s in r["steps"])
    assert 1e-5 < tf <= DEFAULT_TOLERANCES["bf16"].rel_l2
    assert IMAGE_PSNR_DB["bf16"] <= r["image"]["psnr_db"] < IMAGE_PSNR_DB["fp32"]


@pytest.mark.parametrize("args,message", [
    (("--height", "30"), "--height 30 is not a positive multiple of 4"),
    (("--steps", "0"), "--steps 0"),
    (("--steps", "3"), "--steps 3: 3 steps with ldm spacing put the last timestep at 1000"),
    (("--steps", "3"), "nearest counts it takes: 2 or 4; --spacing linspace|leading|trailing runs exactly 3"),
    (("--eta", "0.5"), "eta 0.5: PLMS is deterministic"),
    (("--layer-steps", "7"), "--layer-steps 7: this run has 5 steps"),
    (("--dtype", "fp8"), "--dtype fp8: expected one of"),
])
def test_bad_input_is_one_line_and_exit_2(variants, converted, args, message):
    rc, out, err = run_cli("parity", "txt2img", variants["lightning"], "--h5", converted["lightning"], "--prompt", "x",
                           "--steps", STEPS, "--height", 16, "--width", 16, *args)
    assert rc == 2, out + err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_reference_schedule_follows_the_native_rule(variants):
    # float32 buffers as stored
    stored = torch.load(variants["lightning"], map_location="cpu", weights_only=True)["state_dict"]
    buffers, note = reference_schedule(variants["lightning"])
    assert note is None and torch.equal(buffers["alphas_cumprod"], stored["alphas_cumprod"])
    # float16 buffers that round the linear schedule: the exact linear schedule, from ldm's own code,
    # which is the native pipeline's linear_schedule() bit for bit
    buffers, note = reference_schedule(variants["fp16"])
    assert "float16" in note
    assert torch.equal(buffers["alphas_cumprod"], linear_schedule().alphas_cumprod)


def test_sampler_is_a_choice(variants, converted):
    rc, out, err = run_cli("parity", "txt2img", variants["lightning"], "--h5", converted["lightning"], "--prompt", "x",
                           "--sampler", "euler")
    assert rc == 2 and "'euler' is not one of 'plms', 'ddim'" in err, err


def test_other_spacing_runs_exactly_the_steps_asked_on_both_sides(variants, converted, tmp_path):
    from click.testing import CliRunner

    from sdport.cli import main

    js = tmp_path / "r.json"
    long = PROMPT + " in a field" * 30  # 8 + 90 tokens: the last 23 are cut, and the run says so
    r = CliRunner().invoke(main, ["parity", "txt2img", variants["lightning"], "--h5", converted["lightning"],
                                  "--prompt", long, "--steps", "3", "--spacing", "trailing", "--sampler", "ddim",
                                  "--height", "16", "--width", "16", "--layer-steps", "none", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "parity txt2img: ddim 3 steps (eta 0.0)," in r.stdout
    d = json.loads(js.read_text())
    assert d["settings"]["spacing"] == "trailing" and d["settings"]["latent_steps"] == 3
    # diffusers' trailing timesteps, descending; ldm's sampler ran on the same ones
    assert [s["t"] for s in d["steps"]] == d["inputs"]["timesteps"] == [999, 666, 332]
    assert all(0 < s["teacher_forced"]["rel_l2"] < 1e-5 for s in d["steps"])
    assert [line for line in r.stderr.splitlines() if line.startswith("warning: the prompt")] == [
        "warning: the prompt has 98 tokens; the text encoder sees the first 75, the last 23 are cut: "
        "'a field in a field in a field in a field in a field in a ...'"]


@pytest.mark.parametrize("option,name", [("--json", "r.json"), ("--png", "r.png"), ("--html", "r.html")])
def test_output_paths_are_checked_before_the_run(tmp_path, monkeypatch, option, name):
    from click.testing import CliRunner

    import sdport.parity.txt2img as T
    from sdport.cli import main

    def ran(*a, **k):
        raise AssertionError("the run started before the output paths were checked")

    monkeypatch.setattr(T, "run_txt2img", ran)
    ckpt = str(tmp_path / "any.ckpt")
    path = tmp_path / "missing" / name
    r = CliRunner().invoke(main, ["parity", "txt2img", ckpt, "--prompt", "x", option, str(path)])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.exception
    assert r.stderr == f"error: {option} {path}: output directory {path.parent} does not exist\n"
    # the folder of --out takes the default names; one that cannot be made is an error before the run too
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = CliRunner().invoke(main, ["parity", "txt2img", ckpt, "--prompt", "x", "--out", str(blocker / "sub")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def _dpm_run(ckpt, h5, tmp_path, steps=STEPS, sampler="dpmpp2m"):
    js = tmp_path / "r.json"
    rc, out, err = run_cli("parity", "txt2img", ckpt, "--h5", h5, "--prompt", PROMPT, "--steps", steps,
                           "--sampler", sampler, "--height", 16, "--width", 16, "--layer-steps", "1", "--json", js)
    return rc, out, err, json.loads(js.read_text()) if js.exists() else None


def _check_dpm_report(r, steps=STEPS):
    assert r["passed"] and r["settings"]["sampler"] == "dpmpp2m" and r["settings"]["latent_steps"] == steps
    # ldm's time-uniform continuous steps from t = 1 to 1/N: fractional UNet timesteps, 999 down
    ts = [s["t"] for s in r["steps"]]
    assert ts[0] == 999.0 and all(a > b for a, b in zip(ts, ts[1:])) and any(t != int(t) for t in ts)
    for s in r["steps"]:
        assert 0 <= s["free"]["rel_l2"] < 1e-5 and 0 <= s["teacher_forced"]["rel_l2"] < 1e-5, s
        assert s["teacher_forced"]["start_max_abs"] == 0.0  # the replayed eps rebuild ldm's x0 history exactly
    assert r["image"]["reference_std"] > 0.05 and r["image"]["psnr_db"] >= IMAGE_PSNR_DB["fp32"]
    assert [l["step"] for l in r["layers_at_steps"]] == [1] and r["layers_at_steps"][0]["passed"]


def test_dpmpp2m_against_ldms_dpm_solver_sampler(variants, converted, tmp_path):
    rc, out, err, r = _dpm_run(variants["lightning"], converted["lightning"], tmp_path)
    assert rc == 0, out + err
    assert "\nPASS\n" in out and "parity txt2img: dpmpp2m 5 steps," in out
    _check_dpm_report(r)


@pytest.fixture(scope="module")
def v_h5(variants, tmp_path_factory):
    from sdport.convert.convert import convert

    return convert(variants["v2"], str(tmp_path_factory.mktemp("v") / "v.h5"), prediction="v").out


def test_dpmpp2m_on_a_v_model_against_ldms_dpm_solver_sampler(variants, v_h5, tmp_path):
    rc, out, err, r = _dpm_run(variants["v2"], v_h5, tmp_path)
    assert rc == 0, out + err
    _check_dpm_report(r)


def test_ddim_on_a_v_model_teacher_forced_steps_convert_v(variants, v_h5, tmp_path):
    # the teacher-forced native step uses the pipeline's own denoiser, v converted to eps as ldm's DDIM does
    rc, out, err, r = _dpm_run(variants["v2"], v_h5, tmp_path, sampler="ddim")
    assert rc == 0, out + err
    assert r["passed"] and all(s["teacher_forced"]["rel_l2"] < 1e-5 for s in r["steps"])


def test_dpmpp2m_planted_unet_fault_fails(variants, converted, tmp_path):
    h5 = _planted(converted["lightning"], tmp_path)
    rc, out, err, r = _dpm_run(variants["lightning"], h5, tmp_path)
    assert rc == 1, out + err
    assert not r["passed"] and r["steps"][0]["failures"] and not r["layers_at_steps"][0]["passed"]


@pytest.mark.parametrize("args,message", [
    (("--eta", "0.5"), "eta 0.5: DPM-Solver++(2M) is deterministic"),
    (("--spacing", "trailing"), "--spacing trailing: dpmpp2m steps uniformly in continuous time"),
    (("--steps", "1"), "--steps 1: dpmpp2m needs at least 2 steps"),
])
def test_dpmpp2m_bad_input_is_one_line_and_exit_2(variants, converted, args, message):
    rc, out, err = run_cli("parity", "txt2img", variants["lightning"], "--h5", converted["lightning"], "--prompt", "x",
                           "--sampler", "dpmpp2m", "--height", 16, "--width", 16, *args)
    assert rc == 2, out + err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
