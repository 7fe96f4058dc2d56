"""The `diffusers` port: diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers' CLIP
models, built from the checkpoint with diffusers' own single-file conversion, offline.

It is a `torch:` port like any other (`build(checkpoint, component)` returns a module that takes the
component's inputs positionally): the classes below only give each library model the positional call
and the output the port contract names, so the report shows the library's own module names.

Configs: diffusers derives its model config from the checkpoint's inference yaml; sdport writes the
yaml's relevant part from the config it infers from the shapes (the same one conversion uses, so
`num_heads` applies here as it does there) and hands it to diffusers' own config function.
"""
from __future__ import annotations

import contextlib
import io
import logging

import torch

from ..components import ParityError
from ..reference.load import parameters_on_meta, read_reference_weights

# Where a CompVis checkpoint keeps each component; diffusers' converters look for these prefixes.
_PREFIX = {"unet": "model.diffusion_model.", "encoder": "first_stage_model.", "decoder": "first_stage_model.",
           "text_model": "cond_stage_model.transformer."}


def build(checkpoint: str, component: str, *, num_heads: int | None = None, dtype: torch.dtype = torch.float32,
          device="cpu") -> torch.nn.Module:
    """The diffusers / transformers model of `component`, holding the checkpoint's weights."""
    cfg, fmt, sd = read_reference_weights(component, checkpoint, num_heads=num_heads)
    if component == "text_model" and fmt != "compvis":
        raise ParityError(f"diffusers port: the {fmt} text encoder is not built (only SD 1.x's CLIP, "
                          f"cond_stage_model.transformer.*); check it with a torch: port")
    with _quiet():
        if component == "vit":
            model = _vit(cfg, fmt, sd)
        else:
            full = {_PREFIX[component] + k: v for k, v in sd.items()}
            model = {"unet": _unet, "encoder": _vae, "decoder": _vae, "text_model": _text}[component](cfg, full, component)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@contextlib.contextmanager
def _quiet():
    """diffusers logs and warns about deprecations and EMA while converting: not sdport's output."""
    logs = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _empty(build):
    """The model with its parameters on the meta device (no memory, no initialisation): it takes the
    converted tensors themselves (`_load`), so one copy of the weights exists."""
    with parameters_on_meta():
        return build()


def _load(model: torch.nn.Module, state: dict, what: str) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or unexpected or empty:
        raise ParityError(f"diffusers port: the converted {what} does not fit diffusers' model "
                          f"(missing {(missing or empty)[:3]}, unexpected {unexpected[:3]})")
    return model


def _original_config(unet=None, vae=None) -> dict:
    """The part of a CompVis inference yaml that diffusers' config functions read."""
    vae = vae or {"ch_mult": [1, 2, 4, 4]}
    params = {"first_stage_config": {"params": {"ddconfig": vae}}, "scale_factor": 0.18215}
    if unet is not None:
        params["unet_config"] = {"params": unet}
    return {"model": {"params": params}}


# ----------------------------------------------------------------------------- UNet


def _unet(cfg, full: dict, component: str):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sf

    class UNetPort(UNet2DConditionModel):
        """(x, t, context) -> eps, as ldm's UNetModel is called."""

        def forward(self, x, t, context):  # noqa: D401 - the port contract's positional call
            return super().forward(x.to(self.dtype), t, encoder_hidden_states=context.to(self.dtype)).sample

    unet = {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "model_channels": cfg.model_channels,
            "channel_mult": list(cfg.channel_mult), "num_res_blocks": cfg.num_res_blocks,
            "attention_resolutions": [2 ** level for level in cfg.attention_levels],
            "transformer_depth": cfg.transformer_depth, "context_dim": cfg.context_dim,
            "use_linear_in_transformer": cfg.use_linear_in_transformer}
    if cfg.num_head_channels:
        # SD 2.x: heads of a fixed width. diffusers derives the per-level head counts from it only for
        # linear projections (its 2.x path); the yaml names no head count then.
        if not cfg.use_linear_in_transformer:
            raise ParityError("diffusers port: diffusers' config function takes 64-wide heads (num_head_channels) "
                              "only with linear projections (SD 2.x); this UNet has convolutional ones")
        unet["num_head_channels"] = cfg.num_head_channels
    else:
        unet["num_heads"] = cfg.num_heads
    config = sf.create_unet_diffusers_config_from_ldm(_original_config(unet=unet), full)
    state = sf.convert_ldm_unet_checkpoint(full, config)
    return _load(_empty(lambda: UNetPort.from_config(config)), state, "UNet")


# ----------------------------------------------------------------------------- VAE


def _vae(cfg, full: dict, component: str):
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sf

    class EncoderPort(AutoencoderKL):
        """image -> moments [B, 2 * z, h, w] (mean and logvar, before the clamp), as ldm's quant_conv
        gives them."""

        def forward(self, image):
            return self.quant_conv(self.encoder(image.to(self.dtype)))

    class DecoderPort(AutoencoderKL):
        """latent -> image, as ldm's decode (post_quant_conv, then the decoder)."""

        def forward(self, latent):
            return self.decoder(self.post_quant_conv(latent.to(self.dtype)))

    if cfg.embed_dim != cfg.z_channels:
        raise ParityError(f"diffusers port: AutoencoderKL needs embed_dim == z_channels "
                          f"(this VAE has {cfg.embed_dim} and {cfg.z_channels})")
    dd = {"ch": cfg.ch, "ch_mult": list(cfg.ch_mult), "in_channels": cfg.in_channels, "out_ch": cfg.out_channels,
          "z_channels": cfg.z_channels, "num_res_blocks": cfg.num_res_blocks}
    config = sf.create_vae_diffusers_config_from_ldm(_original_config(vae=dd), full)
    # The component is one half of the VAE: diffusers' converter maps the keys it is given (it skips
    # the absent half's), and the other half of the model is removed.
    state = sf.convert_ldm_vae_checkpoint(full, config)
    model = _empty(lambda: (EncoderPort if component == "encoder" else DecoderPort).from_config(config))
    drop = ("decoder", "post_quant_conv") if component == "encoder" else ("encoder", "quant_conv")
    for name in drop:
        setattr(model, name, None)
    return _load(model, state, component)


# ----------------------------------------------------------------------------- CLIP (transformers)


def _text(cfg, full: dict, component: str):
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextConfig, CLIPTextModel


    class TextPort(CLIPTextModel):
        """ids -> the last hidden state (what FrozenCLIPEmbedder returns)."""

        def forward(self, ids):
            return super().forward(input_ids=ids).last_hidden_state

    hf = CLIPTextConfig(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions, hidden_size=cfg.hidden,
                        num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers,
                        intermediate_size=cfg.intermediate, hidden_act=cfg.activation,
                        layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.hidden)
    return _load(_empty(lambda: TextPort(hf)), sf.convert_ldm_clip_checkpoint(full), "text encoder")


def _vit(cfg, fmt: str, sd: dict):
    """transformers' CLIPVisionModelWithProjection. diffusers has no single-file conversion of an
    OpenAI-layout image encoder: its weights go through sdport's two ViT tables (the source layout's
    to native, the transformers layout's back), which the parity run then checks like any port's."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ...convert import table
    from ...convert.sources import source

    class VisionPort(CLIPVisionModelWithProjection):
        """pixels -> the projected image embedding."""

        def forward(self, pixels):
            return super().forward(pixel_values=pixels.to(self.dtype)).image_embeds

    if fmt != "hf":
        sd = table.invert(source("vit", "hf").rows(cfg), table.apply(source("vit", fmt).rows(cfg), sd))
    hf = CLIPVisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3, hidden_size=cfg.hidden,
                          num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers,
                          intermediate_size=cfg.intermediate, projection_dim=cfg.projection_dim,
                          hidden_act=cfg.activation, layer_norm_eps=cfg.layer_norm_eps)
    return _load(_empty(lambda: VisionPort(hf)), sd, "image encoder")
