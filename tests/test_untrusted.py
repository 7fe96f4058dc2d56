"""Every command that reads a file, on hostile files of each class of docs/security.md.

Each command runs in a forked child of one worker process (tests/untrusted_runner.py): refused with
exit 2 (verify: 1 for a damaged dataset), one error line naming the file, no traceback, no signal,
under 30 s and 1 GiB of RSS above the child's start, nothing written, and no byte of the planted
secret in any output. The hostile files are built here (fixtures/hostile.py), none is committed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from sdport.fixtures import hostile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")
GOLDEN = os.path.join(REPO, "fixtures", "golden", "sd-tiny-unet.stats.h5")
MAX_RSS_MIB, MAX_WALL_S = 1024, 30

VERIFY = ["verify", "{f}"]
EXPORT = ["export", "{f}", "-o", "{out}/back.safetensors"]
TXT2IMG = ["txt2img", "{f}", "a red cube", "-o", "{out}/x.png", "--steps", "1"]
CHECK_H5 = ["parity", "check", "--golden", "{golden}", "--h5", "{f}"]
CHECK_GOLDEN = ["parity", "check", "--golden", "{f}", "--h5", "{base}"]
COMPARE = ["parity", "compare", "{f}", "{golden}"]
INSPECT = ["inspect", "{f}"]
CONVERT = ["convert", "{f}", "-o", "{out}/x.h5"]

# (file, commands, exit code, words the error line must hold); exit None: any orderly end (0, 1 or 2)
CASES = [
    # 1. local file disclosure
    *[(name, cmds, 2, word) for name, word in [
        ("h5_external_abs", "external"), ("h5_external_rel", "external"), ("h5_external_fifo", "external"),
        ("h5_vds", "virtual"), ("h5_vds_missing", "virtual")] for cmds in (VERIFY, EXPORT, TXT2IMG, CHECK_H5)],
    *[(name, cmds, 2, word) for name, word in [("h5_external_link", "external link"), ("h5_soft_link", "soft link")]
      for cmds in (VERIFY, EXPORT, TXT2IMG, CHECK_H5, INSPECT)],
    ("h5_nested_link", VERIFY, 1, "no dataset"),
    *[("h5_nested_link", cmds, 2, "no dataset") for cmds in (EXPORT, TXT2IMG)],
    ("golden_nested_link", CHECK_GOLDEN, 2, "is a group"),
    ("golden_nested_link", COMPARE, 2, "is a group"),
    ("golden_external_input", CHECK_GOLDEN, 2, "external"),
    ("golden_external_link", CHECK_GOLDEN, 2, "external link"),
    ("golden_external_link", COMPARE, 2, "external link"),
    # 2. native code through HDF5 filters
    *[("h5_unknown_filter", cmds, 2, "filter 32004") for cmds in (VERIFY, EXPORT, TXT2IMG)],
    # 3. memory and time bombs
    *[(name, cmds, 2, word) for name, word in [
        ("memo_index", "memo index"), ("deep_tuple_key", "nested deeper"), ("deep_lists", "nested deeper"),
        ("wide_stack", "objects on the stack"), ("stride_zero", "elements viewing a storage"),
        ("numel_overflow", "elements"), ("storage_claims_gib", "expected 1073741824"),
        ("byteorder_bomb", "byteorder")] for cmds in (INSPECT, CONVERT)],
    ("h5_unallocated_giant", VERIFY, 2, "declares"),
    ("h5_unallocated_giant", EXPORT, 2, "schedule buffer"),
    *[("h5_unallocated_shape", cmds, 2, "chunks written") for cmds in (VERIFY, EXPORT, TXT2IMG)],
    ("h5_schedule_giant", VERIFY, 2, "deflate"),
    *[("h5_schedule_giant", cmds, 2, "schedule buffer") for cmds in (EXPORT, TXT2IMG)],
    ("h5_thousands_of_blocks", VERIFY, 1, "blocks"),
    *[("h5_thousands_of_blocks", cmds, 2, "blocks") for cmds in (EXPORT, TXT2IMG)],
    ("golden_giant_input", CHECK_GOLDEN, 2, "at most batch"),
    ("golden_huge_batch", CHECK_GOLDEN, 2, "at most batch"),
    ("bomb_dump", ["parity", "compare", "{f}", "{f}"], 2, "inflate"),
    ("fifo", ["tokenize", "--file", "{f}"], 2, "regular file"),
    ("fifo", VERIFY, 2, "regular file"),
    ("fifo", INSPECT, 2, "regular file"),
    # 4. crashes and tracebacks
    *[(name, cmds, 2, word) for name, word in [
        ("rank_mismatch", "rank"), ("storage_two_dtypes", "declared twice"), ("build_on_tensor", "BUILD")]
      for cmds in (INSPECT, CONVERT)],
    ("nested_metadata", INSPECT, None, ""),
    ("nested_metadata", CONVERT, 2, "no supported component"),
    *[(name, VERIFY, 1, word) for name, word in [
        ("h5_negative_heads", "num_heads"), ("h5_float_channels", "model_channels"), ("h5_config_not_text", "config"),
        ("h5_config_deep_json", "config"), ("h5_null_dataspace", "shape"), ("h5_bf16_dtype_attr_array", "bfloat16")]],
    *[(name, cmds, 2, word) for name, word in [
        ("h5_negative_heads", "num_heads"), ("h5_float_channels", "model_channels"), ("h5_config_not_text", "config"),
        ("h5_config_deep_json", "config"), ("h5_null_dataspace", "shape"), ("h5_bf16_dtype_attr_array", "bfloat16")]
      for cmds in (EXPORT, TXT2IMG)],
    *[(name, cmds, 2, word) for name, word in [("h5_format_array", "format"), ("h5_version_text", "layout_version")]
      for cmds in (VERIFY, TXT2IMG, INSPECT)],
    ("h5_latent_scale_text", TXT2IMG, 2, "latent_scale"),
    ("golden_input_dtype_getattr", CHECK_GOLDEN, 2, "dtype attribute"),
    *[(name, cmds, 2, word) for name, word in [
        ("golden_shape_not_ints", "shape"), ("golden_stats_not_json", "stats"), ("golden_version_array", "version")]
      for cmds in (CHECK_GOLDEN, COMPARE)],
    ("big_endian_bf16", CONVERT, 0, ""),
    # 5. lenient parsing
    *[(name, cmds, 2, word) for name, word in [
        ("st_utf16", "UTF-8"), ("st_float_offsets", "malformed"), ("st_string_offsets", "malformed"),
        ("st_duplicate_keys", "duplicate"), ("st_deep_json", "JSON"), ("st_gap", "unused")] for cmds in (INSPECT, CONVERT)],
    ("h5_huge_attribute", VERIFY, 2, "format="),
]


def _big_endian_bf16(src: str, dst: str) -> str:
    """The tiny checkpoint with every 2-byte storage declared bfloat16 and stored big-endian."""
    import numpy as np

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        prefix = next(n for n in zin.namelist() if n.endswith("data.pkl"))[:-len("data.pkl")]
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"torch\nHalfStorage\n", b"torch\nBFloat16Storage\n")
            elif info.filename.startswith(prefix + "data/") and len(data) % 2 == 0:
                data = np.frombuffer(data, np.uint16).byteswap().tobytes()
            elif info.filename.endswith("byteorder"):
                continue
            z.writestr(info.filename, data)
        z.writestr(prefix + "byteorder", b"big")
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sdport.convert.convert import convert

    d = tmp_path_factory.mktemp("untrusted")
    secret = str(d / "secret.txt")
    token = hostile.secret_file(secret)
    base = convert(TINY, str(d / "base.h5")).out
    base_bf16 = convert(TINY, str(d / "base-bf16.h5"), dtype="bf16").out
    out = {**hostile.checkpoints(str(d / "ckpt")), **hostile.layouts(base, str(d / "h5"), secret),
           **hostile.goldens(GOLDEN, str(d / "golden"), secret)}
    bf16 = hostile.layouts(base_bf16, str(d / "h5-bf16"), secret)
    out["h5_bf16_dtype_attr_array"] = bf16["h5_dtype_attr_array"]
    out["bomb_dump"] = hostile.compressed_bomb_dump(str(d / "bomb_dump.h5"))
    out["fifo"] = str(d / "h5" / "fifo")
    out["big_endian_bf16"] = _big_endian_bf16(TINY, str(d / "big_endian_bf16.ckpt"))
    return {"dir": d, "secret": token, "base": base, "paths": out}


def _case_id(i: int, case) -> str:
    name, cmds, *_ = case
    return f"{i:03d}-{name}-{'-'.join(c for c in cmds[:2] if '{' not in c)}"


@pytest.fixture(scope="module")
def results(files):
    d = files["dir"]
    cases = []
    for i, case in enumerate(CASES):
        name, cmds, *_ = case
        cid = _case_id(i, case)
        out = d / "runs" / cid
        out.mkdir(parents=True)
        argv = [c.format(f=files["paths"][name], out=str(out), golden=GOLDEN, base=files["base"]) for c in cmds]
        cases.append({"id": cid, "argv": argv, "out": str(out)})
    with open(d / "cases.json", "w") as f:
        json.dump(cases, f)
    subprocess.run([sys.executable, os.path.join(REPO, "tests", "untrusted_runner.py"), str(d / "cases.json"),
                    str(d / "results.json")], check=True, timeout=1800)
    with open(d / "results.json") as f:
        return {r["id"]: r for r in json.load(f)}


@pytest.mark.parametrize("i", range(len(CASES)), ids=[_case_id(i, c) for i, c in enumerate(CASES)])
def test_hostile_file_is_refused(files, results, i):
    case = CASES[i]
    name, cmds, want_rc, word = case
    cid = _case_id(i, case)
    r = results[cid]
    path = files["paths"][name]
    out_dir = files["dir"] / "runs" / cid
    err = r["stderr"]
    assert r["signal"] is None, f"killed by signal {r['signal']}: {err[-2000:]}"
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    if want_rc is None:
        assert r["rc"] in (0, 1, 2), err
    else:
        assert r["rc"] == want_rc, (r["rc"], r["stdout"][-1000:], err[-2000:])
    assert r["wall_s"] < MAX_WALL_S, r["wall_s"]
    assert r["rss_above_start_mib"] < MAX_RSS_MIB, r["rss_above_start_mib"]
    if want_rc in (0, None):
        return
    lines = [ln for ln in err.splitlines() if ln.strip()]
    problem = [ln for ln in lines if ln.startswith("error:") or "problem(s)" in ln]
    assert len(problem) == 1, err[-2000:]
    assert len(problem[0]) < 600, len(problem[0])
    if want_rc is not None:
        assert word in problem[0], problem[0]
        assert os.path.basename(path) in problem[0] or os.path.basename(str(files["base"])) in problem[0], problem[0]
    written = [p for p in os.listdir(out_dir)]
    assert not written, written
    secret = files["secret"]
    assert secret not in r["stdout"] and secret not in err


def test_no_output_anywhere_holds_the_secret(files, results):
    """Over every run: no file written anywhere under the runs, and no stream, holds the secret."""
    secret = files["secret"].encode()
    for root, _, names in os.walk(files["dir"] / "runs"):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                assert secret not in f.read(), n
    for r in results.values():
        assert files["secret"] not in r["stdout"] + r["stderr"]


def test_plugin_loading_is_off_in_sdport_processes(tmp_path):
    """HDF5 would dlopen a filter plugin for an unknown filter id; once sdport's reader is imported it
    cannot, even when the data are read through h5py directly (a plugin that leaves a marker)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the planted plugin")
    marker = tmp_path / "PLUGIN-RAN"
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    src = tmp_path / "plugin.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void ran(void) {'
                   f' FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
                   "int H5PLget_plugin_type(void) { return 0; }\nconst void *H5PLget_plugin_info(void) { return 0; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(plugin_dir / "libplanted.so"), str(src)], check=True)
    h5 = tmp_path / "filtered.h5"
    code = ("import h5py, numpy as np\n"
            f"f = h5py.File({str(h5)!r}, 'w')\n"
            "dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE); dcpl.set_chunk((4,))\n"
            "dcpl.set_filter(32004, h5py.h5z.FLAG_OPTIONAL, ())\n"
            "d = h5py.h5d.create(f.id, b'x', h5py.h5t.IEEE_F32LE, h5py.h5s.create_simple((4,)), dcpl=dcpl)\n"
            "d.write_direct_chunk((0,), bytes(16))\n"
            "f.close()\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    env = {k: v for k, v in os.environ.items() if k != "HDF5_PLUGIN_PRELOAD"}  # sdport's import set it here
    env["HDF5_PLUGIN_PATH"] = str(plugin_dir)
    read = (f"import h5py\nf = h5py.File({str(h5)!r}, 'r')\n"
            "try:\n    f['x'][()]\nexcept Exception:\n    pass\n")
    # The control: plain h5py loads the planted library (so the file really reaches a plugin).
    subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, timeout=60)
    assert marker.exists(), "control failed: HDF5 did not try the planted plugin"
    marker.unlink()
    probe = "from sdport.models.storage import h5safe\nassert h5safe.plugins_disabled()\n" + read
    p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert not marker.exists(), "the planted plugin was loaded"
