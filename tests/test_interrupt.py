"""Ctrl-C at any moment of a command that writes a file: the destination holds nothing or the finished
file (never a `.partial`), the interrupt is never swallowed, and the exit code is 130.

The signal tests run real processes (an interrupt is a signal); the rest simulate it with CliRunner.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from sdport.cli import main
from sdport.convert import writer as layout_writer
from sdport.models.storage.layout import verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # fp16-on-CPU notes from load_model


def _interrupted_cleanly(p, err, out):
    for text in ("Traceback", "Exception ignored", "Aborted"):
        assert text not in err, err
    assert not os.path.exists(str(out) + ".partial"), (os.listdir(os.path.dirname(out)), err)
    assert not os.path.exists(out) or verify(str(out)) == [], err  # absent, or complete


def _importing_torch(pid: int) -> bool:
    """torch's shared library is mapped: the process is importing torch (or past it)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
def test_sigint_at_any_moment_of_a_conversion(tmp_path):
    """SIGINT while Python imports torch (timed from when torch's library is mapped), while the checkpoint
    is opened, while datasets are written (timed from when the .partial appears) and right after the output
    is renamed into place. Run side by side, each with its own seeded time. (A signal that lands before the
    interpreter has run a line of sdport, while it starts up, gets Python's own KeyboardInterrupt: on a busy
    machine that can take longer than any fixed delay, so no delay here counts from the process's start.)"""
    rng = random.Random(15)
    # (what the delay counts from, seconds): torch's import, the .partial's or the output's appearance
    plan = [("torch", 0.0), ("torch", 0.3), ("torch", rng.uniform(0.5, 1.5)), ("partial", 0.0),
            ("partial", rng.uniform(0.05, 0.3)), ("partial", rng.uniform(0.3, 0.8)), ("output", 0.0)]
    outs = [tmp_path / f"i{i}.h5" for i in range(len(plan))]
    procs = [subprocess.Popen([sys.executable, "-m", "sdport", "convert", SRC, "-o", str(o)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for o in outs]
    t0 = time.monotonic()
    seen: dict[int, float] = {}
    sent: set[int] = set()
    while len(sent) < len(procs) and time.monotonic() < t0 + 60:
        now = time.monotonic()
        for i, ((since, delay), p, o) in enumerate(zip(plan, procs, outs)):
            if i in sent or p.poll() is not None:
                continue
            if i not in seen and ((since == "torch" and _importing_torch(p.pid))
                                  or (since == "partial" and os.path.exists(str(o) + ".partial"))
                                  or (since == "output" and o.exists())):
                seen[i] = now
            if i in seen and now >= seen[i] + delay:
                p.send_signal(signal.SIGINT)
                sent.add(i)
        time.sleep(0.001)
    results = [p.communicate(timeout=60) for p in procs]
    assert len(sent) >= len(procs) - 1, (sent, plan)  # at most one finished before its signal
    for i, (p, o, (_, err)) in enumerate(zip(procs, outs, results)):
        _interrupted_cleanly(p, err, o)
        if i in sent:
            assert p.returncode == 130, (plan[i], p.returncode, err)
            assert err.strip().splitlines()[-1].startswith("interrupted"), err
    assert not any(o.exists() for o, (since, _) in zip(outs, plan) if since == "torch")


def test_sigint_during_export_and_parity_record(tmp_path):
    """The other two writers: export's PyTorch zip and a golden dump (parity record, stats-only)."""
    h5 = tmp_path / "t.h5"
    assert CliRunner().invoke(main, ["convert", SRC, "-o", str(h5)]).exit_code == 0
    cases = [(["export", h5, "-o", tmp_path / "back.ckpt"], tmp_path / "back.ckpt"),
             (["parity", "record", "unet", SRC, "-o", tmp_path / "g.h5", "--stats-only"], tmp_path / "g.h5")]
    procs = [subprocess.Popen([sys.executable, "-m", "sdport", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, _ in cases]
    t0, sent = time.monotonic(), set()
    while len(sent) < len(procs) and time.monotonic() < t0 + 60:
        for i, (p, (_, out)) in enumerate(zip(procs, cases)):
            if i not in sent and p.poll() is None and os.path.exists(str(out) + ".partial"):
                p.send_signal(signal.SIGINT)  # as soon as the partial file appears
                sent.add(i)
        time.sleep(0.001)
    for p, (args, out) in zip(procs, cases):
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, (args, p.returncode, err)
        assert "Traceback" not in err and "Exception ignored" not in err, err
        assert not os.path.exists(str(out) + ".partial"), (args, err)
    assert sent == {0, 1}


def test_an_interrupt_while_writing_removes_the_partial_and_exits_130(tmp_path, monkeypatch):
    """KeyboardInterrupt from the 10th dataset written: one line, exit 130, nothing at the destination."""
    calls = []
    write = layout_writer.LayoutWriter.write

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return write(self, *a, **k)

    monkeypatch.setattr(layout_writer.LayoutWriter, "write", interrupted)
    out = tmp_path / "o.h5"
    r = CliRunner().invoke(main, ["convert", SRC, "-o", str(out)])
    assert r.exit_code == 130, r.output
    assert r.stderr.strip().splitlines() == ["interrupted: no output written"], r.stderr
    assert os.listdir(tmp_path) == []


def test_an_interrupt_before_the_writer_is_entered_leaves_no_partial(tmp_path, monkeypatch):
    """The interrupt lands between the writer's constructor and its `with` (no __exit__ runs): the
    command line still removes the partial file the constructor created."""
    monkeypatch.setattr(layout_writer.LayoutWriter, "__enter__", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "o.h5"
    r = CliRunner().invoke(main, ["convert", SRC, "-o", str(out)])
    assert r.exit_code == 130, r.output
    assert os.listdir(tmp_path) == []


def test_sigint_during_an_import_is_raised_after_it(tmp_path):
    """An interrupt that arrives while a module is imported (torch's C++ initialisation runs Python code,
    where a KeyboardInterrupt aborts the process) is raised once the import has finished."""
    (tmp_path / "slow_module.py").write_text(
        "import signal, time\nsignal.raise_signal(signal.SIGINT)\nFINISHED = True\n")
    code = ("import signal, sys, time\n"
            "from sdport import cli\n"
            "signal.signal(signal.SIGINT, cli._on_sigint)\n"
            "cli._SIGINT['unwind'] = True\n"
            "try:\n"
            "    import slow_module\n"
            "    time.sleep(5)\n"
            "    print('not interrupted')\n"
            "except KeyboardInterrupt:\n"
            "    print('raised after import:', 'slow_module' in sys.modules and slow_module.FINISHED)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "raised after import: True", (r.stdout, r.stderr)
