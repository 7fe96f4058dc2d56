"""Peak memory and wall time of a full-size parity run, against the same run of an earlier revision and
against the larger model's own forward, each in a fresh process.

    python bench/bench_parity_memory.py --ckpt CKPT --h5 H5 [--before REV] [--what unet,txt2img] [--json OUT]

- `unet`: `sdport parity unet CKPT --h5 H5 --mode both --batch 2 --size 64` (fp32, CPU);
- `txt2img`: `sdport parity txt2img CKPT --h5 H5 --prompt ... --steps 4 --height 512 --width 512`;
- `forward`: one ldm UNet forward (batch 2, 4x64x64, 77x768 context) with its weights: the larger
  model of the UNet run and its own peak activations (the bound the UNet run is measured against);
- with `--before REV`, the same commands run from a checkout of REV (a git worktree in a temporary
  directory, imported ahead of the installed sdport);
- `io`: the extra I/O of a run that spills, on its own: `--io-bytes N` (or, by default, the bytes the
  runs measured here spilled) written as 10 MiB datasets to an HDF5 file in the temporary directory, as
  the spill writes them, then read back once, each timed (after the runs, in a process of its own: the
  page cache holds more of it than a run beside its model would).

Peak RSS is the child's `ru_maxrss`; the spill each run wrote is in its report (`spilled_bytes`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORWARD = r"""
import torch, sys
from sdport.parity.reference.load import load_reference
ref, cfg, _ = load_reference("unet", sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randn(2, cfg.in_channels, 64, 64, generator=g)
c = torch.randn(2, 77, cfg.context_dim, generator=g)
with torch.no_grad():
    ref(x, torch.tensor([981, 1]), context=c)
"""

CLI = "import sys; sys.argv[0] = 'sdport'; from sdport.cli import main; main()"


def run(argv: list[str], pythonpath: str | None) -> dict:
    """One fresh process: its wall time and its own peak RSS (os.wait4's rusage)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, *argv], env=env, stdout=so, stderr=se, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    if p.returncode not in (0, 1):
        raise SystemExit(f"{argv}: exit {p.returncode}\n{stderr[-2000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024), "rc": p.returncode,
            "stdout_tail": stdout[-600:]}


def spill_io(nbytes: int) -> dict:
    """Write `nbytes` as 10 MiB float32 datasets into one HDF5 file (as parity/spill.py writes each
    layer's tensors), then read them all back: the wall time of each, in one fresh process."""
    code = r"""
import sys, tempfile, time, h5py, numpy as np, os
n = int(sys.argv[1]); block = np.random.default_rng(0).standard_normal(10 << 18, dtype=np.float32)  # 10 MiB
count = max(1, n // block.nbytes)
with tempfile.TemporaryDirectory(prefix="sdport-bench-io-") as d:
    path = os.path.join(d, "spill.h5")
    t = time.perf_counter()
    with h5py.File(path, "w") as f:
        for i in range(count):
            f.create_dataset(f"{i:06d}", data=block)
    w = time.perf_counter() - t
    t = time.perf_counter()
    with h5py.File(path, "r") as f:
        for i in range(count):
            f[f"{i:06d}"][()]
    r = time.perf_counter() - t
print(count * block.nbytes, round(w, 2), round(r, 2))
"""
    p = subprocess.run([sys.executable, "-c", code, str(nbytes)], capture_output=True, text=True, check=True)
    done, w, r = p.stdout.split()
    return {"bytes": int(done), "write_s": float(w), "read_s": float(r)}


def checkout(rev: str) -> str:
    """A directory holding `sdport` -> a worktree of `rev` (imported ahead of the installed package)."""
    root = tempfile.mkdtemp(prefix="sdport-before-")
    tree = os.path.join(root, "tree")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", tree, rev], check=True, capture_output=True)
    os.symlink(tree, os.path.join(root, "sdport"))
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--h5", required=True)
    ap.add_argument("--before", default=None, help="an earlier revision to measure beside this one")
    ap.add_argument("--what", default="forward,unet,txt2img")
    ap.add_argument("--skip-now", action="store_true", help="measure only the --before revision")
    ap.add_argument("--io-bytes", type=int, default=None, help="bytes for `io` (default: what the runs spilled)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    what = a.what.split(",")
    work = tempfile.mkdtemp(prefix="sdport-bench-parity-")
    cmds = {
        "unet": ["parity", "unet", a.ckpt, "--h5", a.h5, "--mode", "both", "--batch", "2", "--size", "64",
                 "--json", os.path.join(work, "unet.json")],
        "txt2img": ["parity", "txt2img", a.ckpt, "--h5", a.h5, "--prompt", "a red cube", "--steps", "4",
                    "--height", "512", "--width", "512", "--json", os.path.join(work, "txt2img.json")],
    }
    out = {"machine": {"load_average": os.getloadavg(), "cpus": os.cpu_count()}, "results": {}}
    trees = {} if a.skip_now else {"now": None}
    if a.before:
        trees[a.before] = checkout(a.before)
    if "forward" in what:
        out["results"]["forward"] = run(["-c", FORWARD, a.ckpt], None)
        print("forward", out["results"]["forward"]["peak_rss_mib"], "MiB", flush=True)
    for name, path in trees.items():
        for w in ("unet", "txt2img"):
            if w in what:
                r = run(["-c", CLI, *cmds[w]], path)
                try:
                    with open(cmds[w][-1]) as f:
                        rep = json.load(f)
                    steps = [s["report"] for s in rep.get("layers_at_steps", [])]  # txt2img: one per layer step
                    r["spilled_bytes"] = sum(x.get("inputs", {}).get("spilled_bytes") or 0 for x in steps or [rep])
                except (OSError, ValueError):
                    pass
                out["results"][f"{w} ({name})"] = r
                print(w, name, r["peak_rss_mib"], "MiB", r["wall_s"], "s", flush=True)
    if "io" in what:
        n = a.io_bytes or sum(r.get("spilled_bytes") or 0 for r in out["results"].values())
        if n:
            out["results"]["io"] = spill_io(n)
            print("io", out["results"]["io"], flush=True)
    out["machine"]["load_average_after"] = os.getloadavg()
    text = json.dumps(out, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
