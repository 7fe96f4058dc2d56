"""Gates calibrated to the reference's own rounding: `sdport parity COMPONENT CKPT --calibrate`.

A fixed fp32 bound (rel_l2 <= 1e-5) sits well above what fp32 rounding does to a small model, but a deep
full-size model's own rounding can come near it: the reference's fp32 output is itself some distance from
the exact result, and a port that rounds differently (another kernel, `F.silu` for `x * sigmoid(x)`) is
at about that distance from the reference even when it computes the same function.

The noise floor of a layer is what the reference itself shows against the same reference in float64, on
the same inputs: the reference in float64 is run as a port (`reference_port`), through the same pairing
and the same passes as any other port, so its report holds, per reference module and per mode, the
floor (accumulated: end to end; isolated: the module alone on the fp32 reference's recorded input).

A candidate is then gated per layer at `FACTOR x floor` where that is above the fixed bound, and at the
fixed bound elsewhere. FACTOR 2: a candidate as accurate as the reference, with independent rounding, is
about sqrt(2) floors from it; 2 leaves room for a candidate somewhat noisier than the original
(sqrt(2^2 - 1), about 1.7 times its rounding) and nothing for a fault: a weight off by 1e-3 is hundreds
of floors. The bounds a widened gate moves are rel_l2 and, by the same factor, cosine, psnr_db and
sqnr_db; the report's inputs carry every floor and every widened bound.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import types

import torch

from ..models.components import component as native_entry
from .components import ParityError, entry
from .metrics import Tolerance, check
from .report import LayerRecord, Report

FACTOR = 2.0
FLOOR_DTYPE = torch.float64


class ReferencePort(torch.nn.Module):
    """The reference model in float64, called as a port: the component's inputs positionally, the
    output of the port contract (docs/ports.md). Its modules are the reference's own (`reference.*`)."""

    def __init__(self, component: str, reference: torch.nn.Module, source_format: str):
        super().__init__()
        self.component, self.source_format = component, source_format
        self.reference = reference.to(FLOOR_DTYPE)
        # ldm's UNet casts its input to `self.dtype` and computes its timestep embedding in fp32: the
        # model's dtype is float64 now, and every module with weights takes its input in theirs.
        if isinstance(self.reference.__dict__.get("dtype"), torch.dtype):
            self.reference.dtype = FLOOR_DTYPE
        for m in self.reference.modules():
            if any(True for _ in m.parameters(recurse=False)):
                m.register_forward_pre_hook(_to_floor_dtype)
            # ldm's GroupNorm32 computes in fp32 whatever its input (`x.float()`), for fp16 models
            if isinstance(m, torch.nn.GroupNorm) and type(m).forward is not torch.nn.GroupNorm.forward:
                m.forward = types.MethodType(torch.nn.GroupNorm.forward, m)

    def forward(self, *args):
        with _attention_in_float64():
            return self._forward(*args)

    def _forward(self, *args):
        pc = entry(self.component)
        names = native_entry(self.component).inputs
        inputs = {n: (a.to(FLOOR_DTYPE) if a.is_floating_point() else a) for n, a in zip(names, args)}
        if pc.contract_module is None:
            return pc.contract_output(pc.call_reference(self.reference, inputs, self.source_format))
        got = []
        module = dict(self.reference.named_modules())[pc.contract_module]
        handle = module.register_forward_hook(lambda m, a, out: got.append(out))
        try:
            pc.call_reference(self.reference, inputs, self.source_format)
        finally:
            handle.remove()
        return got[0]


@contextlib.contextmanager
def _attention_in_float64():
    """ldm's CrossAttention casts q and k to fp32 for q.k^T (ATTN_PRECISION=fp32, its default): any other
    setting computes them in the input's dtype, float64 here. Set for the call, the isolated re-runs
    inside it included."""
    attention = sys.modules.get("ldm.modules.attention")
    if attention is None or not hasattr(attention, "_ATTN_PRECISION"):
        yield
        return
    before = attention._ATTN_PRECISION
    attention._ATTN_PRECISION = "fp64"
    try:
        yield
    finally:
        attention._ATTN_PRECISION = before


def _to_floor_dtype(module, args):
    return tuple(a.to(FLOOR_DTYPE) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def reference_port(num_heads: int | None = None):
    """A port builder `(checkpoint, component) -> module`: the reference in float64."""
    def build(checkpoint: str, component: str) -> torch.nn.Module:
        from .reference.load import load_reference

        ref, _, fmt = load_reference(component, checkpoint, num_heads=num_heads)
        return ReferencePort(component, ref, fmt).eval().requires_grad_(False)
    return build


def float64_reference(checkpoint: str, component: str) -> torch.nn.Module:
    """`--port torch:sdport.parity.calibrate:float64_reference`: the reference itself in float64."""
    return reference_port()(checkpoint, component)


def floors_of(report: Report) -> dict[str, dict[str, float]]:
    """{reference module: {mode: rel_l2}} of a run of the float64 reference against the fp32 one."""
    out: dict[str, dict[str, float]] = {}
    for l in report.layers:
        out[l.reference] = {m: float(v["rel_l2"]) for m, v in l.metrics.items() if "rel_l2" in v}
    return out


def noise_floor(component: str, checkpoint: str, *, modes, device: str, seed: int, prompt: str | None,
                batch: int, size: int | None, num_heads: int | None, spill_dir: str | None,
                progress=None) -> dict[str, dict[str, float]]:
    """Per reference module and mode, the fp32 reference's rel_l2 to itself in float64, on the inputs
    every parity run of these arguments draws."""
    from . import ports
    from .ports.run import run_port

    floor = run_port(component, checkpoint, ports.PortSpec("torch", "sdport.parity.calibrate", "float64_reference"),
                     modes=modes, device=device, dtype="fp32", seed=seed, prompt=prompt, batch=batch, size=size,
                     num_heads=num_heads, spill_dir=spill_dir, progress=_stage(progress),
                     build_port=reference_port(num_heads))
    return floors_of(floor.report)


def _stage(progress):
    if progress is None:
        return None
    return lambda what, done, total=None, unit="layer": progress(f"noise floor: {what}", done, total, unit)


def widened(tol: Tolerance, floor: float, factor: float = FACTOR) -> Tolerance | None:
    """`tol` with its bounds moved to admit `factor x floor` of rel_l2, or None where the fixed bound
    already does (or there is no rel_l2 bound to calibrate)."""
    if tol.rel_l2 is None or not math.isfinite(floor) or factor * floor <= tol.rel_l2:
        return None
    ratio = factor * floor / tol.rel_l2
    db = 20 * math.log10(ratio)
    return tol.replace(
        rel_l2=factor * floor,
        cosine=None if tol.cosine is None else 1 - (1 - tol.cosine) * ratio ** 2,
        psnr_db=None if tol.psnr_db is None else tol.psnr_db - db,
        sqnr_db=None if tol.sqnr_db is None else tol.sqnr_db - db)


def _regate(l: LayerRecord, tol: Tolerance, floors: dict[str, float]) -> tuple[LayerRecord, dict[str, float]]:
    """The layer gated at its calibrated bounds, and {mode: widened rel_l2 bound} where they moved."""
    failures, bounds = {}, {}
    for mode, m in l.metrics.items():
        wide = widened(tol, floors.get(mode, math.nan))
        failures[mode] = tuple(check(m, wide or tol)[1])
        if wide is not None:
            bounds[mode] = wide.rel_l2
    return dataclasses.replace(l, failures=failures), bounds


def floor_of(reference: str, floors: dict[str, dict[str, float]]) -> dict[str, float] | None:
    """A layer's floor per mode; a fused layer ('a.{to_q,to_k,to_v}', 'a+b': layers.fused_name) has
    the largest of its parts'. None where a part has no floor."""
    if reference in floors:
        return floors[reference]
    if reference.endswith("}") and ".{" in reference:
        head, _, leaves = reference[:-1].rpartition(".{")
        parts = [f"{head}.{leaf}" for leaf in leaves.split(",")]
    else:
        parts = reference.split("+")
    if len(parts) < 2 or any(p not in floors for p in parts):
        return None
    modes = set.intersection(*(set(floors[p]) for p in parts))
    return {m: max(floors[p][m] for p in parts) for m in modes}


def calibrate(result, floors: dict[str, dict[str, float]]):
    """`result` (a harness.ParityResult) gated per layer at max(fixed bound, FACTOR x the layer's
    noise floor). Layers without a measured floor keep the fixed gate. The report's inputs record the
    floors and every widened bound (`calibration`)."""
    rep = result.report
    layers, wide, used, without = [], {}, {}, []
    for l in rep.layers:
        f = floor_of(l.reference, floors)
        if f is None:
            layers.append(l)
            without.append(l.reference)
            continue
        l2, bounds = _regate(l, rep.tolerance, f)
        layers.append(l2)
        used[l.reference] = f
        if bounds:
            wide[l.reference] = bounds
    inputs = {**rep.inputs, "calibration": {
        "reference_dtype": "fp64", "factor": FACTOR, "layers_with_a_floor": len(used),
        "layers_without": without, "widened": wide, "floors": used}}
    return dataclasses.replace(result, report=dataclasses.replace(rep, layers=tuple(layers), inputs=inputs))


def refuse(port_kind: str | None) -> None:
    if port_kind == "dump":
        raise ParityError("--calibrate draws the inputs to measure the reference's noise floor on; a dump "
                          "brings its own inputs: compare it without --calibrate")
