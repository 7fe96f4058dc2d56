"""The native models as ONNX graphs: `sdport export FILE.h5 --onnx DIR` (docs/onnx.md).

One graph per component, exported with torch's TorchScript exporter (`dynamo=False`): it traces the
native forward as it runs, names every node by the native module that made it (`down.1.res.0.conv1/Conv`)
and names each weight initializer by its layout key. The graph's inputs are named as the native call
names them; the batch (and, for the UNet and the VAE, the spatial size) is dynamic. Each graph is
checked with `onnx.checker` and run once in ONNX Runtime against the native model before it is moved
into place; `manifest.json` beside the graphs records where they came from.

onnx, onnxruntime and the exporter are imported here, in functions: the rest of convert/ and models/
never import them (`pip install sdport[onnx]`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings

import torch

from ..models.components import NAMES
from ..models.errors import SdportError
from ..models.load import load_model, read_config
from ..models.storage.layout import LayoutReader, file_sha256, sha256

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_OPSET = 17
TWO_GB = 2 ** 31  # protobuf's limit on one serialized message: past it, weights go to external data
MANIFEST = "manifest.json"
# The native forward's outputs: the encoder returns the mean and the clamped log-variance.
OUTPUTS = {"unet": ("eps",), "text_model": ("hidden",), "vit": ("embedding",), "encoder": ("mean", "logvar"),
           "decoder": ("sample",)}
# The ORT run's output against the native model's, rel_l2, per dtype: an export that breaks it is refused.
AGREEMENT = {"fp32": 1e-4, "fp16": 2e-2}


def require_onnx():
    """onnx and onnxruntime, or one line saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise SdportError(f"ONNX needs the onnx extra: pip install 'sdport[onnx]' ({e})") from None
    return onnx, onnxruntime


def example_inputs(component: str, cfg) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, str]]]:
    """Small inputs of the native call, by name, and each input's dynamic axes."""
    g = torch.Generator().manual_seed(0)
    batch = {0: "batch"}
    spatial = {0: "batch", 2: "height", 3: "width"}
    if component == "unet":
        side = 2 ** len(cfg.channel_mult)  # divisible by every level's downsampling
        return ({"x": torch.randn(1, cfg.in_channels, side, side, generator=g),
                 "t": torch.tensor([500], dtype=torch.int64),
                 "context": torch.randn(1, 77, cfg.context_dim, generator=g)},
                {"x": spatial, "t": batch, "context": batch})
    if component == "text_model":
        ids = torch.randint(0, cfg.vocab_size, (1, cfg.max_positions), generator=g)
        return {"ids": ids}, {"ids": batch}
    if component == "vit":
        return {"pixels": torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=g)}, {"pixels": batch}
    factor = 2 ** (len(cfg.ch_mult) - 1)
    if component == "encoder":
        return {"image": torch.rand(1, cfg.in_channels, 2 * factor, 2 * factor, generator=g) * 2 - 1}, {"image": spatial}
    if component == "decoder":
        return {"latent": torch.randn(1, cfg.embed_dim, 2, 2, generator=g)}, {"latent": spatial}
    raise SdportError(f"no ONNX export for component {component!r}")


def _output_axes(component: str) -> dict[int, str]:
    return {0: "batch", 2: "height", 3: "width"} if component in ("unet", "encoder", "decoder") else {0: "batch"}


def check_destination(h5: str, out_dir: str, components, force: bool) -> None:
    """What the export refuses before reading a weight."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SdportError(f"{out_dir}: exists and is not a directory (--onnx names a directory)")
    if os.path.isdir(out_dir) and not force:
        taken = [n for n in [f"{c}.onnx" for c in components] + [MANIFEST] if os.path.exists(os.path.join(out_dir, n))]
        if taken:
            raise SdportError(f"{out_dir}/{taken[0]}: already exists (use --force to overwrite)")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise SdportError(f"{out_dir}: parent directory {parent} does not exist")


def export_onnx(h5: str, out_dir: str, *, components=None, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                force: bool = False, progress=None) -> dict:
    """Write one ONNX graph per component of `h5` into `out_dir`, and the manifest. Returns it."""
    onnx, ort = require_onnx()
    if dtype not in DTYPES:
        raise SdportError(f"--dtype {dtype}: ONNX export writes {' or '.join(DTYPES)}")
    if not 14 <= opset <= 21:
        raise SdportError(f"--opset {opset}: the exporter writes opsets 14 to 21 (attention needs 14)")
    with LayoutReader(h5) as reader:
        present = [c for c in NAMES if reader.has(c)]
        wanted = [c for c in NAMES if c in (components or present)]
        missing = [c for c in wanted if c not in present]
        if missing:
            raise SdportError(f"{h5}: no /{missing[0]} group (the file holds: {', '.join(present) or 'none'})")
        if not wanted:
            raise SdportError(f"{h5}: holds no component to export")
        check_destination(h5, out_dir, wanted, force)
        os.makedirs(out_dir, exist_ok=True)
        manifest = {"format": "sdport.onnx", "format_version": 1, "source": os.path.basename(h5),
                    "source_sha256": file_sha256(h5), "checkpoint": reader.attrs.get("source_file"),
                    "checkpoint_sha256": reader.attrs.get("source_sha256"), "opset": opset, "dtype": dtype,
                    "exporter": "torch.onnx.export(dynamo=False) (TorchScript)", "versions": _versions(onnx, ort),
                    "components": {}}
        for i, name in enumerate(wanted):
            if progress:
                progress(name, i, len(wanted))
            manifest["components"][name] = _export_one(reader, name, out_dir, DTYPES[dtype], dtype, opset)
    path = os.path.join(out_dir, MANIFEST)
    with open(path + ".partial", "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(path + ".partial", path)
    return manifest


def _versions(onnx, ort) -> dict:
    from importlib import metadata
    v = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}
    try:
        v["sdport"] = metadata.version("sdport")
    except metadata.PackageNotFoundError:
        pass
    return v


def layout_checksums(reader: LayoutReader, name: str) -> dict:
    """The component's datasets and one digest of their recorded sha256s (name:sha lines, sorted)."""
    lines = sorted(f"{k}:{reader.dataset_attrs(name, k).get('sha256', '')}" for k in reader.keys(name))
    return {"datasets": len(lines), "sha256_of_checksums": sha256(_bytes("\n".join(lines)))}


def _bytes(text: str):
    import numpy as np
    return np.frombuffer(text.encode(), dtype=np.uint8)


def _export_one(reader: LayoutReader, name: str, out_dir: str, tdtype, dtype: str, opset: int) -> dict:
    onnx, _ = require_onnx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU is slow, but the CPU only traces it and runs it once
        model = load_model(reader, name, dtype=tdtype, packed=False).eval().requires_grad_(False)
    inputs, axes = example_inputs(name, read_config(reader, name))
    # Float inputs in the graph's dtype: an fp16 graph takes fp16 tensors (ids and timesteps stay int64).
    inputs = {k: v.to(tdtype) if v.is_floating_point() else v for k, v in inputs.items()}
    target = os.path.join(out_dir, f"{name}.onnx")
    data_name = f"{name}.onnx.data"
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out_dir) as work:
        raw = os.path.join(work, "traced.onnx")
        with warnings.catch_warnings(), full_scope_names(), causal_mask_in(tdtype):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(model, tuple(inputs.values()), raw, dynamo=False, opset_version=opset,
                              input_names=list(inputs), output_names=list(OUTPUTS[name]),
                              dynamic_axes={**axes, **{o: _output_axes(name) for o in OUTPUTS[name]}},
                              do_constant_folding=True)
        proto = onnx.load(raw, load_external_data=True)
        native_node_names(proto)
        proto.doc_string = f"sdport {name} from {os.path.basename(reader.path)} ({dtype})"
        external = proto.ByteSize() >= TWO_GB if _small_enough(proto) else True
        staged = os.path.join(work, f"{name}.onnx")
        if external:
            onnx.save_model(proto, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, staged)
        del proto
        onnx.checker.check_model(staged, full_check=False)
        agreement = _ort_check(staged, model, name, inputs, dtype)
        for f in (target, os.path.join(out_dir, data_name)):
            if os.path.exists(f):
                os.remove(f)
        if external:
            shutil.move(os.path.join(work, data_name), os.path.join(out_dir, data_name))
        shutil.move(staged, target)
    return {"file": f"{name}.onnx", "external_data": data_name if external else None,
            "bytes": os.path.getsize(target) + (os.path.getsize(os.path.join(out_dir, data_name)) if external else 0),
            "sha256": file_sha256(target), "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                                                          "dynamic": {str(a): n for a, n in axes[k].items()}}
                                                      for k, v in inputs.items()},
            "outputs": list(OUTPUTS[name]), "layout_checksums": layout_checksums(reader, name), "ort_check": agreement}


@contextlib.contextmanager
def full_scope_names():
    """The TorchScript exporter scopes each node by the modules it was called in, each named by the
    tail of its path (`res.0`: `down.1` is never called); here each scope carries the module's full
    path from `named_modules()` instead (`/down.1.res.0/down.1.res.0.conv1/Conv`), for
    native_node_names to shorten. A torch without the hook exports its own names."""
    from torch.onnx._internal.torchscript_exporter import utils as ts

    setup = getattr(ts, "_setup_trace_module_map", None)
    if setup is None:
        yield
        return

    def full(model, export_modules_as_functions):
        out = setup(model, export_modules_as_functions)
        if isinstance(model, torch.nn.Module) and torch.jit._trace._trace_module_map is not None:
            torch.jit._trace._trace_module_map = {
                m: torch._C._jit_onnx_create_full_scope_name(torch.typename(type(m)), n)
                for n, m in model.named_modules()}
        return out

    ts._setup_trace_module_map = full
    try:
        yield
    finally:
        ts._setup_trace_module_map = setup


@contextlib.contextmanager
def causal_mask_in(dtype):
    """For an fp16 export: `scaled_dot_product_attention(is_causal=True)` given its mask explicitly,
    built in the query's dtype. The exporter's own causal mask is fp32, and adding it to fp16 scores
    promotes the rest of the graph to fp32 (ONNX Runtime then refuses the graph's fp16 LayerNorms)."""
    if dtype == torch.float32:
        yield
        return
    F = torch.nn.functional
    sdpa = F.scaled_dot_product_attention

    def explicit(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if is_causal and attn_mask is None:
            keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            attn_mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
            is_causal = False
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    F.scaled_dot_product_attention = explicit
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def native_node_names(proto) -> None:
    """Node NAME: `<module>/<Op>[_k]`, `<module>` the native module's full path (the innermost scope
    the exporter recorded; empty at the model's root: `/Add_3`), `_k` the exporter's count of that
    op in that module; their output tensors `<node>_output_<j>`. Unchanged where the names would clash."""
    names = {}
    for n in proto.graph.node:
        parts = n.name.split("/")
        names[n.name] = f"{parts[-2]}/{parts[-1]}" if n.name.startswith("/") and len(parts) >= 3 else n.name
    if len(set(names.values())) != len(proto.graph.node):
        return
    keep = {i.name for i in proto.graph.input} | {o.name for o in proto.graph.output} | {t.name for t in proto.graph.initializer}
    rename = {}
    for n in proto.graph.node:
        for j, o in enumerate(n.output):
            if o and o.startswith("/") and o not in keep:
                rename[o] = f"{names[n.name]}_output_{j}"
    if len(set(rename.values())) != len(rename) or set(rename.values()) & keep:
        rename = {}
    for n in proto.graph.node:
        n.name = names[n.name]
        n.input[:] = [rename.get(t, t) for t in n.input]
        n.output[:] = [rename.get(t, t) for t in n.output]
    for v in proto.graph.value_info:
        v.name = rename.get(v.name, v.name)


def _small_enough(proto) -> bool:
    """ByteSize() itself fails on a message past 2 GB; count the initializers first."""
    return sum(len(t.raw_data) for t in proto.graph.initializer) < TWO_GB


def _ort_check(path: str, model, name: str, inputs: dict, dtype: str) -> dict:
    """One ONNX Runtime run on the example inputs, against the native model's output."""
    _, ort = require_onnx()
    Error = SdportError
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own refusal (a type its kernels do not take): one line, nothing written
        raise Error(f"{name}: ONNX Runtime refuses the exported graph ({str(e).splitlines()[0][:240]}); not written") from None
    feed = {k: v.numpy() for k, v in inputs.items()}
    got = torch.from_numpy(sess.run(None, feed)[0]).double()
    with torch.no_grad():
        want = model(*inputs.values())
    want = (want[0] if isinstance(want, (tuple, list)) else want).double()  # the first output is the contract's
    err = float((got - want).norm() / max(float(want.norm()), 1e-30))
    if not math.isfinite(err) or err > AGREEMENT[dtype] or got.shape != want.shape:
        raise Error(f"{name}: the ONNX graph run in ONNX Runtime departs from the native model (rel_l2 {err:.3g}"
                    f" > {AGREEMENT[dtype]:g}, shapes {list(got.shape)} / {list(want.shape)}); not written")
    return {"provider": "CPUExecutionProvider", "rel_l2_vs_native": err, "input_shapes": {k: list(v.shape) for k, v in inputs.items()}}
