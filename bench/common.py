"""Shared pieces of the benchmarks: weights on disk, machine facts, peak RSS, interleaved workers.

Every implementation runs in its own worker process (so `ru_maxrss` is its own peak), but the parent
alternates the timed calls between workers - one runs at a time - so a burst of load on a shared
machine hits every implementation alike. Medians after a warm-up; ratios are what to read.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
DATA = os.environ.get("SDPORT_BENCH_DATA", "/work/bench-data")  # full-size files live outside the repo
FULL_CKPT = os.path.join(DATA, "sd-full.ckpt")
TINY_DIR = os.path.join(tempfile.gettempdir(), "sdport-bench-tiny")

# The full SD v1 UNet (batch 2, 64x64) costs 1.61 TFLOP per call; the 2-core EPYC's measured GEMM
# throughput (4096^2 GEMMs, 186 GFLOP/s fp32 and 394 bf16, `python bench/bench_dtypes.py`) puts one call
# at 8.6 s / 4.1 s at best.
UNET_FLOOR_S = {"fp32": 8.6, "bf16": 4.1}


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str = "cpu") -> dict:
    import torch

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    out = {}
    for name in ("torch", "numpy", "h5py", "diffusers", "transformers", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # a missing optional package is reported as such, not fatal
            out[name] = None
    out["ldm"] = "stable-diffusion-sdkit 2.1.5" if _has("ldm") else None
    return out


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def checkpoint_for(size: str) -> str:
    """The CompVis checkpoint of `size`: the tiny one is built on demand, the full one must exist."""
    if size == "full":
        if not os.path.exists(FULL_CKPT):
            sys.exit(f"error: {FULL_CKPT} not found; build it with\n"
                     f"  python -m sdport.fixtures.build --size full --variants lightning --out {DATA}")
        return FULL_CKPT
    path = os.path.join(TINY_DIR, "sd-tiny.ckpt")
    if not os.path.exists(path):
        from sdport.fixtures.build import build_variant

        build_variant("lightning", TINY_DIR, "tiny")
    return path


def h5_for(ckpt: str) -> str:
    """The sdport .h5 converted from `ckpt` (converted once, next to it)."""
    out = os.path.splitext(ckpt)[0] + ".h5"
    if not os.path.exists(out):
        from sdport.convert.convert import convert

        convert(ckpt, out)
    return out


def median_time(fn, runs: int) -> float:
    """Median wall time of `runs` calls of `fn` after one untimed warm-up call (kernels, allocator)."""
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def summarise(impl: str, runs, **extra) -> dict:
    """One record of a benchmark's `results` list from its timed runs, each a dict with "seconds" and,
    where measured, "peak_rss_mib" / "peak_above_baseline_mib" (what a `run_child` snippet emits):
    impl, median_s, runs_s, peak_rss_mib (the worst run; None when not measured), peak_above_baseline_mib
    (when measured), then `extra` (figures measured outside the runs, e.g. a worker's peak at exit)."""
    runs = list(runs)

    def worst(key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return round(max(vals), 1) if vals else None

    record = {"impl": impl, "median_s": statistics.median(r["seconds"] for r in runs),
              "runs_s": [r["seconds"] for r in runs], "peak_rss_mib": worst("peak_rss_mib")}
    above = worst("peak_above_baseline_mib")
    if above is not None:
        record["peak_above_baseline_mib"] = above
    return record | extra


class Worker:
    """A child process holding one implementation; `run()` times one call in it."""

    def __init__(self, impl: str, args: list[str]):
        self.impl = impl
        cmd = [sys.executable, os.path.join(BENCH, "worker.py"), "--impl", impl, *args]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._reply()  # {"load_s", "rss_mib"}

    def _reply(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.impl} worker died (exit {self.p.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._reply()

    def run(self) -> float:
        return self.ask("run")["s"]

    def close(self, out_path: str | None = None) -> dict:
        r = self.ask("quit " + (out_path or "-"))
        self.p.wait()
        return r


def interleaved(impls: list[str], worker_args: dict[str, list[str]], runs: int, outdir: str,
                warmup: int = 1) -> tuple[list[dict], dict]:
    """Start one worker per impl (one after another), warm each up, then alternate timed calls.

    Returns (results, outputs): records as in the JSON `results` list, and impl -> the path of its last
    output, saved in `outdir`.
    """
    workers = []
    for impl in impls:
        print(f"[{impl}] loading ...", file=sys.stderr, flush=True)
        w = Worker(impl, worker_args[impl])
        print(f"[{impl}] loaded in {w.ready['load_s']:.2f} s, RSS {w.ready['rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
        workers.append(w)
    for w in workers:
        for _ in range(warmup):
            s = w.run()
            print(f"[{w.impl}] warm-up {s:.2f} s", file=sys.stderr, flush=True)
    times = {w.impl: [] for w in workers}
    for r in range(runs):
        order = workers if r % 2 == 0 else workers[::-1]  # no impl always runs right after the same one
        for w in order:
            s = w.run()
            times[w.impl].append(s)
            print(f"[{w.impl}] run {r + 1}: {s:.2f} s", file=sys.stderr, flush=True)
    results, outputs = [], {}
    for w in workers:
        outputs[w.impl] = os.path.join(outdir, f"{w.impl}.pt")
        end = w.close(outputs[w.impl])
        # The worker's peak covers its whole life (load and every run): one figure, taken at exit.
        results.append(summarise(w.impl, [{"seconds": s} for s in times[w.impl]],
                                 peak_rss_mib=round(end["peak_rss_mib"], 1), load_s=round(w.ready["load_s"], 3),
                                 **{k: v for k, v in end.items() if k != "peak_rss_mib"}))
    return results, outputs


def agreement(outputs: dict[str, str], reference: str) -> dict:
    """max_abs and rel_l2 of every impl's output against `reference`'s (fp32 comparison)."""
    import torch

    if reference not in outputs:
        return {}
    ref = torch.load(outputs[reference]).double()
    out = {}
    for impl, path in outputs.items():
        if impl == reference:
            continue
        a = torch.load(path).double()
        out[f"{impl}_vs_{reference}"] = {
            "max_abs": float((a - ref).abs().max()),
            "rel_l2": float((a - ref).norm() / ref.norm().clamp_min(1e-30)),
        }
    return out


def ratios(results: list[dict], floor_s: float | None = None) -> dict:
    by = {r["impl"]: r["median_s"] for r in results}
    out = {}
    for a in by:
        for b in by:
            if a != b:
                out[f"{a}/{b}"] = round(by[a] / by[b], 3)
    if floor_s:
        out.update({f"{a}_fraction_of_floor": round(floor_s / s, 3) for a, s in by.items()})
    return out


def table(results: list[dict], extra: dict | None = None) -> str:
    lines = [f"{'impl':<16}{'median s':>10}{'runs':>28}{'peak RSS MiB':>14}"]
    for r in results:
        runs = " ".join(f"{s:.2f}" for s in r["runs_s"])
        lines.append(f"{r['impl']:<16}{r['median_s']:>10.3f}{runs:>28}{r['peak_rss_mib']:>14.0f}")
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def write_json(path: str | None, record: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
