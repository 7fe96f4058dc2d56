"""Loading the reference side: the original model built for a config, given a checkpoint's own tensors.

The weights are read exactly as the converter reads them (the same plan: prefix, EMA policy, source
layout), so the reference and the native model hold the same numbers.
"""
from __future__ import annotations

import contextlib
import io

import torch

from ..components import ParityError, entry


def load_reference(component: str, checkpoint: str, *, num_heads: int | None = None,
                   num_head_channels: int | None = None):
    """The reference model with the checkpoint's weights, in fp32 on the CPU: (model, config, source format).

    Keys are read exactly as the converter reads them (same plan: prefix, EMA policy). The model is
    built with its parameters on the meta device and takes the checkpoint's tensors as its parameters
    (`assign=True`), so one copy of the weights exists (a full SD v1 UNet is 3.4 GB in fp32)."""
    cfg, fmt, sd = read_reference_weights(component, checkpoint, num_heads=num_heads,
                                          num_head_channels=num_head_channels)
    model = _build_reference(component, cfg, fmt)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    del sd
    # The VAE container holds encoder and decoder; only the other half may stay unloaded, and it is
    # dropped (its parameters hold no values).
    other = entry(component).other_half
    for name in other:
        setattr(model, name, None)
    # position_ids: a buffer that older transformers saved with the weights; the built value is right.
    missing = [k for k in missing if not k.startswith(tuple(f"{n}." for n in other)) and not k.endswith("position_ids")]
    if missing or unexpected:
        raise ParityError(f"{checkpoint}: reference {component} does not take the checkpoint's weights "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    empty = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if empty:
        raise ParityError(f"{checkpoint}: reference {component} has tensors the checkpoint does not fill "
                          f"({', '.join(empty[:3])})")
    return model.float().eval().requires_grad_(False), cfg, fmt


def read_reference_weights(component: str, checkpoint: str, *, num_heads: int | None = None,
                           num_head_channels: int | None = None):
    """(config, source format, {source key relative to the component's prefix: fp32 tensor}): the
    checkpoint's tensors of `component`, read as the converter reads them (same plan: prefix, EMA
    policy). A port built from the checkpoint (parity/ports/) starts from the same numbers."""
    from ...convert.checkpoint import open_checkpoint
    from ...convert.detect import plan

    with open_checkpoint(checkpoint) as ckpt:
        p = plan(ckpt, components={component}, num_heads=num_heads, num_head_channels=num_head_channels)
        if component not in p.components:
            raise ParityError(f"{checkpoint}: no {component} component in this checkpoint "
                              f"(it holds: {', '.join(p.components) or 'none'})")
        cp = p.components[component]
        # .float() is the tensor itself when it is fp32 already; the reader gives each tensor its own memory.
        sd = {s: ckpt.tensor(cp.key_of[s]).float() for r in cp.rows for s in r.sources}
    return cp.config, cp.source_format, sd


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device: no memory and no initialisation,
    the checkpoint supplies the values. Buffers (transformers' position_ids, ...) are built for real:
    they are computed in __init__ and no checkpoint holds them. It patches nn.Module for the whole
    process while it lasts: build nothing else meanwhile."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def weightless_reference(component: str, cfg, source_format: str):
    """The reference model for `cfg` with its parameters on the meta device and the component's other
    half dropped: its structure (names, classes, shapes) and a shape-only pass, no weights."""
    model = _build_reference(component, cfg, source_format)
    for name in entry(component).other_half:
        setattr(model, name, None)
    return model.eval()


def _build_reference(component: str, cfg, source_format: str):
    """The reference model for `cfg` with its parameters on the meta device (see parameters_on_meta).
    ldm prints as it imports and builds ("No module 'xformers'", "making attention of type ...", "Working
    with z of shape ..."): that goes nowhere, so sdport's own output stays its own."""
    with parameters_on_meta(), contextlib.redirect_stdout(io.StringIO()):
        return entry(component).reference_builder(source_format)(cfg)
