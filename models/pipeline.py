"""Text to image, image to image and inpainting from an sdport .h5 file, as generators of latents.

    prompt, negative ─tokenizer─► ids ─text_model─► cond, uncond              [1, 77, D] each
    x_T (seeded CPU generator) ─PLMS/DDIM/DPM++ over cfg_denoiser(unet)─► latent [1, 4, H/f, W/f]
    latent * (1 / latent_scale) ─decoder─► image                               [1, 3, H, W], about [-1, 1]

Each pipeline (`txt2img`, `img2img`, `inpaint`) yields the latent after every sampler step; `decode`
turns the last one into an image. They follow CompVis' scripts: the unconditional input is the empty
prompt (or the negative prompt), x_T ~ N(0, 1) drawn on the CPU from `seed`, images enter through the
VAE encoder as a *sample* of the posterior (ldm's get_first_stage_encoding), scaled by latent_scale.

One seeded CPU generator serves the whole run, in this order: posterior sample (img2img, inpaint),
x_T (txt2img, inpaint), then whatever the sampler draws (img2img's encoding noise, masking noise,
DDIM eta noise).

Imports torch and `models/` only (plus the package version for PNG metadata); PNG files are
models/images.py's business.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .. import __version__
from . import memory
from .errors import LayoutError, SdportError
from .storage.layout import SCHEDULE, LayoutReader, file_sha256
from .devices import resolve
from .dpm_solver import continuous_time, sample_dpmpp2m
from .load import load_model, read_config
from .samplers import (
    SPACINGS,
    Schedule,
    cfg_denoiser,
    v_to_eps,
    ddim_timesteps,
    linear_schedule,
    sample_ddim,
    sample_img2img,
    sample_plms,
)
from .tokenizer import default_tokenizer
from .unet import ATTENTION_PRECISIONS
from .vae import LATENT_SCALE_SD_V1

SAMPLERS = ("plms", "ddim", "dpmpp2m")
CONTINUOUS = ("dpmpp2m",)  # samplers in continuous time: no --spacing, no eta, exactly --steps steps
NEEDS = {
    "txt2img": ("text_model", "unet", "decoder"),
    "img2img": ("text_model", "unet", "encoder", "decoder"),
    "inpaint": ("text_model", "unet", "encoder", "decoder"),
}


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate. Defaults are CompVis' txt2img: 512x512, 50 PLMS steps, guidance scale 7.5."""

    prompt: str = ""
    negative: str = ""  # replaces the empty prompt as the unconditional input
    steps: int = 50
    scale: float = 7.5
    seed: int = 42
    sampler: str = "plms"  # plms | ddim | dpmpp2m (img2img: ddim only, as in ldm)
    eta: float = 0.0  # DDIM only
    spacing: str = "ldm"  # PLMS/DDIM timesteps: ldm's uniform stride, or diffusers' linspace | leading | trailing
    height: int = 512
    width: int = 512
    strength: float = 0.75  # img2img only: fraction of the steps re-run from the noised init latent


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class Models:
    """The components of one .h5 file, loaded on first use.

    By default a loaded component stays for the next call. With `low_memory` each one is loaded when
    a stage needs it and freed right after (text encoder, then VAE encoder, then UNet, then decoder),
    so peak memory is the largest component plus activations.

    `attention_chunk` (None: off) makes the UNet's attention take that many query tokens at a time
    (`UNet.set_attention_chunk`): the same result, a smaller score matrix where the attention kernel
    would hold one whole (bench/bench_memory.py measures the effect).

    `attention_precision` "fp32" (default, as ldm) keeps the UNet's q·kᵀ and softmax in fp32 in fp16 and
    bf16; "compute" computes q·kᵀ in the compute dtype, as ldm with ATTN_PRECISION=fp16 (`models.unet.attend`).

    `notes` collects one-line remarks for the user (e.g. which noise schedule was used and why).
    """

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str = "fp32",
                 low_memory: bool = False, attention_chunk: int | None = None, attention_precision: str = "fp32"):
        self.path = os.fspath(path)
        if attention_precision not in ATTENTION_PRECISIONS:
            raise SdportError(f"--attention-precision {attention_precision}: choose {' or '.join(ATTENTION_PRECISIONS)}")
        self.attention_precision = attention_precision
        if attention_chunk is not None and attention_chunk < 1:
            raise SdportError(f"--attention-chunk {attention_chunk}: expected a whole number of query tokens >= 1")
        self.attention_chunk = attention_chunk
        # fp16 on a CPU refused, not warned: a full-size run would take days (bf16 is the CPU choice)
        self.device, self.dtype = resolve(device, dtype, refuse_slow=True)
        self.dtype_name = dtype
        self.low_memory = low_memory
        self.reader = LayoutReader(self.path)
        self.notes: list[str] = []
        self.schedule, self.latent_scale = read_schedule(self.reader, self.notes)
        self._loaded: dict[str, torch.nn.Module] = {}

    def require(self, mode: str) -> None:
        """Fail early, naming what is missing, if the file lacks a component `mode` needs."""
        missing = [c for c in NEEDS[mode] if not self.reader.has(c)]
        if missing:
            raise LayoutError(f"{self.path}: no /{missing[0]} component; {mode} needs {', '.join(NEEDS[mode])} "
                              f"(the file holds: {', '.join(self.reader.components()) or 'none'})")

    def config(self, component: str):
        return read_config(self.reader, component)

    @contextlib.contextmanager
    def use(self, component: str) -> Iterator[torch.nn.Module]:
        """The loaded component; in low-memory mode its weights are released when the block ends."""
        model = self._loaded.get(component)
        if model is None:
            model = load_model(self.reader, component, device=self.device, dtype=self.dtype)
            if self.attention_chunk is not None and hasattr(model, "set_attention_chunk"):  # the attention models
                model.set_attention_chunk(self.attention_chunk)
            if hasattr(model, "set_attention_precision"):
                model.set_attention_precision(self.attention_precision)
            if not self.low_memory:
                self._loaded[component] = model
        try:
            yield model
        finally:
            if self.low_memory:
                # to("meta") drops every parameter's storage even while other references to the
                # module exist (a generator frame, a traceback)
                model.to("meta")
                memory.release()

    def loaded(self) -> list[str]:
        """Components currently held in memory."""
        return list(self._loaded)

    def close(self) -> None:
        self._loaded.clear()
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_schedule(reader: LayoutReader, notes: list[str]) -> tuple[Schedule, float]:
    """The file's noise schedule and latent scale.

    float32/float64 buffers are used as stored (bit-for-bit what ldm uses). Buffers in float16 or
    bfloat16 (a checkpoint saved in half precision rounds them with the weights; alpha-bar near
    t = 999 then keeps only 3 significant digits) are compared with SD v1's linear schedule: if they
    are its rounding, the exact float32 linear_schedule() is used; otherwise the stored values,
    upcast. Either way a note says so. No /schedule group: SD v1's linear schedule and 0.18215.
    """
    if not reader.has(SCHEDULE):
        notes.append(f"{reader.path}: no /schedule group; using SD v1's linear schedule and latent scale "
                     f"{LATENT_SCALE_SD_V1}")
        return linear_schedule(), LATENT_SCALE_SD_V1
    scale = reader.latent_scale(LATENT_SCALE_SD_V1)
    if "latent_scale" not in reader.group_attrs(SCHEDULE):
        notes.append(f"{reader.path}: /schedule has no latent_scale attribute; using SD v1's {scale}")
    keys = set(reader.keys(SCHEDULE))
    if "alphas_cumprod" not in keys:
        notes.append(f"{reader.path}: /schedule has no alphas_cumprod; using SD v1's linear schedule")
        return linear_schedule(), scale
    ac = reader.schedule_tensor("alphas_cumprod")
    if ac.dtype in (torch.float32, torch.float64):
        roots = [reader.schedule_tensor(k) if k in keys else None
                 for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")]
        roots = [r if r is not None and r.dtype in (torch.float32, torch.float64) else None for r in roots]
        return Schedule.from_alphas_cumprod(ac, *roots), scale
    linear = linear_schedule()
    name = str(ac.dtype).replace("torch.", "")
    if ac.shape == linear.alphas_cumprod.shape and torch.equal(linear.alphas_cumprod.to(ac.dtype), ac):
        notes.append(f"{reader.path}: /schedule is stored in {name}; it is SD v1's linear schedule rounded, "
                     f"so its exact float32 values are used")
        return linear, scale
    notes.append(f"{reader.path}: /schedule is stored in {name} and is not SD v1's linear schedule; using it "
                 f"as stored, upcast to float32 (less precise than the float32 original)")
    return Schedule.from_alphas_cumprod(ac.float()), scale


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def size_unit(models: Models) -> int:
    """Image sides must be multiples of this: the VAE's downscale times the UNet's 2**(levels - 1)."""
    vae = models.config("decoder")
    return vae.downscale * 2 ** (len(models.config("unet").channel_mult) - 1)


def check_size(models: Models, height: int, width: int, what: str = "") -> tuple[int, int]:
    """(height, width) of the latent for an image of that size, or a one-line error ("{what}height ...")."""
    unit, f = size_unit(models), models.config("decoder").downscale
    levels = len(models.config("unet").channel_mult) - 1
    for name, v in (("height", height), ("width", width)):
        if v < unit or v % unit:
            lo = v // unit * unit
            near = f"{lo} or {lo + unit}" if lo else f"{unit}"
            raise SdportError(f"{what}{name} {v} is not a positive multiple of {unit} (the VAE downscales by {f}, "
                              f"the UNet by {2 ** levels}); try {near}")
    return height // f, width // f


def unet_mode(models: Models) -> str:
    """'plain' (latent in, eps out) or 'inpainting' (latent + mask + masked-image latent in)."""
    u = models.config("unet")
    if u.in_channels == u.out_channels:
        return "plain"
    if u.in_channels == 2 * u.out_channels + 1:
        return "inpainting"
    if u.in_channels == u.out_channels + 1:
        raise SdportError(f"{models.path}: /unet is a depth-conditioned UNet ({u.in_channels} input channels: "
                          "latent + depth map); sdport does not compute the depth map (the MiDaS model was "
                          "not converted), so it cannot generate with it")
    raise LayoutError(f"{models.path}: /unet has {u.in_channels} input and {u.out_channels} output channels; "
                      f"expected {u.out_channels} (plain) or {2 * u.out_channels + 1} (inpainting)")


def prediction(models: Models) -> str:
    """What the UNet predicts, as the layout records it (layouts without the record: eps)."""
    settings = models.reader.attrs.get("settings")
    p = settings.get("prediction") if isinstance(settings, dict) else None
    value = p.get("value") if isinstance(p, dict) else "eps"
    if value not in ("eps", "v"):
        raise LayoutError(f"{models.path}: settings.prediction is {str(value)[:20]!r}; expected eps or v")
    return value


def trained_size(models: Models) -> int:
    """The image side the model was trained at. No checkpoint or yaml says it (the 2.x yamls all say
    image_size: 64, which ldm never uses), so by convention: 768 for a full-width v-prediction UNet
    (SD 2.x 768-v, 2.1-v), else the UNet's sample size through the VAE (512 for SD v1 and 2.x base)."""
    u, f = models.config("unet"), models.config("decoder").downscale
    if prediction(models) == "v" and u.model_channels >= 320:
        return 96 * f
    return u.sample_size * f


def check_request(models: Models, req: Request, mode: str) -> None:
    models.require(mode)
    prediction(models)  # a malformed record is refused before any work
    u, t, d = models.config("unet"), models.config("text_model"), models.config("decoder")
    if t.hidden != u.context_dim:
        raise LayoutError(f"{models.path}: the text encoder's width {t.hidden} does not match the UNet's "
                          f"context_dim {u.context_dim}")
    if d.embed_dim != u.out_channels:
        raise LayoutError(f"{models.path}: the decoder takes {d.embed_dim} latent channels, the UNet makes "
                          f"{u.out_channels}")
    if req.sampler not in SAMPLERS:
        raise SdportError(f"sampler {req.sampler!r}: choose {', '.join(SAMPLERS)}")
    if mode == "img2img" and req.sampler != "ddim":
        raise SdportError(f"img2img runs DDIM only (as ldm's img2img); got sampler {req.sampler}")
    if req.sampler != "ddim" and req.eta != 0:
        name = {"plms": "PLMS", "dpmpp2m": "DPM-Solver++(2M)"}[req.sampler]
        raise SdportError(f"eta {req.eta}: {name} is deterministic (eta 0); eta applies to --sampler ddim")
    if req.eta < 0:
        raise SdportError(f"eta {req.eta}: must be >= 0")
    if req.sampler in CONTINUOUS:
        if req.spacing != "ldm":
            raise SdportError(f"--spacing {req.spacing}: {req.sampler} steps uniformly in continuous time (as ldm's "
                              "DPMSolverSampler); --spacing applies to plms and ddim")
        if req.steps < 2:
            raise SdportError(f"--steps {req.steps}: {req.sampler} needs at least 2 steps (ldm runs another, "
                              "adaptive, solver for 1)")
    else:
        _timesteps(req.steps, models.schedule.num_timesteps, req.spacing)
    if mode == "img2img":
        t_enc, n = int(req.strength * req.steps), total_steps(req, "txt2img")
        if not 0 < req.strength < 1 or not 1 <= t_enc < n:
            raise SdportError(f"--strength {req.strength} with {req.steps} steps re-runs {t_enc} steps; "
                              f"need 0 < strength < 1 and at least 1 step (int(strength * steps) >= 1)")
    if mode != "inpaint" and unet_mode(models) == "inpainting":
        raise SdportError(f"{models.path} holds an inpainting UNet ({models.config('unet').in_channels} input "
                          f"channels): use `sdport inpaint`")


def _timesteps(steps: int, num_train_timesteps: int = 1000, spacing: str = "ldm") -> list[int]:
    if spacing not in SPACINGS:
        raise SdportError(f"--spacing {spacing}: choose one of {', '.join(SPACINGS)}")
    try:
        return ddim_timesteps(steps, num_train_timesteps, spacing)
    except ValueError as e:  # e.g. 3 steps: stride 333 puts the last timestep at 1000 (ldm fails there too)
        # linspace and trailing take every count in [1, T]; leading every count but T
        others = [s for s in ("linspace", "leading", "trailing")
                  if s != spacing and (s != "leading" or steps < num_train_timesteps)]
        raise SdportError(f"--steps {steps}: {e}; --spacing {'|'.join(others)} runs exactly {steps}") from None


def total_steps(req: Request, mode: str = "txt2img") -> int:
    """How many latents the pipeline yields, i.e. sampler steps run (ldm spacing: 31 for 30 steps)."""
    n = req.steps if req.sampler in CONTINUOUS else len(_timesteps(req.steps, spacing=req.spacing))
    return int(req.strength * req.steps) if mode == "img2img" else n


def steps_note(req: Request, mode: str = "txt2img") -> str | None:
    """One line when the sampler runs another number of steps than --steps asks (ldm spacing only)."""
    n = total_steps(req, mode)
    if mode == "img2img" or n == req.steps:
        return None
    return (f"--steps {req.steps} with ldm spacing runs {n} steps (stride 1000 // {req.steps} = {1000 // req.steps}, "
            f"as CompVis computes it); --spacing linspace|leading|trailing runs exactly {req.steps}")


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_text(models: Models, prompts: list[str]) -> torch.Tensor:
    """Prompts -> text encoder hidden states [N, 77, D], float32 on the device."""
    tok = default_tokenizer()
    with models.use("text_model") as text:
        pad = text.config.pad_id  # END for SD v1, 0 for SD 2.x
        ids = torch.tensor([tok(p, pad) for p in prompts], dtype=torch.long, device=models.device)  # [N, 77]
        return text(ids).float()


def conditioning(models: Models, req: Request) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(cond, uncond), each [1, 77, D]; uncond is None when scale is 1 (no guidance, as in ldm)."""
    if req.scale == 1.0:
        return encode_text(models, [req.prompt]), None
    uncond, cond = encode_text(models, [req.negative, req.prompt]).chunk(2)
    return cond, uncond


@torch.no_grad()
def encode_image(models: Models, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Image [1, 3, H, W] in [-1, 1] -> a posterior sample times latent_scale [1, 4, H/f, W/f], float32.

    mean + exp(logvar / 2) * noise with noise drawn on the CPU from `generator`, as ldm's
    get_first_stage_encoding(encode_first_stage(x)).
    """
    with models.use("encoder") as enc:
        mean, logvar = enc(image.to(models.device, models.dtype))
    mean, std = mean.float(), torch.exp(0.5 * logvar.float())
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return models.latent_scale * (mean + std * noise)


@torch.no_grad()
def decode(models: Models, latent: torch.Tensor) -> torch.Tensor:
    """Latent [B, 4, h, w] -> decoder output [B, 3, h*f, w*f] float32 on the CPU (about [-1, 1], unclamped)."""
    with models.use("decoder") as dec:
        z = (1.0 / models.latent_scale) * latent.to(models.device, torch.float32)  # ldm's decode_first_stage
        return dec(z.to(models.dtype)).float().cpu()


def unet_fn(unet: torch.nn.Module, concat: Optional[torch.Tensor] = None):
    """unet(x, t, context) -> float32 eps; with `concat` [1, Cc, h, w], x is [x, concat] along channels."""
    if concat is None:
        return lambda x, t, c: unet(x, t, c).float()

    def call(x, t, c):
        extra = concat.expand(x.shape[0], -1, -1, -1)  # the same mask and masked image for both CFG halves
        return unet(torch.cat([x, extra], dim=1), t, c).float()  # [B, 4 + 1 + 4, h, w], as ldm's hybrid

    return call


def guided(models: Models, unet_call, cond, uncond, scale: float, sampler: str = "plms"):
    """The guided denoiser `sampler` steps with: eps, converted from v for a v-prediction UNet.
    dpmpp2m: over continuous time, v converted per guidance half before they combine (as ldm's DPM
    sampler); plms / ddim: over integer timesteps, v converted after guidance (as ldm's DDIM)."""
    if sampler in CONTINUOUS:
        return cfg_denoiser(continuous_time(unet_call, models.schedule, prediction(models)), cond, uncond, scale)
    denoiser = cfg_denoiser(unet_call, cond, uncond, scale)
    return v_to_eps(denoiser, models.schedule) if prediction(models) == "v" else denoiser


def _sample(req: Request, denoiser, x_T, schedule, generator, mask=None, x0=None):
    if req.sampler == "dpmpp2m":
        return sample_dpmpp2m(denoiser, x_T, schedule, req.steps, mask=mask, x0=x0, generator=generator)
    if req.sampler == "plms":
        return sample_plms(denoiser, x_T, schedule, req.steps, generator=generator, mask=mask, x0=x0,
                           spacing=req.spacing)
    return sample_ddim(denoiser, x_T, schedule, req.steps, eta=req.eta, generator=generator, mask=mask, x0=x0,
                       spacing=req.spacing)


def _noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)  # CPU draw, then moved


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def txt2img(models: Models, req: Request, x_T: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """CompVis' txt2img: the latent [1, 4, H/f, W/f] after each PLMS/DDIM/DPM-Solver++ step. x_T overrides the seed's."""
    check_request(models, req, "txt2img")
    h, w = check_size(models, req.height, req.width, "--")
    gen = torch.Generator().manual_seed(req.seed)
    if x_T is None:
        x_T = _noise((1, models.config("unet").out_channels, h, w), gen, models.device)
    cond, uncond = conditioning(models, req)
    with models.use("unet") as unet:
        denoiser = guided(models, unet_fn(unet), cond, uncond, req.scale, req.sampler)
        yield from _sample(req, denoiser, x_T.to(models.device, torch.float32), models.schedule, gen)


@torch.no_grad()
def img2img(models: Models, req: Request, init: torch.Tensor) -> Iterator[torch.Tensor]:
    """ldm's img2img (SDEdit with DDIM): encode `init` [1, 3, H, W] in [-1, 1], noise it to
    int(strength * steps), denoise from there. Yields int(strength * steps) latents."""
    check_request(models, req, "img2img")
    check_size(models, init.shape[-2], init.shape[-1], "init image ")
    gen = torch.Generator().manual_seed(req.seed)
    cond, uncond = conditioning(models, req)
    x0 = encode_image(models, init, gen)
    with models.use("unet") as unet:
        denoiser = guided(models, unet_fn(unet), cond, uncond, req.scale)
        yield from sample_img2img(denoiser, x0, models.schedule, req.steps, req.strength, eta=req.eta,
                                  generator=gen, spacing=req.spacing)


def latent_keep_mask(repaint: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel repaint mask [1, 1, H, W] (1 = repaint) -> latent keep mask [1, 1, H/f, W/f] (1 = keep).

    A latent pixel is kept only if none of its f x f image pixels is to be repainted (max pooling),
    so the repainted region covers every marked pixel.
    """
    return 1.0 - F.max_pool2d(repaint, kernel_size=factor, stride=factor)


@torch.no_grad()
def inpaint(models: Models, req: Request, init: torch.Tensor, repaint: torch.Tensor,
            x_T: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """Repaint where `repaint` [1, 1, H, W] is 1 in `init` [1, 3, H, W] (in [-1, 1]).

    Plain (4-channel) UNet: the known region is re-imposed before every step from the init latent
    noised to that step (the samplers' mask / x0), and once more after the last step, so the final
    latent equals the init latent wherever latent_keep_mask() is 1.
    Inpainting (9-channel) UNet: the UNet sees [x, mask, masked-image latent] as SD's inpainting model
    was trained (ldm's hybrid conditioning, mask resized to the latent by nearest neighbour, masked
    image = init where mask < 0.5, else 0); the prompt may be empty.
    """
    check_request(models, req, "inpaint")
    h, w = check_size(models, init.shape[-2], init.shape[-1], "init image ")
    if tuple(repaint.shape[-2:]) != tuple(init.shape[-2:]):
        raise SdportError(f"mask is {repaint.shape[-1]}x{repaint.shape[-2]}, the init image "
                          f"{init.shape[-1]}x{init.shape[-2]}; they must be the same size (sdport does not resize)")
    if not bool((repaint > 0.5).any()):
        raise SdportError("the mask marks nothing to repaint (no pure green (0,255,0) pixels in the init image, "
                          "or no white pixels in --mask)")
    mode = unet_mode(models)
    f = models.config("decoder").downscale
    gen = torch.Generator().manual_seed(req.seed)
    cond, uncond = conditioning(models, req)
    channels = models.config("unet").out_channels
    if mode == "plain":
        x0 = encode_image(models, init, gen)
        keep = latent_keep_mask(repaint, f).to(models.device)
        x_T = _noise((1, channels, h, w), gen, models.device) if x_T is None else x_T.to(models.device)
        n = total_steps(req)
        with models.use("unet") as unet:
            denoiser = guided(models, unet_fn(unet), cond, uncond, req.scale, req.sampler)
            for i, x in enumerate(_sample(req, denoiser, x_T, models.schedule, gen, mask=keep, x0=x0)):
                # ldm re-imposes the known region before each step only; after the last one, once more
                yield keep * x0 + (1.0 - keep) * x if i == n - 1 else x
        return
    mask = (repaint >= 0.5).float()
    masked_latent = encode_image(models, init * (mask < 0.5), gen)
    concat = torch.cat([F.interpolate(mask, size=(h, w)).to(models.device), masked_latent], dim=1)  # [1, 5, h, w]
    x_T = _noise((1, channels, h, w), gen, models.device) if x_T is None else x_T.to(models.device)
    with models.use("unet") as unet:
        denoiser = guided(models, unet_fn(unet, concat), cond, uncond, req.scale, req.sampler)
        yield from _sample(req, denoiser, x_T, models.schedule, gen)


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------


def png_text(models: Models, req: Request, mode: str, height: int, width: int) -> dict[str, str]:
    """The PNG text chunks of a result: what was asked, and which model file made it."""
    text = {
        "sdport:mode": mode,
        "prompt": req.prompt,
        "negative": req.negative,
        "seed": str(req.seed),
        "steps": str(req.steps),
        "steps_run": str(total_steps(req, mode)),
        "spacing": "time_uniform" if req.sampler in CONTINUOUS else req.spacing,  # dpmpp2m: ldm's skip_type
        "sampler": req.sampler,
        "scale": repr(float(req.scale)),
        "size": f"{width}x{height}",
        "model": os.path.basename(models.path),
        "model_sha256": file_sha256(models.path),
        "dtype": models.dtype_name,
        "device": str(models.device),
        "software": f"sdport {__version__}",
    }
    if req.sampler == "ddim":
        text["eta"] = repr(float(req.eta))
    if mode == "img2img":
        text["strength"] = repr(float(req.strength))
    source = models.reader.attrs.get("source_sha256")
    if source:
        text["source_sha256"] = str(source)
    return text
