"""DDIM / PLMS samplers against ldm's DDIMSampler and PLMSSampler, step by step.

ldm's samplers are driven by a small stand-in for LatentDiffusion (ldm.models.diffusion.ddpm needs
pytorch_lightning) whose eps model is a tiny random conv net with timestep and context terms.
Noise is fed to both sides from identically seeded CPU generators, drawn in the same order.
"""
from functools import partial

import numpy as np
import pytest
import torch

import ldm.models.diffusion.ddim as ldm_ddim
import ldm.models.diffusion.plms as ldm_plms
from ldm.modules.diffusionmodules.util import (
    extract_into_tensor,
    make_beta_schedule,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
)

from sdport.models import samplers as S

B, C, H, W, L, D = 2, 4, 8, 8, 5, 8  # batch, latent channels, latent size, context tokens, width
SCALE = 7.5


def rel_l2(a, r):
    return ((a.double() - r.double()).norm() / r.double().norm()).item()


class TinyEps(torch.nn.Module):
    """A deterministic, non-trivial eps(x, t, context): channel mix + spatial neighbours + timestep
    features + a context term. (No Conv2d: a 4-channel 3x3 conv costs ~20 ms per call on this CPU.)"""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.nn.Parameter(0.3 * torch.randn(C, C, generator=g))
        self.mix_nb = torch.nn.Parameter(0.3 * torch.randn(C, C, generator=g))
        self.ctx = torch.nn.Parameter(0.3 * torch.randn(C, D, generator=g))
        self.freq = torch.randn(C, generator=g)

    def forward(self, x, t, c):
        # sum of the 4 neighbours (periodic), so each output pixel depends on its surroundings
        nb = sum(torch.roll(x, s, dims=d) for s in (1, -1) for d in (2, 3))  # [B, C, H, W]
        h = torch.einsum("oc,bchw->bohw", self.mix, x) + torch.einsum("oc,bchw->bohw", self.mix_nb, nb)
        temb = torch.sin(t.float()[:, None] / 100.0 * self.freq)  # [B, C]
        cemb = c.mean(1) @ self.ctx.T  # [B, C]
        return torch.tanh(h + temb[:, :, None, None] + cemb[:, :, None, None]) + 0.1 * x


class StandIn:
    """The attributes ldm's samplers read from LatentDiffusion, built the way ddpm.register_schedule does."""

    parameterization = "eps"

    def __init__(self, eps, noise_gen=None):
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.0120)
        ac = np.cumprod(1.0 - betas, axis=0)
        to_torch = partial(torch.tensor, dtype=torch.float32)
        self.betas = to_torch(betas)
        self.alphas_cumprod = to_torch(ac)
        self.alphas_cumprod_prev = to_torch(np.append(1.0, ac[:-1]))
        self.sqrt_alphas_cumprod = to_torch(np.sqrt(ac))
        self.sqrt_one_minus_alphas_cumprod = to_torch(np.sqrt(1.0 - ac))
        self.num_timesteps = 1000
        self.device = torch.device("cpu")
        self.eps = eps
        self.noise_gen = noise_gen

    def apply_model(self, x, t, c):
        return self.eps(x, t, c)

    def q_sample(self, x_start, t, noise=None):
        if noise is None:
            noise = torch.randn(x_start.shape, generator=self.noise_gen)
        shape = (t.shape[0], 1, 1, 1)
        return (self.sqrt_alphas_cumprod.gather(-1, t).reshape(shape) * x_start
                + self.sqrt_one_minus_alphas_cumprod.gather(-1, t).reshape(shape) * noise)


@pytest.fixture(scope="module")
def eps():
    return TinyEps().eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1234)
    return {
        "x_T": torch.randn(B, C, H, W, generator=g),
        "cond": torch.randn(B, L, D, generator=g),
        "uncond": torch.randn(B, L, D, generator=g),
        "x0": torch.randn(B, C, H, W, generator=g),
        # mask == 1 keeps x0: the left half is known, the right half is generated
        "mask": torch.cat([torch.ones(1, 1, H, W // 2), torch.zeros(1, 1, H, W // 2)], dim=3),
    }


@pytest.fixture(scope="module")
def schedule():
    return S.linear_schedule()


def patch_noise(monkeypatch, module, gen):
    """Make ldm's noise_like draw from `gen` (CPU), as our samplers do."""
    def noise_like(shape, device, repeat=False):
        assert not repeat
        return torch.randn(shape, generator=gen).to(device)
    monkeypatch.setattr(module, "noise_like", noise_like)


def record(sampler, name):
    """Wrap sampler.<name> (p_sample_ddim / p_sample_plms) to capture each step's (x_prev, pred_x0)."""
    steps = []
    inner = getattr(sampler, name)

    def wrapped(*args, **kwargs):
        out = inner(*args, **kwargs)
        steps.append((out[0].clone(), out[1].clone()))
        return out

    setattr(sampler, name, wrapped)
    return steps


def run_native(gen_fn):
    latents, denoised = [], []
    for x in gen_fn(lambda d: denoised.append(d["denoised"].clone())):
        latents.append(x.clone())
    return latents, denoised


def assert_steps_match(native, native_x0, ref_steps, n_expected):
    assert len(native) == len(ref_steps) == n_expected
    for i, (x, (rx, rx0)) in enumerate(zip(native, ref_steps)):
        assert rx.norm() > 1e-2 * rx.numel() ** 0.5, f"reference latent degenerate at step {i}"
        err = rel_l2(x, rx)
        assert err <= 1e-5, f"step {i}: latent rel_l2 {err:.3e}"
        err0 = rel_l2(native_x0[i], rx0)
        assert err0 <= 1e-5, f"step {i}: pred_x0 rel_l2 {err0:.3e}"
    # the sampler actually moved the latent
    assert rel_l2(ref_steps[0][0], ref_steps[-1][0]) > 0.1


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def test_linear_schedule_matches_ldm(schedule):
    ref = StandIn(None)
    assert schedule.num_timesteps == 1000
    for name in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        assert torch.equal(getattr(schedule, name), getattr(ref, name)), name


def test_schedule_from_alphas_cumprod_only_is_close(schedule):
    s = S.Schedule.from_alphas_cumprod(schedule.alphas_cumprod)
    assert torch.equal(s.alphas_cumprod, schedule.alphas_cumprod)
    # recomputed from float32 alpha-bar: sqrt(abar) is within an ulp of ldm's float64-derived value
    assert torch.allclose(s.sqrt_alphas_cumprod, schedule.sqrt_alphas_cumprod, rtol=2e-7, atol=0)
    # sqrt(1 - abar) is not: near t = 0, 1 - abar ~ 1e-3 cancels the float32 rounding of abar
    # (~3e-8 absolute) into ~1e-5 relative. Pass the checkpoint's buffers for exact ldm parity.
    d = s.sqrt_one_minus_alphas_cumprod.double() - schedule.sqrt_one_minus_alphas_cumprod.double()
    rel = d.abs() / schedule.sqrt_one_minus_alphas_cumprod.double()
    assert rel.max() < 2e-5 and rel[500:].max() < 2e-7
    # and it is exactly the float64 recomputation from the float32 input
    ac64 = schedule.alphas_cumprod.double()
    assert torch.equal(s.sqrt_one_minus_alphas_cumprod, (1.0 - ac64).sqrt().float())


@pytest.mark.parametrize("steps", [1, 7, 10, 20, 30, 50, 100, 250, 334, 500])
def test_ddim_timesteps_and_coefficients_match_ldm(steps, schedule):
    assert S.ddim_timesteps(steps) == make_ddim_timesteps("uniform", steps, 1000, verbose=False).tolist()
    ac = StandIn(None).alphas_cumprod
    ts = make_ddim_timesteps("uniform", steps, 1000, verbose=False)
    eta = 0.7
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(ac, ts, eta, verbose=False)
    d = S.Schedule.from_alphas_cumprod(ac).ddim(steps, eta)
    # ldm turns each coefficient into a float32 tensor with torch.full; compare after that cast
    f32 = lambda v: torch.tensor([float(x) for x in v], dtype=torch.float64).float()  # noqa: E731
    assert torch.equal(d.alphas, alphas)
    assert torch.equal(d.alphas_prev, f32(alphas_prev))
    assert torch.equal(d.sigmas, f32(sigmas))
    assert torch.equal(d.sqrt_one_minus_alphas, np.sqrt(1.0 - alphas))


def test_ddim_timesteps_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps must be in"):
        S.ddim_timesteps(0)
    for steps in (333, 501, 1000):  # ldm fails on these with an IndexError
        with pytest.raises(ValueError, match="past the schedule"):
            S.ddim_timesteps(steps)


def test_ldm_refusal_names_the_nearest_counts_it_takes():
    for steps, near in ((3, "2 or 4"), (333, "250 or 334"), (999, "500$")):
        with pytest.raises(ValueError, match=f"nearest counts it takes: {near}"):
            S.ddim_timesteps(steps)
    assert S.nearest_step_counts(3) == [2, 4] and S.nearest_step_counts(1000, spacing="leading") == [999]
    for n in S.nearest_step_counts(101):
        S.ddim_timesteps(n)  # both accepted


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_other_spacings_run_exactly_the_steps_asked(spacing):
    top = 999 if spacing == "leading" else 1000  # leading's steps_offset puts 1000 steps' last at 1000
    for steps in range(1, top + 1):
        ts = S.ddim_timesteps(steps, 1000, spacing)
        assert len(ts) == len(set(ts)) == steps and ts == sorted(ts) and 0 <= ts[0] and ts[-1] <= 999, steps
    with pytest.raises(ValueError, match="spacing 'uniform'"):
        S.ddim_timesteps(10, 1000, "uniform")


def test_spacings_are_diffusers_timesteps():
    diffusers = pytest.importorskip("diffusers")
    for spacing in ("linspace", "leading", "trailing"):
        sch = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      steps_offset=1, set_alpha_to_one=False, timestep_spacing=spacing)
        for steps in (1, 3, 7, 9, 27, 37, 48, 50, 101, 150, 333, 999):
            sch.set_timesteps(steps)
            assert S.ddim_timesteps(steps, 1000, spacing) == sorted(sch.timesteps.tolist()), (spacing, steps)
        # where float error gives diffusers one entry too many (a timestep of -1), the first `steps` agree
        sch.set_timesteps(61)
        theirs = sorted(sch.timesteps.tolist())
        if spacing == "trailing":
            assert theirs[0] == -1 and S.ddim_timesteps(61, 1000, spacing) == theirs[1:]


@pytest.mark.parametrize("sampler", ["plms", "ddim"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_spacings_step_as_ldm_does_on_those_timesteps(sampler, spacing, eps, inputs, schedule, monkeypatch):
    # ldm's sampler given the same timesteps (its make_ddim_timesteps replaced): same steps, to fp32 rounding
    steps = 9
    ts = S.ddim_timesteps(steps, 1000, spacing)
    module = ldm_plms if sampler == "plms" else ldm_ddim
    monkeypatch.setattr(module, "make_ddim_timesteps", lambda *a, **k: np.asarray(ts, dtype=np.int64))
    model = StandIn(eps)
    ref_sampler = module.PLMSSampler(model) if sampler == "plms" else module.DDIMSampler(model)
    ref = record(ref_sampler, f"p_sample_{sampler}")
    ldm_sample(ref_sampler, steps, inputs)
    denoiser = S.cfg_denoiser(eps, inputs["cond"], inputs["uncond"], SCALE)
    run = S.sample_plms if sampler == "plms" else S.sample_ddim
    with torch.no_grad():
        native, native_x0 = run_native(lambda cb: run(denoiser, inputs["x_T"], schedule, steps, callback=cb,
                                                      spacing=spacing))
    assert_steps_match(native, native_x0, ref, steps)


# ---------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------


def test_cfg_denoiser_batches_uncond_first(eps, inputs):
    calls = []

    def unet(x, t, c):
        calls.append((x.shape[0], c))
        return eps(x, t, c)

    x, t = inputs["x_T"], torch.tensor([981, 981])
    d = S.cfg_denoiser(unet, inputs["cond"], inputs["uncond"], SCALE)
    out = d(x, t)
    assert len(calls) == 1 and calls[0][0] == 2 * B
    assert torch.equal(calls[0][1], torch.cat([inputs["uncond"], inputs["cond"]]))
    e_u, e_c = eps(x, t, inputs["uncond"]), eps(x, t, inputs["cond"])
    assert torch.allclose(out, e_u + SCALE * (e_c - e_u), rtol=1e-5, atol=1e-5)
    # scale 1 or no uncond: one plain call, exactly the conditional eps
    assert torch.equal(S.cfg_denoiser(unet, inputs["cond"], inputs["uncond"], 1.0)(x, t), e_c)
    assert torch.equal(S.cfg_denoiser(unet, inputs["cond"], None, SCALE)(x, t), e_c)


# ---------------------------------------------------------------------------------------------
# Samplers vs ldm
# ---------------------------------------------------------------------------------------------


def ldm_sample(sampler, steps, inputs, eta=0.0, masked=False):
    kw = dict(mask=inputs["mask"], x0=inputs["x0"]) if masked else {}
    with torch.no_grad():
        sampler.sample(
            S=steps, batch_size=B, shape=(C, H, W), conditioning=inputs["cond"], eta=eta,
            x_T=inputs["x_T"].clone(), unconditional_guidance_scale=SCALE,
            unconditional_conditioning=inputs["uncond"], verbose=False, **kw,
        )


@pytest.mark.parametrize("masked", [False, True], ids=["txt2img", "masked"])
@pytest.mark.parametrize("steps", [10, 50])
def test_plms_matches_ldm(steps, masked, eps, inputs, schedule, monkeypatch):
    seed = 77
    model = StandIn(eps, noise_gen=torch.Generator().manual_seed(seed))
    sampler = ldm_plms.PLMSSampler(model)
    ref = record(sampler, "p_sample_plms")
    ldm_sample(sampler, steps, inputs, masked=masked)

    denoiser = S.cfg_denoiser(eps, inputs["cond"], inputs["uncond"], SCALE)
    kw = dict(mask=inputs["mask"], x0=inputs["x0"]) if masked else {}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        native, native_x0 = run_native(
            lambda cb: S.sample_plms(denoiser, inputs["x_T"], schedule, steps, generator=gen, callback=cb, **kw)
        )
    assert_steps_match(native, native_x0, ref, steps)


@pytest.mark.parametrize("masked", [False, True], ids=["txt2img", "masked"])
@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_ldm(steps, eta, masked, eps, inputs, schedule, monkeypatch):
    seed = 99
    shared = torch.Generator().manual_seed(seed)
    # with eta 0 ldm still draws (and multiplies by 0) step noise; keep it off the shared stream
    patch_noise(monkeypatch, ldm_ddim, shared if eta > 0 else torch.Generator().manual_seed(5))
    model = StandIn(eps, noise_gen=shared)
    sampler = ldm_ddim.DDIMSampler(model)
    ref = record(sampler, "p_sample_ddim")
    ldm_sample(sampler, steps, inputs, eta=eta, masked=masked)

    denoiser = S.cfg_denoiser(eps, inputs["cond"], inputs["uncond"], SCALE)
    kw = dict(mask=inputs["mask"], x0=inputs["x0"]) if masked else {}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        native, native_x0 = run_native(
            lambda cb: S.sample_ddim(denoiser, inputs["x_T"], schedule, steps, eta=eta, generator=gen,
                                     callback=cb, **kw)
        )
    assert_steps_match(native, native_x0, ref, steps)
    if masked:
        # the known (left) half follows x0 far more closely than the generated half
        out = native[-1]
        known = rel_l2(out[..., : W // 2], inputs["x0"][..., : W // 2])
        free = rel_l2(out[..., W // 2 :], inputs["x0"][..., W // 2 :])
        assert known < 0.5 * free


def test_masked_convention_keeps_x0_where_mask_is_one(eps, inputs, schedule):
    """mask == 1 everywhere: every step starts from q_sample(x0, t), so the result tracks x0."""
    denoiser = S.cfg_denoiser(eps, inputs["cond"], inputs["uncond"], SCALE)
    mask = torch.ones(1, 1, H, W)
    with torch.no_grad():
        *_, out = S.sample_ddim(denoiser, inputs["x_T"], schedule, 20, mask=mask, x0=inputs["x0"],
                                generator=torch.Generator().manual_seed(0))
    # the last step starts from q_sample(x0, t=1): sqrt(abar_1) ~ 0.9991, so a small residual only
    assert rel_l2(out, inputs["x0"]) < 0.1


@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("steps", [10, 50])
def test_img2img_matches_ldm(steps, eta, eps, inputs, schedule, monkeypatch):
    strength = 0.75
    seed = 31
    shared = torch.Generator().manual_seed(seed)
    patch_noise(monkeypatch, ldm_ddim, shared if eta > 0 else torch.Generator().manual_seed(5))
    sampler = ldm_ddim.DDIMSampler(StandIn(eps))
    ref = record(sampler, "p_sample_ddim")
    # what ldm's scripts/img2img.py does
    sampler.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
    t_enc = int(strength * steps)
    with torch.no_grad():
        z_enc = sampler.stochastic_encode(inputs["x0"], torch.tensor([t_enc] * B),
                                          noise=torch.randn(inputs["x0"].shape, generator=shared))
        sampler.decode(z_enc, inputs["cond"], t_enc, unconditional_guidance_scale=SCALE,
                       unconditional_conditioning=inputs["uncond"])

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(inputs["x0"].shape, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(S.stochastic_encode(inputs["x0"], schedule, steps, t_enc, noise), z_enc)
    denoiser = S.cfg_denoiser(eps, inputs["cond"], inputs["uncond"], SCALE)
    with torch.no_grad():
        native, native_x0 = run_native(
            lambda cb: S.sample_img2img(denoiser, inputs["x0"], schedule, steps, strength, eta=eta,
                                        generator=gen, callback=cb)
        )
    assert_steps_match(native, native_x0, ref, t_enc)


# ---------------------------------------------------------------------------------------------
# Odd inputs
# ---------------------------------------------------------------------------------------------


def test_steps_not_dividing_1000_follow_ldm(eps, inputs, schedule):
    # ldm's uniform discretisation gives 31 timesteps for 30 steps; we do the same
    denoiser = S.cfg_denoiser(eps, inputs["cond"])
    with torch.no_grad():
        assert len(list(S.sample_plms(denoiser, inputs["x_T"], schedule, 30))) == 31


def test_bare_alphas_cumprod_tensor_is_accepted(eps, inputs, schedule):
    denoiser = S.cfg_denoiser(eps, inputs["cond"], inputs["uncond"], SCALE)
    with torch.no_grad():
        *_, a = S.sample_ddim(denoiser, inputs["x_T"], schedule, 10)
        *_, b = S.sample_ddim(denoiser, inputs["x_T"], schedule.alphas_cumprod, 10)
    assert torch.equal(a, b)  # txt2img never uses the square roots


def test_errors(eps, inputs, schedule):
    denoiser = S.cfg_denoiser(eps, inputs["cond"])
    with pytest.raises(ValueError, match="mask and x0"):
        next(S.sample_ddim(denoiser, inputs["x_T"], schedule, 10, mask=inputs["mask"]))
    with pytest.raises(ValueError, match="t_enc"):
        next(S.sample_img2img(denoiser, inputs["x0"], schedule, 10, strength=1.0))
    with pytest.raises(ValueError, match="t_enc"):
        next(S.sample_img2img(denoiser, inputs["x0"], schedule, 10, strength=0.05))
    with pytest.raises(ValueError, match="1-D"):
        S.Schedule.from_alphas_cumprod(torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------
# v-prediction (SD 2.x 768-v): the denoiser predicts v; the samplers step with eps = sqrt(abar) v + sqrt(1-abar) x
# ---------------------------------------------------------------------------------------------


class VStandIn(StandIn):
    """LatentDiffusion with parameterization "v": what ldm's DDIMSampler reads to convert."""

    parameterization = "v"

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def predict_start_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)


@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim_on_a_v_model_matches_ldm(eta, eps, inputs, schedule, monkeypatch):
    """ldm 2.1.5's DDIM converts v (guided) to eps; the native one runs on v_to_eps(guided denoiser)."""
    steps, seed = 10, 99
    shared = torch.Generator().manual_seed(seed)
    patch_noise(monkeypatch, ldm_ddim, shared if eta > 0 else torch.Generator().manual_seed(5))
    sampler = ldm_ddim.DDIMSampler(VStandIn(eps, noise_gen=shared))
    ref = record(sampler, "p_sample_ddim")
    ldm_sample(sampler, steps, inputs, eta=eta)

    denoiser = S.v_to_eps(S.cfg_denoiser(eps, inputs["cond"], inputs["uncond"], SCALE), schedule)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        native, native_x0 = run_native(
            lambda cb: S.sample_ddim(denoiser, inputs["x_T"], schedule, steps, eta=eta, generator=gen, callback=cb))
    assert_steps_match(native, native_x0, ref, steps)
    # read as eps, the same outputs give another trajectory: the conversion is not a no-op here
    with torch.no_grad():
        as_eps = list(S.sample_ddim(S.cfg_denoiser(eps, inputs["cond"], inputs["uncond"], SCALE), inputs["x_T"],
                                    schedule, steps, eta=eta, generator=torch.Generator().manual_seed(seed)))
    assert rel_l2(as_eps[-1], native[-1]) > 0.1


def test_plms_on_a_v_model_against_steps_computed_by_hand(eps, inputs, schedule):
    """ldm 2.1.5's PLMS would step with v as if it were eps; the native PLMS converts first. Its first two
    steps (pseudo improved Euler, then Adams-Bashforth 2), written out here from the formulas."""
    steps = 10
    guided = S.cfg_denoiser(eps, inputs["cond"], inputs["uncond"], SCALE)
    with torch.no_grad():
        native = list(S.sample_plms(S.v_to_eps(guided, schedule), inputs["x_T"], schedule, steps))

        ac = schedule.alphas_cumprod.double()
        ts = S.ddim_timesteps(steps)[::-1]  # 901, 801, ...: the order PLMS visits them

        def eps_of(x, t):  # eps = sqrt(abar_t) v + sqrt(1 - abar_t) x
            v = guided(x.float(), torch.full((x.shape[0],), t, dtype=torch.long)).double()
            return ac[t].sqrt() * v + (1 - ac[t]).sqrt() * x

        def ddim_step(x, e, t, t_prev):  # eta 0: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) e
            x0 = (x - (1 - ac[t]).sqrt() * e) / ac[t].sqrt()
            return ac[t_prev].sqrt() * x0 + (1 - ac[t_prev]).sqrt() * e

        x = inputs["x_T"].double()
        e0 = eps_of(x, ts[0])
        e_mid = eps_of(ddim_step(x, e0, ts[0], ts[1]), ts[1])
        x1 = ddim_step(x, (e0 + e_mid) / 2, ts[0], ts[1])
        e1 = eps_of(x1, ts[1])
        x2 = ddim_step(x1, (3 * e1 - e0) / 2, ts[1], ts[2])
    assert rel_l2(native[0].double(), x1) <= 1e-5 and rel_l2(native[1].double(), x2) <= 1e-5
    assert rel_l2(x2, inputs["x_T"].double()) > 0.01  # the steps moved the latent


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M) against ldm's DPMSolverSampler (multistep, order 2, time-uniform, x0 form)
# ---------------------------------------------------------------------------------------------

import ldm.models.diffusion.dpm_solver.sampler as ldm_dpm_sampler  # noqa: E402
from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver, NoiseScheduleVP  # noqa: E402

from sdport.models import dpm_solver as DPM  # noqa: E402


def record_dpm(monkeypatch):
    """Replace the DPM_Solver the sampler builds by a subclass that records, per step, the latent after
    the update and the x0 prediction the step used (ldm's loop has no per-step function to wrap)."""
    steps, x0s = [], []

    class Recording(DPM_Solver):
        def data_prediction_fn(self, x, t):
            out = super().data_prediction_fn(x, t)
            x0s.append(out.clone())
            return out

        def multistep_dpm_solver_update(self, *args, **kwargs):
            out = super().multistep_dpm_solver_update(*args, **kwargs)
            steps.append((out.clone(), x0s[-1]))
            return out

    monkeypatch.setattr(ldm_dpm_sampler, "DPM_Solver", Recording)
    return steps


def test_noise_schedule_matches_ldms(schedule):
    ns = DPM.NoiseSchedule(schedule.alphas_cumprod, "cpu")
    ref = NoiseScheduleVP("discrete", alphas_cumprod=schedule.alphas_cumprod.clone())
    t = torch.cat([torch.linspace(1.0, 1e-3, 51), torch.linspace(1.0, 1e-3, 14), ref.t_array[0, ::37],
                   torch.tensor([0.0006, 1.2])])  # keypoints themselves and both extrapolations
    for ours, theirs in ((ns.log_alpha, ref.marginal_log_mean_coeff), (ns.alpha, ref.marginal_alpha),
                         (ns.sigma, ref.marginal_std), (ns.lambda_, ref.marginal_lambda)):
        assert torch.equal(ours(t), theirs(t)), ours.__name__
    solver = DPM_Solver(None, ref, predict_x0=True)
    for n in (2, 9, 20, 50):
        assert torch.equal(ns.time_steps(n, "cpu"), solver.get_time_steps("time_uniform", 1.0, 1e-3, n, "cpu"))


def test_unet_timestep_embedding_takes_fractional_timesteps():
    from ldm.modules.diffusionmodules.util import timestep_embedding as ldm_embedding

    from sdport.models.unet import timestep_embedding

    ns = DPM.NoiseSchedule(S.linear_schedule().alphas_cumprod, "cpu")
    t = ns.model_time(ns.time_steps(20, "cpu"))
    assert t.dtype == torch.float32 and (t != t.round()).any()  # fractional indeed
    for dim in (320, 321):
        assert torch.equal(timestep_embedding(t, dim), ldm_embedding(t, dim))


def ldm_dpm_sample(model, steps, inputs):
    sampler = ldm_dpm_sampler.DPMSolverSampler(model)
    with torch.no_grad():
        x, _ = sampler.sample(S=steps, batch_size=B, shape=(C, H, W), conditioning=inputs["cond"],
                              x_T=inputs["x_T"].clone(), unconditional_guidance_scale=SCALE,
                              unconditional_conditioning=inputs["uncond"], verbose=False)
    return x


def native_dpm(eps, inputs, schedule, steps, prediction, unet=None):
    model = DPM.continuous_time(unet or eps, schedule, prediction)
    denoiser = S.cfg_denoiser(model, inputs["cond"], inputs["uncond"], SCALE)
    with torch.no_grad():
        return run_native(lambda cb: DPM.sample_dpmpp2m(denoiser, inputs["x_T"], schedule, steps, callback=cb))


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [2, 10, 20])  # 20: no first-order last step (>= 15 steps)
def test_dpmpp2m_matches_ldm(steps, prediction, eps, inputs, schedule, monkeypatch, capsys):
    model = (VStandIn if prediction == "v" else StandIn)(eps)
    ref = record_dpm(monkeypatch)
    out = ldm_dpm_sample(model, steps, inputs)
    native, native_x0 = native_dpm(eps, inputs, schedule, steps, prediction)
    assert_steps_match(native, native_x0, ref, steps)
    assert torch.equal(ref[-1][0], out)
    # float32 rounding at most: the arithmetic is ldm's, operation for operation
    assert max(rel_l2(x, r) for x, (r, _) in zip(native, ref)) < 1e-6


def test_dpmpp2m_parity_catches_a_planted_difference(eps, inputs, schedule, monkeypatch, capsys):
    """The same comparison fails when the native side differs slightly: a 1e-4 relative change to the
    model's output at one timestep, or the v model's output read as eps."""
    steps = 10
    ref = record_dpm(monkeypatch)
    ldm_dpm_sample(StandIn(eps), steps, inputs)
    calls = {"n": 0}

    def planted(x, t, c):
        calls["n"] += 1
        out = eps(x, t, c)
        return out * (1 + 1e-4) if calls["n"] == 4 else out

    native, native_x0 = native_dpm(eps, inputs, schedule, steps, "eps", unet=planted)
    with pytest.raises(AssertionError, match="step 3"):
        assert_steps_match(native, native_x0, ref, steps)

    ref_v = record_dpm(monkeypatch)
    ldm_dpm_sample(VStandIn(eps), steps, inputs)
    native, native_x0 = native_dpm(eps, inputs, schedule, steps, "eps")
    with pytest.raises(AssertionError, match="step 0"):
        assert_steps_match(native, native_x0, ref_v, steps)


def test_dpmpp2m_lower_order_final_and_ddim_first_step(eps, inputs, schedule):
    """Under 15 steps the last step is first order: its result depends on the last x0 prediction only."""
    steps = 6
    guided = S.cfg_denoiser(DPM.continuous_time(eps, schedule), inputs["cond"], inputs["uncond"], SCALE)
    x0s = []
    with torch.no_grad():
        xs = list(DPM.sample_dpmpp2m(guided, inputs["x_T"], schedule, steps,
                                     callback=lambda d: x0s.append(d["denoised"].double())))
        ns = DPM.NoiseSchedule(schedule.alphas_cumprod, "cpu")
        ts = ns.time_steps(steps, "cpu")
        # a first-order (DDIM) step from t_s to t_t in x0 form: x_t = sigma_t / sigma_s x_s + alpha_t (1 - e^-h) x0
        for i, x_s in ((0, inputs["x_T"]), (steps - 1, xs[-2])):
            s, t = ts[i:i + 1].double(), ts[i + 1:i + 2].double()
            a = lambda u: ns.alpha(u.float()).double()  # noqa: E731
            sg = lambda u: ns.sigma(u.float()).double()  # noqa: E731
            h = (a(t) / sg(t)).log() - (a(s) / sg(s)).log()
            want = sg(t) / sg(s) * x_s.double() + a(t) * (1 - torch.exp(-h)) * x0s[i]
            assert rel_l2(xs[i].double(), want) < 1e-5, i
    assert rel_l2(xs[-1], inputs["x_T"]) > 0.1


def test_dpmpp2m_masked_steps_start_from_noised_x0_where_mask_is_one(eps, inputs, schedule):
    """No ldm counterpart (its DPM sampler ignores mask / x0): before each step the known region
    (mask == 1) is alpha_t x0 + sigma_t noise, one noise draw per step; the rest is the latent."""
    seen = []
    model = DPM.continuous_time(eps, schedule)
    guided = S.cfg_denoiser(model, inputs["cond"], inputs["uncond"], SCALE)

    def watching(x, t):
        seen.append((x.clone(), t.clone()))
        return guided(x, t)

    steps, mask, x0 = 12, inputs["mask"], inputs["x0"]
    with torch.no_grad():
        xs = list(DPM.sample_dpmpp2m(watching, inputs["x_T"], schedule, steps, mask=mask, x0=x0,
                                     generator=torch.Generator().manual_seed(0)))
    ns = DPM.NoiseSchedule(schedule.alphas_cumprod, "cpu")
    gen = torch.Generator().manual_seed(0)
    for i, (x_in, t) in enumerate(seen):
        q = ns.alpha(t)[:, None, None, None] * x0 + ns.sigma(t)[:, None, None, None] * torch.randn(
            x0.shape, generator=gen)
        prev = inputs["x_T"] if i == 0 else xs[i - 1]
        assert torch.equal(x_in[..., : W // 2], q[..., : W // 2]), i
        assert torch.equal(x_in[..., W // 2:], prev[..., W // 2:]), i
    assert len(seen) == steps and rel_l2(xs[-1], inputs["x_T"]) > 0.1


def test_dpmpp2m_errors(eps, inputs, schedule):
    guided = S.cfg_denoiser(DPM.continuous_time(eps, schedule), inputs["cond"])
    with pytest.raises(ValueError, match="steps must be >= 2"):
        next(DPM.sample_dpmpp2m(guided, inputs["x_T"], schedule, 1))
    with pytest.raises(ValueError, match="mask and x0"):
        next(DPM.sample_dpmpp2m(guided, inputs["x_T"], schedule, 10, mask=inputs["mask"]))
    with pytest.raises(ValueError, match="prediction 'x0'"):
        DPM.continuous_time(eps, schedule, "x0")
