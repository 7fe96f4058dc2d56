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
