"""A sweep spec (TOML) -> its cells: every combination of a run's grid axes, on each of its checkpoints.

    [sweep]                      # optional: name, device (default of every run), attempts
    [checkpoints]                # name = "file.ckpt" | { checkpoint = "file.ckpt", h5 = "file.h5" }
    [[run]]                      # name, parity = a component or "txt2img", checkpoints = [names],
      ...fixed parameters...     #   any parameter below, fixed
      [run.grid]                 #   parameter = [values]: one axis each
Every cell names its seed: a run without `seed` (fixed or an axis) is refused, so nothing is drawn
from a hidden default. Paths are relative to the spec file. Errors are SpecError, one line each.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None

from ... import __version__
from ...models.components import NAMES as COMPONENTS
from ...models.errors import SdportError, cut

TXT2IMG = "txt2img"
KINDS = (*COMPONENTS, TXT2IMG)
DTYPES = ("fp32", "fp16", "bf16")
GATES = (*DTYPES, "int8")
DEFAULT_ATTEMPTS = 3
MAX_SPEC_BYTES = 1 << 20  # a spec is a page of TOML; a larger file is refused before it is parsed
MAX_CELLS = 100_000  # a grid's product is checked before it is expanded
MAX_ATTEMPTS = 100


class SpecError(SdportError):
    """A spec the sweep cannot run: one line naming the file and what is wrong."""


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _str(v):
    return isinstance(v, str)


def _choice(*names):
    def ok(v):
        return v in names
    ok.expected = " | ".join(names)
    return ok


def _tol(v):
    return isinstance(v, dict) and all(isinstance(k, str) and (_num(x) or x in ("none", "off")) for k, x in v.items())


def _steps_list(v):
    return isinstance(v, list) and all(_int(x) and x >= 0 for x in v)


# parameter -> (check, what it takes); `port` is checked by the port module of the harness it reaches.
COMMON = {"seed": (_int, "an integer"), "dtype": (_choice(*DTYPES), None), "gate": (_choice(*GATES), None),
          "tol": (_tol, "a table metric = number or \"none\""), "device": (_str, "a device name (cpu, cuda, cuda:N)"),
          "port": (_str, "a port spec (diffusers, torch:FILE.py:FUNC, dump:FILE.h5, onnx:FILE.onnx)")}
COMPONENT_PARAMS = {**COMMON, "mode": (_choice("accumulated", "isolated", "both"), None),
                    "prompt": (_str, "a string"), "batch": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
                    "size": (lambda v: _int(v) and v >= 1, "an integer >= 1")}
TXT2IMG_PARAMS = {**COMMON, "prompt": (_str, "a string"), "negative": (_str, "a string"),
                  "steps": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
                  "spacing": (_choice("ldm", "linspace", "leading", "trailing"), None),
                  "scale": (_num, "a number"), "sampler": (_choice("plms", "ddim", "dpmpp2m"), None),
                  "eta": (lambda v: _num(v) and v >= 0, "a number >= 0"),
                  "height": (lambda v: _int(v) and v >= 1, "an integer"), "width": (lambda v: _int(v) and v >= 1, "an integer"),
                  "layer_steps": (_steps_list, "a list of step numbers"), "image_psnr": (_num, "a number")}
# What a cell runs with when the spec leaves a parameter out: the command line's defaults (seed excepted).
COMPONENT_DEFAULTS = {"dtype": "fp32", "mode": "both", "batch": 2, "tol": {}}
TXT2IMG_DEFAULTS = {"dtype": "fp32", "negative": "", "steps": 50, "spacing": "ldm", "scale": 7.5, "sampler": "plms",
                    "eta": 0.0, "layer_steps": [], "tol": {}}
RUN_KEYS = ("name", "parity", "checkpoints", "grid")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    name: str
    checkpoint: str              # absolute path: the reference side's weights
    h5: str | None = None        # absolute path of the converted layout (None: converted once per worker)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One parity run. `params` holds every parameter it runs with (defaults filled in), sorted by name;
    `axes` the names that vary across its run's grid."""

    run: str
    kind: str                    # a component name or "txt2img"
    checkpoint: Checkpoint
    params: tuple[tuple[str, object], ...]
    axes: tuple[str, ...]

    @property
    def p(self) -> dict:
        return {k: _thaw(v) for k, v in self.params}

    @property
    def label(self) -> str:
        """run / checkpoint / the axes' values: what the summary and JUnit call the cell."""
        p = self.p
        return "/".join([self.run, self.checkpoint.name] + [f"{a}={_show(p[a])}" for a in self.axes])

    @property
    def id(self) -> str:
        """A file name for the cell, readable and unique within the sweep."""
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label.replace("/", "--"))[:120]
        digest = hashlib.sha256(self.label.encode()).hexdigest()[:8]
        return f"{slug}-{digest}"

    def key(self, checksums: dict[str, str]) -> str:
        """What the result depends on: the kind, every parameter, the inputs' sha256 and sdport's
        version. `checksums` maps each input path to its sha256."""
        p = self.p
        inputs = {"checkpoint": checksums[self.checkpoint.checkpoint],
                  "h5": checksums[self.checkpoint.h5] if self.checkpoint.h5 else None}
        port_file = port_path(p.get("port"))
        if port_file:
            inputs["port"] = checksums[port_file]
        blob = json.dumps({"kind": self.kind, "params": p, "inputs": inputs, "sdport": __version__},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def files(self) -> list[str]:
        """The input files whose checksums key the cell."""
        out = [self.checkpoint.checkpoint] + ([self.checkpoint.h5] if self.checkpoint.h5 else [])
        port_file = port_path(self.p.get("port"))
        return out + ([port_file] if port_file else [])


@dataclasses.dataclass(frozen=True)
class Spec:
    path: str
    name: str
    attempts: int
    checkpoints: tuple[Checkpoint, ...]
    cells: tuple[Cell, ...]
    runs: tuple[str, ...]        # run names in spec order


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return ("__list__", *map(_freeze, v))
    return v


def _thaw(v):
    if isinstance(v, tuple):
        if v and v[0] == "__list__":
            return [_thaw(x) for x in v[1:]]
        return {k: _thaw(x) for k, x in v}
    return v


def _show(v) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}:{x}" for k, x in v.items()) or "{}"
    if isinstance(v, list):
        return ",".join(map(str, v)) or "[]"
    return str(v)


def port_path(port) -> str | None:
    """The file a port spec names (torch:FILE.py:FUNC, dump:FILE.h5, onnx:FILE.onnx[:LEVEL]), else None."""
    from ..ports import parse_spec, port_file  # the port module's own rule (it imports torch: here, lazily)

    return port_file(parse_spec(port)) if isinstance(port, str) else None


def _resolve_port(port: str, base: str) -> str:
    """The spec with its file relative to the spec's folder (the label names the same port)."""
    from ..ports import parse_spec, port_file

    spec = parse_spec(port)
    f = port_file(spec)
    if f is None or os.path.isabs(f):
        return port
    return dataclasses.replace(spec, target=os.path.join(base, f)).label


def load(path: str, allow_port_code: bool = False) -> Spec:
    """Read and check a spec file; SpecError (one line) for anything wrong with it. A `torch:` port runs
    code that the spec names, so it is refused unless the caller allows it (`--allow-port-code`)."""
    if tomllib is None:  # pragma: no cover
        raise SpecError("sweep specs need Python 3.11+ (tomllib)")
    from ...models.storage.small import read_regular

    try:
        raw = read_regular(path, MAX_SPEC_BYTES, "a spec file")
    except SdportError as e:
        raise SpecError(str(e)) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: more than {MAX_SPEC_BYTES >> 20} MiB; a sweep spec is a short TOML file")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not valid TOML: not UTF-8 text") from None
    return parse(data, path, allow_port_code)


def parse(data: dict, path: str, allow_port_code: bool = False) -> Spec:
    base = os.path.dirname(os.path.abspath(path))

    def fail(msg):
        raise SpecError(f"{path}: {msg}")

    unknown = sorted(set(data) - {"sweep", "checkpoints", "run"})
    if unknown:
        fail(f"unknown table [{unknown[0]}] (a spec has [sweep], [checkpoints] and [[run]])")
    head = data.get("sweep", {})
    if not isinstance(head, dict):
        fail("[sweep] must be a table")
    bad = sorted(set(head) - {"name", "device", "attempts"})
    if bad:
        fail(f"[sweep]: unknown key {bad[0]!r} (name, device, attempts)")
    attempts = head.get("attempts", DEFAULT_ATTEMPTS)
    if not (_int(attempts) and 1 <= attempts <= MAX_ATTEMPTS):
        fail(f"[sweep] attempts = {attempts!r}: expected an integer in [1, {MAX_ATTEMPTS}]")
    device = head.get("device", "cpu")
    if not _str(device):
        fail("[sweep] device: expected a string")

    checkpoints = _checkpoints(data.get("checkpoints"), base, fail)
    runs = data.get("run")
    if not isinstance(runs, list) or not runs:
        fail("no [[run]]: a spec needs at least one")
    cells, names = [], []
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            fail(f"run #{i + 1} must be a table")
        name = run.get("name", f"run{i + 1}")
        if not _str(name) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            fail(f"run #{i + 1}: name {name!r}: letters, digits, '_', '.' and '-' only")
        if name in names:
            fail(f"run {name!r} appears twice")
        names.append(name)
        cells += _cells(run, name, checkpoints, device, base, lambda m, n=name: fail(f"run {n!r}: {m}"),
                        allow_port_code)
        if len(cells) > MAX_CELLS:
            fail(f"more than {MAX_CELLS:,} cells in all (split the spec)")
    return Spec(path, head.get("name", os.path.splitext(os.path.basename(path))[0]), attempts,
                tuple(checkpoints.values()), tuple(cells), tuple(names))


def _checkpoints(table, base, fail) -> dict[str, Checkpoint]:
    if not isinstance(table, dict) or not table:
        fail("no [checkpoints]: name at least one (name = \"file.ckpt\")")
    out = {}
    for name, v in table.items():
        if isinstance(v, str):
            v = {"checkpoint": v}
        if not isinstance(v, dict) or not _str(v.get("checkpoint")):
            fail(f"checkpoint {name!r}: expected \"file\" or {{ checkpoint = \"file\", h5 = \"file.h5\" }}")
        bad = sorted(set(v) - {"checkpoint", "h5"})
        if bad:
            fail(f"checkpoint {name!r}: unknown key {bad[0]!r} (checkpoint, h5)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            fail(f"checkpoint name {name!r}: letters, digits, '_', '.' and '-' only")
        paths = {}
        for k in ("checkpoint", "h5"):
            if k in v:
                if not _str(v[k]):
                    fail(f"checkpoint {name!r}: {k} must be a path")
                p = os.path.join(base, v[k])
                if not os.path.isfile(p):
                    fail(f"checkpoint {name!r}: {k} {v[k]}: no such file")
                paths[k] = os.path.abspath(p)
        out[name] = Checkpoint(name, paths["checkpoint"], paths.get("h5"))
    return out


def _check_port(port: str, allow_code: bool, fail) -> None:
    from ..ports import parse_spec
    from ..components import ParityError

    try:
        kind = parse_spec(port).kind
    except ParityError as e:
        fail(str(e).replace("--port ", "port = ", 1))
    if kind == "torch" and not allow_code:
        # a spec is a file like any other: it may name code to run only when the command line says so
        fail(f"port = {cut(port, 80)!r} runs Python code the spec names: pass --allow-port-code to allow it")


def _cells(run: dict, name: str, checkpoints: dict, device: str, base: str, fail,
           allow_port_code: bool = False) -> list[Cell]:
    kind = run.get("parity")
    if kind not in KINDS:
        fail(f"parity = {kind!r}: expected one of {', '.join(KINDS)}")
    allowed = TXT2IMG_PARAMS if kind == TXT2IMG else COMPONENT_PARAMS
    defaults = {"device": device, **(TXT2IMG_DEFAULTS if kind == TXT2IMG else COMPONENT_DEFAULTS)}
    fixed = {k: v for k, v in run.items() if k not in RUN_KEYS}
    grid = run.get("grid", {})
    if not isinstance(grid, dict):
        fail("grid must be a table of parameter = [values]")
    for k in list(fixed) + list(grid):
        if k not in allowed:
            fail(f"unknown parameter {k!r} for parity {kind} (known: {', '.join(sorted(allowed))})")
    both = sorted(set(fixed) & set(grid))
    if both:
        fail(f"{both[0]!r} is both fixed and a grid axis")
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            fail(f"grid axis {k!r}: expected a non-empty list of values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            fail(f"grid axis {k!r}: a value appears twice")
    for k, v in [*fixed.items(), *((k, x) for k, vs in grid.items() for x in vs)]:
        check, expected = allowed[k]
        if not check(v):
            fail(f"{k} = {v!r}: expected {expected or getattr(check, 'expected', '?')}")
        if k == "port":
            _check_port(v, allow_port_code, fail)
    if "seed" not in fixed and "seed" not in grid:
        fail("no seed: give seed = N or a grid axis seed = [...] (every cell names its seed)")
    if kind == TXT2IMG and "prompt" not in fixed and "prompt" not in grid:
        fail("parity txt2img needs a prompt")
    chosen = run.get("checkpoints", list(checkpoints))
    if not isinstance(chosen, list) or not chosen or not all(isinstance(c, str) for c in chosen):
        fail("checkpoints must be a non-empty list of names from [checkpoints]")
    missing = [c for c in chosen if c not in checkpoints]
    if missing:
        fail(f"checkpoint {missing[0]!r} is not in [checkpoints] ({', '.join(checkpoints)})")

    axes = tuple(grid)
    n_cells = math.prod(len(v) for v in grid.values()) * len(chosen)
    if n_cells > MAX_CELLS:
        fail(f"the grid makes {n_cells:,} cells; at most "
             f"{MAX_CELLS:,} in a spec (split it)")
    out = []
    for ckpt in chosen:
        for combo in itertools.product(*grid.values()):
            p = {**defaults, **fixed, **dict(zip(axes, combo))}
            if "port" in p:
                p["port"] = _resolve_port(p["port"], base)
            if p.get("eta") and p.get("sampler") in ("plms", "dpmpp2m"):
                fail(f"eta > 0 needs sampler = \"ddim\" ({p['sampler']} takes no eta)")
            if p.get("sampler") == "dpmpp2m" and p.get("spacing", "ldm") != "ldm":
                fail("spacing applies to plms and ddim (dpmpp2m steps uniformly in continuous time)")
            out.append(Cell(name, kind, checkpoints[ckpt], tuple(sorted((k, _freeze(v)) for k, v in p.items())),
                            axes))
    return out
