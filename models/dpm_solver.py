"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), multistep, order 2, as ldm 2.1.5's DPMSolverSampler runs it.

DPM-Solver works in continuous time t in [1/N, 1] (N training timesteps): log alpha_t is the piecewise
linear interpolation of 0.5 * log(alpha-bar) over t_n = (n + 1) / N, sigma_t = sqrt(1 - alpha_t^2),
lambda_t = log(alpha_t / sigma_t). Steps are uniform in t (ldm's skip_type "time_uniform"), from t = 1
to t = 1/N, and the UNet sees the fractional timestep (t - 1/N) * 1000 (e.g. 979.02 at the second of
50 steps), not an integer one. The solver steps with the data prediction x0 = (x - sigma_t eps) / alpha_t:
the first step is first order (DDIM-like), later ones second order from the last two x0 predictions;
under 15 steps the last step is first order again (ldm's lower_order_final).

A denoiser here is `denoiser(x, t) -> eps` with t a [B] float32 tensor of *continuous* times;
`continuous_time(unet, schedule, prediction)` turns a `unet(x, timestep, context)` into the
`model(x, t, context)` that cfg_denoiser wraps, as ldm's model_wrapper does: model timestep, then v
converted to eps per guidance half (with the continuous alpha_t, sigma_t), then guidance on eps.

The arithmetic mirrors ldm's dpm_solver.py operation for operation (all float32, on the latent's
device), so an fp32 run matches ldm to float32 rounding.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Union

import torch

from .samplers import Callback, Denoiser, Schedule, _check_mask, _randn, as_schedule

PREDICTIONS = ("eps", "v")
LOWER_ORDER_FINAL_BELOW = 15  # ldm: with fewer steps than this, the last step is first order


class NoiseSchedule:
    """ldm's NoiseScheduleVP('discrete', alphas_cumprod=...): alpha_t, sigma_t, lambda_t at continuous t."""

    def __init__(self, alphas_cumprod: torch.Tensor, device):
        ac = alphas_cumprod.detach().to(device, torch.float32)  # DPMSolverSampler's float32 buffer
        self.total_n = ac.shape[0]
        self.log_alpha_array = 0.5 * torch.log(ac)  # [N]
        # the keypoints t_n = (n + 1) / N, built on the CPU as ldm builds them
        self.t_array = torch.linspace(0.0, 1.0, self.total_n + 1)[1:].to(device)  # [N]

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """[B] -> [B]: ldm's interpolate_fn. Between keypoints, the segment to the right of the last
        keypoint strictly below t (a t equal to a keypoint takes the segment ending there, as ldm's sort
        puts the query before equal keypoints); outside them, the outermost segment extended."""
        xp, yp = self.t_array, self.log_alpha_array
        k = torch.searchsorted(xp, t.contiguous(), side="left")  # [B]: keypoints strictly below t
        lo = (k - 1).clamp(0, xp.shape[0] - 2)
        sx, ex, sy, ey = xp[lo], xp[lo + 1], yp[lo], yp[lo + 1]
        return sy + (t - sx) * (ey - sy) / (ex - sx)

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lambda_(self, t):
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous t in [1/N, 1] -> the UNet's (fractional) timestep in [0, 1000 (N - 1) / N]."""
        return (t - 1.0 / self.total_n) * 1000.0

    def time_steps(self, steps: int, device) -> torch.Tensor:
        """[steps + 1] times from 1 down to 1/N, uniform in t (built on the CPU, then moved, as ldm)."""
        return torch.linspace(1.0, 1.0 / self.total_n, steps + 1).to(device)


def _b(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - 1)]  # [B] -> [B, 1, 1, 1] to broadcast over C, H, W


def continuous_time(unet: Callable, schedule: Union[Schedule, torch.Tensor], prediction: str = "eps") -> Callable:
    """`unet(x, timestep, context) -> eps | v` as `model(x, t, context) -> eps` over continuous t [B]
    (ldm's model_wrapper.noise_pred_fn). Put cfg_denoiser around it: the conversion then runs on both
    guidance halves before they are combined, as in ldm's DPM sampler (its DDIM combines v first)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction {prediction!r}: choose eps or v")
    ac = as_schedule(schedule).alphas_cumprod
    cache: dict = {}

    def model(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        ns = cache.get(x.device) or cache.setdefault(x.device, NoiseSchedule(ac, x.device))
        out = unet(x, ns.model_time(t), context)
        if prediction == "eps":
            return out
        return _b(ns.alpha(t), x.ndim) * out + _b(ns.sigma(t), x.ndim) * x  # eps = alpha_t v + sigma_t x

    return model


def _first_update(ns: NoiseSchedule, x, s, t, model_s):
    """DPM-Solver++-1 from s to t (DDIM in x0 form): ldm's dpm_solver_first_update, predict_x0."""
    h = ns.lambda_(t) - ns.lambda_(s)
    sigma_s, sigma_t = ns.sigma(s), ns.sigma(t)
    alpha_t = torch.exp(ns.log_alpha(t))
    phi_1 = torch.expm1(-h)
    return _b(sigma_t / sigma_s, x.ndim) * x - _b(alpha_t * phi_1, x.ndim) * model_s


def _second_update(ns: NoiseSchedule, x, model_prev_1, model_prev_0, t_prev_1, t_prev_0, t):
    """Multistep DPM-Solver++-2 from t_prev_0 to t with the x0 predictions at t_prev_1, t_prev_0
    (ldm's multistep_dpm_solver_second_update, predict_x0, solver_type 'dpm_solver')."""
    lambda_prev_1, lambda_prev_0, lambda_t = ns.lambda_(t_prev_1), ns.lambda_(t_prev_0), ns.lambda_(t)
    sigma_prev_0, sigma_t = ns.sigma(t_prev_0), ns.sigma(t)
    alpha_t = torch.exp(ns.log_alpha(t))
    h_0 = lambda_prev_0 - lambda_prev_1
    h = lambda_t - lambda_prev_0
    r0 = h_0 / h
    d1_0 = _b(1.0 / r0, x.ndim) * (model_prev_0 - model_prev_1)
    coef = _b(alpha_t * (torch.exp(-h) - 1.0), x.ndim)  # ldm writes exp(-h) - 1 here, not expm1
    return _b(sigma_t / sigma_prev_0, x.ndim) * x - coef * model_prev_0 - 0.5 * coef * d1_0


def sample_dpmpp2m(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    schedule: Union[Schedule, torch.Tensor],
    steps: int,
    callback: Callback = None,
    mask: Optional[torch.Tensor] = None,
    x0: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[torch.Tensor]:
    """DPM-Solver++(2M) as ldm's DPMSolverSampler.sample: `steps` steps, one denoiser call each.

    `denoiser(x, t) -> eps` takes continuous t (module docstring; build it with
    cfg_denoiser(continuous_time(unet, schedule, prediction), ...)). The callback's "t" is the UNet
    timestep of the step (a float), "denoised" the step's x0 prediction.
    mask / x0 (no ldm counterpart): before each step the latent becomes
    (alpha_t x0 + sigma_t noise) * mask + (1 - mask) * latent, as sample_ddim does with its timestep;
    noise drawn from `generator`. steps >= 2 (ldm runs another, adaptive, solver for 1).
    """
    _check_mask(mask, x0)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 for DPM-Solver++(2M), got {steps}")
    ns = NoiseSchedule(as_schedule(schedule).alphas_cumprod, x_T.device)
    times = ns.time_steps(steps, x_T.device)  # [steps + 1]
    x = x_T
    prev = None  # (t, x0 prediction) of the previous step: the multistep history
    for i in range(steps):
        s, t = times[i].expand(x.shape[0]), times[i + 1].expand(x.shape[0])  # [B]
        if mask is not None:
            noise = _randn(x0.shape, generator, x0.device)
            q = _b(ns.alpha(s), x0.ndim) * x0 + _b(ns.sigma(s), x0.ndim) * noise
            x = q * mask + (1.0 - mask) * x
        eps = denoiser(x, s)
        # ldm's data_prediction_fn
        model_s = (x - _b(ns.sigma(s), x.ndim) * eps) / _b(ns.alpha(s), x.ndim)
        if prev is None or (steps < LOWER_ORDER_FINAL_BELOW and i == steps - 1):
            x = _first_update(ns, x, s, t, model_s)
        else:
            x = _second_update(ns, x, prev[1], model_s, prev[0], s, t)
        prev = (s, model_s)
        if callback is not None:
            callback({"x": x, "i": i, "t": float(ns.model_time(times[i])), "denoised": model_s})
        yield x
