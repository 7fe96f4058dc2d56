"""Which components a checkpoint holds, their configs (from tensor shapes) and a conversion plan.

Every key of the checkpoint ends up in exactly one place: a row of a component's mapping table, the
noise schedule, a deliberately ignored key (with the reason), or the list of unknown keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..models import load as native
from ..models.config import to_dict
from ..models.errors import SdportError
from . import clip_text, unet, vae, vit
from .table import Row, UnsupportedCheckpoint, invert

# The LatentDiffusion buffers that describe the noise schedule (stored under /schedule).
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
EMA_PREFIX = "model_ema."
# Keys outside every component that checkpoints carry and inference never needs.
IGNORED_GLOBAL = [
    (r"^model_ema\.(decay|num_updates)$", "EMA bookkeeping (decay rate, update count)"),
    (r"^logvar$", "per-timestep log-variance used only by the training loss"),
    (r"^lvlb_weights$", "variational-bound loss weights, training only"),
]
LATENT_SCALE_SD_V1 = 0.18215


@dataclass
class ComponentPlan:
    name: str  # layout group
    prefix: str  # source prefix
    source_format: str  # "compvis" | "openai" | "hf"
    config: object
    rows: list[Row]
    key_of: dict[str, str]  # relative source key -> full checkpoint key actually read
    expected: dict[str, tuple]  # full key -> expected shape

    @property
    def config_dict(self) -> dict:
        return to_dict(self.config)


@dataclass
class Plan:
    components: dict[str, ComponentPlan] = field(default_factory=dict)
    schedule: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # key -> reason
    unknown: list[str] = field(default_factory=list)
    evidence: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # one line each, for the user
    ema: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        if set(self.components) & {"unet", "text_model", "encoder", "decoder"}:
            return "sd-v1"
        return "clip-vit" if "vit" in self.components else "unknown"

    @property
    def variant(self) -> str:
        u = self.components.get("unet")
        if u is None:
            if "vit" in self.components:
                return "image-encoder"
            return "partial" if self.components else "none"
        return "inpainting" if u.config.in_channels == 9 else "txt2img"


def ema_key(rel: str) -> str:
    """ldm's LitEma names each UNet parameter by its DiffusionWrapper name with the dots removed."""
    return EMA_PREFIX + ("diffusion_model." + rel).replace(".", "")


def _rel_shapes(infos, prefix: str) -> dict[str, tuple]:
    return {k[len(prefix):]: tuple(i.shape) for k, i in infos.items() if k.startswith(prefix)}


def _expected_source_shapes(name: str, config, rows: list[Row]) -> dict[str, tuple]:
    """Source shapes the table implies for this config: invert the native model's meta tensors."""
    with torch.device("meta"):
        model = native.build(name, config)
    sd = model.state_dict()
    return {k: tuple(v.shape) for k, v in invert(rows, sd).items()}


def _ignored(patterns, rel: str):
    for pattern, reason in patterns:
        if re.search(pattern, rel):
            return reason
    return None


# Probe key (relative to the prefix) that says a component is there.
PROBES = {"unet": "input_blocks.0.0.weight", "text_model": "embeddings.token_embedding.weight",
          "encoder": "encoder.conv_in.weight", "decoder": "decoder.conv_in.weight"}
# Where else a component's keys sit, tried in order when the CompVis probe key is absent: a CompVis
# checkpoint whose text encoder has transformers >= 5.6 names (no `text_model.` level); a file that holds
# the component alone: a standalone VAE (`encoder.*`, `decoder.*`, `quant_conv.*` at the root, as the
# fine-tuned SD VAEs ship), a UNet extracted from a CompVis checkpoint, a transformers CLIPTextModel state
# dict (`text_model.*`). The prefix is stored with the component, so export writes the keys back as they were.
OTHER_PREFIXES = {"unet": ("",), "text_model": (clip_text.FLAT_PREFIX, "text_model."), "encoder": ("",),
                  "decoder": ("",)}


def _prefix(name: str, compvis: str, infos) -> str:
    """The CompVis prefix, unless only another layout's probe key is there."""
    if compvis + PROBES[name] in infos:
        return compvis
    return next((p for p in OTHER_PREFIXES[name] if p + PROBES[name] in infos), compvis)


def _specs(infos):
    """(component, prefix, source format, infer(shapes) -> config, rows(config), ignored patterns)."""
    keys = list(infos)
    vae_prefix = _prefix("encoder", vae.SOURCE_PREFIX, infos)
    if vae_prefix == vae.SOURCE_PREFIX:
        vae_prefix = _prefix("decoder", vae.SOURCE_PREFIX, infos)
    specs = [
        ("unet", _prefix("unet", unet.SOURCE_PREFIX, infos), "compvis", unet.infer_config, unet.rows, unet.IGNORED),
        ("text_model", _prefix("text_model", clip_text.SOURCE_PREFIX, infos), "compvis", clip_text.infer_config,
         clip_text.rows, clip_text.IGNORED),
        ("encoder", vae_prefix, "compvis", vae.infer_config, vae.encoder_rows, vae.IGNORED),
        ("decoder", vae_prefix, "compvis", vae.infer_config, vae.decoder_rows, vae.IGNORED),
    ]
    try:
        source = vit.detect_source(keys)
    except UnsupportedCheckpoint:
        source = None
    if source is not None:
        specs.append(("vit", vit.SOURCES[source], source,
                      lambda s, _src=source: vit.infer_config(s, _src),
                      lambda c, _src=source: vit.rows(c, _src), vit.IGNORED))
    return specs


def _present(name: str, prefix: str, rel: dict) -> bool:
    return PROBES[name] in rel if name in PROBES else bool(rel)


def plan(ckpt, *, components=None, ema: str = "auto", num_heads: int | None = None) -> Plan:
    """Map every key of `ckpt` (a convert.checkpoint.Checkpoint) to a destination."""
    infos = ckpt.infos
    out = Plan()
    claimed: set[str] = set()
    found: set[str] = set()  # components present, selected or not
    for name, prefix, fmt, infer, rows_of, ignored in _specs(infos):
        rel = _rel_shapes(infos, prefix)
        use_ema = False
        if name == "unet":
            has_ema = any(k.startswith(EMA_PREFIX) and k not in ("model_ema.decay", "model_ema.num_updates") for k in infos)
            out.ema = {"present": has_ema, "policy": ema, "used": False, "differs": None}
            if ema == "use" and not has_ema:
                raise SdportError(f"{ckpt.path}: --ema use, but the checkpoint has no model_ema.* weights")
            if not _present(name, prefix, rel) and has_ema and ema != "ignore":
                use_ema = True  # an EMA-only checkpoint: the EMA copy is the model
            use_ema = use_ema or (ema == "use")
        if not _present(name, prefix, rel) and not use_ema:
            continue
        if name == "unet" and not rel:
            rel = _ema_rel_shapes(infos)  # an EMA-only checkpoint
        try:
            config = infer(rel, num_heads=num_heads) if name == "unet" and num_heads else infer(rel)
        except UnsupportedCheckpoint as e:
            raise UnsupportedCheckpoint(f"{ckpt.path}: {e}") from None
        rows = rows_of(config)
        key_of = {}
        for r in rows:
            for s in r.sources:
                key_of[s] = ema_key(s) if use_ema else prefix + s
        expected = {key_of[s]: shape for s, shape in _expected_source_shapes(name, config, rows).items()}
        for full, shape in expected.items():
            if full not in infos:
                raise UnsupportedCheckpoint(f"{ckpt.path}: key '{full}' is missing (the {name} config inferred from "
                                            f"the other keys needs it with shape {list(shape)})")
            if tuple(infos[full].shape) != shape:
                raise UnsupportedCheckpoint(f"{ckpt.path}: key '{full}' has shape {list(infos[full].shape)}, expected "
                                            f"{list(shape)} for the inferred {name} config")
        claimed.update(key_of.values())
        found.add(name)
        if name == "unet":
            out.ema["used"] = use_ema
            out.evidence["unet_in_channels"] = {"key": key_of["input_blocks.0.0.weight"],
                                                "shape": list(infos[key_of["input_blocks.0.0.weight"]].shape)}
        if components is None or name in components:
            out.components[name] = ComponentPlan(name, prefix, fmt, config, rows, key_of, expected)
        else:
            for k in key_of.values():
                out.ignored[k] = f"component '{name}' not selected (--components)"
        for k in infos:
            if k.startswith(prefix) and k not in claimed and k not in out.ignored:
                reason = _ignored(ignored, k[len(prefix):])
                if name == "unet" and use_ema and k[len(prefix):] in key_of:
                    reason = "non-EMA UNet weights; not used (--ema use)"
                if reason:
                    out.ignored[k] = reason
    for k in SCHEDULE_KEYS:
        if k in infos:
            out.schedule.append(k)
            claimed.add(k)
    u = out.components.get("unet")
    for k in infos:
        if k in claimed or k in out.ignored:
            continue
        reason = _ignored(IGNORED_GLOBAL, k)
        if reason:
            out.ignored[k] = reason
        elif k.startswith(EMA_PREFIX):
            if ema == "ignore":
                out.ignored[k] = "EMA copy of the UNet; skipped (--ema ignore)"
            elif u is not None and not out.ema["used"]:
                out.ignored[k] = "EMA copy of the UNet; not used (--ema auto uses model.diffusion_model.* as CompVis inference does)"
            else:
                out.unknown.append(k)
        else:
            out.unknown.append(k)
    if "unet" in found and found & {"encoder", "decoder"} and "text_model" not in found:
        # an SD checkpoint without its text encoder converts, but cannot generate from text alone: say so
        te = [k for k in out.unknown if k.startswith("cond_stage_model.")]
        out.warnings.append(
            "no CLIP text encoder found next to the UNet and VAE"
            + (f" ({len(te)} cond_stage_model.* key(s) in no supported layout, e.g. '{te[0]}')" if te else "")
            + "; txt2img, img2img and inpaint need one")
    return out


def _ema_rel_shapes(infos) -> dict[str, tuple]:
    """UNet shapes read from an EMA-only checkpoint. EMA names have lost their dots, so they are
    matched against the names the supported topologies (SD v1 and the tiny preset) would have."""
    names = {}
    for cfg in (unet.UNetConfig.sd_v1(), unet.UNetConfig.tiny()):
        for r in unet.rows(cfg):
            for s in r.sources:
                names[ema_key(s)] = s
    return {names[k]: tuple(i.shape) for k, i in infos.items() if k in names}
