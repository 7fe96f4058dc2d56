"""Walk the full checkpoint key by key: sdport's safe lazy reader against torch.load.

    python bench/bench_walk.py [--ckpt PATH] [--runs N] [--json OUT]

Each reader runs in its own process; the figure that matters is peak RSS *above the interpreter's
baseline* (measured after imports, before opening the file). Readers:
  sdport           open_checkpoint(), then tensor(key) for every key, each dropped before the next
  torch.load       torch.load(weights_only=True), then touch every tensor
  torch.load-mmap  torch.load(mmap=True, weights_only=True), then touch every tensor (pages of the
                   mapped file count in RSS once touched)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from subproc import run_child  # noqa: E402

CHILD = r'''
import time, torch
from common import current_rss_mib, peak_rss_mib
base = current_rss_mib()
path, reader = {path!r}, {reader!r}
t0 = time.perf_counter()
n = nbytes = 0
if reader == "sdport":
    from sdport.convert.checkpoint import open_checkpoint
    with open_checkpoint(path) as c:
        for k in c.keys():
            t = c.tensor(k)
            n += 1
            nbytes += t.numel() * t.element_size()
            del t
else:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=reader.endswith("mmap"))
    sd = obj.get("state_dict", obj)
    for k, t in sd.items():
        if isinstance(t, torch.Tensor):
            t.view(-1)[-1:].clone() if t.numel() else None
            float(t.float().sum()) if t.is_floating_point() else None  # touch every byte
            n += 1
            nbytes += t.numel() * t.element_size()
emit(seconds=time.perf_counter() - t0, tensors=n, bytes=nbytes, baseline_rss_mib=base,
     peak_rss_mib=peak_rss_mib(), peak_above_baseline_mib=peak_rss_mib() - base)
'''

READERS = ("sdport", "torch.load", "torch.load-mmap")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=common.FULL_CKPT)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    readers = a.readers.split(",")
    runs = {r: [] for r in readers}
    for i in range(a.runs):
        for r in (readers if i % 2 == 0 else readers[::-1]):
            res = run_child(CHILD.format(path=a.ckpt, reader=r))
            runs[r].append(res)
            print(f"[{r}] {res['seconds']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB "
                  f"({res['peak_above_baseline_mib']:.0f} above baseline)", file=sys.stderr, flush=True)
    results = [common.summarise(r, runs[r], tensors=runs[r][0]["tensors"], bytes=runs[r][0]["bytes"])
               for r in readers]
    record = {"benchmark": "walk", "settings": vars(a) | {"file_bytes": os.path.getsize(a.ckpt)},
              "machine": common.machine(), "versions": common.versions(), "results": results}
    common.write_json(a.json, record)
    print(common.table(results, {r["impl"] + " peak above baseline MiB": round(r["peak_above_baseline_mib"])
                                 for r in results}))


if __name__ == "__main__":
    main()
