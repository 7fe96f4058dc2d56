"""A private on-disk store of tensors for one parity run: what one pass records and a later pass reads
(each layer's output, and for isolated mode its recorded inputs), so that a pass holds one layer's
tensors at a time. It lives in the run's work directory and is deleted when closed."""
from __future__ import annotations

import os
import tempfile

import h5py
import numpy as np
import torch

from ..models.storage import partial as partials
from .layers import first_tensor


class Spill:
    def __init__(self, work: str):
        fd, self.path = tempfile.mkstemp(suffix=".spill.h5", dir=work)
        os.close(fd)
        partials.begin(self.path)  # an interrupt removes it
        self.f = h5py.File(self.path, "w")
        self.keys: dict[str, tuple[str, torch.dtype]] = {}
        self.bytes = 0

    def put(self, key: str, t: torch.Tensor) -> None:
        """Store `t` (moved to the CPU; floats as float32, integers as they are) under `key`."""
        t = t.detach().to("cpu")
        dtype = t.dtype
        a = t.float().numpy() if t.is_floating_point() else t.numpy()
        name = f"{len(self.keys):06d}"
        self.f.create_dataset(name, data=np.ascontiguousarray(a))
        self.keys[key] = (name, dtype)
        self.bytes += a.nbytes

    def get(self, key: str) -> torch.Tensor | None:
        if key not in self.keys:
            return None
        name, dtype = self.keys[key]
        t = torch.from_numpy(self.f[name][()])
        return t.to(dtype) if not t.is_floating_point() else t

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None
        partials.discard(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# Recorded calls: the tensors go to disk, the rest of the call (positions, names, None, ints) stays.


def _skeleton(spill: Spill, key: str, v, n: list):
    if isinstance(v, torch.Tensor):
        k = f"{key}#{n[0]}"
        n[0] += 1
        spill.put(k, v)
        return ("tensor", k)
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [_skeleton(spill, key, x, n) for x in v])
    return ("value", v)


def _rebuild(spill: Spill, s):
    kind, v = s
    if kind == "tensor":
        return spill.get(v)
    if kind in ("list", "tuple"):
        items = [_rebuild(spill, x) for x in v]
        return items if kind == "list" else tuple(items)
    return v


class Calls:
    """Module calls (args, kwargs) recorded into a Spill and rebuilt on demand, one at a time."""

    def __init__(self, spill: Spill):
        self.spill = spill
        self.calls: dict[str, tuple] = {}

    def put(self, key: str, args: tuple, kwargs: dict) -> None:
        n = [0]
        self.calls[key] = (_skeleton(self.spill, key, tuple(args), n),
                           {k: _skeleton(self.spill, key, v, n) for k, v in kwargs.items()})

    def get(self, key: str):
        if key not in self.calls:
            return None
        a, kw = self.calls[key]
        return _rebuild(self.spill, a), {k: _rebuild(self.spill, v) for k, v in kw.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.calls


# ---------------------------------------------------------------------------------------------
# How much a run will spill, before it starts


def _numel(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * (4 if v.is_floating_point() else v.element_size())
    if isinstance(v, (list, tuple)):
        return sum(_numel(x) for x in v)
    if isinstance(v, dict):
        return sum(_numel(x) for x in v.values())
    return 0


def estimate(model: torch.nn.Module, call, outputs, inputs=()) -> int:
    """Bytes a pass spills: the outputs of modules `outputs` and the call tensors of modules `inputs`
    (first call each, as float32), measured by running `call(model)` on the meta device (shapes only:
    `model` and the tensors `call` feeds it must be on meta)."""
    total = [0]
    seen_out, seen_in = set(), set()
    mods = dict(model.named_modules())
    handles = []
    for name in set(outputs):
        def post(m, a, o, name=name):
            if name not in seen_out:
                seen_out.add(name)
                total[0] += _numel(first_tensor(o))
        handles.append(mods[name].register_forward_hook(post))
    for name in set(inputs):
        def pre(m, a, kw, name=name):
            if name not in seen_in:
                seen_in.add(name)
                total[0] += _numel(a) + _numel(kw)
        handles.append(mods[name].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            call(model)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def estimate_reference(component: str, model: torch.nn.Module, cpu_inputs: dict, source_format: str, outputs,
                       inputs=()) -> int:
    """`estimate` for the reference call of `component` on the meta copies of `cpu_inputs` (`model`
    weightless, on meta). 0 where the reference does not run on meta: no figure up front (the report
    still says how much was spilled)."""
    from .components import entry

    pc = entry(component)
    meta = {k: v.to("meta") for k, v in cpu_inputs.items()}
    try:
        return estimate(model, lambda m: pc.call_reference(m, meta, source_format), outputs, inputs)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return 0


def check_room(directory: str, need: int, error) -> None:
    """One line, with the figures, when `directory` has not got `need` bytes free (plus 5%)."""
    import shutil

    free = shutil.disk_usage(directory).free
    if need * 1.05 > free:
        raise error(f"{directory}: this run spills about {_human(need)} of activations and {_human(free)} is free "
                    f"there (choose another place with --spill-dir)")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
