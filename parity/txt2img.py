"""Sampler parity for txt2img: ldm's own PLMS / DDIM / DPM-Solver sampler driving the reference UNet, against
the native pipeline, both from the same x_T.

    seed -CPU generator-> x_T -+- ldm PLMS/DDIM/DPMSolverSampler over StandIn(ldm UNetModel) -> x_1 .. x_n -> ldm Decoder
                               +- models.pipeline.txt2img (native UNet, native sampler)      -> x'_1 .. x'_n -> native decoder

Per step, two comparisons against the reference latent x_i (docs/parity.md, "Sampler parity"):
- free-running: x'_i of the native pipeline run end to end on its own; errors accumulate.
- teacher-forced: one native sampler step started from the reference's state before step i (its
  latent, its PLMS eps / DPM-Solver x0 history, its text context) lands on x~_i; the error of that step alone.
At chosen steps the UNet is compared layer by layer (the parity.harness machinery) on the exact
(x_t, t, context) batch the reference sampler fed its UNet: both guidance halves, as ldm batches them.

Conditioning: both sides get the native tokenizer's ids (the BPE is checked against transformers' in
tests/test_tokenizer.py, and SD checkpoints carry no tokenizer files). Each side encodes them with its
own text encoder, so free-running latents and the image measure the whole pipeline; the text
encoders' own difference is reported as `conditioning`.

Reference packages (ldm, transformers) are imported only inside the functions that build or run the
reference side. The test suite's reference pipeline (img2img, inpainting) is ReferencePipeline too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile

import numpy as np
import torch

from ..models import memory, pipeline as P
from ..models.errors import SdportError
from ..convert.detect import SCHEDULE_KEYS
from ..models.storage.layout import MAX_SCHEDULE
from ..models.vae import LATENT_SCALE_SD_V1
from ..models.dpm_solver import sample_dpmpp2m
from ..models.samplers import ddim_timesteps, sample_ddim, sample_plms
from ..models.tokenizer import default_tokenizer
from .harness import (ParityError, ParityResult, candidate_stage, default_size, deterministic, device_name,
                      dtype_of, ensure_h5, load_reference, no_progress, reference_stage, resolve_device, to_device)
from .metrics import IMAGE_PSNR_DB, Tolerance, check, compare, default_tolerance, dtype_key
from .report import collect_versions, worst_key

FORMAT = "sdport.parity.txt2img"
FORMAT_VERSION = 1
FREE, TEACHER = "free", "teacher_forced"
REFERENCE_SCALE_FACTOR = LATENT_SCALE_SD_V1  # LatentDiffusion's scale_factor in the SD v1 yaml


# ---------------------------------------------------------------------------------------------
# The reference pipeline
# ---------------------------------------------------------------------------------------------


def _ldm_linear_schedule(n: int = 1000) -> dict[str, torch.Tensor]:
    """LatentDiffusion.register_schedule for SD v1's linear betas (0.00085 .. 0.012): float32 buffers."""
    import numpy as np
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    betas = make_beta_schedule("linear", n, linear_start=0.00085, linear_end=0.0120)  # float64 numpy
    ac = np.cumprod(1.0 - betas, axis=0)
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731 - ldm's to_torch
    return {"betas": f32(betas), "alphas_cumprod": f32(ac), "alphas_cumprod_prev": f32(np.append(1.0, ac[:-1])),
            "sqrt_alphas_cumprod": f32(np.sqrt(ac)), "sqrt_one_minus_alphas_cumprod": f32(np.sqrt(1.0 - ac))}


def _from_alphas_cumprod(ac: torch.Tensor) -> dict[str, torch.Tensor]:
    """The buffers for a given alpha-bar (only alphas_cumprod enters a DDIM/PLMS step; ldm's samplers
    copy the others)."""
    ac = ac.double()
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    f32 = lambda a: a.float()  # noqa: E731
    return {"betas": f32(1 - ac / prev), "alphas_cumprod": f32(ac), "alphas_cumprod_prev": f32(prev),
            "sqrt_alphas_cumprod": f32(ac.sqrt()), "sqrt_one_minus_alphas_cumprod": f32((1 - ac).sqrt())}


def reference_schedule(checkpoint: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(buffers, note): the checkpoint's schedule, chosen by the native pipeline's rule
    (models.pipeline.read_schedule): float32 buffers as stored; half-precision ones that are SD v1's
    linear schedule rounded -> that schedule exactly (computed by ldm's own code); other half-precision
    ones upcast; none stored -> the linear schedule."""
    from ..convert.checkpoint import open_checkpoint

    with open_checkpoint(checkpoint) as ckpt:
        too_long = [k for k in SCHEDULE_KEYS if k in ckpt.infos and ckpt.infos[k].numel > MAX_SCHEDULE]
        if too_long:  # checked before reading: nothing else bounds these buffers
            raise ParityError(f"{checkpoint}: schedule buffer '{too_long[0]}' claims "
                              f"{ckpt.infos[too_long[0]].numel} elements (at most {MAX_SCHEDULE})")
        stored = {k: ckpt.tensor(k) for k in SCHEDULE_KEYS if k in ckpt.infos}
    ac = stored.get("alphas_cumprod")
    if ac is None:
        return _ldm_linear_schedule(), f"{os.path.basename(checkpoint)}: no alphas_cumprod; SD v1's linear schedule"
    if ac.dtype in (torch.float32, torch.float64):
        out = _from_alphas_cumprod(ac)
        out.update({k: v.float() for k, v in stored.items() if v.dtype in (torch.float32, torch.float64)})
        return out, None
    name = str(ac.dtype).removeprefix("torch.")
    linear = _ldm_linear_schedule(ac.shape[0])
    if torch.equal(linear["alphas_cumprod"].to(ac.dtype), ac):
        return linear, (f"{os.path.basename(checkpoint)}: schedule stored in {name}, SD v1's linear schedule "
                        f"rounded: its exact float32 values are used on both sides")
    return _from_alphas_cumprod(ac.float()), (f"{os.path.basename(checkpoint)}: schedule stored in {name}, not "
                                              f"SD v1's linear schedule: used as stored, upcast")


class StandIn:
    """What ldm's samplers read from LatentDiffusion (whose module needs pytorch_lightning): the schedule
    buffers, num_timesteps, device, and apply_model as ldm's DiffusionWrapper calls the UNet
    (conditioning_key 'crossattn' for a tensor, 'hybrid' for a dict). `on_call(x, t, c, out)`, when set,
    sees every UNet call."""

    parameterization = "eps"  # "v" for a v-prediction UNet: ldm's DDIMSampler then converts v with the two below

    def __init__(self, unet, schedule: dict[str, torch.Tensor], device=torch.device("cpu")):
        for k, v in schedule.items():
            setattr(self, k, v.to(device))
        self.num_timesteps = self.alphas_cumprod.shape[0]
        self.device = torch.device(device)
        self.unet = unet
        self.on_call = None

    def predict_eps_from_z_and_v(self, x_t, t, v):  # LatentDiffusion's (ldm.models.diffusion.ddpm)
        from ldm.modules.diffusionmodules.util import extract_into_tensor
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def predict_start_from_z_and_v(self, x_t, t, v):
        from ldm.modules.diffusionmodules.util import extract_into_tensor
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def apply_model(self, x, t, c):
        if isinstance(c, dict):  # hybrid: xc = cat([x] + c_concat), context = cat(c_crossattn)
            out = self.unet(torch.cat([x] + c["c_concat"], dim=1), t, context=torch.cat(c["c_crossattn"], 1))
        else:
            out = self.unet(x, t, context=c)
        if self.on_call is not None:
            self.on_call(x, t, c, out)
        return out


class ReferencePipeline:
    """The original parts with the checkpoint's weights, fp32 on `device`: transformers' CLIPTextModel
    (as CompVis' FrozenCLIPEmbedder calls it), ldm's UNetModel under a StandIn carrying the schedule,
    ldm's Decoder / Encoder. `sampler(name)` is ldm's PLMSSampler, DDIMSampler or DPMSolverSampler (dpmpp2m)
    over the stand-in."""

    def __init__(self, checkpoint: str, *, device="cpu", num_heads: int | None = None,
                 num_head_channels: int | None = None, components=P.NEEDS["txt2img"], lazy: bool = False):
        """lazy: each part is loaded when first used, and `release` frees it, so a caller can hold one at a time."""
        self.device = torch.device(device)
        self.checkpoint, self.components = checkpoint, tuple(components)
        self._heads = {"num_heads": num_heads, "num_head_channels": num_head_channels}
        self.parts: dict[str, torch.nn.Module] = {}
        self.formats: dict[str, str] = {}  # component -> source format (which reference it is)
        schedule, self.note = reference_schedule(checkpoint)
        self.model = StandIn(None, schedule, self.device)
        self.scale_factor = REFERENCE_SCALE_FACTOR
        if not lazy:
            for c in self.components:
                self.part(c)

    def part(self, component: str) -> torch.nn.Module:
        if component not in self.parts:
            if component not in self.components:
                raise ParityError(f"the reference pipeline was built without its {component}")
            # the head layout is used by the sources whose heads no shape says
            m, _, fmt = load_reference(component, self.checkpoint, **self._heads)
            self.parts[component], self.formats[component] = m.to(self.device), fmt
            if component == "unet":
                self.model.unet = self.parts["unet"]
        return self.parts[component]

    def release(self, component: str) -> None:
        """Free a part (loaded again if used again)."""
        self.parts.pop(component, None)
        if component == "unet":
            self.model.unet = None
        memory.release()

    @property
    def unet(self):
        return self.part("unet")

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, 77] -> hidden states [N, 77, D] (FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder.forward
        after tokenizing)."""
        from .components import entry
        from .layers import first_tensor

        out = entry("text_model").call_reference(self.part("text_model"), {"ids": ids.to(self.device)},
                                                 self.formats["text_model"])
        return first_tensor(out)

    @torch.no_grad()
    def first_stage_encoding(self, image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """get_first_stage_encoding(encode_first_stage(x)): a posterior sample (CPU noise from `gen`), scaled."""
        mean, logvar = self.part("encoder").encode(image.to(self.device))
        noise = torch.randn(mean.shape, generator=gen).to(self.device)
        return self.scale_factor * (mean + torch.exp(0.5 * logvar) * noise)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """decode_first_stage: latent -> image [B, 3, H, W], float32 on the CPU."""
        return self.part("decoder").decode(1.0 / self.scale_factor * z.to(self.device)).float().cpu()

    def sampler(self, name: str):
        from ldm.models.diffusion.ddim import DDIMSampler
        from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler
        from ldm.models.diffusion.plms import PLMSSampler

        self.part("unet")  # what the stand-in's apply_model calls
        return {"plms": PLMSSampler, "ddim": DDIMSampler, "dpmpp2m": DPMSolverSampler}[name](self.model)


@contextlib.contextmanager
def spaced_timesteps(timesteps: list[int] | None):
    """Within the block ldm's samplers take `timesteps` (ascending, as models.samplers.ddim_timesteps
    gives them) instead of their 'uniform' ones; None: ldm's own. Only the choice of timesteps changes:
    ldm's make_ddim_sampling_parameters and its step arithmetic stay as they are."""
    import ldm.models.diffusion.ddim as ldm_ddim
    import ldm.models.diffusion.plms as ldm_plms

    if timesteps is None:
        yield
        return
    saved = ldm_ddim.make_ddim_timesteps, ldm_plms.make_ddim_timesteps

    def chosen(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, verbose=True):
        return np.asarray(timesteps, dtype=np.int64)

    ldm_ddim.make_ddim_timesteps = ldm_plms.make_ddim_timesteps = chosen
    try:
        yield
    finally:
        ldm_ddim.make_ddim_timesteps, ldm_plms.make_ddim_timesteps = saved


@contextlib.contextmanager
def seeded_noise(gen: torch.Generator):
    """Within the block ldm's samplers draw their step noise (noise_like: the global RNG, on the device)
    from the CPU generator `gen` instead, one draw per step as the native samplers do."""
    import ldm.models.diffusion.ddim as ldm_ddim
    import ldm.models.diffusion.plms as ldm_plms

    saved = ldm_ddim.noise_like, ldm_plms.noise_like

    def draw(shape, device, repeat=False):
        return torch.randn(shape, generator=gen).to(device)

    ldm_ddim.noise_like = ldm_plms.noise_like = draw
    try:
        yield
    finally:
        ldm_ddim.noise_like, ldm_plms.noise_like = saved


def guided(out: torch.Tensor, scale: float, doubled: bool) -> torch.Tensor:
    """ldm's classifier-free guidance on one UNet output (uncond half first), the same operations."""
    if not doubled:
        return out
    e_u, e_c = out.chunk(2)
    return e_u + scale * (e_c - e_u)


@dataclasses.dataclass
class ReferenceRun:
    """What one ldm sampler run went through, step by step (CPU float32 tensors)."""

    timesteps: list                    # t of each step, in sampling order (dpmpp2m: the fractional UNet timestep)
    latents: list[torch.Tensor]        # x after each step [1, C, h, w]
    eps: list[list[torch.Tensor]]      # per step, the guided eps of each UNet call (PLMS' first step: two)
    gen_states: list[torch.Tensor]     # the noise generator's state when each step began
    unet_inputs: dict[int, dict]       # step -> {"x", "t", "context"} of its first UNet call (both halves)


@torch.no_grad()
def run_reference(ref: ReferencePipeline, sampler: str, steps: int, x_T: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor | None, scale: float, eta: float, gen: torch.Generator,
                  record_steps=(), spacing: str = "ldm", on_step=None) -> ReferenceRun:
    """ldm's sampler.sample(...) from x_T; its per-step function and the UNet calls are observed, not replaced.
    spacing other than ldm: the sampler runs on those timesteps (spaced_timesteps). `on_step(done)` after
    each step."""
    if sampler == "dpmpp2m":
        return _run_reference_dpm(ref, steps, x_T, cond, uncond, scale, gen, record_steps, on_step)
    s = ref.sampler(sampler)
    run = ReferenceRun([], [], [], [], {})
    name = f"p_sample_{sampler}"
    step_fn = getattr(s, name)
    doubled = uncond is not None and scale != 1.0  # ldm's own test for the batched call

    def step(x, c, t, *args, **kwargs):
        run.timesteps.append(int(t[0]))
        run.eps.append([])
        run.gen_states.append(gen.get_state())
        out = step_fn(x, c, t, *args, **kwargs)
        run.latents.append(out[0].float().cpu())
        if on_step is not None:
            on_step(len(run.latents))
        return out

    def on_call(x, t, c, out):
        i = len(run.latents)
        if i in record_steps and i not in run.unet_inputs:
            run.unet_inputs[i] = {"x": x.float().cpu(), "t": t.cpu(), "context": c.float().cpu()}
        run.eps[-1].append(guided(out, scale, doubled).float().cpu())

    setattr(s, name, step)  # an instance attribute: ldm's loop calls self.p_sample_*
    ref.model.on_call = on_call
    quiet = io.StringIO()  # ldm prints shapes and a progress bar
    try:
        chosen = None if spacing == "ldm" else ddim_timesteps(steps, ref.model.num_timesteps, spacing)
        with seeded_noise(gen), spaced_timesteps(chosen), contextlib.redirect_stdout(quiet), \
                contextlib.redirect_stderr(quiet):
            s.sample(S=steps, batch_size=1, shape=tuple(x_T.shape[1:]), conditioning=cond.to(ref.device),
                     verbose=False, unconditional_guidance_scale=scale, eta=eta, x_T=x_T.to(ref.device),
                     unconditional_conditioning=None if uncond is None else uncond.to(ref.device))
    finally:
        ref.model.on_call = None
    return run


@contextlib.contextmanager
def observed_dpm_solver(on_eps, on_step):
    """Within the block the DPMSolverSampler builds a DPM_Solver subclass that reports each guided eps
    (`on_eps(t_continuous, eps)`: its model_fn's output, v already converted) and each step's result
    (`on_step(x)`). ldm's multistep loop has no per-step method; each step is one call of
    multistep_dpm_solver_update, so that is what is observed. The arithmetic is ldm's, untouched."""
    import ldm.models.diffusion.dpm_solver.sampler as ldm_dpm

    base = ldm_dpm.DPM_Solver

    class Observed(base):
        def noise_prediction_fn(self, x, t):
            out = super().noise_prediction_fn(x, t)
            on_eps(t, out)
            return out

        def multistep_dpm_solver_update(self, *args, **kwargs):
            out = super().multistep_dpm_solver_update(*args, **kwargs)
            on_step(out)
            return out

    ldm_dpm.DPM_Solver = Observed
    try:
        yield
    finally:
        ldm_dpm.DPM_Solver = base


@torch.no_grad()
def _run_reference_dpm(ref: ReferencePipeline, steps: int, x_T, cond, uncond, scale: float, gen: torch.Generator,
                       record_steps, on_step) -> ReferenceRun:
    """ldm's DPMSolverSampler.sample(...) from x_T, observed. Step i makes one UNet call (at its start
    latent, before the update), so a call's eps and inputs belong to the step the next update ends."""
    s = ref.sampler("dpmpp2m")
    run = ReferenceRun([], [], [], [], {})
    n_total = ref.model.num_timesteps

    def on_call(x, t, c, out):
        i = len(run.eps)
        if i in record_steps and i not in run.unet_inputs:
            run.unet_inputs[i] = {"x": x.float().cpu(), "t": t.cpu(), "context": c.float().cpu()}

    def eps_seen(t, eps):
        run.timesteps.append(round(float((t[0] - 1.0 / n_total) * 1000.0), 3))  # the UNet timestep (model_wrapper)
        run.eps.append([eps.float().cpu()])
        run.gen_states.append(gen.get_state())  # unused: DPM-Solver++(2M) draws no noise

    def step_done(x):
        run.latents.append(x.float().cpu())
        if on_step is not None:
            on_step(len(run.latents))

    ref.model.on_call = on_call
    quiet = io.StringIO()  # ldm prints shapes and tqdm bars
    try:
        with observed_dpm_solver(eps_seen, step_done), contextlib.redirect_stdout(quiet), \
                contextlib.redirect_stderr(quiet):
            s.sample(S=steps, batch_size=1, shape=tuple(x_T.shape[1:]), conditioning=cond.to(ref.device),
                     verbose=False, unconditional_guidance_scale=scale, x_T=x_T.to(ref.device),
                     unconditional_conditioning=None if uncond is None else uncond.to(ref.device))
    finally:
        ref.model.on_call = None
    return run


# ---------------------------------------------------------------------------------------------
# Native teacher-forced steps
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_forced_step(i: int, sampler: str, denoiser, schedule, steps: int, eta: float, x_T: torch.Tensor,
                        run: ReferenceRun, device, spacing: str = "ldm") -> tuple[torch.Tensor, float]:
    """One native sampler step (models/samplers.py, unchanged) from the reference's state before step i.
    Returns (x~_i on the CPU, max |latent the native step started from - the reference's|).

    DDIM keeps no state: sample_ddim starts at sub-schedule index n - 1 - i from the reference latent,
    with the noise generator in the state the reference's had (eta > 0).
    PLMS keeps the last three eps: sample_plms runs from x_T with a denoiser that replays the
    reference's guided eps for steps 0 .. i-1 (so its history is the reference's, bit for bit, and
    its latent is the reference's to float32 rounding of the update: the returned deviation, 0 when
    the update arithmetic matches ldm's exactly), and calls the native UNet from step i on.
    dpmpp2m keeps the previous step's x0 prediction: the same replay, with sample_dpmpp2m (the replayed
    eps give the reference's x0 history through the native, ldm-identical, data-prediction arithmetic).
    """
    n = len(run.latents)
    start_ref = x_T if i == 0 else run.latents[i - 1]
    if sampler == "ddim":
        gen = torch.Generator().set_state(run.gen_states[i]) if eta > 0 else None
        it = sample_ddim(denoiser, start_ref.to(device), schedule, steps, eta=eta, generator=gen, t_start=n - i,
                         spacing=spacing)
        return next(iter(it)).float().cpu(), 0.0
    replay = [e for calls in run.eps[:i] for e in calls]
    seen: dict = {"calls": 0}

    def forced(x, t):
        k = seen["calls"]
        seen["calls"] = k + 1
        if k < len(replay):
            return replay[k].to(x.device)
        seen.setdefault("start", x.float().cpu())
        return denoiser(x, t)

    if sampler == "dpmpp2m":
        it = sample_dpmpp2m(forced, x_T.to(device), schedule, steps)
    else:
        it = sample_plms(forced, x_T.to(device), schedule, steps, spacing=spacing)
    for j, x in enumerate(it):
        if j == i:
            return x.float().cpu(), float((seen["start"] - start_ref).abs().max())
    raise AssertionError(f"sample_{sampler} yielded fewer than {i + 1} steps")


# ---------------------------------------------------------------------------------------------
# Per-layer UNet comparison on a recorded call
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def latent_tolerance(dtype: str) -> Tolerance:
    """The per-step latent gate: the dtype's default rel_l2 (latents differ in scale from step to step)."""
    return Tolerance(rel_l2=default_tolerance(dtype).rel_l2)


@dataclasses.dataclass
class Txt2ImgResult:
    inputs: dict
    settings: dict
    device: str
    dtype: str
    gate: dict                       # {"dtype", "latent": Tolerance, "image_psnr_db"}
    steps: list[dict]                # {"step", "t", "free", "teacher_forced", "failures"}
    image: dict                      # metrics of the decoded images, plus "failures"
    conditioning: dict               # native text encoder against the reference's: {"cond", "uncond"}
    layers: dict[int, ParityResult]  # step -> per-layer UNet comparison
    notes: list[str]
    versions: dict
    reference_image: torch.Tensor = dataclasses.field(repr=False)
    native_image: torch.Tensor = dataclasses.field(repr=False)

    @property
    def failures(self) -> list[str]:
        out = [f"step {s['step']} (t={s['t']}) teacher-forced: {'; '.join(s['failures'])}"
               for s in self.steps if s["failures"]]
        if self.image["failures"]:
            out.append(f"image: {'; '.join(self.image['failures'])}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        from .metrics import DEFINITIONS, tolerance_to_dict

        layers = []
        for step, res in self.layers.items():
            rep, cul = res.report, res.report.culprit
            worst = sorted(rep.layers, key=worst_key, reverse=True)[:10]
            layers.append({"step": step, "t": self.steps[step]["t"], "passed": rep.passed, "counts": rep.counts(),
                           "culprit": None if cul is None else cul.line(),
                           "worst": [{"native": l.native, "reference": l.reference, "kind": l.kind,
                                      "rel_l2": {m: v.get("rel_l2") for m, v in l.metrics.items()},
                                      "status": l.status} for l in worst],
                           "report": res.to_dict()})
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "passed": self.passed, "failures": self.failures,
            "inputs": self.inputs, "settings": self.settings, "versions": self.versions,
            "device": self.device, "dtype": self.dtype, "reference_dtype": "fp32",
            "gate": {"dtype": self.gate["dtype"], "latent": tolerance_to_dict(self.gate["latent"]),
                     "image_psnr_db": self.gate["image_psnr_db"]},
            "definitions": {**DEFINITIONS,
                            FREE: "native pipeline run end to end from x_T, its latent after step i against the "
                                  "reference's",
                            TEACHER: "one native sampler step from the reference's state before step i (latent, "
                                     "PLMS eps / DPM-Solver x0 history, text context) against the reference's "
                                     "latent after it",
                            "start_max_abs": "max |latent the teacher-forced step started from - the reference's|"},
            "notes": self.notes, "conditioning": self.conditioning, "steps": self.steps, "image": self.image,
            "layers_at_steps": layers,
        }


def _layer_steps(layer_steps, n: int) -> list[int]:
    """Default: first, middle, last."""
    chosen = sorted({0, n // 2, n - 1}) if layer_steps is None else sorted(set(layer_steps))
    bad = [s for s in chosen if not 0 <= s < n]
    if bad:
        raise ParityError(f"--layer-steps {bad[0]}: this run has {n} steps, numbered 0 to {n - 1}")
    return chosen


@torch.no_grad()
def run_txt2img(checkpoint: str, *, prompt: str, h5: str | None = None, negative: str = "", steps: int = 50,
                spacing: str = "ldm", scale: float = 7.5, sampler: str = "plms", eta: float = 0.0, seed: int = 42,
                height: int | None = None, width: int | None = None, device: str = "cpu", dtype: str = "fp32", layer_steps=None,
                gate_dtype: str | None = None, tolerance: Tolerance | None = None,
                image_psnr_db: float | None = None, workdir: str | None = None, progress=None,
                models: P.Models | None = None, reference: ReferencePipeline | None = None) -> Txt2ImgResult:
    """Reference (ldm's sampler, fp32) against the native pipeline (`dtype`) for one txt2img request.
    `models` (of `h5`, on `device` in `dtype`) and `reference` (of `checkpoint`, on `device`) are loaded
    parts to reuse from run to run (a sweep's worker keeps them); None loads them here.
    The gates use `gate_dtype`'s defaults (default: `dtype`), or `tolerance` / `image_psnr_db`.
    The image size defaults to the model's usual latent side (harness.default_size: 64 for SD v1, so
    512x512) times the VAE's factor; ldm materialises each attention matrix, so a tiny model at 512x512
    would need tens of GiB."""
    if sampler not in P.SAMPLERS:
        raise SdportError(f"sampler {sampler!r}: choose {', '.join(P.SAMPLERS)}")
    dev = resolve_device(device)
    dtype_of(dtype)  # the name checked before any work
    gate_dtype = dtype_key(gate_dtype or dtype)
    tol = tolerance or latent_tolerance(gate_dtype)
    psnr_min = IMAGE_PSNR_DB[gate_dtype] if image_psnr_db is None else float(image_psnr_db)
    progress = progress or no_progress  # progress(what, done, total, unit) as steps and layers complete
    deterministic()
    with contextlib.ExitStack() as stack:
        work = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sdport-txt2img-"))
        h5 = ensure_h5(checkpoint, h5, work, P.NEEDS["txt2img"])
        if models is None:  # one native model at a time, each freed after its stage
            models = stack.enter_context(P.Models(h5, device=dev, dtype=dtype, low_memory=True))
        side = default_size("unet", models.config("unet")) * models.config("decoder").downscale
        height, width = height or side, width or side
        req = P.Request(prompt=prompt, negative=negative, steps=steps, scale=scale, seed=seed, sampler=sampler,
                        eta=eta, height=height, width=width, spacing=spacing)
        P.check_request(models, req, "txt2img")  # the native pipeline's own checks, before any work
        if P.prediction(models) == "v" and sampler == "plms":
            raise ParityError(f"{h5}: a v-prediction UNet; ldm's PLMSSampler steps with v as if it were eps, so "
                              "it is no reference for it: use --sampler ddim (the native PLMS converts v to eps)")
        h, w = P.check_size(models, height, width, "--")
        n = P.total_steps(req)
        chosen = _layer_steps(layer_steps, n)
        ucfg = models.config("unet")
        fmt = models.reader.group_attrs("unet").get("source_format", "compvis")

        # The reference pipeline runs first, one part at a time (unless the caller keeps it loaded), and is
        # freed before any native model is loaded: its per-step latents and eps stay in memory (one latent
        # each), the chosen steps' UNet layers go to disk.
        own = reference is None
        ref = reference or ReferencePipeline(checkpoint, device=dev, num_heads=ucfg.num_heads,
                                             num_head_channels=ucfg.num_head_channels, lazy=True)
        ref.model.parameterization = P.prediction(models)  # what ldm's DDIMSampler reads
        notes = list(models.notes) + ([ref.note] if ref.note else [])
        tok, pad = default_tokenizer(), models.config("text_model").pad_id  # END for SD v1, 0 for SD 2.x
        ids = torch.tensor([tok(negative, pad), tok(prompt, pad)], dtype=torch.long)  # [2, 77], uncond first
        ref_uc, ref_c = ref.encode_ids(ids).float().chunk(2)
        if req.scale == 1.0:
            ref_uc = None  # no unconditional branch, as in ldm and the native pipeline (P.conditioning)
        if own:
            ref.release("text_model")
        gen = torch.Generator().manual_seed(seed)
        x_T = torch.randn((1, ucfg.out_channels, h, w), generator=gen, dtype=torch.float32)  # as the pipeline
        run = run_reference(ref, sampler, steps, x_T, ref_c, ref_uc, scale, eta, gen, set(chosen), spacing,
                            on_step=lambda done: progress("reference sampler", done, n, "step"))
        recorded = {}
        for s in chosen:
            memory.release()  # what the sampler or the last pass left in the allocator's heaps
            recorded[s] = stack.enter_context(reference_stage(
                "unet", ref.unet, ucfg, fmt, to_device(run.unet_inputs[s], dev), work,
                progress=lambda what, done, total, unit="layer", s=s: progress(f"step {s} {what}", done, total, unit)))
        if own:
            ref.release("unet")
        ref_image = ref.decode(run.latents[-1])
        del ref
        memory.release()

        nat_c, nat_uc = P.conditioning(models, req)
        conditioning = {"cond": compare(nat_c, ref_c)}
        if nat_uc is not None:
            conditioning["uncond"] = compare(nat_uc, ref_uc)

        free = []
        for x in P.txt2img(models, req):
            free.append(x.float().cpu())
            progress("native sampler", len(free), n, "step")
        if not len(free) == len(run.latents) == n:
            raise AssertionError(f"step counts differ: native {len(free)}, reference {len(run.latents)}, expected {n}")

        records = []
        with models.use("unet") as unet:
            # the pipeline's own guided denoiser (v converted as the sampler needs), on the reference's context
            denoiser = P.guided(models, P.unet_fn(unet), ref_c.to(dev), None if ref_uc is None else ref_uc.to(dev),
                                scale, sampler)
            for i in range(n):
                x, dev_start = teacher_forced_step(i, sampler, denoiser, models.schedule, steps, eta, x_T, run, dev,
                                                   spacing)
                tf = {**compare(x, run.latents[i]), "start_max_abs": dev_start}
                records.append({"step": i, "t": run.timesteps[i], FREE: compare(free[i], run.latents[i]),
                                TEACHER: tf, "failures": check(tf, tol)[1]})
                progress("teacher-forced steps", i + 1, n, "step")

            layer_tol = default_tolerance(gate_dtype)
            layers = {}
            for s in chosen:
                inp = run.unet_inputs[s]
                desc = {"step": s, "t": inp["t"].tolist(), "seed": seed,
                        "source": "the reference sampler's first UNet call of this step: x_t, t and context as "
                                  "it batched them (uncond half first)" + ("" if ref_uc is not None else
                                                                          " (scale 1: one half)"),
                        "shapes": {k: list(v.shape) for k, v in inp.items()}}
                layers[s] = candidate_stage("unet", unet, recorded[s], to_device(inp, dev), dtype, dev, layer_tol, desc,
                                            progress=lambda what, done, total, unit="layer", s=s:
                                            progress(f"step {s} {what}", done, total, unit))

        del unet, denoiser  # with low_memory the UNet is freed once nothing here holds it
        native_image = P.decode(models, free[-1])
        image = compare(native_image, ref_image)
        image["reference_std"] = float(ref_image.std())
        fails = check(image, Tolerance(psnr_db=psnr_min))[1]
        image["failures"] = [f.replace("psnr_db", "image psnr_db") for f in fails]

        inputs = {"checkpoint": os.path.basename(checkpoint), "h5": os.path.basename(h5), "prompt": prompt,
                  "negative": negative, "seed": seed,
                  "x_T": {"how": f"torch.randn(generator=torch.Generator('cpu').manual_seed({seed})), float32, "
                                 "drawn first; DDIM eta noise follows from the same generator",
                          "shape": list(x_T.shape)},
                  "token_ids": "native tokenizer, the same ids into both text encoders",
                  "timesteps": run.timesteps}
        settings = {"sampler": sampler, "steps": steps, "spacing": spacing, "scale": scale, "eta": eta, "height": height,
                    "width": width, "latent_steps": n, "layer_steps": chosen}
        return Txt2ImgResult(inputs, settings, device_name(dev), dtype,
                             {"dtype": gate_dtype, "latent": tol, "image_psnr_db": psnr_min}, records, image,
                             conditioning, layers, notes, collect_versions(), ref_image, native_image)
