"""The golden store: record the reference side, check the native side against it without any
reference package importable, compare two dumps, and the committed golden file of the tiny fixture."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import pytest

from conftest import REPO, run_cli
from sdport.parity import golden

GOLDEN = os.path.join(REPO, "fixtures", "golden", "sd-tiny-unet.stats.h5")
TINY = os.path.join(REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")

# Runs the CLI with a meta path finder in front that refuses every reference package.
BLOCKED = """
import sys, importlib.abc
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ldm", "transformers", "diffusers", "open_clip"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, _Refuse())
from sdport.cli import main
main(sys.argv[1:], prog_name="sdport")
"""


def run_blocked(*args, cwd=None):
    p = subprocess.run([sys.executable, "-c", BLOCKED, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def test_committed_golden_passes_without_reference_packages(tmp_path):
    j = tmp_path / "check.json"
    rc, out, err = run_blocked("parity", "check", "--golden", GOLDEN, TINY, "--json", j)
    assert rc == 0, err
    assert "PASS" in out
    d = json.loads(j.read_text())
    assert d["modes"] == ["accumulated"] and d["inputs"]["golden_mode"] == "stats"
    assert len(d["layers"]) == golden.ActivationReader(GOLDEN).f.attrs["layer_count"] == 134
    assert d["unpaired"] == {}


def test_blocker_really_blocks():
    rc, _, err = run_blocked("parity", "record", "unet", TINY, "-o", os.devnull)
    assert rc != 0 and "is blocked in this test" in err


def test_committed_golden_schema():
    with golden.ActivationReader(GOLDEN) as r:
        a = r.attrs
        assert (a["format"], a["format_version"], a["mode"], a["component"]) == (golden.FORMAT, 1, "stats", "unet")
        assert a["seed"] == 0 and a["dtype"] == "fp32" and "torch" in a["versions"]
        assert [x["name"] for x in a["inputs_description"]["draws"]] == ["x", "t", "context"]
        assert set(r.inputs()) == {"x", "t", "context"}
        e = r.entries[0]
        assert (e.index, e.name, e.reference) == (0, "time_embed.linear_1", "time_embed.0")
        assert r.entries[-1].name == "conv_out"
        for e in r.entries:
            n = 1
            for s in e.shape:
                n *= s
            assert len(r.sample(e)) == len(range(0, n, e.stride)) <= a["sample_size"]
            assert len(e.sha256) == 64 and {"mean", "std", "l2"} <= set(e.stats)


@pytest.fixture(scope="module")
def dumps(variants, tmp_path_factory):
    d = tmp_path_factory.mktemp("dumps")
    out = {}
    for mode, extra in (("full", []), ("stats", ["--stats-only"])):
        p = d / f"text-{mode}.h5"
        rc, _, err = run_cli("parity", "record", "text_model", variants["lightning"], "-o", p, *extra)
        assert rc == 0, err
        out[mode] = p
    p = d / "text-prompt.h5"
    rc, _, err = run_cli("parity", "record", "text_model", variants["lightning"], "-o", p, "--prompt", "a cat")
    assert rc == 0, err
    out["other"] = p
    return out


def test_full_dump_holds_whole_tensors(dumps):
    with h5py.File(dumps["full"], "r") as f:
        ds = f["layers"]["00000"]
        assert ds.attrs["name"] == "embed.token" and list(ds.shape) == list(ds.attrs["shape"])
        assert f.attrs["mode"] == "full"


@pytest.mark.parametrize("mode", ["full", "stats"])
def test_check_passes_and_names_a_planted_fault(dumps, converted, tmp_path, mode):
    rc, out, err = run_cli("parity", "check", "--golden", dumps[mode], "--h5", converted["lightning"])
    assert rc == 0, err
    bad = tmp_path / "bad.h5"
    shutil.copy(converted["lightning"], bad)
    with h5py.File(bad, "r+") as f:
        w = f["text_model"]["layers.1.mlp.fc1.weight"]
        w[...] = w[...] * 1.01
    j = tmp_path / "r.json"
    rc, out, _ = run_cli("parity", "check", "--golden", dumps[mode], "--h5", bad, "--json", j)
    assert rc == 1 and "FAIL" in out
    assert json.loads(j.read_text())["culprit"]["native"] == "layers.1.mlp.fc1"


def test_compare_dumps(dumps):
    rc, out, err = run_cli("parity", "compare", dumps["full"], dumps["stats"])
    assert rc == 0 and "PASS" in out, err
    rc, out, _ = run_cli("parity", "compare", dumps["other"], dumps["full"])
    assert rc == 1 and "FAIL" in out


def test_bad_dump_is_bad_input(converted, tmp_path):
    rc, _, err = run_cli("parity", "check", "--golden", converted["lightning"], "--h5", converted["lightning"])
    assert rc == 2 and "not an activation dump" in err
    rc, _, err = run_cli("parity", "compare", tmp_path / "none.h5", GOLDEN)
    assert rc == 2 and "no such file" in err


def test_check_says_when_the_dump_and_the_layout_come_from_different_sources(dumps, converted):
    """The dump records its source's sha256; a layout converted from another file is named as such."""
    from click.testing import CliRunner

    from sdport.cli import main

    with h5py.File(dumps["stats"], "r") as f:
        assert len(f.attrs["source_sha256"]) == 64
    same = CliRunner().invoke(main, ["parity", "check", "--golden", str(dumps["stats"]), "--h5", converted["lightning"]])
    assert same.exit_code == 0 and "sources" not in same.stderr, same.output
    other = CliRunner().invoke(main, ["parity", "check", "--golden", str(dumps["stats"]), "--h5", converted["flat"]])
    warning = [ln for ln in other.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "the sources differ" in warning[0] and "sd-tiny" in warning[0], other.stderr
