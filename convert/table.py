"""Mapping tables: rows of (native key, source key(s), transform), and the named transforms.

A table is data. It drives conversion (source -> native), export (native -> source) and the
layer map that parity uses to pair native modules with reference modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.errors import SdportError


class UnsupportedCheckpoint(SdportError, ValueError):
    """A checkpoint outside the supported families; the message names the key and shape that decided it."""


def shape_of(shapes: dict, key: str, ndim: int, what: str, expected: str) -> tuple[int, ...]:
    """The shape of an anchor key that decides a config: present and of rank `ndim`, else a one-line
    UnsupportedCheckpoint naming `what`, the key, the shape found and `expected` (how it is described)."""
    if key not in shapes:
        raise UnsupportedCheckpoint(f"{what}: missing key {key!r}, expected shape {expected}")
    got = tuple(shapes[key])
    if len(got) != ndim:
        raise UnsupportedCheckpoint(f"{what}: key {key!r} has shape {list(got)}, expected {expected}")
    return got


@dataclass(frozen=True)
class Block:
    """A block of the architecture: native submodule prefix <-> reference submodule prefix.

    Rows are generated from blocks; parity pairs block outputs through them.
    """

    native: str
    source: str
    kind: str


@dataclass(frozen=True)
class Row:
    """One native parameter and where it comes from.

    `sources` are keys relative to the component's source prefix; most rows have one.
    """

    native: str
    sources: tuple[str, ...]
    transform: str = "identity"

    @staticmethod
    def of(native: str, *sources: str, transform: str = "identity") -> "Row":
        return Row(native, tuple(sources) if sources else (native,), transform)


def _identity(ts):
    (t,) = ts
    return t


def _identity_inv(t, n):
    return [t]


def _conv1x1_to_linear(ts):
    (t,) = ts
    if t.dim() != 4 or t.shape[2:] != (1, 1):
        raise ValueError(f"expected a 1x1 conv weight [out, in, 1, 1], got {tuple(t.shape)}")
    return t[:, :, 0, 0]  # [out, in, 1, 1] -> [out, in]


def _conv1x1_to_linear_inv(t, n):
    return [t[:, :, None, None]]  # [out, in] -> [out, in, 1, 1]


def _concat(ts):
    shapes = {tuple(t.shape) for t in ts}
    if len(shapes) != 1:
        raise ValueError(f"concat needs equal shapes, got {sorted(shapes)}")
    return torch.cat(list(ts), dim=0)  # n x [d, ...] -> [n*d, ...]


def _concat_inv(t, n):
    return [c.clone() for c in t.chunk(n, dim=0)]  # [n*d, ...] -> n x [d, ...]


def _concat_conv1x1_to_linear(ts):
    # n 1x1 convs (e.g. q, k, v) -> one fused linear
    return _conv1x1_to_linear([_concat(ts)])  # n x [d, in, 1, 1] -> [n*d, in]


def _concat_conv1x1_to_linear_inv(t, n):
    return _concat_inv(t[:, :, None, None], n)  # [n*d, in] -> n x [d, in, 1, 1]


def _transpose(ts):
    (t,) = ts
    if t.dim() != 2:
        raise ValueError(f"transpose expects a matrix, got {tuple(t.shape)}")
    return t.t()  # [in, out] (x @ W layout) -> [out, in] (Linear layout)


def _transpose_inv(t, n):
    return [t.t()]  # [out, in] -> [in, out]


# name -> (forward: list of source tensors -> native tensor, inverse: native tensor, n -> sources)
TRANSFORMS = {
    "identity": (_identity, _identity_inv),
    "conv1x1_to_linear": (_conv1x1_to_linear, _conv1x1_to_linear_inv),
    "concat": (_concat, _concat_inv),
    "concat_conv1x1_to_linear": (_concat_conv1x1_to_linear, _concat_conv1x1_to_linear_inv),
    "transpose": (_transpose, _transpose_inv),
}


def forward(row: Row, tensors) -> torch.Tensor:
    """Source tensors of `row` (in `row.sources` order) -> the native tensor."""
    return TRANSFORMS[row.transform][0](list(tensors)).contiguous()


def inverse(row: Row, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Native tensor of `row` -> {source key: tensor}, bit-exact with what `forward` consumed."""
    parts = TRANSFORMS[row.transform][1](tensor, len(row.sources))
    return {k: p.contiguous() for k, p in zip(row.sources, parts)}


def apply(rows, source: dict) -> dict[str, torch.Tensor]:
    """Convert a whole (prefix-stripped) source state dict to native keys."""
    return {r.native: forward(r, [source[s] for s in r.sources]) for r in rows}


def invert(rows, native: dict) -> dict[str, torch.Tensor]:
    """Native state dict -> source keys (prefix-stripped)."""
    out: dict[str, torch.Tensor] = {}
    for r in rows:
        out.update(inverse(r, native[r.native]))
    return out
