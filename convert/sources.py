"""The source layouts the converter reads, as values: one entry per way a component sits in a checkpoint.

Each entry extends a native component (models/components.py) with what conversion needs: where its keys
sit (prefixes), how to tell it is there, how to infer its config from the shapes, and its mapping table
(rows and blocks, one interface for every table module). The CLIP ViT's three layouts are three entries
of one component. `detect.plan` walks this list; export and the parity layer map look entries up by
(component, source format), the pair the layout records with each group.

Adding a source layout (or a component) is one entry here plus its table module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..models.components import COMPONENTS
from ..models.errors import SdportError
from . import clip_text, openclip_text, unet, vae, vit
from .table import Block, Row


@dataclass(frozen=True)
class Source:
    component: str  # the native component (layout group) it converts into
    format: str  # source format recorded with the group: "compvis" | "openclip" | "openai" | "hf"
    prefixes: tuple[str, ...]  # where the keys sit: the CompVis prefix first, then the alternatives, in order
    infer_config: Callable[[dict], object]  # prefix-stripped shapes -> config (UnsupportedCheckpoint otherwise)
    rows: Callable[[object], list[Row]]
    blocks: Callable[[object], list[Block]]
    ignored: list = field(default_factory=list)  # (pattern on prefix-stripped keys, reason)
    # Keys (prefix-stripped) whose presence places the prefix, and says the component is there.
    locate: tuple[str, ...] = ()
    probe: str | None = None  # present iff this key is there (None: any key under the prefix)
    present_if: tuple[str, ...] = ()  # ... or, with a prefix of "", iff a key starts with one of these
    owns: tuple[str, ...] = ("",)  # the keys under a prefix that are its own (the VAE halves share one)
    family: str = "sd-v1"
    # The family of a config of it, where the layout alone does not say (the UNet: SD v1 or 2.x).
    family_by_config: Callable[[object], str] | None = None
    ema: bool = False  # ldm keeps an EMA copy of it (model_ema.*)
    num_heads: bool = False  # its head count is in no shape: --num-heads, or the preset rule
    evidence: str | None = None  # the key whose shape decides the variant (inspect, the layout's attributes)

    def family_of(self, config) -> str:
        return self.family_by_config(config) if self.family_by_config else self.family

    def present(self, rel: dict) -> bool:
        if self.present_if:
            return any(k.startswith(self.present_if) for k in rel)
        return self.probe in rel if self.probe else bool(rel)

    def prefix(self, infos) -> str:
        """The first prefix at which a `locate` key exists (the CompVis one when none does)."""
        for p in self.prefixes:
            if any(p + k in infos for k in self.locate):
                return p
        return self.prefixes[0]


_VAE_LOCATE = (vae.PROBE_ENCODER, vae.PROBE_DECODER)  # a file may hold either half alone

SOURCES: tuple[Source, ...] = (
    Source("unet", "compvis", (unet.SOURCE_PREFIX, ""), unet.infer_config, unet.rows, unet.blocks, unet.IGNORED,
           locate=(unet.PROBE,), probe=unet.PROBE, ema=True, num_heads=True, evidence=unet.PROBE,
           family_by_config=unet.family),
    Source("text_model", "compvis", (clip_text.SOURCE_PREFIX, clip_text.FLAT_PREFIX, "text_model."),
           clip_text.infer_config, clip_text.rows, clip_text.blocks, clip_text.IGNORED,
           locate=(clip_text.PROBE,), probe=clip_text.PROBE),
    # SD 2.x: the same native encoder from OpenCLIP's text tower (tried after the CompVis one)
    Source("text_model", "openclip", (openclip_text.SOURCE_PREFIX,), openclip_text.infer_config,
           openclip_text.rows, openclip_text.blocks, openclip_text.IGNORED,
           locate=(openclip_text.PROBE,), probe=openclip_text.PROBE,
           owns=("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection",
                 "logit_scale"), family="sd-v2"),
    Source("encoder", "compvis", (vae.SOURCE_PREFIX, ""), vae.infer_config, vae.encoder_rows, vae.encoder_blocks,
           vae.IGNORED, locate=_VAE_LOCATE, probe=vae.PROBE_ENCODER, owns=("encoder.", "quant_conv.")),
    Source("decoder", "compvis", (vae.SOURCE_PREFIX, ""), vae.infer_config, vae.decoder_rows, vae.decoder_blocks,
           vae.IGNORED, locate=_VAE_LOCATE, probe=vae.PROBE_DECODER, owns=("decoder.", "post_quant_conv.")),
    # The ViT layouts, in the order they are tried: the first one present is the component's source.
    *(Source("vit", fmt, (vit.SOURCES[fmt],), (lambda s, _f=fmt: vit.infer_config(s, _f)),
             (lambda c, _f=fmt: vit.rows(c, _f)), (lambda c, _f=fmt: vit.blocks(c, _f)), vit.IGNORED,
             present_if=vit.PRESENT_IF.get(fmt, ()), family="clip-vit")
      for fmt in ("compvis", "openai", "hf")),
)
assert {s.component for s in SOURCES} <= set(COMPONENTS)

# A checkpoint with a family's denoiser and VAE but not its text encoder converts, but cannot generate from
# text alone: (denoiser, VAE halves, text encoder, what the warning calls them).
TEXT_TO_IMAGE = (("unet", ("encoder", "decoder"), "text_model", "CLIP text encoder", "the UNet and VAE"),)


def key_prefixes() -> dict[str, str]:
    """{key prefix: component} for every place a source layout keeps its keys (longest prefixes first)."""
    out = {}
    for s in SOURCES:
        for p in s.prefixes:
            # at the root (prefix ""), a layout without a prefix of its own is known by its key starts
            for own in s.present_if if not p and s.present_if else s.owns:
                if p + own:
                    out.setdefault(p + own, s.component)
    return dict(sorted(out.items(), key=lambda kv: -len(kv[0])))


def source(component: str, fmt: str = "compvis") -> Source:
    """The entry a layout group was converted from (its `source_format` attribute)."""
    for s in SOURCES:
        if s.component == component and s.format == fmt:
            return s
    raise SdportError(f"no source layout {str(fmt)[:40]!r} for component {str(component)[:40]!r}")


def blocks_and_rows(component: str, cfg, fmt: str = "compvis") -> tuple[list[Block], list[Row]]:
    """The component's mapping table for the layout it came from: (blocks, rows)."""
    s = source(component, fmt)
    return s.blocks(cfg), s.rows(cfg)
