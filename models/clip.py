"""CLIP encoders: the text transformers SD v1 and 2.x condition on, and the ViT image encoder of SD image variations.

SD v1's text tower is OpenAI CLIP ViT-L/14's (quick GELU, the last block's output, padding with END);
SD 2.x's is OpenCLIP ViT-H/14's as ldm's FrozenOpenCLIPEmbedder runs it (exact GELU, the output after
the penultimate block then the final norm, padding with 0). Both are one `TextEncoder`; the config says which.

Both are pre-norm transformers built from one `TransformerBlock`; they differ only in the embedding
(tokens + positions vs. patches + class token + positions), the mask (causal for text) and the head
(final norm on every token for text; norm on the class token + bias-free projection for images).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    hidden: int = 768
    heads: int = 12
    layers: int = 12
    intermediate: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Which block's output feeds the final norm (ldm's FrozenOpenCLIPEmbedder `layer`): "last", or
    # "penultimate" (SD 2.x), which runs all blocks but the last; the last one's weights stay in the
    # layout, unused, so that export gives the checkpoint back.
    layer: str = "last"
    # The id after END up to max_positions: END in SD v1 (transformers' CLIPTokenizer as CompVis calls
    # it), 0 in SD 2.x (open_clip.tokenize). The tokens after END reach the UNet, so it changes the context.
    pad_id: int = field(default=49407, metadata={"min": 0})

    def __post_init__(self):
        _check_tower(self)
        if self.layer not in LAYERS:
            raise ValueError(f"TextConfig: layer {self.layer[:40]!r} is not one of {', '.join(LAYERS)}")
        if self.layer == "penultimate" and self.layers < 2:
            raise ValueError("TextConfig: layer 'penultimate' needs at least 2 layers")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"TextConfig: pad_id {self.pad_id} outside the vocabulary 0..{self.vocab_size - 1}")

    @property
    def layers_run(self) -> int:
        """Blocks the forward runs: all, or all but the last for "penultimate"."""
        return self.layers - LAYERS.index(self.layer)

    @classmethod
    def sd_v1(cls) -> "TextConfig":
        """OpenAI CLIP ViT-L/14 text tower, as SD v1 uses it."""
        return cls()

    @classmethod
    def tiny(cls) -> "TextConfig":
        return cls(hidden=8, heads=2, layers=2, intermediate=16)

    @classmethod
    def sd_v2(cls) -> "TextConfig":
        """OpenCLIP ViT-H/14 text tower as ldm's FrozenOpenCLIPEmbedder uses it (layer "penultimate")."""
        return cls(hidden=1024, heads=16, layers=24, intermediate=4096, activation="gelu",
                   layer="penultimate", pad_id=0)

    @classmethod
    def tiny_v2(cls) -> "TextConfig":
        return cls(hidden=16, heads=2, layers=3, intermediate=32, activation="gelu", layer="penultimate", pad_id=0)


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 14
    hidden: int = 1024
    heads: int = 16
    layers: int = 24
    intermediate: int = 4096
    projection_dim: int = 768
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_tower(self)
        if not 0 < self.patch_size <= self.image_size:
            raise ValueError(f"VisionConfig: patch_size {self.patch_size} does not fit image_size {self.image_size}")

    @classmethod
    def sd_v1(cls) -> "VisionConfig":
        """OpenAI CLIP ViT-L/14 image tower at 224 px, as SD image variations uses it."""
        return cls()

    @classmethod
    def tiny(cls) -> "VisionConfig":
        return cls(image_size=32, patch_size=8, hidden=16, heads=2, layers=2, intermediate=32, projection_dim=8)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def positions(self) -> int:
        return self.grid * self.grid + 1  # patches + class token


MAX_LAYERS = 256  # transformer blocks in one tower (the largest CLIP towers have 48)
LAYERS = ("last", "penultimate")  # index = blocks left out at the end


def _check_tower(cfg) -> None:
    name = type(cfg).__name__
    if cfg.heads < 1 or cfg.hidden % cfg.heads:
        raise ValueError(f"{name}: hidden {cfg.hidden} is not divisible by heads {cfg.heads}")
    if not 1 <= cfg.layers <= MAX_LAYERS:
        raise ValueError(f"{name}: layers {cfg.layers} outside 1..{MAX_LAYERS}")
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"{name}: unknown activation {cfg.activation[:40]!r}; known: {sorted(ACTIVATIONS)}")


# ----------------------------------------------------------------------------- shared transformer


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI's sigmoid approximation of GELU; the CLIP weights were trained with it.
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (rows ordered q, k, v)."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.causal = causal  # part of the module, so a block re-run in isolation keeps its mask
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, d // self.heads)  # [B, T, 3D] -> [B, T, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # -> 3 x [B, H, T, Dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, H, T, Dh]
        y = y.transpose(1, 2).reshape(b, t, d)  # [B, H, T, Dh] -> [B, T, D]
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, intermediate: int, activation: str, eps: float, causal: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, intermediate, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _blocks(n: int, dim: int, heads: int, intermediate: int, activation: str, eps: float, causal: bool):
    return nn.ModuleList(TransformerBlock(dim, heads, intermediate, activation, eps, causal) for _ in range(n))


# ----------------------------------------------------------------------------- text


class Embedding(nn.Embedding):
    """nn.Embedding that leaves a meta-device weight alone: its normal_ init on meta goes through
    torch's Python decompositions, whose first use imports torch._dynamo (a cost on every load and
    conversion, for values the file replaces anyway)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class TextEmbedding(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token = Embedding(cfg.vocab_size, cfg.hidden)
        self.position = Embedding(cfg.max_positions, cfg.hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[-1]
        if t > self.position.num_embeddings:
            raise ValueError(f"{t} tokens, but the model has only {self.position.num_embeddings} positions")
        # positions are always 0..T-1, so no position-id buffer is needed
        return self.token(input_ids) + self.position.weight[:t]  # [B, T, D] + [T, D]


class TextEncoder(nn.Module):
    """Token ids [B, T<=77] (long) -> hidden state [B, T, hidden] of the config's layer (the last or the
    penultimate block), causal, final layer norm applied."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed = TextEmbedding(cfg)
        self.layers = _blocks(cfg.layers, cfg.hidden, cfg.heads, cfg.intermediate, cfg.activation,
                              cfg.layer_norm_eps, causal=True)
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # [B, T, D]
        for layer in self.layers[: self.config.layers_run]:
            x = layer(x)
        return self.final_norm(x)


# ----------------------------------------------------------------------------- vision


class PatchEmbedding(nn.Module):
    """Image -> [class token, patch tokens] + learned positions."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.patch = nn.Conv2d(3, cfg.hidden, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls = nn.Parameter(torch.empty(cfg.hidden))
        self.position = Embedding(cfg.positions, cfg.hidden)
        nn.init.normal_(self.cls, std=cfg.hidden ** -0.5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"image is {h}x{w}, the model expects {self.image_size}x{self.image_size}")
        x = self.patch(pixel_values.to(self.patch.weight.dtype))  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, D, g, g] -> [B, g*g, D]
        cls = self.cls.expand(b, 1, -1)  # [D] -> [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, 1 + g*g, D]
        return x + self.position.weight  # + [1 + g*g, D]


class VisionEncoder(nn.Module):
    """Pixels [B, 3, S, S] (already CLIP-normalised) -> image embedding [B, projection_dim]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embed = PatchEmbedding(cfg)
        self.pre_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.layers = _blocks(cfg.layers, cfg.hidden, cfg.heads, cfg.intermediate, cfg.activation,
                              cfg.layer_norm_eps, causal=False)
        self.post_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.hidden, cfg.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(self.embed(pixel_values))  # [B, 1 + g*g, D]
        for layer in self.layers:
            x = layer(x)
        pooled = self.post_norm(x[:, 0])  # class token only: [B, D]
        return self.proj(pooled)  # [B, P]


__all__ = [
    "TextConfig", "TextEncoder", "VisionConfig", "VisionEncoder",
    "TransformerBlock", "Attention", "MLP", "TextEmbedding", "PatchEmbedding", "ACTIVATIONS",
]
