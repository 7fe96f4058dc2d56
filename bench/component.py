"""The driver behind bench_unet.py and bench_vae.py: one component, three implementations, interleaved."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

IMPLS = ("ldm", "diffusers", "sdport")


def parse(kind: str, argv=None) -> argparse.Namespace:
    what = {"unet": "UNet forward (batch 2, 4x64x64 latents, 77x768 context)",
            "decoder": "VAE decoder (1x4x64x64 latent -> 512x512 image)"}[kind]
    ap = argparse.ArgumentParser(description=f"Benchmark the {what}: ldm, diffusers and sdport in one run.")
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="sdport's dtype")
    ap.add_argument("--ref-dtype", choices=["fp32", "fp16", "bf16"], default=None,
                    help="dtype of ldm and diffusers (default: --dtype)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", default=None, help="write the machine-readable record here")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of ldm,diffusers,sdport")
    ap.add_argument("--batch", type=int, default=2 if kind == "unet" else 1)
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 64 full, 16 tiny)")
    ap.add_argument("--chunk", type=int, default=0, help="sdport attention query chunk (0: none)")
    ap.add_argument("--channels-last", action="store_true", help="sdport in channels_last memory format")
    ap.add_argument("--compile", action="store_true", help="torch.compile sdport (the warm-up compiles)")
    ap.add_argument("--allow-slow", action="store_true", help="run fp16 on a CPU anyway")
    return ap.parse_args(argv)


def run(kind: str, argv=None) -> dict:
    a = parse(kind, argv)
    a.ref_dtype = a.ref_dtype or a.dtype
    if a.latent is None:
        a.latent = 64 if a.size == "full" else 16
    from sdport.models.load import check_device_dtype

    if not a.allow_slow:
        for d in {a.dtype, a.ref_dtype}:
            check_device_dtype(a.device, d, refuse=True)  # fp16 on a CPU: refused with the measured reason
    ckpt = common.checkpoint_for(a.size)
    h5 = common.h5_for(ckpt)
    impls = [i for i in a.impls.split(",") if i]
    base = ["--kind", kind, "--ckpt", ckpt, "--h5", h5, "--device", a.device, "--batch", str(a.batch),
            "--latent", str(a.latent)]
    args = {i: base + ["--dtype", a.ref_dtype] for i in impls}
    if "sdport" in args:
        args["sdport"] = base + ["--dtype", a.dtype] + (["--chunk", str(a.chunk)] if a.chunk else []) \
            + (["--channels-last"] if a.channels_last else []) + (["--compile"] if a.compile else [])
    with tempfile.TemporaryDirectory(prefix="sdport-bench-") as outdir:  # each impl's output, for agreement
        results, outputs = common.interleaved(impls, args, a.runs, outdir, a.warmup)
        agreement = common.agreement(outputs, "ldm" if "ldm" in outputs else "diffusers")
    for r in results:
        r["dtype"] = a.dtype if r["impl"] == "sdport" else a.ref_dtype
    floor = common.UNET_FLOOR_S.get(a.dtype) if kind == "unet" and a.size == "full" and a.device == "cpu" \
        and a.batch == 2 and a.latent == 64 else None
    record = {
        "benchmark": kind,
        "settings": {k: v for k, v in vars(a).items() if k != "json"} | {"checkpoint": ckpt, "h5": h5},
        "machine": common.machine(a.device),
        "versions": common.versions(),
        "results": results,
        "ratios": common.ratios(results),
        "agreement": agreement,
    }
    if floor:
        record["floor_s"] = floor
        record["fraction_of_floor"] = {r["impl"]: round(common.UNET_FLOOR_S[r["dtype"]] / r["median_s"], 3)
                                       for r in results if r["dtype"] in common.UNET_FLOOR_S}
    common.write_json(a.json, record)
    print(common.table(results, {"ratios": record["ratios"], "agreement": record["agreement"],
                                 **({"fraction_of_floor": record["fraction_of_floor"]} if floor else {})}))
    return record
