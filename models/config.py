"""Config dataclasses <-> JSON-able dicts (the layout stores each component's config as JSON).

A config read from a file is untrusted: `from_dict` checks every value's type and range against the
dataclass before a model is built from it (the bounds are listed in docs/security.md).
"""
from __future__ import annotations

import dataclasses
import math
import typing

MAX_INT = 1 << 20  # any width, count or size field (the largest real one: CLIP's vocabulary, 49,408)
MAX_TUPLE = 16  # entries of a tuple field (levels of a UNet or VAE)
MAX_STR = 64


def to_dict(cfg) -> dict:
    """A frozen config dataclass -> plain dict (tuples become lists)."""
    return {
        f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v
        for f in dataclasses.fields(cfg)
    }


def _check(cls, name: str, hint, v, low: int = 1):
    """`v` converted to the field's type, or ValueError saying what was expected."""
    where = f"{cls.__name__}.{name}"
    if hint is bool:
        if type(v) is not bool:
            raise ValueError(f"{where} must be true or false, not {_show(v)}")
        return v
    if hint is int:
        if type(v) is not int or not low <= v <= MAX_INT:
            raise ValueError(f"{where} must be an integer in {low}..{MAX_INT}, not {_show(v)}")
        return v
    if hint is float:
        if type(v) not in (int, float) or not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"{where} must be a number in (0, 1], not {_show(v)}")
        return float(v)
    if hint is str:
        if type(v) is not str or not 0 < len(v) <= MAX_STR:
            raise ValueError(f"{where} must be a short string, not {_show(v)}")
        return v
    if typing.get_origin(hint) is tuple:
        if not isinstance(v, (list, tuple)) or len(v) > MAX_TUPLE \
                or any(type(x) is not int or not 0 <= x <= MAX_INT for x in v):
            raise ValueError(f"{where} must be a list of at most {MAX_TUPLE} integers in 0..{MAX_INT}, not {_show(v)}")
        return tuple(v)
    raise ValueError(f"{where}: field of unsupported type {hint}")


def _show(v, n: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + "..."


def from_dict(cls, d: dict):
    """Plain dict -> config dataclass; every value type- and range-checked, unknown keys an error.

    Raises ValueError (TypeError for a `d` that is not a dict) with a one-line reason.
    """
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}: the config is a {type(d).__name__}, not a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(d) - names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {_show(unknown, 80)}")
    hints = typing.get_type_hints(cls)
    # An int field whose 0 means "off" (a UNet's num_head_channels) says so in its metadata: {"min": 0}.
    low = {f.name: f.metadata.get("min", 1) for f in dataclasses.fields(cls)}
    return cls(**{k: _check(cls, k, hints[k], v, low[k]) for k, v in d.items()})
