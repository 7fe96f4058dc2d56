"""Mapping table: CompVis `first_stage_model.*` (the KL autoencoder) <-> native VAEEncoder / VAEDecoder.

Source keys are relative to SOURCE_PREFIX. The encoder table covers `encoder.*` and `quant_conv.*`,
the decoder table `decoder.*` and `post_quant_conv.*`. CompVis numbers decoder levels by resolution
(`decoder.up.0` is the full-resolution level, run last); native `up.0` is the level that runs first.
"""
from __future__ import annotations

import re

import torch

from ..models.vae import NORM_GROUPS, VAEConfig, VAEDecoder, VAEEncoder
from .table import Block, Row, UnsupportedCheckpoint, invert, shape_of

SOURCE_PREFIX = "first_stage_model."
PROBE_ENCODER, PROBE_DECODER = "encoder.conv_in.weight", "decoder.conv_in.weight"

IGNORED: list[tuple[str, str]] = [
    (r"^loss\.", "training loss (LPIPS network, discriminator, logvar) that autoencoder checkpoints carry;"
                  " not used for inference"),
]


# --- blocks -------------------------------------------------------------------------------------


def _mid_blocks(src: str) -> list[Block]:
    return [
        Block("mid.res1", f"{src}.mid.block_1", "resnet"),
        Block("mid.attn", f"{src}.mid.attn_1", "attention"),
        Block("mid.res2", f"{src}.mid.block_2", "resnet"),
    ]


def encoder_blocks(cfg: VAEConfig) -> list[Block]:
    n = len(cfg.ch_mult)
    out = [Block("conv_in", "encoder.conv_in", "conv")]
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            out.append(Block(f"down.{i}.res.{j}", f"encoder.down.{i}.block.{j}", "resnet"))
        if i < n - 1:
            out.append(Block(f"down.{i}.downsample", f"encoder.down.{i}.downsample", "downsample"))
    out += _mid_blocks("encoder")
    out += [
        Block("norm_out", "encoder.norm_out", "norm"),
        Block("conv_out", "encoder.conv_out", "conv"),
        Block("quant_conv", "quant_conv", "conv"),
    ]
    return out


def decoder_blocks(cfg: VAEConfig) -> list[Block]:
    n = len(cfg.ch_mult)
    out = [Block("post_quant_conv", "post_quant_conv", "conv"), Block("conv_in", "decoder.conv_in", "conv")]
    out += _mid_blocks("decoder")
    for i in range(n):
        level = n - 1 - i  # CompVis index of the level that runs i-th
        for j in range(cfg.num_res_blocks + 1):
            out.append(Block(f"up.{i}.res.{j}", f"decoder.up.{level}.block.{j}", "resnet"))
        if i < n - 1:
            out.append(Block(f"up.{i}.upsample", f"decoder.up.{level}.upsample", "upsample"))
    out += [Block("norm_out", "decoder.norm_out", "norm"), Block("conv_out", "decoder.conv_out", "conv")]
    return out


# --- rows ---------------------------------------------------------------------------------------


def _wb(native: str, source: str, transform: str = "identity") -> list[Row]:
    rows = [Row(f"{native}.weight", (f"{source}.weight",), transform)]
    return rows + [Row(f"{native}.bias", (f"{source}.bias",))]


def _block_rows(b: Block, has_shortcut: bool) -> list[Row]:
    n, s = b.native, b.source
    if b.kind in ("conv", "norm"):
        return _wb(n, s)
    if b.kind in ("downsample", "upsample"):
        return _wb(f"{n}.conv", f"{s}.conv")
    if b.kind == "resnet":
        rows = _wb(f"{n}.norm1", f"{s}.norm1") + _wb(f"{n}.conv1", f"{s}.conv1")
        rows += _wb(f"{n}.norm2", f"{s}.norm2") + _wb(f"{n}.conv2", f"{s}.conv2")
        return rows + (_wb(f"{n}.shortcut", f"{s}.nin_shortcut") if has_shortcut else [])
    if b.kind == "attention":
        qkv = tuple(f"{s}.{p}" for p in "qkv")
        return _wb(f"{n}.norm", f"{s}.norm") + [
            Row(f"{n}.qkv.weight", tuple(f"{p}.weight" for p in qkv), "concat_conv1x1_to_linear"),
            Row(f"{n}.qkv.bias", tuple(f"{p}.bias" for p in qkv), "concat"),
            *_wb(f"{n}.proj", f"{s}.proj_out", "conv1x1_to_linear"),
        ]
    raise ValueError(f"no rows for block kind {b.kind!r}")


def _shortcuts_encoder(cfg: VAEConfig) -> set[str]:
    """Native prefixes of encoder res blocks whose width changes (they carry a 1x1 shortcut)."""
    widths = [cfg.ch * m for m in cfg.ch_mult]
    prev = [cfg.ch] + widths
    return {f"down.{i}.res.0" for i in range(len(widths)) if prev[i] != widths[i]}


def _shortcuts_decoder(cfg: VAEConfig) -> set[str]:
    widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]
    return {f"up.{i}.res.0" for i in range(1, len(widths)) if widths[i - 1] != widths[i]}


def encoder_rows(cfg: VAEConfig) -> list[Row]:
    sc = _shortcuts_encoder(cfg)
    return [r for b in encoder_blocks(cfg) for r in _block_rows(b, b.native in sc)]


def decoder_rows(cfg: VAEConfig) -> list[Row]:
    sc = _shortcuts_decoder(cfg)
    return [r for b in decoder_blocks(cfg) for r in _block_rows(b, b.native in sc)]


def is_ignored(key: str) -> bool:
    return any(re.search(p, key) for p, _ in IGNORED)


# --- config from shapes -------------------------------------------------------------------------


def source_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """The CompVis key -> shape set that `cfg` implies (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        enc, dec = VAEEncoder(cfg), VAEDecoder(cfg)
    src = invert(encoder_rows(cfg), enc.state_dict())
    src.update(invert(decoder_rows(cfg), dec.state_dict()))
    return {k: tuple(v.shape) for k, v in src.items()}


def _levels(shapes: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# The two halves of a KL autoencoder: a file may hold one alone (a port that only decodes latents
# ships the decoder); the other half's keys are then neither expected nor allowed.
HALVES = {"encoder": ("encoder.", "quant_conv."), "decoder": ("decoder.", "post_quant_conv.")}


def infer_config(shapes: dict[str, tuple[int, ...]]) -> VAEConfig:
    """Prefix-stripped CompVis VAE keys -> shapes  =>  the VAEConfig they describe.

    From the encoder when its keys are there, else from the decoder alone (in_channels, which only the
    encoder uses, is then taken to equal out_channels). Raises UnsupportedCheckpoint, naming the key,
    the shape found and the shape expected, on anything outside the family (attention outside the
    middle block, widths that GroupNorm(32) cannot split, ...).
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    present = [h for h, prefixes in HALVES.items() if any(k.startswith(prefixes[0]) for k in shapes)]
    cfg = _from_encoder(shapes, "decoder" in present) if "encoder" in present or not present else _from_decoder(shapes)
    parts = tuple(p for h in present for p in HALVES[h])
    # Every key the config implies must be there with its shape; nothing else may be, unless ignored.
    expected = {k: v for k, v in source_shapes(cfg).items() if k.startswith(parts)}
    for k, s in expected.items():
        if k not in shapes:
            raise UnsupportedCheckpoint(f"VAE: key {k!r} missing; expected shape {s} for {cfg}")
        if shapes[k] != s:
            raise UnsupportedCheckpoint(f"VAE: key {k!r} has shape {shapes[k]}; expected {s} for {cfg}")
    for k in sorted(shapes):
        if k not in expected and not is_ignored(k):
            raise UnsupportedCheckpoint(
                f"VAE: unexpected key {k!r} with shape {shapes[k]}; expected only the keys of {cfg}"
                " (attention outside the middle block is not supported)"
            )
    return cfg


def _from_encoder(shapes: dict, with_decoder: bool) -> VAEConfig:
    what = "VAE"
    conv_in = shape_of(shapes, "encoder.conv_in.weight", 4, what, "[ch, in_channels, 3, 3] of a CompVis KL autoencoder")
    ch, in_channels = conv_in[0], conv_in[1]
    if ch % NORM_GROUPS:
        raise UnsupportedCheckpoint(
            f"VAE: key 'encoder.conv_in.weight' has shape {conv_in}; expected an output width that is a multiple"
            f" of {NORM_GROUPS} (GroupNorm groups)"
        )
    n_levels = _levels(shapes, r"encoder\.down\.(\d+)\.")
    n_res = _levels(shapes, r"encoder\.down\.0\.block\.(\d+)\.")
    if n_levels == 0 or n_res == 0:
        raise UnsupportedCheckpoint("VAE: no 'encoder.down.0.block.0.*' keys; expected a CompVis KL autoencoder encoder")
    ch_mult = []
    for i in range(n_levels):
        w = shape_of(shapes, f"encoder.down.{i}.block.0.conv1.weight", 4, what, f"[{ch} * ch_mult[{i}], in, 3, 3]")[0]
        if w % ch:
            raise UnsupportedCheckpoint(
                f"VAE: key 'encoder.down.{i}.block.0.conv1.weight' has shape {shapes[f'encoder.down.{i}.block.0.conv1.weight']};"
                f" expected an output width that is a multiple of ch={ch}"
            )
        ch_mult.append(w // ch)
    conv_out = shape_of(shapes, "encoder.conv_out.weight", 4, what, "[2 * z_channels, width, 3, 3]")
    if conv_out[0] % 2:
        raise UnsupportedCheckpoint(
            f"VAE: key 'encoder.conv_out.weight' has shape {conv_out}; expected an even output width (mean and logvar)"
        )
    quant = shape_of(shapes, "quant_conv.weight", 4, what, "[2 * embed_dim, 2 * z_channels, 1, 1]")
    if quant[0] % 2:
        raise UnsupportedCheckpoint(
            f"VAE: key 'quant_conv.weight' has shape {quant}; expected an even output width (mean and logvar)"
        )
    out_ch = (shape_of(shapes, "decoder.conv_out.weight", 4, what, f"[out_channels, {ch}, 3, 3]")[0]
              if with_decoder else in_channels)
    try:
        cfg = VAEConfig(
            ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=n_res, z_channels=conv_out[0] // 2,
            embed_dim=quant[0] // 2, in_channels=in_channels, out_channels=out_ch,
        )
    except ValueError as e:
        raise UnsupportedCheckpoint(f"VAE: key 'encoder.conv_in.weight' has shape {conv_in}: {e}") from None
    return cfg


def _from_decoder(shapes: dict) -> VAEConfig:
    what = "VAE decoder"
    conv_out = shape_of(shapes, "decoder.conv_out.weight", 4, what, "[out_channels, ch, 3, 3] of a CompVis KL decoder")
    out_ch, ch = conv_out[0], conv_out[1]
    conv_in = shape_of(shapes, "decoder.conv_in.weight", 4, what, "[ch * ch_mult[-1], z_channels, 3, 3]")
    post = shape_of(shapes, "post_quant_conv.weight", 4, what, f"[{conv_in[1]}, embed_dim, 1, 1]")
    n_levels = _levels(shapes, r"decoder\.up\.(\d+)\.")
    blocks = _levels(shapes, r"decoder\.up\.0\.block\.(\d+)\.")  # num_res_blocks + 1 per level
    if n_levels == 0 or blocks < 2:
        raise UnsupportedCheckpoint("VAE decoder: no 'decoder.up.0.block.1.*' keys; expected a CompVis KL decoder")
    ch_mult = []
    for i in range(n_levels):
        key = f"decoder.up.{i}.block.0.conv2.weight"
        w = shape_of(shapes, key, 4, what, f"[{ch} * ch_mult[{i}], width, 3, 3]")[0]
        if w % ch:
            raise UnsupportedCheckpoint(f"VAE decoder: key '{key}' has shape {shapes[key]}; expected an output width "
                                        f"that is a multiple of ch={ch}")
        ch_mult.append(w // ch)
    try:
        return VAEConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=blocks - 1, z_channels=conv_in[1],
                         embed_dim=post[1], in_channels=out_ch, out_channels=out_ch)
    except ValueError as e:
        raise UnsupportedCheckpoint(f"VAE decoder: key 'decoder.conv_out.weight' has shape {conv_out}: {e}") from None
