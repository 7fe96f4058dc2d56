"""The KL autoencoder of Stable Diffusion v1: an image encoder to latent moments and a decoder back.

Math follows the CompVis `Encoder`/`Decoder` (GroupNorm(32, eps 1e-6), swish, no timestep
embedding, a single-head attention block in the middle only). Module names are ours:

    encoder: conv_in, down.{i}.res.{j}, down.{i}.downsample, mid.{res1,attn,res2}, norm_out, conv_out,
             quant_conv
    decoder: post_quant_conv, conv_in, mid.{res1,attn,res2}, up.{i}.res.{j}, up.{i}.upsample,
             norm_out, conv_out

Decoder `up.{i}` is numbered in execution order: `up.0` runs first, at the lowest resolution.
The latent scale factor (0.18215 for SD v1) is not applied here: pipelines own it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32
NORM_EPS = 1e-6
MAX_BLOCKS = 256  # ResBlocks per half of the VAE (SD v1: 3 per level, 4 levels)
LATENT_SCALE_SD_V1 = 0.18215  # LatentDiffusion's scale_factor for SD v1: latents = scale * VAE mean
# The diagonal Gaussian keeps its log-variance in this range (exp stays finite in fp32).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        for m in self.ch_mult:
            if (self.ch * m) % NORM_GROUPS:
                raise ValueError(f"VAEConfig: width {self.ch}*{m} is not a multiple of {NORM_GROUPS} norm groups")
        if not self.ch_mult or self.num_res_blocks < 1 or min(self.ch_mult) < 1:
            raise ValueError("VAEConfig: need at least one level, one res block per level and widths >= 1")
        if len(self.ch_mult) * (self.num_res_blocks + 1) > MAX_BLOCKS:
            raise ValueError(f"VAEConfig: {len(self.ch_mult)} levels x {self.num_res_blocks + 1} ResBlocks "
                             f"is more than {MAX_BLOCKS}")

    @classmethod
    def sd_v1(cls) -> "VAEConfig":
        return cls(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD v1)."""
        return 2 ** (len(self.ch_mult) - 1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, c, eps=NORM_EPS)


class ResBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 conv shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place only on tensors this block created; the commutative add keeps ldm's bits.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.shortcut is None else self.shortcut(x))


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Linear(c, 3 * c)  # the checkpoint's three 1x1 convs, fused
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, C, H, W] -> [B, H, W, C] -> [B, H*W, C]: a view when x is channels-last, a copy otherwise.
        t = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q, k, v = self.qkv(t).unsqueeze(1).chunk(3, dim=-1)  # [B, H*W, 3C] -> 3 x [B, 1, H*W, C]
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, 1, H*W, C] -> [B, H*W, C]
        o = self.proj(o).view(b, h, w, c).permute(0, 3, 1, 2)  # [B, H*W, C] -> [B, C, H, W], channels-last view
        return x + o


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom, as the checkpoint was trained."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.res1 = ResBlock(c, c)
        self.attn = Attention(c)
        self.res2 = ResBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class DownLevel(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_res: int, downsample: bool):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c_in if j == 0 else c_out, c_out) for j in range(n_res))
        self.downsample = Downsample(c_out) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.res:
            x = r(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_res: int, upsample: bool):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c_in if j == 0 else c_out, c_out) for j in range(n_res))
        self.upsample = Upsample(c_out) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.res:
            x = r(x)
        return x if self.upsample is None else self.upsample(x)


class VAEEncoder(nn.Module):
    """Image [B, in, H, W] -> (mean, logvar), each [B, embed_dim, H/f, W/f] with f = cfg.downscale."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(([cfg.ch] + widths)[i], widths[i], cfg.num_res_blocks, downsample=i < n - 1) for i in range(n)
        )
        self.mid = Mid(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and logvar
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)  # [B, 2E, h, w] -> 2 x [B, E, h, w]
        # Same clamp as CompVis' DiagonalGaussianDistribution, so exp(logvar) stays finite.
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class VAEDecoder(nn.Module):
    """Latent [B, embed_dim, h, w] -> image [B, out, h*f, w*f] with f = cfg.downscale (no tanh, unclamped)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]  # execution order: deepest level first
        n = len(widths)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = Mid(widths[0])
        # One more res block per level than the encoder has.
        self.up = nn.ModuleList(
            UpLevel(widths[max(i - 1, 0)], widths[i], cfg.num_res_blocks + 1, upsample=i < n - 1) for i in range(n)
        )
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # NCHW on purpose: torch's CPU GroupNorm on channels-last input accumulates far less exactly
        # (1M elements per group at 512x512: rel_l2 9.6e-6 vs 4.6e-8 against fp64), which put the full-size
        # decoder at 1.9e-5 from the reference, above the fp32 gate.
        h = self.post_quant_conv(z.contiguous())
        h = self.mid(self.conv_in(h))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()  # back to the usual NCHW layout
