"""Weight-only int8 quantization: symmetric, one scale per output channel, int8 kept in memory.

A Linear or Conv2d weight `w` [out, ...] becomes `q` (int8, same shape) and `scale` (float32, [out]):

    scale[o] = max |w[o, ...]| / 127        q = round(w / scale[o]) clamped to [-127, 127]
    w ≈ q * scale[o]

-128 is never used, so the grid is symmetric and `-q` is always representable. Biases, norms,
embeddings and the image/latent-facing convolutions with few channels stay float (`quantizable`).

`Int8Linear` / `Int8Conv2d` hold `weight` (int8) and `weight_scale` as buffers and dequantize one
layer's weight per call: weights in memory cost 1 byte per element plus 4 per output channel, and
the only float copy alive at a time is the layer being run. Their state-dict keys are the dataset
names of the layout (`<module>.weight`, `<module>.weight_scale`), see docs/layout.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCHEME = "symmetric-per-channel"
QMAX = 127
SCALE_SUFFIX = "_scale"  # dataset / state-dict key of a weight's scales: "<weight key>_scale"
# Convolutions with fewer input or output channels than this stay float: the UNet's conv_in/conv_out,
# the VAE's quant convs and RGB convs, the ViT patch embedding. They are a few KiB, touch the image or
# latent directly, and the UNet and the ViT read their compute dtype from conv_in / the patch embedding.
MIN_CONV_CHANNELS = 16


def scale_key(weight_key: str) -> str:
    return weight_key + SCALE_SUFFIX


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, ...] float -> (q int8 [out, ...], scale float32 [out]); axis 0 is the output channel."""
    w32 = w.detach().float()
    amax = w32.abs().reshape(w32.shape[0], -1).amax(dim=1)  # [out, rest] -> [out]
    # An all-zero channel gets scale 1: q is 0 and dequantizes exactly (no 0/0).
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    shape = (-1,) + (1,) * (w32.dim() - 1)  # [out] -> [out, 1, ...] to broadcast over the channel
    q = torch.round(w32 / scale.view(shape)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q int8 [out, ...], scale [out]) -> float weight [out, ...] in `dtype` (computed in fp32, then cast)."""
    shape = (-1,) + (1,) * (q.dim() - 1)  # [out] -> [out, 1, ...]
    w = q.to(torch.float32).mul_(scale.to(torch.float32).view(shape))
    return w if dtype == torch.float32 else w.to(dtype)


def metadata(weight_key: str, source_dtype: str) -> dict:
    """The `quantization` attribute of an int8 weight dataset."""
    return {"scheme": SCHEME, "bits": 8, "axis": 0, "qmin": -QMAX, "qmax": QMAX,
            "scale": scale_key(weight_key), "source_dtype": source_dtype}


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight [out, in] and float32 scales [out]; dequantizes per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Conv2d(nn.Module):
    """nn.Conv2d (zero padding) with an int8 weight [out, in/groups, kh, kw] and float32 scales [out]."""

    def __init__(self, conv: nn.Conv2d, device=None):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"Int8Conv2d supports zero padding only, not {conv.padding_mode!r}")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.register_buffer("weight", torch.zeros(conv.weight.shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(conv.out_channels, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(conv.out_channels, device=device)) if conv.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.weight, self.weight_scale, x.dtype)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, int8")


def quantizable(model: nn.Module) -> list[str]:
    """State-dict keys of the weights `quantize_model` and `sdport convert --quantize` turn into int8."""
    keys = []
    for name, m in model.named_modules():
        conv_ok = (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"
                   and min(m.in_channels, m.out_channels) >= MIN_CONV_CHANNELS)
        if name and (isinstance(m, nn.Linear) or conv_ok):
            keys.append(f"{name}.weight")
    return keys


def _int8_module(m: nn.Module, device) -> nn.Module:
    if isinstance(m, nn.Linear):
        return Int8Linear(m.in_features, m.out_features, m.bias is not None, device=device)
    if isinstance(m, nn.Conv2d):
        return Int8Conv2d(m, device=device)
    raise TypeError(type(m).__name__)


def swap(model: nn.Module, weight_keys) -> nn.Module:
    """Replace the Linear/Conv2d owning each of `weight_keys` by its int8 twin (placeholder buffers, same
    device as the original). Raises KeyError naming a key that is not such a weight."""
    for key in weight_keys:
        path, _, leaf = key.rpartition(".")
        m = model.get_submodule(path) if path else None
        if leaf != "weight" or not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise KeyError(f"{key} is not the weight of a Linear or Conv2d layer")
        new = _int8_module(m, m.weight.device)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, new)
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, weight_keys=None) -> nn.Module:
    """Quantize a float model in place (default: every `quantizable` weight); returns it."""
    keys = quantizable(model) if weight_keys is None else list(weight_keys)
    originals = {k: model.get_submodule(k.rpartition(".")[0]) for k in keys}
    swap(model, keys)
    for key, old in originals.items():
        new = model.get_submodule(key.rpartition(".")[0])
        q, s = quantize(old.weight)
        new.weight.copy_(q)
        new.weight_scale.copy_(s)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters, buffers and packed weights (what its weights cost in memory)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m.packed_weight for m in model.modules() if hasattr(m, "packed_weight")]
    return sum(t.numel() * t.element_size() for t in tensors)
