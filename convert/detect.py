"""Which components a checkpoint holds, their configs (from tensor shapes) and a conversion plan.

Every key of the checkpoint ends up in exactly one place: a row of a component's mapping table, the
noise schedule, a deliberately ignored key (with the reason), or the list of unknown keys.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

from ..models import load as native
from ..models.config import to_dict
from ..models.errors import SdportError
from ..models.vae import LATENT_SCALE_SD_V1
from . import model_yaml, unet
from .model_yaml import setting
from .sources import SOURCES, TEXT_TO_IMAGE, Source, source
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
    (r"^depth_model\.", "the MiDaS (DPT-Hybrid) depth estimator of the SD 2.x depth model: it turns the input "
                        "image into the UNet's depth channel; not a diffusion component, not converted"),
]


@dataclass
class ComponentPlan:
    name: str  # layout group
    prefix: str  # source prefix
    source_format: str  # "compvis" | "openai" | "hf"
    config: object
    rows: list[Row]
    key_of: dict[str, str]  # relative source key -> full checkpoint key actually read
    expected: dict[str, tuple]  # full key -> expected shape
    source: Source  # the source layout it was read from (convert/sources.py)

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
    # what no shape says (and what the yaml confirmed), each with its source: model_yaml.setting
    settings: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        families = [c.source.family_of(c.config) for c in self.components.values()]
        return next((f for f in ("sd-v2", "sd-v1") if f in families), families[0] if families else "unknown")

    @property
    def variant(self) -> str:
        u = next((c for c in self.components.values() if c.source.evidence), None)  # the UNet's in-channels decide
        if u is None:
            if self.family == "clip-vit":
                return "image-encoder"
            return "partial" if self.components else "none"
        return unet.VARIANTS[u.config.in_channels]


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


def plan(ckpt, *, components=None, ema: str = "auto", num_heads: int | None = None,
         num_head_channels: int | None = None, yaml_settings: dict | None = None,
         prediction: str | None = None) -> Plan:
    """Map every key of `ckpt` (a convert.checkpoint.Checkpoint) to a destination. `num_heads` /
    `num_head_channels` set the head layout of the sources whose shapes do not say it (the UNet);
    `yaml_settings` (model_yaml.settings of the checkpoint's yaml) and `prediction` (a flag) settle
    what no shape says, and `Plan.settings` records each value with its source."""
    yaml_settings = yaml_settings or {}
    heads = {k: v for k, v in (("num_heads", num_heads), ("num_head_channels", num_head_channels)) if v is not None}
    heads_source = "flag" if heads else None
    if not heads:
        heads = {k: yaml_settings[f"unet.{k}"]["value"] for k in ("num_heads", "num_head_channels")
                 if f"unet.{k}" in yaml_settings}
        heads_source = "yaml" if heads else None
    infos = ckpt.infos
    out = Plan()
    claimed: set[str] = set()
    found: set[str] = set()  # components present, selected or not
    for src in SOURCES:
        name, fmt, infer, rows_of, ignored = src.component, src.format, src.infer_config, src.rows, src.ignored
        if name in found:
            continue  # an earlier source layout of the same component is there
        prefix = src.prefix(infos)
        rel = _rel_shapes(infos, prefix)
        use_ema = False
        if src.ema:
            has_ema = any(k.startswith(EMA_PREFIX) and k not in ("model_ema.decay", "model_ema.num_updates") for k in infos)
            out.ema = {"present": has_ema, "policy": ema, "used": False, "differs": None}
            if ema == "use" and not has_ema:
                raise SdportError(f"{ckpt.path}: --ema use, but the checkpoint has no model_ema.* weights")
            if not src.present(rel) and has_ema and ema != "ignore":
                use_ema = True  # an EMA-only checkpoint: the EMA copy is the model
            use_ema = use_ema or (ema == "use")
        if not src.present(rel) and not use_ema:
            continue
        if src.ema and not rel:
            rel = _ema_rel_shapes(infos)  # an EMA-only checkpoint
        try:
            config = infer(rel, **heads) if src.num_heads and heads else infer(rel)
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
        if src.ema:
            out.ema["used"] = use_ema
        if src.evidence:
            out.evidence[f"{name}_in_channels"] = {"key": key_of[src.evidence],
                                                   "shape": list(infos[key_of[src.evidence]].shape)}
        if components is None or name in components:
            out.components[name] = ComponentPlan(name, prefix, fmt, config, rows, key_of, expected, src)
        else:
            for k in key_of.values():
                out.ignored[k] = f"component '{name}' not selected (--components)"
        for k in infos:
            if k.startswith(prefix) and k not in claimed and k not in out.ignored:
                reason = _ignored(ignored, k[len(prefix):])
                if use_ema and k[len(prefix):] in key_of:
                    reason = "non-EMA UNet weights; not used (--ema use)"
                if reason:
                    out.ignored[k] = reason
    for k in SCHEDULE_KEYS:
        if k in infos:
            out.schedule.append(k)
            claimed.add(k)
    u = next((c for c in out.components.values() if c.source.ema), None)
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
    out.settings = _settings(ckpt.path, out, yaml_settings, heads_source, prediction)
    for denoiser, vae_halves, text, title, others in TEXT_TO_IMAGE:
        if denoiser in found and found & set(vae_halves) and text not in found:
            root = source(text).prefixes[0].split(".")[0] + "."  # where its keys would have been
            stray = [k for k in out.unknown if k.startswith(root)]
            out.warnings.append(
                f"no {title} found next to {others}"
                + (f" ({len(stray)} {root}* key(s) in no supported layout, e.g. '{stray[0]}')" if stray else "")
                + "; txt2img, img2img and inpaint need one")
    return out


def _settings(path: str, p: Plan, given: dict, heads_source: str | None, prediction: str | None) -> dict:
    """The values no shape says, each with its source; the yaml's values that shapes do say must agree."""
    out = {}
    where = next((s["why"].partition(":")[0] for s in given.values()), "the yaml")
    if prediction is not None:
        out["prediction"] = setting(prediction, "flag", "--prediction")
    elif "prediction" in given:
        out["prediction"] = given["prediction"]
    elif "unet" in p.components:
        out["prediction"] = setting("eps", "assumed", "the weights do not say (SD 2.x 512-base and 768-v have the "
                                    "same shapes): eps, as SD v1 and 2.x base; pass --prediction v or the yaml")
    out["scale_factor"] = given.get("scale_factor") or setting(
        LATENT_SCALE_SD_V1, "assumed", "no yaml: SD v1's and 2.x's scale_factor")
    u = p.components.get("unet")
    if u is not None:
        c = u.config
        for k in ("context_dim", "use_linear_in_transformer"):
            g = given.get(f"unet.{k}")
            if g is not None and g["value"] != getattr(c, k):
                raise SdportError(f"{path}: {g['why']} is {g['value']!r}, but the checkpoint's shapes say "
                                  f"{getattr(c, k)!r}; expected the checkpoint's own yaml")
            out[f"unet.{k}"] = setting(getattr(c, k), "shapes", "UNet tensor shapes"
                                       + (f" (and {g['why']})" if g is not None else ""))
        layout = {"num_head_channels": c.num_head_channels} if c.num_head_channels else {"num_heads": c.num_heads}
        why = {"flag": "--num-heads / --num-head-channels", "yaml": f"{where}: unet_config.params",
               None: "no shape says it: the preset rule (SD v1 layouts 8 heads, SD 2.x layouts 64-wide heads)"}
        out["unet.heads"] = setting(layout, heads_source or "assumed", why[heads_source])
    t = p.components.get("text_model")
    if t is not None:
        enc = given.get("text_model.encoder")
        if enc is not None and model_yaml.TEXT_ENCODERS[enc["value"]] != t.source_format:
            raise SdportError(f"{path}: {enc['why']} is {enc['value']}, but the checkpoint holds a "
                              f"{t.source_format} text encoder; expected the checkpoint's own yaml")
        layer = given.get("text_model.layer")
        if layer is not None and layer["value"] != t.config.layer:
            t.config = dataclasses.replace(t.config, layer=layer["value"])
        out["text_model.layer"] = layer or setting(
            t.config.layer, "assumed", "no yaml: every SD 2.x yaml says penultimate" if t.source_format == "openclip"
            else "SD v1's FrozenCLIPEmbedder returns the last layer")
    return out


def _ema_rel_shapes(infos) -> dict[str, tuple]:
    """UNet shapes read from an EMA-only checkpoint. EMA names have lost their dots, so they are
    matched against the names the supported topologies (SD v1, 2.x and the tiny presets) would have."""
    names = {}
    for cfg in (unet.UNetConfig.sd_v1(), unet.UNetConfig.tiny(), unet.UNetConfig.sd_v2(), unet.UNetConfig.tiny_v2()):
        for r in unet.rows(cfg):
            for s in r.sources:
                names[ema_key(s)] = s
    return {names[k]: tuple(i.shape) for k, i in infos.items() if k in names}
