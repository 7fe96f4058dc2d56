"""bf16 softmax attention on the CPU through a small C kernel (models/cpu/attention_bf16.c).

torch's CPU `scaled_dot_product_attention` runs bf16 at its fp32 speed, and in the bf16 UNet the
64x64-level self-attention was a third of the forward. The kernel multiplies bf16 pairs with AVX512-BF16
and keeps scores and softmax in fp32, so its error against fp32 attention equals SDPA's
(bench/bench_attention.py). It is compiled on first use with the system's C compiler into
`$SDPORT_CACHE` (default `~/.cache/sdport`), named by the hash of its source and flags.

Where it cannot run (no AVX512-BF16, no compiler, not Linux, a failed build) or is switched off with
`SDPORT_BF16_ATTENTION=sdpa`, `attention` is torch's SDPA; `reason()` says why.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_bf16.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
         "-fPIC", "-shared"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
ENV = "SDPORT_BF16_ATTENTION"  # "native" (default) or "sdpa"

_reason = "not tried yet"


def _cache_dir() -> str:
    return os.environ.get("SDPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sdport")


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return all(x in flags for x in CPU_FLAGS)
    except OSError:
        pass
    return False


def _build(cc: list[str]) -> str:
    """Path of the compiled library, built (atomically) unless the cache has it."""
    src = open(SOURCE, "rb").read()
    tag = hashlib.sha256(src + " ".join([*cc, *FLAGS]).encode()).hexdigest()[:16]
    out = os.path.join(_cache_dir(), f"attention_bf16-{tag}.so")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
        os.close(fd)
        try:
            subprocess.run([*cc, *FLAGS, "-o", tmp, SOURCE], check=True, capture_output=True, timeout=120)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return out


@functools.lru_cache(maxsize=None)
def _kernel():
    """The C function, or None (with `_reason` saying why)."""
    global _reason
    if os.environ.get(ENV, "native") == "sdpa":
        _reason = f"{ENV}=sdpa"
        return None
    if not _cpu_has_bf16():
        _reason = f"this CPU lacks one of {', '.join(CPU_FLAGS)} (or is not Linux)"
        return None
    cc = shlex.split(os.environ.get("CC") or "") or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not cc:
        _reason = "no C compiler (cc, gcc or $CC)"
        return None
    try:
        fn = ctypes.CDLL(_build(cc)).sdport_attention_bf16  # CDLL: the GIL is released during calls
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        why = (detail.decode(errors="replace") or str(e)).strip()[:200]
        _reason = f"building {os.path.basename(SOURCE)} failed: {why}"
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, p, p, p, p, p, p, i, i, i, i, ctypes.c_float, i, i]
    fn.restype = ctypes.c_int
    _reason = "native"
    return fn


def available() -> bool:
    return _kernel() is not None


def reason() -> str:
    """'native' when the kernel is in use, else why not."""
    _kernel()
    return _reason


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    # One per process: a forked child inherits the parent's executor without its threads.
    pid = os.getpid()
    if pid not in _pools:
        _pools[pid] = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="sdport-attention")
    return _pools[pid]


def _applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16
            and q.device.type == k.device.type == v.device.type == "cpu"
            and q.layout == k.layout == v.layout == torch.strided and q.dim() == 4
            and k.dim() == 4 and v.dim() == 4 and q.shape[0] == k.shape[0] == v.shape[0]
            and q.shape[1] == k.shape[1] == v.shape[1] and q.shape[3] == k.shape[3] == v.shape[3]
            and k.shape[2] == v.shape[2] and min(q.shape[2], k.shape[2], q.shape[3]) > 0
            and q.stride(3) == k.stride(3) == v.stride(3) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            # a trace or a compiled graph would record torch.empty and not what the C call writes into it
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v for q [B, h, N, d], k/v [B, h, M, d]; the native kernel for CPU bf16
    inputs (any strides, last dim contiguous), torch's SDPA otherwise."""
    fn = _kernel() if _applies(q, k, v) else None
    if fn is None:
        return F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = q.shape
    out = torch.empty(b, n, h, d, dtype=q.dtype).permute(0, 2, 1, 3)  # [B, N, h, d] viewed as [B, h, N, d]

    def strides(t):
        return (ctypes.c_int64 * 3)(t.stride(0), t.stride(1), t.stride(2))

    qs, ks, vs, os_ = strides(q), strides(k), strides(v), strides(out)
    heads, m, scale = b * h, k.shape[2], ctypes.c_float(d ** -0.5)
    threads = max(1, torch.get_num_threads())
    if heads >= threads:  # whole heads per thread
        spans = [(0, n, i * heads // threads, (i + 1) * heads // threads) for i in range(threads)]
    else:  # fewer heads than threads (batch 1 on a many-core machine): query rows split, same math per row
        parts = min(threads, n)
        spans = [(i * n // parts, (i + 1) * n // parts, 0, heads) for i in range(parts)]

    def run(span):
        r0, r1, bh0, bh1 = span  # rows [r0, r1) of heads [bh0, bh1); bf16 elements are 2 bytes
        return fn(q.data_ptr() + 2 * r0 * q.stride(2), qs, k.data_ptr(), ks, v.data_ptr(), vs,
                  out.data_ptr() + 2 * r0 * out.stride(2), os_, h, r1 - r0, m, d, scale, bh0, bh1)

    with torch.profiler.record_function("sdport::attention_bf16"):  # named in profiles like a torch op
        codes = [run(spans[0])] if len(spans) == 1 else list(_pool().map(run, spans))
    if any(codes):
        raise MemoryError("bf16 attention: the kernel could not allocate its work buffers")
    return out
