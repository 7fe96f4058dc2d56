"""Dataset bytes to their place in a file, around the page cache where the system allows it.

A buffered write of a full-size checkpoint spends most of its kernel time on the page cache; the same
bytes written with O_DIRECT take a fraction of it (bench/bench_io.py; the figures are in
bench/README.md). O_DIRECT wants the file offset, the length and the memory
address aligned to the device's block, so each write is split: the unaligned head and tail go through
an ordinary descriptor, the aligned middle is copied through a page-aligned buffer and written
directly. Where O_DIRECT is missing (macOS, some file systems) or refused, every byte goes through the
ordinary descriptor, so the file's bytes never depend on which path wrote them.
"""
from __future__ import annotations

import errno
import mmap
import os

import numpy as np

BLOCK = 4096  # the alignment asked of offsets, lengths and memory: a multiple of 512- and 4096-byte sectors
BOUNCE = 8 << 20  # bytes copied and written directly per call
MIN_DIRECT = 1 << 20  # smaller writes go through the page cache: too few aligned blocks to pay for the copy


class DataWriter:
    """pwrite(data, offset) into an open file; not thread-safe (one writer thread owns it)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY)
        self.direct_fd = None
        self._bounce = None
        flag = getattr(os, "O_DIRECT", 0)
        if flag:
            try:
                self.direct_fd = os.open(path, os.O_WRONLY | flag)
            except OSError:  # the file system has no direct I/O (EINVAL): the page cache it is
                self.direct_fd = None

    def write(self, data: np.ndarray, offset: int) -> None:
        """All of `data`'s bytes at `offset`; OSError names the file."""
        view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        try:
            if self.direct_fd is None or len(view) < MIN_DIRECT:
                write_all(self.fd, view, offset)
                return
            head = -offset % BLOCK
            body = (len(view) - head) // BLOCK * BLOCK
            write_all(self.fd, view[:head], offset)
            if not self._write_direct(view[head:head + body], offset + head):
                write_all(self.fd, view[head:head + body], offset + head)
            write_all(self.fd, view[head + body:], offset + head + body)
        except OSError as e:  # name the file, as h5py's errors do, so the caller reports it as a write error
            raise OSError(e.errno, e.strerror, self.path) from None

    def _write_direct(self, view: memoryview, offset: int) -> bool:
        """Aligned blocks through the bounce buffer; False (and direct I/O off) if the system refuses them."""
        if self._bounce is None:
            self._bounce = mmap.mmap(-1, BOUNCE)  # anonymous maps start on a page boundary
        bounce = np.frombuffer(self._bounce, dtype=np.uint8)
        src = np.frombuffer(view, dtype=np.uint8)
        done = 0
        while done < len(src):
            n = min(BOUNCE, len(src) - done)
            np.copyto(bounce[:n], src[done:done + n])  # releases the GIL, as pwrite does
            try:
                write_all(self.direct_fd, memoryview(self._bounce)[:n], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL:  # a real write error (ENOSPC, EIO, EFBIG)
                    raise
                self._close_direct()  # this device wants a coarser alignment: stop trying
                return False
            done += n
        return True

    def _close_direct(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None

    def close(self) -> None:
        self._close_direct()
        self._bounce = None  # unmapped when the last view of it is gone
        os.close(self.fd)


def write_all(fd: int, view: memoryview, offset: int) -> None:
    """pwrite until every byte of `view` is at `offset` (a call may write fewer)."""
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
