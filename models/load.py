"""Build native models from configs and load them from the HDF5 layout alone."""
from __future__ import annotations

import contextlib
import gc

import torch

from . import quant
from .cpu import pack
from .components import component as entry
from .config import from_dict
from .devices import DTYPES, SlowDtypeWarning, check_device_dtype  # noqa: F401 (SlowDtypeWarning: what load warns with)
from .errors import LayoutError, cut
from .storage.layout import LayoutReader

def build(component: str, config) -> torch.nn.Module:
    """A native model for `config` (a config dataclass or its dict), with uninitialised weights."""
    c = entry(component)
    if isinstance(config, dict):
        config = from_dict(c.config, config)
    return c.model(config)


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic GC off for the duration (restored as it was). A load creates thousands of small
    objects (modules, h5py ids, weak references), and in a fresh process the collections they trigger
    walk everything torch's import created (the effect on the full UNet: bench/README.md)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def load_model(source: str | LayoutReader, component: str, *, device="cpu", dtype: torch.dtype | str | None = None,
               packed: bool | None = None):
    """Load one component from an sdport .h5 file; weights are memory-mapped until cast, moved or packed.

    `packed` (default: on a CPU, for the components in PACKED) reorders the weights into oneDNN's layout
    (models/cpu/pack.py), each on its module's first call; such a model runs on the CPU only.
    """
    with _gc_paused():
        return _load(source, component, device, dtype, packed)


def read_config(reader: LayoutReader, component: str):
    """The component's config from the file, type- and range-checked (LayoutError when it does not fit)."""
    cfg_cls = entry(component).config
    try:
        return from_dict(cfg_cls, reader.config(component))
    except (TypeError, ValueError) as e:
        raise LayoutError(f"{reader.path}: /{component} config does not fit {cfg_cls.__name__} ({e})") from None


def expected(reader: LayoutReader, component: str) -> tuple[torch.nn.Module, dict]:
    """The model the file's config describes, built on the meta device (no memory), with its int8
    modules swapped in, and {dataset key: meta tensor} of what the file must hold."""
    cfg = read_config(reader, component)
    with torch.device("meta"):
        model = build(component, cfg)
    _swap_quantized(reader, component, model)
    return model, model.state_dict()


def check_datasets(reader: LayoutReader, component: str) -> tuple[torch.nn.Module, dict]:
    """What `load_model` checks before reading any weight: the config builds a model, and the file holds
    exactly its datasets, each of its shape (LayoutError naming the first that does not fit)."""
    model, want = expected(reader, component)
    have = set(reader.keys(component))
    missing = [k for k in want if k not in have]
    if missing:
        raise LayoutError(f"{reader.path}: /{component}/{missing[0]} is missing ({len(missing)} datasets missing)")
    extra = sorted(have - set(want))
    if extra:
        raise LayoutError(f"{reader.path}: /{component}/{cut(extra[0])} is not a parameter of the native {component}")
    for k, (shape, dtype) in reader.describe(component, want).items():
        meta = want[k]
        if shape != tuple(meta.shape):
            raise LayoutError(f"{reader.path}: /{component}/{k} has shape {cut(shape)}, expected {list(meta.shape)}")
        _check_dtype(reader, component, k, dtype, meta)
    return model, want


def _check_dtype(reader: LayoutReader, component: str, key: str, dtype: torch.dtype, meta: torch.Tensor) -> None:
    """A floating parameter needs floating data; an int8 weight or any other integer buffer, its own type."""
    if dtype.is_floating_point != meta.is_floating_point() or (not dtype.is_floating_point and dtype != meta.dtype):
        raise LayoutError(f"{reader.path}: /{component}/{key} holds {str(dtype).removeprefix('torch.')}, "
                          f"expected {'a floating type' if meta.is_floating_point() else meta.dtype}")


def _load(source, component, device, dtype, packed):
    reader = source if isinstance(source, LayoutReader) else LayoutReader(source)
    model, want = check_datasets(reader, component)
    sd = {}
    for k, meta in want.items():
        sd[k] = reader.tensor(component, k)  # its shape and type were checked by check_datasets, before reading
    model.load_state_dict(sd, assign=True)
    del sd  # the model holds the tensors now; packing below must be able to free each plain weight
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if dtype is not None or torch.device(device).type != "cpu":  # the file's tensors are CPU tensors already
        model = model.to(device=device, dtype=dtype)
    if packed is None:
        packed = entry(component).packed and torch.device(device).type == "cpu"
    if packed:
        pack.pack(model, lazy=True)
        pack.pack_on_first_call(model)
    # Its activations run channels-last; NCHW conv weights would be reordered on every call
    # (the full UNet's figures: bench/README.md).
    _for_inference(model, channels_last=entry(component).channels_last and str(device) != "meta")
    check_device_dtype(device, next(model.parameters()).dtype)
    return model


def _for_inference(model: torch.nn.Module, *, channels_last: bool) -> None:
    """`eval()`, `requires_grad_(False)` and, with `channels_last`, `to(memory_format=channels_last)`
    in one walk over the modules instead of three."""
    for m in model.modules():
        m.training = False
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
            if channels_last and p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        if channels_last:
            for name, b in m.named_buffers(recurse=False):
                if b.dim() == 4:
                    setattr(m, name, b.contiguous(memory_format=torch.channels_last))


def _swap_quantized(reader: LayoutReader, component: str, model: torch.nn.Module) -> None:
    """Give every int8 dataset of the file its int8 module (docs/layout.md, "int8 weights")."""
    qinfo = reader.quantized(component)
    for key, q in qinfo.items():
        if q.get("scheme") != quant.SCHEME or q.get("axis", 0) != 0:
            raise LayoutError(f"{reader.path}: /{component}/{key}: quantization scheme {q.get('scheme')!r} "
                              f"axis {q.get('axis')!r}; this sdport reads {quant.SCHEME!r} on axis 0")
        if reader.dataset_attrs(component, key).get("dtype") != "int8":
            raise LayoutError(f"{reader.path}: /{component}/{key} has a quantization attribute but is not int8")
        if q.get("scale") != quant.scale_key(key):
            raise LayoutError(f"{reader.path}: /{component}/{key}: quantization scale {q.get('scale')!r}, "
                              f"expected {quant.scale_key(key)!r}")
    try:
        quant.swap(model, qinfo)
    except (KeyError, AttributeError) as e:
        raise LayoutError(f"{reader.path}: /{component}: int8 dataset that no Linear/Conv2d weight takes "
                          f"({str(e).strip(chr(39))})") from None
