"""Checking anyone's port against the original: `sdport parity COMPONENT CKPT --port SPEC`.

SPEC is one of
- `diffusers`: diffusers' / transformers' models built from the checkpoint (ports/diffusers.py);
- `torch:FILE.py:FUNC` or `torch:package.module:FUNC`: `FUNC(checkpoint, component) -> nn.Module`,
  called with the component's inputs positionally (docs/ports.md: the contract);
- `dump:FILE.h5`: a schema-2 activation dump written by any runtime (docs/golden.md);
- `onnx:FILE.onnx[:LEVEL]`: an ONNX graph run in ONNX Runtime at optimization LEVEL (ports/onnx.py,
  docs/onnx.md).

A module port is paired with the reference through its weights (ports/pairing.py) and compared layer
by layer (ports/run.py); a dump is compared by the reference module names it holds (ports/dump.py); an ONNX graph's nodes are
paired through the initializers they consume (ports/onnx.py).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys

from ...models.errors import cut
from ..components import ParityError


ONNX_LEVELS = ("disabled", "basic", "extended", "all")  # ONNX Runtime's graph optimization levels


@dataclasses.dataclass(frozen=True)
class PortSpec:
    kind: str        # "diffusers" | "torch" | "dump" | "onnx"
    target: str = ""  # the .py file or module (torch), the .h5 file (dump), the .onnx file (onnx)
    func: str = ""    # the function (torch), the optimization level (onnx)

    @property
    def label(self) -> str:
        return {"diffusers": "diffusers", "torch": f"torch:{self.target}:{self.func}",
                "dump": f"dump:{self.target}", "onnx": f"onnx:{self.target}:{self.func}"}[self.kind]


def parse_spec(spec: str) -> PortSpec:
    """'diffusers' | 'torch:FILE.py:FUNC' | 'torch:package.module:FUNC' | 'dump:FILE.h5' |
    'onnx:FILE.onnx[:LEVEL]'."""
    if spec == "diffusers":
        return PortSpec("diffusers")
    kind, _, rest = spec.partition(":")
    if kind == "dump" and rest:
        return PortSpec("dump", rest)
    if kind == "onnx" and rest:
        head, _, level = rest.rpartition(":")
        if head and level in ONNX_LEVELS:
            return PortSpec("onnx", head, level)
        return PortSpec("onnx", rest, "disabled")
    if kind == "torch":
        target, _, func = rest.rpartition(":")
        if target and func.isidentifier():
            return PortSpec("torch", target, func)
    raise ParityError(f"--port {cut(spec, 80)}: expected diffusers, torch:FILE.py:FUNC, "
                      f"torch:package.module:FUNC, dump:FILE.h5 or onnx:FILE.onnx[:LEVEL]")


def port_file(spec: PortSpec) -> str | None:
    """The file a spec names: the .py (None for an installed module's function), the .h5, the .onnx."""
    if spec.kind == "torch":
        return spec.target if _names_file(spec.target) else None
    return spec.target or None


def _names_file(target: str) -> bool:
    return target.endswith(".py") or os.sep in target


def load_port(spec: PortSpec, checkpoint: str, component: str, *, num_heads=None, dtype=None, device="cpu"):
    """The port's module for `component`. A `torch:` port runs the code the user named, by design."""
    import torch

    if spec.kind == "onnx":
        raise ParityError(f"--port {spec.label}: an ONNX graph is no torch module; it runs through ports.onnx.run_onnx")
    if spec.kind == "diffusers":
        from . import diffusers
        return diffusers.build(checkpoint, component, num_heads=num_heads, dtype=dtype or torch.float32,
                               device=device)
    fn = _function(spec)
    try:
        model = fn(checkpoint, component)
    except ParityError:
        raise
    except Exception as e:  # the port's own failure: one line that says whose it is
        raise ParityError(f"--port {spec.label}: {spec.func}({os.path.basename(checkpoint)!r}, {component!r}) "
                          f"raised {type(e).__name__}: {cut(e, 160)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ParityError(f"--port {spec.label}: {spec.func} returned {type(model).__name__}, expected a "
                          f"torch.nn.Module")
    return model.eval().requires_grad_(False)


def _function(spec: PortSpec):
    target = spec.target
    if _names_file(target):
        if not os.path.isfile(target):
            raise ParityError(f"--port {spec.label}: no such file {target}")
        name = f"sdport_port_{abs(hash(os.path.abspath(target)))}"
        loader = importlib.util.spec_from_file_location(name, target)
        if loader is None or loader.loader is None:
            raise ParityError(f"--port {spec.label}: {target} is not a Python file")
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            loader.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ParityError(f"--port {spec.label}: importing {target} raised {type(e).__name__}: "
                              f"{cut(e, 160)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ParityError(f"--port {spec.label}: cannot import {target} ({cut(e, 120)})") from None
    fn = getattr(module, spec.func, None)
    if not callable(fn):
        raise ParityError(f"--port {spec.label}: {target} has no function {spec.func}")
    return fn
