"""models/storage/filemap.py: views hold the file's bytes, stay private, never alias, and give their pages back."""
from __future__ import annotations

import gc
import os
import shutil
import struct
import sys
import threading

import h5py
import numpy as np
import pytest
import torch

from sdport.models.storage import filemap
from sdport.models.errors import BadFile, LayoutError, SdportError
from sdport.models.storage.filemap import PAGE, FileMap
from sdport.models.storage.layout import LayoutReader

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
F4, U4 = np.dtype("<f4"), np.dtype("<u4")


@pytest.fixture
def data_file(tmp_path):
    """A 16 MiB + 123 byte file of random float32 bytes, open read-only: (fd, the bytes)."""
    data = np.random.default_rng(0).integers(0, 256, (16 << 20) + 123, dtype=np.uint8)
    path = tmp_path / "data.bin"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def _expect(data, offset, shape, dtype=F4):
    n = int(np.prod(shape)) * dtype.itemsize
    return data[offset:offset + n].view(dtype).reshape(shape)


def _mapping_rss_kib(addr: int) -> int:
    """Resident KiB of the mapping of this process that holds `addr` (0 when none does)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    return 0


def _base_address(arr: np.ndarray, offset: int) -> int:
    return arr.__array_interface__["data"][0] - offset


def test_views_hold_the_files_bytes_at_any_offset(data_file):
    fd, data = data_file
    fm = FileMap(fd, data.size)
    for offset, shape, dtype in [(0, (4,), F4), (3, (5, 7), F4), (PAGE - 1, (3 * PAGE,), np.dtype("u1")),
                                 (1 << 20, (256, 1024), F4), (data.size - 8, (2,), np.dtype("<u4"))]:
        v = fm.view(offset, dtype, shape)
        assert v.shape == shape and v.dtype == dtype
        np.testing.assert_array_equal(v, _expect(data, offset, shape, dtype))


def test_writes_are_private_and_views_never_alias(data_file):
    fd, data = data_file
    fm = FileMap(fd, data.size)
    a = fm.view(4096, F4, (1024,))
    b = fm.view(4096, F4, (1024,))  # the same range again
    c = fm.view(4096 + 2048, F4, (1024,))  # half over a
    a[:] = 7.0
    np.testing.assert_array_equal(b, _expect(data, 4096, (1024,)))
    np.testing.assert_array_equal(c, _expect(data, 4096 + 2048, (1024,)))
    d = FileMap(fd, data.size).view(4096, F4, (1024,))  # the file itself is untouched
    np.testing.assert_array_equal(d, _expect(data, 4096, (1024,)))
    # Neighbours that only share a page are one map: each keeps its own bytes.
    e = fm.view(4096 * 3, F4, (10,))
    f = fm.view(4096 * 3 + 40, F4, (10,))
    e[:] = 1.0
    np.testing.assert_array_equal(f, _expect(data, 4096 * 3 + 40, (10,)))


def test_past_the_end_is_a_value_error(data_file):
    fd, data = data_file
    fm = FileMap(fd, data.size)
    with pytest.raises(ValueError, match=rf"runs past the end of the file \({data.size} bytes\)"):
        fm.view(data.size - 4, F4, (2,))
    with pytest.raises(ValueError, match="past the end"):
        fm.view(-4, F4, (1,))
    assert fm.view(8, F4, (0, 3)).shape == (0, 3)


@linux
def test_a_dead_views_pages_leave_the_process(data_file):
    fd, data = data_file
    fm = FileMap(fd, data.size)
    big = fm.view(123, U4, (3 << 20,))  # 12 MiB, not page aligned
    keep = fm.view(16 << 20, np.dtype("u1"), (100,))  # keeps the map alive
    addr = _base_address(keep, 16 << 20)
    np.testing.assert_array_equal(big, _expect(data, 123, (3 << 20,), U4))  # reads every page
    before = _mapping_rss_kib(addr)
    assert before >= 12 << 10
    del big
    # Its pages wholly inside it go (12 MiB less a page). The kernel may map file pages in folios of
    # up to 2 MiB, so the folio holding its last partial page can stay, with keep's.
    assert _mapping_rss_kib(addr) <= before - (12 << 10) + 4
    np.testing.assert_array_equal(keep, data[16 << 20:(16 << 20) + 100])
    big = fm.view(123, U4, (3 << 20,))
    big[-1] = 0  # written into the page it shares with the next range
    del big
    again = fm.view(120, U4, (3 << 20,))  # cut before: a map of its own, with the file's bytes
    assert _base_address(again, 120) != addr
    np.testing.assert_array_equal(again, _expect(data, 120, (3 << 20,), U4))


@linux
def test_pages_are_given_back_after_the_filemap_is_dropped(data_file):
    """load_model lets its reader go; the views it made must still give their pages back."""
    fd, data = data_file
    fm = FileMap(fd, data.size)
    big = fm.view(0, U4, (2 << 20,))
    keep = fm.view(15 << 20, U4, (4,))
    addr = _base_address(keep, 15 << 20)
    big.sum()  # reads every page
    before = _mapping_rss_kib(addr)
    del fm
    gc.collect()
    del big
    assert _mapping_rss_kib(addr) <= before - (8 << 10) + 4  # 8 MiB, page-aligned at both ends


@linux
def test_the_map_and_its_descriptor_go_with_the_last_view(data_file):
    fd, data = data_file
    fds = set(os.listdir("/proc/self/fd"))
    fm = FileMap(fd, data.size)
    views = [fm.view(o, F4, (8,)) for o in range(0, 1 << 20, 4096)]
    assert len(set(os.listdir("/proc/self/fd")) - fds) == 1  # one map, one duplicate descriptor
    addr = _base_address(views[0], 0)
    del views
    assert set(os.listdir("/proc/self/fd")) == fds
    assert _mapping_rss_kib(addr) == 0
    np.testing.assert_array_equal(fm.view(8, F4, (2,)), _expect(data, 8, (2,)))  # mapped again on demand


def test_without_a_whole_file_map_each_view_maps_itself(data_file, monkeypatch):
    def refuse(*a, **k):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(filemap, "_Whole", refuse)
    fd, data = data_file
    fm = FileMap(fd, data.size)
    a, b = fm.view(100, F4, (10, 10)), fm.view(100, F4, (10, 10))
    a[:] = 0
    np.testing.assert_array_equal(b, _expect(data, 100, (10, 10)))


def test_threads_making_and_dropping_views(data_file):
    fd, data = data_file
    fm = FileMap(fd, data.size)
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(300):
                offset = int(rng.integers(0, data.size - 4096))
                n = int(rng.integers(1, 1000))
                v = fm.view(offset, F4, (n,))
                if not np.array_equal(v, _expect(data, offset, (n,)), equal_nan=True):
                    errors.append((offset, n))
                v[:] = seed  # private to this view: no other view may see it
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert fm._views == {}


def test_a_file_read_and_let_go_can_be_opened_for_writing(converted, tmp_path):
    """HDF5 locks the file through the descriptor the map duplicates: the lock must go with the tensors."""
    path = tmp_path / "copy.h5"
    shutil.copy(converted["lightning"], path)
    r = LayoutReader(path)
    keys = r.keys("unet")
    ts = [r.tensor("unet", k) for k in keys]
    r.close()
    with LayoutReader(converted["lightning"]) as fresh:  # the tensors outlive their reader
        assert all(torch.equal(t, fresh.tensor("unet", k)) for k, t in zip(keys, ts))
    with pytest.raises(SdportError, match="the reader was closed"):  # never a map of a stale descriptor
        r.tensor("unet", keys[0])
    del r, ts
    with h5py.File(path, "r+") as f:
        f.attrs["touched"] = 1


def _two_datasets_with_b_at(path, address) -> None:
    """A minimal layout file with datasets /unet/a and /unet/b (2048 float32 each), b's data address
    patched to `address(offset of a, file size)`. Version-1 object headers carry no checksum to mend."""
    with h5py.File(path, "w", libver="earliest") as f:
        f.attrs["format"] = "sdport"
        f.attrs["layout_version"] = 1
        g = f.create_group("unet")
        g.create_dataset("a", data=np.arange(2048, dtype="<f4"))
        g.create_dataset("b", data=-np.arange(2048, dtype="<f4"))
    with h5py.File(path, "r") as f:
        oa, ob = f["unet/a"].id.get_offset(), f["unet/b"].id.get_offset()
        header = h5py.h5o.get_info(f["unet/b"].id).addr
    raw = bytearray(path.read_bytes())
    at = raw.index(struct.pack("<Q", ob), header, header + 512)  # b's layout message: its data address
    raw[at:at + 8] = struct.pack("<Q", address(oa, len(raw)))
    path.write_bytes(bytes(raw))


def test_datasets_that_share_bytes_never_alias(tmp_path):
    """A crafted file whose second dataset points into the first: each reads the file's bytes, and a
    write through one tensor never shows in another, nor in the same dataset read again."""
    path = tmp_path / "overlap.h5"
    _two_datasets_with_b_at(path, lambda oa, size: oa + 4096)  # b starts halfway through a
    r = LayoutReader(path)
    a, b = r.tensor("unet", "a"), r.tensor("unet", "b")
    np.testing.assert_array_equal(b[:1024].numpy(), np.arange(1024, 2048, dtype="<f4"))
    a[1500] = -7.0
    b[0] = 99.0
    assert float(b[1500 - 1024]) == 1500.0 and float(a[1024]) == 1024.0
    again = r.tensor("unet", "a")
    np.testing.assert_array_equal(again.numpy(), np.arange(2048, dtype="<f4"))


@pytest.mark.parametrize("address", [lambda oa, size: size - 100, lambda oa, size: 2 ** 62],
                         ids=["runs-past-the-end", "far-past-the-end"])
def test_data_address_past_the_end_is_a_damaged_dataset(tmp_path, address):
    path = tmp_path / "past.h5"
    _two_datasets_with_b_at(path, address)
    with LayoutReader(path) as r:
        with pytest.raises(BadFile, match=r"damaged HDF5 file, cannot read /unet/b \(.*corruption"):
            r.tensor("unet", "b")
        with pytest.raises(LayoutError, match="no dataset '/unet/c'"):
            r.tensor("unet", "c")
