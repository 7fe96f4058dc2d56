"""Per-layer parity: the reference (ldm / transformers / open_clip) against the native model, paired
through the layer map of the mapping table, on inputs drawn from a seed.

One run is two stages, so that one model and one layer's activations are resident at a time:
1. the reference stage: the reference runs end to end with hooks; as each layer completes (execution
   order), its output is spilled to a temporary activation dump and, for isolated mode, its recorded
   call (inputs) to a spill file; the reference is then freed;
2. the candidate stage: the native model is loaded and runs end to end with hooks, each layer
   compared with the dump as it completes (accumulated); then each layer re-runs on the reference's
   recorded call and is compared again (isolated). The spill is deleted.

`record` is pass 1 alone, written to a golden dump; `check` is pass 2 alone, against a golden dump
(it imports no reference package).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from ..models.components import NAMES
from ..models.errors import cut
from ..models import devices, memory
from ..models.load import load_model, read_config
from ..models.unet import ATTENTION_PRECISIONS
from ..models.storage import partial as partials
from ..models.storage.layout import LayoutReader, file_sha256
from . import golden
from .capture import hooks, modules_by_name
from .spill import Calls, Spill, check_room, estimate_reference
from .components import TEXT_ENCODER, Drawer, ParityError, cast_floats, entry
from .reference.load import load_reference, parameters_on_meta  # noqa: F401 (parameters_on_meta: tests)
from .layers import LayerSpec, first_tensor, layer_map, native_args, reference_output
from .metrics import METRICS, Tolerance, compare, default_tolerance
from .report import ACCUMULATED, ISOLATED, MODES, LapClock, Report, collect_versions, make_layer

COMPONENTS = NAMES


# ---------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(device: str) -> torch.device:
    """'cpu' / 'cuda' / 'cuda:N' (or 'meta' in tests) -> torch.device; CUDA must be present."""
    return devices.resolve_device(device, error=ParityError)


def deterministic() -> None:
    """fp32 means fp32: no TF32 matmuls or convolutions (they round inputs to 10-bit mantissas)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False


def dtype_of(name: str) -> torch.dtype:
    return devices.resolve_dtype(name, error=ParityError)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


# ---------------------------------------------------------------------------------------------
# Inputs


def default_size(component: str, cfg) -> int:
    """Spatial side of the drawn input: latents of 16 (tiny) / 64 (SD v1), images of 32 latent px."""
    return entry(component).default_size(cfg)


def check_input_shapes(component: str, cfg, shapes: dict[str, tuple], path: str) -> None:
    """Refuse (before reading them) inputs the model does not take or far larger than parity draws."""
    entry(component).check_inputs(cfg, shapes, path)


def draw_inputs(component: str, cfg, *, seed: int = 0, batch: int = 2, size: int | None = None,
                prompt: str | None = None, encode_text=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Model inputs on the CPU from one seeded CPU generator (device-independent), and their
    description for the report. `encode_text(texts) -> context` gives the UNet a text context."""
    pc = entry(component)
    d = Drawer(seed, batch)
    pc.draw(cfg, d, size or pc.default_size(cfg), prompt, encode_text)
    return d.inputs, d.desc


def to_device(inputs: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def call_native(component: str, model, inputs: dict, dtype: torch.dtype):
    return entry(component).call_native(model, inputs, dtype)


def call_reference(component: str, model, inputs: dict, source_format: str):
    return entry(component).call_reference(model, inputs, source_format)


# ---------------------------------------------------------------------------------------------
# Models


def load_native(h5: str, component: str, device, dtype: torch.dtype):
    """(native model, its config, the source format recorded in the file)."""
    with LayoutReader(h5) as r:
        if not r.has(component):
            raise ParityError(f"{h5}: no /{component} group (the file holds: {', '.join(r.components()) or 'none'})")
        fmt = r.group_attrs(component).get("source_format", "compvis")
        model = load_model(r, component, device=device, dtype=dtype)
    return model, model.config, fmt


def ensure_h5(checkpoint: str, h5: str | None, workdir: str, components, num_heads: int | None = None) -> str:
    """`h5` when given, else the checkpoint converted (dtype kept) into `workdir`."""
    if h5 is not None:
        return h5
    from ..convert.convert import convert
    out = os.path.join(workdir, Path(checkpoint).stem + ".h5")
    convert(checkpoint, out, components=set(components), force=True, num_heads=num_heads)
    return out


def text_encoder_fn(h5: str, device):
    """texts -> context with the native tokenizer (framed with the encoder's pad id) and the native fp32
    text encoder of `h5` (for --prompt on the UNet)."""
    from ..models.tokenizer import default_tokenizer

    model, _, _ = load_native(h5, TEXT_ENCODER, device, torch.float32)
    tok = default_tokenizer()

    @torch.no_grad()
    def encode(texts):
        ids = torch.tensor([tok(s, model.config.pad_id) for s in texts])  # [N, 77]
        return model(ids.to(device))
    return encode


# ---------------------------------------------------------------------------------------------
# The two passes


def _safe_compare(a: torch.Tensor, r: torch.Tensor) -> dict:
    """compare(), or all-NaN metrics (which fail every gate) when the shapes cannot line up."""
    if a.numel() != r.numel():
        return {m: float("nan") for m in METRICS} | {"nonfinite": 0}
    return compare(a, r)


@torch.no_grad()
def reference_pass(component: str, ref, specs: list[LayerSpec], inputs: dict, source_format: str,
                   on_layer) -> dict[str, str]:
    """Run the reference; call `on_layer(spec, output, args, kwargs)` as each layer completes, with
    the output in the native layout and the recorded input call. Returns {native: reason} for the
    layers that never completed."""
    by_ref: dict[str, list[tuple[LayerSpec, int]]] = {}
    for s in specs:
        for i, r in enumerate(s.reference):
            by_ref.setdefault(r, []).append((s, i))
    calls: dict[str, tuple] = {}
    outs: dict[str, list] = {}
    done: set[str] = set()

    def on_input(rname, args, kwargs):
        for s, part in by_ref[rname]:
            if part == 0 and s.native not in done:
                calls[s.native] = (args, kwargs)

    def on_output(rname, out):
        for s, part in by_ref[rname]:
            if s.native in done:
                continue  # called again (none of the supported models does): the first call counts
            got = outs.setdefault(s.native, [None] * len(s.reference))
            got[part] = out
            if all(o is not None for o in got):
                done.add(s.native)
                y = reference_output(s, outs.pop(s.native))
                args, kwargs = calls.pop(s.native)
                on_layer(s, y, args, kwargs)

    with hooks(ref, list(by_ref), side="reference", on_input=on_input, on_output=on_output):
        call_reference(component, ref, inputs, source_format)
    return {s.native: f"reference module {s.reference_name} is not called as a module"
            for s in specs if s.native not in done}


@torch.no_grad()
def native_pass(component: str, model, names, inputs: dict, dtype: torch.dtype, on_output) -> set[str]:
    """Run the native model; `on_output(name, output)` as each named layer completes. Returns the
    names that fired."""
    fired: set[str] = set()

    def hook(name, out):
        if name not in fired:
            fired.add(name)
            on_output(name, first_tensor(out))

    with hooks(model, list(names), side="native", on_output=hook):
        call_native(component, model, inputs, dtype)
    return fired


# ---------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass(frozen=True)
class ParityResult:
    report: Report
    unpaired: dict[str, str]     # native layer -> why it could not be compared
    not_compared: dict[str, str]  # native parameter -> the block that covers it

    def to_dict(self) -> dict:
        return {**self.report.to_dict(), "unpaired": self.unpaired, "covered_by_block": self.not_compared}

    def write(self, json_path=None, junit=None, html=None) -> None:
        if json_path:
            from .report import encode_nonfinite  # same strict-JSON encoding as Report.to_json
            text = json.dumps(encode_nonfinite(self.to_dict()), indent=1, allow_nan=False)
            Path(json_path).write_text(text + "\n")
        if junit:
            self.report.to_junit(junit)
        if html:
            self.report.to_html(html, unpaired=self.unpaired)


def no_progress(what: str, done: int, total: int | None = None, unit: str = "layer") -> None:
    pass


def display(name: str) -> str:
    """The whole model is the module named "" (the OpenAI ViT's "model" block): say so in reports."""
    return name or "(model)"


def _layer_records(order, names, kinds, shapes, acc, iso, tol, seconds=None):
    layers = []
    for i, n in enumerate(order):
        a, s = acc.get(n), iso.get(n)
        if a is None and s is None:
            continue
        layers.append(make_layer(i, display(n), display(names[n]), kinds[n], shapes[n], tol,
                                 accumulated=a, isolated=s, seconds=(seconds or {}).get(n)))
    return tuple(layers)


def run_parity(component: str, checkpoint: str, *, h5: str | None = None, modes=MODES, device: str = "cpu",
               dtype: str = "fp32", seed: int = 0, prompt: str | None = None, batch: int = 2,
               size: int | None = None, tolerance: Tolerance | None = None, patch_native=None,
               workdir: str | None = None, progress=None, port: str | None = None,
               num_heads: int | None = None, spill_dir: str | None = None,
               attention_precision: str = "fp32", onnx_memory: int | None = None,
               calibrate: bool = False) -> ParityResult:
    """Reference vs native for one component, or vs a port (`port`: 'diffusers', 'torch:FILE.py:FUNC',
    'dump:FILE.h5', 'onnx:FILE.onnx[:LEVEL]'; parity/ports/). `patch_native(model)` may alter the native model before the run
    (tests plant faults that way); `progress(what, done, total)` as layers complete. `num_heads`
    (in no shape of a checkpoint) applies to the reference and to a port built by sdport.
    `attention_precision` of the native UNet in fp16/bf16 (models.unet.attend); the reference runs fp32.
    `calibrate`: gate each layer at no less than twice the reference's own fp32 noise floor (calibrate.py)."""
    if calibrate:
        from . import calibrate as cal
        from .ports import parse_spec
        cal.refuse(parse_spec(port).kind if port is not None else None)
        result = run_parity(component, checkpoint, h5=h5, modes=modes, device=device, dtype=dtype, seed=seed,
                            prompt=prompt, batch=batch, size=size, tolerance=tolerance, patch_native=patch_native,
                            workdir=workdir, progress=progress, port=port, num_heads=num_heads,
                            spill_dir=spill_dir, attention_precision=attention_precision, onnx_memory=onnx_memory)
        floors = cal.noise_floor(component, checkpoint, modes=modes, device=device, seed=seed, prompt=prompt,
                                 batch=batch, size=size, num_heads=num_heads, spill_dir=spill_dir, progress=progress)
        return cal.calibrate(result, floors)
    if attention_precision not in ATTENTION_PRECISIONS:
        raise ParityError(f"--attention-precision {attention_precision}: choose {' or '.join(ATTENTION_PRECISIONS)}")
    if attention_precision != "fp32" and (component != "unet" or port is not None):
        raise ParityError(f"--attention-precision {attention_precision} applies to the native UNet"
                          + (" (a port computes attention its own way)" if port is not None else f", not to {component}"))
    if onnx_memory is not None and not (port or "").startswith("onnx:"):
        raise ParityError("--onnx-memory applies to --port onnx:FILE.onnx")
    if port is not None:
        from . import ports
        spec = ports.parse_spec(port)
        if h5 is not None:
            raise ParityError("--h5 names the native side's file; with --port the port is compared instead")
        if spec.kind == "onnx":
            from .ports.onnx import run_onnx
            with contextlib.ExitStack() as stack:
                work = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sdport-onnx-", dir=spill_dir))
                return run_onnx(component, checkpoint, spec, modes=modes, device=device, dtype=dtype, seed=seed,
                                prompt=prompt, batch=batch, size=size, tolerance=tolerance, num_heads=num_heads,
                                workdir=work, progress=progress, observe_budget=onnx_memory)
        if spec.kind == "dump":
            from .ports.dump import run_dump
            return run_dump(component, checkpoint, spec, modes=modes, device=device, dtype=dtype,
                            tolerance=tolerance, num_heads=num_heads, progress=progress)
        from .ports.run import run_port
        return run_port(component, checkpoint, spec, modes=modes, device=device, dtype=dtype, seed=seed,
                        prompt=prompt, batch=batch, size=size, tolerance=tolerance, num_heads=num_heads,
                        workdir=workdir, spill_dir=spill_dir, progress=progress)
    pc = entry(component)
    modes = tuple(m for m in MODES if m in modes)
    if not modes:
        raise ParityError("no mode: choose accumulated, isolated or both")
    dev, ndtype = resolve_device(device), dtype_of(dtype)
    deterministic()
    tol = tolerance or default_tolerance(dtype)
    with contextlib.ExitStack() as stack:
        work = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sdport-parity-", dir=spill_dir))
        text = pc.takes_prompt_context and prompt is not None
        h5 = ensure_h5(checkpoint, h5, work, [component] + ([TEXT_ENCODER] if text else []), num_heads)
        ncfg, fmt = native_config(h5, component)
        cpu_inputs, desc = draw_inputs(component, ncfg, seed=seed, batch=batch, size=size, prompt=prompt,
                                       encode_text=text_encoder_fn(h5, dev) if text else None)
        memory.release()  # the text encoder that made the context
        inputs = to_device(cpu_inputs, dev)
        desc.update(checkpoint=os.path.basename(checkpoint), h5=os.path.basename(h5), source_format=fmt,
                    reference_dtype="fp32", native_dtype=dtype)
        if component == "unet":
            desc["attention_precision"] = attention_precision
        specs, _ = layer_map(component, ncfg, fmt)
        check_room(work, _spill_estimate(component, ncfg, fmt, specs, cpu_inputs, modes), ParityError)
        # One model resident at a time: the reference runs and spills, is freed, then the native model runs.
        ref, _, _ = load_reference(component, checkpoint, **pc.reference_plan_options(ncfg))
        recorded = stack.enter_context(reference_stage(component, ref.to(dev), ncfg, fmt, inputs, work, modes,
                                                       progress))
        del ref
        memory.release()
        native, _, _ = load_native(h5, component, dev, ndtype)
        if hasattr(native, "set_attention_precision"):
            native.set_attention_precision(attention_precision)
        if patch_native is not None:
            patch_native(native)
        return candidate_stage(component, native, recorded, inputs, dtype, dev, tol, desc, progress)


def native_config(h5: str, component: str):
    """(config, source format) of a layout's component, read without its weights."""
    with LayoutReader(h5) as r:
        if not r.has(component):
            raise ParityError(f"{h5}: no /{component} group (the file holds: {', '.join(r.components()) or 'none'})")
        return read_config(r, component), r.group_attrs(component).get("source_format", "compvis")


def _spill_estimate(component, cfg, fmt, specs, cpu_inputs, modes) -> int:
    """Bytes the reference stage will spill: its layers' outputs, and for isolated mode their calls."""
    from .reference.load import weightless_reference

    outs = [r for sp in specs for r in sp.reference]
    ins = [sp.reference[0] for sp in specs] if ISOLATED in modes else []
    return estimate_reference(component, weightless_reference(component, cfg, fmt), cpu_inputs, fmt, outs, ins)


@dataclasses.dataclass
class Recorded:
    """What the reference stage leaves for the candidate: each layer's output (a temporary full dump)
    and, for isolated mode, its recorded call; the layers in execution order, with their names,
    kinds and shapes."""

    component: str
    modes: tuple
    specs: dict
    dump: str
    calls: Calls | None
    spill: Spill | None
    order: list
    names: dict
    kinds: dict
    shapes: dict
    unpaired: dict
    not_compared: dict
    clock: LapClock
    spilled_bytes: int = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.spill is not None:
            self.spill.close()
        partials.discard(self.dump)


def reference_stage(component: str, ref, ncfg, source_format: str, inputs: dict, work: str, modes=MODES,
                    progress=None) -> Recorded:
    """The reference pass: each layer's output spilled to a temporary dump in `work` as it completes,
    and for isolated mode its recorded call (inputs) to a spill file. Nothing of it stays in memory."""
    progress = progress or no_progress
    specs, not_compared = layer_map(component, ncfg, source_format)
    fd, path = tempfile.mkstemp(suffix=".act.h5", dir=work)  # unique: a caller may compare several times
    os.close(fd)
    dump = golden.ActivationWriter(path, summaries=False)
    spill = Spill(work) if ISOLATED in modes else None
    calls = Calls(spill) if spill is not None else None
    rec = Recorded(component, modes, {s.native: s for s in specs}, path, calls, spill, [], {}, {}, {}, {},
                   not_compared, LapClock())

    def on_layer(spec, y, args, kwargs):
        rec.order.append(spec.native)
        rec.names[spec.native], rec.kinds[spec.native] = spec.reference_name, spec.kind
        rec.shapes[spec.native] = tuple(y.shape)
        dump.add(spec.native, spec.reference_name, spec.kind, y)
        if calls is not None:
            calls.put(spec.native, args, kwargs)
        progress("reference pass", len(rec.order), len(specs))
        rec.clock.lap(spec.native)

    try:
        rec.unpaired = reference_pass(component, ref, specs, inputs, source_format, on_layer)
    except BaseException:
        dump.abort()
        if spill is not None:
            spill.close()
        raise
    dump.close()
    rec.spilled_bytes = os.path.getsize(path) + (spill.bytes if spill is not None else 0)
    return rec


def candidate_stage(component: str, native, rec: Recorded, inputs: dict, dtype: str, dev, tol: Tolerance,
                    desc: dict, progress=None) -> ParityResult:
    """The native model against what the reference stage recorded: one native pass compared layer by
    layer (accumulated), then each layer re-run on the reference's recorded call (isolated)."""
    progress = progress or no_progress
    ndtype = dtype_of(dtype)
    modes, order, unpaired, clock = rec.modes, rec.order, dict(rec.unpaired), rec.clock
    acc, iso = {}, {}
    with golden.ActivationReader(rec.dump) as dump:
        fired: set[str] = set()
        if ACCUMULATED in modes:
            def on_native(name, out):
                e = dump.by_name.get(name)
                if e is not None:
                    acc[name] = _safe_compare(out, dump.full(e))
                progress("native pass", len(acc), len(order))
                clock.lap(name)
            clock.restart()
            fired = native_pass(component, native, order, inputs, ndtype, on_native)
        if ISOLATED in modes:
            mods = modules_by_name(native, order, "native")
            clock.restart()
            with torch.no_grad():
                for i, n in enumerate(order):
                    args, kwargs = rec.calls.get(n)
                    x = cast_floats(native_args(component, rec.specs[n], to_device_call(args, dev),
                                                to_device_call(kwargs, dev)), ndtype)
                    iso[n] = _safe_compare(first_tensor(mods[n](*x)), dump.full(dump.by_name[n]))
                    progress("isolated native layers", i + 1, len(order))
                    clock.lap(n)
    if ACCUMULATED in modes:
        for n in order:
            if n not in fired:
                unpaired[n] = ("native module is not called as a module: no accumulated metrics"
                               + (" (isolated: re-run on the reference's input)" if n in iso else ""))
    desc = dict(desc, spilled_bytes=rec.spilled_bytes)
    report = Report(component, tuple(modes), dtype, device_name(dev), tol, desc, collect_versions(),
                    _layer_records(order, rec.names, rec.kinds, rec.shapes, acc, iso, tol, clock.seconds))
    return ParityResult(report, unpaired, rec.not_compared)


def to_device_call(v, dev):
    """A recorded call's tensors (in tuples, lists and dicts) on `dev`."""
    if isinstance(v, torch.Tensor):
        return v.to(dev)
    if isinstance(v, (list, tuple)):
        return type(v)(to_device_call(x, dev) for x in v)
    if isinstance(v, dict):
        return {k: to_device_call(x, dev) for k, x in v.items()}
    return v


def compare_layers(component: str, ref, native, ncfg, source_format: str, inputs: dict, dtype: str, dev,
                   tol: Tolerance, desc: dict, work: str, modes=MODES, progress=None) -> ParityResult:
    """The per-layer comparison of two loaded models on the given (device-side) inputs: the reference
    stage, then the candidate stage (both spill to `work`). `progress(what, done, total)` is called
    as each layer of each pass completes."""
    with reference_stage(component, ref, ncfg, source_format, inputs, work, modes, progress) as rec:
        return candidate_stage(component, native, rec, inputs, dtype, dev, tol, desc, progress)


def record(component: str, checkpoint: str, out: str, *, stats_only: bool = False, device: str = "cpu",
           seed: int = 0, prompt: str | None = None, batch: int = 2, size: int | None = None,
           h5: str | None = None, sample_size: int = golden.SAMPLE_SIZE, progress=None) -> int:
    """Write the reference side's activations (and the inputs) as a golden dump. Returns the layer count.
    `progress(what, done, total)` as layers are written."""
    progress = progress or no_progress
    dev = resolve_device(device)
    deterministic()
    with tempfile.TemporaryDirectory(prefix="sdport-record-") as work:
        ref, cfg, fmt = load_reference(component, checkpoint)
        ref = ref.to(dev)
        specs, _ = layer_map(component, cfg, fmt)
        encode = None
        if entry(component).takes_prompt_context and prompt is not None:
            encode = text_encoder_fn(ensure_h5(checkpoint, h5, work, [TEXT_ENCODER]), dev)
        cpu_inputs, desc = draw_inputs(component, cfg, seed=seed, batch=batch, size=size, prompt=prompt,
                                       encode_text=encode)
        desc.update(checkpoint=os.path.basename(checkpoint), source_format=fmt)
        attrs = {"component": component, "producer": "sdport reference side (ldm / transformers / open_clip)",
                 "source_file": os.path.basename(checkpoint), "source_sha256": file_sha256(checkpoint),
                 "seed": seed, "device": device_name(dev), "dtype": "fp32", "inputs_description": desc,
                 "versions": collect_versions(), "source_format": fmt, "commit": _commit()}
        with golden.ActivationWriter(out, mode=golden.STATS if stats_only else golden.FULL, attrs=attrs,
                                     sample_size=sample_size) as w:
            w.write_inputs(cpu_inputs)
            def add(s, y, args, kwargs):
                w.add(s.native, s.reference_name, s.kind, y)
                progress("reference pass", w.count, len(specs))

            reference_pass(component, ref, specs, to_device(cpu_inputs, dev), fmt, add)
            return w.count


def _commit() -> str:
    """The git commit of this sdport checkout, when it is one (else "")."""
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def check(golden_path: str, *, h5: str | None = None, checkpoint: str | None = None, device: str = "cpu",
          dtype: str = "fp32", tolerance: Tolerance | None = None, progress=None) -> ParityResult:
    """The native side alone against a golden dump (accumulated mode; no reference package needed).
    `progress(what, done, total)` as layers are compared."""
    progress = progress or no_progress
    dev, ndtype = resolve_device(device), dtype_of(dtype)
    deterministic()
    tol = tolerance or default_tolerance(dtype)
    with contextlib.ExitStack() as stack:
        dump = stack.enter_context(golden.ActivationReader(golden_path))
        if dump.version != golden.FORMAT_VERSION:
            raise ParityError(f"{golden_path}: a schema-{dump.version} dump names the reference's modules; compare it "
                              f"with the reference: sdport parity COMPONENT CHECKPOINT --port dump:{golden_path}")
        component = dump.attr("component")
        if component not in COMPONENTS:
            raise ParityError(f"{golden_path}: component {cut(repr(component))} is not one of {', '.join(COMPONENTS)}")
        if h5 is None:
            if checkpoint is None:
                raise ParityError("parity check needs the converted .h5 (--h5) or the checkpoint")
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="sdport-check-"))
            h5 = ensure_h5(checkpoint, None, work, [component])
        native, cfg, _ = load_native(h5, component, dev, ndtype)
        differ = provenance_mismatch(dump, h5)
        check_input_shapes(component, cfg, dump.input_shapes(), golden_path)
        inputs = dump.inputs()
        entry(component).check_values(cfg, inputs, golden_path)
        inputs = to_device(inputs, dev)
        acc, bit_exact = {}, {}
        clock = LapClock()

        def on_native(name, out):
            e = dump.by_name.get(name)
            if e is not None:
                acc[name], bit_exact[name] = golden.compare_with(dump, e, out)
            progress("native pass", len(acc), len(dump.entries))
            clock.lap(name)

        names = [e.name for e in dump.entries]
        present = set(dict(native.named_modules()))
        missing = [n for n in names if n not in present]
        if missing:
            raise ParityError(f"{golden_path}: layer {missing[0]!r} is not a module of the native {component}")
        clock.restart()
        native_pass(component, native, names, inputs, ndtype, on_native)
        desc = dict(dump.attr("inputs_description") or {})
        desc.update(golden=os.path.basename(golden_path), golden_mode=dump.mode, h5=os.path.basename(h5),
                    bit_exact_layers=sum(bit_exact.values()))
        if differ:
            desc["provenance"] = differ
        layers = tuple(make_layer(e.index, display(e.name), display(e.reference), e.kind, e.shape, tol,
                                  accumulated=acc[e.name], seconds=clock.seconds.get(e.name))
                       for e in dump.entries if e.name in acc)
        unpaired = {e.name: "native module did not run" for e in dump.entries if e.name not in acc}
        report = Report(component, (ACCUMULATED,), dtype, device_name(dev), tol, desc, collect_versions(), layers)
    return ParityResult(report, unpaired, {})


def provenance_mismatch(dump: golden.ActivationReader, h5: str) -> str | None:
    """Why the dump and the layout may come from different checkpoints (None when nothing says so):
    the sha256 of the source each records, else their file names."""
    with LayoutReader(h5) as r:
        attrs = r.attrs
    want_sha, have_sha = dump.attr("source_sha256"), attrs.get("source_sha256")
    if isinstance(want_sha, str) and isinstance(have_sha, str) and want_sha and have_sha:
        if want_sha != have_sha:
            return (f"the sources differ: the dump was recorded from {cut(dump.attr('source_file'), 60)} "
                    f"(sha256 {want_sha[:12]}...), {os.path.basename(h5)} was converted from "
                    f"{cut(attrs.get('source_file'), 60)} (sha256 {have_sha[:12]}...); every layer will differ")
        return None
    desc = dump.attr("inputs_description")
    want = dump.attr("source_file") or (desc.get("checkpoint") if isinstance(desc, dict) else None)
    have = attrs.get("source_file")
    if isinstance(want, str) and isinstance(have, str) and want and have and want != have:
        return (f"the sources may differ: the dump was recorded from {cut(want, 60)}, {os.path.basename(h5)} "
                f"was converted from {cut(have, 60)} (the dump records no sha256 to compare)")
    return None


def compare_dumps(a_path: str, b_path: str, *, dtype: str = "fp32", tolerance: Tolerance | None = None) -> ParityResult:
    """Dump A (as "native") against dump B (as "reference"), layer by layer, paired by name."""
    tol = tolerance or default_tolerance(dtype)
    with golden.ActivationReader(a_path) as a, golden.ActivationReader(b_path) as b:
        ca, cb = a.attr("component"), b.attr("component")
        if a.version != b.version:
            raise golden.GoldenError(f"{a_path} is a schema-{a.version} dump, {b_path} a schema-{b.version} one: "
                                     "their layers are named differently (docs/golden.md)")
        if ca != cb:
            raise golden.GoldenError(f"{a_path} holds {ca!r}, {b_path} holds {cb!r}: nothing to compare")
        layers = []
        for eb in b.entries:
            ea = a.by_name.get(eb.name)
            if ea is not None:
                layers.append(make_layer(eb.index, display(eb.name), display(eb.reference), eb.kind, eb.shape, tol,
                                         accumulated=golden.compare_entries(a, ea, b, eb)))
        unpaired = {e.name: f"only in {os.path.basename(b_path)}" for e in b.entries if e.name not in a.by_name}
        unpaired.update({e.name: f"only in {os.path.basename(a_path)}" for e in a.entries if e.name not in b.by_name})
        desc = {"a": os.path.basename(a_path), "b (reference)": os.path.basename(b_path),
                "modes": f"{a.mode} vs {b.mode}", "seed": b.attr("seed"),
                "inputs_description": b.attr("inputs_description")}
        report = Report(str(ca), (ACCUMULATED,), dtype, "n/a (dumps)", tol, desc, collect_versions(), tuple(layers))
    return ParityResult(report, unpaired, {})
