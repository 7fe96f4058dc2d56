"""The one writer of the sdport HDF5 layout (docs/layout.md): atomic, checksummed, bytes written in place.

Converters write through `LayoutWriter`; the format's constants and element types come from the reader's
module (models/storage/layout.py), so reader and writer cannot disagree.
"""
from __future__ import annotations

import collections
import datetime
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor

import h5py
import numpy as np
import torch

from ..models.errors import SdportError
from ..models.storage import partial as partials
from ..models.storage.layout import _DTYPES, FORMAT, LAYOUT_VERSION, _json_attr, _one_line, sha256, to_numpy
from .directio import DataWriter


class LayoutWriter:
    """Writes `path` atomically: everything goes to `path.partial`, renamed into place on `close()`.

    An exception (or a kill) leaves no file at `path`; `abort()` removes the partial file.
    """

    IN_FLIGHT_BYTES = 512 << 20  # tensors handed over but not yet hashed and written: bounds the peak RSS

    def __init__(self, path: str | os.PathLike, *, force: bool = False, attrs: dict | None = None,
                 compression: str | None = None):
        self.path = os.fspath(path)
        self.partial = self.path + ".partial"
        self.compression = compression
        self._writer: DataWriter | None = None  # with its hashing and writing threads, on the first write
        self._hashing: ThreadPoolExecutor | None = None
        self._writing: ThreadPoolExecutor | None = None
        self._pending, self._in_flight = collections.deque(), 0
        self._digests: list[tuple[str, str | Future]] = []  # dataset name -> sha256, in creation order
        if not os.path.basename(self.path):
            raise SdportError(f"output path {self.path!r} names no file")
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise SdportError(f"{self.path}: output directory {parent} does not exist")
        if os.path.isdir(self.path):
            raise SdportError(f"{self.path}: is a directory")
        if os.path.exists(self.path) and not force:
            raise SdportError(f"{self.path}: already exists (use --force to overwrite)")
        partials.begin(self.partial)  # named before it exists: an interrupt from here on can remove it
        try:
            # libver v108: object headers, groups and heaps carry checksums, so damaged metadata is refused
            # by a checksum error instead of sending HDF5 into a loop (as version-1 headers can); HDF5 >= 1.8 reads it.
            self.f = h5py.File(self.partial, "w", track_order=True, libver=("v108", "latest"))
        except OSError as e:
            partials.end(self.partial)
            raise SdportError(f"{self.partial}: cannot create ({e})") from None
        try:
            self.f.attrs["format"] = FORMAT
            self.f.attrs["layout_version"] = LAYOUT_VERSION
            self.f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            for k, v in (attrs or {}).items():
                self.set_attr(k, v)
        except BaseException:  # no `with` owns the file yet: nothing else would remove it
            self.abort()
            raise

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
              extra: dict | None = None) -> None:
        """One dataset named by the native state-dict key, with its sha256.

        An uncompressed dataset is allocated at once and its bytes go straight to their place in the file,
        hashed in one thread and written in another (convert/directio.py) while the caller prepares the next
        tensor (hashlib and pwrite release the GIL; HDF5's own write path copies through its type
        conversion, slower than the disk).
        """
        arr = to_numpy(tensor)
        grp = self.f[group]
        if self.compression is None and arr.size > 0:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # the offset exists before any data is written
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every byte is ours: no fill pass first
            ds = grp.create_dataset(key, shape=arr.shape, dtype=arr.dtype, dcpl=dcpl)
            self._digests.append((ds.name, self._start(arr, ds.id.get_offset())))
        else:
            kw = {"compression": self.compression} if self.compression and arr.size > 1 else {}
            ds = grp.create_dataset(key, data=arr, **kw)
            self._digests.append((ds.name, sha256(arr)))
        ds.attrs["dtype"] = _DTYPES[tensor.dtype][1]
        ds.attrs["sources"] = _json_attr(list(sources))
        ds.attrs["transform"] = transform
        for k, v in (extra or {}).items():
            ds.attrs[k] = v if isinstance(v, (str, int, float)) else _json_attr(v)
        self._finish(block=False)

    def _start(self, arr: np.ndarray, offset: int) -> Future:
        """Hash `arr` in one thread and write it in another; returns the digest's future."""
        if self._writer is None:
            self._hashing, self._writing = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
            self._writer = DataWriter(self.partial)  # owned by the one writing thread
        digest = self._hashing.submit(sha256, arr)
        self._pending.append((digest, self._writing.submit(self._writer.write, arr, offset), arr.nbytes))
        self._in_flight += arr.nbytes
        return digest

    def _finish(self, block: bool) -> None:
        """Retire finished writes (raising their errors); wait while too many bytes are in flight (or for
        all of them, with block)."""
        while self._pending:
            digest, written, nbytes = self._pending[0]
            if not (block or self._in_flight > self.IN_FLIGHT_BYTES or (digest.done() and written.done())):
                return
            written.result()
            digest.result()
            self._pending.popleft()
            self._in_flight -= nbytes

    def close(self):
        """Finish the pending writes, record the digests, flush, fsync and rename into place."""
        self._finish(block=True)
        self._stop_pool()
        # In creation order, whatever order the threads finished in: the file's layout is reproducible.
        for name, digest in self._digests:
            self.f[name].attrs["sha256"] = digest if isinstance(digest, str) else digest.result()
        self.f.flush()
        self.f.close()
        with open(self.partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.partial, self.path)
        partials.end(self.partial, self.path)

    def _stop_pool(self) -> None:
        if self._writer is not None:
            for pool in (self._hashing, self._writing):
                pool.shutdown(wait=True, cancel_futures=True)  # no thread may write after this
            self._writer.close()
            self._writer = None
            self._pending.clear()
            self._in_flight = 0

    def abort(self):
        self._stop_pool()
        try:
            self.f.close()
        except Exception:  # the file may already be unusable (disk full): removing it is what matters
            pass
        partials.discard(self.partial)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.close()  # a full disk often shows only here, when HDF5 writes its cached metadata
            except BaseException as e:
                self.abort()
                if self._is_write_error(e):
                    raise self._write_error(e) from None
                raise
        else:
            self.abort()
            if self._is_write_error(exc):
                raise self._write_error(exc) from None

    def _is_write_error(self, e: BaseException) -> bool:
        # h5py raises OSError for a failed dataset write and RuntimeError for a failed metadata flush.
        return isinstance(e, (OSError, RuntimeError)) and (getattr(e, "filename", None) == self.partial
                                                           or self.partial in str(e))

    def _write_error(self, e: BaseException) -> SdportError:
        # h5py puts the errno text inside a long multi-line message: "... error message = 'No space left on device' ..."
        m = re.search(r"error message = '([^']*)'", str(e))
        reason = m.group(1) if m else (getattr(e, "strerror", None) or _one_line(e, 120))
        return SdportError(f"{self.path}: cannot write ({reason}); removed the partial output, the destination is untouched")


