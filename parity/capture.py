"""Forward hooks by module name: inputs (pre-hooks) and outputs (post-hooks), in execution order.

A post-hook fires when a module's forward returns, so children complete before their parent: that
completion order is the "execution order" of a report, and it is why a broken norm inside a ResBlock
is named before the ResBlock that contains it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch


def modules_by_name(model: torch.nn.Module, names: Iterable[str], side: str) -> dict[str, torch.nn.Module]:
    """{name: module} for `names` ("" is the model itself); a missing name is a layer-map bug."""
    table = dict(model.named_modules())
    missing = [n for n in names if n not in table]
    if missing:
        raise KeyError(f"{side} model has no module {missing[0]!r} ({len(missing)} missing); "
                       f"the layer map and the model disagree")
    return {n: table[n] for n in names}


@contextlib.contextmanager
def hooks(model: torch.nn.Module, names: Iterable[str], *, side: str,
          on_input: Callable | None = None, on_output: Callable | None = None):
    """Within the block, call `on_input(name, args, kwargs)` before and `on_output(name, output)`
    after each named module's forward. Hooks are removed on exit, also after an error."""
    handles = []
    try:
        for name, m in modules_by_name(model, names, side).items():
            if on_input is not None:
                handles.append(m.register_forward_pre_hook(
                    lambda mod, args, kwargs, n=name: on_input(n, args, kwargs), with_kwargs=True))
            if on_output is not None:
                handles.append(m.register_forward_hook(
                    lambda mod, args, out, n=name: on_output(n, out)))
        yield
    finally:
        for h in handles:
            h.remove()
