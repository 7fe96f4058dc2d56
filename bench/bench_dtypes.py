"""Throughput of a 3x3 convolution and a square GEMM per dtype on this device: why fp16 is refused on a CPU.

    python bench/bench_dtypes.py [--channels 320] [--side 32] [--gemm 1024] [--runs 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


@torch.inference_mode()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=320)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--gemm", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    c, s, n = a.channels, a.side, a.gemm
    conv_flop = 2 * c * c * 9 * s * s * 2  # batch 2
    gemm_flop = 2 * n**3
    rows = []
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x, w = torch.randn(2, c, s, s).to(dt), torch.randn(c, c, 3, 3).to(dt)
        p, q = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        tc = common.median_time(lambda: F.conv2d(x, w, padding=1), a.runs)
        tg = common.median_time(lambda: p @ q, a.runs)
        rows.append({"dtype": name, "conv_s": tc, "conv_gflops": conv_flop / tc / 1e9,
                     "gemm_s": tg, "gemm_gflops": gemm_flop / tg / 1e9})
        print(f"{name}: conv3x3 2x{c}x{s}x{s} {rows[-1]['conv_gflops']:.1f} GFLOP/s, "
              f"GEMM {n}^2 {rows[-1]['gemm_gflops']:.1f} GFLOP/s", flush=True)
    f32 = rows[0]
    for r in rows[1:]:
        print(f"{r['dtype']} time / fp32 time: conv {f32['conv_gflops'] / r['conv_gflops']:.2f}, "
              f"GEMM {f32['gemm_gflops'] / r['gemm_gflops']:.2f}")
    common.write_json(a.json, {"benchmark": "dtypes", "settings": vars(a), "machine": common.machine(),
                               "versions": common.versions(), "results": rows})


if __name__ == "__main__":
    main()
