"""The UNet's largest self-attention in bf16 on this CPU: torch's SDPA kernel, sdport's AVX512-BF16 kernel
and a bf16-GEMM path.

    python bench/bench_attention.py [--tokens 4096] [--dim 40] [--scales 1,3] [--chunk 128] [--runs 5] [--json OUT]

Shape: batch 2, 8 heads, `--tokens` queries and keys of `--dim` (the full UNet's 64x64 level: 4096x40,
five calls per forward). q/k/v come from one fused [B, N, 3, h, d] projection as in models/unet.py, drawn
with standard deviation `scale` (a larger scale makes the softmax peakier). Four ways, each timed
(median of `--runs`) and compared with fp32 SDPA on the same bf16 inputs:
  native-bf16 models/cpu_attention.attention: the C kernel (fp32 scores and softmax, bf16 products), what
              the native UNet runs where it builds
  sdpa-bf16   F.scaled_dot_product_attention on the bf16 views
  sdpa-fp32   the same kernel on fp32 copies, output cast back to bf16
  bmm-bf16    per chunk of `--chunk` query rows: bf16 q kᵀ GEMM, softmax, bf16 p v GEMM (bf16 GEMMs run at
              twice the fp32 rate here, but the scores are rounded to bf16 before the softmax)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from sdport.models.cpu import attention as cpu_attention  # noqa: E402


def bmm_attention(q, k, v, chunk: int):
    b, h, n, d = q.shape
    qs = (q * d**-0.5).reshape(b * h, n, d)  # [B, h, N, d] -> [Bh, N, d]
    kt = k.reshape(b * h, -1, d).transpose(1, 2)  # -> [Bh, d, M]
    vv = v.reshape(b * h, -1, d)  # -> [Bh, M, d]
    out = torch.empty(b * h, n, d, dtype=q.dtype)
    scores = torch.empty(b * h, min(chunk, n), kt.shape[2], dtype=q.dtype)
    for i in range(0, n, chunk):
        s = scores[:, : min(chunk, n - i)]
        torch.bmm(qs[:, i : i + chunk], kt, out=s)
        torch.bmm(torch.softmax(s, -1), vv, out=out[:, i : i + chunk])
    return out.view(b, h, n, d)  # [Bh, N, d] -> [B, h, N, d]


@torch.inference_mode()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=40)
    ap.add_argument("--scales", default="1,3")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    flop = 2 * 2 * 8 * a.tokens * a.tokens * a.dim * 2  # q kᵀ and p v, batch 2, 8 heads
    rows = []
    print(f"native kernel: {cpu_attention.reason()}", flush=True)
    for scale in (float(x) for x in a.scales.split(",")):
        g = torch.Generator().manual_seed(0)
        qkv = (torch.randn(2, a.tokens, 3, 8, a.dim, generator=g) * scale).bfloat16()
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, N, 3, h, d] -> 3 x [B, h, N, d]
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        ways = {
            "native-bf16": lambda: cpu_attention.attention(q, k, v),
            "sdpa-bf16": lambda: F.scaled_dot_product_attention(q, k, v),
            "sdpa-fp32": lambda: F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16(),
            "bmm-bf16": lambda: bmm_attention(q, k, v, a.chunk),
        }
        for name, fn in ways.items():
            out = fn().float()
            rel = float((out - ref).norm() / ref.norm())
            s = common.median_time(fn, a.runs)
            rows.append({"impl": name, "scale": scale, "median_s": s, "gflops": flop / s / 1e9, "rel_l2": rel})
            print(f"scale {scale:g} {name:<10} {s * 1e3:7.1f} ms  {flop / s / 1e9:6.1f} GFLOP/s  "
                  f"rel_l2 vs fp32 {rel:.2e}", flush=True)
    common.write_json(a.json, {"benchmark": "attention", "settings": vars(a), "native_kernel": cpu_attention.reason(),
                               "machine": common.machine(),
                               "versions": common.versions(), "results": rows})


if __name__ == "__main__":
    main()
