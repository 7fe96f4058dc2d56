"""Read PyTorch zip checkpoints and .safetensors files safely and lazily.

Safety: the pickle inside a torch zip is read by an unpickler that resolves only the globals needed to
rebuild tensors and plain containers. Objects that real checkpoints carry but we never need
(PyTorch-Lightning callbacks, numpy scalars, hyper-parameter namespaces) become inert placeholders;
their modules are never imported. Any other global is refused before anything runs.

TorchScript archives (`torch.jit.save`, e.g. OpenAI's CLIP `.pt` files) are read the same way: their
`__torch__.*` classes become data-only placeholders whose attributes are collected into a state dict
(`visual.conv1.weight`, ...); the archive's code is never read, compiled or run.

Laziness: unpickling yields `LazyTensor` records (storage key, dtype, offset, shape, stride); the bytes
of one storage are read only when `Checkpoint.tensor(key)` asks for it, so walking a 4 GB checkpoint
key by key holds one tensor at a time.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import stat
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from zlib_ng.zlib_ng import crc32  # the zip entries' CRC-32, several times zlib's speed (bench/bench_io.py)

from ..models.errors import BadFile, UnsafeFile, cut
from . import pickle_scan

# torch's legacy typed-storage classes name the element type of a storage.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# safetensors dtype names (the ones a Stable Diffusion file can hold).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}

# Module prefixes whose objects appear in real checkpoints' metadata and are replaced by inert
# placeholders (never imported): Lightning callbacks/loops, numpy scalars and dtypes, argparse and
# omegaconf hyper-parameters.
_INERT_PREFIXES = (
    "pytorch_lightning.", "lightning.", "lightning_fabric.",
    "numpy.core.multiarray.", "numpy._core.multiarray.", "numpy.",
    "argparse.", "omegaconf.", "typing.", "pathlib.",
)
_INERT_EXACT = {"builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex"}
_DANGEROUS_NUMPY = ("numpy.load", "numpy.testing", "numpy.distutils", "numpy.f2py", "numpy.ctypeslib", "numpy.lib")

MAGIC_ZIP = b"PK\x03\x04"
# data.pkl holds only the structure (keys, shapes, storage ids): about 0.3 MB for SD v1 with EMA.
# A larger claim is an archive entry built to exhaust memory while it inflates and unpickles.
_MAX_PICKLE = 64 << 20
# What zipfile raises on a damaged archive: besides BadZipFile, undecodable names (UnicodeDecodeError),
# bad deflate streams (zlib.error), unknown compression methods (NotImplementedError), encrypted
# entries (RuntimeError) and short reads (EOFError, struct.error).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError,
               NotImplementedError, RuntimeError, struct.error)
MAGIC_HDF5 = b"\x89HDF\r\n\x1a\n"
MAX_ELEMENTS = 1 << 40  # a tensor or storage claiming more elements than this is refused (int64-safe sizes)
MAX_RANK = 16
# A safetensors header is parsed whole into Python objects (several times its size in memory). The
# reference parser allows 100 MB; the full SD v1 checkpoint's 1,142 keys take 156 KB.
MAX_ST_HEADER = 16 << 20
DEFLATE_RATIO = 1032  # deflate's largest expansion: a deflated entry cannot honestly inflate more


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Inert:
    """Placeholder for an object the checkpoint carries but that we never import or run."""

    _global = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):  # dict-like SETITEMS on a placeholder
        self.__dict__.setdefault("_items", {})[key] = value

    def __repr__(self):
        return f"<inert {self._global}>"


class ScriptObject(Inert):
    """Placeholder for a TorchScript module (`__torch__.*`): only the attributes its pickle sets."""

    def attributes(self) -> dict:
        state = self.__dict__.get("_state")
        return state if isinstance(state, dict) else {}


_inert_classes: dict[str, type] = {}


def _inert(name: str, base: type = Inert) -> type:
    if name not in _inert_classes:
        _inert_classes[name] = type(name.rsplit(".", 1)[-1], (base,), {"_global": name})
    return _inert_classes[name]


def _script_state_dict(root: ScriptObject, path: str) -> dict:
    """A TorchScript module tree's tensors by dotted attribute path, as its `state_dict()` names them."""
    out, seen = {}, set()

    def walk(obj: ScriptObject, prefix: str, depth: int):
        if id(obj) in seen or depth > 64:  # a pickle can alias or nest objects without end
            raise BadFile(f"{path}: TorchScript module tree loops or nests deeper than 64 levels")
        seen.add(id(obj))
        for name, v in obj.attributes().items():
            if isinstance(v, LazyTensor):
                out[f"{prefix}{name}"] = v
            elif isinstance(v, ScriptObject):
                walk(v, f"{prefix}{name}.", depth + 1)

    walk(root, "", 0)
    return out


class _Sealed:
    """Records the unpickler makes after checking their fields: a BUILD opcode aimed at one would
    change those fields behind the checks (it writes __dict__ directly), so they have none to write."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError("BUILD aimed at a tensor or storage record")


@dataclass(frozen=True, slots=True)
class _StorageRef(_Sealed):
    key: str
    dtype: torch.dtype
    numel: int

    __setstate__ = _Sealed.__setstate__  # in the class body: a frozen slots dataclass adds its own otherwise


@dataclass(frozen=True, slots=True)
class LazyTensor(_Sealed):
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    __setstate__ = _Sealed.__setstate__

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.shape, self.storage.dtype)


def _rebuild_tensor(storage, offset, size, stride, *rest):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and type(offset) is int) \
            or not all(type(v) is int for v in (*size, *stride)):
        raise pickle.UnpicklingError("tensor size, stride or offset is not made of integers")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or len(size) > MAX_RANK:
        raise pickle.UnpicklingError(f"tensor of rank {len(size)} with {len(stride)} strides")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError("negative tensor size, stride or offset")
    numel = math.prod(size)
    if numel and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        raise pickle.UnpicklingError(f"tensor view runs past its storage '{cut(storage.key, 40)}'")
    # A view holds at most as many elements as its storage: stride 0 would otherwise let a one-element
    # storage claim a tensor of any size (materialising it would allocate all of them).
    if numel > max(storage.numel, 0) or numel > MAX_ELEMENTS:
        raise pickle.UnpicklingError(f"tensor of {numel} elements viewing a storage of {storage.numel}")
    return LazyTensor(storage, offset, size, stride)


def _latin1_bytes(text, encoding="latin1"):
    """Protocol-2 pickles spell a bytes object as _codecs.encode(str, 'latin1'); nothing else is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _type_tagged(value, type_name=None):
    """TorchScript's restore_type_tag(value, type name): the type is only a static annotation."""
    return value


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only an allow-list of globals; everything else is refused by name."""

    _ALLOWED = {
        "collections.OrderedDict": OrderedDict,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "_codecs.encode": _latin1_bytes,
        "builtins.dict": dict,
        "builtins.list": list,
        "builtins.tuple": tuple,
        # TorchScript's typed containers: the value itself (a list, or the tagged object).
        "torch.jit._pickle.build_intlist": list,
        "torch.jit._pickle.build_doublelist": list,
        "torch.jit._pickle.build_boollist": list,
        "torch.jit._pickle.build_tensorlist": list,
        "torch.jit._pickle.restore_type_tag": _type_tagged,
    }

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in self._ALLOWED:
            return self._ALLOWED[full]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name in ("Size",):
            return tuple
        if module == "__torch__" or module.startswith("__torch__."):  # a TorchScript class: data only
            return _inert(full, ScriptObject)
        if (full in _INERT_EXACT or full.startswith(_INERT_PREFIXES)) and not full.startswith(_DANGEROUS_NUMPY):
            if full.startswith("numpy.") and name not in ("scalar", "dtype", "_reconstruct", "ndarray") \
                    and not name.endswith("DType"):
                raise UnsafeFile(f"{self.path}: refused to load global '{full}' (not on sdport's allow-list); nothing was executed")
            return _inert(full)
        raise UnsafeFile(f"{self.path}: refused to load global '{full}' (not on sdport's allow-list); nothing was executed")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:60]!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or type(numel) is not int:
            raise pickle.UnpicklingError("malformed storage record")
        if not 0 <= numel <= MAX_ELEMENTS:
            raise pickle.UnpicklingError(f"storage '{cut(key, 40)}' claims {numel} elements (0..{MAX_ELEMENTS})")
        ref = _StorageRef(key, dtype, numel)
        seen = self.storages.setdefault(key, ref)
        if seen != ref:  # one storage read as two element types or sizes
            raise pickle.UnpicklingError(f"storage '{cut(key, 40)}' is declared twice, as {seen.dtype} x "
                                         f"{seen.numel} and {dtype} x {numel}")
        return ref


def _find_state_dict(obj, path: str):
    """Top-level object -> (wrapper name, state dict of LazyTensors, metadata)."""
    if isinstance(obj, ScriptObject):
        sd = _script_state_dict(obj, path)
        if not sd:
            raise BadFile(f"{path}: TorchScript archive without tensors ({obj._global})")
        return "torchscript", sd, {"torchscript_class": obj._global}
    if not isinstance(obj, dict):
        raise BadFile(f"{path}: the pickle holds a {type(obj).__name__}, not a dict of tensors")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        return "lightning", obj["state_dict"], meta
    if any(isinstance(v, LazyTensor) for v in obj.values()):
        return "flat", obj, {}
    for k in ("model", "module", "params"):
        if isinstance(obj.get(k), dict) and any(isinstance(v, LazyTensor) for v in obj[k].values()):
            return f"nested:{k}", obj[k], {kk: v for kk, v in obj.items() if kk != k}
    raise BadFile(f"{path}: no state dict found (top-level keys: {sorted(map(str, obj))[:8]})")


def _describe(v, depth: int = 0):
    """Checkpoint metadata as plain data for `inspect`: 20 entries per container, 6 levels, 200 characters per string."""
    if isinstance(v, str):
        return v[:200]
    if isinstance(v, (int, float, bool)) or v is None:
        return v if not isinstance(v, int) or abs(v) < 1 << 63 else str(v)[:40]
    if isinstance(v, Inert):
        return repr(v)
    if depth >= 6 and isinstance(v, (dict, list, tuple)):
        return "..."
    if isinstance(v, dict):
        return {cut(k, 80): _describe(x, depth + 1) for k, x in list(v.items())[:20]}
    if isinstance(v, (list, tuple)):
        return [_describe(x, depth + 1) for x in v[:20]]
    return type(v).__name__


@dataclass
class Checkpoint:
    """An opened checkpoint: keys, shapes and dtypes up front; tensor bytes on demand."""

    path: str
    container: str  # "torch-zip" | "safetensors"
    wrapper: str  # "lightning" | "flat" | "nested:<key>" | "torchscript" | "safetensors"
    infos: dict[str, TensorInfo]
    metadata: dict = field(default_factory=dict)
    non_tensors: list[str] = field(default_factory=list)
    _reader: object = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def tensor(self, key: str) -> torch.Tensor:
        """Materialise one tensor (its own memory, C-contiguous)."""
        if key not in self.infos:
            raise KeyError(key)
        return self._reader(key)

    def items(self):
        for k in self.infos:
            yield k, self.tensor(k)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def close(self):
        closer = getattr(self._reader, "close", None)
        if closer:
            closer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ZipReader:
    def __init__(self, path, zf: zipfile.ZipFile, prefix: str, tensors: dict[str, LazyTensor], big_endian: bool):
        self.path, self.zf, self.prefix, self.tensors = path, zf, prefix, tensors
        self.big_endian = big_endian
        self._cache: tuple[str, torch.Tensor] | None = None

    def _storage(self, ref: _StorageRef) -> torch.Tensor:
        if self._cache and self._cache[0] == ref.key:
            return self._cache[1]
        name = f"{self.prefix}data/{ref.key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise BadFile(f"{self.path}: storage '{name}' is missing from the archive") from None
        want = ref.numel * ref.dtype.itemsize
        if info.file_size != want:
            raise BadFile(f"{self.path}: storage '{name}' holds {info.file_size} bytes, expected {want}")
        if info.compress_type == zipfile.ZIP_STORED and want:
            raw = self._read_stored(info, name, want)
        else:
            try:
                with self.zf.open(info) as f:
                    raw = bytearray(f.read(want + 1))
            except _ZIP_ERRORS as e:
                raise BadFile(f"{self.path}: cannot read storage '{name}': {e}") from None
        if len(raw) != want:
            raise BadFile(f"{self.path}: storage '{name}' is truncated ({len(raw)} of {want} bytes)")
        t = torch.frombuffer(raw, dtype=ref.dtype) if want else torch.empty(0, dtype=ref.dtype)
        if self.big_endian and ref.dtype.itemsize > 1:
            # numpy has no bfloat16: swap the bytes of the same-width integer view
            ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ref.dtype.itemsize]
            t = torch.from_numpy(t.view(ints).numpy().byteswap()).view(ref.dtype)
        self._cache = (ref.key, t)
        return t

    def _read_stored(self, info: zipfile.ZipInfo, name: str, want: int) -> memoryview:
        """An uncompressed entry (what torch.save writes), memory-mapped copy-on-write; CRC still checked.

        Mapped, not read: a read into fresh memory page-faults every 4 KiB of it (6 s of a 4.3 GB
        conversion); mapped file pages come from the page cache, many per fault.
        """
        fp = self.zf.fp
        try:
            fp.seek(info.header_offset)
            header = fp.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise BadFile(f"{self.path}: bad local header for storage '{name}'")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            size = os.fstat(fp.fileno()).st_size
            if start + want > size:
                raise BadFile(f"{self.path}: storage '{name}' is truncated ({max(size - start, 0)} of {want} bytes)")
            raw = memoryview(np.memmap(self.path, dtype=np.uint8, mode="c", offset=start, shape=(want,)))
        except (OSError, ValueError) as e:
            raise BadFile(f"{self.path}: cannot read storage '{name}': {e}") from None
        if crc32(raw) != info.CRC:
            raise BadFile(f"{self.path}: storage '{name}' fails its CRC check (corrupt file)")
        return raw

    def __call__(self, key):
        lt = self.tensors[key]
        storage = self._storage(lt.storage)
        contiguous = tuple(torch.empty(lt.shape, device="meta").stride()) == lt.stride
        if lt.offset == 0 and contiguous and math.prod(lt.shape) == storage.numel():
            # The tensor is its whole storage: hand the buffer over instead of copying it.
            self._cache = None
            return storage.view(lt.shape)
        return storage.as_strided(lt.shape, lt.stride, lt.offset).clone()

    def close(self):
        self._cache = None
        self.zf.close()


def _check_storages(path: str, zf: zipfile.ZipFile, prefix: str, storages: dict[str, _StorageRef]) -> None:
    """Every storage the pickle names is an archive entry of exactly its size; a deflated entry can
    inflate to that size (deflate's bound), so no claim is larger than what the file holds."""
    entries = {i.filename: i for i in zf.infolist()}
    for ref in storages.values():
        name = f"{prefix}data/{ref.key}"
        info = entries.get(name)
        want = ref.numel * ref.dtype.itemsize
        if info is None:
            raise BadFile(f"{path}: storage '{cut(name, 60)}' is missing from the archive")
        if info.file_size != want:
            raise BadFile(f"{path}: storage '{cut(name, 60)}' holds {info.file_size} bytes, expected {want}")
        if info.compress_type != zipfile.ZIP_STORED and want > DEFLATE_RATIO * info.compress_size + 1024:
            raise BadFile(f"{path}: storage '{cut(name, 60)}' claims {want} bytes from {info.compress_size} "
                          f"compressed (more than deflate's {DEFLATE_RATIO}x)")


def _open_zip(path: str) -> Checkpoint:
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise BadFile(f"{path}: not a readable zip archive ({type(e).__name__}: {str(e)[:120]})") from None
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if not pkl:
        zf.close()
        raise BadFile(f"{path}: zip archive without a data.pkl (not a PyTorch checkpoint)")
    prefix = pkl[0][: -len("data.pkl")]
    big_endian = False
    if f"{prefix}byteorder" in zf.namelist():
        try:
            with zf.open(f"{prefix}byteorder") as f:
                order = f.read(17).strip()  # "little" or "big"; never read a crafted entry whole
        except _ZIP_ERRORS as e:
            zf.close()
            raise BadFile(f"{path}: cannot read '{cut(prefix, 40)}byteorder' ({type(e).__name__}: {cut(e, 120)})") from None
        if order not in (b"little", b"big"):
            zf.close()
            raise BadFile(f"{path}: '{cut(prefix, 40)}byteorder' says {cut(order, 20)}, expected little or big")
        big_endian = order == b"big"
    info = zf.getinfo(pkl[0])
    if info.file_size > _MAX_PICKLE:
        zf.close()
        raise BadFile(f"{path}: data.pkl claims {info.file_size} bytes (at most {_MAX_PICKLE} expected); refusing to inflate it")
    try:
        with zf.open(info) as f:
            data = f.read(_MAX_PICKLE + 1)  # the size the entry claims is not trusted either
        if len(data) > _MAX_PICKLE:
            raise BadFile(f"{path}: data.pkl inflates past {_MAX_PICKLE} bytes; refusing it")
        pickle_scan.scan(data)  # bounds depth, memo and stack before the C unpickler sees the stream
        unpickler = _SafeUnpickler(io.BytesIO(data), path)
        obj = unpickler.load()
    except pickle_scan.PickleBomb as e:
        zf.close()
        raise BadFile(f"{path}: data.pkl refused before unpickling: {e}") from None
    except (UnsafeFile, BadFile):
        zf.close()
        raise
    except (pickle.UnpicklingError, TypeError, AttributeError, IndexError, KeyError, RecursionError,
            MemoryError, *_ZIP_ERRORS) as e:
        zf.close()
        raise BadFile(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {cut(e, 120)})") from None
    try:
        _check_storages(path, zf, prefix, unpickler.storages)
    except BadFile:
        zf.close()
        raise
    wrapper, sd, meta = _find_state_dict(obj, path)
    tensors, others = {}, []
    for k, v in sd.items():
        if isinstance(v, LazyTensor):
            tensors[str(k)] = v
        else:
            others.append(str(k))
    infos = {k: v.info for k, v in tensors.items()}
    return Checkpoint(path, "torch-zip", wrapper, infos, {k: _describe(v) for k, v in meta.items()},
                      others, _ZipReader(path, zf, prefix, tensors, big_endian))


class _SafetensorsReader:
    def __init__(self, path, base: int, entries: dict[str, tuple[TensorInfo, int, int]]):
        self.path, self.base, self.entries = path, base, entries
        self.f = open(path, "rb")

    def __call__(self, key):
        info, start, end = self.entries[key]
        try:
            self.f.seek(self.base + start)
            buf = torch.empty(end - start, dtype=torch.uint8)  # read straight into it: one pass, no zero-fill
            raw = memoryview(buf.numpy())
            got = self.f.readinto(raw)
        except OSError as e:
            raise BadFile(f"{self.path}: cannot read tensor '{key}' ({e.strerror or e})") from None
        if got != end - start:
            raise BadFile(f"{self.path}: tensor '{key}' is truncated")
        if not raw:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(raw, dtype=info.dtype).reshape(info.shape)

    def close(self):
        self.f.close()


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {cut(k, 60)!r}")
        d[k] = v
    return d


def _is_uint(v) -> bool:
    return type(v) is int and v >= 0


def _open_safetensors(path: str, size: int) -> Checkpoint:
    """Parsed as strictly as the reference (Rust) parser: UTF-8 JSON object, no duplicate keys, integer
    shapes and offsets, tensors that tile the data section exactly, in order, without gaps."""
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise BadFile(f"{path}: safetensors header claims {n} bytes but the file has {size}")
        if n > MAX_ST_HEADER:
            raise BadFile(f"{path}: safetensors header of {n} bytes (at most {MAX_ST_HEADER} are parsed)")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")  # strict: json.loads would also accept UTF-16 and UTF-32 bytes
        if not text.startswith("{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadFile(f"{path}: safetensors header is not a valid UTF-8 JSON object ({cut(e, 100)})") from None
    if not isinstance(header, dict):
        raise BadFile(f"{path}: safetensors header is not a JSON object")
    base, data_len = 8 + n, size - 8 - n
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadFile(f"{path}: safetensors __metadata__ is not an object of strings")
    entries, spans = {}, []
    for key, e in header.items():
        shape = e.get("shape") if isinstance(e, dict) else None
        offsets = e.get("data_offsets") if isinstance(e, dict) else None
        if not (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(shape, list)
                and all(map(_is_uint, shape)) and isinstance(offsets, list) and len(offsets) == 2
                and all(map(_is_uint, offsets)) and len(shape) <= MAX_RANK):
            raise BadFile(f"{path}: safetensors entry '{cut(key, 60)}' is malformed: {cut(e, 80)}")
        if e["dtype"] not in _ST_DTYPES:
            raise BadFile(f"{path}: safetensors entry '{cut(key, 60)}' has dtype {cut(e['dtype'], 20)}, which "
                          f"sdport does not read ({', '.join(_ST_DTYPES)})")
        info = TensorInfo(tuple(shape), _ST_DTYPES[e["dtype"]])
        start, end = offsets
        if info.numel > MAX_ELEMENTS or not start <= end <= data_len or end - start != info.nbytes:
            raise BadFile(f"{path}: safetensors entry '{cut(key, 60)}' (shape {cut(shape, 60)}, {e['dtype']}) "
                          f"claims bytes {start}..{end} of a {data_len}-byte data section")
        entries[key] = (info, start, end)
        spans.append((start, end, key))
    spans.sort()
    at = 0
    for s0, e0, k0 in spans:
        if s0 != at:
            what = "overlaps the tensor before it" if s0 < at else f"leaves bytes {at}..{s0} unused"
            raise BadFile(f"{path}: safetensors entry '{cut(k0, 60)}' {what}")
        at = e0
    if at != data_len:
        raise BadFile(f"{path}: safetensors data section has {data_len} bytes, its tensors cover {at}")
    # File order = data order: keys come back sorted by offset, as they were written.
    ordered = {k: entries[k][0] for _, _, k in spans}
    return Checkpoint(path, "safetensors", "safetensors", ordered, {"__metadata__": meta}, [],
                      _SafetensorsReader(path, base, {k: entries[k] for k in ordered}))


def sniff(path: str) -> str:
    """Container format from content: 'torch-zip', 'safetensors', 'hdf5' (or BadFile)."""
    if os.path.isdir(path):
        raise BadFile(f"{path}: is a directory, not a checkpoint file")
    try:
        mode = os.stat(path).st_mode
        # A FIFO or a device would block the open() below or read forever; lazy reading needs seeks.
        if not stat.S_ISREG(mode):
            raise BadFile(f"{path}: not a regular file (a pipe, socket or device); give the checkpoint file itself")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise BadFile(f"{path}: no such file") from None
    except OSError as e:
        raise BadFile(f"{path}: cannot read ({e.strerror})") from None
    if size == 0:
        raise BadFile(f"{path}: empty file")
    if head.startswith(MAGIC_ZIP):
        return "torch-zip"
    if head.startswith(MAGIC_HDF5):
        return "hdf5"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n <= size - 8:
            return "safetensors"
        raise BadFile(f"{path}: safetensors header claims {n} bytes but the file has {size} (truncated?)")
    if head[:1] == b"\x80":
        raise BadFile(f"{path}: a bare pickle or legacy (pre-1.6) PyTorch file; only zip checkpoints and .safetensors are read")
    raise BadFile(f"{path}: not a checkpoint (neither a PyTorch zip archive nor .safetensors)")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a .ckpt/.pt/.bin (PyTorch zip) or .safetensors file; the format comes from its content."""
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "torch-zip":
        return _open_zip(path)
    if kind == "safetensors":
        return _open_safetensors(path, os.path.getsize(path))
    raise BadFile(f"{path}: an HDF5 file, not a checkpoint (use `sdport inspect` or `sdport verify` on it)")
