"""The benchmarks' shared summariser: one `results` record from timed runs (no benchmark is run here)."""
from __future__ import annotations

import importlib.util
import os

from conftest import REPO


def _common():
    spec = importlib.util.spec_from_file_location("_bench_common", os.path.join(REPO, "bench", "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summarise_child_runs():
    runs = [{"seconds": 3.0, "peak_rss_mib": 100.04, "peak_above_baseline_mib": 40.0, "build_s": 1.0},
            {"seconds": 1.0, "peak_rss_mib": 120.26, "peak_above_baseline_mib": 55.54, "build_s": 2.0},
            {"seconds": 2.0, "peak_rss_mib": 90.0, "peak_above_baseline_mib": 30.0, "build_s": 3.0}]
    rec = _common().summarise("sdport", runs, tensors=7)
    assert rec == {"impl": "sdport", "median_s": 2.0, "runs_s": [3.0, 1.0, 2.0], "peak_rss_mib": 120.3,
                   "peak_above_baseline_mib": 55.5, "tensors": 7}
    assert list(rec)[:4] == ["impl", "median_s", "runs_s", "peak_rss_mib"]


def test_summarise_without_memory_figures_and_with_an_outside_peak():
    common = _common()
    assert common.summarise("cp", [{"seconds": 1.5}, {"seconds": 2.5}]) == {
        "impl": "cp", "median_s": 2.0, "runs_s": [1.5, 2.5], "peak_rss_mib": None}
    # A worker's peak is measured once at exit, outside the runs: `extra` sets it.
    rec = common.summarise("ldm", ({"seconds": s} for s in (4.0, 5.0, 6.0)), peak_rss_mib=812.5, load_s=1.25)
    assert rec == {"impl": "ldm", "median_s": 5.0, "runs_s": [4.0, 5.0, 6.0], "peak_rss_mib": 812.5,
                   "load_s": 1.25}
