"""OpenCLIP text tower, as ldm's FrozenOpenCLIPEmbedder holds it in SD 2.x checkpoints <-> `TextEncoder`.

Source keys are relative to SOURCE_PREFIX (`cond_stage_model.model.`: the open_clip CLIP model with its
`visual` tower deleted): token_embedding, positional_embedding, transformer.resblocks.N.{ln_1,
attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj} (OpenAI CLIP's block naming, the rows the ViT
table uses), ln_final, plus the contrastive head (text_projection, logit_scale) that SD never uses.

The config comes from the shapes except what no shape says: 64-wide heads (every OpenCLIP tower), exact
GELU (OpenCLIP's ViT-H/14 and bigG towers; OpenAI's use quick GELU), the output after the penultimate
block (`layer: "penultimate"` in every SD 2.x yaml) and padding with 0 (`open_clip.tokenize`).
"""
from __future__ import annotations

from ..models.clip import TextConfig
from .clip_text import config_from_keys, norm_rows
from .table import Block, Row
from .vit import openai_layer_rows

SOURCE_PREFIX = "cond_stage_model.model."
PROBE = "token_embedding.weight"

IGNORED: list[tuple[str, str]] = [
    (r"^text_projection$",
     "CLIP's projection into the joint image-text space: FrozenOpenCLIPEmbedder returns the token features "
     "before it, so SD 2.x never uses it"),
    (r"^logit_scale$", "CLIP's contrastive temperature, training only"),
]


def blocks(cfg: TextConfig) -> list[Block]:
    """Blocks in execution order. "model" is the whole encoder: the positional embedding is a top-level
    parameter of the source, owned by no smaller module. With layer "penultimate" the last block is in
    the table (its weights are converted and exported) but neither side runs it."""
    return [
        Block("embed.token", "token_embedding", "token_embedding"),
        *(Block(f"layers.{i}", f"transformer.resblocks.{i}", "transformer") for i in range(cfg.layers)),
        Block("final_norm", "ln_final", "norm"),
        Block("", "", "model"),
    ]


def _block_rows(b: Block) -> list[Row]:
    if b.kind == "token_embedding":
        return [Row.of(f"{b.native}.weight", f"{b.source}.weight")]
    if b.kind == "transformer":
        return openai_layer_rows(b.native, b.source)
    if b.kind == "norm":
        return norm_rows(b.native, b.source)
    if b.kind == "model":
        return [Row.of("embed.position.weight", "positional_embedding")]
    raise ValueError(f"no rows for block kind {b.kind!r}")


def rows(cfg: TextConfig) -> list[Row]:
    return [r for b in blocks(cfg) for r in _block_rows(b)]


def infer_config(shapes: dict[str, tuple[int, ...]]) -> TextConfig:
    """Prefix-stripped source keys -> shapes  ->  the TextConfig they imply (every mapped key checked)."""
    return config_from_keys(shapes, "OpenCLIP text encoder", rows, token="token_embedding.weight",
                            position="positional_embedding", fc1="transformer.resblocks.0.mlp.c_fc.weight",
                            layers=r"^transformer\.resblocks\.(\d+)\.", first_layer="transformer.resblocks.0.ln_1.weight",
                            activation="gelu", layer="penultimate", pad_id=0)
