"""checkpoint -> sdport HDF5 layout, and the inverse export back to the source key names."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..models import quant
from ..models.storage import partial as partials
from ..models.errors import LayoutError, SdportError
from ..models.storage.layout import MAX_SCHEDULE, SCHEDULE, LayoutReader, file_sha256
from .checkpoint import open_checkpoint
from . import model_yaml
from .detect import Plan, plan
from .table import Row, forward, inverse
from .writer import LayoutWriter

CAST = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTIZE = ("int8",)
# Components `--quantize int8` applies to unless told otherwise: the UNet holds 70 % of SD v1's
# weights; the text encoder and the VAE are opt-in (docs/layout.md, "int8 weights", has the errors).
QUANTIZE_DEFAULT = ("unet",)


@dataclass
class Summary:
    out: str
    plan: Plan
    written: dict[str, int] = field(default_factory=dict)  # component -> datasets
    bytes_written: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)  # source key -> count of NaN/Inf values


def _count_nonfinite(t: torch.Tensor) -> int:
    """NaN/Inf values in `t`; one min/max pass for the common all-finite case (NaN propagates)."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return 0
    return int((~torch.isfinite(t)).sum())


def _return_freed_memory_to_the_os() -> None:
    """Tensors of 1-150 MB come and go one at a time. glibc raises its mmap threshold after the first
    large free, so later buffers land on the heap and fragment it (3 GB of RSS for a 4 GB checkpoint);
    a fixed 1 MiB threshold keeps every large buffer in its own mapping, returned to the OS on free."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextlib.contextmanager
def _cpu_for_the_hashes():
    """A conversion's CPU goes to hashing, CRCs and copies in other threads (bench/README.md). Two
    things took it from them (perf, full checkpoint on 2 cores): torch's OpenMP workers spinning
    between the main thread's small ops (min/max, concatenations), 17 % of the samples, and Python's
    cyclic GC re-walking the objects the imports created, 5 %. One torch thread does those ops at
    memory speed; frozen objects are skipped by the GC."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # Only floating-point parameters change dtype; integer buffers keep theirs.
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def convert(src: str, out: str, *, components=None, dtype: str = "keep", ema: str = "auto",
            strict: bool = False, force: bool = False, num_heads: int | None = None,
            num_head_channels: int | None = None, config: str | None = None, prediction: str | None = None,
            compression: str | None = None, progress=None, quantize: str | None = None,
            quantize_components=QUANTIZE_DEFAULT) -> Summary:
    """Convert `src` to `out`. `progress(n, total)` is called with the number of tensors done so far.

    `quantize="int8"` stores the Linear/Conv2d weights of `quantize_components` as int8 plus per-channel
    scales (models/quant.py); every other tensor follows `dtype`.
    """
    if dtype not in CAST:
        raise SdportError(f"--dtype {dtype}: expected one of {', '.join(CAST)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise SdportError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZE)}")
    cast = CAST[dtype]
    _not_the_input(src, out)
    given = model_yaml.for_checkpoint(src, config)  # the checkpoint's own yaml, read before anything is written
    with open_checkpoint(src) as ckpt:
        p = plan(ckpt, components=components, ema=ema, num_heads=num_heads, num_head_channels=num_head_channels,
                 yaml_settings=given, prediction=prediction)
        if strict and p.unknown:
            raise SdportError(f"{src}: {len(p.unknown)} unknown key(s) under --strict, first '{p.unknown[0]}'")
        if not p.components:
            raise SdportError(f"{src}: no supported component found" + (f" among {sorted(components)}" if components else ""))
        summary = Summary(out, p)
        if compression is None:
            _check_free_space(out, ckpt, p, cast, quantize_components if quantize else ())
        attrs = {
            "tool_version": __version__,
            "source_file": os.path.basename(src),
            "source_sha256": "",  # filled in at the end: hashed in a thread while converting
            "source_format": ckpt.container,
            "source_wrapper": ckpt.wrapper,
            "family": p.family,
            "variant": p.variant,
            "variant_evidence": p.evidence,
            "ema": p.ema,
            "dtype_policy": dtype,
            "settings": p.settings,
        }
        qkeys = _quantized_keys(p, quantize_components) if quantize else {}
        if quantize:
            attrs["quantization"] = {"scheme": quant.SCHEME, "bits": 8,
                                     "components": [c for c in p.components if qkeys.get(c)]}
        done, total = 0, total_tensors(p)
        _return_freed_memory_to_the_os()
        hasher = ThreadPoolExecutor(max_workers=1)
        source_sha256 = hasher.submit(file_sha256, src)  # hashlib releases the GIL: overlaps the writes
        with _cpu_for_the_hashes(), hasher, LayoutWriter(out, force=force, attrs=attrs,
                                                          compression=compression) as w:
            for name, cp in p.components.items():
                w.group(name, config=cp.config_dict,
                        attrs={"source_prefix": cp.prefix, "source_format": cp.source_format})
                for row in cp.rows:
                    tensors = [ckpt.tensor(cp.key_of[s]) for s in row.sources]
                    for s, t in zip(row.sources, tensors):
                        if bad := _count_nonfinite(t):
                            summary.nonfinite[cp.key_of[s]] = bad
                    native = forward(row, tensors)
                    sources = [cp.key_of[s] for s in row.sources]
                    if row.native in qkeys.get(name, ()):
                        # Quantized from the source values (before any cast); scales stay float32.
                        q, scale = quant.quantize(native)
                        meta = quant.metadata(row.native, str(native.dtype).replace("torch.", ""))
                        w.write(name, row.native, q, sources=sources, transform=row.transform,
                                extra={"quantization": meta})
                        w.write(name, meta["scale"], scale, sources=sources, transform=row.transform,
                                extra={"scale_of": row.native})
                        summary.bytes_written += q.numel() + scale.numel() * scale.element_size()
                    else:
                        native = _cast(native, cast)
                        w.write(name, row.native, native, sources=sources, transform=row.transform)
                        summary.bytes_written += native.numel() * native.element_size()
                    done += 1
                    if progress:
                        progress(done, total)
                summary.written[name] = len(cp.rows)
            if "unet" in p.components and p.ema.get("present") and ema != "ignore":
                p.ema["differs"] = _ema_differs(ckpt, p)
                w.set_attr("ema", p.ema)
            if p.schedule:
                w.group(SCHEDULE, attrs={"latent_scale": p.settings["scale_factor"]["value"]})
                for k in p.schedule:
                    if ckpt.infos[k].numel > MAX_SCHEDULE:  # checked before reading: nothing else bounds them
                        raise SdportError(f"{src}: schedule buffer '{k}' claims {ckpt.infos[k].numel} elements "
                                          f"(at most {MAX_SCHEDULE})")
                    # Schedule buffers keep their dtype: samplers need them exact.
                    w.write(SCHEDULE, k, ckpt.tensor(k), sources=[k])
                    done += 1
                    if progress:
                        progress(done, total)
                summary.written[SCHEDULE] = len(p.schedule)
            w.set_attr("ignored", p.ignored)
            w.set_attr("unknown_keys", p.unknown)
            w.set_attr("source_sha256", source_sha256.result())
    return summary


def _quantized_keys(p: Plan, components) -> dict[str, set[str]]:
    """component -> the native weight keys to store as int8 (models/quant.py `quantizable`)."""
    from ..models.load import build

    out = {}
    for name, cp in p.components.items():
        if name in set(components or ()):
            with torch.device("meta"):
                out[name] = set(quant.quantizable(build(name, cp.config_dict)))
    return out


def _ema_differs(ckpt, p: Plan) -> bool | None:
    """Whether the EMA copy differs from model.diffusion_model.* (None when only one is present)."""
    from .detect import ema_key
    cp = p.components["unet"]
    for row in cp.rows:
        for s in row.sources:
            a, b = cp.prefix + s, ema_key(s)
            if a not in ckpt.infos or b not in ckpt.infos:
                return None
            if ckpt.infos[a] != ckpt.infos[b]:  # compared before reading: the EMA copy is not used, nor checked elsewhere
                return True
            if not torch.equal(ckpt.tensor(a), ckpt.tensor(b)):
                return True
    return False


def total_tensors(p: Plan) -> int:
    return sum(len(c.rows) for c in p.components.values()) + len(p.schedule)


def export(h5: str, out: str, *, force: bool = False, wrapper: str | None = None) -> dict[str, int]:
    """Inverse mapping: write the native tensors back under their source key names.

    `.safetensors` -> a flat safetensors file; anything else -> a PyTorch zip checkpoint, Lightning-
    wrapped ({"state_dict": ...}) unless `wrapper="flat"`. Returns tensors written per component.
    """
    from ..models.load import load_model, read_config
    from .sources import source

    check_export_destination(h5, out, force=force)
    sd: dict[str, torch.Tensor] = {}
    counts = {}
    with LayoutReader(h5) as r:
        for name in r.components():
            if qkeys := r.quantized(name):
                raise SdportError(f"{h5}: /{name}/{next(iter(qkeys))} is int8-quantized; export writes the source "
                                  f"weights bit for bit, which a quantized file no longer holds (convert the "
                                  f"checkpoint again without --quantize)")
        for name in r.components():
            load_model(r, name, device="meta")  # names a missing, extra or misshapen dataset before anything is written
            ga = r.group_attrs(name)
            cfg = read_config(r, name)
            prefix, fmt = ga.get("source_prefix", ""), ga.get("source_format", "compvis")
            if not (isinstance(prefix, str) and isinstance(fmt, str)):
                raise LayoutError(f"{h5}: /{name} attributes source_prefix and source_format must be strings")
            rows: list[Row] = source(name, fmt).rows(cfg)
            for row in rows:
                for k, t in inverse(row, r.tensor(name, row.native).clone()).items():
                    sd[prefix + k] = t
            counts[name] = len(rows)
        if r.has(SCHEDULE):
            for k in r.keys(SCHEDULE):
                sd[k] = r.schedule_tensor(k).clone()
            counts[SCHEDULE] = len(r.keys(SCHEDULE))
    partial = out + ".partial"
    partials.begin(partial)
    try:
        if out.endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file(sd, partial, metadata={"format": "pt", "exported_by": f"sdport {__version__}"})
        else:
            # Through a Python file object, so a failed write surfaces as an OSError with its errno
            # (torch.save on a path reports a full disk as "unexpected pos").
            with open(partial, "wb") as fh:
                torch.save(sd if wrapper == "flat" else {"state_dict": sd}, fh)
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, out)
        partials.end(partial, out)
    except BaseException as e:
        partials.discard(partial)
        if isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError":
            raise SdportError(f"{out}: cannot write ({_write_reason(e)}); removed the partial output, "
                              f"the destination is untouched") from None
        raise
    return counts


def check_export_destination(h5: str, out: str, *, force: bool = False) -> None:
    """What `export` refuses before reading anything: no file name, a directory, an existing file
    without `force`, a missing folder, the input file itself."""
    if not os.path.basename(out):
        raise SdportError(f"output path {out!r} names no file")
    if os.path.isdir(out):
        raise SdportError(f"{out}: is a directory")
    _not_the_input(h5, out)  # before "already exists": that the output is the input is the real mistake
    if os.path.exists(out) and not force:
        raise SdportError(f"{out}: already exists (use --force to overwrite)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise SdportError(f"{out}: output directory {parent} does not exist")


def _check_free_space(out: str, ckpt, p: Plan, cast, quantized) -> None:
    """Refuse up front when the destination's disk cannot hold the tensors. Running out midway is
    handled too, but HDF5 2.0 can crash (SIGSEGV) closing a file whose early writes failed."""
    need = 0
    for name, cp in p.components.items():
        if name in quantized:
            continue  # int8: smaller than any estimate made here
        for row in cp.rows:
            for s in row.sources:
                info = ckpt.infos[cp.key_of[s]]
                item = cast.itemsize if cast is not None and info.dtype.is_floating_point else info.dtype.itemsize
                need += info.numel * item
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
    except OSError:
        return
    if free < need:
        raise SdportError(f"{out}: the tensors need {need / 2**20:.1f} MiB, its disk has {free / 2**20:.1f} MiB free")


def _not_the_input(src: str, out: str) -> None:
    """--force must not let the output replace the very file being read."""
    try:
        same = os.path.exists(out) and os.path.samefile(src, out)
    except OSError:
        return
    if same:
        raise SdportError(f"{out}: is the input file itself; write to another name")


def _write_reason(e: BaseException) -> str:
    """The errno text of the OSError behind a failed write (torch and safetensors wrap it), else the message."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e).split())
    if m := re.search(r"I/O error: (.+?) \(os error \d+\)", text):  # safetensors' wording
        return m.group(1)
    return text[:160]


