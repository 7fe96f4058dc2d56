"""Malicious checkpoints are refused by name; nothing they carry ever runs."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from sdport.fixtures import malicious
from conftest import run_cli


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    marker = str(d / "MARKER")
    paths = malicious.write_all(str(d / "files"), marker)
    for name, data in malicious.hostile_containers().items():
        paths[name] = str(d / "files" / f"{name}.bin")
        with open(paths[name], "wb") as f:
            f.write(data)
    return marker, paths


PICKLES = sorted(malicious.payloads("/m"))


def test_enough_variants(hostile):
    _, paths = hostile
    assert len(paths) >= 12 + 3


@pytest.mark.parametrize("name", ["os_system", "builtins_eval", "functools_partial", "nested_pickle", "protocol_5"])
def test_fixtures_are_live(tmp_path, name):
    """Proof the payloads are real: a naive pickle.loads does create the marker."""
    marker = tmp_path / "LIVE"
    data = malicious.payloads(str(marker))[name]
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=60)
    assert marker.exists(), name


@pytest.mark.parametrize("name", PICKLES)
def test_pickle_payload_refused_by_name(hostile, tmp_path, name):
    marker, paths = hostile
    for cmd in (["inspect", paths[name]], ["convert", paths[name], "-o", tmp_path / "x.h5"]):
        rc, out, err = run_cli(*cmd)
        assert rc == 2, (cmd, out, err)
        assert len(err.strip().splitlines()) == 1 and "refused to load global '" in err and "Traceback" not in err
    assert not os.path.exists(marker)
    assert not (tmp_path / "x.h5").exists()


def test_refusal_names_the_global(hostile):
    _, paths = hostile
    expect = {"os_system": "os.system", "builtins_eval": "builtins.eval", "subprocess_popen": "subprocess.Popen",
              "runpy": "runpy._run_code", "functools_partial": "functools.partial", "nested_pickle": "pickle.loads"}
    for name, glob in expect.items():
        rc, _, err = run_cli("inspect", paths[name])
        assert f"'{glob}'" in err, (name, err)


@pytest.mark.parametrize("name", ["safetensors_huge", "safetensors_overlap", "safetensors_header_len"])
def test_lying_safetensors_refused(hostile, name):
    _, paths = hostile
    rc, _, err = run_cli("inspect", paths[name])
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_zip_bomb_storage_is_never_inflated(hostile):
    from sdport.convert.checkpoint import open_checkpoint
    from sdport.models.errors import BadFile

    _, paths = hostile
    with pytest.raises(BadFile, match="holds 268435456 bytes, expected 16"):  # at open, before any tensor is read
        open_checkpoint(paths["zip_bomb"])


def test_zip_bomb_inside_a_real_checkpoint(variants, tmp_path):
    """A real checkpoint with one storage replaced by an entry that inflates to 256 MiB."""
    src, dst = variants["fp16"], str(tmp_path / "bombed.ckpt")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data/20"):
                data = b"\0" * (256 << 20)
            z.writestr(info.filename, data)
    out = tmp_path / "bombed.h5"
    rc, _, err = run_cli("convert", dst, "-o", out)
    assert rc == 2 and "data/20" in err and "expected" in err
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
