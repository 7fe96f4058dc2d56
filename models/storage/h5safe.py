"""Opening HDF5 files that may be hostile (threat model and bounds: docs/security.md).

HDF5 can make a read reach outside the file: a dataset may keep its bytes in other files (external
storage), a virtual dataset may source other files, a link may point into another file, and a dataset
whose filter id the library does not know makes it dlopen shared libraries from its plugin path. The
layouts sdport writes (weights and activation dumps) use none of these, so a reader:

- switches plugin loading off for the process (`disable_plugins`, run when this module is imported);
- inspects every link it can reach at open (the root's and its groups') and refuses anything but
  hard links (`check_links`), before any data is read;
- before reading a dataset through HDF5, checks its storage (`check_storage`): contiguous or compact
  bytes inside the file, or chunks filtered by deflate/shuffle/fletcher32 only, and a declared size
  that the bytes stored for it can really hold (a dataset declaring billions of elements with nothing
  allocated, or chunks that would inflate to GiBs, is refused before HDF5 allocates anything).

Memory-mapped reads (models/storage/filemap.py) need none of the storage checks: HDF5 gives a data offset only
for contiguous, unfiltered data inside the file, and the map is bounded by the file's size.
"""
from __future__ import annotations

import ctypes
import math
import os
import stat

import h5py

from ..errors import BadFile, LayoutError, cut as _cut

# Filters HDF5 implements itself (no plugin): what `sdport convert --compress` writes (deflate), and the
# two that h5py users commonly add beside it.
ALLOWED_FILTERS = {h5py.h5z.FILTER_DEFLATE: "deflate", h5py.h5z.FILTER_SHUFFLE: "shuffle",
                   h5py.h5z.FILTER_FLETCHER32: "fletcher32"}
MAX_CHUNK_BYTES = 64 << 20  # one chunk is inflated whole: bounded so a crafted chunk cannot take GiBs
DEFLATE_RATIO = 1032  # deflate's largest possible expansion: stored bytes -> at most this many times more
# All filtered datasets of one file together inflate to at most this many times the file's size, plus
# INFLATE_SLACK (legitimate weights hardly compress; a few all-zero tensors are what the slack is for).
INFLATE_RATIO = 64
INFLATE_SLACK = 256 << 20
MAX_LINKS = 1 << 20  # links in one file (the full SD v1 layout has about 1,150)
_LINK_KINDS = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link (into another file)"}
_LAYOUTS = {h5py.h5d.COMPACT: "compact", h5py.h5d.CONTIGUOUS: "contiguous", h5py.h5d.CHUNKED: "chunked"}


def _libhdf5() -> ctypes.CDLL | None:
    """The HDF5 library h5py loaded (its wheels bundle one under a mangled name)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/libhdf5" in line and "_hl" not in line})
    except OSError:
        paths = []
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
            lib.H5PLset_loading_state  # noqa: B018 (the symbol must exist)
            return lib
        except (OSError, AttributeError):
            continue
    return None


def disable_plugins() -> bool:
    """No HDF5 filter plugin can be loaded in this process from now on. Returns whether the library's
    own switch was reached; the plugin search path is emptied in any case."""
    while h5py.h5pl.size():  # h5py's API: nowhere left to dlopen from
        h5py.h5pl.remove(0)
    lib = _libhdf5()
    if lib is None:
        return False
    lib.H5PLset_loading_state.argtypes = [ctypes.c_uint]
    lib.H5PLset_loading_state.restype = ctypes.c_int
    return lib.H5PLset_loading_state(0) >= 0  # 0: no plugin type may load


def plugins_disabled() -> bool:
    lib = _libhdf5()
    if lib is None:
        return h5py.h5pl.size() == 0
    state = ctypes.c_uint(0xFFFF)
    lib.H5PLget_loading_state.argtypes = [ctypes.POINTER(ctypes.c_uint)]
    return lib.H5PLget_loading_state(ctypes.byref(state)) >= 0 and state.value == 0 and h5py.h5pl.size() == 0


os.environ["HDF5_PLUGIN_PRELOAD"] = "::"  # HDF5's own "no plugins" setting, for libraries started after us
disable_plugins()


def open_file(path: str, error=BadFile) -> h5py.File:
    """`path` opened read-only after checking it is a regular file, with its links checked.

    Raises FileNotFoundError and OSError from h5py for the caller to word; `error` for what is refused.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block HDF5's open() forever
        raise error(f"{path}: not a regular file (a pipe, socket or device)")
    f = h5py.File(path, "r")
    try:
        check_links(f, path, error)
    except (OSError, RuntimeError, KeyError, ValueError) as e:  # what h5py raises on damaged metadata
        f.close()
        raise BadFile(f"{path}: damaged HDF5 file, cannot walk its links ({_cut(e, 120)})") from None
    except BaseException:
        f.close()
        raise
    return f


def check_links(f: h5py.File, path: str, error=BadFile) -> None:
    """Every link sdport can reach is a hard link: those of the root, and those of its groups. The
    layouts keep datasets in groups under the root and nothing deeper, and the readers open a group's
    member only as a dataset (anything else is refused there), so no deeper link is ever followed.
    Root members are groups or datasets, at most MAX_LINKS links in all; links are inspected, never
    followed out of the file.

    Only the root's members are opened to learn their type (a few); a group's members are checked from
    their link records alone, which HDF5 lists without reading each object's header (a UNet group's
    638 headers would cost several times more than the listing)."""
    count = 0

    def links(gid, prefix: str) -> list:
        nonlocal count
        found: list = []

        def visit(name, info):
            found.append((name, info.type))
            return 1 if count + len(found) > MAX_LINKS else None  # 1 stops the iteration

        gid.links.iterate(visit, info=True)
        count += len(found)
        if count > MAX_LINKS:
            raise error(f"{path}: more than {MAX_LINKS} links in the file; refusing to walk it")
        for raw, kind in found:
            if kind != h5py.h5l.TYPE_HARD:
                what = _LINK_KINDS.get(kind, f"a user-defined link (type {kind})")
                name = f"{prefix}/{raw.decode('utf-8', 'replace')}"
                raise error(f"{path}: {_cut(name)} is {what}; the sdport layouts use none, refusing the file")
        return [raw for raw, _ in found]

    seen: set = set()
    for raw in links(f.id, ""):
        name = f"/{raw.decode('utf-8', 'replace')}"
        info = h5py.h5o.get_info(f.id, raw)
        if info.type == h5py.h5o.TYPE_GROUP:
            token = getattr(info, "token", None) or getattr(info, "addr", None)
            if token in seen:
                raise error(f"{path}: group {_cut(name)} is linked twice (an alias); refusing the file")
            seen.add(token)
            links(h5py.h5g.open(f.id, raw), name)
        elif info.type != h5py.h5o.TYPE_DATASET:
            raise error(f"{path}: {_cut(name)} is a named datatype, not a group or dataset; refusing the file")


class InflateBudget:
    """How many bytes the filtered datasets of one file may still inflate to."""

    def __init__(self, file_size: int):
        self.left = INFLATE_RATIO * file_size + INFLATE_SLACK
        self.bound = self.left

    def take(self, path: str, name: str, nbytes: int, error=LayoutError) -> None:
        if nbytes > self.left:
            raise error(f"{path}: {_cut(name)}: its filtered datasets would inflate past {self.bound} bytes "
                        f"({INFLATE_RATIO}x the file's size + {INFLATE_SLACK >> 20} MiB); refusing to read it")
        self.left -= nbytes


def declared_bytes(ds: h5py.Dataset) -> int:
    shape = ds.shape or ()
    return math.prod(shape) * ds.id.dtype.itemsize


def check_storage(ds: h5py.Dataset, path: str, name: str, budget: InflateBudget | None = None,
                  error=LayoutError) -> None:
    """Refuse, before any of its data is read, a dataset whose bytes live outside the file, that needs a
    filter other than ALLOWED_FILTERS, or whose declared size its stored bytes cannot hold."""
    if ds.shape is None:
        raise error(f"{path}: {_cut(name)} has a null dataspace (no data)")
    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise error(f"{path}: {_cut(name)} is a virtual dataset (its data come from other files); refusing it")
    if layout not in _LAYOUTS:
        raise error(f"{path}: {_cut(name)} has storage layout {layout}, which the sdport layouts do not use")
    if dcpl.get_external_count():
        raise error(f"{path}: {_cut(name)} keeps its data in external files; refusing it without reading them")
    nbytes = declared_bytes(ds)
    stored = ds.id.get_storage_size()
    if layout == h5py.h5d.CHUNKED:
        for i in range(dcpl.get_nfilters()):
            code = dcpl.get_filter(i)[0]
            if code not in ALLOWED_FILTERS:
                raise error(f"{path}: {_cut(name)} needs HDF5 filter {code}; only "
                            f"{', '.join(ALLOWED_FILTERS.values())} are read (no filter plugins)")
        chunk = math.prod(dcpl.get_chunk()) * ds.id.dtype.itemsize
        if chunk > MAX_CHUNK_BYTES:
            raise error(f"{path}: {_cut(name)} has chunks of {chunk} bytes (at most {MAX_CHUNK_BYTES} read)")
        if nbytes > DEFLATE_RATIO * stored + chunk:
            raise error(f"{path}: {_cut(name)} declares {nbytes} bytes but stores {stored}: more than "
                        f"deflate can inflate to ({DEFLATE_RATIO}x)")
        dims = ds.shape
        want = math.prod(-(-n // c) for n, c in zip(dims, dcpl.get_chunk())) if nbytes else 0
        if ds.id.get_num_chunks() != want:  # HDF5 would make up the missing ones from the fill value
            raise error(f"{path}: {_cut(name)} has {ds.id.get_num_chunks()} of its {want} chunks written")
        if budget is not None:
            budget.take(path, name, nbytes, error)
    elif nbytes > stored:
        raise error(f"{path}: {_cut(name)} declares {nbytes} bytes but the file stores {stored} for it")
