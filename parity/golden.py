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
import os

import h5py
import numpy as np
import torch

from ..models.errors import SdportError

FORMAT = "sdport.activations"
FORMAT_VERSION = 1
FULL, STATS = "full", "stats"
SAMPLE_SIZE = 4096  # elements in a stats-only layer's strided sample


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
                 summaries: bool = True, sample_size: int = SAMPLE_SIZE):
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
        self.f = h5py.File(self.partial, "w", track_order=True)
        self.f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "mode": mode,
                             "created": _now(), "sample_size": sample_size})
        for k, v in (attrs or {}).items():
            self.set_attr(k, v)
        self.f.create_group("inputs", track_order=True)
        self.layers = self.f.create_group("layers", track_order=True)

    def set_attr(self, key: str, value) -> None:
        self.f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)

    def write_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        """The model inputs, always in full and in their own dtype: a checker feeds exactly these."""
        for name, t in inputs.items():
            t = t.detach().cpu().contiguous()
            self.f["inputs"].create_dataset(name, data=t.float().numpy() if t.is_floating_point() else t.numpy())
            self.f["inputs"][name].attrs["dtype"] = str(t.dtype).removeprefix("torch.")

    def add(self, name: str, reference: str, kind: str, tensor: torch.Tensor) -> None:
        """Append one layer (execution order is the order of the calls)."""
        a = _f32(tensor)
        stride = sample_stride(a.size, self.sample_size)
        data = a if self.mode == FULL else strided(a, stride)
        ds = self.layers.create_dataset(f"{self.count:05d}", data=data)
        ds.attrs.update({"name": name, "reference": reference, "kind": kind, "shape": list(a.shape),
                         "stride": stride})
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

    def abort(self) -> None:
        if self.f:
            self.f.close()
            self.f = None
        if os.path.exists(self.partial):
            os.remove(self.partial)

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


class ActivationReader:
    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self.f = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise GoldenError(f"{self.path}: no such file") from None
        except OSError as e:
            raise GoldenError(f"{self.path}: not a readable HDF5 file ({str(e).splitlines()[0][:100]})") from None
        fmt = self.f.attrs.get("format")
        if fmt != FORMAT:
            self.f.close()
            raise GoldenError(f"{self.path}: not an activation dump (root attribute format={fmt!r}, "
                              f"expected {FORMAT!r})")
        version = int(self.f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            self.f.close()
            raise GoldenError(f"{self.path}: activation dump version {version}; this sdport reads {FORMAT_VERSION}")
        if "layers" not in self.f:
            self.f.close()
            raise GoldenError(f"{self.path}: no /layers group")
        self.mode = str(self.f.attrs.get("mode", FULL))
        self.entries: list[Entry] = []
        for i, key in enumerate(self.f["layers"]):
            a = self.f["layers"][key].attrs
            try:
                self.entries.append(Entry(i, str(a["name"]), str(a.get("reference", "")), str(a.get("kind", "")),
                                          tuple(int(s) for s in a["shape"]), str(a.get("sha256", "")),
                                          json.loads(a.get("stats", "{}")), int(a.get("stride", 1)), key))
            except KeyError as e:
                raise GoldenError(f"{self.path}: /layers/{key} lacks attribute {e}") from None
        self.by_name = {e.name: e for e in self.entries}

    def attr(self, key: str, default=None):
        v = self.f.attrs.get(key, default)
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and v[:1] in "{[":
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                return v
        return v

    @property
    def attrs(self) -> dict:
        return {k: self.attr(k) for k in self.f.attrs}

    def inputs(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, ds in self.f.get("inputs", {}).items():
            t = torch.from_numpy(np.array(ds[()]))
            dtype = ds.attrs.get("dtype", "float32")
            out[name] = t.to(getattr(torch, str(dtype)))
        return out

    def full(self, e: Entry) -> torch.Tensor:
        """The whole activation (full dumps only)."""
        if self.mode != FULL:
            raise GoldenError(f"{self.path}: a stats-only dump holds no full tensors")
        return torch.from_numpy(np.array(self.f["layers"][e.key][()]))

    def sample(self, e: Entry) -> np.ndarray:
        """The layer's strided sample (read from the full tensor in a full dump)."""
        ds = self.f["layers"][e.key]
        if self.mode == FULL:
            return np.array(ds[()]).reshape(-1)[::e.stride]
        return np.array(ds[()])

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
