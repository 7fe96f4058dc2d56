"""Weights reordered once into oneDNN's blocked layout, for inference on a CPU.

oneDNN runs a convolution or a GEMM on weights in a blocked layout (e.g. OIhw16i16o), not in the
plain layout an `nn.Conv2d` / `nn.Linear` holds, so every eager call first reorders the whole weight.
For the UNet's 8x8 and 16x16 levels, whose 1280- and 2560-channel 3x3 weights are 59-118 MB each, that
reorder costs about as much as the convolution itself (bench/README.md has the figures). A packed module does the reorder once and frees the plain
weight: memory stays the same, the arithmetic is oneDNN's either way (convolutions give the same bits,
GEMMs agree to ~2e-7 relative).

`pack(model, lazy=True)` defers each reorder to the module's first call; `load_model` adds
`pack_on_first_call`, which reorders them all when the whole model is first called. Loading stays a
memory map (the full UNet ready to run in about the time safetensors takes), and the first forward
pays the reorders a plain forward pays on every call (bench/README.md). `lazy=False` reorders
everything at once.

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


def _bf16_reorders() -> bool:
    """oneDNN's bf16 weight reorder needs AVX512 (BW, VL, DQ) or AVX-NE-CONVERT; without them a bf16
    model runs with plain weights (torch's own bf16 kernels) instead of failing at its first call."""
    is_avx512 = getattr(torch.cpu, "_is_avx512_supported", None)
    if is_avx512 is not None and is_avx512():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx_ne_convert" in line for line in f)
    except OSError:
        return False


DTYPES = (torch.float32, torch.bfloat16) if _bf16_reorders() else (torch.float32,)
# A shape hint for oneDNN's choice of weight layout; any input shape runs correctly with it, and
# the choice barely depends on it (measured within noise from 8x8 to 64x64).
_CONV_HINT_SIDE = 64
_LINEAR_HINT_ROWS = 4096


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class _Packed(nn.Module):
    """Holds the plain weight until the first call (or `pack_now`), then only the oneDNN-layout copy."""

    def __init__(self, plain: torch.Tensor, bias: torch.Tensor | None, lazy: bool):
        super().__init__()
        self._plain: torch.Tensor | None = plain.detach()  # not a parameter: it goes away once packed
        self._packed: torch.Tensor | None = None
        self.bias = bias
        if not lazy:
            self.pack_now()

    def _reorder(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pack_now(self) -> torch.Tensor:
        if self._packed is None:
            self._packed = self._reorder(self._plain.contiguous())  # oneDNN reads the plain layout
            self._plain = None  # frees it (or unmaps it) unless someone else holds it
        return self._packed

    @property
    def is_packed(self) -> bool:
        return self._packed is not None

    @property
    def weight(self) -> torch.Tensor:
        """The plain-layout weight: before packing the held tensor, after it a fresh copy."""
        return self._plain if self._packed is None else self._packed.to_dense()

    @property
    def packed_weight(self) -> torch.Tensor:
        """The tensor the module holds: the packed weight, or the plain one not yet packed."""
        return self._plain if self._packed is None else self._packed

    def _ready(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"{type(self).__name__} holds CPU-packed weights; load the model again "
                               f"for device {x.device}")
        return self.pack_now()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)


class PackedConv2d(_Packed):
    """An `nn.Conv2d` (groups 1) whose weight lives in oneDNN's layout."""

    def __init__(self, conv: nn.Conv2d, *, lazy: bool = False):
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, list(conv.stride)
        self.padding, self.dilation = list(conv.padding), list(conv.dilation)
        super().__init__(conv.weight, conv.bias, lazy)

    def _reorder(self, w: torch.Tensor) -> torch.Tensor:
        hint = [2, self.in_channels, _CONV_HINT_SIDE, _CONV_HINT_SIDE]
        return torch.ops.mkldnn._reorder_convolution_weight(w, self.padding, self.stride, self.dilation, 1, hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._ready(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, w, self.bias, self.padding, self.stride, self.dilation, 1, "none", [], "")

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class PackedLinear(_Packed):
    """An `nn.Linear` whose weight lives in oneDNN's layout."""

    def __init__(self, linear: nn.Linear, *, lazy: bool = False):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        super().__init__(linear.weight, linear.bias, lazy)

    def _reorder(self, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(w, _LINEAR_HINT_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._ready(x)
        return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")

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


def pack(model: nn.Module, *, lazy: bool = False) -> int:
    """Replace, in place, every packable Conv2d / Linear of `model` by its packed twin; returns the count.

    Each plain weight is released as soon as its packed copy exists (if nothing else holds it), so the
    peak stays about one layer above the model's size. With `lazy`, each module packs on its first call.
    """
    if not available():
        return 0
    return _pack_children(model, lazy)


def pack_all(model: nn.Module) -> int:
    """Pack now every lazily packed module of `model` not yet packed; returns how many were."""
    todo = [m for m in model.modules() if isinstance(m, _Packed) and not m.is_packed]
    for m in todo:
        m.pack_now()
    return len(todo)


def pack_on_first_call(model: nn.Module) -> None:
    """Pack every lazily packed module of `model` when `model` is first called, before its forward
    allocates anything. Packing layer by layer inside the forward interleaves the packed weights with
    the activations on the heap, and the next call ran slower (bench/README.md)."""

    def hook(module, args):
        handle.remove()
        pack_all(module)

    handle = model.register_forward_pre_hook(hook)


def _pack_children(parent: nn.Module, lazy: bool) -> int:
    count = 0
    # Names, not module objects: a list of the children would keep every replaced weight alive.
    for name in [n for n, _ in parent.named_children()]:
        child = getattr(parent, name)
        if _packable(child):
            twin = PackedConv2d if isinstance(child, nn.Conv2d) else PackedLinear
            setattr(parent, name, twin(child, lazy=lazy))
            count += 1
        else:
            count += _pack_children(child, lazy)
    return count
