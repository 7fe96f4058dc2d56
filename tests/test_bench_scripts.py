"""Every bench/ script runs at its smallest setting and writes the JSON its docstring promises.

Nothing here is timed: the figures live in bench/README.md. This keeps the scripts that produce them
working, their records in the documented shape (`results`: impl, median_s, runs_s, peak_rss_mib), and
their temporary files cleaned up. Each script runs its implementations side by side (ldm, diffusers,
sdport), so most of these are marked slow (`pytest -m slow`); the default run keeps one.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def tmpdir_env(tmp_path_factory):
    """A private TMPDIR for the scripts, holding the tiny checkpoint they share (as common.checkpoint_for
    builds it), so that what they leave behind can be checked."""
    from sdport.fixtures.build import build_variant

    tmp = tmp_path_factory.mktemp("bench-tmp")
    build_variant("lightning", str(tmp / "sdport-bench-tiny"), "tiny")
    return tmp


def _run(tmpdir_env, script: str, *args: str) -> dict:
    out = tmpdir_env / f"{script}.json"
    env = {**os.environ, "TMPDIR": str(tmpdir_env)}
    p = subprocess.run([sys.executable, os.path.join(BENCH, script), *args, "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    record = json.loads(out.read_text())
    for written in (out, out.with_suffix(".report.json")):  # bench_quant writes its parity report beside
        written.unlink(missing_ok=True)
    left = sorted(n for n in os.listdir(tmpdir_env) if n != "sdport-bench-tiny" and not n.startswith("torchinductor"))
    assert left == [], f"{script} left {left} in its temporary folder"
    return record


def _tiny_ckpt(tmpdir_env) -> str:
    return str(tmpdir_env / "sdport-bench-tiny" / "sd-tiny.ckpt")


def _check_results(record: dict, impls: set[str], runs: int) -> dict[str, dict]:
    assert {"benchmark", "settings", "machine", "versions", "results"} <= set(record)
    by_impl = {r["impl"]: r for r in record["results"]}
    assert set(by_impl) == impls
    for r in by_impl.values():
        assert list(r)[:4] == ["impl", "median_s", "runs_s", "peak_rss_mib"], r
        assert len(r["runs_s"]) == runs and all(s > 0 for s in r["runs_s"])
        assert math.isclose(r["median_s"], statistics.median(r["runs_s"]), rel_tol=1e-9)
    return by_impl


@pytest.mark.slow
@pytest.mark.parametrize("script,kind", [("bench_unet.py", "unet"), ("bench_vae.py", "decoder")])
def test_component_benchmarks(tmpdir_env, script, kind):
    rec = _run(tmpdir_env, script, "--size", "tiny", "--runs", "2")
    assert rec["benchmark"] == kind
    rows = _check_results(rec, {"ldm", "diffusers", "sdport"}, 2)
    assert all(r["peak_rss_mib"] > 0 for r in rows.values())
    assert rec["agreement"]["sdport_vs_ldm"]["rel_l2"] < 1e-4  # fp32: the same function
    assert set(rec["ratios"]) >= {"sdport/ldm", "sdport/diffusers"}


@pytest.mark.slow
def test_load_benchmark(tmpdir_env):
    readers = "sdport,sdport-map-each,sdport-eager,sdport-unpacked,layout-mmap,safetensors,h5py-read"
    rec = _run(tmpdir_env, "bench_load.py", "--size", "tiny", "--runs", "1", "--readers", readers)
    _check_results(rec, set(readers.split(",")), 1)
    assert rec["same_weights"] is True


@pytest.mark.slow
def test_memory_benchmark(tmpdir_env):
    rec = _run(tmpdir_env, "bench_memory.py", "--size", "tiny", "--chunks", "none,64")
    assert [r["chunk"] for r in rec["results"]] == [None, 64]
    assert all(r["rel_l2"] < 1e-6 for r in rec["results"])  # chunked attention is exact
    assert {k["kernel"] for k in rec["attention_kernel"]} == {"sdpa", "textbook"}


def test_convert_benchmark(tmpdir_env):
    rec = _run(tmpdir_env, "bench_convert.py", "--ckpt", _tiny_ckpt(tmpdir_env), "--runs", "1")
    _check_results(rec, {"sdport-convert", "cp", "cp+sync"}, 1)
    assert rec["verify_problems"] == []


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [
    ("bench_walk.py", ()),
    ("bench_io.py", ("--mib", "1", "--runs", "1")),
    ("bench_quant.py", ("--latent", "8")),
    ("bench_mmap_threshold.py", ("--settings", "default,1+thp", "--forwards", "1")),
])
def test_checkpoint_benchmarks(tmpdir_env, script, args):
    rec = _run(tmpdir_env, script, "--ckpt", _tiny_ckpt(tmpdir_env), *args)
    assert {"benchmark", "settings", "machine", "versions"} <= set(rec)


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [
    ("bench_attention.py", ("--tokens", "64", "--dim", "8", "--runs", "1")),
    ("bench_dtypes.py", ("--channels", "16", "--side", "8", "--gemm", "64", "--runs", "1")),
])
def test_kernel_benchmarks(tmpdir_env, script, args):
    rec = _run(tmpdir_env, script, *args)
    assert {"benchmark", "settings", "machine", "versions", "results"} <= set(rec) and rec["results"]


@pytest.mark.slow
def test_float64_agreement(tmpdir_env):
    out = tmpdir_env / "agreement.json"
    env = {**os.environ, "TMPDIR": str(tmpdir_env)}
    p = subprocess.run([sys.executable, os.path.join(BENCH, "float64_agreement.py"), "decoder", _tiny_ckpt(tmpdir_env),
                        "--size", "8", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(out.read_text())
    out.unlink()
    assert 0 < rec["reference fp32 vs reference fp64"] < 1e-5
    assert rec["diffusers fp64 vs reference fp64"] < 1e-12  # the same function, to float64 rounding
