"""Pipelines end to end against a reference assembled from the original parts, on the tiny fixtures.

The reference (parity/txt2img.py's ReferencePipeline): transformers' CLIPTokenizer + CLIPTextModel (as
CompVis' FrozenCLIPEmbedder calls them), ldm's UNetModel, ldm's PLMSSampler / DDIMSampler driven by a
stand-in for LatentDiffusion (its module needs pytorch_lightning) that carries the checkpoint's own
schedule buffers, and ldm's Encoder / Decoder. Its weights come straight from the CompVis checkpoint;
the native side reads only the converted .h5.
"""
from __future__ import annotations

import json

import h5py
import pytest
import torch
import torch.nn.functional as F

import ldm.models.diffusion.ddim as ldm_ddim
import ldm.models.diffusion.plms as ldm_plms
from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler

from sdport.convert.convert import convert
from sdport.models import pipeline as P
from sdport.models import tokenizer as tk
from sdport.models.errors import LayoutError, SdportError
from sdport.models.samplers import linear_schedule
from sdport.parity.metrics import compare
from sdport.parity.txt2img import ReferencePipeline

SCALE = 7.5
PROMPT = "a photograph of an astronaut riding a horse"


# ---------------------------------------------------------------------------------------------
# The reference pipeline
# ---------------------------------------------------------------------------------------------


class Reference(ReferencePipeline):
    """The reference pipeline of `sdport parity txt2img`, with its VAE encoder, plus text in through
    transformers' CLIPTokenizer as CompVis' FrozenCLIPEmbedder tokenizes it."""

    def __init__(self, ckpt: str, tmp_path_factory):
        super().__init__(ckpt, components=("text_model", "unet", "encoder", "decoder"))
        self.tokenizer = _hf_tokenizer(tmp_path_factory)

    def encode_text(self, text: str) -> torch.Tensor:
        batch = self.tokenizer([text], truncation=True, max_length=77, return_length=True,
                               return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        return self.encode_ids(batch["input_ids"])


def _hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer over the bundled vocabulary, built offline, padded as in SD v1."""
    import transformers

    d = tmp_path_factory.mktemp("clip_vocab")
    merges = tk.load_merges()
    chars = list(tk.byte_to_char().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [tk.START_TEXT, tk.END_TEXT]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    return transformers.CLIPTokenizer.from_pretrained(str(d), pad_token=tk.END_TEXT)


@pytest.fixture(scope="module")
def ref(variants, tmp_path_factory):
    return Reference(variants["lightning"], tmp_path_factory)


@pytest.fixture(scope="module")
def ref_inpaint(variants, tmp_path_factory):
    return Reference(variants["inpaint"], tmp_path_factory)


@pytest.fixture(scope="module")
def models(converted):
    with P.Models(converted["lightning"]) as m:
        yield m


def run(gen) -> list[torch.Tensor]:
    return [x.clone() for x in gen]


def image_psnr(native: torch.Tensor, reference: torch.Tensor) -> float:
    assert native.shape == reference.shape
    assert reference.std() > 0.05, "reference image is (nearly) constant: the check would prove nothing"
    return compare(native, reference)["psnr_db"]


def smooth_image(h=16, w=16, seed=5):
    g = torch.Generator().manual_seed(seed)
    # a smooth image in [-1, 1] (a random one would be all high frequencies)
    base = torch.rand(1, 3, h // 4, w // 4, generator=g) * 2 - 1
    return F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# End to end against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,hw", [("plms", (16, 16)), ("ddim", (16, 24)), ("dpmpp2m", (16, 24))])
def test_txt2img_matches_reference_pipeline(models, ref, sampler, hw):
    steps, (h, w) = 10, hw
    x_T = torch.randn(1, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(123))

    uc, c = ref.encode_text(""), ref.encode_text(PROMPT)
    assert compare(c, uc)["rel_l2"] > 0.05, "prompt and empty prompt give the same context"
    cls = {"plms": ldm_plms.PLMSSampler, "ddim": ldm_ddim.DDIMSampler, "dpmpp2m": DPMSolverSampler}[sampler]
    with torch.no_grad():
        samples, _ = cls(ref.model).sample(S=steps, batch_size=1, shape=(4, h // 2, w // 2), conditioning=c,
                                           verbose=False, unconditional_guidance_scale=SCALE,
                                           unconditional_conditioning=uc, eta=0.0, x_T=x_T.clone())
    ref_image = ref.decode(samples)

    req = P.Request(prompt=PROMPT, steps=steps, scale=SCALE, sampler=sampler, height=h, width=w)
    latents = run(P.txt2img(models, req, x_T=x_T))
    assert len(latents) == P.total_steps(req) == steps
    image = P.decode(models, latents[-1])
    assert image.shape == (1, 3, h, w)
    assert compare(latents[-1], samples)["rel_l2"] < 1e-4
    psnr = image_psnr(image, ref_image)
    assert psnr >= 60, f"decoded image PSNR {psnr:.1f} dB"
    # the latent moved: a pipeline that returned x_T would not pass the comparison above by luck
    assert compare(latents[-1], x_T)["rel_l2"] > 0.5


def test_txt2img_seed_draws_x_T_on_the_cpu(models):
    req = P.Request(prompt=PROMPT, steps=5, height=16, width=16, seed=7)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    a = run(P.txt2img(models, req))
    b = run(P.txt2img(models, req, x_T=x_T))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = run(P.txt2img(models, P.Request(prompt=PROMPT, steps=5, height=16, width=16, seed=8)))
    assert not torch.equal(a[-1], c[-1])


def test_negative_prompt_replaces_the_empty_prompt(models):
    base = dict(prompt=PROMPT, steps=5, height=16, width=16)
    plain = run(P.txt2img(models, P.Request(**base)))[-1]
    empty = run(P.txt2img(models, P.Request(**base, negative="")))[-1]
    neg = run(P.txt2img(models, P.Request(**base, negative="blurry, low quality")))[-1]
    assert torch.equal(plain, empty) and not torch.equal(plain, neg)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_img2img_matches_reference_pipeline(models, ref, monkeypatch, eta):
    steps, strength, seed = 10, 0.6, 11
    init = smooth_image()
    uc, c = ref.encode_text(""), ref.encode_text(PROMPT)
    # ldm's img2img script, noise drawn in the native order: posterior sample, encoding noise, step noise
    gen = torch.Generator().manual_seed(seed)
    monkeypatch.setattr(ldm_ddim, "noise_like",
                        lambda shape, device, repeat=False: torch.randn(shape, generator=gen).to(device))
    sampler = ldm_ddim.DDIMSampler(ref.model)
    sampler.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
    t_enc = int(strength * steps)
    with torch.no_grad():
        init_latent = ref.first_stage_encoding(init, gen)
        z_enc = sampler.stochastic_encode(init_latent, torch.tensor([t_enc]),
                                          noise=torch.randn(init_latent.shape, generator=gen))
        samples = sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=SCALE, unconditional_conditioning=uc)
    ref_image = ref.decode(samples)

    req = P.Request(prompt=PROMPT, steps=steps, scale=SCALE, sampler="ddim", eta=eta, seed=seed, strength=strength)
    latents = run(P.img2img(models, req, init))
    assert len(latents) == P.total_steps(req, "img2img") == t_enc
    psnr = image_psnr(P.decode(models, latents[-1]), ref_image)
    assert psnr >= 60, f"decoded image PSNR {psnr:.1f} dB"


def test_inpainting_model_matches_reference_pipeline(converted, ref_inpaint):
    steps, seed, (h, w) = 10, 3, (16, 16)
    init = smooth_image(h, w)
    repaint = torch.zeros(1, 1, h, w)
    repaint[..., 3:10, 5:14] = 1  # not aligned to the 2-pixel latent grid
    ref = ref_inpaint
    uc, c = ref.encode_text(""), ref.encode_text(PROMPT)
    # the SD inpainting scripts: masked image = image where mask < 0.5; mask resized by nearest neighbour
    gen = torch.Generator().manual_seed(seed)
    masked_latent = ref.first_stage_encoding(init * (repaint < 0.5), gen)
    x_T = torch.randn(1, 4, h // 2, w // 2, generator=gen)
    c_cat = torch.cat([F.interpolate(repaint, size=(h // 2, w // 2)), masked_latent], dim=1)
    cond = {"c_concat": [c_cat], "c_crossattn": [c]}
    uc_full = {"c_concat": [c_cat], "c_crossattn": [uc]}
    with torch.no_grad():
        samples, _ = ldm_ddim.DDIMSampler(ref.model).sample(
            S=steps, batch_size=1, shape=(4, h // 2, w // 2), conditioning=cond, verbose=False, eta=0.0,
            unconditional_guidance_scale=SCALE, unconditional_conditioning=uc_full, x_T=x_T.clone())
    ref_image = ref.decode(samples)

    with P.Models(converted["inpaint"]) as m:
        assert P.unet_mode(m) == "inpainting"
        req = P.Request(prompt=PROMPT, steps=steps, scale=SCALE, sampler="ddim", seed=seed)
        latents = run(P.inpaint(m, req, init, repaint))
        psnr = image_psnr(P.decode(m, latents[-1]), ref_image)
    assert psnr >= 60, f"decoded image PSNR {psnr:.1f} dB"


# ---------------------------------------------------------------------------------------------
# SD 2.x: the same runs on the 2.x fixtures (linear projections, 16-wide heads, OpenCLIP text tower)
# ---------------------------------------------------------------------------------------------


class Reference2(ReferencePipeline):
    """The reference pipeline on an SD 2.x checkpoint, text in through open_clip.tokenize's framing
    (FrozenOpenCLIPEmbedder.forward: open_clip.tokenize, then encode_with_transformer)."""

    def __init__(self, ckpt: str, components=("text_model", "unet", "encoder", "decoder")):
        import importlib.util
        from pathlib import Path

        super().__init__(ckpt, components=components)
        spec = importlib.util.find_spec("open_clip")  # its tokenizer.py by path: the package wants torchvision
        path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
        mod_spec = importlib.util.spec_from_file_location("_openclip_tokenizer_pipeline", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        self.tokenize = module.SimpleTokenizer()  # what open_clip.tokenize calls

    def encode_text(self, text: str) -> torch.Tensor:
        return self.encode_ids(self.tokenize([text]))


@pytest.fixture(scope="module")
def ref_v2(variants):
    return Reference2(variants["v2"])


@pytest.fixture(scope="module")
def models_v2(converted):
    with P.Models(converted["v2"]) as m:
        yield m


def test_v2_txt2img_matches_reference_pipeline(models_v2, ref_v2):
    assert models_v2.config("text_model").pad_id == 0 and models_v2.config("unet").num_head_channels
    test_txt2img_matches_reference_pipeline(models_v2, ref_v2, "plms", (16, 16))


def test_v2_img2img_matches_reference_pipeline(models_v2, ref_v2, monkeypatch):
    test_img2img_matches_reference_pipeline(models_v2, ref_v2, monkeypatch, 0.0)


def test_v2_inpainting_model_matches_reference_pipeline(variants, converted):
    # the v1 test, run on the 2.x inpainting fixture in place of the v1 one
    test_inpainting_model_matches_reference_pipeline({"inpaint": converted["v2_inpaint"]},
                                                     Reference2(variants["v2_inpaint"]))


@pytest.fixture(scope="module")
def v_model(variants, tmp_path_factory):
    """The 2.x fixture converted as a v-prediction model (--prediction v), and its reference read as one."""
    h5 = convert(variants["v2"], str(tmp_path_factory.mktemp("v") / "v.h5"), prediction="v").out
    ref = Reference2(variants["v2"])
    ref.model.parameterization = "v"  # what ldm's DDIMSampler reads
    with P.Models(h5) as m:
        assert P.prediction(m) == "v"
        yield m, ref


def test_v_model_txt2img_ddim_matches_reference_pipeline(v_model):
    test_txt2img_matches_reference_pipeline(*v_model, "ddim", (16, 24))


def test_v_model_txt2img_dpmpp2m_matches_reference_pipeline(v_model):
    test_txt2img_matches_reference_pipeline(*v_model, "dpmpp2m", (16, 16))


def test_dpmpp2m_runs_exactly_the_steps_asked(models):
    for steps in (2, 3, 30, 333):  # counts ldm's DDIM stride refuses or stretches (3, 333; 30 -> 31)
        req = P.Request(sampler="dpmpp2m", steps=steps, height=16, width=16)
        assert P.total_steps(req) == steps and P.steps_note(req) is None
    assert len(run(P.txt2img(models, P.Request(prompt=PROMPT, sampler="dpmpp2m", steps=3, height=16,
                                               width=16)))) == 3


def test_v_model_img2img_matches_reference_pipeline(v_model, monkeypatch):
    test_img2img_matches_reference_pipeline(*v_model, monkeypatch, 0.5)


# ---------------------------------------------------------------------------------------------
# Inpainting with a plain model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["plms", "ddim", "dpmpp2m"])
def test_plain_inpainting_keeps_the_init_latent_outside_the_mask(models, sampler):
    seed, (h, w) = 4, (16, 16)
    init = smooth_image(h, w)
    repaint = torch.zeros(1, 1, h, w)
    repaint[..., 5:10, 3:8] = 1
    keep = P.latent_keep_mask(repaint, 2)
    # max pooling: every latent pixel touching a marked pixel is repainted
    assert keep[0, 0, 2, 1] == 0 and keep[0, 0, 4, 3] == 0 and keep[0, 0, 1, 1] == 1 and keep[0, 0, 5, 4] == 1
    req = P.Request(prompt=PROMPT, steps=10, sampler=sampler, seed=seed)
    latents = run(P.inpaint(models, req, init, repaint))
    # the init latent: the posterior sample is the generator's first draw
    x0 = P.encode_image(models, init, torch.Generator().manual_seed(seed))
    final = latents[-1]
    known = keep.expand_as(final) == 1
    assert torch.equal(final[known], x0[known])
    # and the repainted region was generated, not copied
    assert compare(final[~known], x0[~known])["rel_l2"] > 0.3
    # before the last step the known region follows the noised init latent, not x0 exactly
    assert not torch.equal(latents[-2][known], x0[known])


# ---------------------------------------------------------------------------------------------
# Schedule, memory, dtypes
# ---------------------------------------------------------------------------------------------


def test_float32_schedule_is_used_as_stored(models, ref, variants):
    ref_ckpt = variants["lightning"]
    stored = torch.load(ref_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for k in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        assert stored[k].dtype == torch.float32
        assert torch.equal(getattr(models.schedule, k), stored[k]), k
        assert torch.equal(getattr(ref.model, k), stored[k]), k
    assert models.latent_scale == pytest.approx(0.18215, abs=0) and models.notes == []


def test_fp16_schedule_falls_back_to_the_exact_linear_schedule(converted):
    with P.Models(converted["fp16"]) as m:
        with h5py.File(converted["fp16"]) as f:
            assert f["schedule/alphas_cumprod"].dtype == "float16"
        assert torch.equal(m.schedule.alphas_cumprod, linear_schedule().alphas_cumprod)
        assert len(m.notes) == 1 and "float16" in m.notes[0] and "linear schedule" in m.notes[0]


def test_fp16_schedule_that_is_not_linear_is_used_as_stored(converted, tmp_path):
    import shutil

    path = str(tmp_path / "other.h5")
    shutil.copy(converted["fp16"], path)
    with h5py.File(path, "r+") as f:
        ac = f["schedule/alphas_cumprod"]
        ac[...] = (ac[...].astype("float32") ** 1.1).astype("float16")
        stored = torch.from_numpy(ac[...]).float()
    with P.Models(path) as m:
        assert torch.equal(m.schedule.alphas_cumprod, stored)
        assert "not SD v1's linear schedule" in m.notes[0]


def test_low_memory_frees_each_component_and_gives_the_same_latents(converted):
    req = P.Request(prompt=PROMPT, steps=5, height=16, width=16, sampler="ddim")
    with P.Models(converted["lightning"]) as keep:
        a = run(P.img2img(keep, req, smooth_image(16, 16)))
        assert sorted(keep.loaded()) == ["encoder", "text_model", "unet"]
    with P.Models(converted["lightning"], low_memory=True) as low:
        b = run(P.img2img(low, req, smooth_image(16, 16)))
        assert low.loaded() == []
        with low.use("text_model") as text:
            assert next(text.parameters()).device.type == "cpu"
        assert all(p.is_meta for p in text.parameters())  # storage released when the block ended
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bf16_runs_on_the_cpu_close_to_fp32(converted, models):
    req = P.Request(prompt=PROMPT, steps=5, height=16, width=16)
    a = run(P.txt2img(models, req))[-1]
    with P.Models(converted["lightning"], dtype="bf16") as m:
        b = run(P.txt2img(m, req))[-1]
        image = P.decode(m, b)
    assert image.dtype == torch.float32 and torch.isfinite(image).all()
    assert 0 < compare(b, a)["rel_l2"] < 0.05


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors(models, converted, variants, tmp_path):
    with pytest.raises(SdportError, match=r"--height 30 is not a positive multiple of 4 .*try 28 or 32"):
        next(P.txt2img(models, P.Request(height=30, width=32, steps=2)))
    with pytest.raises(SdportError, match="fp16 on device cpu"):
        P.Models(converted["lightning"], dtype="fp16")
    with pytest.raises(SdportError, match="DDIM only"):
        next(P.img2img(models, P.Request(sampler="plms"), smooth_image()))
    with pytest.raises(SdportError, match="strength"):
        next(P.img2img(models, P.Request(sampler="ddim", steps=10, strength=0.05), smooth_image()))
    with pytest.raises(SdportError, match="eta"):
        next(P.txt2img(models, P.Request(sampler="plms", eta=0.5, height=16, width=16)))
    with pytest.raises(SdportError, match="--steps 0"):
        next(P.txt2img(models, P.Request(steps=0, height=16, width=16)))
    dpm = dict(sampler="dpmpp2m", height=16, width=16)
    with pytest.raises(SdportError, match=r"eta 0.5: DPM-Solver\+\+\(2M\) is deterministic"):
        next(P.txt2img(models, P.Request(eta=0.5, **dpm)))
    with pytest.raises(SdportError, match="--spacing linspace: dpmpp2m steps uniformly in continuous time"):
        next(P.txt2img(models, P.Request(spacing="linspace", **dpm)))
    with pytest.raises(SdportError, match="--steps 1: dpmpp2m needs at least 2 steps"):
        next(P.txt2img(models, P.Request(steps=1, **dpm)))
    with pytest.raises(SdportError, match="img2img runs DDIM only .*got sampler dpmpp2m"):
        next(P.img2img(models, P.Request(sampler="dpmpp2m"), smooth_image()))
    with pytest.raises(SdportError, match="sampler 'euler': choose plms, ddim, dpmpp2m"):
        next(P.txt2img(models, P.Request(sampler="euler", height=16, width=16)))
    with pytest.raises(SdportError, match="nothing to repaint"):
        next(P.inpaint(models, P.Request(steps=2), smooth_image(), torch.zeros(1, 1, 16, 16)))
    with pytest.raises(SdportError, match="same size"):
        next(P.inpaint(models, P.Request(steps=2), smooth_image(), torch.ones(1, 1, 16, 8)))
    with P.Models(converted["inpaint"]) as m, pytest.raises(SdportError, match="sdport inpaint"):
        next(P.txt2img(m, P.Request(steps=2, height=16, width=16)))
    partial = convert(variants["lightning"], str(tmp_path / "no-encoder.h5"),
                      components={"unet", "text_model", "decoder"}).out
    with P.Models(partial) as m:
        next(P.txt2img(m, P.Request(steps=2, height=16, width=16)))  # enough for txt2img
        with pytest.raises(LayoutError, match=r"no /encoder component; img2img needs"):
            next(P.img2img(m, P.Request(sampler="ddim", steps=4), smooth_image()))

