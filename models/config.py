"""Config dataclasses <-> JSON-able dicts (the layout stores each component's config as JSON)."""
from __future__ import annotations

import dataclasses


def to_dict(cfg) -> dict:
    """A frozen config dataclass -> plain dict (tuples become lists)."""
    return {
        f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v
        for f in dataclasses.fields(cfg)
    }


def from_dict(cls, d: dict):
    """Plain dict -> config dataclass; lists become tuples, unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    kw = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kw[k] = v
    return cls(**kw)
