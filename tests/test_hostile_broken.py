"""Broken inputs and hostile conditions: every failure is one line on stderr with exit code 2 (1 when
`verify` finds damage), nothing is left half-written at a destination, and nothing crashes.

Inputs are derived from the committed tiny checkpoint (fixtures/tiny), so this file needs no reference
code. Random offsets and kill times come from fixed seeds: a failure reproduces.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from types import SimpleNamespace

import click
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sdport.cli import main
from sdport.convert.checkpoint import open_checkpoint
from sdport.convert.convert import convert, export
from sdport.models.errors import SdportError
from sdport.models.storage.layout import LayoutReader, verify
from sdport.models.load import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")
COMPONENTS = ["unet", "text_model", "encoder", "decoder"]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # fp16-on-CPU notes from load_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny fp16 checkpoint, its .h5 and a .safetensors copy; plus how long the .h5 takes to write."""
    d = tmp_path_factory.mktemp("hostile_base")
    h5, st = str(d / "tiny.h5"), str(d / "tiny.safetensors")
    marks = []
    convert(SRC, h5, progress=lambda n, total: marks.append(time.monotonic()))
    export(h5, st)
    with open_checkpoint(SRC) as ck:
        sd = {k: ck.tensor(k) for k in ck.keys()}
    return SimpleNamespace(dir=d, h5=h5, st=st, sd=sd, write_s=marks[-1] - marks[0])


def cli(*args):
    """Run the CLI in this process (a subprocess costs seconds of imports)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def no_traceback(r):
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"uncaught {type(r.exception).__name__}: {r.exception}\n{r.output}")
    assert "Traceback" not in r.output


def one_line_error(r, code=2, names=None):
    no_traceback(r)
    # Notes printed before the failure (e.g. "note: no /schedule group ...") may precede the one error line.
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert r.exit_code == code, (r.exit_code, r.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    if names:
        assert names in lines[0], (names, lines[0])
    return lines[0]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def nothing_written(out):
    assert not os.path.exists(out), out
    assert not os.path.exists(str(out) + ".partial"), out


def save_ckpt(sd, path, wrap=True):
    torch.save({"state_dict": sd} if wrap else sd, path)
    return str(path)


def offsets(size, n, seed):
    rng = random.Random(seed)
    return sorted({1, size - 1, *(rng.randrange(2, size - 1) for _ in range(n - 2))})


# ------------------------------------------------------------------------------------------- truncation


def test_truncated_ckpt_at_random_offsets(tmp_path):
    data = open(SRC, "rb").read()
    for i, off in enumerate(offsets(len(data), 10, seed=1)):
        p = tmp_path / f"cut{i}.ckpt"
        p.write_bytes(data[:off])
        for cmd in (["inspect", p], ["convert", p, "-o", tmp_path / "o.h5"]):
            one_line_error(cli(*cmd), names=str(p))
        nothing_written(tmp_path / "o.h5")


def test_truncated_safetensors_at_random_offsets(base, tmp_path):
    data = open(base.st, "rb").read()
    for i, off in enumerate(offsets(len(data), 8, seed=2)):
        p = tmp_path / f"cut{i}.safetensors"
        p.write_bytes(data[:off])
        for cmd in (["inspect", p], ["convert", p, "-o", tmp_path / "o.h5"]):
            one_line_error(cli(*cmd), names=str(p))
        nothing_written(tmp_path / "o.h5")


def test_truncated_h5_at_random_offsets(base, tmp_path):
    data = open(base.h5, "rb").read()
    for i, off in enumerate(offsets(len(data), 10, seed=3)):
        p = tmp_path / f"cut{i}.h5"
        p.write_bytes(data[:off])
        for cmd in (["inspect", p], ["verify", p], ["export", p, "-o", tmp_path / "b.safetensors"]):
            line = one_line_error(cli(*cmd), names=str(p))
            assert any(w in line for w in ("truncated", "not an HDF5", "not a checkpoint", "not a readable")), line
        with pytest.raises(SdportError, match="truncated|not an HDF5|not a readable"):
            load_model(str(p), "unet")
        nothing_written(tmp_path / "b.safetensors")


# ---------------------------------------------------------------------------------- damaged contents


def _metadata_offsets(path):
    """Byte ranges of the file that hold HDF5 metadata (everything but the datasets' raw bytes)."""
    spans = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda _, o: spans.append((o.id.get_offset(), o.id.get_storage_size()))
                     if isinstance(o, h5py.Dataset) and o.id.get_offset() is not None else None)
    data = np.zeros(os.path.getsize(path), bool)
    for off, n in spans:
        data[off:off + n] = True
    return np.flatnonzero(~data)


def test_damaged_h5_metadata_never_crashes(base, tmp_path):
    """One byte of HDF5 metadata (object headers, link tables, heaps) flipped at random: refused by a
    checksum, reported by verify, or harmless. Not covered: zeroing a run of bytes inside the global
    heap (where variable-length string attributes live) can send HDF5 2.0 into an endless loop in
    H5Aread, which no Python code can interrupt."""
    meta = _metadata_offsets(base.h5)
    src = open(base.h5, "rb").read()
    rng = random.Random(4)
    outcomes = []
    for i in range(12):
        d = bytearray(src)
        d[int(rng.choice(meta))] ^= 0xFF
        p = tmp_path / f"dmg{i}.h5"
        p.write_bytes(d)
        r = cli("inspect", p)
        no_traceback(r)
        if r.exit_code:
            one_line_error(r, names=str(p))
        try:
            problems = verify(str(p))
            for c in LayoutReader(str(p)).components():
                load_model(str(p), c, device="meta")
            outcomes.append("sha256 mismatch" if problems else "loads")
        except SdportError as e:
            assert "\n" not in str(e) and str(p) in str(e)
            outcomes.append("refused")
    assert outcomes.count("refused") + outcomes.count("sha256 mismatch") >= 3, outcomes


def test_damaged_deflated_ckpt(tmp_path):
    """A zip checkpoint with deflated members, bytes flipped anywhere: a CRC, zlib or pickle error, one line."""
    dz = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(SRC) as zin, zipfile.ZipFile(dz, "w", zipfile.ZIP_DEFLATED) as z:
        for info in zin.infolist():
            z.writestr(info.filename, zin.read(info))
    src = dz.read_bytes()
    rng = random.Random(5)
    for i in range(8):
        d = bytearray(src)
        for _ in range(4):
            d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
        p = tmp_path / f"flip{i}.ckpt"
        p.write_bytes(d)
        out = tmp_path / f"flip{i}.h5"
        r = cli("convert", p, "-o", out)
        no_traceback(r)
        if r.exit_code:
            one_line_error(r, names=str(p))
            nothing_written(out)
        else:
            assert verify(str(out)) == []


def _delete(f, key):
    del f[key]


def _replace(f, key, data):
    """Swap a dataset's contents, with a matching sha256 so that only the layout check can object."""
    attrs = dict(f[key].attrs) if key in f else {"dtype": "float16", "sources": "[]", "transform": "identity"}
    if key in f:
        del f[key]
    ds = f.create_dataset(key, data=data)
    for k, v in attrs.items():
        ds.attrs[k] = v
    ds.attrs["sha256"] = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


W = "unet/conv_in.weight"
MUTATIONS = {  # name -> (edit of an h5py.File, text the error must contain)
    "dataset_deleted": (lambda f: _delete(f, W), "conv_in.weight"),
    "dataset_wrong_shape": (lambda f: _replace(f, W, np.zeros((3, 3), np.float16)), "conv_in.weight"),
    "dataset_big_endian": (lambda f: _replace(f, W, f[W][()].astype(">f2")), "conv_in.weight"),
    "group_instead_of_dataset": (lambda f: (_delete(f, W), f.create_group(W)), "conv_in.weight"),
    "extra_dataset": (lambda f: _replace(f, "unet/lora.weight", np.zeros(3, np.float16)), "lora.weight"),
    "config_not_json": (lambda f: f["unet"].attrs.__setitem__("config", "{oops"), "config"),
    "config_not_an_object": (lambda f: f["unet"].attrs.__setitem__("config", "[1, 2]"), "config"),
    "config_wrong_fields": (lambda f: f["unet"].attrs.__setitem__("config", '{"width": 3}'), "config"),
    "config_missing": (lambda f: f["unet"].attrs.__delitem__("config"), "config"),
    "format_missing": (lambda f: f.attrs.__delitem__("format"), "not an sdport layout"),
    "version_not_a_number": (lambda f: f.attrs.__setitem__("layout_version", "one"), "layout_version"),
    "version_zero": (lambda f: f.attrs.__setitem__("layout_version", 0), "layout version 0"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_semantically_broken_h5(base, tmp_path, name):
    """Files that HDF5 reads fine but that break the layout's contract: load, verify and export refuse them."""
    edit, expect = MUTATIONS[name]
    p = str(tmp_path / f"{name}.h5")
    shutil.copy(base.h5, p)
    with h5py.File(p, "r+") as f:
        edit(f)
    with pytest.raises(SdportError, match=expect) as e:
        load_model(p, "unet", device="meta")
    assert "\n" not in str(e.value)
    r = cli("verify", p)
    no_traceback(r)
    assert r.exit_code in (1, 2) and expect in r.stderr.splitlines()[0], r.output
    one_line_error(cli("export", p, "-o", tmp_path / "b.safetensors"), names=expect)
    nothing_written(tmp_path / "b.safetensors")


def test_sha256_attribute_missing_is_a_verify_failure(base, tmp_path):
    p = str(tmp_path / "nosha.h5")
    shutil.copy(base.h5, p)
    with h5py.File(p, "r+") as f:
        del f["decoder/conv_out.bias"].attrs["sha256"]
    r = cli("verify", p)
    no_traceback(r)
    assert r.exit_code == 1 and "/decoder/conv_out.bias: no sha256 attribute" in r.stderr.splitlines()[0]



@pytest.mark.parametrize("stored, expect", [
    # A damaged digest attribute that keeps the right first characters: the message shows both in full.
    (lambda good: good[:12] + ("0" if good[12] != "0" else "1") + good[13:], "sha256 mismatch (stored "),
    (lambda good: good[:20] + "\u00e9", "sha256 attribute is not a sha256 hex digest"),
])
def test_damaged_sha256_attribute_is_told_apart(base, tmp_path, stored, expect):
    p = str(tmp_path / "badsha.h5")
    shutil.copy(base.h5, p)
    with h5py.File(p, "r+") as f:
        a = f["decoder/conv_out.bias"].attrs
        good = a["sha256"] if isinstance(a["sha256"], str) else a["sha256"].decode()
        bad = stored(good)
        a["sha256"] = bad
    r = cli("verify", p)
    no_traceback(r)
    first = r.stderr.splitlines()[0]
    assert r.exit_code == 1 and "/decoder/conv_out.bias: " + expect in first, first
    assert good in first  # the digest the data really has
    if expect.startswith("sha256 mismatch"):
        assert bad in first


# ----------------------------------------------------------------------------------- odd weights


def test_nan_inf_weights_are_warned_per_tensor_not_refused(base, tmp_path):
    sd = dict(base.sd)
    planted = {"model.diffusion_model.input_blocks.0.0.weight": 3, "first_stage_model.decoder.conv_out.bias": 1,
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": 5}
    for k, n in planted.items():
        t = sd[k].clone().reshape(-1)
        t[:n] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan"), float("inf")][:n])
        sd[k] = t.reshape(sd[k].shape)
    src, out = save_ckpt(sd, tmp_path / "nan.ckpt"), tmp_path / "nan.h5"
    r = cli("convert", src, "-o", out)
    no_traceback(r)
    assert r.exit_code == 0, r.output
    warnings = [line.strip() for line in r.stderr.splitlines() if "warning:" in line]
    assert sorted(warnings) == sorted([f"warning: {k} holds {n} NaN/Inf value(s)" for k, n in planted.items()]
                                      + ["warning: 3 tensor(s) hold NaN/Inf values"])
    assert verify(str(out)) == []
    with LayoutReader(out) as rd:
        held = {rd.dataset_attrs(g, k)["sources"][0]: int((~torch.isfinite(rd.tensor(g, k))).sum())
                for g in rd.components() for k in rd.keys(g) if rd.tensor(g, k).is_floating_point()}
    assert {k: v for k, v in held.items() if v} == planted  # kept as they are, bit for bit


# ---------------------------------------------------------------------------------- missing parts


def test_missing_components(base, tmp_path):
    vae = {k: v for k, v in base.sd.items() if k.startswith("first_stage_model.")}
    r = cli("convert", save_ckpt(vae, tmp_path / "vae.ckpt"), "-o", tmp_path / "vae.h5")
    assert r.exit_code == 0, r.output
    with LayoutReader(tmp_path / "vae.h5") as rd:
        assert rd.components() == ["encoder", "decoder"] and rd.attrs["variant"] == "partial"
    with pytest.raises(SdportError, match=r"no 'unet' component \(the file holds: encoder, decoder\)"):
        load_model(str(tmp_path / "vae.h5"), "unet")
    if "txt2img" in main.commands:
        one_line_error(cli("txt2img", tmp_path / "vae.h5", "a cat", "-o", tmp_path / "x.png"), names="vae.h5")
        nothing_written(tmp_path / "x.png")

    # One UNet tensor missing: refused, naming it.
    gone = "output_blocks.2.0.skip_connection.weight"
    holed = {k: v for k, v in base.sd.items() if k != "model.diffusion_model." + gone}
    one_line_error(cli("convert", save_ckpt(holed, tmp_path / "holed.ckpt"), "-o", tmp_path / "h.h5"), names=gone)
    # The VAE decoder missing as a whole: a file of the other components (one VAE half converts alone),
    # which the pipelines then refuse, naming what is missing.
    no_dec = {k: v for k, v in base.sd.items() if not k.startswith(("first_stage_model.decoder", "first_stage_model.post"))}
    r = cli("convert", save_ckpt(no_dec, tmp_path / "nodec.ckpt"), "-o", tmp_path / "nodec.h5")
    assert r.exit_code == 0, r.output
    with LayoutReader(tmp_path / "nodec.h5") as rd:
        assert rd.components() == ["unet", "text_model", "encoder"]
    if "txt2img" in main.commands:
        one_line_error(cli("txt2img", tmp_path / "nodec.h5", "a cat", "-o", tmp_path / "x.png"), names="decoder")
        nothing_written(tmp_path / "x.png")
    # One decoder tensor missing: refused, naming it.
    holed_dec = {k: v for k, v in base.sd.items() if k != "first_stage_model.decoder.conv_out.weight"}
    one_line_error(cli("convert", save_ckpt(holed_dec, tmp_path / "nodec1.ckpt"), "-o", tmp_path / "d.h5"),
                   names="decoder.conv_out.weight")
    # Nothing convertible at all.
    one_line_error(cli("convert", save_ckpt({}, tmp_path / "empty.ckpt"), "-o", tmp_path / "e.h5"),
                   names="no supported component")
    for n in ("h.h5", "d.h5", "e.h5"):
        nothing_written(tmp_path / n)


# --------------------------------------------------------------------------- files that are not files


@contextmanager
def deadline(seconds):
    """Fail instead of hanging (a FIFO blocks open() until a writer comes)."""
    def fire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_fifo_and_device_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.ckpt"
    os.mkfifo(fifo)
    for p in (fifo, "/dev/null"):
        with deadline(20):
            for cmd in (["inspect", p], ["convert", p, "-o", tmp_path / "o.h5"], ["verify", p],
                        ["export", p, "-o", tmp_path / "o.safetensors"]):
                one_line_error(cli(*cmd), names="not a regular file")
    nothing_written(tmp_path / "o.h5")


def test_output_is_the_input_or_a_directory(base, tmp_path):
    ck, h5 = tmp_path / "in.ckpt", tmp_path / "in.h5"
    shutil.copy(SRC, ck)
    shutil.copy(base.h5, h5)
    before = sha(ck), sha(h5)
    one_line_error(cli("convert", ck, "-o", ck, "--force"), names="is the input file")
    one_line_error(cli("export", h5, "-o", h5, "--force"), names="is the input file")
    os.symlink(ck, tmp_path / "alias.h5")
    one_line_error(cli("convert", ck, "-o", tmp_path / "alias.h5", "--force"), names="is the input file")
    assert (sha(ck), sha(h5)) == before
    (tmp_path / "outdir").mkdir()
    one_line_error(cli("convert", ck, "-o", tmp_path / "outdir", "--force"), names="is a directory")
    one_line_error(cli("export", h5, "-o", tmp_path / "outdir", "--force"), names="is a directory")
    one_line_error(cli("convert", ck, "-o", ""), names="names no file")


def test_data_pkl_that_would_inflate_enormously(tmp_path):
    p = tmp_path / "pklbomb.ckpt"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("archive/data.pkl", b"\0" * (65 << 20))
    assert p.stat().st_size < 1 << 20
    one_line_error(cli("inspect", p), names="refusing to inflate")


# ---------------------------------------------------------------------------------- unreadable file

_AS_OTHER_USER = r"""
import json, sys
from click.testing import CliRunner
from sdport.cli import main
out = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, args)
    out.append([r.exit_code, r.stderr, type(r.exception).__name__])
print(json.dumps(out))
"""


def test_unreadable_files_and_unwritable_directory(base):
    """Mode-000 inputs and a read-only output directory. Root reads everything, so as root the commands
    run without the capabilities that bypass file permissions (setpriv), or else as `nobody`."""
    d = tempfile.mkdtemp(prefix="sdport-perm-")
    try:
        os.chmod(d, 0o755)
        ck, h5, ro = os.path.join(d, "locked.ckpt"), os.path.join(d, "locked.h5"), os.path.join(d, "ro")
        shutil.copy(SRC, ck)
        shutil.copy(base.h5, h5)
        os.chmod(ck, 0)
        os.chmod(h5, 0)
        os.mkdir(ro)
        os.chmod(ro, 0o555)
        readable = os.path.join(d, "open.ckpt")
        shutil.copy(SRC, readable)
        os.chmod(readable, 0o644)
        cases = [["inspect", ck], ["convert", ck, "-o", os.path.join(d, "x.h5")], ["inspect", h5], ["verify", h5],
                 ["export", h5, "-o", os.path.join(d, "x.safetensors")],
                 ["convert", readable, "-o", os.path.join(ro, "x.h5")]]
        kw, prefix = {}, []
        if os.geteuid() == 0 and shutil.which("setpriv"):
            prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
        elif os.geteuid() == 0:
            try:
                import pwd
                kw = {"user": pwd.getpwnam("nobody").pw_uid, "group": pwd.getpwnam("nobody").pw_gid, "extra_groups": []}
            except KeyError:
                pytest.skip("running as root without setpriv or a 'nobody' user to drop to")
        env = {**os.environ, "HOME": d, "PYTHONDONTWRITEBYTECODE": "1"}
        p = subprocess.run([*prefix, sys.executable, "-c", _AS_OTHER_USER, json.dumps(cases)], capture_output=True,
                           text=True, cwd=d, env=env, timeout=300, **kw)
        assert p.returncode == 0, p.stderr[-2000:]
        results = json.loads(p.stdout.strip().splitlines()[-1])
        for args, (code, err, exc) in zip(cases, results):
            assert code == 2 and exc == "SystemExit" and "Traceback" not in err, (args, code, err, exc)
            ours = [line for line in err.splitlines() if line.startswith("error: ")]
            if ours:  # sdport's own line
                assert len(err.strip().splitlines()) == 1 and "Permission denied" in ours[0], err
            else:  # click's usage error for a path parameter declared readable
                assert "is not readable" in err.strip().splitlines()[-1], err
        assert sorted(os.listdir(ro)) == [] and not os.path.exists(os.path.join(d, "x.h5"))
    finally:
        os.chmod(os.path.join(d, "ro"), 0o755) if os.path.isdir(os.path.join(d, "ro")) else None
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------ full disk


_UNDER_A_FILE_SIZE_LIMIT = r"""
import json, resource, signal, sys
from click.testing import CliRunner
from sdport.cli import main
# RLIMIT_FSIZE: a write past the limit fails with EFBIG, as on a full disk (SIGXFSZ, which would
# kill the process instead, is ignored).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
out = []
for limit, args in json.loads(sys.argv[1]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    r = CliRunner().invoke(main, args)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out.append([r.exit_code, r.stderr, type(r.exception).__name__])
print(json.dumps(out))
"""


def _under_limits(cases):
    """Run CLI invocations, each under its own file-size limit, in a subprocess (HDF5 may crash)."""
    p = subprocess.run([sys.executable, "-c", _UNDER_A_FILE_SIZE_LIMIT, json.dumps(cases)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_disk_full_during_convert_and_export(base, tmp_path):
    """Writes that fail midway and at the very end (HDF5's metadata flush on close), also over an existing
    destination under --force, and during export: one line, exit 2, no partial file, old file intact."""
    size = os.path.getsize(base.h5)
    keep = tmp_path / "keep.h5"
    shutil.copy(base.h5, keep)
    before = sha(keep)
    cases = [(size // 2, ["convert", SRC, "-o", str(tmp_path / "mid.h5")]),
             (size - 64, ["convert", SRC, "-o", str(tmp_path / "end.h5")]),
             (size // 2, ["convert", SRC, "-o", str(keep), "--force"]),
             (size // 3, ["export", base.h5, "-o", str(tmp_path / "back.safetensors")]),
             (size // 3, ["export", base.h5, "-o", str(tmp_path / "back.ckpt")])]
    for (_, args), (code, err, exc) in zip(cases, _under_limits(cases)):
        lines = err.strip().splitlines()
        assert code == 2 and exc == "SystemExit" and len(lines) == 1, (args, code, err, exc)
        assert lines[0].startswith(f"error: {args[-1] if args[-1] != '--force' else keep}: cannot write (File too large)")
    for name in ("mid.h5", "end.h5", "back.safetensors", "back.ckpt"):
        nothing_written(tmp_path / name)
    assert sha(keep) == before and not os.path.exists(str(keep) + ".partial")


def test_disk_full_at_the_first_writes(tmp_path):
    # Dataset bytes are written with pwrite, outside HDF5: its segfault on closing a file whose first
    # writes failed (HDF5 2.0 / h5py 3.16) is no longer reached.
    (code, err, _), = _under_limits([(8192, ["convert", SRC, "-o", str(tmp_path / "early.h5")])])
    assert code == 2 and "File too large" in err
    nothing_written(tmp_path / "early.h5")


def test_disk_full_on_a_real_small_filesystem(base, tmp_path):
    """A 1 MiB tmpfs (needs root and mount rights): convert refuses before writing; export meets ENOSPC itself."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if m.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {m.stderr.strip()}")
    try:
        one_line_error(cli("convert", SRC, "-o", mnt / "x.h5"), names="MiB free")  # checked before writing
        for ext in (".safetensors", ".ckpt"):
            one_line_error(cli("export", base.h5, "-o", mnt / f"x{ext}"), names="No space left on device")
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ------------------------------------------------------------------------------------ killed midway


def test_sigkill_during_conversion_leaves_no_half_written_destination(base, tmp_path):
    """Conversions killed at random points (seeded): before writing starts and while datasets are
    being written. The destination is never there half-written; a rerun over the leftovers succeeds."""
    rng = random.Random(6)
    n = 6
    # Run side by side: each is killed at its own time, measured from when its .partial appears.
    delays = [None] + [rng.uniform(0.0, 0.6) * base.write_s for _ in range(n - 1)]
    outs = [tmp_path / f"k{i}.h5" for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-m", "sdport.cli", "convert", SRC, "-o", str(o)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for o in outs]
    early_kill = time.monotonic() + rng.uniform(0.05, 0.5)
    seen: dict[int, float] = {}
    killed_mid_write = 0
    t_end = time.monotonic() + 240
    while any(p.poll() is None for p in procs) and time.monotonic() < t_end:
        now = time.monotonic()
        for i, (p, o, delay) in enumerate(zip(procs, outs, delays)):
            if p.poll() is not None:
                continue
            if delay is None:
                if now >= early_kill:
                    p.kill()
                continue
            if i not in seen and os.path.exists(str(o) + ".partial"):
                seen[i] = now
            if i in seen and now >= seen[i] + delay:
                p.kill()
                p.wait()
                killed_mid_write += os.path.exists(str(o) + ".partial") and not o.exists()
        time.sleep(0.002)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert all(p.returncode == -signal.SIGKILL for p in procs), [p.returncode for p in procs]
    for o in outs:
        assert not o.exists() or verify(str(o)) == [], o  # absent, or complete (killed after the rename)
    assert killed_mid_write >= 3, killed_mid_write
    # A rerun over a leftover .partial succeeds and cleans it up.
    leftover = next(o for o in outs if os.path.exists(str(o) + ".partial") and not o.exists())
    r = cli("convert", SRC, "-o", leftover)
    assert r.exit_code == 0, r.output
    assert verify(str(leftover)) == [] and not os.path.exists(str(leftover) + ".partial")


# ------------------------------------------------------------------------------------ the CLI itself

# Valid companions for a command's other file parameters, by parameter name; outputs are left alone.
_OUTPUTS = {"out", "out_dir", "output", "json_path", "junit", "html", "png", "spill_dir"}  # spill_dir: a working directory, like out_dir


def _commands(group=main, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def _invocation(path, cmd, files, bad_param=None, bad_value=None, out_dir=None):
    """argv for `cmd` with every required parameter filled in and `bad_param` set to `bad_value`."""
    args, opts = [], []
    for p in cmd.params:
        value = None
        if p.name == bad_param:
            value = bad_value
        elif p.required:
            if p.name in _OUTPUTS:
                value = os.path.join(out_dir, f"out-{p.name}")
            elif isinstance(p.type, click.Path):
                value = files.get(p.name, files["h5"])
            elif isinstance(p.type, click.Choice):
                value = p.type.choices[0]
            else:
                value = "a photograph of an astronaut"
        if value is None:
            continue
        if isinstance(p, click.Argument):
            args.append(str(value))
        else:
            opts += [p.opts[0], str(value)]
    return [*path, *args, *opts]


def test_every_command_answers_bad_files_with_one_line(base, tmp_path):
    """Each command x each file parameter x {missing, directory, empty, garbage, truncated .h5}."""
    from PIL import Image

    png = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    files = {"h5": base.h5, "model": base.h5, "file": base.h5, "src": SRC, "checkpoint": SRC, "init": str(png),
             "mask": str(png), "prompts_file": str(tmp_path / "prompts.txt")}
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "garbage").write_bytes(b"\x00\x13\x37 not a model" * 50)
    (tmp_path / "cut.h5").write_bytes(open(base.h5, "rb").read()[:5000])
    (tmp_path / "adir").mkdir()
    bad = {"missing": tmp_path / "nope.bin", "directory": tmp_path / "adir", "empty": tmp_path / "empty",
           "garbage": tmp_path / "garbage", "truncated_h5": tmp_path / "cut.h5"}
    swept = 0
    for path, cmd in _commands():
        r = cli(*path, "--help")
        assert r.exit_code == 0 and "Traceback" not in r.output, path
        if any(p.required for p in cmd.params):
            r = cli(*path)
            no_traceback(r)
            assert r.exit_code == 2, (path, r.output)
        inputs = [p for p in cmd.params if isinstance(p.type, click.Path) and p.name not in _OUTPUTS]
        for p in inputs:
            for kind, value in bad.items():
                out_dir = tmp_path / f"o-{'-'.join(path)}-{p.name}-{kind}"
                out_dir.mkdir()
                argv = _invocation(path, cmd, files, p.name, value, str(out_dir))
                r = cli(*argv)
                no_traceback(r)
                if kind in ("missing", "directory"):
                    assert r.exit_code != 0, (argv, r.output)
                assert r.exit_code in (0, 1, 2), (argv, r.exit_code, r.output)
                if r.exit_code and "error: " in r.stderr:
                    assert len(r.stderr.strip().splitlines()) == 1 or path == ("verify",), (argv, r.stderr)
                if r.exit_code == 2 and "error: " in r.stderr and kind == "garbage":
                    # --debug shows the traceback: the exception is not turned into a line.
                    rd = cli("--debug", *argv)
                    assert isinstance(rd.exception, (SdportError, OSError)), (argv, rd.exception)
                assert not [f for f in os.listdir(out_dir) if f.endswith(".partial")], argv
                swept += 1
    assert swept >= 4 * 5


def test_num_heads_must_be_positive(tmp_path):
    r = cli("convert", SRC, "-o", tmp_path / "x.h5", "--num-heads", "0")
    no_traceback(r)
    assert r.exit_code == 2 and "--num-heads" in r.output
    nothing_written(tmp_path / "x.h5")


# ----------------------------------------------------------------------------------------- prompts

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@pytest.mark.skipif("tokenize" not in main.commands, reason="no `sdport tokenize` command")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=300))
def test_tokenize_command_never_crashes(prompt):
    r = cli("tokenize", "--json", "--", prompt)
    no_traceback(r)
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert len(rec["ids"]) == 77 and rec["ids"][0] == 49406 and 49407 in rec["ids"]


@pytest.mark.skipif("tokenize" not in main.commands, reason="no `sdport tokenize` command")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_tokenize_prompt_file_of_any_bytes(tmp_path, data):
    p = tmp_path / "prompts.txt"
    p.write_bytes(data)
    r = cli("tokenize", "--file", p)
    no_traceback(r)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        one_line_error(r, names="not UTF-8 text")
        return
    assert r.exit_code == 0, r.output
    records = r.stdout.split("\n")[:-1]  # JSON escapes newlines inside strings; str.splitlines would also cut at U+2028
    assert len(records) == len(text.splitlines())
    assert [json.loads(line)["line"] for line in records] == list(range(1, len(records) + 1))
