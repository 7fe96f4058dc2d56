"""The Stable Diffusion UNet (v1 and 2.x): a noise predictor conditioned on a timestep and a text context.

Computes what CompVis' `UNetModel` computes with the SD v1 settings (spatial transformers with 1x1-conv
projections, fixed head count, GEGLU feed-forward) and with Stability's 2.x settings (linear
projections, 64-wide heads so the head count grows with the level's width, a 1024-wide context). The
native projections are token-space `nn.Linear` either way: a 1x1 conv on [B, C, H, W] and a linear on
[B, H*W, C] are the same map, so the two differ only in the mapping table. Laid out the way the
architecture reads:

    time_embed                      sinusoidal timestep features -> MLP -> emb
    conv_in
    down.{level}.res.{j}            ResBlock (+ down.{level}.attn.{j}, a SpatialTransformer, where enabled)
    down.{level}.downsample         stride-2 conv (all levels but the last)
    mid.res.0, mid.attn, mid.res.1
    up.{level}.res.{j}              ResBlock on [h, skip] (+ up.{level}.attn.{j}); num_res_blocks + 1 per level
    up.{level}.upsample             nearest x2 then conv (all levels but the first)
    norm_out, conv_out

`up` is indexed by level like `down` (up.0 is full resolution and runs last), so a level's skips come
from the down level with the same index.

Fast by construction: one fused q/k/v projection for self-attention, fused k/v for cross-attention,
token-space `nn.Linear` for the 1x1 projections, `scaled_dot_product_attention` (in bf16 on a CPU, the
AVX512-BF16 kernel of models/cpu/attention.py where it builds), and optional chunking
of attention along query tokens (`UNet.set_attention_chunk`) to bound peak memory. In fp16 and bf16,
q·kᵀ and the softmax stay in fp32 as in ldm (`attend`). Activations run in
channels-last memory format: oneDNN's convolutions prefer it, and a spatial transformer's tokens
[B, H*W, C] are then a free view of its feature map instead of a transposed copy each way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import attention as cpu_attention

GROUPS = 32  # GroupNorm groups everywhere in the UNet
RES_NORM_EPS = 1e-5  # ResBlocks and norm_out (ldm's GroupNorm32: nn.GroupNorm default eps)
ATTN_NORM_EPS = 1e-6  # SpatialTransformer.norm (ldm's Normalize: eps 1e-6, no fp32 upcast)
MAX_PERIOD = 10000.0  # timestep embedding
MAX_BLOCKS = 1024  # ResBlocks + transformer blocks in one UNet (SD v1: 25 + 16; SDXL: 27 + 140)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for the inpainting UNet (latent + mask + masked-image latent)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a SpatialTransformer (ldm: ds = 2**level)
    num_heads: int = 8  # fixed per layer; head dim = channels // num_heads varies with the level
    transformer_depth: int = 1
    context_dim: int = 768
    # > 0: heads of this width instead (SD 2.x: 64), so the head count is width // num_head_channels per
    # level and num_heads is unused; 0: num_heads heads everywhere (ldm's num_head_channels=-1).
    num_head_channels: int = field(default=0, metadata={"min": 0})
    # ldm's use_linear_in_transformer (SD 2.x): proj_in/proj_out are linear layers in the checkpoint,
    # not 1x1 convs. The native modules are the same; only the mapping table's transform differs.
    use_linear_in_transformer: bool = False

    def __post_init__(self):
        if not self.channel_mult:
            raise ValueError("channel_mult is empty")
        if min(self.channel_mult) < 1 or self.num_res_blocks < 1 or self.num_heads < 1 or self.transformer_depth < 1:
            raise ValueError("channel_mult entries, num_res_blocks, num_heads and transformer_depth must be >= 1")
        # Down, mid and up ResBlocks, and the transformer blocks at the attention levels: a file's config
        # cannot ask the loader to build an unbounded number of modules.
        blocks = len(self.channel_mult) * (2 * self.num_res_blocks + 1) + 2
        blocks += (len(set(self.attention_levels)) * (2 * self.num_res_blocks + 1) + 1) * self.transformer_depth
        if blocks > MAX_BLOCKS:
            raise ValueError(f"the config asks for {blocks} blocks (at most {MAX_BLOCKS})")
        for c in self.level_channels:
            if c % GROUPS:
                raise ValueError(f"level width {c} is not divisible by {GROUPS} GroupNorm groups")
        for level in self.attention_levels:
            if not 0 <= level < len(self.channel_mult):
                raise ValueError(f"attention level {level} outside 0..{len(self.channel_mult) - 1}")
        if self.num_head_channels < 0:
            raise ValueError(f"num_head_channels must be >= 0, got {self.num_head_channels}")
        per = ("num_head_channels", self.num_head_channels) if self.num_head_channels else ("num_heads", self.num_heads)
        for c in [self.level_channels[i] for i in self.attention_levels] + [self.level_channels[-1]]:
            if c % per[1]:
                raise ValueError(f"attention width {c} is not divisible by {per[0]} {per[1]}")

    def heads(self, width: int) -> int:
        """Attention heads of a transformer `width` channels wide (ldm's rule for the two head layouts)."""
        return width // self.num_head_channels if self.num_head_channels else self.num_heads

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def sample_size(self) -> int:
        """The latent side the model is meant for (no checkpoint stores it; the same rule as the parity
        inputs): 64 for SD v1's 320-channel UNet (512 px through the VAE's factor 8), 16 for smaller UNets
        such as the tiny test preset."""
        return 64 if self.model_channels >= 320 else 16

    @classmethod
    def sd_v1(cls) -> "UNetConfig":
        return cls()

    @classmethod
    def sd_v1_inpainting(cls) -> "UNetConfig":
        return cls(in_channels=9)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        return cls(
            model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
            num_heads=2, transformer_depth=1, context_dim=8,
        )

    @classmethod
    def sd_v2(cls, in_channels: int = 4) -> "UNetConfig":
        """SD 2.x (512-base, 768-v, 2.1; in_channels 9: inpainting, 5: depth): the v2 yamls' unet_config."""
        return cls(in_channels=in_channels, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

    @classmethod
    def tiny_v2(cls, in_channels: int = 4) -> "UNetConfig":
        """The tiny preset with the 2.x head layout: 16-wide heads, so 2 heads at width 32 and 4 in the
        64-wide middle block (the head count varies as it does in SD 2.x)."""
        return cls(
            in_channels=in_channels, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_levels=(0,), num_head_channels=16, transformer_depth=1, context_dim=16,
            use_linear_in_transformer=True,
        )


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = MAX_PERIOD) -> torch.Tensor:
    """[B] timesteps (int or float) -> [B, dim] fp32 features: cos half then sin half, as ldm."""
    half = dim // 2
    # Frequencies on the CPU, then moved, as ldm does: keeps the last bits equal on every device.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]  # [B, 1] * [1, half] -> [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # [B, dim]
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the activation dtype (fp16-safe statistics), cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


ATTENTION_PRECISIONS = ("fp32", "compute")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int | None,
           precision: str = "fp32") -> torch.Tensor:
    """Softmax attention, scale head_dim**-0.5. q [B, h, N, d], k/v [B, h, M, d] -> [B, h, N, d].

    precision "fp32": q·kᵀ and the softmax in fp32 whatever the compute dtype, the probabilities rounded
    to it for the product with v: what ldm's UNet does by default (ATTN_PRECISION=fp32), and what
    SDPA and the bf16 kernel compute. "compute": q·kᵀ in the compute dtype, then scaled and (as autocast
    runs softmax) normalised in fp32: ldm with ATTN_PRECISION=fp16, where a large q·kᵀ overflows fp16.
    With `chunk`, query rows are processed `chunk` at a time: each row's result is the same math,
    but the [N, M] score matrix never exists whole.
    """
    if precision == "compute" and q.dtype in (torch.float16, torch.bfloat16):
        fn = _attention_in_compute_dtype
    else:
        fn = cpu_attention.attention
    n = q.shape[2]
    if chunk is None or chunk >= n:
        return fn(q, k, v)
    out = torch.empty_like(q)
    for i in range(0, n, chunk):
        out[:, :, i : i + chunk] = fn(q[:, :, i : i + chunk], k, v)
    return out


def _attention_in_compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sim = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, h, N, M] in q's dtype, as ldm
    return torch.matmul(sim.float().softmax(dim=-1).to(v.dtype), v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.chunk: int | None = None  # query-chunk size, set by UNet.set_attention_chunk
        self.precision = "fp32"  # of q·kᵀ and the softmax, set by UNet.set_attention_precision
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # rows: to_q | to_k | to_v
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, c // self.heads)  # [B, N, 3C] -> [B, N, 3, h, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # -> 3 x [B, h, N, d]
        o = attend(q, k, v, self.chunk, self.precision)
        return self.out(o.transpose(1, 2).reshape(b, n, c))  # [B, h, N, d] -> [B, N, C]


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.chunk: int | None = None
        self.precision = "fp32"
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)  # rows: to_k | to_v
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        m, h = context.shape[1], self.heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)  # [B, N, C] -> [B, h, N, d]
        kv = self.kv(context).view(b, m, 2, h, c // h)  # [B, M, 2C] -> [B, M, 2, h, d]
        k, v = kv.permute(2, 0, 3, 1, 4)  # -> 2 x [B, h, M, d]
        o = attend(q, k, v, self.chunk, self.precision)
        return self.out(o.transpose(1, 2).reshape(b, n, c))  # [B, h, N, d] -> [B, N, C]


class FeedForward(nn.Module):
    """GEGLU: proj to 2 x 4C, value * gelu(gate), back to C."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)  # rows: value | gate
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # [B, N, 8C] -> 2 x [B, N, 4C]
        return self.out(F.gelu(gate).mul_(value))  # in place on our own temporary: one buffer fewer


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the context, feed-forward; each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, plus the input (residual)."""

    def __init__(self, channels: int, context_dim: int, heads: int, depth: int):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, channels, eps=ATTN_NORM_EPS)
        self.proj_in = nn.Linear(channels, channels)  # a 1x1 conv in the checkpoint
        self.blocks = nn.ModuleList(TransformerBlock(channels, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)  # a 1x1 conv in the checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, C, H, W] -> [B, H, W, C] -> [B, H*W, C]: a view when x is channels-last, a copy otherwise.
        t = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        t = self.proj_in(t)
        for block in self.blocks:
            t = block(t, context)
        t = self.proj_out(t)
        return x + t.view(b, h, w, c).permute(0, 3, 1, 2)  # [B, H*W, C] -> [B, C, H, W], channels-last view


class ResBlock(nn.Module):
    """norm-SiLU-conv, add the projected timestep embedding, norm-SiLU-conv, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = GroupNorm32(GROUPS, cin, eps=RES_NORM_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_proj = nn.Linear(emb_dim, cout)
        self.norm2 = GroupNorm32(GROUPS, cout, eps=RES_NORM_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # In-place steps touch only tensors this block created (never x, never a recorded block output);
        # additions are commutative, so the bits equal ldm's out-of-place `skip(x) + h`.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h += self.time_proj(F.silu(emb)).to(h.dtype)[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.skip is None else self.skip(x))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # [B, C, H, W] -> [B, C, 2H, 2W]


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int, emb_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t_features)))


class Level(nn.Module):
    """One resolution of the down or up path: res blocks, their transformers, and the resampler."""

    def __init__(self, res, attn, resample: str | None, resampler: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty where the level has no attention
        if resample is not None:
            self.add_module(resample, resampler)


class Mid(nn.Module):
    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.res = nn.ModuleList([ResBlock(channels, channels, cfg.time_embed_dim) for _ in range(2)])
        self.attn = SpatialTransformer(channels, cfg.context_dim, cfg.heads(channels), cfg.transformer_depth)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        emb_dim, widths, n = cfg.time_embed_dim, cfg.level_channels, len(cfg.channel_mult)

        def transformer(c):
            return SpatialTransformer(c, cfg.context_dim, cfg.heads(c), cfg.transformer_depth)

        self.time_embed = TimeEmbedding(cfg.model_channels, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1)

        # Down path; `skips` records the width of every tensor the up path will concatenate.
        skips, ch, down = [cfg.model_channels], cfg.model_channels, []
        for level, width in enumerate(widths):
            res = []
            for _ in range(cfg.num_res_blocks):
                res.append(ResBlock(ch, width, emb_dim))
                ch = width
                skips.append(ch)
            attn = [transformer(ch) for _ in res] if level in cfg.attention_levels else []
            last = level == n - 1
            if not last:
                skips.append(ch)
            down.append(Level(res, attn, None if last else "downsample",
                              None if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
        self.down = nn.ModuleList(down)

        self.mid = Mid(ch, cfg)

        # Up path, built deepest level first (execution order), stored by level index.
        up: list[Level | None] = [None] * n
        for level in reversed(range(n)):
            width, res = widths[level], []
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResBlock(ch + skips.pop(), width, emb_dim))
                ch = width
            attn = [transformer(ch) for _ in res] if level in cfg.attention_levels else []
            first = level == 0
            up[level] = Level(res, attn, None if first else "upsample", None if first else Upsample(ch))
        self.up = nn.ModuleList(up)

        self.norm_out = GroupNorm32(GROUPS, ch, eps=RES_NORM_EPS)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def set_attention_chunk(self, chunk: int | None) -> None:
        """Process attention `chunk` query tokens at a time (None: all at once). Same math, less memory."""
        if chunk is not None and chunk < 1:
            raise ValueError(f"attention chunk must be >= 1 or None, got {chunk}")
        for m in self.modules():
            if isinstance(m, (SelfAttention, CrossAttention)):
                m.chunk = chunk

    def set_attention_precision(self, precision: str) -> None:
        """"fp32" (the default, ldm's ATTN_PRECISION=fp32) or "compute": the dtype of q·kᵀ (see `attend`)."""
        if precision not in ATTENTION_PRECISIONS:
            raise ValueError(f"attention precision must be one of {', '.join(ATTENTION_PRECISIONS)}, got {precision!r}")
        for m in self.modules():
            if isinstance(m, (SelfAttention, CrossAttention)):
                m.precision = precision

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, context: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, H, W], t [B] (or a scalar for all), context [B, T, context_dim] -> [B, Cout, H, W].

        H and W must be divisible by 2 ** (len(channel_mult) - 1).
        """
        dtype = self.conv_in.weight.dtype
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])  # [] -> [B]
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        context = context.to(dtype)

        h = self.conv_in(x.to(dtype).contiguous(memory_format=torch.channels_last))
        skips = [h]
        for level in self.down:
            for i, res in enumerate(level.res):
                h = res(h, emb)
                if len(level.attn):
                    h = level.attn[i](h, context)
                skips.append(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
                skips.append(h)

        h = self.mid.res[0](h, emb)
        h = self.mid.attn(h, context)
        h = self.mid.res[1](h, emb)

        for level in reversed(self.up):
            for i, res in enumerate(level.res):
                h = res(torch.cat([h, skips.pop()], dim=1), emb)  # [B, C, H, W] + [B, Cs, H, W] -> [B, C+Cs, H, W]
                if len(level.attn):
                    h = level.attn[i](h, context)
            if hasattr(level, "upsample"):
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h))).contiguous()  # back to the usual NCHW layout
