"""CLIP text encoder: transformers `CLIPTextModel` keys (as CompVis checkpoints store them) <-> `TextEncoder`.

Source keys are relative to SOURCE_PREFIX, e.g. `encoder.layers.0.self_attn.q_proj.weight`; that is also
exactly the key layout of a transformers 5.x `CLIPTextModel().state_dict()`, so the reference model's
submodule names are the source prefixes of the blocks below.
"""
from __future__ import annotations

import re

import torch

from ..models.clip import TextConfig, TextEncoder
from .table import Block, Row, UnsupportedCheckpoint, invert, shape_of

SOURCE_PREFIX = "cond_stage_model.transformer.text_model."
# transformers >= 5.6 dropped CLIPTextModel's `text_model` level: the same relative keys then sit directly
# under the wrapper (`cond_stage_model.transformer.embeddings.*`, `...encoder.layers.*`, `...final_layer_norm.*`),
# which is what diffusers' conversion script writes from a current transformers model.
FLAT_PREFIX = "cond_stage_model.transformer."
PROBE = "embeddings.token_embedding.weight"

IGNORED: list[tuple[str, str]] = [
    (r"^embeddings\.position_ids$",
     "legacy buffer (older transformers saved it): always arange(max_positions); the native model "
     "indexes positions 0..T-1 itself, so the buffer carries no weights (some merged checkpoints even "
     "hold a float copy with rounding errors, which ignoring it also sidesteps)"),
]


# ----------------------------------------------------------------------------- shared with the ViT table


def hf_layer_rows(native: str, source: str) -> list[Row]:
    """Rows of one transformers `CLIPEncoderLayer` (`source`) onto a native `TransformerBlock` (`native`)."""
    n, s = native, source
    rows = [Row.of(f"{n}.norm1.{p}", f"{s}.layer_norm1.{p}") for p in ("weight", "bias")]
    rows += [Row.of(f"{n}.attn.qkv.{p}", *(f"{s}.self_attn.{x}_proj.{p}" for x in "qkv"), transform="concat")
             for p in ("weight", "bias")]
    rows += [Row.of(f"{n}.attn.out.{p}", f"{s}.self_attn.out_proj.{p}") for p in ("weight", "bias")]
    rows += [Row.of(f"{n}.norm2.{p}", f"{s}.layer_norm2.{p}") for p in ("weight", "bias")]
    rows += [Row.of(f"{n}.mlp.{fc}.{p}", f"{s}.mlp.{fc}.{p}") for fc in ("fc1", "fc2") for p in ("weight", "bias")]
    return rows


def norm_rows(native: str, source: str) -> list[Row]:
    return [Row.of(f"{native}.{p}", f"{source}.{p}") for p in ("weight", "bias")]


def expected_source_shapes(model_cls, cfg, rows) -> dict[str, tuple[int, ...]]:
    """Source key -> shape that `cfg` implies: the native model built on the meta device, run back through `rows`."""
    with torch.device("meta"):
        model = model_cls(cfg)
    return {k: tuple(v.shape) for k, v in invert(rows, model.state_dict()).items()}


def check_shapes(shapes: dict, expected: dict, what: str) -> None:
    """Every expected key present with the expected shape, else UnsupportedCheckpoint naming the first mismatch."""
    for key, want in expected.items():
        if key not in shapes:
            raise UnsupportedCheckpoint(f"{what}: missing key {key!r}, expected shape {list(want)}")
        got = tuple(shapes[key])
        if got != want:
            raise UnsupportedCheckpoint(f"{what}: key {key!r} has shape {list(got)}, expected {list(want)}")


def layer_count(shapes: dict, pattern: str, what: str, key_for_error: str) -> int:
    """Number of layers = 1 + the largest index matched by `pattern` (group 1); at least one layer."""
    idx = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    if not idx:
        raise UnsupportedCheckpoint(f"{what}: no transformer layers found (no key like {key_for_error!r})")
    return max(idx) + 1


def heads_for(width: int, key: str, shape, what: str) -> int:
    """Head count is not stored in any shape. OpenAI/OpenCLIP CLIP towers all use 64-wide heads;
    widths under 64 only occur in our tiny test presets, which use 2 heads."""
    if width < 64 and width % 2 == 0:
        return 2
    if width % 64:
        raise UnsupportedCheckpoint(
            f"{what}: key {key!r} has shape {list(shape)}, expected a width that is a multiple of 64 (64-wide heads)")
    return width // 64


# ----------------------------------------------------------------------------- the text table


def blocks(cfg: TextConfig) -> list[Block]:
    return [
        Block("embed", "embeddings", "embedding"),
        *(Block(f"layers.{i}", f"encoder.layers.{i}", "transformer") for i in range(cfg.layers)),
        Block("final_norm", "final_layer_norm", "norm"),
    ]


def _block_rows(b: Block) -> list[Row]:
    if b.kind == "embedding":
        return [Row.of(f"{b.native}.token.weight", f"{b.source}.token_embedding.weight"),
                Row.of(f"{b.native}.position.weight", f"{b.source}.position_embedding.weight")]
    if b.kind == "transformer":
        return hf_layer_rows(b.native, b.source)
    if b.kind == "norm":
        return norm_rows(b.native, b.source)
    raise ValueError(f"no rows for block kind {b.kind!r}")


def rows(cfg: TextConfig) -> list[Row]:
    return [r for b in blocks(cfg) for r in _block_rows(b)]


def infer_config(shapes: dict[str, tuple[int, ...]]) -> TextConfig:
    """Prefix-stripped source keys -> shapes  ->  the TextConfig they imply (every mapped key checked)."""
    return config_from_keys(shapes, "CLIP text encoder", rows, token="embeddings.token_embedding.weight",
                            position="embeddings.position_embedding.weight", fc1="encoder.layers.0.mlp.fc1.weight",
                            layers=r"^encoder\.layers\.(\d+)\.", first_layer="encoder.layers.0.layer_norm1.weight")


def config_from_keys(shapes: dict[str, tuple[int, ...]], what: str, rows_of, *, token: str, position: str, fc1: str,
                     layers: str, first_layer: str, **fixed) -> TextConfig:
    """The TextConfig a text tower's shapes imply, from its anchor keys (token and position tables, the
    first MLP, the layer-numbering pattern); `fixed` sets what no shape says. Every mapped key is checked
    against the config's rows (`rows_of(cfg)`)."""
    vocab, width = shape_of(shapes, token, 2, what, "[vocab, width]")
    max_positions, _ = shape_of(shapes, position, 2, what, f"[positions, {width}]")
    intermediate, _ = shape_of(shapes, fc1, 2, what, f"[intermediate, {width}]")
    cfg = TextConfig(vocab_size=vocab, max_positions=max_positions, hidden=width,
                     heads=heads_for(width, token, shapes[token], what),
                     layers=layer_count(shapes, layers, what, first_layer), intermediate=intermediate, **fixed)
    check_shapes(shapes, expected_source_shapes(TextEncoder, cfg, rows_of(cfg)), what)
    return cfg
