"""The checkpoint's own inference yaml (ldm's config: `NAME.yaml` beside `NAME.ckpt`, or `--config FILE`),
and the settings no tensor shape says, each with where it came from.

The yaml is untrusted: it is read as plain YAML (PyYAML's SafeLoader: mappings, lists, strings, numbers,
booleans; any object tag such as `!!python/object` is refused in one line), from a regular file of at most
MAX_BYTES. Only these values are read, each type-checked:

    model.params.parameterization                   prediction: "eps" (ldm's default when absent) or "v"
    model.params.scale_factor                       the latent scale (0.18215 in SD v1 and 2.x)
    model.params.unet_config.params.num_heads / num_head_channels / context_dim / use_linear_in_transformer
    model.params.cond_stage_config.target / params.layer    the text encoder and the layer it returns

Each setting is recorded as {"value": ..., "source": "shapes" | "yaml" | "flag" | "assumed", "why": ...}.
"""
from __future__ import annotations

import math
import os

from ..models.errors import SdportError
from ..models.storage.small import read_regular

MAX_BYTES = 1 << 20  # the SD yamls are 2-3 KB
SOURCES = ("shapes", "yaml", "flag", "assumed")
PREDICTIONS = ("eps", "v")
# ldm's text encoders by class name -> the source format sdport reads their weights as
TEXT_ENCODERS = {"FrozenCLIPEmbedder": "compvis", "FrozenOpenCLIPEmbedder": "openclip"}


def for_checkpoint(checkpoint: str, config: str | None = None) -> dict[str, dict]:
    """The settings of `config` (a path), else of the yaml beside `checkpoint`, else none."""
    path = config or beside(checkpoint)
    return settings(read(path), path) if path else {}


def setting(value, source: str, why: str) -> dict:
    assert source in SOURCES
    return {"value": value, "source": source, "why": why}


def beside(checkpoint: str) -> str | None:
    """NAME.yaml next to NAME.ckpt / NAME.safetensors (A1111's convention), if there is one."""
    path = os.path.splitext(checkpoint)[0] + ".yaml"
    return path if os.path.exists(path) else None


def read(path: str) -> dict:
    """The yaml as plain data, or SdportError in one line (file, line, what was expected)."""
    import yaml

    data = read_regular(path, MAX_BYTES, "a yaml file")
    if len(data) > MAX_BYTES:
        raise SdportError(f"{path}: larger than {MAX_BYTES} bytes; expected an ldm inference yaml (a few KB)")
    try:
        doc = yaml.load(data, Loader=yaml.SafeLoader)  # plain data only: no tag builds an object
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())[:160]
        raise SdportError(f"{path}:{where}: not plain YAML ({problem}); expected an ldm config "
                          "without object tags") from None
    if not isinstance(doc, dict):
        raise SdportError(f"{path}: the yaml holds a {type(doc).__name__}, expected a mapping with a 'model' key")
    return doc


def _at(doc: dict, dotted: str):
    node = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _typed(path: str, key: str, v, kind: str):
    ok = {
        "int": type(v) is int and 1 <= v <= 1 << 20,
        "bool": type(v) is bool,
        "scale": type(v) in (int, float) and math.isfinite(v) and 0 < v <= 16,
        "prediction": v in PREDICTIONS,
        "layer": v in ("last", "penultimate"),
        "str": isinstance(v, str) and len(v) <= 200,
    }[kind]
    if not ok:
        want = {"int": "an integer in 1..2^20", "bool": "true or false", "scale": "a number in (0, 16]",
                "prediction": "eps or v", "layer": "last or penultimate", "str": "a short string"}[kind]
        raise SdportError(f"{path}: {key} is {str(v)[:40]!r}; expected {want}")
    return v


def settings(doc: dict, path: str) -> dict[str, dict]:
    """{name: setting} for every value the yaml gives (source "yaml"); `why` names the yaml key."""
    out = {}
    model = "model.params"
    if not isinstance(_at(doc, model), dict):
        raise SdportError(f"{path}: no model.params mapping; expected an ldm inference config")

    def take(name, key, kind):
        v = _at(doc, key)
        if v is not None and v != -1:  # ldm's -1: not set (num_heads in the 2.x yamls' defaults)
            out[name] = setting(_typed(path, key, v, kind), "yaml", f"{os.path.basename(path)}: {key}")

    p = _at(doc, f"{model}.parameterization")
    out["prediction"] = setting("eps" if p is None else _typed(path, f"{model}.parameterization", p, "prediction"),
                                "yaml", f"{os.path.basename(path)}: {model}.parameterization"
                                + (" absent (ldm's default: eps)" if p is None else ""))
    take("scale_factor", f"{model}.scale_factor", "scale")
    u = f"{model}.unet_config.params"
    take("unet.num_heads", f"{u}.num_heads", "int")
    take("unet.num_head_channels", f"{u}.num_head_channels", "int")
    take("unet.context_dim", f"{u}.context_dim", "int")
    take("unet.use_linear_in_transformer", f"{u}.use_linear_in_transformer", "bool")
    target = _at(doc, f"{model}.cond_stage_config.target")
    if target is not None:
        cls = _typed(path, f"{model}.cond_stage_config.target", target, "str").rpartition(".")[2]
        if cls not in TEXT_ENCODERS:
            raise SdportError(f"{path}: {model}.cond_stage_config.target is {target[:80]!r}; expected one of "
                              f"{', '.join(TEXT_ENCODERS)}")
        out["text_model.encoder"] = setting(cls, "yaml", f"{os.path.basename(path)}: {model}.cond_stage_config.target")
        if cls == "FrozenOpenCLIPEmbedder":
            layer = _at(doc, f"{model}.cond_stage_config.params.layer")
            out["text_model.layer"] = setting(
                "last" if layer is None else _typed(path, f"{model}.cond_stage_config.params.layer", layer, "layer"),
                "yaml", f"{os.path.basename(path)}: {model}.cond_stage_config.params.layer"
                + (" absent (ldm's default: last)" if layer is None else ""))
    return out
