"""Giving freed memory back to the system between stages that each hold one model.

A freed model's tensors go back to the C allocator, which keeps much of it for reuse (glibc serves
allocations below its dynamic mmap threshold from heaps it trims only at their top): a full SD v1 UNet
freed after a forward leaves about 1.4 GB resident, and the next model's memory adds to it
(bench/README.md, "txt2img parity within one model's memory"). `release()` collects Python's cycles,
asks glibc to return its free pages (`malloc_trim`) and empties torch's CUDA cache.

Trimming between stages does not help within one: a pass that allocates and frees activations of a few
MiB to tens of MiB, among other allocations that stay, leaves holes in glibc's heaps that still count as
resident, and glibc's mmap threshold grows (up to 32 MiB) as mapped blocks are freed, so more of them
land in the heaps. `map_large_allocations()` fixes the threshold at 1 MiB for the process: every
allocation of that size or more is its own mapping, handed back to the system when freed. The parity
runs call it (a full-size txt2img parity run peaked at 8,061-8,409 MiB without it and 5,936 MiB with
it; bench/README.md).

A fresh mapping is faulted in, and zeroed by the kernel, page by page each time it is allocated. With
4 KiB pages that made the same run slower; importing sdport therefore sets `THP_MEM_ALLOC_ENABLE=1`
(the package's `__init__`), so that torch asks for transparent huge pages on its allocations of 2 MiB
or more, and a forward faults in a tenth as often as with glibc's own heaps
(`bench/bench_mmap_threshold.py`).
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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MAP_FROM = 1 << 20


@functools.lru_cache(maxsize=1)
def map_large_allocations() -> bool:
    """Serve every allocation of MAP_FROM bytes or more from its own mapping, for the rest of the
    process (glibc; setting the threshold also stops glibc from raising it). False where there is no
    glibc `mallopt`, or it refuses."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    except OSError:
        return False
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, MAP_FROM) == 1)


def release() -> None:
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
