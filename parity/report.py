"""Parity report: the data model (layers in execution order with their metrics, the culprit) and its
JSON form. The other renderings live beside it: render_text (terminal summary and number formats),
render_junit (JUnit XML), render_html and render_svg (one self-contained HTML page and its chart).

Two comparison modes per layer (see the metric legend in the report itself):
- accumulated: both models ran end to end on the same inputs; a layer's error includes upstream error.
- isolated: the native layer re-ran on the reference's recorded input; the error is the layer's own.
The culprit is the first layer in execution order whose isolated metrics break tolerance.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .metrics import DEFINITIONS, Tolerance, check, tolerance_from_dict, tolerance_to_dict

ACCUMULATED = "accumulated"
ISOLATED = "isolated"
MODES = (ACCUMULATED, ISOLATED)
FORMAT = "sdport.parity.report"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One native layer paired with its reference module, in execution order."""

    index: int
    native: str                      # native module name, e.g. "down.1.res.0"
    reference: str                   # reference module name, e.g. "input_blocks.4.0"
    kind: str                        # block kind from the mapping table ("resnet", "attention", ...)
    shape: tuple[int, ...]           # output shape compared
    metrics: dict[str, dict]         # mode -> metrics from metrics.compare
    failures: dict[str, tuple[str, ...]]  # mode -> failed checks (empty tuple when it passed)
    # Wall time the run spent on this layer (LapClock), None where it was not measured.
    seconds: float | None = None
    note: str = ""                   # a finding about the pair itself (a port's weights swapped, ...)

    @property
    def status(self) -> str:
        return "fail" if any(self.failures.values()) else "pass"

    def failed(self, mode: str) -> bool:
        return bool(self.failures.get(mode))


def make_layer(index: int, native: str, reference: str, kind: str, shape: Sequence[int],
               tol: Tolerance, accumulated: Mapping | None = None,
               isolated: Mapping | None = None, seconds: float | None = None, note: str = "") -> LayerRecord:
    """A layer record with its metrics per mode gated against `tol`."""
    metrics, failures = {}, {}
    for mode, m in ((ACCUMULATED, accumulated), (ISOLATED, isolated)):
        if m is None:
            continue
        metrics[mode] = dict(m)
        failures[mode] = tuple(check(m, tol)[1])
    if not metrics:
        raise ValueError(f"layer {native!r}: no metrics for any mode")
    return LayerRecord(int(index), native, reference, kind, tuple(int(s) for s in shape),
                       metrics, failures, None if seconds is None else float(seconds), note)


class LapClock:
    """Wall time per layer, as honestly as hooks allow: each lap charges the time since the previous
    lap (or restart) to the layer it names. Lapping as each layer's output has been handled charges a
    layer with its own forward (and whatever unhooked code ran since the previous layer's output) plus
    its comparisons; over a pass the laps add up to the pass's wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.restart()

    def restart(self) -> None:
        """Start a new pass: the time until the next lap is not charged to the last layer."""
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        t = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + (t - self._t)
        self._t = t


@dataclasses.dataclass(frozen=True)
class Culprit:
    """The layer to look at first. `mode` says which metrics convicted it: "isolated" (its own
    error) or "accumulated" (only end-to-end error was available or broke tolerance)."""

    index: int
    native: str
    reference: str
    kind: str
    mode: str
    failures: tuple[str, ...]
    note: str = ""

    def line(self) -> str:
        return (f"#{self.index} {self.native} (reference {self.reference}, {self.kind}) "
                f"[{self.mode}] {'; '.join(self.failures)}" + (f" -- {self.note}" if self.note else ""))


def _culprit_from(layer: LayerRecord, mode: str, note: str = "") -> Culprit:
    note = "; ".join(n for n in (layer.note, note) if n)
    return Culprit(layer.index, layer.native, layer.reference, layer.kind, mode,
                   layer.failures[mode], note)


def find_culprit(layers: Sequence[LayerRecord]) -> Culprit | None:
    """First layer whose isolated metrics fail; without isolated metrics (or when no layer fails
    in isolation but some fail accumulated), the first failing accumulated layer, marked as such;
    None when everything passes."""
    if any(ISOLATED in l.metrics for l in layers):
        for l in layers:
            if l.failed(ISOLATED):
                return _culprit_from(l, ISOLATED)
    for l in layers:
        if l.failed(ACCUMULATED):
            note = ("no layer fails in isolation: the error accumulates across layers"
                    if any(ISOLATED in x.metrics for x in layers) else "accumulated mode only")
            return _culprit_from(l, ACCUMULATED, note)
    return None


def collect_versions(**extra: str) -> dict[str, str]:
    """Python, platform and the versions of the packages that matter, without importing them."""
    v = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("sdport", "torch", "numpy", "h5py", "stable-diffusion-sdkit", "transformers",
                 "diffusers"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    v.update({k: str(x) for k, x in extra.items()})
    return v


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclasses.dataclass(frozen=True)
class Report:
    component: str                   # "unet", "text_model", "decoder", ...
    modes: tuple[str, ...]           # subset of MODES that ran
    dtype: str                       # "fp32", "fp16", ...
    device: str                      # "cpu", "cuda:0", ...
    tolerance: Tolerance
    inputs: dict                     # seed, how noise was drawn, input shapes
    versions: dict
    layers: tuple[LayerRecord, ...]  # execution order
    created: str = dataclasses.field(default_factory=_now)
    candidate: str = "native"        # what was compared with the reference: "native", "port", "dump"

    # --- derived -------------------------------------------------------------------------
    @property
    def culprit(self) -> Culprit | None:
        return find_culprit(self.layers)

    @property
    def first_divergence(self) -> LayerRecord | None:
        """First layer whose accumulated metrics fail (where end-to-end outputs part ways)."""
        return next((l for l in self.layers if l.failed(ACCUMULATED)), None)

    @property
    def passed(self) -> bool:
        return all(l.status == "pass" for l in self.layers)

    def counts(self) -> dict[str, int]:
        n_fail = sum(l.status == "fail" for l in self.layers)
        return {"layers": len(self.layers), "pass": len(self.layers) - n_fail, "fail": n_fail}

    # --- dict / JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        c = self.culprit
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "component": self.component, "candidate": self.candidate, "modes": list(self.modes), "dtype": self.dtype,
            "device": self.device, "created": self.created,
            "passed": self.passed, "counts": self.counts(),
            "culprit": None if c is None else {**dataclasses.asdict(c), "failures": list(c.failures)},
            "tolerance": tolerance_to_dict(self.tolerance),
            "definitions": dict(DEFINITIONS),
            "inputs": self.inputs, "versions": self.versions,
            "layers": [{"index": l.index, "native": l.native, "reference": l.reference,
                        "kind": l.kind, "shape": list(l.shape), "status": l.status,
                        "metrics": l.metrics,
                        "failures": {m: list(f) for m, f in l.failures.items()},
                        "seconds": l.seconds, **({"note": l.note} if l.note else {})}
                       for l in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Report":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a parity report: format={d.get('format')!r}, expected {FORMAT!r}")
        layers = tuple(
            LayerRecord(l["index"], l["native"], l["reference"], l["kind"], tuple(l["shape"]),
                        {m: dict(v) for m, v in l["metrics"].items()},
                        {m: tuple(f) for m, f in l["failures"].items()}, l.get("seconds"), l.get("note", ""))
            for l in d["layers"])
        return cls(d["component"], tuple(d["modes"]), d["dtype"], d["device"],
                   tolerance_from_dict(d["tolerance"]), d["inputs"], d["versions"], layers,
                   d["created"], d.get("candidate", "native"))

    def to_json(self, path) -> None:
        # Strict JSON (other tools read it): non-finite floats become the strings "inf"/"-inf"/"nan".
        text = json.dumps(encode_nonfinite(self.to_dict()), indent=1, allow_nan=False)
        Path(path).write_text(text + "\n")

    @classmethod
    def from_json(cls, path) -> "Report":
        return cls.from_dict(_decode_nonfinite(json.loads(Path(path).read_text())))

    # --- other writers (the renderers import this module, so they are imported when called) --
    def to_junit(self, path) -> None:
        from .render_junit import write_junit
        write_junit(self, path)

    def to_html(self, path, unpaired: Mapping[str, str] | None = None) -> None:
        """`unpaired`: {native layer: why it could not be compared}, shown with each such layer."""
        from .render_html import write_html
        write_html(self, path, unpaired)


_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def plain(x):
    """A NumPy scalar or array (h5py hands attributes back as such: a dump's seed is a numpy int64) as
    the Python number or list json and the other writers take; anything else unchanged."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return x


def encode_nonfinite(x):
    """`x` with NumPy values as Python ones and non-finite floats as "inf" / "-inf" / "nan": what strict
    JSON takes (every JSON writer of sdport's reports uses it)."""
    x = plain(x)
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {plain(k): encode_nonfinite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [encode_nonfinite(v) for v in x]
    return x


def worst_key(l: LayerRecord) -> float:
    """Sort key for "worst layers": the largest rel_l2 over the modes; NaN is the worst of all (the
    output is garbage)."""
    vals = [m.get("rel_l2", math.nan) for m in l.metrics.values()]
    return max((math.inf if math.isnan(v) else v) for v in vals)


def _decode_metrics(m: dict) -> dict:
    return {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in m.items()}


def _decode_nonfinite(d: dict) -> dict:
    # Only metric values are floats that may be non-finite; decode exactly those.
    for l in d.get("layers", []):
        l["metrics"] = {mode: _decode_metrics(m) for mode, m in l["metrics"].items()}
    return d




# Names this module had before its renderers moved out, so that older imports keep working: the
# renderers (which import this module) load on first use, and the private spellings of the public
# helpers stay as aliases.
_COMPAT = {"summary_text": "render_text", "junit_xml": "render_junit", "html_page": "render_html",
           "chart_svg": "render_svg"}
_encode_nonfinite, _worst_key, _plain = encode_nonfinite, worst_key, plain


def __getattr__(name: str):
    if name in _COMPAT:
        import importlib
        return getattr(importlib.import_module(f".{_COMPAT[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
