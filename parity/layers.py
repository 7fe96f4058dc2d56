"""The layer map: which native module is compared with which reference module, derived from the
component's mapping table (its blocks and its rows), never from a second hand-written list.

- Every `Block(native, source, kind)` of the table is a layer: the block's output on both sides.
- Every row whose native key and source key end in the same parameter name (`...weight`, `...bias`)
  pairs the module that owns the parameter on each side (`down.0.res.0.conv1` <- `input_blocks.1.0.
  in_layers.2`). A fused row (`concat`: q, k, v -> qkv) pairs the native fused module with the n
  reference modules; their outputs are concatenated along the feature axis before comparing.
- A row whose parameter names differ (OpenAI's `in_proj_weight`, `class_embedding`, `proj`) stores a
  tensor of the enclosing block, not of a module of its own: the block's layer covers it.

A module that the map pairs but one side never calls as a module (nn.MultiheadAttention uses its
`out_proj` weights functionally; the native text embedding indexes `position.weight`) cannot be
observed; the harness reports such pairs as unpaired, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..convert.sources import blocks_and_rows
from .components import entry


# Transforms that turn a reference 1x1 conv on [B, C, H, W] into a native linear on tokens [B, HW, C].
_TOKEN_TRANSFORMS = ("conv1x1_to_linear", "concat_conv1x1_to_linear")


@dataclass(frozen=True)
class LayerSpec:
    """One compared layer. `reference` has several modules only for a fused row."""

    native: str
    reference: tuple[str, ...]
    kind: str                  # block kind, or "param" for a module paired through its rows
    transform: str = "identity"
    pool_token: bool = False   # reference output keeps every token, the native only the class token
    sequence_first: bool = False  # reference activations are [T, B, D], the native ones [B, T, D]

    @property
    def reference_name(self) -> str:
        return fused_name(self.reference)


def fused_name(modules: tuple[str, ...]) -> str:
    """One name for reports: 'a.b.to_q' or, fused, 'a.b.{to_q,to_k,to_v}'."""
    if len(modules) == 1:
        return modules[0]
    heads = {r.rpartition(".")[0] for r in modules}
    if len(heads) != 1:
        return "+".join(modules)
    return f"{heads.pop()}.{{{','.join(r.rpartition('.')[2] for r in modules)}}}"


def _split(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight'); 'weight' -> ('', 'weight')."""
    head, _, leaf = key.rpartition(".")
    return head, leaf


def layer_map(component: str, cfg, source_format: str = "compvis") -> tuple[list[LayerSpec], dict[str, str]]:
    """(layers, not_compared): the layers in table order (the harness reorders them by execution),
    and {native key: reason} for rows that pair no module of their own."""
    blocks, rows = blocks_and_rows(component, cfg, source_format)
    seq_first = entry(component).sequence_first.get(source_format, ())
    out: dict[str, LayerSpec] = {}
    for b in blocks:
        out[b.native] = LayerSpec(b.native, (b.source,), b.kind, pool_token=b.kind == "pool_norm",
                                  sequence_first=b.source.startswith(seq_first) if seq_first else False)

    params: dict[str, LayerSpec] = {}
    not_compared: dict[str, str] = {}
    for r in rows:
        native_mod, leaf = _split(r.native)
        parts = [_split(s) for s in r.sources]
        if any(pl != leaf for _, pl in parts):
            not_compared[r.native] = (f"stored as {', '.join(r.sources)}: a tensor of the enclosing "
                                      "block, compared through that block's output")
            continue
        if native_mod in out:
            continue  # the block with this name already compares the module's output
        if native_mod not in params or leaf == "weight":
            # the weight row decides how outputs line up (a fused bias row names the same modules)
            params[native_mod] = LayerSpec(native_mod, tuple(m for m, _ in parts), "param", r.transform,
                                           sequence_first=parts[0][0].startswith(seq_first) if seq_first else False)
    out.update(params)
    skipped = entry(component).not_run(cfg)
    if skipped:
        def reason(name):
            return next((why for mod, why in skipped.items() if name == mod or name.startswith(mod + ".")), None)
        for r in rows:
            if reason(r.native):
                not_compared[r.native] = reason(r.native)
        out = {n: s for n, s in out.items() if not reason(n)}
    return list(out.values()), not_compared


# ---------------------------------------------------------------------------------------------
# Adapters: reference call -> native call, reference output -> the native output's layout


def first_tensor(x):
    """A module's output as one tensor: transformers return tuples / ModelOutput objects."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict):  # ModelOutput is an OrderedDict
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for v in x:
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"no tensor in a module output of type {type(x).__name__}")


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]


def _main_input(args, kwargs):
    if args:
        return args[0]
    for v in kwargs.values():  # transformers pass hidden_states= / input_ids= / pixel_values= by name
        if isinstance(v, torch.Tensor):
            return v
    raise ValueError("module called without a tensor input")


def native_args(component: str, spec: LayerSpec, args: tuple, kwargs: dict) -> tuple:
    """The native layer's positional inputs, from the reference module's recorded call."""
    x = _main_input(args, kwargs)
    if spec.sequence_first:
        x = x.transpose(0, 1)  # [T, B, D] -> [B, T, D]
    if spec.transform in _TOKEN_TRANSFORMS:
        x = _tokens(x)
    if spec.pool_token:
        x = x[:, 0]  # [B, T, D] -> [B, D]: the native norm sees the class token only
    extra = []
    for i, name in enumerate(entry(component).extra_inputs.get(spec.kind, ())):
        v = kwargs.get(name) if name in kwargs else (args[1 + i] if len(args) > 1 + i else None)
        if v is None:
            raise ValueError(f"reference {spec.reference_name} was called without its {name!r} input")
        extra.append(v)
    return (x, *extra)


def reference_output(spec: LayerSpec, outputs: list) -> torch.Tensor:
    """The reference output(s) of a layer, laid out like the native module's output."""
    ts = [first_tensor(o) for o in outputs]
    if spec.transform in _TOKEN_TRANSFORMS:
        y = torch.cat(ts, dim=1) if len(ts) > 1 else ts[0]  # n x [B, C, H, W] -> [B, nC, H, W]
        y = _tokens(y)
    elif len(ts) > 1:
        y = torch.cat(ts, dim=-1)  # n x [B, N, C] -> [B, N, nC]: the fused projection's rows
    else:
        y = ts[0]
    if spec.sequence_first:
        y = y.transpose(0, 1)  # [T, B, D] -> [B, T, D]
    if spec.pool_token:
        y = y[:, 0]  # [B, T, D] -> [B, D]
    return y
