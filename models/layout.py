"""The sdport HDF5 layout: read and write primitives (documented in docs/layout.md).

The native side owns its weight format: converters write through `LayoutWriter`, models load
through `LayoutReader`. Nothing here knows about CompVis key names.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os

import h5py
import numpy as np
import torch

from .errors import BadFile, LayoutError, SdportError

FORMAT = "sdport"
LAYOUT_VERSION = 1
COMPONENTS = ("unet", "text_model", "vit", "encoder", "decoder")
SCHEDULE = "schedule"

# torch dtype <-> (numpy storage dtype, name recorded in the dataset's `dtype` attribute).
# bfloat16 has no HDF5 type: its bits are stored as uint16 and the attribute says "bfloat16".
_DTYPES = {
    torch.float32: (np.float32, "float32"),
    torch.float16: (np.float16, "float16"),
    torch.bfloat16: (np.uint16, "bfloat16"),
    torch.float64: (np.float64, "float64"),
    torch.int64: (np.int64, "int64"),
    torch.int32: (np.int32, "int32"),
    torch.int8: (np.int8, "int8"),
    torch.uint8: (np.uint8, "uint8"),
    torch.bool: (np.bool_, "bool"),
}
_BY_NAME = {name: (np_dt, t) for t, (np_dt, name) in _DTYPES.items()}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor -> a C-contiguous numpy array of its exact bytes (bf16 viewed as uint16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy() if hasattr(torch, "uint16") else t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype not in _DTYPES:
        raise SdportError(f"dtype {t.dtype} has no place in the sdport layout")
    return t.numpy()


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data).hexdigest() if a.size else hashlib.sha256(b"").hexdigest()


def _json_attr(v) -> str:
    return json.dumps(v, sort_keys=False)


class LayoutWriter:
    """Writes `path` atomically: everything goes to `path.partial`, renamed into place on `close()`.

    An exception (or a kill) leaves no file at `path`; `abort()` removes the partial file.
    """

    def __init__(self, path: str | os.PathLike, *, force: bool = False, attrs: dict | None = None,
                 compression: str | None = None):
        self.path = os.fspath(path)
        self.partial = self.path + ".partial"
        self.compression = compression
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise SdportError(f"{self.path}: output directory {parent} does not exist")
        if os.path.isdir(self.path):
            raise SdportError(f"{self.path}: is a directory")
        if os.path.exists(self.path) and not force:
            raise SdportError(f"{self.path}: already exists (use --force to overwrite)")
        try:
            self.f = h5py.File(self.partial, "w", track_order=True)
        except OSError as e:
            raise SdportError(f"{self.partial}: cannot create ({e})") from None
        self.f.attrs["format"] = FORMAT
        self.f.attrs["layout_version"] = LAYOUT_VERSION
        self.f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for k, v in (attrs or {}).items():
            self.set_attr(k, v)

    def set_attr(self, key: str, value, group: str | None = None):
        target = self.f if group is None else self.f[group]
        target.attrs[key] = value if isinstance(value, (str, int, float, bool, np.generic)) else _json_attr(value)

    def group(self, name: str, *, config: dict | None = None, attrs: dict | None = None) -> None:
        g = self.f.create_group(name, track_order=True)
        if config is not None:
            g.attrs["config"] = _json_attr(config)
        for k, v in (attrs or {}).items():
            self.set_attr(k, v, name)

    def write(self, group: str, key: str, tensor: torch.Tensor, *, sources=(), transform: str = "identity",
              extra: dict | None = None) -> str:
        """One dataset named by the native state-dict key; returns its sha256."""
        arr = to_numpy(tensor)
        kw = {"compression": self.compression} if self.compression and arr.size > 1 else {}
        ds = self.f[group].create_dataset(key, data=arr, **kw)
        digest = sha256(arr)
        ds.attrs["dtype"] = _DTYPES[tensor.dtype][1]
        ds.attrs["sources"] = _json_attr(list(sources))
        ds.attrs["transform"] = transform
        ds.attrs["sha256"] = digest
        for k, v in (extra or {}).items():
            ds.attrs[k] = v if isinstance(v, (str, int, float)) else _json_attr(v)
        return digest

    def close(self):
        """Flush, fsync and rename into place."""
        self.f.flush()
        self.f.close()
        with open(self.partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.partial, self.path)

    def abort(self):
        try:
            self.f.close()
        except Exception:  # the file may already be unusable (disk full): removing it is what matters
            pass
        if os.path.exists(self.partial):
            os.remove(self.partial)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class LayoutReader:
    """Reads an sdport HDF5 file: root attributes, component configs, tensors (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise BadFile(f"{self.path}: is a directory, not an sdport .h5 file")
        try:
            self.f = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise BadFile(f"{self.path}: no such file") from None
        except OSError as e:
            raise BadFile(f"{self.path}: not a readable HDF5 file ({str(e).splitlines()[0][:100]})") from None
        fmt = self.f.attrs.get("format")
        if fmt != FORMAT:
            self.f.close()
            raise LayoutError(f"{self.path}: not an sdport layout file (root attribute format={fmt!r}, expected {FORMAT!r})")
        version = int(self.f.attrs.get("layout_version", -1))
        if version > LAYOUT_VERSION or version < 1:
            self.f.close()
            raise LayoutError(f"{self.path}: layout version {version}; this sdport reads layout version "
                              f"{LAYOUT_VERSION} (upgrade sdport)" if version > LAYOUT_VERSION else
                              f"{self.path}: invalid layout version {version}")
        self.version = version

    @property
    def attrs(self) -> dict:
        return {k: _decode(v) for k, v in self.f.attrs.items()}

    def components(self) -> list[str]:
        return [c for c in COMPONENTS if c in self.f]

    def has(self, group: str) -> bool:
        return group in self.f

    def _group(self, group: str) -> h5py.Group:
        if group not in self.f:
            raise LayoutError(f"{self.path}: no '{group}' component (the file holds: {', '.join(self.components()) or 'none'})")
        return self.f[group]

    def group_attrs(self, group: str) -> dict:
        return {k: _decode(v) for k, v in self._group(group).attrs.items()}

    def config(self, group: str) -> dict:
        g = self._group(group)
        if "config" not in g.attrs:
            raise LayoutError(f"{self.path}: group '/{group}' has no 'config' attribute")
        try:
            return json.loads(g.attrs["config"])
        except json.JSONDecodeError:
            raise LayoutError(f"{self.path}: group '/{group}' has a config attribute that is not JSON") from None

    def keys(self, group: str) -> list[str]:
        return list(self._group(group).keys())

    def dataset_attrs(self, group: str, key: str) -> dict:
        ds = self._group(group)[key]
        return {k: _decode(v) for k, v in ds.attrs.items()}

    def raw(self, group: str, key: str) -> np.ndarray:
        """The dataset's stored array: memory-mapped (copy-on-write) when contiguous and unfiltered."""
        ds = self._group(group)[key]
        offset = ds.id.get_offset()
        if offset is not None and ds.chunks is None and ds.compression is None and ds.size > 0:
            return np.memmap(self.path, dtype=ds.dtype, mode="c", offset=offset, shape=ds.shape)
        return np.asarray(ds[()])

    def tensor(self, group: str, key: str) -> torch.Tensor:
        ds = self._group(group)[key]
        name = _decode(ds.attrs.get("dtype", str(ds.dtype)))
        arr = self.raw(group, key)
        if arr.ndim == 0:  # 0-d datasets come back as numpy scalars, which torch refuses
            arr = np.array(arr).reshape(())
        t = torch.from_numpy(np.asarray(arr))
        if name == "bfloat16":
            t = t.view(torch.bfloat16)
        return t

    def state_dict(self, group: str) -> dict[str, torch.Tensor]:
        return {k: self.tensor(group, k) for k in self.keys(group)}

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _decode(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def verify(path: str) -> list[str]:
    """Recompute every dataset's sha256; returns problems as one-line messages (empty when intact)."""
    problems = []
    with LayoutReader(path) as r:
        for gname in [*r.components(), *([SCHEDULE] if r.has(SCHEDULE) else [])]:
            for key in r.keys(gname):
                ds = r.f[gname][key]
                want = _decode(ds.attrs.get("sha256"))
                if not want:
                    problems.append(f"/{gname}/{key}: no sha256 attribute")
                    continue
                try:
                    got = sha256(np.asarray(ds[()]))
                except OSError as e:
                    problems.append(f"/{gname}/{key}: unreadable ({str(e)[:80]})")
                    continue
                if got != want:
                    problems.append(f"/{gname}/{key}: sha256 mismatch (stored {want[:12]}…, computed {got[:12]}…)")
    return problems
