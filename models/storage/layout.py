"""The sdport HDF5 layout: its constants, element types and reader (documented in docs/layout.md).

The native side owns its weight format: models load through `LayoutReader`, and the one writer
(convert/writer.py `LayoutWriter`) takes its constants and type table from here. Nothing here knows
about CompVis key names.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import torch

from ..components import NAMES
from ..errors import BadFile, LayoutError, SdportError, cut
from . import h5safe
from .filemap import FileMap

FORMAT = "sdport"
LAYOUT_VERSION = 1
COMPONENTS = NAMES  # the groups that hold a component (models/components.py)
SCHEDULE = "schedule"
MAX_SCHEDULE = 10_000  # elements of a noise-schedule buffer (SD: 1,000 timesteps)

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
_STORED = {np.dtype(np_dt) for np_dt, _ in _DTYPES.values()}  # native byte order only
_TORCH_OF = {np.dtype(np_dt): t for t, (np_dt, _) in _DTYPES.items()}  # uint16 (bf16 bits) is decided apart

# What h5py raises when a file's metadata is damaged, depending on which structure broke: OSError
# ("ran off end of input buffer"), RuntimeError ("incorrect metadata checksum"), KeyError ("bad object
# header version number"), ValueError (a dataset's data past the end of the file, from filemap).
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)
VERIFY_IN_FLIGHT = 256 << 20  # bytes handed to verify's hashing threads and not yet hashed


def _one_line(e: BaseException, n: int = 160) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) quotes its message
    return " ".join(str(text).split())[:n]


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


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a whole file, read in 4 MiB blocks (the provenance hash of sources and outputs)."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(chunk))  # one buffer: a fresh one per block page-faults every 4 KiB of it
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def _json_attr(v) -> str:
    return json.dumps(v, sort_keys=False)


def _reading(method):
    """Reader methods: a damaged file becomes one BadFile line naming the file, not an h5py traceback."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self._closed:  # h5py's own errors on a closed file read as damage or a missing dataset
            raise SdportError(f"{self.path}: the reader was closed")
        with self.guard("/" + "/".join(map(str, args)) if args else "the root group"):
            return method(self, *args, **kwargs)

    return wrapper


def _open_error(path: str, e: OSError) -> str:
    text = _one_line(e, 400)
    if "truncated file" in text:  # HDF5 compares the end-of-file address it stored with the real size
        return f"{path}: truncated HDF5 file ({text[text.find('eof ='):][:80].rstrip(')')})"
    if "file signature not found" in text:
        with open(path, "rb") as f:
            head = f.read(9)
        if head.startswith(b"PK\x03\x04") or head[8:9] == b"{":
            return f"{path}: a checkpoint, not an sdport .h5 file (convert it first: sdport convert {path} -o OUT.h5)"
        return f"{path}: not an HDF5 file (no HDF5 signature)"
    if m := re.search(r"error message = '([^']*)'", text):  # the errno text, e.g. 'Permission denied'
        return f"{path}: cannot open ({m.group(1)})"
    return f"{path}: not a readable HDF5 file ({text[:160]})"


class LayoutReader:
    """Reads an sdport HDF5 file: root attributes, component configs, tensors (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise BadFile(f"{self.path}: is a directory, not an sdport .h5 file")
        try:
            # Regular files only (a FIFO would block HDF5's open() forever); every link checked before
            # anything is read: no external link, soft link or loop (models/storage/h5safe.py).
            self.f = h5safe.open_file(self.path, LayoutError)
        except FileNotFoundError:
            raise BadFile(f"{self.path}: no such file") from None
        except OSError as e:
            raise BadFile(_open_error(self.path, e)) from None
        try:
            with self.guard("root attributes"):
                fmt = _decode(self.f.attrs.get("format"))
                version = self.f.attrs.get("layout_version", -1)
        except SdportError:
            self.f.close()
            raise
        if not (isinstance(fmt, str) and fmt == FORMAT):
            self.f.close()
            raise LayoutError(f"{self.path}: not an sdport layout file (root attribute format={cut(repr(fmt))}, "
                              f"expected {FORMAT!r})")
        if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
            self.f.close()
            raise LayoutError(f"{self.path}: root attribute layout_version={cut(repr(version))} is not an integer")
        version = int(version)
        if version > LAYOUT_VERSION or version < 1:
            self.f.close()
            raise LayoutError(f"{self.path}: layout version {version}; this sdport reads layout version "
                              f"{LAYOUT_VERSION} (upgrade sdport)" if version > LAYOUT_VERSION else
                              f"{self.path}: invalid layout version {version}")
        self.version = version
        self._groups: dict = {}
        self._datasets: dict = {}
        self._filemap: FileMap | None = None  # copy-on-write views of the datasets (models/storage/filemap.py)
        self._budget = h5safe.InflateBudget(os.fstat(self.f.id.get_vfd_handle()).st_size)
        self._closed = False

    @contextlib.contextmanager
    def guard(self, what: str):
        """Turn h5py's errors on damaged metadata or data inside the block into BadFile naming `what`."""
        try:
            yield
        except SdportError:
            raise
        except _H5_ERRORS as e:
            raise BadFile(f"{self.path}: damaged HDF5 file, cannot read {what} ({_one_line(e)})") from None

    @property
    @_reading
    def attrs(self) -> dict:
        return {k: _decode(v) for k, v in self.f.attrs.items()}

    @_reading
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if c in self.f]

    @_reading
    def has(self, group: str) -> bool:
        return group in self.f

    def _group(self, group: str) -> h5py.Group:
        g = self._groups.get(group)  # cached: a model load asks for its group once per dataset
        if g is None:
            g = self._groups[group] = self.f.get(group)
        if not isinstance(g, h5py.Group):
            raise LayoutError(f"{self.path}: no '{group}' component (the file holds: {', '.join(self.components()) or 'none'})")
        return g

    @_reading
    def dataset(self, group: str, key: str) -> h5py.Dataset:
        """The h5py dataset `/group/key` (LayoutError when absent or not a dataset)."""
        ds = self._datasets.get((group, key))  # cached: a model load asks for each dataset twice
        if ds is None:
            try:  # the low-level open: a fraction of Group.get's cost, paid 638 times per UNet
                oid = h5py.h5o.open(self._group(group).id, key.encode())
            except KeyError as e:  # absent, or present with a header HDF5 cannot read
                if key in self._group(group):
                    raise BadFile(f"{self.path}: damaged HDF5 file, cannot read /{group}/{key} "
                                  f"({_one_line(e)})") from None
                oid = None
            ds = self._datasets[(group, key)] = h5py.Dataset(oid) if isinstance(oid, h5py.h5d.DatasetID) else key
        if not isinstance(ds, h5py.Dataset):
            raise LayoutError(f"{self.path}: no dataset '/{group}/{key}'")
        return ds

    @_reading
    def group_attrs(self, group: str) -> dict:
        return {k: _decode(v) for k, v in self._group(group).attrs.items()}

    @_reading
    def config(self, group: str) -> dict:
        g = self._group(group)
        if "config" not in g.attrs:
            raise LayoutError(f"{self.path}: group '/{group}' has no 'config' attribute")
        text = g.attrs["config"]
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not isinstance(text, str):
            raise LayoutError(f"{self.path}: group '/{group}' has a config attribute that is not a JSON string")
        try:
            cfg = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise LayoutError(f"{self.path}: group '/{group}' has a config attribute that is not JSON") from None
        if not isinstance(cfg, dict):
            raise LayoutError(f"{self.path}: group '/{group}' has a config attribute that is not a JSON object")
        return cfg

    @_reading
    def keys(self, group: str) -> list[str]:
        return list(self._group(group).keys())

    @_reading
    def dataset_attrs(self, group: str, key: str) -> dict:
        ds = self.dataset(group, key)
        return {k: _decode(v) for k, v in ds.attrs.items()}

    @_reading
    def quantized(self, group: str) -> dict[str, dict]:
        """{weight key: its `quantization` attribute} for the int8-quantized datasets of `group`."""
        out = {}
        for key in self._group(group):
            ds = self.dataset(group, key)
            if h5py.h5a.exists(ds.id, b"quantization"):  # much cheaper than attrs.get, once per dataset
                q = _decode(ds.attrs["quantization"])
                if not isinstance(q, dict):
                    raise LayoutError(f"{self.path}: /{group}/{key} has a quantization attribute that is not a JSON object")
                out[key] = q
        return out

    @_reading
    def raw(self, group: str, key: str) -> np.ndarray:
        """The dataset's stored array: memory-mapped (copy-on-write) when contiguous and unfiltered."""
        return self._array(self.dataset(group, key), group, key)

    @_reading
    def torch_dtype(self, group: str, key: str) -> torch.dtype:
        """The torch dtype the dataset's data would load as, read from its metadata alone."""
        return self._torch_dtype(self.dataset(group, key), group, key)

    @_reading
    def describe(self, group: str, keys) -> dict[str, tuple]:
        """{key: (shape, torch dtype)} of the datasets `keys` of `group`, from their metadata alone (one
        guarded call for all of them: a model load asks this for every dataset)."""
        return {k: (ds.shape, self._torch_dtype(ds, group, k)) for k in keys for ds in (self.dataset(group, k),)}

    def _torch_dtype(self, ds: h5py.Dataset, group: str, key: str) -> torch.dtype:
        dtype = self._element_type(ds, group, key)
        if dtype == np.uint16:
            if not _is(_decode(ds.attrs.get("dtype")), "bfloat16"):
                raise LayoutError(f"{self.path}: /{group}/{key} is stored as uint16 without the dtype attribute "
                                  f"'bfloat16' (the only use of uint16 in the layout)")
            return torch.bfloat16
        return _TORCH_OF[dtype]

    def _element_type(self, ds: h5py.Dataset, group: str, key: str) -> np.dtype:
        dtype = ds.id.dtype
        if dtype not in _STORED:
            raise LayoutError(f"{self.path}: /{group}/{key} has element type {cut(dtype)}, which the sdport layout "
                              f"does not use (little-endian {', '.join(sorted(n for _, n in _DTYPES.values()))})")
        return dtype

    def _array(self, ds: h5py.Dataset, group: str, key: str) -> np.ndarray:
        self._element_type(ds, group, key)
        return self._stored(ds)

    def _stored(self, ds: h5py.Dataset) -> np.ndarray:
        """The dataset's stored elements, whatever their type: mapped when contiguous and unfiltered."""
        # h5py's low-level calls: its high-level properties cost several times more, times 638 datasets.
        # HDF5 gives an offset only for contiguous, allocated data in this file: a chunked (so possibly
        # filtered), compact, external or virtual dataset has none, and is read through HDF5.
        dtype, offset, shape = ds.id.dtype, ds.id.get_offset(), ds.shape
        if offset is not None and shape is not None and not dtype.hasobject and math.prod(shape) > 0:
            if self._filemap is None:
                # HDF5's own descriptor: the file that was opened and checked, even if its path now names another
                fd = self.f.id.get_vfd_handle()
                self._filemap = FileMap(fd, os.fstat(fd).st_size)
            return self._filemap.view(offset, dtype, shape)
        # Read through HDF5: only after its storage is checked (nothing outside the file, no filter
        # plugin, a declared size that the stored bytes can hold).
        h5safe.check_storage(ds, self.path, ds.name, self._budget)
        return np.asarray(ds[()])

    @_reading
    def tensor(self, group: str, key: str) -> torch.Tensor:
        ds = self.dataset(group, key)
        arr = self._array(ds, group, key)
        # uint16 storage holds bfloat16 bits, and only those (the dataset's dtype attribute says so);
        # every other type is its own name.
        if arr.dtype == np.uint16:
            self._torch_dtype(ds, group, key)
        if arr.ndim == 0:  # 0-d datasets come back as numpy scalars, which torch refuses
            arr = np.array(arr).reshape(())
        t = torch.from_numpy(np.asarray(arr))
        return t.view(torch.bfloat16) if arr.dtype == np.uint16 else t

    @_reading
    def schedule_tensor(self, key: str) -> torch.Tensor:
        """A /schedule buffer: 1-D, at most MAX_SCHEDULE finite floats (checked before and after reading)."""
        ds = self.dataset(SCHEDULE, key)
        if ds.shape is None or len(ds.shape) != 1 or not 1 <= ds.shape[0] <= MAX_SCHEDULE:
            raise LayoutError(f"{self.path}: /{SCHEDULE}/{key} has shape {cut(ds.shape)}; a schedule buffer is "
                              f"1-D with at most {MAX_SCHEDULE} elements")
        t = self.tensor(SCHEDULE, key)
        if not t.is_floating_point() or not torch.isfinite(t.float()).all():
            raise LayoutError(f"{self.path}: /{SCHEDULE}/{key} is not made of finite floating-point numbers")
        return t

    @_reading
    def latent_scale(self, default: float) -> float:
        """The /schedule group's latent_scale attribute (`default` when absent): a positive finite number."""
        v = _decode(self._group(SCHEDULE).attrs.get("latent_scale", default))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise LayoutError(f"{self.path}: /{SCHEDULE} attribute latent_scale={cut(repr(v))} is not a positive number")
        return float(v)

    @_reading
    def state_dict(self, group: str) -> dict[str, torch.Tensor]:
        return {k: self.tensor(group, k) for k in self.keys(group)}

    def close(self):
        self.f.close()
        self._closed = True
        # Views already handed out keep their map (and its own descriptor); no new one may be cut
        # from a descriptor number the system can now give to another file.
        self._filemap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is(v, text: str) -> bool:
    """Whether an attribute read back is the string `text` (a crafted file can store any type there)."""
    return isinstance(v, str) and v == text


def _decode(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            return v
    return v


def _digest_mismatch(want, got: str) -> str:
    """Which of the two is wrong: the data (a valid stored digest) or the stored attribute itself."""
    if not (isinstance(want, str) and re.fullmatch(r"[0-9a-f]{64}", want)):
        return f"sha256 attribute is not a sha256 hex digest ({ascii(want)[:80]}); the data hashes to {got}"
    # Both in full: a damaged attribute can share its first characters with the right digest.
    return f"sha256 mismatch (stored {want}, computed {got})"


def verify(path: str, threads: int = 2) -> list[str]:
    """Recompute every dataset's sha256; returns problems as one-line messages (empty when intact).

    Datasets are hashed from their memory maps in `threads` threads (hashlib releases the GIL), at most
    VERIFY_IN_FLIGHT bytes ahead of the oldest unfinished one; problems come in dataset order.
    """
    problems: list[str] = []
    pending: collections.deque = collections.deque()  # (name, stored digest, bytes, future) or (message,)
    in_flight = 0

    def settle(limit: int) -> None:
        nonlocal in_flight
        while pending and (in_flight > limit or len(pending[0]) == 1):
            entry = pending.popleft()
            if len(entry) == 1:
                problems.append(entry[0])
                continue
            name, want, nbytes, digest = entry
            in_flight -= nbytes
            got = digest.result()
            if got != want:
                problems.append(f"{name}: {_digest_mismatch(want, got)}")

    with LayoutReader(path) as r, ThreadPoolExecutor(max_workers=threads) as pool:
        for gname in [*r.components(), *([SCHEDULE] if r.has(SCHEDULE) else [])]:
            try:
                keys = list(r.f[gname].keys())
            except _H5_ERRORS as e:  # damaged group metadata: report it and check the other groups
                pending.append((f"/{gname}: cannot list its datasets ({_one_line(e, 100)})",))
                continue
            for key in keys:
                name = f"/{gname}/{key}"
                try:
                    ds = r.f[gname][key]
                    if not isinstance(ds, h5py.Dataset):
                        pending.append((f"{name}: is a {type(ds).__name__}, not a dataset",))
                        continue
                    if ds.shape is None:
                        pending.append((f"{name}: has a null dataspace (no data)",))
                        continue
                    want = _decode(ds.attrs.get("sha256"))
                    if not want:
                        pending.append((f"{name}: no sha256 attribute",))
                        continue
                    arr = r._stored(ds)
                except _H5_ERRORS as e:
                    pending.append((f"{name}: unreadable ({_one_line(e, 100)})",))
                    continue
                if arr.dtype.hasobject:  # strings, references, an empty dataspace: nothing the layout writes
                    pending.append((f"{name}: holds {ds.dtype if ds.shape is not None else 'no data'}, not numbers",))
                    continue
                pending.append((name, want, arr.nbytes, pool.submit(sha256, arr)))
                in_flight += arr.nbytes
                del arr  # the future holds it until hashed; then its map is released
                settle(VERIFY_IN_FLIGHT)
        settle(-1)
    return problems
