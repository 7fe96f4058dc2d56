"""`verify` (models/storage/layout.py): threaded hashing from memory maps, problems in dataset order, planted faults."""
from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from sdport.cli import main
from sdport.convert.convert import convert
from sdport.models.storage import layout
from sdport.models.errors import SdportError
from sdport.models.storage.layout import verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    return convert(SRC, str(tmp_path_factory.mktemp("verify") / "tiny.h5")).out


def _datasets(path):
    """(name, file offset, bytes) of every contiguous dataset, in verify's order (groups, then keys)."""
    out = []
    with h5py.File(path, "r") as f:
        groups = [g for g in f if g != layout.SCHEDULE] + ([layout.SCHEDULE] if layout.SCHEDULE in f else [])
        for g in groups:
            for k in f[g]:
                ds = f[g][k]
                out.append((ds.name, ds.id.get_offset(), ds.id.get_storage_size()))
    return out


def _flip(path, offset):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x40]))


def test_intact(h5):
    assert verify(h5) == [] and verify(h5, threads=1) == []


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_every_flipped_dataset_named_in_order(h5, tmp_path, monkeypatch, threads):
    """One byte flipped in each of several datasets: each is named once, in dataset order, whatever the
    number of threads or how far ahead they may run."""
    monkeypatch.setattr(layout, "VERIFY_IN_FLIGHT", 1 << 12)  # settle often: exercises the window
    p = str(tmp_path / "flipped.h5")
    shutil.copy(h5, p)
    ds = [d for d in _datasets(p) if d[2] > 8]
    chosen = [ds[i] for i in (len(ds) - 1, 0, len(ds) // 2, 3)]  # flipped out of order on purpose
    for name, off, n in chosen:
        _flip(p, off + n // 2)
    problems = verify(p, threads=threads)
    want = sorted((name for name, _, _ in chosen), key=[d[0] for d in ds].index)
    assert [q.split(":")[0] for q in problems] == want
    assert all("sha256 mismatch (stored" in q for q in problems)


def test_foreign_datasets_are_reported_not_crashed_on(h5, tmp_path):
    """Strings, an empty dataspace, a group where a dataset should be, a missing digest, a compressed
    dataset with a wrong digest: each gets its own line, in order, and the good datasets stay quiet."""
    p = str(tmp_path / "foreign.h5")
    shutil.copy(h5, p)
    with h5py.File(p, "r+") as f:
        g = f["unet"]
        names = list(g)
        s = g.create_dataset("zz_strings", data=np.array(["a", "bc"], dtype=h5py.string_dtype()))
        s.attrs["sha256"] = "0" * 64
        e = g.create_dataset("zz_empty", data=h5py.Empty("f4"))
        e.attrs["sha256"] = "0" * 64
        g.create_group("zz_group")
        g.create_dataset("zz_nodigest", data=np.ones(3, np.float32))
        c = g.create_dataset("zz_deflated", data=np.arange(4096, dtype=np.float32), compression="gzip")
        c.attrs["sha256"] = "f" * 64
    problems = verify(p)
    assert [q.split(":")[0] for q in problems] == [f"/unet/zz_{n}" for n in
                                                   ("strings", "empty", "group", "nodigest", "deflated")], problems
    assert "not numbers" in problems[0] and "no data" in problems[1] and "not a dataset" in problems[2]
    assert "no sha256 attribute" in problems[3] and "sha256 mismatch" in problems[4]
    assert names  # the converted datasets before them all verified


def test_truncated_file(h5, tmp_path):
    """A file cut inside its last dataset: refused in one line naming it (HDF5's end-of-file check)."""
    p = str(tmp_path / "cut.h5")
    shutil.copy(h5, p)
    last = max(_datasets(p), key=lambda d: d[1])
    with open(p, "r+b") as fh:
        fh.truncate(last[1] + last[2] // 2)
    with pytest.raises(SdportError, match="truncated"):
        verify(p)
    r = CliRunner().invoke(main, ["verify", p])
    assert r.exit_code != 0 and "Traceback" not in r.output and p in r.output
