"""Mapping table: CompVis UNet (`model.diffusion_model.*`) <-> native `sdport.models.unet.UNet`.

The table is built from blocks. Each `Block(native, source, kind)` pairs a native submodule with the
reference submodule that computes the same output; `INNER[kind]` lists the block's own parameters as
(native suffix, source suffixes, transform). Blocks nest (a transformer holds transformer blocks, which
hold attention and feed-forward blocks); each parameter belongs to the innermost block that owns it,
so every row comes from exactly one block. Blocks are listed in pre-order (a block before the blocks
nested in it), otherwise in execution order.

Block forward signatures, the same on both sides (for re-running a block on recorded inputs):
  resnet (x, emb); transformer (x, context); transformer_block (tokens, context);
  self_attention (tokens); cross_attention (tokens, context); mlp (tokens);
  embedding (sinusoidal timestep features [B, model_channels]); conv / norm / downsample / upsample (x).
"""
from __future__ import annotations

import re

import torch

from ..models.unet import GROUPS, UNet, UNetConfig
from .table import Block, Row, UnsupportedCheckpoint, invert

SOURCE_PREFIX = "model.diffusion_model."
PROBE = "input_blocks.0.0.weight"  # present in every UNet; its shape says the variant (4 or 9 input channels)

# Everything the SD v1 UNet stores under SOURCE_PREFIX is mapped; nothing is skipped.
IGNORED: list[tuple[str, str]] = []

_WB = (("weight", ("weight",)), ("bias", ("bias",)))

# kind -> rows relative to the block: (native suffix, source suffixes, transform)
INNER: dict[str, tuple[tuple, ...]] = {
    "embedding": (
        ("linear_1.weight", ("0.weight",)), ("linear_1.bias", ("0.bias",)),
        ("linear_2.weight", ("2.weight",)), ("linear_2.bias", ("2.bias",)),
    ),
    "conv": _WB,
    "norm": _WB,
    "resnet": (
        ("norm1.weight", ("in_layers.0.weight",)), ("norm1.bias", ("in_layers.0.bias",)),
        ("conv1.weight", ("in_layers.2.weight",)), ("conv1.bias", ("in_layers.2.bias",)),
        ("time_proj.weight", ("emb_layers.1.weight",)), ("time_proj.bias", ("emb_layers.1.bias",)),
        ("norm2.weight", ("out_layers.0.weight",)), ("norm2.bias", ("out_layers.0.bias",)),
        ("conv2.weight", ("out_layers.3.weight",)), ("conv2.bias", ("out_layers.3.bias",)),
    ),
    # only for ResBlocks that change the channel count
    "resnet_skip": (
        ("skip.weight", ("skip_connection.weight",)), ("skip.bias", ("skip_connection.bias",)),
    ),
    "downsample": (("weight", ("op.weight",)), ("bias", ("op.bias",))),
    "upsample": (("conv.weight", ("conv.weight",)), ("conv.bias", ("conv.bias",))),
    "transformer": (
        ("norm.weight", ("norm.weight",)), ("norm.bias", ("norm.bias",)),
        ("proj_in.weight", ("proj_in.weight",), "conv1x1_to_linear"), ("proj_in.bias", ("proj_in.bias",)),
        ("proj_out.weight", ("proj_out.weight",), "conv1x1_to_linear"), ("proj_out.bias", ("proj_out.bias",)),
    ),
    "transformer_block": (
        ("norm1.weight", ("norm1.weight",)), ("norm1.bias", ("norm1.bias",)),
        ("norm2.weight", ("norm2.weight",)), ("norm2.bias", ("norm2.bias",)),
        ("norm3.weight", ("norm3.weight",)), ("norm3.bias", ("norm3.bias",)),
    ),
    "self_attention": (
        ("qkv.weight", ("to_q.weight", "to_k.weight", "to_v.weight"), "concat"),
        ("out.weight", ("to_out.0.weight",)), ("out.bias", ("to_out.0.bias",)),
    ),
    "cross_attention": (
        ("q.weight", ("to_q.weight",)),
        ("kv.weight", ("to_k.weight", "to_v.weight"), "concat"),
        ("out.weight", ("to_out.0.weight",)), ("out.bias", ("to_out.0.bias",)),
    ),
    "mlp": (
        ("proj.weight", ("net.0.proj.weight",)), ("proj.bias", ("net.0.proj.bias",)),
        ("out.weight", ("net.2.weight",)), ("out.bias", ("net.2.bias",)),
    ),
}


def _transformer(native: str, source: str, cfg: UNetConfig) -> list[Block]:
    out = [Block(native, source, "transformer")]
    for d in range(cfg.transformer_depth):
        n, s = f"{native}.blocks.{d}", f"{source}.transformer_blocks.{d}"
        out += [
            Block(n, s, "transformer_block"),
            Block(f"{n}.attn1", f"{s}.attn1", "self_attention"),
            Block(f"{n}.attn2", f"{s}.attn2", "cross_attention"),
            Block(f"{n}.ff", f"{s}.ff", "mlp"),
        ]
    return out


def _walk(cfg: UNetConfig) -> list[tuple[Block, bool]]:
    """(block, resnet changes channels) in order, mirroring CompVis' input/middle/output block numbering."""
    widths, n, nrb = cfg.level_channels, len(cfg.channel_mult), cfg.num_res_blocks
    out: list[tuple[Block, bool]] = [
        (Block("time_embed", "time_embed", "embedding"), False),
        (Block("conv_in", "input_blocks.0.0", "conv"), False),
    ]

    def add(blocks):
        out.extend((b, False) for b in blocks)

    skips, ch, k = [cfg.model_channels], cfg.model_channels, 1
    for level, width in enumerate(widths):
        for j in range(nrb):
            out.append((Block(f"down.{level}.res.{j}", f"input_blocks.{k}.0", "resnet"), ch != width))
            ch = width
            skips.append(ch)
            if level in cfg.attention_levels:
                add(_transformer(f"down.{level}.attn.{j}", f"input_blocks.{k}.1", cfg))
            k += 1
        if level != n - 1:
            add([Block(f"down.{level}.downsample", f"input_blocks.{k}.0", "downsample")])
            skips.append(ch)
            k += 1

    out.append((Block("mid.res.0", "middle_block.0", "resnet"), False))
    add(_transformer("mid.attn", "middle_block.1", cfg))
    out.append((Block("mid.res.1", "middle_block.2", "resnet"), False))

    k = 0
    for level in reversed(range(n)):
        width = widths[level]
        for j in range(nrb + 1):
            cin = ch + skips.pop()
            out.append((Block(f"up.{level}.res.{j}", f"output_blocks.{k}.0", "resnet"), cin != width))
            ch = width
            idx = 1
            if level in cfg.attention_levels:
                add(_transformer(f"up.{level}.attn.{j}", f"output_blocks.{k}.1", cfg))
                idx = 2
            if level != 0 and j == nrb:
                add([Block(f"up.{level}.upsample", f"output_blocks.{k}.{idx}", "upsample")])
            k += 1

    add([Block("norm_out", "out.0", "norm"), Block("conv_out", "out.2", "conv")])
    return out


def blocks(cfg: UNetConfig) -> list[Block]:
    return [b for b, _ in _walk(cfg)]


def _join(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def rows(cfg: UNetConfig) -> list[Row]:
    out = []
    for b, has_skip in _walk(cfg):
        inner = INNER[b.kind] + (INNER["resnet_skip"] if has_skip else ())
        for native, sources, *transform in inner:
            out.append(Row(
                _join(b.native, native),
                tuple(_join(b.source, s) for s in sources),
                transform[0] if transform else "identity",
            ))
    return out


# ---------------------------------------------------------------------------------------------------
# Config inference from shapes


def _preset_heads(model_channels: int) -> int:
    """Head count for a UNet whose checkpoint does not say (heads never show in shapes).

    The rule: the preset with this `model_channels` decides (SD v1: 320 -> 8, tiny: 32 -> 2); any other
    width gets SD v1's convention, 8 heads at every level. Pass `num_heads` to `infer_config` to override.
    """
    for preset in (UNetConfig.sd_v1(), UNetConfig.tiny()):
        if preset.model_channels == model_channels:
            return preset.num_heads
    return UNetConfig.sd_v1().num_heads


def _get(shapes: dict, key: str, expected: str) -> tuple[int, ...]:
    if key not in shapes:
        raise UnsupportedCheckpoint(f"UNet key {key!r} is missing; expected {expected}")
    return shapes[key]


def _bad(key: str, shape, expected: str) -> UnsupportedCheckpoint:
    return UnsupportedCheckpoint(f"UNet key {key!r} has shape {list(shape)}; expected {expected}")


def expected_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Source key (relative to SOURCE_PREFIX) -> shape, for a UNet with config `cfg` (built on meta: free)."""
    with torch.device("meta"):
        native = UNet(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in invert(rows(cfg), native).items()}


def infer_config(shapes: dict, num_heads: int | None = None) -> UNetConfig:
    """Prefix-stripped source keys -> shapes  =>  the UNetConfig that has exactly these keys and shapes.

    Raises UnsupportedCheckpoint (one line: key, shape found, what was expected) for anything outside
    the SD v1 family: other input widths than 4 or 9, linear transformer projections (SD 2.x),
    uneven res-block counts, extra or missing keys. `num_heads` is not stored in a checkpoint: pass
    it, or get the rule of `_preset_heads`.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}

    key = "input_blocks.0.0.weight"
    s = _get(shapes, key, "the input conv [model_channels, 4 or 9, 3, 3]")
    if len(s) != 4 or s[2:] != (3, 3) or s[1] not in (4, 9):
        raise _bad(key, s, "[model_channels, 4 or 9, 3, 3] (4: txt2img, 9: inpainting)")
    mc, cin = s[0], s[1]

    key = "time_embed.0.weight"
    s = _get(shapes, key, f"[{4 * mc}, {mc}]")
    if s != (4 * mc, mc):
        raise _bad(key, s, f"[{4 * mc}, {mc}] (4 x model_channels, model_channels)")

    # Walk input_blocks: ResBlocks add to the current level, a Downsample ("op") closes it.
    widths, counts, attn_flags = [], [0], [[]]
    k = 1
    while True:
        res_key, op_key = f"input_blocks.{k}.0.in_layers.2.weight", f"input_blocks.{k}.0.op.weight"
        if res_key in shapes:
            s = shapes[res_key]
            if len(s) != 4 or s[0] % mc:
                raise _bad(res_key, s, f"a 3x3 conv whose output width is a multiple of model_channels {mc}")
            if counts[-1] and s[0] != widths[-1]:
                raise _bad(res_key, s, f"output width {widths[-1]} like the level's other ResBlocks")
            if not counts[-1]:
                widths.append(s[0])
            counts[-1] += 1
            attn_flags[-1].append(f"input_blocks.{k}.1.proj_in.weight" in shapes)
        elif op_key in shapes:
            if not counts[-1]:
                raise _bad(op_key, shapes[op_key], "a downsample only after a level's ResBlocks")
            counts.append(0)
            attn_flags.append([])
        else:
            break
        k += 1
    if not counts[-1]:
        key = f"input_blocks.{k}.0.in_layers.2.weight"
        raise UnsupportedCheckpoint(f"UNet key {key!r} is missing; expected ResBlocks after the last downsample")
    nrb = counts[0]
    for level, c in enumerate(counts):
        if c != nrb:
            raise UnsupportedCheckpoint(
                f"UNet level {level} has {c} ResBlocks in input_blocks; expected {nrb} like level 0"
            )
    attention_levels = []
    for level, flags in enumerate(attn_flags):
        if any(flags) and not all(flags):
            raise UnsupportedCheckpoint(
                f"UNet level {level} has attention after only some ResBlocks; expected all or none"
            )
        if all(flags):
            attention_levels.append(level)

    # The transformer that decides depth, context width and the projection kind.
    t = f"input_blocks.{1 + attention_levels[0] * (nrb + 1)}.1" if attention_levels else "middle_block.1"
    key = f"{t}.proj_in.weight"
    s = _get(shapes, key, "a SpatialTransformer in the middle block")
    if len(s) != 4 or s[2:] != (1, 1):
        raise _bad(key, s, "a 1x1 conv [C, C, 1, 1] (SD v1; a linear proj_in is SD 2.x)")
    depth = 0
    while f"{t}.transformer_blocks.{depth}.norm1.weight" in shapes:
        depth += 1
    key = f"{t}.transformer_blocks.0.attn2.to_k.weight"
    s = _get(shapes, key, "[C, context_dim] cross-attention key projection")
    if len(s) != 2:
        raise _bad(key, s, "[C, context_dim]")
    context_dim = s[1]

    key = "out.2.weight"
    s = _get(shapes, key, f"the output conv [out_channels, {mc}, 3, 3]")
    if len(s) != 4 or s[1:] != (mc, 3, 3):
        raise _bad(key, s, f"[out_channels, {mc}, 3, 3]")
    cout = s[0]

    mult = tuple(w // mc for w in widths)
    for level, w in enumerate(widths):
        if w % GROUPS:
            raise UnsupportedCheckpoint(
                f"UNet level {level} width {w} is not divisible by {GROUPS} GroupNorm groups"
            )
    heads = _preset_heads(mc) if num_heads is None else num_heads
    try:
        cfg = UNetConfig(
            in_channels=cin, out_channels=cout, model_channels=mc, channel_mult=mult, num_res_blocks=nrb,
            attention_levels=tuple(attention_levels), num_heads=heads, transformer_depth=depth,
            context_dim=context_dim,
        )
    except ValueError as e:
        raise UnsupportedCheckpoint(f"UNet config from shapes is invalid: {e}") from None

    # Everything else must be exactly what this config builds.
    expected = expected_shapes(cfg)
    summary = f"UNet(in {cin}, width {mc}, mult {list(mult)}, {nrb} res/level, attn {attention_levels})"
    for key, shape in expected.items():
        if key not in shapes:
            raise UnsupportedCheckpoint(f"UNet key {key!r} is missing; expected shape {list(shape)} for {summary}")
        if shapes[key] != shape:
            raise _bad(key, shapes[key], f"{list(shape)} for {summary}")
    for key in shapes:
        if key not in expected and not any(re.search(p, key) for p, _ in IGNORED):
            raise UnsupportedCheckpoint(
                f"UNet key {key!r} (shape {list(shapes[key])}) is not part of {summary}; expected no such key"
            )
    return cfg
