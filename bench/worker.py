"""One implementation of one component in its own process, driven over stdin/stdout by common.Worker.

Protocol (one JSON line per reply on the real stdout; anything the libraries print goes to stderr):
    start          -> {"load_s", "rss_mib"}         after loading the weights and building the inputs
    "run"          -> {"s"}                          one timed forward call
    "quit PATH|-"  -> {"peak_rss_mib", ...}          saves the last output to PATH (fp32) and exits

Implementations: `sdport` (native, loaded from the .h5), `ldm` (the original CompVis code, weights
from the checkpoint), `diffusers` (UNet2DConditionModel / AutoencoderKL built from a config dict,
weights converted by diffusers' own single-file conversion functions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# ldm and diffusers print while building models: keep the protocol channel clean.
_proto = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import current_rss_mib, peak_rss_mib  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reply(obj: dict) -> None:
    _proto.write(json.dumps(obj) + "\n")
    _proto.flush()


def source_state_dict(ckpt: str, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under `prefix`, read one at a time by sdport's safe reader."""
    from sdport.convert.checkpoint import open_checkpoint

    with open_checkpoint(ckpt) as c:
        return {k[len(prefix):]: c.tensor(k) for k in c.keys() if k.startswith(prefix)}


def original_config(ucfg, vcfg) -> dict:
    """The slice of a CompVis yaml that diffusers' single-file helpers read."""
    from sdport.parity.reference.unet import ldm_kwargs
    from sdport.models.vae import LATENT_SCALE_SD_V1
    from sdport.parity.reference.vae import ddconfig

    return {"model": {"params": {
        "scale_factor": LATENT_SCALE_SD_V1,
        "unet_config": {"params": ldm_kwargs(ucfg)},
        "first_stage_config": {"params": {"ddconfig": ddconfig(vcfg)}},
    }}}


def configs(h5: str):
    from sdport.models.storage.layout import LayoutReader
    from sdport.models.components import COMPONENTS
    from sdport.models.config import from_dict

    with LayoutReader(h5) as r:
        return (from_dict(COMPONENTS["unet"].config, r.config("unet")),
                from_dict(COMPONENTS["decoder"].config, r.config("decoder")))


def load_unet(impl: str, ckpt: str, h5: str, dtype: torch.dtype, opts):
    """-> a callable (x, t, context) -> eps."""
    ucfg, vcfg = configs(h5)
    if impl == "sdport":
        from sdport.models.load import load_model

        m = load_model(h5, "unet", dtype=dtype)
        if opts.chunk:
            m.set_attention_chunk(opts.chunk)
        if opts.channels_last:
            m = m.to(memory_format=torch.channels_last)
        return m, lambda x, t, c: m(x, t, c)
    if impl == "ldm":
        from sdport.parity.reference.unet import build_reference

        with torch.device("meta"):
            m = build_reference(ucfg)
        m.load_state_dict(source_state_dict(ckpt, "model.diffusion_model."), assign=True)
        m = m.to(dtype).eval().requires_grad_(False)
        return m, lambda x, t, c: m(x, t, context=c)
    if impl == "diffusers":
        from diffusers import UNet2DConditionModel
        from diffusers.loaders import single_file_utils as sfu

        sd = source_state_dict(ckpt, "")
        sd = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
        # 8 latent pixels per image pixel: image_size 512 -> sample_size 64 (only a default in diffusers).
        config = sfu.create_unet_diffusers_config_from_ldm(original_config(ucfg, vcfg), sd, image_size=512)
        converted = sfu.convert_ldm_unet_checkpoint(sd, config)
        del sd
        with torch.device("meta"):
            m = UNet2DConditionModel(**config)
        missing, unexpected = m.load_state_dict(converted, strict=True, assign=True)
        m = m.to(dtype).eval().requires_grad_(False)
        return m, lambda x, t, c: m(x, t, encoder_hidden_states=c).sample
    raise SystemExit(f"unknown impl {impl}")


def load_decoder(impl: str, ckpt: str, h5: str, dtype: torch.dtype, opts):
    """-> a callable z -> image (post_quant_conv + decoder)."""
    ucfg, vcfg = configs(h5)
    if impl == "sdport":
        from sdport.models.load import load_model

        m = load_model(h5, "decoder", dtype=dtype)
        if opts.channels_last:
            m = m.to(memory_format=torch.channels_last)
        return m, lambda z: m(z)
    if impl == "ldm":
        from sdport.parity.reference.vae import ReferenceVAE

        with torch.device("meta"):
            m = ReferenceVAE(vcfg)
        sd = {k: v for k, v in source_state_dict(ckpt, "first_stage_model.").items()
              if k.startswith(("decoder.", "post_quant_conv."))}
        m.load_state_dict(sd, strict=False, assign=True)
        del m.encoder, m.quant_conv
        m = m.to(dtype).eval().requires_grad_(False)
        return m, m.decode
    if impl == "diffusers":
        from diffusers import AutoencoderKL
        from diffusers.loaders import single_file_utils as sfu

        sd = {k: v for k, v in source_state_dict(ckpt, "").items() if k.startswith("first_stage_model.")}
        config = sfu.create_vae_diffusers_config_from_ldm(original_config(ucfg, vcfg), sd, image_size=512)
        converted = sfu.convert_ldm_vae_checkpoint(sd, config)
        del sd
        with torch.device("meta"):
            m = AutoencoderKL(**config)
        m.load_state_dict(converted, strict=True, assign=True)
        m = m.to(dtype).eval().requires_grad_(False)
        return m, lambda z: m.decode(z).sample
    raise SystemExit(f"unknown impl {impl}")


def inputs(kind: str, h5: str, batch: int, latent: int, dtype: torch.dtype, seed: int = 0):
    """Seeded CPU inputs, the same in every worker."""
    ucfg, vcfg = configs(h5)
    g = torch.Generator().manual_seed(seed)
    if kind == "unet":
        x = torch.randn(batch, ucfg.in_channels, latent, latent, generator=g)
        c = torch.randn(batch, 77, ucfg.context_dim, generator=g)
        t = torch.full((batch,), 981, dtype=torch.long)
        return (x.to(dtype), t, c.to(dtype))
    z = torch.randn(batch, vcfg.embed_dim, latent, latent, generator=g)
    return (z.to(dtype),)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", required=True)
    ap.add_argument("--kind", choices=["unet", "decoder"], required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--h5", required=True)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    opts = ap.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dtype = DTYPES[opts.dtype]
    t0 = time.perf_counter()
    load = load_unet if opts.kind == "unet" else load_decoder
    model, fn = load(opts.impl, opts.ckpt, opts.h5, dtype, opts)
    model.to(opts.device)
    args = [a.to(opts.device) for a in inputs(opts.kind, opts.h5, opts.batch, opts.latent, dtype)]
    if opts.compile:  # sdport only: compiles on the warm-up call, whose time the parent reports
        fn = torch.compile(fn)
    sync = torch.cuda.synchronize if opts.device == "cuda" else (lambda: None)
    reply({"load_s": time.perf_counter() - t0, "rss_mib": current_rss_mib()})
    out = None
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            with torch.inference_mode():
                t = time.perf_counter()
                out = fn(*args)
                sync()
                s = time.perf_counter() - t
            reply({"s": s})
        elif cmd == "quit":
            if out is not None and arg and arg != "-":
                torch.save(out.float().contiguous(), arg)
            end = {"peak_rss_mib": peak_rss_mib()}
            if opts.device == "cuda":
                end["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            reply(end)
            return
    return


if __name__ == "__main__":
    main()
