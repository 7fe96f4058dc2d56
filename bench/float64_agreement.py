"""How far a component's fp32 output is from exact arithmetic, for the reference and for the diffusers
port: each run in fp32 and in float64 on the same seeded inputs, output against output.

    python bench/float64_agreement.py COMPONENT CKPT [--size N] [--json OUT]

It tells rounding from a port error: a port that computes the reference's function agrees with it in
float64 to ~1e-14, and its fp32 distance from the float64 reference is then its own rounding, to set
beside the reference's (what `sdport parity --calibrate` gates against, layer by layer).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sdport.parity import calibrate
from sdport.parity.harness import call_reference, draw_inputs
from sdport.parity.ports import diffusers
from sdport.parity.reference.load import load_reference


def rel(a: torch.Tensor, r: torch.Tensor) -> float:
    a, r = a.double(), r.double()
    return float((a - r).norm() / r.norm())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("component", choices=["unet", "text_model", "encoder", "decoder", "vit"])
    ap.add_argument("checkpoint")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    ref, cfg, fmt = load_reference(a.component, a.checkpoint)
    inputs, desc = draw_inputs(a.component, cfg, size=a.size)
    args = [inputs[k] for k in inputs]
    out, seconds = {}, {}

    def timed(name, fn):
        t = time.perf_counter()
        out[name] = fn()
        seconds[name] = round(time.perf_counter() - t, 1)

    timed("reference fp32", lambda: _fp32_contract(a.component, ref, inputs, fmt))
    ref64 = calibrate.ReferencePort(a.component, ref, fmt)  # casts `ref` itself to float64
    timed("reference fp64", lambda: ref64(*args))
    del ref, ref64
    port = diffusers.build(a.checkpoint, a.component)
    timed("diffusers fp32", lambda: port(*args))
    port = port.double()
    timed("diffusers fp64", lambda: port(*[x.double() if x.is_floating_point() else x for x in args]))
    exact = out["reference fp64"]
    res = {"component": a.component, "inputs": desc, "seconds": seconds,
           "reference fp32 vs reference fp64": rel(out["reference fp32"], exact),
           "diffusers fp32 vs reference fp64": rel(out["diffusers fp32"], exact),
           "diffusers fp32 vs reference fp32": rel(out["diffusers fp32"], out["reference fp32"]),
           "diffusers fp64 vs reference fp64": rel(out["diffusers fp64"], exact)}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            f.write(json.dumps(res, indent=1) + "\n")


def _fp32_contract(component, ref, inputs, fmt):
    """The reference's fp32 output in the port contract's form (the encoder's moments before the clamp)."""
    from sdport.parity.components import entry

    pc = entry(component)
    if pc.contract_module is None:
        return pc.contract_output(call_reference(component, ref, inputs, fmt))
    got = []
    h = dict(ref.named_modules())[pc.contract_module].register_forward_hook(lambda m, i, o: got.append(o))
    try:
        call_reference(component, ref, inputs, fmt)
    finally:
        h.remove()
    return got[0]


if __name__ == "__main__":
    main()
