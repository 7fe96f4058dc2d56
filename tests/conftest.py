"""Shared fixtures: the tiny CompVis-format checkpoints, built once per session by the reference code."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# `make test` runs two pytest-xdist workers: each runs torch on its share of the cores. The tiny models
# gain nothing from more threads than that (their ops are too small to split), and two workers of two
# threads each on two cores wait on each other. Only this process: the processes tests start choose
# their own counts (a sweep's workers do, and its tests compare their results bit for bit).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_DIR = os.path.join(REPO, "fixtures", "tiny")


@pytest.fixture(scope="session")
def variants(tmp_path_factory):
    """variant name -> path of a tiny checkpoint (all SD and ViT variants)."""
    pytest.importorskip("ldm")
    pytest.importorskip("transformers")
    from sdport.fixtures import build

    out = str(tmp_path_factory.mktemp("fixtures"))
    return {v: build.build_variant(v, out) for v in build.SD_VARIANTS + build.VIT_VARIANTS}


@pytest.fixture(scope="session")
def converted(variants, tmp_path_factory):
    """variant name -> path of its sdport .h5 (converted with default options)."""
    from sdport.convert.convert import convert

    out = tmp_path_factory.mktemp("converted")
    return {v: convert(p, str(out / f"{v}.h5")).out for v, p in variants.items()}


def run_cli(*args, cwd=None, env=None):
    """Run the sdport CLI in this process through click's CliRunner: (returncode, stdout, stderr).

    Like a process: an uncaught exception shows as its traceback on stderr with exit code 1 (so "no
    traceback" assertions mean what they say). Tests of what only a real process shows (signals, a
    closed stdout, interpreter exit) use run_cli_process."""
    import traceback

    from click.testing import CliRunner

    from sdport.cli import main

    here = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        r = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=True)
    finally:
        os.chdir(here)
    err = r.stderr
    code = r.exit_code
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
        code = 1
    return code, r.stdout, err


def run_cli_process(*args, cwd=None, env=None):
    """Run the sdport CLI in a subprocess: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "sdport.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env)
    return p.returncode, p.stdout, p.stderr
