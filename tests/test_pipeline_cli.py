"""`sdport tokenize`, `txt2img`, `img2img` and `inpaint` on the tiny fixtures (small sizes, few steps)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from conftest import run_cli
from sdport.cli import main
from sdport.models import images
from sdport.models.tokenizer import END, START


def cli(*args):
    """In-process run: (exit code, stdout, stderr)."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def write_png(path, rgb: np.ndarray) -> str:
    Image.fromarray(rgb, "RGB").save(path)
    return str(path)


def smooth_rgb(h=16, w=16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8), "RGB")
    return np.asarray(small.resize((w, h), Image.BILINEAR)).copy()


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# tokenize
# ---------------------------------------------------------------------------------------------


def test_tokenize_text_and_json():
    code, out, _ = cli("tokenize", "a photo of a cat")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "5 prompt token(s) of 75; not cut"
    ids = [int(x) for x in lines[1].split(":", 1)[1].split()]
    assert len(ids) == 77 and ids[:7] == [START, 320, 1125, 539, 320, 2368, END] and ids[7:] == [END] * 70
    assert lines[2] == "tokens: <|startoftext|> a</w> photo</w> of</w> a</w> cat</w> <|endoftext|> + 70 x <|endoftext|> (padding)"

    code, out, _ = cli("tokenize", "a photo of a cat", "--json")
    rec = json.loads(out)
    assert rec["ids"] == ids and len(rec["tokens"]) == 77 and rec["truncated"] is False and rec["dropped"] == 0


def test_tokenize_says_when_a_prompt_is_cut():
    prompt = " ".join(["red"] * 74 + ["green", "blue", "end"])
    code, out, _ = cli("tokenize", prompt)
    assert code == 0
    assert out.splitlines()[0] == "77 prompt token(s) of 75; CUT: the last 2 do not reach the text encoder: 'blue end'"
    rec = json.loads(cli("tokenize", prompt, "--json")[1])
    assert rec["truncated"] and rec["dropped"] == 2 and rec["ids"][-1] == END and len(rec["ids"]) == 77


def test_tokenize_file_prints_one_json_line_per_prompt(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a cat\n\nfish &amp; chips 🍟\n" + "word " * 100 + "\n", "utf-8")
    code, out, _ = cli("tokenize", "--file", f)
    assert code == 0
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 3, 4]
    assert recs[1]["ids"] == [START] + [END] * 76
    assert recs[2]["prompt"] == "fish &amp; chips 🍟" and "&</w>" in recs[2]["tokens"]
    assert [r["truncated"] for r in recs] == [False, False, False, True]


def test_tokenize_needs_exactly_one_input(tmp_path):
    assert cli("tokenize")[0] == 2
    f = tmp_path / "p.txt"
    f.write_text("x\n")
    assert cli("tokenize", "x", "--file", f)[0] == 2


# ---------------------------------------------------------------------------------------------
# txt2img, img2img, inpaint
# ---------------------------------------------------------------------------------------------


def test_txt2img_writes_a_png_with_its_parameters(converted, tmp_path):
    model = converted["lightning"]
    out = tmp_path / "a.png"
    code, stdout, stderr = run_cli("txt2img", model, "a red cube", "--negative", "blurry", "--steps", 4,
                                   "--seed", 9, "--height", 16, "--width", 24, "-o", out)
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out}: 24x16")
    assert pixels(out).shape == (16, 24, 3)
    text = images.read_png_text(out)
    assert text["prompt"] == "a red cube" and text["negative"] == "blurry"
    assert (text["seed"], text["steps"], text["sampler"], text["scale"], text["size"]) == ("9", "4", "plms", "7.5", "24x16")
    assert text["model_sha256"] == sha256(model)
    assert text["source_sha256"] and text["sdport:mode"] == "txt2img"

    # the same seed gives the same picture; another seed does not
    again, other = tmp_path / "b.png", tmp_path / "c.png"
    args = [model, "a red cube", "--negative", "blurry", "--steps", 4, "--height", 16, "--width", 24]
    assert cli("txt2img", *args, "--seed", 9, "-o", again)[0] == 0
    assert cli("txt2img", *args, "--seed", 10, "-o", other)[0] == 0
    assert np.array_equal(pixels(out), pixels(again)) and not np.array_equal(pixels(out), pixels(other))


def test_txt2img_ddim_bf16_low_memory_from_an_fp16_file(converted, tmp_path):
    out = tmp_path / "d.png"
    code, _, stderr = cli("txt2img", converted["fp16"], "x", "--sampler", "ddim", "--eta", 0.3, "--steps", 4,
                          "--height", 16, "--width", 16, "--dtype", "bf16", "--low-memory", "-o", out)
    assert code == 0, stderr
    # the fp16 source rounded its schedule buffers; the command says what it used instead
    assert "note: " in stderr and "stored in float16" in stderr and "exact float32" in stderr
    text = images.read_png_text(out)
    assert text["sampler"] == "ddim" and text["eta"] == "0.3" and text["dtype"] == "bf16"


def test_img2img_runs_from_an_init_png(converted, tmp_path):
    init = write_png(tmp_path / "in.png", smooth_rgb(16, 24))
    out = tmp_path / "out.png"
    code, stdout, stderr = cli("img2img", converted["lightning"], "a boat", "--init", init, "--strength", 0.5,
                               "--steps", 6, "-o", out)
    assert code == 0, stderr
    assert pixels(out).shape == (16, 24, 3)
    text = images.read_png_text(out)
    assert text["strength"] == "0.5" and text["sampler"] == "ddim" and text["scale"] == "5.0"
    # strength 0.5 of 6 steps: 3 DDIM steps from the noised init, so the picture keeps much of the init
    diff = np.abs(pixels(out).astype(int) - smooth_rgb(16, 24).astype(int)).mean()
    assert 0 < diff < 128


def test_dpmpp2m_is_a_sampler_choice_of_txt2img_and_inpaint(converted, tmp_path):
    from sdport import cli as C
    from sdport.models import pipeline

    assert C.SAMPLERS == list(pipeline.SAMPLERS)
    model, out = converted["lightning"], tmp_path / "d.png"
    code, stdout, stderr = cli("txt2img", model, "a red cube", "--sampler", "dpmpp2m", "--steps", 3,
                               "--height", 16, "--width", 16, "-o", out)
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out}: 16x16, dpmpp2m 3 steps")
    text = images.read_png_text(out)
    assert (text["sampler"], text["steps_run"], text["spacing"]) == ("dpmpp2m", "3", "time_uniform")
    assert "eta" not in text
    rgb = smooth_rgb(16, 16)
    rgb[4:12, 4:12] = (0, 255, 0)
    init, painted = write_png(tmp_path / "in.png", rgb), tmp_path / "p.png"
    code, _, stderr = cli("inpaint", model, "a window", "--init", init, "--steps", 4, "--sampler", "dpmpp2m",
                          "-o", painted)
    assert code == 0, stderr
    assert not np.all(pixels(painted)[4:12, 4:12] == (0, 255, 0))
    assert images.read_png_text(painted)["sampler"] == "dpmpp2m"
    args = [model, "x", "--sampler", "dpmpp2m", "--height", 16, "--width", 16, "-o", tmp_path / "e.png"]
    one_line_error(cli("txt2img", *args, "--eta", 0.5), "eta 0.5: DPM-Solver++(2M) is deterministic")
    one_line_error(cli("txt2img", *args, "--spacing", "leading"), "--spacing leading: dpmpp2m")
    one_line_error(cli("txt2img", *args, "--steps", 1), "--steps 1: dpmpp2m needs at least 2 steps")
    code, _, stderr = cli("txt2img", model, "x", "--sampler", "dpmpp2m-karras", "-o", tmp_path / "k.png")
    assert code == 2 and "'dpmpp2m-karras' is not one of 'plms', 'ddim', 'dpmpp2m'" in stderr


def test_inpaint_green_region_with_a_plain_model(converted, tmp_path):
    rgb = smooth_rgb(16, 16)
    rgb[4:12, 4:12] = (0, 255, 0)
    init = write_png(tmp_path / "in.png", rgb)
    out = tmp_path / "out.png"
    code, _, stderr = cli("inpaint", converted["lightning"], "a window", "--init", init, "--steps", 4, "-o", out)
    assert code == 0, stderr
    result = pixels(out)
    assert result.shape == (16, 16, 3)
    assert not np.all(result[4:12, 4:12] == (0, 255, 0)), "the green square was not repainted"
    assert images.read_png_text(out)["sdport:mode"] == "inpaint"


def test_inpaint_with_the_inpainting_model_mask_file_and_no_prompt(converted, tmp_path):
    init = write_png(tmp_path / "in.png", smooth_rgb(16, 16))
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[2:9, 6:14] = 255
    mask_path = write_png(tmp_path / "mask.png", mask)
    out = tmp_path / "out.png"
    code, _, stderr = cli("inpaint", converted["inpaint"], "--init", init, "--mask", mask_path, "--steps", 4,
                          "--sampler", "ddim", "-o", out)
    assert code == 0, stderr
    assert pixels(out).shape == (16, 16, 3)
    assert images.read_png_text(out)["prompt"] == ""


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit code 2
# ---------------------------------------------------------------------------------------------


def one_line_error(result, *needles):
    code, _, stderr = result
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_generation_errors(converted, tmp_path):
    model = converted["lightning"]
    out = tmp_path / "o.png"
    one_line_error(cli("txt2img", model, "x", "--height", 18, "--width", 16, "-o", out),
                   "--height 18 is not a positive multiple of 4", "try 16 or 20")
    one_line_error(cli("txt2img", model, "x", "--dtype", "fp16", "-o", out), "fp16", "bf16")
    one_line_error(cli("txt2img", model, "x", "--steps", 3, "--height", 16, "--width", 16, "-o", out),
                   "--steps 3", "past the schedule")
    one_line_error(cli("txt2img", tmp_path / "missing.h5", "x", "-o", out), "missing.h5")
    one_line_error(cli("txt2img", model, "x", "-o", tmp_path / "nodir" / "o.png"), "does not exist")
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"")
    one_line_error(cli("txt2img", model, "x", "-o", existing), "already exists", "--force")

    plain = write_png(tmp_path / "plain.png", smooth_rgb(16, 16))
    one_line_error(cli("inpaint", model, "x", "--init", plain, "-o", out), "nothing to repaint")
    one_line_error(cli("img2img", model, "x", "--init", plain, "--width", 32, "-o", out),
                   "16x16", "does not resize")
    odd = write_png(tmp_path / "odd.png", smooth_rgb(16, 16)[:, :14])
    one_line_error(cli("img2img", model, "x", "--init", odd, "-o", out), "init image width 14")
    small_mask = write_png(tmp_path / "m.png", np.full((8, 8, 3), 255, np.uint8))
    one_line_error(cli("inpaint", model, "x", "--init", plain, "--mask", small_mask, "-o", out), "same size")
    one_line_error(cli("img2img", converted["inpaint"], "x", "--init", plain, "-o", out), "sdport inpaint")
    assert not out.exists()


def test_non_finite_floats_are_refused(converted, tmp_path):
    model = converted["lightning"]
    out = tmp_path / "o.png"
    plain = write_png(tmp_path / "plain.png", smooth_rgb(16, 16))
    for value in ("nan", "inf", "-inf", "NaN", "Infinity"):
        one_line_error(cli("txt2img", model, "x", "--scale", value, "-o", out), f"--scale {value}", "finite")
        one_line_error(cli("img2img", model, "x", "--init", plain, "--strength", value, "-o", out),
                       f"--strength {value}", "finite")
    one_line_error(cli("img2img", model, "x", "--init", plain, "--scale", "nan", "-o", out), "--scale nan")
    one_line_error(cli("inpaint", model, "x", "--init", plain, "--scale", "inf", "-o", out), "--scale inf")
    one_line_error(cli("txt2img", model, "x", "--eta", "nan", "--sampler", "ddim", "-o", out), "--eta nan")
    assert not out.exists()
    # In a real process too: one line on stderr, exit 2, nothing on stdout.
    rc, stdout, err = run_cli("txt2img", model, "x", "--scale", "nan", "-o", out)
    assert (rc, stdout, err) == (2, "", "error: --scale nan: expected a finite number\n")


def test_steps_and_spacing_report_the_steps_run(converted, tmp_path):
    model = converted["lightning"]
    args = [model, "x", "--height", 16, "--width", 16]
    # ldm spacing refuses 3 steps: the message names the nearest counts it takes and the option
    one_line_error(cli("txt2img", *args, "--steps", 3, "-o", tmp_path / "r.png"),
                   "--steps 3", "nearest counts it takes: 2 or 4", "--spacing linspace|leading|trailing")
    # the other spacings run exactly the count asked
    out = tmp_path / "t.png"
    code, stdout, stderr = cli("txt2img", *args, "--steps", 3, "--spacing", "trailing", "-o", out)
    assert code == 0, stderr
    assert "plms 3 steps," in stdout and "note: --steps" not in stderr
    text = images.read_png_text(out)
    assert (text["steps"], text["steps_run"], text["spacing"]) == ("3", "3", "trailing")
    # ldm spacing with 30 steps runs 31 (stride 33): the output says the real count
    out = tmp_path / "l.png"
    code, stdout, stderr = cli("txt2img", *args, "--steps", 30, "--sampler", "ddim", "-o", out)
    assert code == 0, stderr
    assert "ddim 31 steps (--steps 30, ldm spacing)" in stdout
    assert "note: --steps 30 with ldm spacing runs 31 steps" in stderr
    assert images.read_png_text(out)["steps_run"] == "31"
    # img2img: int(strength * steps) of them
    init = write_png(tmp_path / "in.png", smooth_rgb(16, 16))
    code, stdout, stderr = cli("img2img", model, "x", "--init", init, "--steps", 7, "--spacing", "linspace",
                               "--strength", 0.5, "-o", tmp_path / "i.png")
    assert code == 0, stderr
    assert "ddim 3 of 7 steps (strength 0.5)" in stdout


def test_a_cut_prompt_is_said_in_one_line(converted, tmp_path):
    long = " ".join(["red"] * 74 + ["green", "blue", "end"])  # 77 tokens: the last 2 are cut
    code, _, stderr = cli("txt2img", converted["lightning"], long, "--negative", "dull " * 80, "--steps", 2,
                          "--height", 16, "--width", 16, "-o", tmp_path / "a.png")
    assert code == 0, stderr
    cut = [line for line in stderr.splitlines() if line.startswith("warning: the prompt")]
    assert cut == ["warning: the prompt has 77 tokens; the text encoder sees the first 75, the last 2 are cut: "
                   "'blue end'"]
    assert any(line.startswith("warning: the negative prompt has 80 tokens") for line in stderr.splitlines())
    init = write_png(tmp_path / "in.png", smooth_rgb(16, 16))
    for cmd in ("img2img", "inpaint"):
        extra = ["--strength", 0.5] if cmd == "img2img" else ["--mask", init]
        code, _, stderr = cli(cmd, converted["lightning"], long, "--init", init, "--steps", 2, *extra,
                              "-o", tmp_path / f"{cmd}.png")
        assert code == 0, stderr
        assert "warning: the prompt has 77 tokens" in stderr, cmd
    # a prompt that fits says nothing
    code, _, stderr = cli("txt2img", converted["lightning"], "a red cube", "--steps", 2, "--height", 16,
                          "--width", 16, "-o", tmp_path / "b.png")
    assert code == 0 and "warning" not in stderr


def test_txt2img_size_defaults_to_the_models_own(converted, tmp_path):
    from sdport.models import pipeline

    model = converted["lightning"]
    with pipeline.Models(model) as m:
        side = m.config("unet").sample_size * m.config("decoder").downscale
        assert m.config("unet").sample_size == 16  # the tiny preset
    from sdport.models.unet import UNetConfig

    assert UNetConfig.sd_v1().sample_size * 8 == 512  # SD v1: 64 latent pixels through the VAE's factor 8
    out = tmp_path / "a.png"
    code, stdout, stderr = cli("txt2img", model, "x", "--steps", 2, "-o", out)
    assert code == 0, stderr
    assert side != 512 and pixels(out).shape == (side, side, 3) and f": {side}x{side}," in stdout
    # one side given: the other follows it
    code, stdout, stderr = cli("txt2img", model, "x", "--steps", 2, "--height", 16, "-o", tmp_path / "b.png")
    assert code == 0 and pixels(tmp_path / "b.png").shape == (16, 16, 3), stderr
