"""Sweeps on the tiny checkpoint, for real: local worker processes and a local Ray cluster on 127.0.0.1
(one per module). Two checkpoints, one with a planted fault (its .h5 has one encoder weight scaled
by 1.01), two seeds each: exactly the faulty checkpoint's cells fail, Ray and the local pool agree cell
by cell, a worker killed mid-sweep loses no cell, and a killed sweep resumed recomputes none of the
cells it finished."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import h5py
import pytest

from sdport.parity.sweep import spec as S
from sdport.parity.sweep.executors import LocalExecutor
from sdport.parity.sweep.run import run_sweep

from conftest import REPO, run_cli

TINY = os.path.join(REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")
PLANTED = "down.1.res.0.shortcut.weight"
SEEDS = (0, 1)


def spec_text(base_h5: str, faulty_h5: str) -> str:
    return f"""[sweep]
name = "tiny"
[checkpoints]
base = {{ checkpoint = "tiny.ckpt", h5 = "{base_h5}" }}
faulty = {{ checkpoint = "tiny.ckpt", h5 = "{faulty_h5}" }}
[[run]]
name = "enc"
parity = "encoder"
mode = "both"
[run.grid]
seed = {list(SEEDS)}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from sdport.convert.convert import convert

    d = tmp_path_factory.mktemp("sweep")
    shutil.copy(TINY, d / "tiny.ckpt")
    convert(str(d / "tiny.ckpt"), str(d / "good.h5"))
    shutil.copy(d / "good.h5", d / "bad.h5")
    with h5py.File(d / "bad.h5", "r+") as f:
        w = f["encoder"][PLANTED]
        w[...] = w[...] * 1.01
    (d / "spec.toml").write_text(spec_text("good.h5", "bad.h5"))
    (d / "regressed.toml").write_text(spec_text("bad.h5", "bad.h5"))  # the next commit broke base too
    return d


@pytest.fixture(scope="module")
def local(work):
    """The sweep on two local workers, through the command line."""
    code, out, err = run_cli("sweep", work / "spec.toml", "--out", work / "local", "--workers", "2")
    return code, out, err, records(work / "local")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def records(out) -> dict[str, dict]:
    cells = os.path.join(out, "cells")
    return {r["label"]: r for r in (json.load(open(os.path.join(cells, n))) for n in sorted(os.listdir(cells)))}


def result_of(r: dict) -> tuple:
    """What a cell computed (not where or when)."""
    return r["status"], r["worst_margin"], r["worst_where"], r["summary"], r["failures"]


LABELS = [f"enc/{k}/seed={s}" for k in ("base", "faulty") for s in SEEDS]


def test_the_planted_checkpoint_fails_exactly_its_cells(work, local):
    code, out, err, recs = local
    assert code == 1, (out, err)
    assert sorted(recs) == sorted(LABELS)
    assert {l: r["status"] for l, r in recs.items()} == {l: ("fail" if "faulty" in l else "pass") for l in LABELS}
    for label in LABELS[2:]:
        assert recs[label]["failures"][0].startswith("culprit #") and "down.1.res.0.shortcut" in recs[label]["failures"][0]
        assert recs[label]["worst_margin"] < 0 < recs[label.replace("faulty", "base")]["worst_margin"]
    assert "4 cells, 2 pass, 2 fail, 0 error" in out
    assert "sweep: 4/4 cells" in err  # progress on stderr
    # one model load per worker and per checkpoint: a native and a reference model, never per cell
    assert sum(r["model_loads"] for r in recs.values()) <= 2 * 2 * 2
    assert len({r["worker"] for r in recs.values()}) == 2


def test_the_store_summary_and_junit(work, local):
    recs = local[3]
    out = work / "local"
    for r in recs.values():  # every record has its full report beside it
        rep = json.load(open(out / r["report"]))
        assert rep["format"] == "sdport.parity.report" and rep["passed"] == (r["status"] == "pass")
        assert (out / r["html"]).is_file()
    assert not [n for _, _, ns in os.walk(out) for n in ns if n.startswith(".tmp-")]
    assert os.listdir(out / "running") == []
    import tempfile
    pids = [r["worker"].rsplit(":", 1)[1] for r in recs.values()]
    assert not [n for n in os.listdir(tempfile.gettempdir())
                if any(n.startswith(f"sdport-sweep-worker-{p}-") for p in pids)]  # the workers cleaned up
    page = (out / "summary.html").read_text()
    for label in LABELS[2:]:  # failing cells link to their reports
        assert f"href=\"{recs[label]['html']}\"" in page
    import xml.etree.ElementTree as ET
    root = ET.parse(out / "junit.xml").getroot()
    cases = root.findall(".//testcase")
    assert sorted(c.get("name") for c in cases) == sorted(LABELS)
    assert sorted(c.get("name") for c in cases if c.find("failure") is not None) == LABELS[2:]


def test_a_cell_is_what_run_parity_computes(work, local):
    """The worker's cached models give the report run_parity gives on its own, bit for bit at the same
    torch thread count (a different count sums in another order)."""
    import torch

    from sdport.parity.harness import run_parity
    from sdport.parity.report import encode_nonfinite

    threads = torch.get_num_threads()
    torch.set_num_threads(LocalExecutor(2).threads)
    try:
        res = run_parity("encoder", str(work / "tiny.ckpt"), h5=str(work / "bad.h5"), seed=1)
    finally:
        torch.set_num_threads(threads)
    rep = json.load(open(work / "local" / local[3]["enc/faulty/seed=1"]["report"]))
    assert [l["metrics"] for l in rep["layers"]] == encode_nonfinite([l.metrics for l in res.report.layers])
    assert not res.report.passed and rep["culprit"]["native"] == res.report.culprit.native


def test_ray_gives_the_local_pools_results(work, local, ray_cluster):
    from sdport.parity.sweep.ray_executor import RayExecutor

    sp = S.load(str(work / "spec.toml"))
    res = run_sweep(sp, str(work / "ray"), lambda: RayExecutor(None, workers=2))
    assert res.executor.startswith("2 ray workers") and res.computed == 4
    ray_recs = records(work / "ray")
    assert {l: result_of(r) for l, r in ray_recs.items()} == {l: result_of(r) for l, r in local[3].items()}
    assert all(r["worker"] and r["attempts"] == 1 for r in ray_recs.values())


def _kill_first_worker(out, stop):
    """SIGKILL the worker of the first cell seen in flight; returns what it killed."""
    running = os.path.join(out, "running")
    while not stop.is_set():
        names = os.listdir(running) if os.path.isdir(running) else []
        for n in names:
            try:
                rec = json.load(open(os.path.join(running, n)))
            except (OSError, ValueError):
                continue
            os.kill(int(rec["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
            return rec
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("kind", ["ray", "local"])
def test_a_worker_killed_mid_sweep_loses_no_cell(work, local, kind, request):
    out = str(work / f"killed-{kind}")
    if kind == "ray":
        request.getfixturevalue("ray_cluster")
        from sdport.parity.sweep.ray_executor import RayExecutor
        make = lambda: RayExecutor(None, workers=2)  # noqa: E731
    else:
        make = lambda: LocalExecutor(2)  # noqa: E731
    stop, killed = threading.Event(), []
    t = threading.Thread(target=lambda: killed.append(_kill_first_worker(out, stop)))
    t.start()
    log = []
    try:
        res = run_sweep(S.load(str(work / "spec.toml")), out, make, log=log.append)
    finally:
        stop.set()
        t.join()
    assert killed and killed[0] is not None
    recs = records(out)
    assert sorted(recs) == sorted(LABELS) and res.retried == 1
    assert sum(r["attempts"] for r in recs.values()) == len(LABELS) + 1
    assert {l: result_of(r) for l, r in recs.items()} == {l: result_of(r) for l, r in local[3].items()}
    assert any("died running" in line for line in log)
    import tempfile
    dead = killed[0]["worker"].rsplit(":", 1)[1]  # the killed worker's folder went with the next start
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"sdport-sweep-worker-{dead}-")]


def test_a_killed_sweep_resumes_without_recomputing_its_finished_cells(work, local):
    out = work / "resumed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(REPO),
                                                                    os.environ.get("PYTHONPATH")]))}
    p = subprocess.Popen([sys.executable, "-m", "sdport.cli", "sweep", str(work / "regressed.toml"), "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if os.path.isdir(out / "cells") and len(os.listdir(out / "cells")) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    before = {n: (out / "cells" / n).read_bytes() for n in os.listdir(out / "cells") if not n.startswith(".tmp-")}
    assert 2 <= len(before) < len(LABELS), "the sweep was to be killed before it finished"
    code, _, err = run_cli("sweep", work / "regressed.toml", "--out", out)
    assert code == 2 and "--resume" in err  # a store is never overwritten by accident
    sp = S.load(str(work / "regressed.toml"))
    res = run_sweep(sp, str(out), lambda: LocalExecutor(1), resume=True)
    assert res.reused == len(before) and res.computed == len(LABELS) - len(before)
    assert {n: (out / "cells" / n).read_bytes() for n in before} == before  # untouched
    assert not [n for _, _, ns in os.walk(out) for n in ns if n.startswith(".tmp-")]  # a kill's half-writes are gone
    again = run_sweep(sp, str(out), lambda: pytest.fail("nothing is left to run"), resume=True)
    assert again.computed == 0 and again.reused == len(LABELS)

    # the regression view: base passed in the first sweep and fails in this one
    code, text, _ = run_cli("sweep", "compare", work / "local", out, "--json", work / "cmp.json")
    assert code == 1
    cmp = json.load(open(work / "cmp.json"))
    assert sorted(cmp["regressions"]) == LABELS[:2] and cmp["fixed"] == []
    for c in cmp["cells"]:  # faulty is unchanged (to rounding: this sweep's one worker has more threads)
        if "base" in c["label"]:
            assert c["margin_delta"] < -0.5 and c["status"] == ["pass", "fail"]
        else:
            assert abs(c["margin_delta"]) < 1e-6 and c["status"] == ["fail", "fail"]
    assert "REGRESSED enc/base/seed=0" in text


def test_txt2img_cells_reuse_the_workers_pipelines(work):
    """The second txt2img cell loads nothing and computes what run_txt2img computes on its own."""
    from sdport.parity.sweep.cells import CellRunner
    from sdport.parity.txt2img import run_txt2img

    p = work / "t2i.toml"
    p.write_text('[checkpoints]\nbase = { checkpoint = "tiny.ckpt", h5 = "good.h5" }\n[[run]]\nname = "t2i"\n'
                 'parity = "txt2img"\nprompt = "a red cube"\nsteps = 4\nsampler = "ddim"\nheight = 16\nwidth = 16\n'
                 '[run.grid]\nseed = [5, 6]\n'
                 '[[run]]\nname = "bad"\nparity = "txt2img"\nprompt = "x"\nsteps = 3\nheight = 16\nwidth = 16\nseed = 0\n')
    cells = S.load(str(p)).cells
    runner = CellRunner()
    first, second, bad = runner.run(cells[0]), runner.run(cells[1]), runner.run(cells[2])
    assert first["model_loads"] >= 2 and second["model_loads"] == 0
    # a run that raises is an error cell with its one-line reason, not a crashed worker
    assert bad["status"] == "error" and "--steps 3" in bad["error"] and bad["report_json"] is None
    workdir = runner.workdir
    runner.close()
    assert not os.path.exists(workdir)
    fresh = run_txt2img(str(work / "tiny.ckpt"), h5=str(work / "good.h5"), prompt="a red cube", steps=4,
                        sampler="ddim", height=16, width=16, layer_steps=[], seed=6)
    got = json.loads(second["report_json"])
    assert second["status"] == "pass" and got["steps"] == json.loads(json.dumps(fresh.to_dict()["steps"]))
    assert got["image"] == json.loads(json.dumps(fresh.image))
    assert got["conditioning"] == json.loads(json.dumps(fresh.conditioning))



def test_port_cells_run_the_port_against_the_reference(work):
    """A port as a grid axis: the cell's candidate is the port, paired from the weights."""
    from sdport.parity.sweep.cells import CellRunner

    p = work / "port.toml"
    p.write_text('[checkpoints]\nbase = { checkpoint = "tiny.ckpt", h5 = "good.h5" }\n[[run]]\nname = "dec"\n'
                 'parity = "decoder"\nseed = 0\nbatch = 1\n[run.grid]\nport = ["diffusers"]\n')
    (cell,) = S.load(str(p)).cells
    runner = CellRunner()
    try:
        r = runner.run(cell)
    finally:
        runner.close()
    assert r["status"] == "pass", r
    report = json.loads(r["report_json"]) if isinstance(r["report_json"], str) else r["report_json"]
    assert report["candidate"] == "port" and "(100%)" in report["inputs"]["pairing"]
