"""What glibc's mmap threshold costs a full-size UNet forward: wall time, page faults and peak RSS of
ldm UNet forwards (batch 2, 4x64x64, 77x768 context, fp32 CPU), each setting in a fresh process.

    python bench/bench_mmap_threshold.py --ckpt CKPT [--settings default,1,4,16] [--forwards 3] [--json OUT]

A setting is `default` (glibc's dynamic threshold) or a threshold in MiB, set with
`mallopt(M_MMAP_THRESHOLD)` before the model is loaded;
`+thp` after it runs the child with `THP_MEM_ALLOC_ENABLE=1` (torch then asks for transparent huge pages
on its allocations of 2 MiB or more, which a kernel in `madvise` mode grants only on request).
Every setting runs the same forwards on the same inputs; the outputs' checksum shows they agree.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CHILD = r"""
import ctypes, ctypes.util, json, resource, sys, time
setting = sys.argv[2]
threshold = setting.removesuffix("+thp")
if threshold != "default":
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    assert libc.mallopt(-3, int(float(threshold) * (1 << 20))) == 1
import torch
from sdport.parity.reference.load import load_reference

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

t = time.perf_counter()
ref, cfg, _ = load_reference("unet", sys.argv[1])
load_s = time.perf_counter() - t
g = torch.Generator().manual_seed(0)
x = torch.randn(2, cfg.in_channels, 64, 64, generator=g)
c = torch.randn(2, 77, cfg.context_dim, generator=g)
runs = []
with torch.no_grad():
    for _ in range(int(sys.argv[3])):
        f0, t0 = faults(), time.perf_counter()
        y = ref(x, torch.tensor([981, 1]), context=c)
        runs.append({"wall_s": round(time.perf_counter() - t0, 2), "minor_faults": faults() - f0})
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")]
print(json.dumps({"setting": setting, "load_s": round(load_s, 2), "forwards": runs,
                  "anon_huge_pages_at_end": huge[0].split(":")[1].strip() if huge else None,
                  "output_sum": float(y.double().sum()),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--settings", default="default,1,4,16")
    ap.add_argument("--forwards", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    out = {"benchmark": "mmap_threshold", "settings": vars(a), "machine": common.machine(),
           "versions": common.versions(), "loadavg_before": os.getloadavg(), "results": []}
    for s in a.settings.split(","):
        env = dict(os.environ)
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        if s.endswith("+thp"):
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        p = subprocess.run([sys.executable, "-c", CHILD, a.ckpt, s, str(a.forwards)],
                           capture_output=True, text=True, env=env)
        if p.returncode:
            raise SystemExit(f"setting {s}: exit {p.returncode}\n{p.stderr[-2000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        out["results"].append(r)
        walls = ", ".join(f"{f['wall_s']:.2f}" for f in r["forwards"])
        faults = ", ".join(str(f["minor_faults"]) for f in r["forwards"])
        print(f"{s:>8}: load {r['load_s']:.1f} s; forwards {walls} s; minor faults {faults}; "
              f"peak {r['peak_rss_mib']} MiB; sum {r['output_sum']:.6e}", flush=True)
    out["loadavg_after"] = os.getloadavg()
    common.write_json(a.json, out)


if __name__ == "__main__":
    main()
