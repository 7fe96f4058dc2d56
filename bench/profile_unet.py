"""Profile one native UNet forward with torch.profiler: which ops dominate the time.

    python bench/profile_unet.py [--size full|tiny] [--dtype fp32|bf16] [--rows 25] [--json OUT]

Loads the UNet from the converted .h5 (see common.h5_for), runs one warm-up call, then one profiled
call, and prints the ops sorted by self CPU time, plus the share of the top ones.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from sdport.models.load import DTYPES, load_model

    dtype = DTYPES[a.dtype]
    h5 = common.h5_for(common.checkpoint_for(a.size))
    m = load_model(h5, "unet", dtype=dtype)
    cfg = m.config
    side = 64 if a.size == "full" else 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, side, side, generator=g).to(dtype)
    c = torch.randn(2, 77, cfg.context_dim, generator=g).to(dtype)
    t = torch.full((2,), 981)
    with torch.inference_mode():
        m(x, t, c)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            m(x, t, c)
            wall = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: a.rows]
    print(f"one forward: {wall:.2f} s wall (profiled), self CPU total {total / 1e6:.2f} s")
    print(f"{'op':<48}{'calls':>7}{'self s':>10}{'share':>8}")
    out = []
    for e in rows:
        share = e.self_cpu_time_total / total
        print(f"{e.key[:47]:<48}{e.count:>7}{e.self_cpu_time_total / 1e6:>10.3f}{share:>8.1%}")
        out.append({"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6, "share": share})
    common.write_json(a.json, {"benchmark": "profile_unet", "settings": vars(a), "wall_s": wall,
                               "self_cpu_total_s": total / 1e6, "ops": out, "machine": common.machine(),
                               "versions": common.versions()})


if __name__ == "__main__":
    main()
