"""Load the full UNet ready to run: sdport's HDF5 reader against safetensors load_file + build.

    python bench/bench_load.py [--size full|tiny] [--component unet] [--runs N] [--readers a,b]
                               [--first-call] [--json OUT]

"Ready to run" = the native module built with every parameter in place and every byte touched
(a sum over each weight), so lazy memory maps pay their page faults inside the timing. Readers:
  sdport       models.load.load_model(h5): memory-mapped datasets; on a CPU the UNet's Conv2d/Linear
               modules pack their weights into oneDNN's layout on their first call (models/cpu/pack.py)
  sdport-eager load_model(h5) + pack.pack_all: every weight reordered into oneDNN's layout up front
  sdport-map-each  load_model(h5) with a memory map per dataset, the reader's fallback when one map
               of the whole file is refused (models/storage/filemap.py)
  sdport-unpacked  load_model(h5, packed=False): memory-mapped, UNet conv weights copied channels-last
  layout-mmap  LayoutReader.state_dict (memory-mapped datasets) + build + load_state_dict(assign): the
               layout read on its own, done exactly as the safetensors row does it
  safetensors  safetensors.torch.load_file(native weights) + build on meta + load_state_dict(assign)
  h5py-read    every dataset read with ds[()] + build (the naive HDF5 reader)
The safetensors file holds the same native tensors (written once from the .h5, next to it).

`--first-call` (UNet only) also times the first and the second forward after the load (batch 2,
4x64x64 full / 4x16x16 tiny, 77-token context): a lazily packed model pays its reorders in the first,
a plain one in every call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from subproc import run_child  # noqa: E402

CHILD = r'''
import time, torch
from common import current_rss_mib, peak_rss_mib
base = current_rss_mib()
h5, st, comp, reader, first_call, side = {h5!r}, {st!r}, {comp!r}, {reader!r}, {first_call!r}, {side!r}
from sdport.models.cpu import pack
from sdport.models.load import load_model, build
from sdport.models.storage.layout import LayoutReader
if reader == "sdport-map-each":
    from sdport.models.storage import filemap
    def refuse(*args, **kwargs):
        raise OSError("one map per dataset, for this benchmark")
    filemap._Whole = refuse
t0 = time.perf_counter()
if reader in ("sdport", "sdport-map-each"):
    m = load_model(h5, comp)
elif reader == "sdport-eager":
    m = load_model(h5, comp)
    pack.pack_all(m)
elif reader == "sdport-unpacked":
    m = load_model(h5, comp, packed=False)
else:
    with LayoutReader(h5) as r:
        cfg = r.config(comp)
        if reader == "h5py-read":
            sd = {{k: torch.from_numpy(r.f[comp][k][()]) for k in r.keys(comp)}}
        elif reader == "layout-mmap":
            sd = r.state_dict(comp)
    if reader == "safetensors":
        from safetensors.torch import load_file
        sd = load_file(st)
    with torch.device("meta"):
        m = build(comp, cfg)
    m.load_state_dict(sd, assign=True)
    m.eval().requires_grad_(False)
built = time.perf_counter() - t0
weights = [*m.parameters()] + [x.packed_weight for x in m.modules() if hasattr(x, "packed_weight")]
for w in weights:  # touch every byte (weights already packed were written by the packing itself)
    if not w.is_mkldnn:
        float(w.sum())
del weights, w  # a plain weight must be freed once its module has packed it
seconds, peak = time.perf_counter() - t0, peak_rss_mib()
calls = []
if first_call:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, m.config.in_channels, side, side, generator=g)
    c = torch.randn(2, 77, m.config.context_dim, generator=g)
    with torch.inference_mode():
        for _ in range(2):
            t1 = time.perf_counter()
            m(x, torch.full((2,), 981), c)
            calls.append(time.perf_counter() - t1)
# Outside the timing: one sum per state-dict key, in key order, so packed and plain models agree exactly.
sums = {{}}
for prefix, mod in m.named_modules():
    for name, t in mod.state_dict(keep_vars=True).items():
        if "." not in name:
            sums[f"{{prefix}}.{{name}}"] = float(t.double().sum())
emit(seconds=seconds, build_s=built, baseline_rss_mib=base, peak_rss_mib=peak, calls_s=calls,
     peak_above_baseline_mib=peak - base, checksum=sum(v for _, v in sorted(sums.items())))
'''

READERS = ("sdport", "sdport-map-each", "sdport-eager", "sdport-unpacked", "layout-mmap", "safetensors", "h5py-read")


def safetensors_copy(h5: str, comp: str) -> str:
    out = os.path.splitext(h5)[0] + f".{comp}.safetensors"
    if not os.path.exists(out):
        from safetensors.torch import save_file
        from sdport.models.storage.layout import LayoutReader

        with LayoutReader(h5) as r:
            save_file({k: t.contiguous() for k, t in r.state_dict(comp).items()}, out + ".partial")
        os.replace(out + ".partial", out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--component", default="unet")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--first-call", action="store_true", help="also time the first two UNet forwards")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.first_call and a.component != "unet":
        ap.error("--first-call times UNet forwards; use it with --component unet")
    h5 = common.h5_for(common.checkpoint_for(a.size))
    st = safetensors_copy(h5, a.component)
    readers = a.readers.split(",")
    side = 64 if a.size == "full" else 16
    runs = {r: [] for r in readers}
    for i in range(a.runs):
        for r in (readers if i % 2 == 0 else readers[::-1]):
            res = run_child(CHILD.format(h5=h5, st=st, comp=a.component, reader=r,
                                         first_call=a.first_call, side=side))
            runs[r].append(res)
            calls = "".join(f", call {j + 1} {t:.2f} s" for j, t in enumerate(res["calls_s"]))
            print(f"[{r}] {res['seconds']:.2f} s (built {res['build_s']:.2f} s){calls}, peak RSS "
                  f"{res['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    sums = {r: runs[r][0]["checksum"] for r in readers}
    results = []
    for r in readers:
        extra = {"median_build_s": statistics.median(x["build_s"] for x in runs[r])}
        if a.first_call:
            extra["median_first_call_s"] = statistics.median(x["calls_s"][0] for x in runs[r])
            extra["median_second_call_s"] = statistics.median(x["calls_s"][1] for x in runs[r])
            extra["median_load_and_first_call_s"] = statistics.median(x["seconds"] + x["calls_s"][0]
                                                                      for x in runs[r])
        results.append(common.summarise(r, runs[r], **extra))
    record = {"benchmark": "load", "settings": vars(a) | {"h5": h5, "safetensors": st},
              "machine": common.machine(), "versions": common.versions(), "results": results,
              "ratios": common.ratios(results), "same_weights": len(set(sums.values())) == 1}
    common.write_json(a.json, record)
    extra = {"ratios": record["ratios"], "same_weights": record["same_weights"]}
    if a.first_call:
        extra["first / second call s"] = {x["impl"]: (round(x["median_first_call_s"], 2),
                                                      round(x["median_second_call_s"], 2)) for x in results}
        extra["load + first call s"] = {x["impl"]: round(x["median_load_and_first_call_s"], 2) for x in results}
    print(common.table(results, extra))


if __name__ == "__main__":
    main()
