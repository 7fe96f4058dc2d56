"""int8 weight-only UNet: bytes on disk and in memory, per-layer and final-output error against fp32.

    python bench/bench_quant.py [--ckpt /work/bench-data/sd-full.ckpt] [--work DIR] [--latent 32] [--json OUT]

Without `--work` the two .h5 files go to a temporary folder that is removed at the end; with it they are
kept there and reused by the next run.

Converts the checkpoint's UNet twice (fp32 and `--quantize int8`), loads both through `load_model`, runs
one forward (batch 1, 4 x latent x latent, t = 500, a 77-token context, seed 0) and prints the parity
report of int8 against fp32 (parity/quant.py). Also compares per-channel max scaling with percentile
clipping of the weights (weight SQNR), the outlier handling that would have to earn its keep.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import FULL_CKPT, current_rss_mib, peak_rss_mib  # noqa: E402

from sdport.convert.convert import convert  # noqa: E402
from sdport.models import quant  # noqa: E402
from sdport.models.cpu import pack  # noqa: E402
from sdport.models.storage.layout import LayoutReader  # noqa: E402
from sdport.models.load import load_model  # noqa: E402
from sdport.parity.quant import quant_report  # noqa: E402


def group_bytes(path: str, group: str) -> int:
    with LayoutReader(path) as r:
        return sum(r.f[group][k].nbytes for k in r.keys(group))


def clipped_sqnr(model: torch.nn.Module, percentiles=(100.0, 99.99, 99.9)) -> dict[str, float]:
    """Weight SQNR (dB, over all quantizable weights together) with the per-channel range at each percentile of |w|."""
    sd = model.state_dict()
    out = {}
    for p in percentiles:
        sig = err = 0.0
        for k in quant.quantizable(model):
            w = sd[k].float().reshape(sd[k].shape[0], -1)  # [out, rest]
            a = w.abs()
            # torch.quantile takes at most 2**24 elements: 256 rows at a time.
            amax = a.amax(dim=1) if p == 100.0 else torch.cat(
                [torch.quantile(c, p / 100, dim=1) for c in a.split(256)])
            scale = torch.where(amax > 0, amax / quant.QMAX, torch.ones_like(amax))[:, None]
            wq = torch.round(w / scale).clamp(-quant.QMAX, quant.QMAX) * scale
            sig += float((w.double() ** 2).sum())
            err += float(((wq - w).double() ** 2).sum())
        out[f"p{p:g}"] = 10 * math.log10(sig / err)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=FULL_CKPT)
    ap.add_argument("--work", default=None, help="where the two .h5 files go (default: a temp dir)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (64 for 512x512 images)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--clip", action="store_true", help="also measure percentile clipping (slow: sorts every row)")
    args = ap.parse_args(argv)
    if args.work:
        run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="sdport-quant-") as work:  # two UNets: 4 GB at full size
            run(args, work)


def run(args, work: str) -> None:
    f32, q8 = os.path.join(work, "unet-fp32.h5"), os.path.join(work, "unet-int8.h5")
    res = {"benchmark": "quant", "settings": vars(args), "machine": common.machine(), "versions": common.versions(),
           "ckpt": args.ckpt, "latent": args.latent}
    for path, q in ((f32, None), (q8, "int8")):
        if not os.path.exists(path):
            t0 = time.perf_counter()
            convert(args.ckpt, path, components={"unet"}, dtype="fp32", quantize=q)
            res[f"convert_{q or 'fp32'}_s"] = round(time.perf_counter() - t0, 1)
    res["unet_group_bytes"] = {"fp32": group_bytes(f32, "unet"), "int8": group_bytes(q8, "unet")}
    res["file_bytes"] = {"fp32": os.path.getsize(f32), "int8": os.path.getsize(q8)}

    rss0 = current_rss_mib()
    mq = load_model(q8, "unet")
    pack.pack_all(mq)  # whatever stays float is packed on first use; pack it now so it counts
    for t in [*mq.parameters(), *mq.buffers()]:
        t.add_(0)  # touch every weight page: copy-on-write maps become resident
    res["int8_in_memory"] = {"weight_bytes": quant.weight_bytes(mq), "rss_growth_mib": round(current_rss_mib() - rss0, 1)}
    mf = load_model(f32, "unet")
    res["fp32_weight_bytes"] = quant.weight_bytes(mf)
    if args.clip:
        res["weight_sqnr_db"] = clipped_sqnr(mf)

    cfg = mf.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, args.latent, args.latent, generator=g)
    ctx = torch.randn(1, 77, cfg.context_dim, generator=g)
    t = torch.tensor([500])
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    mf(x, t, ctx)
    res["fp32_forward_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    mq(x, t, ctx)
    res["int8_forward_s"] = round(time.perf_counter() - t0, 2)
    rep = quant_report(mf, mq, (x, t, ctx), component="unet",
                       input_info={"seed": 0, "noise": "torch.randn, CPU generator: x then context", "t": 500,
                                   "x": list(x.shape), "context": list(ctx.shape)})
    layers = [l for l in rep.layers if l.native != "output"]
    iso = sorted(layers, key=lambda l: l.metrics["isolated"]["psnr_db"])
    acc = sorted(layers, key=lambda l: l.metrics["accumulated"]["psnr_db"])
    res["layers"] = len(layers)
    res["isolated_psnr_db"] = {"min": iso[0].metrics["isolated"]["psnr_db"], "worst": iso[0].native,
                               "median": iso[len(iso) // 2].metrics["isolated"]["psnr_db"]}
    res["isolated_sqnr_db_min"] = min(l.metrics["isolated"]["sqnr_db"] for l in layers)
    res["accumulated_psnr_db"] = {"min": acc[0].metrics["accumulated"]["psnr_db"], "worst": acc[0].native}
    res["layers_below_35db_isolated"] = sum(l.metrics["isolated"]["psnr_db"] < 35 for l in layers)
    res["layers_below_35db_accumulated"] = sum(l.metrics["accumulated"]["psnr_db"] < 35 for l in layers)
    res["output"] = rep.layers[-1].metrics["accumulated"]
    res["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if args.json:
        rep.to_json(os.path.splitext(args.json)[0] + ".report.json")
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
