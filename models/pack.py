"""Weights reordered once into oneDNN's blocked layout, for inference on a CPU.

oneDNN runs a convolution or a GEMM on weights in a blocked layout (e.g. OIhw16i16o), not in the
plain layout an `nn.Conv2d` / `nn.Linear` holds, so every eager call first reorders the whole weight.
For the UNet's 8x8 and 16x16 levels, whose 1280- and 2560-channel 3x3 weights are 59-118 MB each, that
reorder costs about as much as the convolution itself (2560->1280 at 8x8: 94 GFLOP/s plain against
247 GFLOP/s pre-packed; bench/README.md). `pack(model)` does the reorder once, at load time, and frees
the plain weight: memory stays the same, the arithmetic is oneDNN's either way (convolutions give the
same bits, GEMMs agree to ~2e-7 relative).

Packed modules run on CPU tensors only. Their state dict still has the plain `weight`
(`_save_to_state_dict` unpacks), so saving and inspecting a packed model works; moving one to another
device does not (load it again for that device instead).
"""
from __future__ import annotations

import torch
from torch import nn

# Small convolutions stay plain: the UNet's conv_in / conv_out touch the latent, the UNet reads its
# compute dtype from conv_in, and packing a few KiB gains nothing.
MIN_CHANNELS = 16
DTYPES = (torch.float32, torch.bfloat16)
# A shape hint for oneDNN's choice of weight layout; any input shape runs correctly with it, and
# the choice barely depends on it (measured within noise from 8x8 to 64x64).
_CONV_HINT_SIDE = 64
_LINEAR_HINT_ROWS = 4096


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _check_cpu(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cpu":
        raise RuntimeError(f"{name} holds CPU-packed weights; load the model again for device {x.device}")


class PackedConv2d(nn.Module):
    """An `nn.Conv2d` (groups 1) whose weight lives in oneDNN's layout."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, list(conv.stride)
        self.padding, self.dilation = list(conv.padding), list(conv.dilation)
        hint = [2, conv.in_channels, _CONV_HINT_SIDE, _CONV_HINT_SIDE]
        w = conv.weight.detach().contiguous()  # oneDNN reads the plain OIHW layout
        self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.to_mkldnn(), self.padding, self.stride, self.dilation, 1, hint)
        self.bias = conv.bias

    @property
    def weight(self) -> torch.Tensor:
        return self._packed.to_dense()  # [out, in, kh, kw], a fresh copy

    @property
    def packed_weight(self) -> torch.Tensor:
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_cpu(x, "PackedConv2d")
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self.bias, self.padding, self.stride, self.dilation, 1, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight lives in oneDNN's layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(),
                                                               _LINEAR_HINT_ROWS)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self._packed.to_dense()  # [out, in], a fresh copy

    @property
    def packed_weight(self) -> torch.Tensor:
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_cpu(x, "PackedLinear")
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _packable(m: nn.Module) -> bool:
    # Exact types only: the int8 modules subclass nothing here, but a user's subclass may override forward.
    if type(m) is nn.Conv2d:
        ok = (m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
              and min(m.in_channels, m.out_channels) >= MIN_CHANNELS)
    elif type(m) is nn.Linear:
        ok = True
    else:
        return False
    w = m.weight
    return ok and w.device.type == "cpu" and w.dtype in DTYPES


def pack(model: nn.Module) -> int:
    """Replace, in place, every packable Conv2d / Linear of `model` by its packed twin; returns the count.

    Each plain weight is released as soon as its packed copy exists (if nothing else holds it), so the
    peak stays about one layer above the model's size.
    """
    if not available():
        return 0
    return _pack_children(model)


def _pack_children(parent: nn.Module) -> int:
    count = 0
    # Names, not module objects: a list of the children would keep every replaced weight alive.
    for name in [n for n, _ in parent.named_children()]:
        child = getattr(parent, name)
        if _packable(child):
            setattr(parent, name, PackedConv2d(child) if isinstance(child, nn.Conv2d) else PackedLinear(child))
            count += 1
        else:
            count += _pack_children(child)
    return count
