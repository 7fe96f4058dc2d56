"""Convert the full checkpoint to HDF5 (checksums included) next to a plain `cp` of the same file.

    python bench/bench_convert.py [--ckpt PATH] [--runs N] [--cache warm|cold] [--json OUT]

Both write into the checkpoint's directory (same disk); each conversion runs in its own process so
its peak RSS is its own. Three timings per run: `cp`, `cp` then `sync` of the copy (the conversion
fsyncs its output before the rename that publishes it, so this is the like-for-like copy), and the
conversion. `--cache cold` evicts the source file from the page cache before each of them
(posix_fadvise DONTNEED, after a sync so no dirty pages are left to flush), so all three read it from
the disk; `warm` reads it from memory. The output is verified afterwards (every sha256 recomputed)
outside the timing.
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
    ap.add_argument("--cache", choices=["warm", "cold"], default="warm",
                    help="read the source from the page cache (warm) or from the disk (cold)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    d = os.path.dirname(os.path.abspath(a.ckpt))
    out, copy = os.path.join(d, "bench-convert.h5"), os.path.join(d, "bench-cp.tmp")
    cp_s, cp_sync_s, conv = [], [], []

    def prepare():
        for p in (copy, out):
            if os.path.exists(p):
                os.remove(p)
        os.sync()  # earlier runs' dirty pages must not be flushed inside the next timing
        if a.cache == "cold":
            evict(a.ckpt)
        else:
            warm(a.ckpt)

    def timed(cmd):
        prepare()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        return time.perf_counter() - t0

    try:
        for i in range(a.runs):
            cp_s.append(timed(["cp", a.ckpt, copy]))
            cp_sync_s.append(timed(["sh", "-c", 'cp "$0" "$1" && sync "$1"', a.ckpt, copy]))
            prepare()
            conv.append(run_child(CHILD.format(src=a.ckpt, out=out)))
            print(f"[run {i + 1}, {a.cache}] cp {cp_s[-1]:.2f} s, cp + sync {cp_sync_s[-1]:.2f} s, convert "
                  f"{conv[-1]['seconds']:.2f} s at {conv[-1]['peak_rss_mib']:.0f} MiB peak", file=sys.stderr,
                  flush=True)
        from sdport.models.storage.layout import verify

        problems = verify(out)
    finally:
        for p in (copy, out):  # 4 GB each: left behind, they would crowd the page cache of later benchmarks
            if os.path.exists(p):
                os.remove(p)
    results = [common.summarise("cp", [{"seconds": s} for s in cp_s]),
               common.summarise("cp+sync", [{"seconds": s} for s in cp_sync_s]),
               common.summarise("sdport-convert", conv)]
    cp, cp_sync, cv = (r["median_s"] for r in results)
    record = {"benchmark": "convert", "settings": vars(a) | {"file_bytes": os.path.getsize(a.ckpt), "out": out},
              "machine": common.machine(), "versions": common.versions(), "results": results,
              "convert_over_cp": cv / cp, "convert_over_cp_sync": cv / cp_sync, "verify_problems": problems}
    common.write_json(a.json, record)
    print(f"{a.cache} cache: cp {cp:.2f} s, cp + sync {cp_sync:.2f} s; convert {cv:.2f} s ({cv / cp:.2f}x cp, "
          f"{cv / cp_sync:.2f}x cp + sync), peak RSS {results[2]['peak_rss_mib']:.0f} MiB; "
          f"verify: {'ok' if not problems else problems[0]}")


def evict(path: str) -> None:
    """Drop the file's pages from the page cache (clean pages only: call after a sync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str, chunk: int = 1 << 24) -> None:
    """Read the file once so it is in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass


if __name__ == "__main__":
    main()
