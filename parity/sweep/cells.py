"""Running one cell in a worker: its parity run, its record fields and its full report.

A worker keeps what it loaded: each checkpoint is converted once (when the spec gives no .h5) and
each model is loaded once per checkpoint, device and dtype, for the most recent `keep` checkpoints
(cells are dealt out in checkpoint order, so a worker meets each checkpoint about once). Component
cells reuse the loaded models and call the harness's compare_layers, exactly what run_parity does
after its loads; txt2img cells hand run_txt2img the worker's loaded pipelines; cells naming a port go
through run_parity / run_txt2img with the port, whose native side is the port's.
"""
from __future__ import annotations

import collections
import hashlib
import inspect
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

from .margins import margins, worst
from .spec import TXT2IMG, Cell, Checkpoint, Spec, SpecError

MAX_ERROR = 400  # characters of an error cell's message


def port_support() -> dict[str, bool]:
    """Whether the parity runs of this sdport take a `port` keyword (component runs, txt2img)."""
    from ..harness import run_parity
    from ..txt2img import run_txt2img

    return {"component": "port" in inspect.signature(run_parity).parameters,
            TXT2IMG: "port" in inspect.signature(run_txt2img).parameters}


def check_ports(spec: Spec) -> None:
    """Refuse, before any work, a spec that names a port this sdport's harness cannot take."""
    named = [c for c in spec.cells if "port" in c.p]
    if not named:
        return
    support = port_support()
    for c in named:
        if not support[TXT2IMG if c.kind == TXT2IMG else "component"]:
            what = "run_txt2img" if c.kind == TXT2IMG else "run_parity"
            raise SpecError(f"{spec.path}: run {c.run!r} names port {c.p['port']!r}, but this sdport's {what} "
                            f"takes no port: remove it or use an sdport with --port")


def _tolerance(p: dict, gate: str):
    from ..metrics import apply_overrides, default_tolerance

    return apply_overrides(default_tolerance(gate), p["tol"])


def _nonfinite_safe(x):
    from ..report import encode_nonfinite
    return encode_nonfinite(x)


WORKDIR_PREFIX = "sdport-sweep-worker-"


def remove_stale_workdirs() -> None:
    """The work folders (converted checkpoints) of this machine's workers that were killed: a killed
    process cleans up nothing, so the next worker to start does."""
    import shutil

    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if not name.startswith(WORKDIR_PREFIX):
            continue
        pid = name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)


class CellRunner:
    """One worker's runner and cache. `run(cell)` never raises for a failing cell: an exception becomes
    an error outcome (a worker that dies is the executor's business)."""

    def __init__(self, workdir: str | None = None, keep: int = 2):
        self._tmp = None
        if workdir is None:
            remove_stale_workdirs()
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
            workdir = self._tmp.name
        self.workdir = workdir
        self.keep = keep
        self._cache: collections.OrderedDict = collections.OrderedDict()  # checkpoint -> {what: loaded}
        self.loads = 0          # models loaded and checkpoints converted, over the worker's life
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def close(self) -> None:
        """Drop the loaded models and remove the work folder."""
        self._cache.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # --- the cache -----------------------------------------------------------------------
    def _slot(self, ck: Checkpoint) -> dict:
        key = (ck.checkpoint, ck.h5)
        if key not in self._cache:
            self._cache[key] = {}
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _get(self, ck: Checkpoint, what: tuple, load):
        slot = self._slot(ck)
        if what not in slot:
            slot[what] = load()
            self.loads += 1
        return slot[what]

    def h5_for(self, ck: Checkpoint) -> str:
        """The spec's .h5, else the checkpoint converted (every component, dtype kept) once."""
        if ck.h5:
            return ck.h5

        def conv():
            from ...convert.convert import convert
            d = os.path.join(self.workdir, hashlib.sha256(ck.checkpoint.encode()).hexdigest()[:16])
            os.makedirs(d, exist_ok=True)
            out = os.path.join(d, Path(ck.checkpoint).stem + ".h5")  # the name run_parity would give it
            convert(ck.checkpoint, out, force=True)
            return out
        return self._get(ck, ("h5",), conv)

    # --- running -------------------------------------------------------------------------
    def run(self, cell: Cell) -> dict:
        """The outcome: status (pass / fail / error), the worst margin and where, summary metrics,
        failures, the report texts, seconds, the loads this cell caused, the worker."""
        t0, loads0 = time.perf_counter(), self.loads
        try:
            if cell.kind == TXT2IMG:
                out = self._txt2img(cell)
            else:
                out = self._component(cell)
        except Exception as e:  # noqa: BLE001 - any failure of the run is this cell's error, not the sweep's
            msg = " ".join(f"{type(e).__name__}: {e}".split())
            out = {"status": "error", "error": msg[:MAX_ERROR], "worst_margin": None, "worst_where": "",
                   "summary": {}, "failures": [], "report_json": None, "report_html": None}
        out.update(seconds=time.perf_counter() - t0, model_loads=self.loads - loads0, worker=self.name)
        return out

    def _component(self, cell: Cell) -> dict:
        from ..components import entry
        from ..harness import (compare_layers, deterministic, draw_inputs, dtype_of, load_native, load_reference,
                               resolve_device, run_parity, text_encoder_fn, to_device)
        from ...models.storage.layout import LayoutReader

        p, ck, comp = cell.p, cell.checkpoint, cell.kind
        pc = entry(comp)
        modes = ("accumulated", "isolated") if p["mode"] == "both" else (p["mode"],)
        dev = resolve_device(p["device"])
        dtype_of(p["dtype"])
        deterministic()
        h5 = self.h5_for(ck)
        gate = p.get("gate")
        if gate is None:  # as the command line: an int8 layout is gated by the int8 defaults
            with LayoutReader(h5) as r:
                gate = "int8" if r.has(comp) and r.quantized(comp) else p["dtype"]
        tol = _tolerance(p, gate)
        if "port" in p:
            # The port is the candidate: no native .h5 takes part.
            result = run_parity(comp, ck.checkpoint, modes=modes, device=p["device"], dtype=p["dtype"],
                                seed=p["seed"], prompt=p.get("prompt"), batch=p["batch"], size=p.get("size"),
                                tolerance=tol, port=p["port"])
        else:
            native, ncfg, fmt = self._get(ck, ("native", comp, str(dev), p["dtype"]),
                                          lambda: load_native(h5, comp, dev, dtype_of(p["dtype"])))
            ref = self._get(ck, ("reference", comp, str(dev)),
                            lambda: load_reference(comp, ck.checkpoint, **pc.reference_plan_options(ncfg))[0].to(dev))
            text = pc.takes_prompt_context and p.get("prompt") is not None
            encode = self._get(ck, ("encode", str(dev)), lambda: text_encoder_fn(h5, dev)) if text else None
            cpu_inputs, desc = draw_inputs(comp, ncfg, seed=p["seed"], batch=p["batch"], size=p.get("size"),
                                           prompt=p.get("prompt"), encode_text=encode)
            desc.update(checkpoint=os.path.basename(ck.checkpoint), h5=os.path.basename(h5), source_format=fmt,
                        reference_dtype="fp32", native_dtype=p["dtype"])
            with tempfile.TemporaryDirectory(dir=self.workdir) as work:
                result = compare_layers(comp, ref, native, ncfg, fmt, to_device(cpu_inputs, dev), p["dtype"], dev,
                                        tol, desc, work, modes)
        return component_outcome(result, tol)

    def _txt2img(self, cell: Cell) -> dict:
        from ..metrics import apply_overrides
        from ..txt2img import ReferencePipeline, latent_tolerance, run_txt2img
        from .. import txt2img_report

        p, ck = cell.p, cell.checkpoint
        gate = p.get("gate") or p["dtype"]
        tol = apply_overrides(latent_tolerance(gate), p["tol"])
        h5 = self.h5_for(ck)
        if "port" in p:  # the port replaces the native side: nothing of ours to keep
            extra = {"port": p["port"]}
        else:
            from ..harness import resolve_device
            from ...models.pipeline import Models

            dev = str(resolve_device(p["device"]))
            models = self._get(ck, ("models", dev, p["dtype"]), lambda: Models(h5, device=dev, dtype=p["dtype"]))
            heads = models.config("unet").num_heads
            extra = {"models": models,
                     "reference": self._get(ck, ("txt2img reference", dev, heads),
                                            lambda: ReferencePipeline(ck.checkpoint, device=dev, num_heads=heads))}
        with tempfile.TemporaryDirectory(dir=self.workdir) as work:
            result = run_txt2img(ck.checkpoint, h5=h5, prompt=p["prompt"], negative=p["negative"],
                                 steps=p["steps"], spacing=p["spacing"], scale=p["scale"], sampler=p["sampler"],
                                 eta=p["eta"], seed=p["seed"], height=p.get("height"), width=p.get("width"),
                                 device=p["device"], dtype=p["dtype"], layer_steps=p["layer_steps"], gate_dtype=gate,
                                 tolerance=tol, image_psnr_db=p.get("image_psnr"), workdir=work, **extra)
            txt2img_report.write_json(result, os.path.join(work, "r.json"))
            txt2img_report.write_html(result, os.path.join(work, "r.html"))
            texts = [Path(work, n).read_text() for n in ("r.json", "r.html")]
        psnr_min = result.gate["image_psnr_db"]
        return txt2img_outcome(result, psnr_min, *texts)


def _extreme(values, fn):
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    if any(math.isnan(v) for v in vals):
        return math.nan
    return fn(vals)


def component_outcome(result, tol) -> dict:
    """A ParityResult as an outcome: margins over every gated value of every layer and mode."""
    rep = result.report
    pairs = [(m, f"{l.native} [{mode}] {name}")
             for l in rep.layers for mode, met in l.metrics.items() for name, m in margins(met, tol).items()]
    w, where = worst(pairs)
    summary = {}
    for mode in rep.modes:
        mets = [l.metrics[mode] for l in rep.layers if mode in l.metrics]
        summary[f"{mode}.rel_l2.max"] = _extreme([m.get("rel_l2") for m in mets], max)
        summary[f"{mode}.cosine.min"] = _extreme([m.get("cosine") for m in mets], min)
        summary[f"{mode}.psnr_db.min"] = _extreme([m.get("psnr_db") for m in mets], min)
    summary["layers.fail"] = rep.counts()["fail"]
    culprit = rep.culprit
    failures = [] if culprit is None else [f"culprit {culprit.line()}"]
    # the other failing layers (the culprit's line says its own), each mode labelled
    failures += [f"{l.native} [{mode}]: {'; '.join(fs)}" for l in rep.layers
                 if l.status == "fail" and (culprit is None or l.index != culprit.index)
                 for mode, fs in l.failures.items() if fs][:5]
    with tempfile.TemporaryDirectory() as d:
        html = os.path.join(d, "r.html")
        rep.to_html(html, unpaired=result.unpaired)
        html_text = Path(html).read_text()
    return {"status": "pass" if rep.passed else "fail", "error": None, "worst_margin": w, "worst_where": where,
            "summary": summary, "failures": failures,
            "report_json": json.dumps(_nonfinite_safe(result.to_dict()), indent=1, allow_nan=False) + "\n",
            "report_html": html_text}


def txt2img_outcome(result, psnr_min: float, report_json: str, report_html: str) -> dict:
    """A Txt2ImgResult as an outcome: margins over the gated values (teacher-forced latents per step, the
    image); the layer steps are diagnostics and not gated, as in the report."""
    from ..metrics import Tolerance

    latent_tol = result.gate["latent"]
    pairs = [(m, f"step {s['step']} teacher-forced {name}")
             for s in result.steps for name, m in margins(s["teacher_forced"], latent_tol).items()]
    pairs += [(m, f"image {name}") for name, m in margins(result.image, Tolerance(psnr_db=psnr_min)).items()]
    w, where = worst(pairs)
    summary = {"teacher_forced.rel_l2.max": _extreme([s["teacher_forced"]["rel_l2"] for s in result.steps], max),
               "free.rel_l2.last": result.steps[-1]["free"]["rel_l2"] if result.steps else None,
               "image.psnr_db": result.image.get("psnr_db"),
               "conditioning.rel_l2": result.conditioning["cond"]["rel_l2"]}
    return {"status": "pass" if result.passed else "fail", "error": None, "worst_margin": w, "worst_where": where,
            "summary": summary, "failures": list(result.failures)[:6], "report_json": report_json,
            "report_html": report_html}


