"""What is inside a checkpoint or an sdport .h5 file, as a JSON-able dict."""
from __future__ import annotations

from collections import Counter

from ..models.errors import SdportError
from ..models.storage.layout import SCHEDULE, LayoutReader
from . import model_yaml
from .checkpoint import open_checkpoint, sniff
from .detect import EMA_PREFIX, SCHEDULE_KEYS, plan
from .sources import SOURCES, key_prefixes

# Key prefixes that name the components of a checkpoint: where each source layout keeps its keys, and
# ldm's EMA copy of the denoiser.
PREFIXES = {**key_prefixes(), **{EMA_PREFIX: f"{s.component}_ema" for s in SOURCES if s.ema}}


def _component_of(key: str) -> str | None:
    for prefix, name in PREFIXES.items():
        if key.startswith(prefix):
            return name
    if key in SCHEDULE_KEYS:
        return "schedule"
    return None


def inspect_checkpoint(path: str, config: str | None = None, prediction: str | None = None) -> dict:
    given = model_yaml.for_checkpoint(path, config)
    with open_checkpoint(path) as ck:
        dtypes = Counter(str(i.dtype).replace("torch.", "") for i in ck.infos.values())
        by_comp = Counter(_component_of(k) or "unknown" for k in ck.infos)
        info = {
            "file": path,
            "kind": "checkpoint",
            "container": ck.container,
            "wrapper": ck.wrapper,
            "tensors": len(ck.infos),
            "bytes": ck.nbytes,
            "dtypes": dict(dtypes),
            "components": {k: v for k, v in by_comp.items() if k != "unknown"},
            "ema": any(k.startswith(EMA_PREFIX) for k in ck.infos),
            "metadata": {k: v for k, v in ck.metadata.items() if k != "__metadata__"} or ck.metadata.get("__metadata__", {}),
            "non_tensor_entries": ck.non_tensors,
        }
        for s in SOURCES:
            if s.evidence and s.prefixes[0] + s.evidence in ck.infos:
                info[f"{s.component}_in_channels"] = list(ck.infos[s.prefixes[0] + s.evidence].shape)[1]
        try:
            p = plan(ck, yaml_settings=given, prediction=prediction)
            info["family"], info["variant"] = p.family, p.variant
            info["settings"] = p.settings
            info["evidence"] = p.evidence
            info["configs"] = {n: c.config_dict for n, c in p.components.items()}
            info["ignored"] = p.ignored
            info["unknown_keys"] = p.unknown
            info["warnings"] = p.warnings
        except SdportError as e:
            info["family"], info["variant"] = "unsupported", None
            info["error"] = str(e)
            info["unknown_keys"] = [k for k in ck.infos if _component_of(k) is None]
    return info


def inspect_layout(path: str) -> dict:
    with LayoutReader(path) as r:
        out = {"file": path, "kind": "sdport-layout", **{k: v for k, v in r.attrs.items() if k != "ignored"},
               "components": {}}
        for name in [*r.components(), *([SCHEDULE] if r.has(SCHEDULE) else [])]:
            keys = r.keys(name)
            with r.guard(f"/{name}"):  # a damaged file: one line, not an h5py traceback
                nbytes = sum(r.dataset(name, k).nbytes for k in keys)
                dtypes = Counter(str(r.dataset(name, k).attrs.get("dtype", "")) for k in keys)
            entry = {"datasets": len(keys), "bytes": int(nbytes), "dtypes": dict(dtypes)}
            entry.update({k: v for k, v in r.group_attrs(name).items()})
            out["components"][name] = entry
    return out


def inspect(path: str, config: str | None = None, prediction: str | None = None) -> dict:
    if sniff(path) != "hdf5":
        return inspect_checkpoint(path, config, prediction)
    if config is not None or prediction is not None:
        raise SdportError(f"{path}: an sdport layout records its settings; --config and --prediction apply "
                          "to a checkpoint")
    return inspect_layout(path)
