"""A dump from any runtime against the reference: `--port dump:FILE.h5` (schema 2, docs/golden.md).

The reference runs once on the dump's own inputs, with hooks on the modules the dump names; each
layer is compared with the dump's entry as it completes (nothing else is held). A dump holds no
module that could re-run on the reference's input: the comparison is accumulated only. Layers the
dump does not hold are listed; names that are no module of the reference are listed with the reason.
"""
from __future__ import annotations

import os

import torch

from ..components import ParityError, entry
from ..layers import first_tensor
from ..metrics import METRICS, compare, default_tolerance
from ..report import ACCUMULATED, ISOLATED, LapClock, Report, collect_versions, make_layer
from .. import golden
from .run import MODEL, batch_first_rule


def _compare(reader: golden.ActivationReader, e: golden.Entry, y: torch.Tensor) -> tuple[dict, str]:
    a = y.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if tuple(a.shape) != e.shape:
        return ({m: float("nan") for m in METRICS} | {"nonfinite": 0},
                f"the dump holds shape {list(e.shape)}, the reference's output is {list(a.shape)} "
                f"(a schema-2 dump is in the reference's layout)")
    if reader.mode == golden.FULL:
        return compare(reader.full(e).numpy(), a), ""
    return compare(reader.sample(e), golden.strided(a, e.stride)), ""


def run_dump(component: str, checkpoint: str, spec, *, modes=(ACCUMULATED,), device: str = "cpu",
             dtype: str = "fp32", tolerance=None, num_heads: int | None = None, progress=None):
    from .. import harness
    from ..reference.load import load_reference

    progress = progress or harness.no_progress
    if ACCUMULATED not in modes:
        raise ParityError(f"--port {spec.label}: a dump holds no module to re-run on the reference's input; "
                          f"only accumulated mode compares it")
    pc = entry(component)
    dev = harness.resolve_device(device)
    harness.deterministic()
    tol = tolerance or default_tolerance(dtype)
    path = spec.target
    with golden.ActivationReader(path) as reader:
        if reader.version != golden.REFERENCE_NAMES:
            raise ParityError(f"{path}: a schema-{reader.version} dump names sdport's native layers; --port dump: "
                              f"reads schema {golden.REFERENCE_NAMES} (the reference's module names, docs/golden.md)")
        if reader.attr("component") != component:
            raise ParityError(f"{path}: the dump holds component {reader.attr('component')!r}, not {component}")
        ref, cfg, fmt = load_reference(component, checkpoint, num_heads=num_heads)
        ref = ref.to(dev)
        harness.check_input_shapes(component, cfg, reader.input_shapes(), path)
        inputs = reader.inputs()
        pc.check_values(cfg, inputs, path)
        mods = dict(ref.named_modules())
        unpaired: dict[str, str] = {}
        wanted: dict[str, golden.Entry] = {}
        whole = None
        for e in reader.entries:
            if e.name in ("", MODEL):
                whole = e
            elif e.name not in mods:
                unpaired[f"dump {e.name}"] = f"not a module of the reference {component}"
            else:
                wanted.setdefault(e.name, e)
        hooked = list(wanted) + ([pc.contract_module] if pc.contract_module and whole is not None else [])
        rows, contract = [], []
        clock = LapClock()

        seq_first = batch_first_rule(component, fmt)

        def on_output(name, out):
            y = first_tensor(out)
            if seq_first(name) and y.dim() == 3:
                y = y.transpose(0, 1)  # [T, B, D] -> [B, T, D], as a dump holds it
            if name == pc.contract_module and not contract:
                contract.append(y)
            e = wanted.get(name)
            if e is None or any(r[0] is e for r in rows):
                return
            m, why = _compare(reader, e, y)
            rows.append((e, m, why))
            clock.lap(name)
            progress("reference pass", len(rows), len(wanted))

        from ..capture import hooks
        with torch.no_grad(), hooks(ref, hooked, side="reference", on_output=on_output):
            clock.restart()
            out = pc.call_reference(ref, harness.to_device(inputs, dev), fmt)
        if whole is not None:
            y = contract[0] if pc.contract_module else pc.contract_output(out)
            m, why = _compare(reader, whole, y)
            rows.append((whole, m, why))
        for n, e in wanted.items():
            if not any(r[0] is e for r in rows):
                unpaired[f"dump {n}"] = "the reference module is not called as a module in this run"
        held = set(wanted)
        leaves = [n for n, m in mods.items() if n and any(True for _ in m.parameters(recurse=False))]
        missing = [n for n in leaves if n not in held]
        for n in missing:
            unpaired[f"reference {n}"] = "not in the dump"
        layers = tuple(make_layer(i, e.port_name or e.name or MODEL, e.name or MODEL, e.kind or type(mods.get(e.name)).__name__
                                  if e.name in mods else "model", e.shape, tol, accumulated=m,
                                  seconds=clock.seconds.get(e.name), note=why)
                       for i, (e, m, why) in enumerate(rows))
        desc = {"dump": os.path.basename(path), "producer": reader.attr("producer"), "dump_mode": reader.mode,
                "checkpoint": os.path.basename(checkpoint), "source_format": fmt, "reference_dtype": "fp32",
                "dump_dtype": reader.attr("dtype"), "dump_device": reader.attr("device"),
                "layers_in_dump": len(reader.entries), "reference_layers_with_weights": len(leaves),
                "reference_layers_missing_from_dump": len(missing),
                "inputs_description": reader.attr("inputs_description")}
        if ISOLATED in modes:
            desc["modes_note"] = "a dump holds no module to re-run: accumulated mode only"
    report = Report(component, (ACCUMULATED,), dtype, harness.device_name(dev), tol, desc, collect_versions(),
                    layers, candidate="dump")
    return harness.ParityResult(report, unpaired, {})
