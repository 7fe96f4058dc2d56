"""Parity within one model's memory: the reference runs first and spills to disk, is freed, and only
then is the candidate (native model or port) loaded; the spill's size is checked against the free
space before the run, reported after it, and deleted."""
from __future__ import annotations

import collections
import gc
import os
import weakref

import torch

from sdport.parity import harness, spill
from sdport.parity.reference import load as reference_load

from conftest import run_cli


def _live_parameters() -> int:
    """Elements in every torch Parameter alive in the process."""
    gc.collect()
    return sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and not o.is_meta)


class Residency:
    """Wraps the loaders: records a weak reference to every reference model built, and at each
    candidate load whether a reference model is still alive."""

    def __init__(self, monkeypatch, module, candidate_loader: str):
        self.refs: list[weakref.ref] = []
        self.alive_at_candidate: list[bool] = []
        real_ref = reference_load.load_reference

        def load_reference(*a, **k):
            out = real_ref(*a, **k)
            self.refs.append(weakref.ref(out[0]))
            return out

        real_candidate = getattr(module, candidate_loader)

        def load_candidate(*a, **k):
            self.alive_at_candidate.append(any(r() is not None for r in self.refs))
            return real_candidate(*a, **k)

        monkeypatch.setattr(reference_load, "load_reference", load_reference)
        monkeypatch.setattr(harness, "load_reference", load_reference)
        monkeypatch.setattr(module, candidate_loader, load_candidate)


def test_native_parity_never_holds_both_models(variants, monkeypatch):
    r = Residency(monkeypatch, harness, "load_native")
    result = harness.run_parity("unet", variants["lightning"], batch=1)
    assert result.report.passed
    assert r.refs and r.alive_at_candidate == [False]
    assert result.report.inputs["spilled_bytes"] > 0


def test_port_parity_never_holds_both_models(variants, monkeypatch):
    from sdport.parity.ports import run

    r = Residency(monkeypatch, run, "load_port")
    result = harness.run_parity("decoder", variants["lightning"], batch=1, port="diffusers")
    assert result.report.passed
    assert r.refs and r.alive_at_candidate == [False]


def test_live_parameters_at_candidate_load_are_one_models(variants, monkeypatch):
    """Counted, not only referenced: when the native model is loaded, no parameter of the reference
    is alive (the count is the text encoder's and the fixtures' at most, not a second UNet)."""
    counts = collections.OrderedDict()
    real_native, real_ref = harness.load_native, reference_load.load_reference

    def load_reference(*a, **k):
        out = real_ref(*a, **k)
        counts["reference"] = sum(p.numel() for p in out[0].parameters())
        return out

    def load_native(*a, **k):
        counts["live before the candidate"] = _live_parameters()
        return real_native(*a, **k)

    monkeypatch.setattr(harness, "load_reference", load_reference)
    monkeypatch.setattr(harness, "load_native", load_native)
    base = _live_parameters()
    harness.run_parity("unet", variants["lightning"], batch=1)
    assert counts["live before the candidate"] - base < counts["reference"]


def test_reports_are_deleted_and_spill_directory_is_used(variants, tmp_path):
    d = tmp_path / "spill"
    d.mkdir()
    code, out, err = run_cli("parity", "decoder", variants["lightning"], "--spill-dir", d, "--batch", "1")
    assert code == 0, err
    assert "spilled to disk:" in out
    assert os.listdir(d) == []  # the spill (and the on-the-fly conversion) are gone


def test_not_enough_room_is_refused_up_front(variants, converted, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    code, out, err = run_cli("parity", "unet", variants["lightning"], "--h5", converted["lightning"],
                             "--spill-dir", tmp_path, "--batch", "1")
    assert code == 2 and "spills about" in err and "1.0 KiB is free" in err and "--spill-dir" in err
    assert len(err.strip().splitlines()) == 1


def test_estimate_matches_what_is_spilled(variants):
    """The up-front figure (a pass on the meta device) is the size the reference stage writes."""
    r = harness.run_parity("encoder", variants["lightning"], batch=1, modes=("accumulated",))
    from sdport.convert.checkpoint import open_checkpoint
    from sdport.convert.detect import plan
    from sdport.parity.layers import layer_map

    with open_checkpoint(variants["lightning"]) as c:
        cp = plan(c, components={"encoder"}).components["encoder"]
    specs, _ = layer_map("encoder", cp.config, cp.source_format)
    inputs, _ = harness.draw_inputs("encoder", cp.config, batch=1)
    need = harness._spill_estimate("encoder", cp.config, cp.source_format, specs, inputs, ("accumulated",))
    spilled = r.report.inputs["spilled_bytes"]
    assert need > 0 and 0.9 * spilled <= need <= spilled  # the dump adds its HDF5 metadata


def test_calls_round_trip_exactly(tmp_path):
    with spill.Spill(str(tmp_path)) as s:
        calls = spill.Calls(s)
        x, t = torch.randn(2, 3), torch.tensor([1, 2])
        calls.put("a", (x, None, [t, 3]), {"context": x * 2, "flag": True})
        args, kwargs = calls.get("a")
        assert torch.equal(args[0], x) and args[1] is None and torch.equal(args[2][0], t) and args[2][1] == 3
        assert args[2][0].dtype == torch.int64 and torch.equal(kwargs["context"], x * 2) and kwargs["flag"] is True
        path = s.path
    assert not os.path.exists(path)


def test_txt2img_parity_never_holds_both_pipelines(variants, monkeypatch):
    from sdport.models import pipeline
    from sdport.parity import txt2img

    refs, natives, alive, others = [], [], [], []
    real_ref, real_load = txt2img.load_reference, pipeline.load_model

    def live(models):
        gc.collect()
        return sum(r() is not None for r in models)

    def load_reference(*a, **k):
        others.append(("reference", live(refs)))
        out = real_ref(*a, **k)
        refs.append(weakref.ref(out[0]))
        return out

    def load_model(*a, **k):
        alive.append(live(refs) > 0)
        others.append(("native", live(natives)))
        out = real_load(*a, **k)
        natives.append(weakref.ref(out))
        return out

    monkeypatch.setattr(txt2img, "load_reference", load_reference)
    monkeypatch.setattr(pipeline, "load_model", load_model)
    r = txt2img.run_txt2img(variants["lightning"], prompt="a cube", steps=2, height=64, width=64, layer_steps=[1])
    assert len(refs) == 3 and alive and not any(alive)  # UNet, text encoder and decoder: all freed first
    # and on each side one part at a time: text encoder, UNet, decoder, none loaded beside another
    assert others and all(n == 0 for _, n in others), [(i, *o) for i, o in enumerate(others) if o[1]]
    assert r.layers[1].report.layers


def test_a_missing_spill_directory_is_one_line(variants, tmp_path):
    code, out, err = run_cli("parity", "decoder", variants["lightning"], "--spill-dir", tmp_path / "nope")
    assert code == 2 and "nope" in err and "Traceback" not in err


FAULT_PROBE = """
import os, resource, sys
if sys.argv[1] == "sdport":
    import sdport  # noqa: F401  (before torch, as the command line imports it)
import torch
torch.zeros(1)
f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: 16,384 pages of 4 KiB, or 32 huge pages
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f, os.environ.get("THP_MEM_ALLOC_ENABLE"))
"""


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


def test_importing_sdport_gives_torchs_large_allocations_huge_pages():
    """sdport asks torch for transparent huge pages before torch is imported (torch reads the setting
    once, at its first allocation); a user's own value is kept. Where the kernel grants huge pages on
    request, a 64 MiB tensor then faults in a few dozen times instead of thousands."""
    import subprocess
    import sys

    def probe(how, **env):
        out = subprocess.run([sys.executable, "-c", FAULT_PROBE, how], capture_output=True, text=True, check=True,
                             env={**{k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}, **env})
        faults, value = out.stdout.split()
        return int(faults), value

    with_thp, value = probe("sdport")
    assert value == "1"
    kept, value = probe("sdport", THP_MEM_ALLOC_ENABLE="0")
    assert value == "0"
    mode = _thp_mode()
    if mode == "madvise":  # huge pages only where asked for: the setting is what makes the difference
        assert with_thp < 2048 < 16000 < kept, (with_thp, kept)
        plain, _ = probe("torch alone")
        assert plain > 16000, plain
    elif mode == "always":
        assert with_thp < 2048, with_thp
