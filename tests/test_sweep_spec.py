"""Sweep specs, cell keys, gate margins and the scheduler's retries, without running a model."""
from __future__ import annotations

import math
import os
import random

import pytest

from sdport.parity.metrics import DEFAULT_TOLERANCES, check
from sdport.parity.sweep import executors, spec as S
from sdport.parity.sweep.margins import margins

from conftest import REPO, run_cli
from test_layering import _files, imports

TINY = os.path.join(REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")


def write_spec(d, body: str) -> str:
    p = os.path.join(d, "spec.toml")
    with open(p, "w") as f:
        f.write(f'[checkpoints]\nbase = "{TINY}"\nother = {{ checkpoint = "{TINY}" }}\n' + body)
    return p


GRID = """
[[run]]
name = "unet"
parity = "unet"
mode = "isolated"
[run.grid]
seed = [0, 1, 2]
dtype = ["fp32", "bf16"]

[[run]]
name = "t2i"
parity = "txt2img"
checkpoints = ["base"]
prompt = "a cube"
seed = 7
[run.grid]
sampler = ["plms", "ddim"]
"""


def test_grid_expands_to_one_cell_per_combination(tmp_path):
    sp = S.load(write_spec(tmp_path, GRID))
    assert len(sp.cells) == 2 * 3 * 2 + 2
    unet = [c for c in sp.cells if c.run == "unet"]
    assert {(c.checkpoint.name, c.p["seed"], c.p["dtype"]) for c in unet} == \
        {(k, s, d) for k in ("base", "other") for s in (0, 1, 2) for d in ("fp32", "bf16")}
    assert all(c.p["mode"] == "isolated" and c.p["batch"] == 2 for c in unet)  # fixed and default parameters
    t2i = [c for c in sp.cells if c.run == "t2i"]
    assert [c.label for c in t2i] == ["t2i/base/sampler=plms", "t2i/base/sampler=ddim"]
    assert all(c.p["seed"] == 7 and c.p["steps"] == 50 for c in t2i)
    assert len({c.id for c in sp.cells}) == len(sp.cells)


def test_cell_keys_follow_parameters_and_checksums(tmp_path):
    sp = S.load(write_spec(tmp_path, GRID))
    sums = {TINY: "a" * 64}
    keys = [c.key(sums) for c in sp.cells]
    # base and other are the same file with the same parameters: the same key, different ids
    by = {(c.checkpoint.name, c.label.split("/", 2)[-1]): k for c, k in zip(sp.cells, keys) if c.run == "unet"}
    assert by[("base", "seed=0/dtype=fp32")] == by[("other", "seed=0/dtype=fp32")]
    assert len({k for c, k in zip(sp.cells, keys) if c.checkpoint.name == "base"}) == 6 + 2
    assert sp.cells[0].key({TINY: "b" * 64}) != keys[0]  # new weights: a new result


BAD = {
    "no seed": ('[[run]]\nparity = "unet"\n', "no seed"),
    "unknown parameter": ('[[run]]\nparity = "unet"\nseed = 0\nsteps = 3\n', "unknown parameter 'steps'"),
    "bad dtype": ('[[run]]\nparity = "unet"\nseed = 0\n[run.grid]\ndtype = ["fp64"]\n', "dtype = 'fp64'"),
    "bad kind": ('[[run]]\nparity = "vae"\nseed = 0\n', "parity = 'vae'"),
    "empty axis": ('[[run]]\nparity = "unet"\n[run.grid]\nseed = []\n', "non-empty list"),
    "unknown checkpoint": ('[[run]]\nparity = "unet"\nseed = 0\ncheckpoints = ["nope"]\n', "'nope' is not in"),
    "fixed and axis": ('[[run]]\nparity = "unet"\nseed = 0\n[run.grid]\nseed = [1]\n', "both fixed and a grid axis"),
    "not toml": ("[[run]\n", "not valid TOML"),
    "eta with plms": ('[[run]]\nparity = "txt2img"\nprompt = "x"\nseed = 0\neta = 0.5\n', "eta > 0 needs"),
    "bad port": ('[[run]]\nparity = "unet"\nseed = 0\nport = "tensorflow:x"\n', "port = tensorflow:x: expected diffusers"),
    "eta with dpmpp2m": ('[[run]]\nparity = "txt2img"\nprompt = "x"\nseed = 0\neta = 0.5\nsampler = "dpmpp2m"\n',
                         "dpmpp2m takes no eta"),
    "spacing with dpmpp2m": ('[[run]]\nparity = "txt2img"\nprompt = "x"\nseed = 0\nspacing = "trailing"\n'
                             'sampler = "dpmpp2m"\n', "spacing applies to plms and ddim"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_specs_get_one_line_and_exit_2(tmp_path, case):
    body, words = BAD[case]
    code, out, err = run_cli("sweep", write_spec(tmp_path, body), "--out", tmp_path / "out")
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_missing_spec_and_a_missing_checkpoint_are_one_line(tmp_path):
    code, _, err = run_cli("sweep", tmp_path / "nope.toml")
    assert code == 2 and "nope.toml: no such file" in err and err.count("\n") == 1
    p = tmp_path / "s.toml"
    p.write_text('[checkpoints]\nbase = "missing.ckpt"\n[[run]]\nparity = "unet"\nseed = 0\n')
    code, _, err = run_cli("sweep", p)
    assert code == 2 and "missing.ckpt: no such file" in err and err.count("\n") == 1


def test_a_txt2img_port_is_refused_in_one_line(tmp_path):
    from sdport.parity.sweep.cells import port_support

    body = '[[run]]\nparity = "txt2img"\nprompt = "x"\nseed = 0\n[run.grid]\nport = ["diffusers"]\n'
    code, _, err = run_cli("sweep", write_spec(tmp_path, body), "--out", tmp_path / "out")
    assert port_support() == {"component": True, "txt2img": False}
    assert code == 2 and err.count("\n") == 1 and "names port 'diffusers'" in err and "takes no port" in err


def test_port_files_are_resolved_and_key_the_cell(tmp_path):
    (tmp_path / "mine.py").write_text("def port(): pass\n")
    body = '[[run]]\nparity = "unet"\nseed = 0\nport = "torch:mine.py:port"\n'
    cell = S.load(write_spec(tmp_path, body), allow_port_code=True).cells[0]
    assert cell.p["port"] == f"torch:{tmp_path / 'mine.py'}:port"
    assert cell.files()[-1] == str(tmp_path / "mine.py")
    assert cell.key({TINY: "a" * 64, str(tmp_path / "mine.py"): "1" * 64}) != \
        cell.key({TINY: "a" * 64, str(tmp_path / "mine.py"): "2" * 64})
    graph = S.load(write_spec(tmp_path, body.replace("torch:mine.py:port", "onnx:g.onnx:basic"))).cells[0]
    assert graph.p["port"] == f"onnx:{tmp_path / 'g.onnx'}:basic" and graph.files()[-1] == str(tmp_path / "g.onnx")


@pytest.mark.parametrize("where", ["port = \"torch:{port}\"\n", "[run.grid]\nport = [\"diffusers\", \"torch:{port}\"]\n"])
def test_a_spec_runs_no_port_code_unless_the_command_line_allows_it(tmp_path, where):
    """A spec is a file like any other: a torch: port in it (a file or an installed module's function) is
    refused in one line before anything is imported, unless --allow-port-code is given."""
    marker = tmp_path / "ran"
    (tmp_path / "mine.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef port(ckpt, comp):\n    raise SystemExit(3)\n")
    for port in ("mine.py:port", "subprocess:call"):
        spec = write_spec(tmp_path, '[[run]]\nparity = "unet"\nseed = 0\n' + where.format(port=port))
        code, _, err = run_cli("sweep", spec, "--out", tmp_path / "out")
        assert code == 2 and err.count("\n") == 1 and "--allow-port-code" in err, err
        assert not marker.exists() and not (tmp_path / "out").exists()
    assert any(c.p["port"] == "torch:subprocess:call" for c in S.load(spec, allow_port_code=True).cells)


def test_a_spec_cannot_take_unbounded_memory_or_time(tmp_path):
    """A FIFO for a spec, a spec past its byte bound and a grid whose product is astronomical: each refused
    in one line, at once (the grid before it is expanded)."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    code, _, err = run_cli("sweep", fifo)
    assert code == 2 and "not a regular file" in err and err.count("\n") == 1, err
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * S.MAX_SPEC_BYTES + "\n")
    code, _, err = run_cli("sweep", big)
    assert code == 2 and "a sweep spec is a short TOML file" in err, err
    axes = "\n".join(f"{k} = [{', '.join(map(str, range(8, 1008, 8)))}]" for k in ("seed", "batch", "size"))
    body = '[[run]]\nparity = "unet"\n[run.grid]\n' + axes + "\n"
    code, _, err = run_cli("sweep", write_spec(tmp_path, body))
    assert code == 2 and "cells; at most 100,000" in err and err.count("\n") == 1, err
    code, _, err = run_cli("sweep", write_spec(tmp_path, '[sweep]\nattempts = 1000000000\n[[run]]\nparity = "unet"\nseed = 0\n'))
    assert code == 2 and "attempts = 1000000000" in err, err


def test_margins_are_negative_exactly_when_the_gate_fails():
    rng = random.Random(0)
    for _ in range(2000):
        tol = DEFAULT_TOLERANCES[rng.choice(list(DEFAULT_TOLERANCES))]
        m = {"rel_l2": 10 ** rng.uniform(-9, 0), "cosine": 1 - 10 ** rng.uniform(-12, -1),
             "psnr_db": rng.uniform(0, 150), "max_abs": 1.0, "mean_abs": 1.0, "sqnr_db": 10.0, "nonfinite": 0}
        if rng.random() < 0.05:
            m["rel_l2"] = rng.choice([0.0, math.nan, math.inf])
        ok, _ = check(m, tol)
        assert (min(margins(m, tol).values()) >= 0) == ok, (m, tol)
    assert margins({"rel_l2": 1e-7}, DEFAULT_TOLERANCES["fp32"].replace(cosine=None, psnr_db=None)) == \
        {"rel_l2": pytest.approx(2.0)}  # two decades under 1e-5


def test_only_the_ray_executor_imports_ray():
    bad = [f for top in ("models", "convert", "parity", "cli.py", "__init__.py") for f in _files(top)
           if any(n == "ray" or n.startswith("ray.") for n in imports(f))]
    assert [os.path.relpath(f, REPO) for f in bad] == [os.path.join("parity", "sweep", "ray_executor.py")]


class FakeExecutor(executors.Executor):
    """Runs cells inline; `deaths[label]` says how many times its worker dies running that cell."""

    kind = "fake"

    def __init__(self, workers, deaths):
        super().__init__(workers)
        self.deaths, self.started, self.ran = dict(deaths), 0, []

    def start(self, slot):
        self.started += 1
        return f"w{self.started}"

    def submit(self, slot, cell):
        return (slot, cell)

    def wait(self, handles):
        return handles[:1]

    def result(self, handle):
        cell = handle[1]
        if self.deaths.get(cell.label, 0) > 0:
            self.deaths[cell.label] -= 1
            raise executors.WorkerDied("killed")
        self.ran.append(cell.label)
        return {"status": "pass", "error": None}

    def close(self):
        pass


def test_a_dead_workers_cell_is_retried_then_an_error_cell(tmp_path):
    cells = [c for c in S.load(write_spec(tmp_path, GRID)).cells if c.run == "unet"][:4]
    a, b = cells[0].label, cells[1].label
    ex = FakeExecutor(2, {a: 1, b: 5})
    done, retried = {}, []
    executors.schedule(ex, cells, 3, on_done=lambda c, o: done.__setitem__(c.label, o),
                       on_retry=lambda c, w, why: retried.append(c.label))
    assert set(done) == {c.label for c in cells}  # no cell lost
    assert done[a]["status"] == "pass" and done[a]["attempts"] == 2
    assert done[b]["status"] == "error" and done[b]["attempts"] == 3 and "died 3 times" in done[b]["error"]
    assert all(done[c.label]["attempts"] == 1 for c in cells[2:])  # the neighbours are not charged
    assert retried == [a, b, b] and ex.started == 2 + 4  # every death replaced its worker
