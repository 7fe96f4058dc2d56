"""Gate margins: how far each gated value sits from its bound, in decades (powers of ten) of headroom.

One unit for every metric so that a cell's margins compare: an upper bound (rel_l2, max_abs,
mean_abs) gives log10(bound / value); a decibel bound (psnr_db, sqnr_db) gives (value - bound) / 20,
the same decades of amplitude; cosine is gated through 1 - cosine, log10((1 - bound) / (1 - value)).
Positive: the gate holds with that much room; 0: on the bound (still a pass); negative: it fails.
An exact match is +inf; a NaN, or a non-finite output the gate does not allow, is -inf.
"""
from __future__ import annotations

import math
from typing import Mapping

from ..metrics import Tolerance

UPPER = ("rel_l2", "max_abs", "mean_abs")
DECIBELS = ("psnr_db", "sqnr_db")


def margin(name: str, value: float, bound: float) -> float:
    v = float(value)
    if math.isnan(v):
        return -math.inf
    if name in UPPER:
        if v <= 0.0:
            return math.inf
        if bound <= 0.0 or math.isinf(v):
            return -math.inf if v > bound else 0.0
        return math.log10(bound / v)
    if name in DECIBELS:
        return (v - bound) / 20.0 if math.isfinite(v) else (math.inf if v > 0 else -math.inf)
    if name == "cosine":
        gap, allowed = 1.0 - v, 1.0 - bound
        if gap <= 0.0:
            return math.inf
        if allowed <= 0.0:
            return -math.inf
        return math.log10(allowed / gap)
    raise ValueError(f"no margin for metric {name!r}")


def margins(metrics: Mapping, tol: Tolerance) -> dict[str, float]:
    """{metric: margin} for every metric `tol` gates (as metrics.check gates them)."""
    out = {}
    if int(metrics.get("nonfinite", 0) or 0) and not tol.allow_nonfinite:
        out["nonfinite"] = -math.inf
    for name in (*UPPER, "cosine", *DECIBELS):
        bound = getattr(tol, name)
        if bound is not None:
            out[name] = margin(name, metrics.get(name, math.nan), bound)
    return out


def worst(pairs) -> tuple[float, str]:
    """(the smallest margin, where it is) over (margin, where) pairs; (+inf, "") when nothing is gated."""
    best = (math.inf, "")
    for m, where in pairs:
        if m < best[0] or (math.isnan(m)):
            best = (m, where)
    return best
