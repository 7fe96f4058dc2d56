"""What a conversion's bytes cost on this machine: checksums per thread, and writing through or around
the page cache.

    python bench/bench_io.py [--ckpt PATH] [--mib 1024] [--runs 2] [--json OUT]

Checksums (one thread, source in the page cache, `--mib` of it through a memory map): sha256 (the
layout's digests and the source hash), zlib's CRC-32 and zlib-ng's (the zip entries' check); median
of `--runs` after an untimed call.
Writes (the whole file, read through a memory map, 64 MiB per call, then fsync; wall, user and system
seconds of this process): plain `pwrite` through the page cache, against models/directio.DataWriter
(O_DIRECT through a page-aligned buffer where the file system allows it). The output goes next to
the checkpoint and is removed.
"""
from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import resource
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CALL = 64 << 20


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def timed(fn) -> dict:
    (u0, s0), t0 = cpu(), time.perf_counter()
    fn()
    (u1, s1), t1 = cpu(), time.perf_counter()
    return {"seconds": t1 - t0, "user_s": u1 - u0, "sys_s": s1 - s0}


def write_file(src: memoryview, out: str, direct: bool) -> dict:
    import numpy as np

    from sdport.convert.directio import DataWriter, write_all

    with open(out, "wb"):
        pass
    arr = np.frombuffer(src, dtype=np.uint8)

    def run():
        if direct:
            w = DataWriter(out)
            try:
                for off in range(0, len(arr), CALL):
                    w.write(arr[off:off + CALL], off)
            finally:
                w.close()
        else:
            fd = os.open(out, os.O_WRONLY)
            try:
                for off in range(0, len(arr), CALL):
                    write_all(fd, src[off:off + CALL], off)
            finally:
                os.close(fd)
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    try:
        return timed(run)
    finally:
        os.remove(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=common.FULL_CKPT)
    ap.add_argument("--mib", type=int, default=1024, help="bytes per checksum timing")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from zlib_ng import zlib_ng

    rows = []
    with open(a.ckpt, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        src = memoryview(m)
        part = src[: a.mib << 20]
        sums = {"sha256": lambda: hashlib.sha256(part).digest(), "crc32-zlib": lambda: zlib.crc32(part),
                "crc32-zlib-ng": lambda: zlib_ng.crc32(part)}
        for name, fn in sums.items():
            s = common.median_time(fn, a.runs)  # its untimed first call brings the pages in
            rows.append({"impl": name, "median_s": s, "gb_per_s": len(part) / s / 1e9})
            print(f"{name:<14} {len(part) / s / 1e9:6.2f} GB/s (one thread)", flush=True)
        out = os.path.join(os.path.dirname(os.path.abspath(a.ckpt)), "bench-io.tmp")
        for name, direct in (("write-buffered", False), ("write-direct", True)):
            runs = []
            for _ in range(a.runs):
                os.sync()
                runs.append(write_file(src, out, direct))
                r = runs[-1]
                print(f"{name:<14} {r['seconds']:6.2f} s wall, {r['user_s']:.2f} s user, {r['sys_s']:.2f} s sys "
                      f"({len(src) / 1e9:.2f} GB, fsync included)", flush=True)
            rows.append(common.summarise(name, runs) | {"runs": runs})
        del src, part
    common.write_json(a.json, {"benchmark": "io", "settings": vars(a), "machine": common.machine(),
                               "versions": common.versions(), "results": rows})


if __name__ == "__main__":
    main()
