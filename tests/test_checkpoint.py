"""Reading checkpoints: formats from content, wrappers, laziness, and one-line errors on bad files."""
from __future__ import annotations

import os
import shutil
import zipfile
from collections import OrderedDict

import pytest
import torch

from sdport.convert.checkpoint import open_checkpoint, sniff
from sdport.models.errors import BadFile
from conftest import run_cli


def _sd():
    return OrderedDict(a=torch.randn(2, 3), b=torch.randn(4).half(), c=torch.ones(2, dtype=torch.bfloat16),
                       d=torch.arange(5), e=torch.zeros(0))


@pytest.mark.parametrize("wrap", ["flat", "lightning"])
def test_zip_checkpoint_round_trips_every_dtype(tmp_path, wrap):
    sd = _sd()
    sd["view"] = sd["a"][1]  # a view sharing the storage of another tensor
    path = tmp_path / "model.bin"  # the extension does not matter
    torch.save(sd if wrap == "flat" else {"state_dict": sd, "epoch": 1}, path)
    with open_checkpoint(path) as ck:
        assert ck.container == "torch-zip" and ck.wrapper == wrap
        assert ck.keys() == list(sd)
        for k, v in sd.items():
            t = ck.tensor(k)
            assert t.dtype == v.dtype and torch.equal(t, v), k
        assert ck.infos["view"].shape == (3,)


def test_safetensors_detected_by_content(tmp_path):
    from safetensors.torch import save_file

    sd = _sd()
    path = tmp_path / "weights.ckpt"  # misleading extension
    save_file({k: v.clone() for k, v in sd.items()}, path)
    assert sniff(str(path)) == "safetensors"
    with open_checkpoint(path) as ck:
        assert ck.container == "safetensors"
        for k, v in sd.items():
            assert torch.equal(ck.tensor(k), v)


def test_metadata_objects_become_inert(variants):
    with open_checkpoint(variants["callback"]) as ck:
        assert ck.wrapper == "lightning"
        cb = ck.metadata["callbacks"]
        assert any("ModelCheckpoint" in k for k in cb)
    assert "pytorch_lightning" not in __import__("sys").modules


def test_tensors_are_materialised_one_at_a_time(variants):
    with open_checkpoint(variants["lightning"]) as ck:
        reader = ck._reader
        for key in ck.keys():
            ck.tensor(key)
            # At most the storage of the tensor just read is held (none when it was handed over whole).
            assert reader._cache is None or reader._cache[0] == reader.tensors[key].storage.key


def _truncate(src, dst, frac):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: int(len(data) * frac)])


def _zip_without_pickle(src, dst):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as z:
        for info in zin.infolist():
            if not info.filename.endswith("data.pkl"):
                z.writestr(info.filename, zin.read(info))


BAD = {
    "empty": lambda src, dst: open(dst, "wb").close(),
    "truncated_zip_10": lambda src, dst: _truncate(src, dst, 0.10),
    "truncated_zip_60": lambda src, dst: _truncate(src, dst, 0.60),
    "truncated_zip_99": lambda src, dst: _truncate(src, dst, 0.99),
    "text_file": lambda src, dst: open(dst, "w").write("hello, this is not a checkpoint\n"),
    "wrong_magic": lambda src, dst: open(dst, "wb").write(b"\x00\x01\x02\x03" * 100),
    "zip_without_pickle": _zip_without_pickle,
    "bare_pickle": lambda src, dst: open(dst, "wb").write(__import__("pickle").dumps({"a": 1}, protocol=2)),
    "directory": lambda src, dst: os.mkdir(dst),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_is_one_line_exit_2(variants, tmp_path, kind):
    dst = str(tmp_path / f"{kind}.ckpt")
    BAD[kind](variants["fp16"], dst)
    for cmd in (["inspect", dst], ["convert", dst, "-o", str(tmp_path / "out.h5")]):
        rc, out, err = run_cli(*cmd)
        assert rc == 2, (kind, cmd, rc, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
        assert dst in lines[0] or os.path.basename(dst) in lines[0]
    assert not os.path.exists(tmp_path / "out.h5") and not os.path.exists(tmp_path / "out.h5.partial")


def test_truncated_safetensors(variants, tmp_path):
    for frac in (0.001, 0.5, 0.999):
        dst = tmp_path / f"cut{frac}.safetensors"
        _truncate(variants["safetensors"], dst, frac)
        with pytest.raises(BadFile):
            with open_checkpoint(dst) as ck:
                for k in ck.keys():
                    ck.tensor(k)


def test_missing_file_and_debug_traceback(tmp_path):
    rc, _, err = run_cli("inspect", tmp_path / "nope.ckpt")
    assert rc == 2 and "no such file" in err and "Traceback" not in err
    rc, _, err = run_cli("--debug", "inspect", tmp_path / "nope.ckpt")
    assert rc != 0 and "Traceback" in err


def test_unreadable_file(variants, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    dst = tmp_path / "locked.ckpt"
    shutil.copy(variants["fp16"], dst)
    os.chmod(dst, 0)
    rc, _, err = run_cli("inspect", dst)
    assert rc == 2 and "error:" in err
