"""Mapping table: CompVis UNet (`model.diffusion_model.*`) <-> native `sdport.models.unet.UNet`, SD v1 and 2.x.

The table is built from blocks. Each `Block(native, source, kind)` pairs a native submodule with the
reference submodule that computes the same output; `INNER[kind]` lists the block's own parameters as
(native suffix, source suffixes, transform). Blocks nest (a transformer holds transformer blocks, which
hold attention and feed-forward blocks); each parameter belongs to the innermost block that owns it,
so every row comes from exactly one block. Blocks are listed in pre-order (a block before the blocks
nested in it), otherwise in execution order.

Block forward signatures, the same on both sides (for re-running a block on recorded inputs):
  resnet (x, emb); transformer and transformer_linear (x, context); transformer_block (tokens, context);
  self_attention (tokens); cross_attention (tokens, context); mlp (tokens);
  embedding (sinusoidal timestep features [B, model_channels]); conv / norm / downsample / upsample (x).
"""
from __future__ import annotations

import re

import torch

from ..models.unet import GROUPS, UNet, UNetConfig
from .table import Block, Row, UnsupportedCheckpoint, invert

SOURCE_PREFIX = "model.diffusion_model."
PROBE = "input_blocks.0.0.weight"  # present in every UNet; its shape says the variant (input channels)
# Input channels -> variant: latent; + mask + masked-image latent (inpainting); + MiDaS depth map (2.x depth).
VARIANTS = {4: "txt2img", 9: "inpainting", 5: "depth"}

# Everything the SD v1 and 2.x UNets store under SOURCE_PREFIX is mapped; nothing is skipped.
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
    # SD 2.x (use_linear_in_transformer): the projections are already linear layers
    "transformer_linear": (
        ("norm.weight", ("norm.weight",)), ("norm.bias", ("norm.bias",)),
        ("proj_in.weight", ("proj_in.weight",)), ("proj_in.bias", ("proj_in.bias",)),
        ("proj_out.weight", ("proj_out.weight",)), ("proj_out.bias", ("proj_out.bias",)),
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
    out = [Block(native, source, "transformer_linear" if cfg.use_linear_in_transformer else "transformer")]
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


def family(cfg: UNetConfig) -> str:
    """Linear transformer projections are what SD 2.x's UNet has and SD v1's lacks."""
    return "sd-v2" if cfg.use_linear_in_transformer else "sd-v1"


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


def _preset_heads(model_channels: int, linear: bool) -> dict:
    """Head layout for a UNet whose checkpoint does not say (heads never show in shapes).

    The rule: the preset of the same generation (1x1-conv projections: SD v1; linear ones: SD 2.x) with
    this `model_channels` decides (SD v1: 320 -> 8 heads; tiny: 32 -> 2; SD 2.x: 64-wide heads; tiny 2.x:
    16-wide); any other width gets its generation's convention (SD v1: 8 heads at every level; SD 2.x:
    64-wide heads, as every 2.x yaml says). Pass `num_heads` or `num_head_channels` to override.
    """
    presets = (UNetConfig.sd_v2(), UNetConfig.tiny_v2()) if linear else (UNetConfig.sd_v1(), UNetConfig.tiny())
    chosen = next((p for p in presets if p.model_channels == model_channels), presets[0])
    return {"num_heads": chosen.num_heads, "num_head_channels": chosen.num_head_channels}


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


# The SD 2.x x4 upscaler's UNet: 7 input channels (latent + the low-resolution RGB image) and a class
# embedding for the noise level it was given. Refused by name rather than by its first odd shape.
UPSCALER_KEY, UPSCALER_IN = "label_emb.weight", 7


def infer_config(shapes: dict, num_heads: int | None = None, num_head_channels: int | None = None) -> UNetConfig:
    """Prefix-stripped source keys -> shapes  =>  the UNetConfig that has exactly these keys and shapes.

    Raises UnsupportedCheckpoint (one line: key, shape found, what was expected) for anything outside
    the SD v1 and 2.x families: other input widths than 4, 9 or 5, the x4 upscaler, uneven res-block
    counts, extra or missing keys. The head layout is stored nowhere in a checkpoint: pass
    `num_head_channels` (> 0: heads of that width; 0: `num_heads` heads everywhere) or `num_heads`
    (a fixed count), or get the rule of `_preset_heads`.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    if UPSCALER_KEY in shapes and shapes.get(PROBE, ())[1:2] == (UPSCALER_IN,):
        raise UnsupportedCheckpoint(
            f"UNet key {UPSCALER_KEY!r} (shape {list(shapes[UPSCALER_KEY])}) with {UPSCALER_IN} input channels is the "
            "SD 2.x x4 upscaler, a different architecture (low-resolution image input, noise-level class "
            "embedding); expected a txt2img, inpainting or depth UNet")

    key = "input_blocks.0.0.weight"
    s = _get(shapes, key, "the input conv [model_channels, 4, 9 or 5, 3, 3]")
    if len(s) != 4 or s[2:] != (3, 3) or s[1] not in VARIANTS:
        raise _bad(key, s, "[model_channels, 4, 9 or 5, 3, 3] (4: txt2img, 9: inpainting, 5: depth)")
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
    if not (len(s) == 4 and s[2:] == (1, 1)) and len(s) != 2:
        raise _bad(key, s, "a 1x1 conv [C, C, 1, 1] (SD v1) or a linear [C, C] (SD 2.x)")
    linear = len(s) == 2
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
    heads = _preset_heads(mc, linear)
    if num_head_channels is not None:
        heads["num_head_channels"] = num_head_channels
    elif num_heads is not None:
        heads["num_head_channels"] = 0  # a fixed count asked for
    if num_heads is not None:
        heads["num_heads"] = num_heads
    try:
        cfg = UNetConfig(
            in_channels=cin, out_channels=cout, model_channels=mc, channel_mult=mult, num_res_blocks=nrb,
            attention_levels=tuple(attention_levels), transformer_depth=depth, context_dim=context_dim,
            use_linear_in_transformer=linear, **heads,
        )
    except ValueError as e:
        raise UnsupportedCheckpoint(f"UNet config from shapes is invalid: {e}") from None

    # Everything else must be exactly what this config builds.
    expected = expected_shapes(cfg)
    summary = (f"UNet(in {cin}, width {mc}, mult {list(mult)}, {nrb} res/level, attn {attention_levels}, "
               f"{'linear' if linear else '1x1-conv'} projections)")
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
