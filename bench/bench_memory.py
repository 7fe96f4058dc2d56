"""Peak memory of one UNet forward against the attention query-chunk size (`UNet.set_attention_chunk`).

    python bench/bench_memory.py [--size full|tiny] [--dtype fp32|bf16] [--chunks none,4096,2048,1024,512,256]
                                 [--batch 2] [--latent N] [--no-kernel] [--json OUT]

For each chunk size a fresh process loads the UNet from the .h5 (`load_model`), sets the chunk, and runs
one forward in inference mode (batch 2, 4x64x64 latents, 77x768 context at full size). It reports the
RSS after load, the peak RSS during the forward (the kernel's peak counter, VmHWM, reset after loading
through /proc/self/clear_refs, so the load's own peak does not hide the forward's), the activation peak
= forward peak - after-load RSS, the time of that one (first) call, and the output's rel_l2 against the
unchunked output (chunking is the same math per query row).

Unless --no-kernel, the attention kernel alone is measured too at the UNet's largest self-attention
shape (batch x heads x 4096 x 40 at full size): `attend` (torch's scaled_dot_product_attention, which
on a CPU is a flash kernel that never holds the whole score matrix) and, for comparison, the textbook
softmax(q k^T) v that materialises a [chunk, tokens] score matrix per head.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from subproc import run_child  # noqa: E402

CHUNKS = "none,4096,2048,1024,512,256"

# Shared by both children: RSS figures from /proc and the peak counter reset.
PROC = r'''
import resource
def status():
    out = {{}}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024  # kB -> MiB
    return out
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS (Linux >= 4.0)
def ru_maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
'''

UNET_CHILD = PROC + r'''
import time, torch
from sdport.models.cpu import pack
from sdport.models.load import load_model
from sdport.models.storage.layout import LayoutReader
h5, dtype, chunk, batch, latent, ref = {h5!r}, {dtype!r}, {chunk!r}, {batch!r}, {latent!r}, {ref!r}
base = status()
t0 = time.perf_counter()
m = load_model(h5, "unet", dtype=dtype)
pack.pack_all(m)  # "after load" holds every weight in the layout the forward uses
load_s = time.perf_counter() - t0
m.set_attention_chunk(chunk)
cfg = m.config
g = torch.Generator().manual_seed(0)  # the inputs of bench/worker.py
x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
c = torch.randn(batch, 77, cfg.context_dim, generator=g)
t = torch.full((batch,), 981, dtype=torch.long)
x, c = x.to(m.conv_in.weight.dtype), c.to(m.conv_in.weight.dtype)
load_peak = ru_maxrss_mib()
after = status()
reset_peak()
with torch.inference_mode():
    t1 = time.perf_counter()
    out = m(x, t, c)
    forward_s = time.perf_counter() - t1
fwd = status()
ru = ru_maxrss_mib()
out = out.float()
rec = dict(load_s=load_s, forward_s=forward_s, baseline_rss_mib=base["VmRSS"], after_load_rss_mib=after["VmRSS"],
           after_load_anon_mib=after["RssAnon"], after_load_file_mib=after["RssFile"], load_peak_rss_mib=load_peak,
           forward_peak_rss_mib=fwd["VmHWM"], activation_peak_mib=fwd["VmHWM"] - after["VmRSS"],
           after_forward_rss_mib=fwd["VmRSS"], ru_maxrss_mib=ru)
if chunk is None:
    torch.save(out, ref)
    rec.update(rel_l2=0.0, max_abs=0.0)
else:
    r = torch.load(ref).double()
    d = out.double() - r
    rec.update(rel_l2=float(d.norm() / r.norm()), max_abs=float(d.abs().max()))
emit(**rec)
'''

KERNEL_CHILD = PROC + r'''
import time, torch
from sdport.models.unet import attend
shape, dtype, chunk, kind, ref = {shape!r}, {dtype!r}, {chunk!r}, {kind!r}, {ref!r}
dt = {{"fp32": torch.float32, "bf16": torch.bfloat16}}[dtype]
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(*shape, generator=g).to(dt) for _ in range(3))  # [B, h, N, d] each

def textbook(q, k, v):
    """softmax(q k^T / sqrt(d)) v, one [B, h, chunk, N] score matrix at a time."""
    n, step = q.shape[2], chunk or q.shape[2]
    out = torch.empty_like(q)
    for i in range(0, n, step):
        s = (q[:, :, i : i + step] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, h, step, N]
        out[:, :, i : i + step] = s.softmax(-1) @ v
    return out

fn = (lambda: attend(q, k, v, chunk)) if kind == "sdpa" else (lambda: textbook(q, k, v))
after = status()
reset_peak()
with torch.inference_mode():
    t1 = time.perf_counter()
    out = fn()
    s = time.perf_counter() - t1
fwd = status()
rec = dict(seconds=s, after_inputs_rss_mib=after["VmRSS"], peak_rss_mib=fwd["VmHWM"],
           peak_above_inputs_mib=fwd["VmHWM"] - after["VmRSS"])
if ref:
    if chunk is None and kind == "sdpa":
        torch.save(out.float(), ref)
        rec["rel_l2"] = 0.0
    else:
        r = torch.load(ref).double()
        rec["rel_l2"] = float((out.double() - r).norm() / r.norm())
emit(**rec)
'''


def parse_chunks(text: str) -> list[int | None]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "none":
            out.append(None)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            sys.exit(f"error: --chunks {text}: expected 'none' or integers >= 1, got {part!r}")
    if None in out:  # the unchunked output is the reference: run it first
        out.remove(None)
    return [None] + out


def attention_shape(h5: str, batch: int, latent: int) -> tuple[int, int, int, int]:
    """[B, heads, tokens, head_dim] of the first (largest) self-attention."""
    from sdport.models.storage.layout import LayoutReader

    with LayoutReader(h5) as r:
        cfg = r.config("unet")
    return (batch, cfg["num_heads"], latent * latent, cfg["model_channels"] // cfg["num_heads"])


def unet_table(results: list[dict]) -> str:
    lines = [f"{'chunk':>6}{'after load MiB':>16}{'fwd peak MiB':>14}{'activations MiB':>17}"
             f"{'forward s':>11}{'rel_l2':>10}"]
    for r in results:
        lines.append(f"{str(r['chunk']):>6}{r['after_load_rss_mib']:>16.0f}{r['forward_peak_rss_mib']:>14.0f}"
                     f"{r['activation_peak_mib']:>17.0f}{r['forward_s']:>11.2f}{r['rel_l2']:>10.1e}")
    return "\n".join(lines)


def kernel_table(results: list[dict]) -> str:
    lines = [f"{'kernel':>9}{'chunk':>7}{'peak above inputs MiB':>23}{'seconds':>9}{'rel_l2':>10}"]
    for r in results:
        lines.append(f"{r['kernel']:>9}{str(r['chunk']):>7}{r['peak_above_inputs_mib']:>23.0f}"
                     f"{r['seconds']:>9.3f}{r['rel_l2']:>10.1e}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--chunks", default=CHUNKS, help="comma list of query-chunk sizes; 'none' = unchunked")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 64 full, 16 tiny)")
    ap.add_argument("--no-kernel", action="store_true", help="skip the attention-kernel-alone measurements")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    latent = a.latent or (64 if a.size == "full" else 16)
    chunks = parse_chunks(a.chunks)
    h5 = common.h5_for(common.checkpoint_for(a.size))
    with tempfile.TemporaryDirectory(prefix="sdport-bench-memory-") as tmp:  # reference outputs for rel_l2
        results, kernel = measure(a, h5, chunks, latent, tmp)
    record = {"benchmark": "memory", "settings": vars(a) | {"latent": latent, "h5": h5, "chunks": chunks},
              "machine": common.machine(), "versions": common.versions(), "results": results,
              "attention_kernel": kernel}
    common.write_json(a.json, record)
    print(f"UNet {a.size} {a.dtype}, batch {a.batch}, {latent}x{latent} latents; one forward per fresh process "
          f"(first call; the machine may be shared, so read the seconds loosely)")
    print(unet_table(results))
    if kernel:
        print(f"attention kernel alone, {'x'.join(map(str, kernel[0]['shape']))} {a.dtype}")
        print(kernel_table(kernel))
    return record


def measure(a, h5: str, chunks: list, latent: int, tmp: str) -> tuple[list[dict], list[dict]]:
    """The UNet rows, then the attention-kernel rows, each from a fresh process."""
    ref = os.path.join(tmp, "unchunked.pt")

    results = []
    for chunk in chunks:
        r = run_child(UNET_CHILD.format(h5=h5, dtype=a.dtype, chunk=chunk, batch=a.batch, latent=latent, ref=ref))
        r = {"chunk": chunk} | {k: round(v, 1) if k.endswith(("_mib", "_s")) else v for k, v in r.items()}
        results.append(r)
        print(f"[chunk {chunk}] after load {r['after_load_rss_mib']:.0f} MiB, forward peak "
              f"{r['forward_peak_rss_mib']:.0f} MiB (+{r['activation_peak_mib']:.0f}), {r['forward_s']:.2f} s, "
              f"rel_l2 {r['rel_l2']:.1e}", file=sys.stderr, flush=True)

    kernel = []
    if not a.no_kernel:
        shape = attention_shape(h5, a.batch, latent)
        kref = os.path.join(tmp, "attention.pt")
        for kind in ("sdpa", "textbook"):
            for chunk in chunks:
                r = run_child(KERNEL_CHILD.format(shape=shape, dtype=a.dtype, chunk=chunk, kind=kind, ref=kref))
                kernel.append({"kernel": kind, "chunk": chunk, "shape": list(shape)}
                              | {k: round(v, 4) if k == "seconds" else round(v, 1) if k.endswith("_mib") else v
                                 for k, v in r.items()})
                print(f"[{kind} chunk {chunk}] peak above inputs {kernel[-1]['peak_above_inputs_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
    return results, kernel


if __name__ == "__main__":
    main()
