"""Giving freed memory back to the system between stages that each hold one model.

A freed model's tensors go back to the C allocator, which keeps much of it for reuse (glibc serves
allocations below its dynamic mmap threshold from heaps it trims only at their top): a full SD v1 UNet
freed after a forward leaves about 1.4 GB resident, and the next model's memory adds to it
(bench/README.md, "txt2img parity within one model's memory"). `release()` collects Python's cycles,
asks glibc to return its free pages (`malloc_trim`) and empties torch's CUDA cache.

Trimming between stages does not reach a peak within one: a pass that allocates and frees activations
of a few MiB to tens of MiB, among allocations that stay, leaves holes in glibc's heaps that still count
as resident. Importing sdport sets `THP_MEM_ALLOC_ENABLE=1` (the package's `__init__`), so that torch
asks for transparent huge pages on its allocations of 2 MiB or more; with it a full-size txt2img parity
run stays within a few percent of one UNet forward's peak, and runs faster. Fixing glibc's mmap threshold
low instead (`mallopt`) held the peak as well but cost wall time: every freed block handed back, every
new one zeroed again. The figures and their commands: bench/README.md, "What the mapped
allocations cost, and huge pages" (`bench/bench_mmap_threshold.py`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:  # no C library by that name (musl, macOS: nothing to trim this way)
        return None


def release() -> None:
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
