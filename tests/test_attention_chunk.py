"""`--attention-chunk N` on the generation commands: it reaches every UNet attention call, leaves the
image as it was (up to fp32 rounding), and refuses N < 1 in one line."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from sdport.cli import main
from sdport.models import pipeline, unet
from sdport.models.errors import SdportError

# 16x16 images: the tiny UNet attends over 8x8 = 64 latent tokens, so a chunk of 7 leaves a remainder
ARGS = ["a red cube", "--steps", 4, "--height", 16, "--width", 16, "--seed", 3]


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


@pytest.fixture
def seen_chunks(monkeypatch):
    """The chunk argument of every attention call the UNet makes."""
    seen = []
    real = unet.attend

    def spy(q, k, v, chunk, *rest):
        seen.append(chunk)
        return real(q, k, v, chunk, *rest)

    monkeypatch.setattr(unet, "attend", spy)
    return seen


def test_txt2img_attention_chunk_reaches_the_unet_and_keeps_the_image(converted, tmp_path, seen_chunks):
    model = converted["lightning"]
    whole, chunked = tmp_path / "whole.png", tmp_path / "chunked.png"
    assert cli("txt2img", model, *ARGS, "-o", whole)[0] == 0
    assert seen_chunks and set(seen_chunks) == {None}
    seen_chunks.clear()
    code, _, stderr = cli("txt2img", model, *ARGS, "--attention-chunk", 7, "-o", chunked)
    assert code == 0, stderr
    assert seen_chunks and set(seen_chunks) == {7}
    # Same math per query row; only the kernel's blocking (summation order) can differ, so the 8-bit
    # pixels may move by at most one level where a value sits on a rounding boundary.
    diff = np.abs(pixels(whole) - pixels(chunked))
    assert diff.max() <= 1, diff.max()


def test_chunked_latent_is_the_unchunked_one_within_fp32_rounding(converted):
    req = pipeline.Request(prompt="a red cube", steps=4, height=16, width=16)
    latents = {}
    for chunk in (None, 1, 7):
        with pipeline.Models(converted["lightning"], attention_chunk=chunk) as models:
            latents[chunk] = list(pipeline.txt2img(models, req))[-1].double()
    ref = latents[None]
    for chunk in (1, 7):
        assert float((latents[chunk] - ref).norm() / ref.norm()) <= 1e-5  # the fp32 gate of the parity checks


def test_low_memory_reload_keeps_the_chunk(converted):
    with pipeline.Models(converted["lightning"], low_memory=True, attention_chunk=5) as models:
        for _ in range(2):  # each use loads the UNet afresh in low-memory mode
            with models.use("unet") as u:
                chunks = {m.chunk for m in u.modules() if isinstance(m, (unet.SelfAttention, unet.CrossAttention))}
            assert chunks == {5}
        with models.use("text_model"):
            pass  # other components take no chunk and do not fail


def test_img2img_and_inpaint_take_the_option(converted, tmp_path, seen_chunks):
    from PIL import Image

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (200, 40, 40)
    rgb[4:12, 4:12] = (0, 255, 0)  # the region inpaint repaints
    init = tmp_path / "in.png"
    Image.fromarray(rgb, "RGB").save(init)
    out = tmp_path / "out.png"
    code, _, stderr = cli("img2img", converted["lightning"], "a boat", "--init", init, "--steps", 4,
                          "--attention-chunk", 9, "-o", out)
    assert code == 0, stderr
    code, _, stderr = cli("inpaint", converted["inpaint"], "--init", init, "--steps", 4, "--sampler", "ddim",
                          "--attention-chunk", 9, "-o", out, "--force")
    assert code == 0, stderr
    assert seen_chunks and set(seen_chunks) == {9}


@pytest.mark.parametrize("n", [0, -4])
def test_attention_chunk_below_one_is_one_line_exit_2(converted, tmp_path, n):
    out = tmp_path / "o.png"
    code, _, stderr = cli("txt2img", converted["lightning"], *ARGS, "--attention-chunk", n, "-o", out)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --attention-chunk {n}:") and ">= 1" in lines[0]
    assert not out.exists()
    with pytest.raises(SdportError, match="--attention-chunk"):
        pipeline.Models(converted["lightning"], attention_chunk=n)

