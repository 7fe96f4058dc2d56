"""Convert the full checkpoint to HDF5 (checksums included) next to a plain `cp` of the same file.

    python bench/bench_convert.py [--ckpt PATH] [--runs N] [--json OUT]

Both write into the checkpoint's directory (same disk); each conversion runs in its own process so
its peak RSS is its own. The output is verified afterwards (every sha256 recomputed) outside the timing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from subproc import run_child  # noqa: E402

CHILD = r'''
import time
from common import current_rss_mib, peak_rss_mib
base = current_rss_mib()
from sdport.convert.convert import convert
t0 = time.perf_counter()
s = convert({src!r}, {out!r}, force=True)
emit(seconds=time.perf_counter() - t0, bytes_written=s.bytes_written, baseline_rss_mib=base,
     peak_rss_mib=peak_rss_mib(), peak_above_baseline_mib=peak_rss_mib() - base)
'''


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=common.FULL_CKPT)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    d = os.path.dirname(os.path.abspath(a.ckpt))
    out, copy = os.path.join(d, "bench-convert.h5"), os.path.join(d, "bench-cp.tmp")
    cp_s, conv = [], []
    try:
        for i in range(a.runs):
            t0 = time.perf_counter()
            subprocess.run(["cp", a.ckpt, copy], check=True)
            cp_s.append(time.perf_counter() - t0)
            os.remove(copy)
            conv.append(run_child(CHILD.format(src=a.ckpt, out=out)))
            print(f"[run {i + 1}] cp {cp_s[-1]:.2f} s, convert {conv[-1]['seconds']:.2f} s at "
                  f"{conv[-1]['peak_rss_mib']:.0f} MiB peak", file=sys.stderr, flush=True)
        from sdport.models.layout import verify

        problems = verify(out)
    finally:
        for p in (copy,):
            if os.path.exists(p):
                os.remove(p)
    results = [common.summarise("cp", [{"seconds": s} for s in cp_s]), common.summarise("sdport-convert", conv)]
    record = {"benchmark": "convert", "settings": vars(a) | {"file_bytes": os.path.getsize(a.ckpt), "out": out},
              "machine": common.machine(), "versions": common.versions(), "results": results,
              "convert_over_cp": results[1]["median_s"] / results[0]["median_s"],
              "verify_problems": problems}
    common.write_json(a.json, record)
    print(f"cp {results[0]['median_s']:.2f} s; convert {results[1]['median_s']:.2f} s "
          f"({record['convert_over_cp']:.2f}x cp), peak RSS {results[1]['peak_rss_mib']:.0f} MiB; "
          f"verify: {'ok' if not problems else problems[0]}")


if __name__ == "__main__":
    main()
