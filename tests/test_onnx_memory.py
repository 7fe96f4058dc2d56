"""`--port onnx:` within one model's memory (docs/onnx.md, "Memory"): pairing reads the graph's and the
checkpoint's tensors one at a time, the reference runs and is freed before any ONNX Runtime session
exists, and no protobuf held by Python carries the graph's weights when a session is built. A graph
with external data is read from its files as they are (validated first: docs/security.md)."""
from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from conftest import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def graphs(converted, tmp_path_factory):
    """The tiny UNet as exported (weights inline) and the same graph with every weight external."""
    out = tmp_path_factory.mktemp("onnx-memory")
    code, _, err = run_cli("export", converted["lightning"], "--onnx", out / "inline", "--components", "unet")
    assert code == 0, err
    m = onnx.load(str(out / "inline" / "unet.onnx"))
    (out / "external").mkdir()
    onnx.save(m, str(out / "external" / "unet.onnx"), save_as_external_data=True, location="unet.onnx.data",
              size_threshold=0)
    return {"inline": out / "inline" / "unet.onnx", "external": out / "external" / "unet.onnx"}


def _run(ckpt, graph, **kw):
    from sdport.parity.harness import run_parity

    return run_parity("unet", ckpt, port=f"onnx:{graph}", batch=1, size=8, **kw)


def _rows(r):
    return [(l.native, l.reference, l.metrics, l.note) for l in r.report.layers], r.unpaired


def _alive(refs) -> int:
    return sum(r() is not None for r in refs)


def _live_parameters() -> int:
    return sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and not o.is_meta)


class Residency:
    """Wraps what holds weights: the reference model (load_reference), the checkpoint tensors pairing
    reads (CheckpointTensors), the graph's initializers as arrays (Graph.initializer_array), ORT
    sessions (onnx._session). At each of them it records what else is alive."""

    def __init__(self, monkeypatch):
        from sdport.parity.ports import onnx as port, onnx_graph, run
        from sdport.parity.reference import load as reference_load

        self.models, self.tensors, self.arrays, self.sessions, self.graphs = [], [], [], [], []
        self.events: list[tuple[str, dict]] = []
        self.reference_numel = 0
        real_load, real_get = reference_load.load_reference, run.CheckpointTensors.__getitem__
        real_array, real_session, real_graph = onnx_graph.Graph.initializer_array, port._session, onnx_graph.Graph.__init__
        real_module = port._reference_module

        def load_reference(*a, **k):
            self.note("reference model")
            out = real_load(*a, **k)
            self.models.append(weakref.ref(out[0]))
            self.reference_numel = max(self.reference_numel, sum(p.numel() for p in out[0].parameters()))
            return out

        def getitem(obj, name):
            t = real_get(obj, name)
            self.tensors.append(weakref.ref(t))
            return t

        def initializer_array(graph, name):
            self.note("graph array")
            a = real_array(graph, name)
            self.arrays.append(weakref.ref(a))
            return a

        def session(src, *a, **k):
            self.note("session", src=src)
            s = real_session(src, *a, **k)
            self.sessions.append(weakref.ref(s))
            return s

        def graph_init(graph, *a, **k):
            real_graph(graph, *a, **k)
            self.graphs.append(weakref.ref(graph))

        def reference_module(*a, **k):
            self.note("reference module")
            return real_module(*a, **k)

        monkeypatch.setattr(reference_load, "load_reference", load_reference)
        monkeypatch.setattr(run.CheckpointTensors, "__getitem__", getitem)
        monkeypatch.setattr(onnx_graph.Graph, "initializer_array", initializer_array)
        monkeypatch.setattr(onnx_graph.Graph, "__init__", graph_init)
        monkeypatch.setattr(port, "_session", session)
        monkeypatch.setattr(port, "_reference_module", reference_module)

    def note(self, event: str, src=None) -> None:
        from sdport.parity.ports.onnx import INLINE_LIMIT

        # Collected and counted at the first session, the reference's events and the node rule's module;
        # at the many others (one per initializer, segment, cut) by references alone.
        full = event != "graph array" and not (event == "session" and "session" in {e for e, _ in self.events})
        if full:
            gc.collect()
        seen = {"models": _alive(self.models), "tensors": _alive(self.tensors), "arrays": _alive(self.arrays),
                "sessions": _alive(self.sessions)}
        if full:
            seen["parameters"] = _live_parameters()
        # Weights inside protobufs Python holds: the graphs' initializers, and the model a session is built from.
        protos = [g().initializers.values() for g in self.graphs if g() is not None]
        if src is not None and not isinstance(src, str):
            protos.append(src.graph.initializer)
        seen["inline"] = max((len(t.raw_data) for p in protos for t in p), default=0)
        seen["inline_limit"] = INLINE_LIMIT
        self.events.append((event, seen))


def _check_one_model_at_a_time(r: Residency, base_parameters: int):
    kinds = [e for e, _ in r.events]
    assert {"reference model", "graph array", "session"} <= set(kinds), kinds
    # Pairing reads graph arrays before the reference is loaded; every session comes after it.
    assert kinds.index("graph array") < kinds.index("reference model") < kinds.index("session")
    for event, seen in r.events:
        if event == "reference model":   # the graph's weights are not in memory, neither as arrays nor in ORT
            assert seen["arrays"] == 0 and seen["sessions"] == 0, (event, seen)
        if event == "graph array":       # pairing: no reference model, no ORT session
            assert seen["models"] == 0 and seen["sessions"] == 0, (event, seen)
        if event in ("session", "reference module"):  # no reference weights, as a model or as tensors read for pairing
            assert seen["models"] == 0 and seen["tensors"] == 0 and seen["arrays"] == 0, (event, seen)
            assert seen["sessions"] == 0, (event, seen)  # one session at a time
            assert seen.get("parameters", base_parameters) - base_parameters < r.reference_numel, (event, seen)
            assert seen["inline"] < seen["inline_limit"], (event, seen)


@pytest.mark.parametrize("kind", ["inline", "external"])
def test_reference_and_graph_weights_are_never_resident_together(variants, graphs, monkeypatch, kind):
    gc.collect()
    base = _live_parameters()
    r = Residency(monkeypatch)
    result = _run(variants["lightning"], graphs[kind])
    assert result.report.passed and r.reference_numel > 0
    _check_one_model_at_a_time(r, base)
    # Segments and isolated cuts are sessions of models built here: many, each after the reference.
    assert sum(e == "session" for e, _ in r.events) > 10


def test_the_node_rule_loads_only_the_culprits_module_after_the_sessions(variants, graphs, monkeypatch, tmp_path):
    from onnx import numpy_helper

    m = onnx.load(str(graphs["inline"]))
    i = next(i for i, t in enumerate(m.graph.initializer) if t.name == "down.1.res.0.conv1.weight")
    a = numpy_helper.to_array(m.graph.initializer[i]) * np.float32(1.01)
    m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a.astype(np.float32), "down.1.res.0.conv1.weight"))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    gc.collect()
    base = _live_parameters()
    r = Residency(monkeypatch)
    rep = _run(variants["lightning"], tmp_path / "bad.onnx", modes=("isolated",)).report
    assert not rep.passed and "first node off the reference: down.1.res.0.conv1/Conv" in rep.culprit.note
    assert "reference module" in [e for e, _ in r.events]
    _check_one_model_at_a_time(r, base)


def test_a_graph_with_external_data_gives_the_same_report_and_is_left_as_it_is(variants, graphs):
    folder = graphs["external"].parent
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
    inline, external = _run(variants["lightning"], graphs["inline"]), _run(variants["lightning"], graphs["external"])
    assert _rows(inline) == _rows(external)
    assert inline.report.inputs["pairing_counts"] == external.report.inputs["pairing_counts"]
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()) == before


def _external_variant(src, dst_dir, change):
    """The external graph of `src` with the first weight's external_data changed by `change(fields,
    folder)` (a dict of its key/value pairs, edited in place)."""
    m = onnx.load(str(src), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.data_location == 1 and len(t.dims) == 4)
    fields = {e.key: e.value for e in t.external_data}
    change(fields, dst_dir, t)
    del t.external_data[:]
    for k, v in fields.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    onnx.save(m, str(dst_dir / "unet.onnx"))
    return dst_dir / "unet.onnx"


def _copy_data(src_dir, dst_dir):
    import shutil

    shutil.copy(src_dir / "unet.onnx.data", dst_dir / "unet.onnx.data")


def _absolute(f, d, t):
    f["location"] = str(d / "unet.onnx.data")


def _climbs(f, d, t):
    f["location"] = "../" + d.name + "/unet.onnx.data"


def _link(f, d, t):
    os.symlink(d / "unet.onnx.data", d / "link.data")
    f["location"] = "link.data"


def _directory(f, d, t):
    (d / "dir.data").mkdir()
    f["location"] = "dir.data"


def _fifo(f, d, t):
    os.mkfifo(d / "fifo.data")
    f["location"] = "fifo.data"


def _past_the_end(f, d, t):
    f["offset"] = str(os.path.getsize(d / "unet.onnx.data") - 4)


def _wrong_length(f, d, t):
    f["length"] = str(int(f["length"]) - 4)


def _missing(f, d, t):
    f["location"] = "nowhere.data"


def _wrapping_shape(f, d, t):
    del t.dims[:]
    t.dims.extend([2 ** 32, 2 ** 32])  # 2^64 elements: 0 in int64 arithmetic
    f["length"] = "0"


@pytest.mark.parametrize("change, says", [
    (_absolute, "not a relative path"), (_climbs, "leaves the graph's folder"), (_link, "passes through a link"),
    (_directory, "not a regular file"), (_fifo, "not a regular file"), (_past_the_end, "lie outside"),
    (_wrong_length, "its external data"), (_missing, "cannot open"), (_wrapping_shape, "its external data"),
])
def test_hostile_external_data_is_refused_in_one_line(variants, graphs, tmp_path, change, says):
    d = tmp_path / "g"
    d.mkdir()
    _copy_data(graphs["external"].parent, d)
    bad = _external_variant(graphs["external"], d, change)
    code, _, err = run_cli("parity", "unet", variants["lightning"], "--port", f"onnx:{bad}", "--batch", "1",
                           "--size", "8")
    assert code == 2 and "external data refused" in err and says in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
