"""The SD 2.x text encoder as ldm computed it: OpenCLIP's text tower run the way FrozenOpenCLIPEmbedder runs it.

ldm's FrozenOpenCLIPEmbedder cannot be used directly: importing `ldm.modules.encoders` needs torchvision,
its constructor downloads pretrained weights, and it was written for open_clip 2.0, whose text blocks
were sequence-first ([L, N, D]); open_clip 3.3 builds them batch-first, and ldm's encode (which permutes
to [L, N, D] itself) then fails on the attention mask. So the reference is built here from open_clip's
own `TextTransformer` (offline, random weights), its blocks switched back to sequence-first
(`nn.MultiheadAttention.batch_first = False`, what open_clip 2.0 constructed), and `forward` is
FrozenOpenCLIPEmbedder.encode_with_transformer and text_transformer_forward, step for step.

The module's parameter names are the checkpoint's keys under `cond_stage_model.model.` (the CLIP model
minus its `visual` tower) except `text_projection` and `logit_scale`, which ldm never uses:
`checkpoint_state_dict` adds them, for fixture checkpoints in the real key layout.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ...models.clip import LAYERS, TextConfig
from .clip import _seeded_build, open_clip_transformer


class FrozenOpenCLIPText(nn.Module):
    """ldm's FrozenOpenCLIPEmbedder after tokenizing: token ids [N, L] -> [N, L, D]."""

    def __init__(self, tower: nn.Module, layer: str):
        super().__init__()
        # the attributes ldm reads from `self.model` (an open_clip CLIP), taken from the text tower
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.layer_idx = LAYERS.index(layer)  # ldm: "last" -> 0, "penultimate" -> 1
        self.transformer.batch_first = False  # open_clip 2.0's blocks: sequence-first
        for block in self.transformer.resblocks:
            block.attn.batch_first = False

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        # FrozenOpenCLIPEmbedder.encode_with_transformer, `self.model` read as `self`
        x = self.token_embedding(text)  # [batch_size, n_ctx, d_model]
        x = x + self.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.text_transformer_forward(x, attn_mask=self.attn_mask)
        x = x.permute(1, 0, 2)  # LND -> NLD
        return self.ln_final(x)

    def text_transformer_forward(self, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        for i, r in enumerate(self.transformer.resblocks):
            if i == len(self.transformer.resblocks) - self.layer_idx:
                break
            x = r(x, attn_mask=attn_mask)
        return x


def _tower(cfg: TextConfig) -> nn.Module:
    oc = open_clip_transformer()
    act = {"gelu": nn.GELU, "quick_gelu": oc.QuickGELU}[cfg.activation]
    return oc.TextTransformer(
        context_length=cfg.max_positions, vocab_size=cfg.vocab_size, width=cfg.hidden, heads=cfg.heads,
        layers=cfg.layers, mlp_ratio=cfg.intermediate / cfg.hidden, output_dim=cfg.hidden, act_layer=act,
        norm_layer=functools.partial(oc.LayerNorm, eps=cfg.layer_norm_eps),
    )


def build_text_reference(cfg: TextConfig, seed: int = 0) -> FrozenOpenCLIPText:
    """The reference for `cfg` with seeded random weights (norms jittered, zero biases made random)."""
    return _seeded_build(seed, lambda: FrozenOpenCLIPText(_tower(cfg), cfg.layer))


def checkpoint_state_dict(cfg: TextConfig, seed: int = 0, prefix: str = "cond_stage_model.model.") -> dict:
    """The text tower's keys as an SD 2.x checkpoint holds them (open_clip's CLIP with `visual` deleted:
    positional_embedding, text_projection, logit_scale, token_embedding, transformer, ln_final)."""
    ref = build_text_reference(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)
    sd = ref.state_dict()
    out = {prefix + "positional_embedding": sd.pop("positional_embedding"),
           prefix + "text_projection": torch.randn(cfg.hidden, cfg.hidden, generator=g) * cfg.hidden ** -0.5,
           prefix + "logit_scale": torch.tensor(math.log(1 / 0.07))}  # CLIP's initial temperature
    out.update({prefix + k: v for k, v in sd.items()})
    return out
