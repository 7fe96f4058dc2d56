"""convert/directio.py: every byte lands where it was asked to, whichever path wrote it."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from sdport.convert import directio
from sdport.convert.directio import BLOCK, DataWriter


@pytest.fixture
def small_direct(monkeypatch):
    """Direct writes from 2 blocks up, through a 3-block bounce buffer: many splits on small data."""
    monkeypatch.setattr(directio, "MIN_DIRECT", 2 * BLOCK)
    monkeypatch.setattr(directio, "BOUNCE", 3 * BLOCK)


def _write(path, pieces, size):
    with open(path, "wb") as f:
        f.truncate(size)
    w = DataWriter(str(path))
    try:
        for arr, offset in pieces:
            w.write(arr, offset)
    finally:
        w.close()
    return w


def _pieces(rng, size):
    """Arrays of assorted dtypes and lengths at unaligned offsets, packed back to back with gaps."""
    pieces, offset = [], 17
    for nbytes in (5, BLOCK - 3, 2 * BLOCK, 2 * BLOCK + 1, 7 * BLOCK + 1234, 10 * BLOCK, 3 * BLOCK - 8, 1):
        dtype = np.float32 if nbytes % 4 == 0 else np.uint8
        arr = rng.integers(0, 256, nbytes, dtype=np.uint8).view(dtype)
        if dtype == np.float32:
            arr = arr.reshape(-1, 2) if arr.size % 2 == 0 else arr  # a 2-d array is flattened the same way
        pieces.append((arr, offset))
        offset += nbytes + int(rng.integers(0, 300))
    assert offset < size
    return pieces


def _expected(pieces, size):
    want = bytearray(size)
    for arr, offset in pieces:
        b = np.ascontiguousarray(arr).tobytes()
        want[offset:offset + len(b)] = b
    return bytes(want)


def test_bytes_land_in_place(tmp_path, small_direct):
    rng = np.random.default_rng(0)
    size = 40 * BLOCK
    pieces = _pieces(rng, size)
    _write(tmp_path / "f", pieces, size)
    assert (tmp_path / "f").read_bytes() == _expected(pieces, size)


def test_direct_path_is_taken_where_available(tmp_path, small_direct, monkeypatch):
    """On a file system with O_DIRECT (this one), the aligned middles go through the direct descriptor."""
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this system")
    seen = []
    real = os.pwrite

    def spy(fd, data, offset):
        seen.append((fd, len(data), offset))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * (20 * BLOCK))
    w = DataWriter(str(path))
    if w.direct_fd is None:
        w.close()
        pytest.skip("this file system refuses O_DIRECT")
    direct = w.direct_fd
    w.write(np.ones(8 * BLOCK + 100, np.uint8), 333)
    w.close()
    body = [(n, off) for fd, n, off in seen if fd == direct]
    assert body and all(off % BLOCK == 0 and n % BLOCK == 0 for n, off in body)
    assert sum(n for n, _ in body) == 8 * BLOCK - BLOCK  # the unaligned head and tail cost one block
    assert path.read_bytes()[333:333 + 8 * BLOCK + 100] == b"\1" * (8 * BLOCK + 100)


def test_refused_direct_write_falls_back(tmp_path, small_direct, monkeypatch):
    """EINVAL from a direct write (a device wanting a coarser alignment): the same bytes, buffered."""
    real = os.pwrite
    direct_fds = set()

    def einval_on_direct(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", einval_on_direct)
    rng = np.random.default_rng(1)
    size = 40 * BLOCK
    pieces = _pieces(rng, size)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * size)
    w = DataWriter(str(path))
    direct_fds.add(w.direct_fd)
    for arr, offset in pieces:
        w.write(arr, offset)
    assert w.direct_fd is None  # given up after the first refusal
    w.close()
    assert path.read_bytes() == _expected(pieces, size)


def test_without_o_direct(tmp_path, small_direct, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    rng = np.random.default_rng(2)
    size = 40 * BLOCK
    pieces = _pieces(rng, size)
    w = _write(tmp_path / "f", pieces, size)
    assert w.direct_fd is None
    assert (tmp_path / "f").read_bytes() == _expected(pieces, size)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_write_errors_name_the_file(tmp_path, small_direct, monkeypatch, code):
    """A real write error on either path is raised, naming the file (LayoutWriter reports it in one line)."""
    def fail(fd, data, offset):
        raise OSError(code, os.strerror(code))

    path = tmp_path / "f"
    path.write_bytes(b"\0" * (20 * BLOCK))
    w = DataWriter(str(path))
    monkeypatch.setattr(os, "pwrite", fail)
    for n, offset in ((100, 5), (8 * BLOCK, 0)):  # the buffered path, then (no unaligned head) the direct one
        with pytest.raises(OSError) as e:
            w.write(np.zeros(n, np.uint8), offset)
        assert e.value.errno == code and e.value.filename == str(path)
    monkeypatch.undo()
    w.close()
