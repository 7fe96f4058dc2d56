"""Error metrics between a native tensor `a` and a reference tensor `r`, and per-dtype tolerances.

Every metric is computed in float64 on the CPU so that comparing two fp16 tensors does not lose the
very error it is measuring. Names are fixed: reports, JSON and golden files all use exactly these.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None

METRICS = ("max_abs", "mean_abs", "rel_l2", "cosine", "psnr_db", "sqnr_db")

DEFINITIONS: dict[str, str] = {
    "max_abs": "max |a - r| over all elements (a = native, r = reference)",
    "mean_abs": "mean |a - r| over all elements",
    "rel_l2": "||a - r||_2 / ||r||_2 (0 when a == r, inf when r == 0 and a != r)",
    "cosine": "<a, r> / (||a||_2 ||r||_2) (1 when both are zero, 0 when exactly one is)",
    "psnr_db": "20 log10(max|r| / rmse(a - r)), Apple's definition (inf when a == r)",
    "sqnr_db": "20 log10(||r||_2 / ||a - r||_2) (inf when a == r)",
    "nonfinite": "number of NaN or +-inf values in a",
}


def _as_f64(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    # Upcast on the CPU: fp16/bf16 sums would round away the differences we measure.
    return x.detach().to(device="cpu", dtype=torch.float64).reshape(-1)  # (N,)


def compare(a, r) -> dict:
    """Metrics of native `a` against reference `r` (same number of elements), as plain floats.

    Non-finite entries of `a` are counted in `nonfinite`; they also make the other metrics
    non-finite, which is what a tolerance check should see.
    """
    a64, r64 = _as_f64(a), _as_f64(r)
    if a64.numel() != r64.numel():
        raise ValueError(f"compare: {a64.numel()} native elements vs {r64.numel()} reference elements")
    n = a64.numel()
    nonfinite = int((~torch.isfinite(a64)).sum())
    if n == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0,
                "psnr_db": math.inf, "sqnr_db": math.inf, "nonfinite": 0}

    d = a64 - r64
    absd = d.abs()
    max_abs = float(absd.max())
    mean_abs = float(absd.mean())
    err = float(torch.linalg.vector_norm(d))
    nr = float(torch.linalg.vector_norm(r64))
    na = float(torch.linalg.vector_norm(a64))

    if nr == 0.0:
        rel_l2 = 0.0 if err == 0.0 else math.inf
    else:
        rel_l2 = err / nr

    if na == 0.0 and nr == 0.0:
        cosine = 1.0
    elif na == 0.0 or nr == 0.0:
        cosine = 0.0
    else:
        cosine = float(torch.dot(a64, r64)) / (na * nr)
        # Rounding can push |cos| a hair past 1; the definition cannot.
        cosine = max(-1.0, min(1.0, cosine)) if math.isfinite(cosine) else cosine

    rmse = err / math.sqrt(n)
    peak = float(r64.abs().max())
    psnr_db = _db(peak, rmse)
    sqnr_db = _db(nr, err)
    return {"max_abs": max_abs, "mean_abs": mean_abs, "rel_l2": rel_l2, "cosine": cosine,
            "psnr_db": psnr_db, "sqnr_db": sqnr_db, "nonfinite": nonfinite}


def _db(signal: float, noise: float) -> float:
    """20 log10(signal / noise): inf for no noise, -inf for no signal but some noise."""
    if not (math.isfinite(signal) and math.isfinite(noise)):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


# ---------------------------------------------------------------------------------------------
# Tolerances


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Per-metric bounds; None means the metric is not gated. A layer passes when every gated
    metric is within its bound and (unless allowed) `a` has no NaN/inf."""

    rel_l2: float | None = None        # upper bound
    max_abs: float | None = None       # upper bound
    mean_abs: float | None = None      # upper bound
    cosine: float | None = None        # lower bound
    psnr_db: float | None = None       # lower bound
    sqnr_db: float | None = None       # lower bound
    allow_nonfinite: bool = False

    def replace(self, **changes) -> "Tolerance":
        return dataclasses.replace(self, **changes)


# Which way each bound points: True = the metric must be <= the bound.
_UPPER = {"rel_l2": True, "max_abs": True, "mean_abs": True,
          "cosine": False, "psnr_db": False, "sqnr_db": False}

# The single place defaults live. Starting points, to be calibrated against the reference's own
# noise floor (fp32 vs fp64, CPU vs GPU); rel_l2 and cosine are the primary gates because they do
# not depend on activation scale, psnr is Apple's conversion gate (35 dB), max_abs stays ungated
# because raw magnitudes differ wildly between layers.
# - fp32: different op order / kernels give ~1e-7..1e-6 relative error; 1e-5 leaves headroom.
# - fp16: 10-bit mantissa (eps ~1e-3), error grows through a deep net; 1e-2 relative.
# - bf16: 7-bit mantissa (eps ~8e-3); 5e-2 relative.
# - int8 weight-only: per-channel quantization gives a few percent; 1e-1 relative, cos >= 0.99.
# Measured noise floor (the reference itself, fp32 against fp64, tiny fixtures, seed 0): per-layer
# rel_l2 at most 9.5e-7 (UNet, VAE decoder), 2-3e-7 (CLIP text, ViT); native fp32 against the
# reference fp32 reaches 1.8e-6 accumulated (both sides carry fp32 noise). The fp32 bound of 1e-5
# sits 10x above the floor; every planted fault in tests/test_parity_faults.py breaks it by >= 10x.
# At full size the floor comes near the bound (docs/ports.md, --calibrate): parity/calibrate.py then
# gates each layer at twice its measured floor.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rel_l2=1e-5, cosine=0.999999, psnr_db=90.0),
    "fp16": Tolerance(rel_l2=1e-2, cosine=0.9999, psnr_db=35.0),
    "bf16": Tolerance(rel_l2=5e-2, cosine=0.998, psnr_db=25.0),
    "int8": Tolerance(rel_l2=1e-1, cosine=0.99, psnr_db=20.0),
}

# Sampler parity (`sdport parity txt2img`): lower bound on the psnr_db of the decoded image of a whole
# run, native against the reference. Its latents are gated per step with the rel_l2 above.
IMAGE_PSNR_DB: dict[str, float] = {"fp32": 60.0, "fp16": 30.0, "bf16": 25.0, "int8": 20.0}

_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                  "bfloat16": "bf16", "qint8": "int8"}


def dtype_key(dtype) -> str:
    """'fp16', torch.float16, 'float16', 'half' -> 'fp16'."""
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DEFAULT_TOLERANCES:
        raise ValueError(f"no default tolerance for dtype {dtype!r}; known: {sorted(DEFAULT_TOLERANCES)}")
    return name


def default_tolerance(dtype) -> Tolerance:
    return DEFAULT_TOLERANCES[dtype_key(dtype)]


def check(metrics: Mapping, tol: Tolerance) -> tuple[bool, list[str]]:
    """Gate `metrics` (as from `compare`) against `tol`. Returns (passed, failures), each failure
    one line naming the metric, its value and the bound it broke, e.g. 'rel_l2=3.1e-04 > 1e-05'."""
    failures: list[str] = []
    nonfinite = int(metrics.get("nonfinite", 0) or 0)
    if nonfinite and not tol.allow_nonfinite:
        failures.append(f"nonfinite={nonfinite} > 0")
    for name, upper in _UPPER.items():
        bound = getattr(tol, name)
        if bound is None:
            continue
        if name not in metrics:
            failures.append(f"{name} missing")
            continue
        v = float(metrics[name])
        # NaN compares false with everything, so test for the pass explicitly.
        ok = (v <= bound) if upper else (v >= bound)
        if not ok:
            # Cosine lives next to 1: three digits would print "cosine=1 < 1".
            fmt = ".9g" if name == "cosine" else ".3g"
            failures.append(f"{name}={v:{fmt}} {'>' if upper else '<'} {bound:{fmt}}")
    return (not failures), failures


# ---------------------------------------------------------------------------------------------
# Overrides


def _coerce(field: str, value) -> float | bool | None:
    if field == "allow_nonfinite":
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"tolerance allow_nonfinite: expected true/false, got {value!r}")
        return bool(value)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "off", "")):
        return None  # un-gate this metric
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"tolerance {field}: expected a number or 'none', got {value!r}") from None


_FIELDS = tuple(f.name for f in dataclasses.fields(Tolerance))


def apply_overrides(tol: Tolerance, overrides: Mapping | Iterable[str]) -> Tolerance:
    """Overrides as a mapping {metric: value} or as 'metric=value' strings ('rel_l2=1e-4',
    'max_abs=none' to un-gate). Unknown metric names are an error."""
    if not isinstance(overrides, Mapping):
        pairs = {}
        for s in overrides:
            if "=" not in s:
                raise ValueError(f"tolerance override {s!r}: expected metric=value, e.g. rel_l2=1e-4")
            k, v = s.split("=", 1)
            pairs[k.strip()] = v.strip()
        overrides = pairs
    changes = {}
    for k, v in overrides.items():
        if k not in _FIELDS:
            raise ValueError(f"unknown tolerance metric {k!r}; known: {', '.join(_FIELDS)}")
        changes[k] = _coerce(k, v)
    return dataclasses.replace(tol, **changes)


def load_tolerances(path, dtype) -> Tolerance:
    """Defaults for `dtype`, overridden from a JSON or TOML file (by suffix). The file holds either
    per-dtype tables ({"fp16": {"rel_l2": 2e-2}}) or one flat table applied to every dtype; a
    per-dtype table wins over the flat keys."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        if tomllib is None:  # pragma: no cover
            raise RuntimeError("reading TOML tolerances needs Python 3.11+ (tomllib); use JSON")
        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of tolerances, got {type(data).__name__}")
    key = dtype_key(dtype)
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    per_dtype = {}
    for k, v in data.items():
        if isinstance(v, dict):
            per_dtype[dtype_key(k)] = v  # validates the dtype name too
    tol = apply_overrides(DEFAULT_TOLERANCES[key], flat)
    return apply_overrides(tol, per_dtype.get(key, {}))


def tolerance_to_dict(tol: Tolerance) -> dict:
    return dataclasses.asdict(tol)


def tolerance_from_dict(d: Mapping) -> Tolerance:
    return apply_overrides(Tolerance(), dict(d))
