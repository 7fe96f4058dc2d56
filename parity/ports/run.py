"""A module port against the reference, layer by layer, paired through the weights.

One run:
1. the reference and the port are loaded and paired (pairing.py);
2. the reference runs end to end with hooks on every paired module; each output (and, for isolated
   mode, each recorded input) is spilled to disk as it completes, in execution order; the reference
   is then freed;
3. the port runs end to end with hooks on its paired modules. As each completes, its output is
   compared with the reference's (accumulated mode); in isolated mode the module re-runs at once on
   the reference's recorded input and is compared again.

Isolated inputs: the port module's own recorded call is replayed with its main input (the first
tensor) replaced by the reference module's main input, in the port's layout, dtype and device. Its
other tensor inputs (a resnet's time embedding, the text context) are replaced by the reference
call's tensor of the same shape (the nearest one, where several have that shape); a port input with
no such tensor keeps the port's own value.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import torch

from ...models import memory
from ...models.components import component as native_entry
from ..components import TEXT_ENCODER, ParityError, entry
from ..layers import first_tensor
from ..metrics import METRICS, compare, default_tolerance
from ..report import ACCUMULATED, ISOLATED, MODES, LapClock, Report, collect_versions, make_layer
from ..spill import Calls, Spill, check_room, estimate_reference
from . import PortSpec, load_port
from .pairing import Pair, coverage_line, pair_modules

MODEL = "(model)"  # the row of the whole model: the port's return value against the reference's


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = []
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(x for x in v if isinstance(x, torch.Tensor))
    return out


def _metrics(a: torch.Tensor, r: torch.Tensor) -> dict:
    if a.numel() != r.numel():
        return {m: float("nan") for m in METRICS} | {"nonfinite": 0}
    return compare(a, r)


def to_reference_layout(pair: Pair, y: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A port output in the reference's layout: tokens [B, HW, C] -> [B, C, H, W] where the pairing
    says the port computes on tokens."""
    y = y.detach().to(device="cpu", dtype=torch.float32)
    if pair.tokens and y.dim() == 3 and len(shape) == 4 and y.numel() == torch.Size(shape).numel():
        return y.transpose(1, 2).reshape(shape)  # [B, HW, C] -> [B, C, HW] -> [B, C, H, W]
    return y


def _reference_output(outs: list[torch.Tensor]) -> torch.Tensor:
    """Several reference layers of one fused port layer: their outputs concatenated along the
    feature axis (channels of NCHW, the last axis of tokens)."""
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs, dim=1 if outs[0].dim() == 4 else -1)


def reference_text_context(checkpoint: str, ids: torch.Tensor, device) -> torch.Tensor:
    """The reference text encoder's context for token ids (--prompt on a port's UNet)."""
    from ..reference.load import load_reference

    model, _, fmt = load_reference(TEXT_ENCODER, checkpoint)
    with torch.no_grad():
        out = entry(TEXT_ENCODER).call_reference(model.to(device), {"ids": ids.to(device)}, fmt)
    return first_tensor(out).float()


def run_port(component: str, checkpoint: str, spec: PortSpec, *, modes=MODES, device: str = "cpu",
             dtype: str = "fp32", seed: int = 0, prompt: str | None = None, batch: int = 2,
             size: int | None = None, tolerance=None, num_heads: int | None = None,
             workdir: str | None = None, spill_dir: str | None = None, progress=None, build_port=None):
    """The port against the reference (`build_port(checkpoint, component)`, when given, builds the port
    in place of the spec's loader). One model is resident at a time: the reference runs first and
    spills every layer with weights (output, and recorded inputs for isolated mode) to disk, and is
    freed; then the port is loaded, paired with the reference from the checkpoint's tensors (read one
    at a time) and a weightless copy of the reference's structure, and run against the spill."""
    from .. import harness
    from ..reference.load import load_reference

    progress = progress or harness.no_progress
    pc = entry(component)
    modes = tuple(m for m in MODES if m in modes)
    dev, pdtype = harness.resolve_device(device), harness.dtype_of(dtype)
    harness.deterministic()
    tol = tolerance or default_tolerance(dtype)
    with contextlib.ExitStack() as stack:
        work = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sdport-port-", dir=spill_dir))
        cfg, fmt, structure, key_of = reference_structure(component, checkpoint, num_heads)
        encode = None
        if pc.takes_prompt_context and prompt is not None:
            encode = lambda ids: reference_text_context(checkpoint, ids, dev)  # noqa: E731
        cpu_inputs, desc = harness.draw_inputs(component, cfg, seed=seed, batch=batch, size=size, prompt=prompt,
                                               encode_text=encode)
        names = layers_with_weights(structure)
        need = estimate_spill(component, structure, cpu_inputs, fmt, names, ISOLATED in modes)
        check_room(work, need, ParityError)
        spill = stack.enter_context(Spill(work))
        ref, _, _ = load_reference(component, checkpoint, num_heads=num_heads)
        order, calls = reference_pass(component, ref.to(dev), names, harness.to_device(cpu_inputs, dev), fmt, spill,
                                      record_inputs=ISOLATED in modes, progress=progress)
        del ref
        memory.release()
        if build_port is None:
            port = load_port(spec, checkpoint, component, num_heads=num_heads, dtype=pdtype, device=dev)
        else:
            port = build_port(checkpoint, component).to(dev)
        with CheckpointTensors(checkpoint, key_of) as tensors:
            pairing = pair_modules(port, structure, tensors)
        desc.update(checkpoint=os.path.basename(checkpoint), port=spec.label, source_format=fmt,
                    reference_dtype="fp32", pairing=coverage_line(pairing.coverage),
                    pairing_counts=pairing.coverage)
        rows, not_run = port_pass(component, port, pairing, spill, order, calls, cpu_inputs, modes, progress)
        desc["spilled_bytes"] = spill.bytes
    layers = tuple(make_layer(i, name, refname, kind, shape, tol, accumulated=acc,
                              isolated=iso, seconds=sec, note=note)
                   for i, (name, refname, kind, shape, acc, iso, sec, note) in enumerate(rows))
    unpaired = {f"port {k or MODEL}": v for k, v in pairing.port_unpaired.items()}
    unpaired.update({f"reference {k or MODEL}": v for k, v in pairing.reference_unpaired.items()})
    unpaired.update(not_run)
    report = Report(component, modes, dtype, harness.device_name(dev), tol, desc, collect_versions(), layers,
                    candidate="port")
    return harness.ParityResult(report, unpaired, dict(pairing.unmatched))


def reference_structure(component: str, checkpoint: str, num_heads: int | None):
    """(config, source format, the reference model with its parameters on the meta device: names,
    classes and shapes, no weights; {reference parameter: checkpoint key}), from one plan."""
    from ...convert.checkpoint import open_checkpoint
    from ...convert.detect import plan
    from ..reference.load import weightless_reference

    with open_checkpoint(checkpoint) as ckpt:
        p = plan(ckpt, components={component}, num_heads=num_heads)
    if component not in p.components:
        raise ParityError(f"{checkpoint}: no {component} component in this checkpoint "
                          f"(it holds: {', '.join(p.components) or 'none'})")
    cp = p.components[component]
    key_of = {s: cp.key_of[s] for r in cp.rows for s in r.sources}
    return cp.config, cp.source_format, weightless_reference(component, cp.config, cp.source_format), key_of


class CheckpointTensors:
    """{reference parameter name: fp32 tensor}, each read from the checkpoint when asked for (and not
    kept): the weights the pairing compares with, without a second resident copy of the reference."""

    def __init__(self, checkpoint: str, key_of: dict[str, str]):
        from ...convert.checkpoint import open_checkpoint

        self.ckpt = open_checkpoint(checkpoint)
        self.key_of = key_of

    def keys(self):
        return self.key_of.keys()

    def __iter__(self):
        return iter(self.key_of)

    def __len__(self):
        return len(self.key_of)

    def __contains__(self, name):
        return name in self.key_of

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.ckpt.tensor(self.key_of[name]).float()

    def items(self):
        return ((k, self[k]) for k in self.key_of)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.ckpt.close()


def layers_with_weights(structure: torch.nn.Module) -> list[str]:
    """Every module of the reference that holds weights (itself or below), the whole model excepted:
    the candidates a port's modules may pair with."""
    return [n for n, m in structure.named_modules() if n and next(m.parameters(), None) is not None]


def estimate_spill(component, structure, cpu_inputs, fmt, names, record_inputs: bool) -> int:
    pc = entry(component)
    outs = list(names) + ([pc.contract_module] if pc.contract_module else [])
    return estimate_reference(component, structure, cpu_inputs, fmt, outs, names if record_inputs else ())


def batch_first_rule(component: str, fmt: str):
    """name -> whether that reference module computes sequence-first ([T, B, D]: OpenCLIP's blocks as
    ldm ran them). Such activations are compared batch-first, as every port and dump holds them."""
    prefixes = entry(component).sequence_first.get(fmt, ())
    return lambda name: bool(prefixes) and name.startswith(prefixes)


def _hooked(pairing) -> list[Pair]:
    """The pairs observed through hooks (the whole model is compared through the calls' results)."""
    return [p for p in pairing.pairs if p.port != "" and "" not in p.reference]


@torch.no_grad()
def reference_pass(component, ref, names: list[str], inputs, fmt, spill: Spill, *, record_inputs: bool, progress):
    """Run the reference, spilling the output (and, for isolated mode, the call) of each module in
    `names` as it completes. Returns (the modules in completion order, their recorded calls). The
    whole model's output goes in as MODEL."""
    pc = entry(component)
    hooked = list(names) + ([pc.contract_module] if pc.contract_module and pc.contract_module not in names else [])
    calls = Calls(spill)
    order: list[str] = []
    seq_first = batch_first_rule(component, fmt)

    def on_input(name, args, kwargs):
        if record_inputs and f"in:{name}" not in calls:
            if seq_first(name) and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
                args = (args[0].transpose(0, 1), *args[1:])  # [T, B, D] -> [B, T, D]
            calls.put(f"in:{name}", args, kwargs)

    def on_output(name, out):
        key = f"out:{name}"
        if key in spill:
            return  # called again: the first call counts
        y = first_tensor(out)
        spill.put(key, y.transpose(0, 1) if seq_first(name) and y.dim() == 3 else y)  # [T, B, D] -> [B, T, D]
        order.append(name)
        progress("reference pass", len(order), len(hooked))

    from ..capture import hooks
    with hooks(ref, hooked, side="reference", on_input=on_input, on_output=on_output):
        out = pc.call_reference(ref, inputs, fmt)
    whole = spill.get(f"out:{pc.contract_module}") if pc.contract_module else pc.contract_output(out)
    spill.put(f"out:{MODEL}", whole)
    return order, calls


def _in_reference_order(pairing, ref_order: list[str]) -> list[Pair]:
    """The observed pairs, in the order their reference layers completed (a fused pair when its last
    part did); pairs whose reference layers never ran are left out."""
    at = {n: i for i, n in enumerate(ref_order)}
    pairs = [p for p in _hooked(pairing) if all(r in at for r in p.reference)]
    return sorted(pairs, key=lambda p: max(at[r] for r in p.reference))


@torch.no_grad()
def port_pass(component, port, pairing, spill: Spill, ref_order: list[str], ref_calls: Calls, cpu_inputs: dict,
              modes, progress):
    """Run the port; compare each paired module's output as it completes (and re-run it on the
    reference's input, for isolated mode). Returns the report rows in reference order and
    {pair: why} for pairs the port never ran."""
    order = _in_reference_order(pairing, ref_order)
    not_run = {f"port {p.port}": f"paired with {p.reference_name}, whose reference module did not run"
               for p in _hooked(pairing) if p not in order}
    by_port = {p.port: p for p in order}
    calls: dict[str, tuple] = {}
    results: dict[str, tuple] = {}
    clock = LapClock()
    state = {"replaying": False}
    mods = dict(port.named_modules())

    def on_input(name, args, kwargs):
        if not state["replaying"] and name not in calls and name not in results:
            calls[name] = (args, kwargs)

    def on_output(name, out):
        if state["replaying"] or name in results:
            return
        p = by_port[name]
        r = _reference_output([spill.get(f"out:{m}") for m in p.reference])
        y = to_reference_layout(p, first_tensor(out), tuple(r.shape))
        if y.numel() != r.numel():
            # Same weights, different outputs: the port computes more or less inside the module (a
            # norm applied to the pooled token only). The model's output row still compares the end.
            results[name] = (None, None, tuple(r.shape), f"outputs of different sizes (port {list(y.shape)}, "
                             f"reference {list(r.shape)}): not compared")
            calls.pop(name, None)
            return
        acc = _metrics(y, r) if ACCUMULATED in modes else None
        iso, why = None, ""
        if ISOLATED in modes:
            args, kwargs = calls.get(name, ((), {}))
            try:
                state["replaying"] = True
                iso = _replay(p, mods[name], args, kwargs, ref_calls, r)
            except Exception as e:  # the port module does not take the reference's input as given
                why = f"isolated re-run failed: {type(e).__name__}: {str(e)[:120]}"
            finally:
                state["replaying"] = False
        results[name] = (acc, iso, tuple(r.shape), why)
        calls.pop(name, None)
        progress("port pass" + (" (and isolated re-runs)" if ISOLATED in modes else ""), len(results), len(order) + 1)
        clock.lap(name)

    from ..capture import hooks
    args = [cpu_inputs[n] for n in native_entry(component).inputs]
    with hooks(port, list(by_port), side="port", on_input=on_input, on_output=on_output):
        clock.restart()
        out = port(*args)
    y = first_tensor(out).detach().float().cpu()
    r = spill.get(f"out:{MODEL}")
    m = _metrics(y, r)
    rows = []
    for p in order:
        if p.port not in results:
            not_run[f"port {p.port}"] = f"paired with {p.reference_name} but not called as a module"
            continue
        acc, iso, shape, why = results[p.port]
        if acc is None and iso is None:
            not_run[f"port {p.port}"] = why
            continue
        note = "; ".join(p.notes + ((why,) if why else ()))
        rows.append((p.port, p.reference_name, p.kind, shape, acc, iso, clock.seconds.get(p.port), note))
    whole = next((p for p in pairing.pairs if p.port == "" or "" in p.reference), None)
    notes = "; ".join(whole.notes) if whole else ""
    # The inputs of the whole model are the model inputs on both sides: its isolated error is its error.
    rows.append((MODEL, MODEL, "model", tuple(r.shape), m if ACCUMULATED in modes else None,
                 m if ISOLATED in modes else None, None, notes))
    return rows, not_run


def _replay(p: Pair, module, args, kwargs, ref_calls: Calls, r: torch.Tensor):
    """The port module on the reference's recorded inputs (module docstring)."""
    call = ref_calls.get(f"in:{p.reference[0]}")
    if call is None:
        return None
    ref_in = _tensors(*call)
    if not ref_in:
        return None
    main, extras = ref_in[0], ref_in[1:]
    if p.tokens and main.dim() == 4:
        main = main.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
    used: set[int] = set()
    first = [True]

    def swap(v):
        if not isinstance(v, torch.Tensor):
            return v
        if first[0]:
            first[0] = False
            return main.to(device=v.device, dtype=v.dtype) if v.is_floating_point() else v
        if not v.is_floating_point():
            return v
        same = [(i, e) for i, e in enumerate(extras) if i not in used and tuple(e.shape) == tuple(v.shape)]
        if not same:
            return v
        vf = v.detach().float().cpu()
        i, e = min(same, key=lambda ie: float((ie[1].float() - vf).norm()))
        used.add(i)
        return e.to(device=v.device, dtype=v.dtype)

    new_args = tuple(swap(a) for a in args)
    new_kwargs = {k: swap(v) for k, v in kwargs.items()}
    out = module(*new_args, **new_kwargs)
    return _metrics(to_reference_layout(p, first_tensor(out), tuple(r.shape)), r)
