"""Build native models from configs and load them from the HDF5 layout alone."""
from __future__ import annotations

import torch

from . import clip, unet, vae
from .config import from_dict
from .errors import LayoutError
from .layout import LayoutReader

# layout group -> (config class, model class)
MODELS = {
    "unet": (unet.UNetConfig, unet.UNet),
    "text_model": (clip.TextConfig, clip.TextEncoder),
    "vit": (clip.VisionConfig, clip.VisionEncoder),
    "encoder": (vae.VAEConfig, vae.VAEEncoder),
    "decoder": (vae.VAEConfig, vae.VAEDecoder),
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(component: str, config) -> torch.nn.Module:
    """A native model for `config` (a config dataclass or its dict), with uninitialised weights."""
    cfg_cls, model_cls = MODELS[component]
    if isinstance(config, dict):
        config = from_dict(cfg_cls, config)
    return model_cls(config)


def load_model(source: str | LayoutReader, component: str, *, device="cpu", dtype: torch.dtype | str | None = None):
    """Load one component from an sdport .h5 file; weights are memory-mapped until cast or moved."""
    reader = source if isinstance(source, LayoutReader) else LayoutReader(source)
    cfg_cls = MODELS[component][0]
    try:
        cfg = from_dict(cfg_cls, reader.config(component))
    except (TypeError, ValueError) as e:
        raise LayoutError(f"{reader.path}: /{component} config does not fit {cfg_cls.__name__} ({e})") from None
    with torch.device("meta"):
        model = build(component, cfg)
    want = model.state_dict()
    have = set(reader.keys(component))
    missing = [k for k in want if k not in have]
    if missing:
        raise LayoutError(f"{reader.path}: /{component}/{missing[0]} is missing ({len(missing)} datasets missing)")
    extra = sorted(have - set(want))
    if extra:
        raise LayoutError(f"{reader.path}: /{component}/{extra[0]} is not a parameter of the native {component}")
    sd = {}
    for k, meta in want.items():
        t = reader.tensor(component, k)
        if tuple(t.shape) != tuple(meta.shape):
            raise LayoutError(f"{reader.path}: /{component}/{k} has shape {list(t.shape)}, expected {list(meta.shape)}")
        sd[k] = t
    model.load_state_dict(sd, assign=True)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval().requires_grad_(False)
