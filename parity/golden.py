"""The activation-dump store (schema in docs/golden.md): one HDF5 file, one dataset per layer in
execution order, either full float32 tensors or stats-only (summary statistics, a sha256 of the
float32 bytes and a fixed strided sample). The reference side writes it (`sdport parity record`);
the native side is checked against it without any reference package (`sdport parity check`); any
two dumps, from any producer that writes the schema, can be compared (`sdport parity compare`).

The harness also spills the reference's activations into a full dump in a temporary directory, so
that accumulated comparison never holds both models' activations in memory.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os

import h5py
import numpy as np
import torch

from ..models.storage import h5safe, partial as partials
from ..models.errors import SdportError, cut

FORMAT = "sdport.activations"
FORMAT_VERSION = 1  # layers named by sdport's native modules, in the native layout
REFERENCE_NAMES = 2  # layers named by the reference's modules, in the reference's layout (ports write these)
VERSIONS = (FORMAT_VERSION, REFERENCE_NAMES)
FULL, STATS = "full", "stats"
SAMPLE_SIZE = 4096  # elements in a stats-only layer's strided sample
MAX_SAMPLE_SIZE = 1 << 24  # the largest `sample_size` a dump may claim
MAX_RANK = 8
# The dtypes an input may name (its `dtype` attribute), by name: never looked up as torch attributes.
INPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}
_FLOATS = {np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8")}
_INTS = {np.dtype("<i4"), np.dtype("<i8")}


class GoldenError(SdportError):
    """A dump that is not in the schema, or that does not fit what it is compared with."""


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def sample_stride(n: int, size: int = SAMPLE_SIZE) -> int:
    """Stride of the fixed sample: elements 0, s, 2s, ... of the C-order flattening, at most `size`."""
    return max(1, -(-n // size))  # ceil(n / size)


def strided(a: np.ndarray, stride: int) -> np.ndarray:
    return np.ascontiguousarray(a.reshape(-1)[::stride])


def stats(a: np.ndarray) -> dict:
    """Summary statistics of a float32 array, computed in float64."""
    d = a.astype(np.float64).reshape(-1)
    if d.size == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "abs_max": 0.0, "l2": 0.0, "nonfinite": 0}
    finite = np.isfinite(d)
    f = d[finite] if not finite.all() else d
    return {"mean": float(f.mean()) if f.size else float("nan"), "std": float(f.std()) if f.size else float("nan"),
            "min": float(f.min()) if f.size else float("nan"), "max": float(f.max()) if f.size else float("nan"),
            "abs_max": float(np.abs(f).max()) if f.size else float("nan"),
            "l2": float(np.linalg.norm(f)), "nonfinite": int((~finite).sum())}


def sha256_f32(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


class ActivationWriter:
    """Writes a dump to `path.partial`, renamed into place by `close()` (never a half file at `path`)."""

    def __init__(self, path, *, mode: str = FULL, attrs: dict | None = None, force: bool = True,
                 summaries: bool = True, sample_size: int = SAMPLE_SIZE, version: int = FORMAT_VERSION):
        if mode not in (FULL, STATS):
            raise ValueError(f"mode must be {FULL!r} or {STATS!r}, not {mode!r}")
        self.path = os.fspath(path)
        self.partial = self.path + ".partial"
        if os.path.exists(self.path) and not force:
            raise SdportError(f"{self.path}: already exists")
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise SdportError(f"{self.path}: output directory {parent} does not exist")
        self.mode = mode
        self.sample_size = sample_size
        self.summaries = summaries  # stats and sha256 per layer; a private spill file can skip them
        self.count = 0
        self.f = None
        partials.begin(self.partial)  # named before it exists: an interrupt from here on can remove it
        try:
            self.f = h5py.File(self.partial, "w", track_order=True)
            if version not in VERSIONS:
                raise ValueError(f"version must be one of {VERSIONS}, not {version!r}")
            self.f.attrs.update({"format": FORMAT, "format_version": version, "mode": mode,
                                 "created": _now(), "sample_size": sample_size})
            for k, v in (attrs or {}).items():
                self.set_attr(k, v)
            self.f.create_group("inputs", track_order=True)
            self.layers = self.f.create_group("layers", track_order=True)
        except BaseException:  # no `with` owns the file yet: nothing else would remove it
            self.abort()
            raise

    def set_attr(self, key: str, value) -> None:
        self.f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)

    def write_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        """The model inputs, always in full and in their own dtype: a checker feeds exactly these."""
        for name, t in inputs.items():
            t = t.detach().cpu().contiguous()
            self.f["inputs"].create_dataset(name, data=t.float().numpy() if t.is_floating_point() else t.numpy())
            self.f["inputs"][name].attrs["dtype"] = str(t.dtype).removeprefix("torch.")

    def add(self, name: str, reference: str, kind: str, tensor: torch.Tensor, port_name: str = "") -> None:
        """Append one layer (execution order is the order of the calls). `port_name`: the producer's
        own module name (schema 2)."""
        a = _f32(tensor)
        stride = sample_stride(a.size, self.sample_size)
        data = a if self.mode == FULL else strided(a, stride)
        ds = self.layers.create_dataset(f"{self.count:05d}", data=data)
        ds.attrs.update({"name": name, "reference": reference, "kind": kind, "shape": list(a.shape),
                         "stride": stride})
        if port_name:
            ds.attrs["port_name"] = port_name
        if self.summaries:
            ds.attrs.update({"sha256": sha256_f32(a), "stats": json.dumps(stats(a))})
        self.count += 1

    def close(self) -> None:
        if self.f:
            self.f.attrs["layer_count"] = self.count
            self.f.flush()
            self.f.close()
            self.f = None
            os.replace(self.partial, self.path)
            partials.end(self.partial, self.path)

    def abort(self) -> None:
        if self.f:
            self.f.close()
            self.f = None
        partials.discard(self.partial)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort() if exc_type else self.close()


@dataclasses.dataclass(frozen=True)
class Entry:
    index: int
    name: str
    reference: str
    kind: str
    shape: tuple[int, ...]
    sha256: str
    stats: dict
    stride: int
    key: str  # dataset name under /layers
    port_name: str = ""  # schema 2: the producer's own module name, for reports


def _text(v):
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        v = v.item()
    return v


class ActivationReader:
    """Reads a dump; every attribute is type-checked and every dataset's storage checked before its
    data is read (a dump is a file from someone else: models/storage/h5safe.py, docs/security.md)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise GoldenError(f"{self.path}: is a directory, not an activation dump")
        try:
            self.f = h5safe.open_file(self.path, GoldenError)
        except FileNotFoundError:
            raise GoldenError(f"{self.path}: no such file") from None
        except OSError as e:
            raise GoldenError(f"{self.path}: not a readable HDF5 file ({cut(e, 100)})") from None
        try:
            self._budget = h5safe.InflateBudget(os.fstat(self.f.id.get_vfd_handle()).st_size)
            self._open()
        except GoldenError:
            self.f.close()
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:  # damaged metadata
            self.f.close()
            raise GoldenError(f"{self.path}: damaged activation dump ({cut(e, 100)})") from None

    def _open(self) -> None:
        fmt = _text(self.f.attrs.get("format"))
        if not (isinstance(fmt, str) and fmt == FORMAT):
            raise GoldenError(f"{self.path}: not an activation dump (root attribute format={cut(repr(fmt))}, "
                              f"expected {FORMAT!r})")
        version = _text(self.f.attrs.get("format_version", -1))
        if type(version) is not int or version not in VERSIONS:
            raise GoldenError(f"{self.path}: activation dump version {cut(repr(version))}; this sdport reads "
                              f"{' and '.join(map(str, VERSIONS))}")
        self.version = version
        if not isinstance(self.f.get("layers"), h5py.Group):
            raise GoldenError(f"{self.path}: no /layers group")
        self.mode = _text(self.f.attrs.get("mode", FULL))
        if self.mode not in (FULL, STATS):
            raise GoldenError(f"{self.path}: root attribute mode={cut(repr(self.mode))}, expected {FULL!r} or {STATS!r}")
        sample_size = _text(self.f.attrs.get("sample_size", SAMPLE_SIZE))
        if type(sample_size) is not int or not 1 <= sample_size <= MAX_SAMPLE_SIZE:
            raise GoldenError(f"{self.path}: root attribute sample_size={cut(repr(sample_size))}, "
                              f"expected an integer in 1..{MAX_SAMPLE_SIZE}")
        self.sample_size = sample_size
        self.entries: list[Entry] = []
        for i, key in enumerate(self.f["layers"]):
            self.entries.append(self._entry(i, key))
        self.by_name = {e.name: e for e in self.entries}

    def _entry(self, i: int, key: str) -> Entry:
        where = f"{self.path}: /layers/{cut(key, 40)}"
        ds = self.f["layers"][key]
        if not isinstance(ds, h5py.Dataset):
            raise GoldenError(f"{where} is a group, not a dataset")
        a = ds.attrs
        if "name" not in a or "shape" not in a:
            raise GoldenError(f"{where} lacks attribute {'name' if 'name' not in a else 'shape'!r}")
        name, shape = _text(a["name"]), _text(a["shape"])
        if not isinstance(name, str):
            raise GoldenError(f"{where}: attribute name is not a string")
        if isinstance(shape, str):
            try:
                shape = json.loads(shape)
            except (json.JSONDecodeError, RecursionError):
                raise GoldenError(f"{where}: attribute shape is not a list of integers") from None
        shape = shape.tolist() if isinstance(shape, np.ndarray) else shape
        if not isinstance(shape, list) or len(shape) > MAX_RANK or any(type(n) is not int or n < 0 for n in shape):
            raise GoldenError(f"{where}: attribute shape is not a list of at most {MAX_RANK} non-negative integers")
        stride = _text(a.get("stride", 1))
        if type(stride) is not int or stride < 1:
            raise GoldenError(f"{where}: attribute stride={cut(repr(stride))} is not a positive integer")
        raw_stats = _text(a.get("stats", "{}"))
        try:
            st = json.loads(raw_stats) if isinstance(raw_stats, str) else None
        except (json.JSONDecodeError, RecursionError):
            st = None
        if not isinstance(st, dict):
            raise GoldenError(f"{where}: attribute stats is not a JSON object")
        strs = {k: _text(a.get(k, "")) for k in ("reference", "kind", "sha256", "port_name")}
        if not all(isinstance(v, str) for v in strs.values()):
            raise GoldenError(f"{where}: attributes reference, kind, sha256 and port_name must be strings")
        reference = strs["reference"] or (name if self.version == REFERENCE_NAMES else "")
        return Entry(i, name, reference, strs["kind"], tuple(shape), strs["sha256"], st, stride, key,
                     cut(strs["port_name"], 200))

    def _read(self, ds: h5py.Dataset, what: str, dtypes: set) -> np.ndarray:
        """A dataset's data, after its storage and element type are checked."""
        if ds.id.dtype not in dtypes:
            raise GoldenError(f"{self.path}: {what} has element type {cut(ds.id.dtype)}, expected one of "
                              f"{', '.join(sorted(str(d) for d in dtypes))}")
        try:
            h5safe.check_storage(ds, self.path, what, self._budget, GoldenError)
            return np.asarray(ds[()])
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise GoldenError(f"{self.path}: {what}: unreadable ({cut(e, 100)})") from None

    def attr(self, key: str, default=None):
        v = _text(self.f.attrs.get(key, default))
        if isinstance(v, str) and v[:1] in "{[":
            try:
                return json.loads(v)
            except (json.JSONDecodeError, RecursionError):
                return v
        return v

    @property
    def attrs(self) -> dict:
        return {k: self.attr(k) for k in self.f.attrs}

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """{input name: declared shape}, read without touching the data."""
        g = self.f.get("inputs")
        if g is None:
            return {}
        if not isinstance(g, h5py.Group):
            raise GoldenError(f"{self.path}: /inputs is not a group")
        out = {}
        for name, ds in g.items():
            if not isinstance(ds, h5py.Dataset) or ds.shape is None:
                raise GoldenError(f"{self.path}: /inputs/{cut(name, 40)} is not a dataset with data")
            out[name] = tuple(ds.shape)
        return out

    def inputs(self) -> dict[str, torch.Tensor]:
        out = {}
        self.input_shapes()  # the group and its members checked
        for name, ds in self.f.get("inputs", {}).items():
            what = f"/inputs/{cut(name, 40)}"
            dtype = _text(ds.attrs.get("dtype", "float32"))
            if not isinstance(dtype, str) or dtype not in INPUT_DTYPES:
                raise GoldenError(f"{self.path}: {what} has dtype attribute {cut(repr(dtype), 40)}; "
                                  f"expected one of {', '.join(INPUT_DTYPES)}")
            a = self._read(ds, what, _FLOATS | _INTS)
            out[name] = torch.from_numpy(np.array(a)).to(INPUT_DTYPES[dtype])
        return out

    def full(self, e: Entry) -> torch.Tensor:
        """The whole activation (full dumps only)."""
        if self.mode != FULL:
            raise GoldenError(f"{self.path}: a stats-only dump holds no full tensors")
        ds = self.f["layers"][e.key]
        if ds.shape != e.shape:
            raise GoldenError(f"{self.path}: /layers/{e.key} holds shape {cut(ds.shape)}, its attribute says {list(e.shape)}")
        return torch.from_numpy(np.array(self._read(ds, f"/layers/{e.key}", _FLOATS), dtype=np.float32))

    def sample(self, e: Entry) -> np.ndarray:
        """The layer's strided sample (read from the full tensor in a full dump)."""
        if self.mode == FULL:
            return self.full(e).numpy().reshape(-1)[::e.stride]
        ds = self.f["layers"][e.key]
        n = math.prod(e.shape)
        if ds.shape != (-(-n // e.stride),) or e.stride != sample_stride(n, self.sample_size):
            raise GoldenError(f"{self.path}: /layers/{e.key}: a sample of shape {cut(ds.shape)} and stride {e.stride} "
                              f"does not fit {n} elements sampled at most {self.sample_size} times")
        return np.array(self._read(ds, f"/layers/{e.key}", _FLOATS), dtype=np.float32)

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def compare_with(reader: ActivationReader, e: Entry, native: torch.Tensor):
    """Metrics of a native activation against a dump entry: whole tensors for a full dump, the
    same strided sample of both for a stats-only dump. Also returns whether the float32 bytes
    are identical (sha256)."""
    from .metrics import compare

    a = _f32(native)
    if tuple(a.shape) != e.shape:
        raise GoldenError(f"layer {e.name}: native output shape {list(a.shape)}, dump holds {list(e.shape)}")
    if reader.mode == FULL:
        m = compare(a, reader.full(e).numpy())
    else:
        m = compare(strided(a, e.stride), reader.sample(e))
    return m, sha256_f32(a) == e.sha256


def compare_entries(a: ActivationReader, ea: Entry, b: ActivationReader, eb: Entry) -> dict:
    """Metrics of dump A's layer against dump B's (B is the reference): full tensors when both are
    full, otherwise the strided samples (which must use the same stride)."""
    from .metrics import compare

    if ea.shape != eb.shape:
        raise GoldenError(f"layer {ea.name}: shape {list(ea.shape)} in {a.path}, {list(eb.shape)} in {b.path}")
    if a.mode == FULL and b.mode == FULL:
        return compare(a.full(ea).numpy(), b.full(eb).numpy())
    if ea.stride != eb.stride:
        raise GoldenError(f"layer {ea.name}: sample strides differ ({ea.stride} vs {eb.stride})")
    return compare(a.sample(ea), b.sample(eb))
