"""Progress on stderr: a bar on a terminal, a plain line every few seconds elsewhere (pipes, logs, CliRunner),
with counts of a known total, a rate and an ETA; for conversion, generation and every parity command."""
from __future__ import annotations

import io
import os
import re

import pytest
from click.testing import CliRunner

from sdport import progress
from sdport.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")
GOLDEN = os.path.join(REPO, "fixtures", "golden", "sd-tiny-unet.stats.h5")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # fp16-on-CPU notes from load_model


@pytest.fixture
def every_update(monkeypatch):
    """A plain line at every update, instead of every few seconds."""
    monkeypatch.setattr(progress, "EVERY", 0.0)


@pytest.fixture(scope="module")
def tiny_h5(tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "tiny.h5"
    assert CliRunner().invoke(main, ["convert", TINY, "-o", str(out)]).exit_code == 0
    return str(out)


def lines(stderr, prefix):
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def test_plain_lines_when_not_a_terminal(every_update):
    f = io.StringIO()
    with progress.Progress("work", "layer", 4, file=f) as p:
        for i in range(1, 4):
            p.update(i)
    out = f.getvalue().splitlines()
    assert "\r" not in f.getvalue()
    assert [re.match(r"work: (\d)/4 layers, \d+ s, [\d.e+-]+ layers/s", line).group(1) for line in out] == \
        ["1", "2", "3", "3"]  # three updates, and how it ended
    assert all("ETA" in line for line in out)


def test_a_short_stage_stays_silent():
    f = io.StringIO()
    with progress.Progress("work", "layer", 4, file=f) as p:  # far less than EVERY seconds
        p.update(4)
    assert f.getvalue() == ""


def test_a_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    f = Tty()
    with progress.Progress("work", "step", 5, file=f) as p:
        p.update(5)
    assert "\r" in f.getvalue() and "5/5" in f.getvalue()


def test_convert_counts_tensors_against_their_total(every_update, tmp_path):
    r = CliRunner().invoke(main, ["convert", TINY, "-o", str(tmp_path / "o.h5")])
    assert r.exit_code == 0, r.output
    got = lines(r.stderr, "converting: ")
    assert got and re.match(r"converting: 1/(\d+) tensors", got[0]), r.stderr
    total = re.match(r"converting: 1/(\d+) ", got[0]).group(1)
    assert got[-1].startswith(f"converting: {total}/{total} tensors"), got[-1]


def test_generation_steps(every_update, tiny_h5, tmp_path):
    r = CliRunner().invoke(main, ["txt2img", tiny_h5, "x", "--steps", "3", "--spacing", "trailing",
                                  "--height", "16", "--width", "16", "-o", str(tmp_path / "o.png")])
    assert r.exit_code == 0, r.output
    assert [line.split(",")[0] for line in lines(r.stderr, "txt2img: ")] == \
        ["txt2img: 1/3 steps", "txt2img: 2/3 steps", "txt2img: 3/3 steps", "txt2img: 3/3 steps"]


def test_parity_check_and_record_show_layers(every_update, tiny_h5, tmp_path):
    r = CliRunner().invoke(main, ["parity", "check", "--golden", GOLDEN, "--h5", tiny_h5])
    assert r.exit_code == 0, r.output
    got = lines(r.stderr, "parity check: native pass: ")
    assert got and "layers/s" in got[0] and re.search(r": (\d+)/\1 layers", got[-1]), r.stderr
    r = CliRunner().invoke(main, ["parity", "record", "text_model", TINY, "-o", str(tmp_path / "g.h5"),
                                  "--stats-only", "--batch", "1"])
    assert r.exit_code == 0, r.output
    assert re.search(r"parity record text_model: reference pass: (\d+)/\1 layers", r.stderr), r.stderr


def test_parity_component_shows_both_passes(every_update, tiny_h5):
    r = CliRunner().invoke(main, ["parity", "text_model", TINY, "--h5", tiny_h5, "--batch", "1"])
    assert r.exit_code == 0, r.output
    ref = lines(r.stderr, "parity text_model: reference pass: ")
    nat = lines(r.stderr, "parity text_model: native pass: ")
    iso = lines(r.stderr, "parity text_model: isolated native layers: ")
    assert ref and nat and iso, r.stderr
    total = re.search(r": (\d+)/\1 layers", ref[-1]).group(1)
    assert f"/{total} layers" in nat[-1]  # the layers the reference pass recorded (one may never fire natively)
    assert f"{total}/{total} layers" in iso[-1]  # every recorded layer re-runs on its recorded call


def test_parity_txt2img_shows_steps_and_layers(every_update, tiny_h5):
    r = CliRunner().invoke(main, ["parity", "txt2img", TINY, "--h5", tiny_h5, "--prompt", "x", "--steps", "2",
                                  "--spacing", "trailing", "--height", "16", "--width", "16", "--layer-steps", "1"])
    assert r.exit_code == 0, r.output
    for stage in ("reference sampler: 2/2 steps", "native sampler: 2/2 steps", "teacher-forced steps: 2/2 steps"):
        assert f"parity txt2img: {stage}" in r.stderr, (stage, r.stderr)
    assert lines(r.stderr, "parity txt2img: step 1 reference pass"), r.stderr
    assert lines(r.stderr, "parity txt2img: step 1 native pass"), r.stderr
