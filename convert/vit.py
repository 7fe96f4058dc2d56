"""CLIP ViT image encoder: three source layouts <-> `VisionEncoder`.

- "openai":  OpenAI CLIP's state dict, `visual.*` (conv1, class_embedding, positional_embedding, ln_pre,
             transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj},
             ln_post, proj). Also open_clip's `VisionTransformer`, whose state dict has the same keys.
- "hf":      transformers `CLIPVisionModelWithProjection`: `vision_model.*` + `visual_projection.weight`
             (transformers 5.x keeps both prefixes in `state_dict()`; checkpoint files on the hub hold the
             same keys, older ones plus the `position_ids` buffer).
- "compvis": SD image variations' CompVis checkpoint: the OpenAI layout under `cond_stage_model.model.visual.`.

Source keys in rows are relative to SOURCES[source]. For "openai"/"compvis" they are relative to the
OpenAI `VisionTransformer` module, for "hf" to the `CLIPVisionModelWithProjection` module.
"""
from __future__ import annotations

import math

from ..models.clip import VisionConfig, VisionEncoder
from .clip_text import check_shapes, expected_source_shapes, heads_for, hf_layer_rows, layer_count, norm_rows
from .table import Block, Row, UnsupportedCheckpoint, shape_of

SOURCES: dict[str, str] = {
    "openai": "visual.",
    "hf": "",
    "compvis": "cond_stage_model.model.visual.",
}

IGNORED: list[tuple[str, str]] = [
    (r"^vision_model\.embeddings\.position_ids$",
     "legacy buffer of older transformers checkpoints: always arange(positions); the native model adds "
     "the whole position table in order, so the buffer carries no weights"),
]

_OPENAI_LIKE = ("openai", "compvis")
# The "hf" layout has no prefix of its own: it is there when a key starts with one of these.
PRESENT_IF = {"hf": ("vision_model.", "visual_projection.")}


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown ViT source {source!r}; known: {sorted(SOURCES)}")


def detect_source(keys) -> str:
    """Full (un-stripped) checkpoint keys -> the source layout name."""
    keys = list(keys)
    for source in ("compvis", "openai", "hf"):  # the order convert/sources.py tries them in
        if any(k.startswith(PRESENT_IF.get(source, (SOURCES[source],))) for k in keys):
            return source
    sample = keys[0] if keys else "<no keys>"
    raise UnsupportedCheckpoint(
        f"CLIP ViT: no key starts with {SOURCES['compvis']!r}, 'visual.' or 'vision_model.' (first key {sample!r})")


# ----------------------------------------------------------------------------- blocks and rows


def blocks(cfg: VisionConfig, source: str) -> list[Block]:
    """Blocks in execution order.

    Kinds: "patch_conv" (the bias-free patch conv), "patch_embedding" (patches + class token + positions),
    "norm", "transformer", "pool_norm" (a norm the reference applies to all tokens but the native model to
    the class token only: compare the reference output's token 0 with the native output), "projection"
    (bias-free linear), and "model" (the whole encoder: OpenAI keeps class/position embeddings and the
    projection as top-level parameters, so they belong to no smaller module; its output is the embedding).
    """
    _check_source(source)
    if source == "hf":
        v = "vision_model"
        return [
            Block("embed", f"{v}.embeddings", "patch_embedding"),
            Block("pre_norm", f"{v}.pre_layrnorm", "norm"),  # sic: transformers' spelling
            *(Block(f"layers.{i}", f"{v}.encoder.layers.{i}", "transformer") for i in range(cfg.layers)),
            Block("post_norm", f"{v}.post_layernorm", "norm"),
            Block("proj", "visual_projection", "projection"),
        ]
    return [
        Block("embed.patch", "conv1", "patch_conv"),
        Block("pre_norm", "ln_pre", "norm"),
        *(Block(f"layers.{i}", f"transformer.resblocks.{i}", "transformer") for i in range(cfg.layers)),
        Block("post_norm", "ln_post", "pool_norm"),
        Block("", "", "model"),
    ]


def openai_layer_rows(n: str, s: str) -> list[Row]:
    rows = norm_rows(f"{n}.norm1", f"{s}.ln_1")
    # in_proj_weight is already q, k, v stacked along dim 0: the fused layout, no transform needed
    rows += [Row.of(f"{n}.attn.qkv.weight", f"{s}.attn.in_proj_weight"),
             Row.of(f"{n}.attn.qkv.bias", f"{s}.attn.in_proj_bias")]
    rows += [Row.of(f"{n}.attn.out.{p}", f"{s}.attn.out_proj.{p}") for p in ("weight", "bias")]
    rows += norm_rows(f"{n}.norm2", f"{s}.ln_2")
    rows += [Row.of(f"{n}.mlp.{fc}.{p}", f"{s}.mlp.{c}.{p}")
             for fc, c in (("fc1", "c_fc"), ("fc2", "c_proj")) for p in ("weight", "bias")]
    return rows


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _block_rows(b: Block, source: str) -> list[Row]:
    n, s = b.native, b.source
    if b.kind in ("norm", "pool_norm"):
        return norm_rows(n, s)
    if b.kind == "transformer":
        return hf_layer_rows(n, s) if source == "hf" else openai_layer_rows(n, s)
    if b.kind == "patch_embedding":
        return [Row.of(f"{n}.patch.weight", f"{s}.patch_embedding.weight"),
                Row.of(f"{n}.cls", f"{s}.class_embedding"),
                Row.of(f"{n}.position.weight", f"{s}.position_embedding.weight")]
    if b.kind == "patch_conv":
        return [Row.of(f"{n}.weight", f"{s}.weight")]
    if b.kind == "projection":
        return [Row.of(f"{n}.weight", f"{s}.weight")]
    if b.kind == "model":
        return [Row.of(_join(n, "embed.cls"), _join(s, "class_embedding")),
                Row.of(_join(n, "embed.position.weight"), _join(s, "positional_embedding")),
                # OpenAI applies `x @ proj` with proj [width, out]; a Linear weight is [out, width]
                Row.of(_join(n, "proj.weight"), _join(s, "proj"), transform="transpose")]
    raise ValueError(f"no rows for block kind {b.kind!r}")


def rows(cfg: VisionConfig, source: str) -> list[Row]:
    return [r for b in blocks(cfg, source) for r in _block_rows(b, source)]


# ----------------------------------------------------------------------------- config from shapes


def infer_config(shapes: dict[str, tuple[int, ...]], source: str) -> VisionConfig:
    """Prefix-stripped source keys -> shapes  ->  the VisionConfig they imply (every mapped key checked)."""
    _check_source(source)
    what = f"CLIP ViT ({source})"
    if source == "hf":
        patch_key = "vision_model.embeddings.patch_embedding.weight"
        pos_key = "vision_model.embeddings.position_embedding.weight"
        fc1_key = "vision_model.encoder.layers.0.mlp.fc1.weight"
        layer_re, layer_example = r"^vision_model\.encoder\.layers\.(\d+)\.", "vision_model.encoder.layers.0.layer_norm1.weight"
    else:
        patch_key, pos_key = "conv1.weight", "positional_embedding"
        fc1_key = "transformer.resblocks.0.mlp.c_fc.weight"
        layer_re, layer_example = r"^transformer\.resblocks\.(\d+)\.", "transformer.resblocks.0.ln_1.weight"

    width, channels, ph, pw = shape_of(shapes, patch_key, 4, what, "[width, 3, patch, patch]")
    if channels != 3 or ph != pw:
        raise UnsupportedCheckpoint(
            f"{what}: key {patch_key!r} has shape {list(shapes[patch_key])}, expected [width, 3, patch, patch]")
    positions, _ = shape_of(shapes, pos_key, 2, what, f"[1 + grid*grid, {width}]")
    grid = math.isqrt(positions - 1)
    if positions < 2 or grid * grid != positions - 1:
        raise UnsupportedCheckpoint(
            f"{what}: key {pos_key!r} has shape {list(shapes[pos_key])}, expected [1 + grid*grid, {width}] "
            f"(a class token plus a square grid of patches)")
    intermediate, _ = shape_of(shapes, fc1_key, 2, what, f"[intermediate, {width}]")
    if source == "hf":
        proj_key = "visual_projection.weight"
        projection_dim, _ = shape_of(shapes, proj_key, 2, what, f"[projection_dim, {width}] "
                                     "(a CLIPVisionModelWithProjection checkpoint)")
    else:
        _, projection_dim = shape_of(shapes, "proj", 2, what, f"[{width}, projection_dim]")

    cfg = VisionConfig(
        image_size=grid * ph,
        patch_size=ph,
        hidden=width,
        heads=heads_for(width, patch_key, shapes[patch_key], what),
        layers=layer_count(shapes, layer_re, what, layer_example),
        intermediate=intermediate,
        projection_dim=projection_dim,
    )
    check_shapes(shapes, expected_source_shapes(VisionEncoder, cfg, rows(cfg, source)), what)
    return cfg
