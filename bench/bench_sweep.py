"""Sweep throughput: cells per hour on local workers and through Ray, and what each executor adds per cell.

A grid of encoder (or --kind unet) parity cells on the tiny checkpoint, one seed per cell, run by
`parity.sweep.executors.schedule` on each executor in turn. For every cell the driver notes when it was
handed out and when its outcome came back; the worker measures its own run (`seconds`). Per executor:
- wall: from the executor's creation (worker start-up and model loads included) to the last outcome;
- steady cells/hour: cells after the first on each worker, over the time from each worker's first
  outcome to the last one (what a long sweep converges to);
- overhead per cell: turnaround (handed out -> outcome back) minus the worker's own seconds, median:
  serialising the cell and its outcome (the report JSON and HTML travel with it), scheduling, transport.
  The first cell on each worker is left out (it carries the loads).

    python bench/bench_sweep.py [--cells 24] [--kind encoder|unet] [--modes local1,local2,ray2] [--json OUT]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from sdport.parity.sweep import spec as S  # noqa: E402
from sdport.parity.sweep.executors import LocalExecutor, schedule  # noqa: E402

TINY = os.path.join(common.REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")


def make_cells(d: str, kind: str, n: int):
    from sdport.convert.convert import convert

    ckpt = os.path.join(d, "tiny.ckpt")
    shutil.copy(TINY, ckpt)
    convert(ckpt, os.path.join(d, "tiny.h5"))
    path = os.path.join(d, "bench.toml")
    with open(path, "w") as f:
        f.write(f'[checkpoints]\nbase = {{ checkpoint = "tiny.ckpt", h5 = "tiny.h5" }}\n[[run]]\nname = "b"\n'
                f'parity = "{kind}"\n[run.grid]\nseed = {list(range(n))}\n')
    return list(S.load(path).cells)


def measure(make_executor, cells) -> dict:
    t0 = time.perf_counter()
    handed, back, outcomes = {}, {}, {}
    with make_executor() as ex:
        t_ready = None

        def on_start(cell, worker, attempt):
            nonlocal t_ready
            t_ready = t_ready or time.perf_counter()
            handed[cell.id] = time.perf_counter()

        def on_done(cell, out):
            back[cell.id] = time.perf_counter()
            outcomes[cell.id] = out

        schedule(ex, cells, 1, on_start=on_start, on_done=on_done)
        desc = ex.describe()
    end = max(back.values())
    by_worker: dict[str, list[str]] = {}
    for cid in sorted(back, key=back.get):
        by_worker.setdefault(outcomes[cid]["worker"], []).append(cid)
    firsts = {ids[0] for ids in by_worker.values()}
    steady = [cid for cid in back if cid not in firsts]
    t_first = max(back[ids[0]] for ids in by_worker.values())  # every worker has loaded by then
    after = [cid for cid in steady if back[cid] > t_first]
    overhead = [back[c] - handed[c] - outcomes[c]["seconds"] for c in steady]
    return {"executor": desc, "cells": len(cells), "wall_s": end - t0, "startup_s": t_ready - t0,
            "first_cell_s": statistics.median(outcomes[c]["seconds"] for c in firsts),
            "cell_s": statistics.median(outcomes[c]["seconds"] for c in steady) if steady else None,
            "cells_per_hour_wall": 3600 * len(cells) / (end - t0),
            "cells_per_hour_steady": 3600 * len(after) / (end - t_first) if after and end > t_first else None,
            "overhead_per_cell_ms": 1000 * statistics.median(overhead) if overhead else None,
            "report_bytes": statistics.median(len(outcomes[c]["report_json"] or "") + len(outcomes[c]["report_html"] or "")
                                              for c in back),
            "status": sorted({o["status"] for o in outcomes.values()}),
            "cells_s": [outcomes[c]["seconds"] for c in sorted(back, key=back.get)],
            "turnaround_s": [back[c] - handed[c] for c in sorted(back, key=back.get)]}


def executor_for(mode: str):
    if mode.startswith("local"):
        return lambda: LocalExecutor(int(mode[5:]))
    if mode.startswith("ray"):
        import ray

        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, configure_logging=False)
        from sdport.parity.sweep.ray_executor import RayExecutor
        return lambda: RayExecutor(None, workers=int(mode[3:]))
    raise SystemExit(f"--modes: {mode}? (local1, local2, ray2, ...)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=24)
    ap.add_argument("--kind", default="encoder", choices=("encoder", "unet", "decoder", "text_model"))
    ap.add_argument("--modes", default="local1,local2,ray2")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdport-bench-sweep-") as d:
        cells = make_cells(d, a.kind, a.cells)
        for mode in a.modes.split(","):
            load0 = os.getloadavg()[0]
            r = {"mode": mode, **measure(executor_for(mode), cells), "load_average": [load0, os.getloadavg()[0]]}
            rows.append(r)
            f = lambda v, p="{:.3g}": "-" if v is None else p.format(v)  # noqa: E731
            print(f"{mode:7s} {r['executor']:28s} wall {r['wall_s']:.1f} s (start-up {r['startup_s']:.1f} s), "
                  f"first cell {r['first_cell_s']:.2f} s, then {f(r['cell_s'])} s; cells/h {r['cells_per_hour_wall']:.0f} "
                  f"wall, {f(r['cells_per_hour_steady'], '{:.0f}')} steady; overhead/cell {f(r['overhead_per_cell_ms'])} ms; "
                  f"reports {r['report_bytes'] / 1024:.0f} KiB/cell; load {r['load_average'][0]:.1f}..{r['load_average'][1]:.1f}",
                  flush=True)
    if a.json:
        common.write_json(a.json, {"benchmark": "sweep", "settings": vars(a), "machine": common.machine(),
                                   "versions": common.versions(), "results": rows})


if __name__ == "__main__":
    main()
