"""Full-size parity per component on the CPU: build (if needed), convert, then native vs reference.

    python bench/full_parity.py [--ckpt PATH] [--components unet,decoder,encoder,text_model] [--json OUT]
    python bench/full_parity.py --generation v2 --components unet,text_model --round-trip   # SD 2.x at full size

Each component is loaded from the converted .h5 and compared, fp32, on seeded inputs with the
reference: UNet vs ldm UNetModel, VAE encoder/decoder vs ldm Encoder/Decoder (+ quant convs), text
encoder vs transformers CLIPTextModel (SD v1) or FrozenOpenCLIPEmbedder's computation on open_clip's
text tower (SD 2.x, parity/reference/openclip.py). One component in memory at a time. Gate: rel_l2 <= 1e-5.
--round-trip also exports the .h5 back to safetensors and compares every tensor with the checkpoint's,
bit for bit (dtype included).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GATE = 1e-5


def _sd(ckpt, prefix):
    from sdport.convert.checkpoint import open_checkpoint

    with open_checkpoint(ckpt) as c:
        return {k[len(prefix):]: c.tensor(k) for k in c.keys() if k.startswith(prefix)}


def _rel(a, r):
    a, r = a.double(), r.double()
    return float((a - r).norm() / r.norm().clamp_min(1e-30)), float((a - r).abs().max())


@torch.inference_mode()
def compare(comp: str, ckpt: str, h5: str) -> dict:
    from sdport.models.load import load_model

    g = torch.Generator().manual_seed(0)
    native = load_model(h5, comp)
    if comp == "unet":
        from sdport.parity.reference.unet import build_reference

        with torch.device("meta"):
            ref = build_reference(native.config)
        ref.load_state_dict(_sd(ckpt, "model.diffusion_model."), assign=True)
        x = torch.randn(2, native.config.in_channels, 64, 64, generator=g)
        c = torch.randn(2, 77, native.config.context_dim, generator=g)
        t = torch.tensor([981, 1])
        outs = [(native(x, t, c), ref(x, t, context=c))]
    elif comp in ("encoder", "decoder"):
        from sdport.parity.reference.vae import ReferenceVAE

        with torch.device("meta"):
            ref = ReferenceVAE(native.config)
        ref.load_state_dict(_sd(ckpt, "first_stage_model."), assign=True)
        if comp == "decoder":
            z = torch.randn(1, native.config.embed_dim, 64, 64, generator=g)
            outs = [(native(z), ref.decode(z))]
        else:
            img = torch.rand(1, 3, 512, 512, generator=g) * 2 - 1
            (m, lv), (rm, rlv) = native(img), ref.encode(img)
            outs = [(m, rm), (lv, rlv)]
    elif comp == "text_model" and native.config.activation == "gelu":  # SD 2.x: OpenCLIP ViT-H/14
        from sdport.models.tokenizer import default_tokenizer
        from sdport.parity.reference.openclip import build_text_reference as build_openclip

        ref = build_openclip(native.config)
        missing, unexpected = ref.load_state_dict(_sd(ckpt, "cond_stage_model.model."), strict=False)
        if missing or set(unexpected) != {"text_projection", "logit_scale"}:
            raise SystemExit(f"text reference keys do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        tok = default_tokenizer()
        ids = torch.tensor([tok("", 0), tok("a photograph of an astronaut riding a horse", 0)])
        outs = [(native(ids), ref(ids))]
    elif comp == "text_model":
        from sdport.parity.reference.clip import build_text_reference

        # Built on the CPU, not on meta: a meta-built transformers model loaded with assign=True
        # computes something else (rel_l2 0.92 against the same weights loaded normally).
        ref = build_text_reference(native.config)
        # transformers 5.x keys may or may not carry "text_model."; follow the reference's own keys.
        pre = "text_model." if any(k.startswith("text_model.") for k in ref.state_dict()) else ""
        sd = {pre + k: v for k, v in _sd(ckpt, "cond_stage_model.transformer.text_model.").items()
              if not k.endswith("position_ids")}
        missing, unexpected = ref.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise SystemExit(f"text reference keys do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        ids = torch.randint(0, native.config.vocab_size, (2, 77), generator=g)
        outs = [(native(ids), ref(input_ids=ids).last_hidden_state)]
    else:
        raise SystemExit(f"unknown component {comp}")
    errs = [_rel(a, r) for a, r in outs]
    ref_std = min(float(r.double().std()) for _, r in outs)  # an output that is all zeros proves nothing
    return {"component": comp, "rel_l2": max(e[0] for e in errs), "max_abs": max(e[1] for e in errs),
            "reference_std": ref_std, "pass": max(e[0] for e in errs) <= GATE and ref_std > 0}


def round_trip(ckpt: str, h5: str) -> dict:
    """sdport export of the .h5, then each exported tensor against the checkpoint's, one at a time."""
    import tempfile

    from sdport.convert.checkpoint import open_checkpoint
    from sdport.convert.convert import export

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(h5))) as d:
        out = os.path.join(d, "back.safetensors")
        counts = export(h5, out)
        with open_checkpoint(ckpt) as a, open_checkpoint(out) as b:
            back = list(b.keys())
            missing = [k for k in back if k not in set(a.keys())]
            differ = [k for k in back if k not in missing
                      and not (a.tensor(k).dtype == b.tensor(k).dtype and torch.equal(a.tensor(k), b.tensor(k)))]
    return {"component": "round_trip", "tensors": len(back), "per_component": counts, "not_in_source": missing,
            "differ": differ, "pass": not missing and not differ, "seconds": time.perf_counter() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="default: the full SD v1 (or, --generation v2, 2.x) fixture")
    ap.add_argument("--generation", choices=["v1", "v2"], default="v1")
    ap.add_argument("--components", default="unet,decoder,encoder,text_model")
    ap.add_argument("--json", default=None)
    ap.add_argument("--round-trip", action="store_true", help="also export and compare bit for bit")
    a = ap.parse_args(argv)
    variant = "v2" if a.generation == "v2" else "lightning"
    if a.ckpt is None:
        from sdport.fixtures.build import FILENAMES

        a.ckpt = os.path.join(os.path.dirname(common.FULL_CKPT), FILENAMES[variant].replace("tiny", "full"))
    if not os.path.exists(a.ckpt):
        from sdport.fixtures.build import build_variant

        build_variant(variant, os.path.dirname(a.ckpt), "full")
    h5 = common.h5_for(a.ckpt)
    rows = []
    for comp in a.components.split(","):
        t0 = time.perf_counter()
        r = compare(comp, a.ckpt, h5)
        r["seconds"] = time.perf_counter() - t0
        rows.append(r)
        print(f"{comp:<12} rel_l2 {r['rel_l2']:.2e}  max_abs {r['max_abs']:.2e}  reference std {r['reference_std']:.3g}  "
              f"{'ok' if r['pass'] else 'FAIL'}  ({r['seconds']:.0f} s)", flush=True)
    if a.round_trip:
        r = round_trip(a.ckpt, h5)
        rows.append(r)
        print(f"round trip   {r['tensors']} tensors, {len(r['differ'])} differ, {len(r['not_in_source'])} not in the "
              f"source  {'ok' if r['pass'] else 'FAIL'}  ({r['seconds']:.0f} s)", flush=True)
    record = {"benchmark": "full_parity", "settings": vars(a) | {"h5": h5, "gate_rel_l2": GATE},
              "machine": common.machine(), "versions": common.versions(), "results": rows,
              "peak_rss_mib": common.peak_rss_mib()}
    common.write_json(a.json, record)
    sys.exit(0 if all(r["pass"] for r in rows) else 1)


if __name__ == "__main__":
    main()
