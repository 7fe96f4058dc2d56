"""Noise schedule and the DDIM / PLMS samplers, as plain functions over a denoiser callable.

A denoiser is `denoiser(x, t) -> eps`, with `t` a [B] long tensor of training timesteps
(0..T-1). Classifier-free guidance is a denoiser wrapper (`cfg_denoiser`), not part of a sampler.
Every sampler is a generator that yields the latent after each step; the last one is the result.
DPM-Solver++(2M), which works in continuous time, is in dpm_solver.py.

The arithmetic mirrors CompVis ldm's DDIMSampler / PLMSSampler operation for operation (which
quantities are float64, which are rounded to float32, the order of each sum), so an fp32 run
matches ldm to float32 rounding. Noise comes from a CPU `torch.Generator` and is then moved to
the latent's device, so a seed gives the same latents on every device.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[dict], None]]


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """The training noise schedule: alpha-bar per timestep, plus the two square roots q(x_t|x_0) uses.

    All [T] float32, as SD checkpoints store them. The square roots are kept separately because
    ldm derives them from float64 alpha-bar: recomputed from the float32 alpha-bar, sqrt(abar) is
    off by an ulp at ~13% of the timesteps and sqrt(1 - abar) by up to 1.3e-5 relative near t = 0
    (1 - abar cancels). Pass the checkpoint's buffers, or use linear_schedule(), for exact parity.
    """

    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    @classmethod
    def from_alphas_cumprod(
        cls,
        alphas_cumprod: torch.Tensor,
        sqrt_alphas_cumprod: Optional[torch.Tensor] = None,
        sqrt_one_minus_alphas_cumprod: Optional[torch.Tensor] = None,
    ) -> "Schedule":
        """From a checkpoint's buffers; missing square roots are computed in float64 from alpha-bar."""
        ac = alphas_cumprod.detach().to("cpu", torch.float64)
        if ac.ndim != 1:
            raise ValueError(f"alphas_cumprod must be 1-D, got shape {tuple(ac.shape)}")
        if sqrt_alphas_cumprod is None:
            sqrt_alphas_cumprod = _np_sqrt(ac)
        if sqrt_one_minus_alphas_cumprod is None:
            sqrt_one_minus_alphas_cumprod = _np_sqrt(1.0 - ac)
        f32 = lambda v: v.detach().to("cpu", torch.float32).contiguous()  # noqa: E731
        return cls(f32(alphas_cumprod), f32(sqrt_alphas_cumprod), f32(sqrt_one_minus_alphas_cumprod))

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, per batch element (ldm's q_sample)."""
        shape = (t.shape[0],) + (1,) * (x0.ndim - 1)  # [B, 1, 1, 1] to broadcast over C, H, W
        s = self.sqrt_alphas_cumprod.to(x0.device).gather(-1, t).reshape(shape)
        s1m = self.sqrt_one_minus_alphas_cumprod.to(x0.device).gather(-1, t).reshape(shape)
        return s * x0 + s1m * noise

    def ddim(self, steps: int, eta: float = 0.0, spacing: str = "ldm") -> "DDIMSchedule":
        """The DDIM sub-schedule for `steps` sampling steps (ldm's make_schedule; `spacing` picks the
        timesteps, see ddim_timesteps). Each step goes to the next lower chosen timestep, the last one
        to alpha-bar[0], as in ldm whatever the spacing."""
        ts = ddim_timesteps(steps, self.num_timesteps, spacing)
        ac = self.alphas_cumprod
        alphas = ac[ts]  # float32, as ldm keeps it
        # ldm builds alphas_prev with np.asarray([ac[0]] + ac[ts[:-1]].tolist()): float64, except
        # for a single step, where the list holds only a float32 tensor and all below stays float32
        dt = torch.float64 if len(ts) > 1 else torch.float32
        alphas_prev = ac[[0] + ts[:-1]].to(dt)
        # the eta-scaled DDIM sigma as ldm's numpy/torch mix evaluates it: there ndarray / tensor
        # runs Tensor.__rtruediv__, i.e. a float32 reciprocal, then a multiply in `dt`
        ratio = (1 - alphas).reciprocal().to(dt) * (1 - alphas_prev)
        sigmas = eta * _np_sqrt(ratio * (1 - alphas.to(dt) / alphas_prev))
        return DDIMSchedule(
            timesteps=tuple(ts),
            alphas=alphas,
            alphas_prev=alphas_prev.float(),
            sigmas=sigmas.float(),  # ldm rounds each sigma to float32 when it builds the step tensors
            sqrt_one_minus_alphas=_np_sqrt(1.0 - alphas),  # float32
        )


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSchedule:
    """Per-step DDIM coefficients, index i = the i-th timestep in ascending order; all [S] float32."""

    timesteps: tuple[int, ...]
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def to(self, device) -> "DDIMSchedule":
        return dataclasses.replace(
            self,
            alphas=self.alphas.to(device),
            alphas_prev=self.alphas_prev.to(device),
            sigmas=self.sigmas.to(device),
            sqrt_one_minus_alphas=self.sqrt_one_minus_alphas.to(device),
        )

    def coeffs(self, index: int, ndim: int):
        """(a_t, a_prev, sigma_t, sqrt(1 - a_t)) as [1]*ndim float32 tensors.

        Dimensioned (not 0-d) like ldm's torch.full((b, 1, 1, 1), ...), so a half-precision eps is
        promoted to float32 exactly as in ldm.
        """
        shape = (1,) * ndim
        return tuple(
            v[index].reshape(shape)
            for v in (self.alphas, self.alphas_prev, self.sigmas, self.sqrt_one_minus_alphas)
        )


def linear_schedule(linear_start: float = 0.00085, linear_end: float = 0.0120, n: int = 1000) -> Schedule:
    """SD's "linear" schedule as ldm computes it: betas = linspace(sqrt(start), sqrt(end), n, float64)**2."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, n, dtype=torch.float64) ** 2
    ac = torch.from_numpy(np.cumprod(1.0 - betas.numpy(), axis=0))  # float64, as ldm does it
    return Schedule.from_alphas_cumprod(ac)


SPACINGS = ("ldm", "linspace", "leading", "trailing")


def _spaced(steps: int, T: int, spacing: str) -> list[int]:
    """The timesteps of one spacing, ascending; the last may lie past the schedule (checked by the caller)."""
    if spacing == "ldm":
        # +1: ldm's shift so the last step lands on alpha-bar[1] and the first uses alpha-bar[0] as prev
        return [t + 1 for t in range(0, T, T // steps)]
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()
    elif spacing == "leading":
        ts = np.arange(steps) * (T // steps) + 1  # + steps_offset 1, as SD's scheduler config sets it
    elif spacing == "trailing":
        # diffusers' expression, so ties at .5 round as there; float error makes np.arange give one entry
        # too many for some counts (61, 103, ...: a last timestep of -1), which [:steps] drops
        ts = (np.round(np.arange(T, 0, -T / steps)) - 1)[:steps]
    else:
        raise ValueError(f"spacing {spacing!r}: choose one of {', '.join(SPACINGS)}")
    return sorted(int(t) for t in ts)


def _fits(steps: int, T: int, spacing: str) -> bool:
    return _spaced(steps, T, spacing)[-1] < T


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, spacing: str = "ldm") -> list[int]:
    """The sampling timesteps for `steps` steps, ascending.

    ldm: ldm's make_ddim_timesteps('uniform'), range(0, T, T // steps) + 1. Like ldm, this gives more
    than `steps` entries when T is not a multiple of steps (30 steps -> stride 33 -> 31 timesteps, 150 ->
    167), and refuses counts whose last timestep would be T or more (3, 333, 501..1000), where ldm fails.
    linspace, leading, trailing: diffusers' timestep_spacing of the same name (leading with SD's
    steps_offset of 1); exactly `steps` distinct timesteps for any count in [1, T] (leading: [1, T - 1]).
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ts = _spaced(steps, num_train_timesteps, spacing)
    if ts[-1] >= num_train_timesteps:
        # e.g. ldm at 333 steps (stride 3) or > 500 steps (stride 1): ldm fails with an IndexError
        near = nearest_step_counts(steps, num_train_timesteps, spacing)
        raise ValueError(
            f"{steps} steps with {spacing} spacing put the last timestep at {ts[-1]}, past the schedule's "
            f"{num_train_timesteps} timesteps; nearest counts it takes: {' or '.join(map(str, near))}"
        )
    return ts


def nearest_step_counts(steps: int, num_train_timesteps: int = 1000, spacing: str = "ldm") -> list[int]:
    """The nearest step counts below and above `steps` that `spacing` accepts (one or two of them)."""
    below = next((n for n in range(steps - 1, 0, -1) if _fits(n, num_train_timesteps, spacing)), None)
    above = next((n for n in range(steps + 1, num_train_timesteps + 1) if _fits(n, num_train_timesteps, spacing)),
                 None)
    return [n for n in (below, above) if n is not None]


def _np_sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded sqrt (numpy's), where ldm uses numpy: torch's vectorised CPU sqrt is
    off by an ulp for ~20% of float32 inputs."""
    return torch.from_numpy(np.sqrt(v.detach().cpu().numpy()))


def as_schedule(schedule: Union[Schedule, torch.Tensor]) -> Schedule:
    """Accept a Schedule or a bare 1-D alphas_cumprod tensor."""
    return schedule if isinstance(schedule, Schedule) else Schedule.from_alphas_cumprod(schedule)


# ---------------------------------------------------------------------------------------------
# Denoiser adapters and noise
# ---------------------------------------------------------------------------------------------


def cfg_denoiser(unet: Callable, cond: torch.Tensor, uncond: Optional[torch.Tensor] = None,
                 scale: float = 1.0) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around `unet(x, t, context) -> eps`, one batched call."""
    if uncond is None or scale == 1.0:
        # ldm skips the doubled batch here; e_u + 1 * (e_c - e_u) would not equal e_c bit for bit
        return lambda x, t: unet(x, t, cond)
    c_in = torch.cat([uncond, cond])  # [2B, L, D]: uncond first, as ldm orders it

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x] * 2)  # [2B, C, H, W]
        t_in = torch.cat([t] * 2)  # [2B]
        e_u, e_c = unet(x_in, t_in, c_in).chunk(2)
        return e_u + scale * (e_c - e_u)

    return denoise


def v_to_eps(denoiser: Denoiser, schedule: Union[Schedule, torch.Tensor]) -> Denoiser:
    """A v-prediction denoiser (Salimans & Ho 2022: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, SD 2.x 768-v)
    as an eps one: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t, ldm's predict_eps_from_z_and_v. Wrap it
    around the guided denoiser: ldm combines the guidance halves on v, then converts.

    ldm 2.1.5's DDIMSampler converts like this; its PLMSSampler does not (it would step with v as if it
    were eps). The native PLMS runs on this wrapper, so it steps with the right eps: there it departs
    from that file on purpose.
    """
    sched = as_schedule(schedule)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = denoiser(x, t)
        shape = (t.shape[0],) + (1,) * (x.ndim - 1)  # [B, 1, 1, 1] to broadcast over C, H, W
        s = sched.sqrt_alphas_cumprod.to(x.device).gather(-1, t).reshape(shape)
        s1m = sched.sqrt_one_minus_alphas_cumprod.to(x.device).gather(-1, t).reshape(shape)
        return s * v + s1m * x

    return denoise


def _randn(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    # drawn on the CPU whatever the device, so a seed means the same noise everywhere
    return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu").to(device)


def _ddim_update(x, e_t, a_t, a_prev, sigma_t, sqrt_one_minus_at, noise):
    """One DDIM update (ldm's p_sample_ddim after the model call) -> (x_prev, pred_x0)."""
    pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t  # direction pointing to x_t
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


def _timestep(value: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=torch.long, device=x.device)  # [B]


def _check_mask(mask, x0):
    if (mask is None) != (x0 is None):
        raise ValueError("mask and x0 go together: pass both or neither")


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


def sample_ddim(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    schedule: Union[Schedule, torch.Tensor],
    steps: int,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Callback = None,
    mask: Optional[torch.Tensor] = None,
    x0: Optional[torch.Tensor] = None,
    t_start: Optional[int] = None,
    spacing: str = "ldm",
) -> Iterator[torch.Tensor]:
    """DDIM (Song et al. 2020, arXiv:2010.02502), as ldm's DDIMSampler.ddim_sampling / decode.

    eta > 0 adds sigma_t * noise at every step (one draw of x's shape per step from `generator`).
    mask / x0: before each step the latent becomes q_sample(x0, t) * mask + (1 - mask) * latent,
    so mask == 1 keeps x0 (the known region) and mask == 0 is generated; as in ldm the final
    step's output is yielded unmasked. t_start: run only the first t_start sub-schedule indices
    (from index t_start - 1 down to 0), as ldm's decode does for img2img. spacing: see ddim_timesteps.
    """
    _check_mask(mask, x0)
    sched = as_schedule(schedule)
    ddim = sched.ddim(steps, eta, spacing)
    n = len(ddim) if t_start is None else t_start
    if not 1 <= n <= len(ddim):
        raise ValueError(f"t_start must be in [1, {len(ddim)}] for {steps} steps, got {t_start}")
    ddim = ddim.to(x_T.device)
    x = x_T
    for i, index in enumerate(reversed(range(n))):
        t = _timestep(ddim.timesteps[index], x)
        if mask is not None:
            x = sched.q_sample(x0, t, _randn(x0.shape, generator, x0.device)) * mask + (1.0 - mask) * x
        e_t = denoiser(x, t)
        noise = _randn(x.shape, generator, x.device) if eta > 0 else None
        x, pred_x0 = _ddim_update(x, e_t, *ddim.coeffs(index, x.ndim), noise)
        if callback is not None:
            callback({"x": x, "i": i, "t": ddim.timesteps[index], "denoised": pred_x0})
        yield x


def sample_plms(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    schedule: Union[Schedule, torch.Tensor],
    steps: int,
    generator: Optional[torch.Generator] = None,
    callback: Callback = None,
    mask: Optional[torch.Tensor] = None,
    x0: Optional[torch.Tensor] = None,
    spacing: str = "ldm",
) -> Iterator[torch.Tensor]:
    """PLMS (Liu et al. 2022, PNDM, arXiv:2202.09778), as ldm's PLMSSampler.plms_sampling.

    The first step has no eps history: it takes a DDIM step, evaluates eps there at the next
    timestep and uses the mean of both (pseudo improved Euler, two denoiser calls). Later steps
    combine the current eps with up to 3 previous ones (Adams-Bashforth of order 2, 3, 4).
    mask / x0 as in sample_ddim (q_sample noise drawn from `generator`); spacing: see ddim_timesteps.
    """
    _check_mask(mask, x0)
    sched = as_schedule(schedule)
    ddim = sched.ddim(steps, 0.0, spacing).to(x_T.device)  # sigma = 0: PLMS is deterministic
    order = list(reversed(range(len(ddim))))
    x = x_T
    old_eps: list[torch.Tensor] = []
    for i, index in enumerate(order):
        t = _timestep(ddim.timesteps[index], x)
        # the last step's "next" timestep is its own, as in ldm
        t_next = _timestep(ddim.timesteps[order[min(i + 1, len(order) - 1)]], x)
        if mask is not None:
            x = sched.q_sample(x0, t, _randn(x0.shape, generator, x0.device)) * mask + (1.0 - mask) * x
        coeffs = ddim.coeffs(index, x.ndim)
        e_t = denoiser(x, t)
        if len(old_eps) == 0:
            x_euler, _ = _ddim_update(x, e_t, *coeffs, None)
            e_prime = (e_t + denoiser(x_euler, t_next)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = _ddim_update(x, e_prime, *coeffs, None)
        old_eps = (old_eps + [e_t])[-3:]  # the raw eps (not e_prime) is what the history keeps
        if callback is not None:
            callback({"x": x, "i": i, "t": ddim.timesteps[index], "denoised": pred_x0})
        yield x


def stochastic_encode(x0: torch.Tensor, schedule: Union[Schedule, torch.Tensor], steps: int,
                      t_enc: int, noise: torch.Tensor, spacing: str = "ldm") -> torch.Tensor:
    """Noise x0 to DDIM sub-schedule index t_enc in one jump (ldm's DDIMSampler.stochastic_encode)."""
    ddim = as_schedule(schedule).ddim(steps, 0.0, spacing)
    if not 0 <= t_enc < len(ddim):
        raise ValueError(f"t_enc must be in [0, {len(ddim) - 1}] for {steps} steps, got {t_enc}")
    shape = (1,) * x0.ndim
    # torch's sqrt over the whole vector on the CPU, as ldm does it (its result differs from a
    # correctly rounded sqrt at some entries)
    sqrt_a = torch.sqrt(ddim.alphas)[t_enc].reshape(shape).to(x0.device)
    sqrt_1m_a = ddim.sqrt_one_minus_alphas[t_enc].reshape(shape).to(x0.device)
    return sqrt_a * x0 + sqrt_1m_a * noise


def sample_img2img(
    denoiser: Denoiser,
    x0: torch.Tensor,
    schedule: Union[Schedule, torch.Tensor],
    steps: int,
    strength: float,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Callback = None,
    spacing: str = "ldm",
) -> Iterator[torch.Tensor]:
    """SDEdit (Meng et al. 2021) with DDIM, as ldm's img2img script: encode to int(strength*steps), decode.

    As in ldm, x0 is noised to sub-schedule index t_enc while decoding starts at index t_enc - 1.
    The encoding noise is the first draw from `generator`; step noise (eta > 0) follows.
    """
    t_enc = int(strength * steps)
    ddim_len = len(ddim_timesteps(steps, as_schedule(schedule).num_timesteps, spacing))
    if not 1 <= t_enc < ddim_len:
        raise ValueError(
            f"strength {strength} with {steps} steps gives t_enc {t_enc}; need 1 <= t_enc < {ddim_len}"
        )
    z = stochastic_encode(x0, schedule, steps, t_enc, _randn(x0.shape, generator, x0.device), spacing)
    yield from sample_ddim(denoiser, z, schedule, steps, eta, generator, callback, t_start=t_enc, spacing=spacing)
