"""Copy-on-write numpy views of byte ranges of one open file, cut from one memory map of the whole file.

Why one map: Python's mmap.mmap duplicates the file descriptor for every map it makes, and each
duplicate kept open has a cost, paid 638 times for the full UNet (bench/README.md, "One map per
file", has the figures). One map of the whole file costs one call.

What a map per dataset gave for free is kept: when a view dies (its tensor was cast, moved or packed),
the pages that lie wholly inside its range are handed back with madvise(MADV_DONTNEED), as unmapping
would have done. Pages shared with a neighbouring dataset stay until every view is gone.

A range is cut from the shared map once. A range that overlaps one already cut (the same dataset asked
for twice, or a crafted file whose datasets share bytes) gets a map of its own. So no two views alias,
dropping one view's pages never throws away another's copy-on-write changes, and a view never shows
bytes written through an earlier view into a page they shared.
"""
from __future__ import annotations

import bisect
import math
import mmap
import threading
import weakref

import numpy as np

PAGE = mmap.PAGESIZE


class _Whole(mmap.mmap):
    """The whole-file map. Every view holds it (through a memoryview), and it holds its FileMap, so the
    bookkeeping that hands back a dead view's pages lives as long as any view does, whatever became
    of the reader that made them. The FileMap holds it weakly: when the last view dies it is unmapped
    and its duplicate of the file descriptor closed (HDF5's lock on the file goes with it)."""

    owner: "FileMap"


def own_map(fd: int, offset: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """A copy-on-write map of this one range; unmapped when the array dies."""
    count = math.prod(shape)
    skip = offset % mmap.ALLOCATIONGRANULARITY  # a map starts on a page boundary
    mm = mmap.mmap(fd, skip + count * dtype.itemsize, access=mmap.ACCESS_COPY, offset=offset - skip)
    return np.frombuffer(mm, dtype=dtype, count=count, offset=skip).reshape(shape)


class FileMap:
    """Views into `fd` (a file of `size` bytes that stays open for as long as this object is used)."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self._mm = None  # a weak reference to the whole-file map while any view lives; False once mapping failed
        self._starts: list[int] = []  # [start, end) of every range cut from the current map, sorted
        self._ends: list[int] = []
        self._views: dict[int, tuple] = {}  # id of a weak reference to a live view -> (the reference, its range)
        self._lock = threading.Lock()

    def view(self, offset: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
        """The `shape` array of `dtype` stored at byte `offset`; ValueError when it runs past the file's end."""
        count = math.prod(shape)
        end = offset + count * dtype.itemsize
        if offset < 0 or end > self.size:
            raise ValueError(f"data at bytes {offset}-{end} runs past the end of the file ({self.size} bytes)")
        if count == 0:
            return np.empty(shape, dtype)
        with self._lock:
            mm = self._whole()
            i = bisect.bisect_right(self._starts, offset)
            free = (mm is not None and not (i and self._ends[i - 1] > offset)
                    and not (i < len(self._starts) and self._starts[i] < end))
            if free:
                self._starts.insert(i, offset)
                self._ends.insert(i, end)
        if not free:  # no whole-file map, or the range overlaps one already cut from it
            return own_map(self.fd, offset, dtype, shape)
        arr = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)
        # The callback runs in whichever thread drops the last reference, possibly inside the locked
        # block above (a GC pass), so it takes no lock.
        ref = weakref.ref(arr, self._died)  # kept here: a weak reference that dies calls nothing
        self._views[id(ref)] = (ref, offset, end)
        return arr

    def _whole(self) -> _Whole | None:
        """The whole-file map, made again if every view of the last one died (called with the lock held)."""
        mm = self._mm() if self._mm else None
        if mm is None and self._mm is not False:
            try:
                mm = _Whole(self.fd, self.size, access=mmap.ACCESS_COPY)
            except (OSError, ValueError, OverflowError):
                # e.g. strict overcommit refusing one copy-on-write map the size of the file
                self._mm = False
                return None
            mm.owner = self
            self._mm = weakref.ref(mm)
            self._starts, self._ends = [], []  # nothing was written through a fresh map
        return mm

    def _died(self, ref: weakref.ref) -> None:
        _, start, end = self._views.pop(id(ref))
        lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE  # pages wholly inside the range
        if hi > lo:
            mm = self._mm()  # alive: the dying view's memoryview still holds it
            try:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (AttributeError, OSError, ValueError):
                pass  # the pages stay mapped until the map goes: memory, never correctness
