"""Error of an int8 weight-only model against its float original, layer by layer, as a parity Report.

For every quantized layer (an `Int8Linear` / `Int8Conv2d` of the int8 model):
- accumulated: its output in the int8 model vs the float layer's output, both models run end to end;
- isolated: the int8 layer re-run on the float layer's input vs the float layer's output (the
  quantization error of that layer's weights alone).
A last record, `output`, compares the models' final outputs.

Memory: the int8 model runs first and keeps its quantized layers' outputs (one activation set);
the float pass compares each layer as it goes.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.quant import Int8Conv2d, Int8Linear
from .metrics import compare, default_tolerance
from .report import ACCUMULATED, ISOLATED, Report, collect_versions, make_layer


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quant_report(float_model: nn.Module, int8_model: nn.Module, inputs: tuple, *, component: str,
                 input_info: dict | None = None, tolerance=None) -> Report:
    """Run both models on `inputs` and report per-layer and final-output metrics (dtype "int8")."""
    tol = tolerance or default_tolerance("int8")
    qmods = {n: m for n, m in int8_model.named_modules() if isinstance(m, (Int8Linear, Int8Conv2d))}
    order, q_out, handles = [], {}, []

    def keep(name):
        def hook(_m, _inp, out):
            order.append(name)
            q_out[name] = out.detach().clone()
        return hook

    for n, m in qmods.items():
        handles.append(m.register_forward_hook(keep(n)))
    try:
        q_final = _first(int8_model(*inputs))
    finally:
        for h in handles:
            h.remove()

    metrics: dict[str, tuple] = {}
    handles = []

    def measure(name):
        def hook(_m, inp, out):
            iso = qmods[name](*inp)
            metrics[name] = (tuple(out.shape), compare(q_out.pop(name), out), compare(iso, out))
        return hook

    for n in qmods:
        handles.append(float_model.get_submodule(n).register_forward_hook(measure(n)))
    try:
        f_final = _first(float_model(*inputs))
    finally:
        for h in handles:
            h.remove()

    kind = {n: "conv" if isinstance(m, Int8Conv2d) else "linear" for n, m in qmods.items()}
    # A layer called more than once is reported once, for its last call.
    layers = [make_layer(i, n, n, kind[n], metrics[n][0], tol, accumulated=metrics[n][1], isolated=metrics[n][2])
              for i, n in enumerate(dict.fromkeys(order))]
    layers.append(make_layer(len(layers), "output", "output", "output", tuple(f_final.shape), tol,
                             accumulated=compare(q_final, f_final)))
    device = str(next(float_model.parameters()).device)
    return Report(component, (ACCUMULATED, ISOLATED), "int8", device, tol,
                  {"reference": "the same model with float32 weights", **(input_info or {})},
                  collect_versions(), tuple(layers))
