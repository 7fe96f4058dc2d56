"""Device and dtype names as the command line and the libraries spell them, resolved in one place.

The pipeline, the parity harness and the CLI all turn `--device` / `--dtype` into torch objects here,
with the same messages and the same refusal of fp16 on a CPU.
"""
from __future__ import annotations

import warnings

import torch

from .errors import SdportError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the compute dtypes

# Why fp16 on a CPU is refused or warned about: torch has no fast fp16 kernels for x86 CPUs
# (bench/bench_dtypes.py: a 3x3 conv 97x and a GEMM 114x slower in fp16 than in fp32).
CPU_FP16_REASON = ("fp16 on a CPU runs about 100x slower than fp32 (no fp16 CPU kernels; measured by "
                   "bench/bench_dtypes.py): use fp32 or bf16 on a CPU, fp16 on a GPU")


class SlowDtypeWarning(UserWarning):
    """A device/dtype pair that works but runs orders of magnitude slower than the alternatives."""


def check_device_dtype(device, dtype, *, refuse: bool = False) -> None:
    """Warn (or, with `refuse`, raise SdportError) when `dtype` is fp16 on a CPU device."""
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, dtype)
    if dtype != torch.float16 or torch.device(device).type != "cpu":
        return
    if refuse:
        raise SdportError(f"--dtype fp16 on device cpu: {CPU_FP16_REASON}")
    warnings.warn(f"fp16 weights on device cpu: {CPU_FP16_REASON}", SlowDtypeWarning, stacklevel=3)


def resolve_device(device, *, error: type[SdportError] = SdportError) -> torch.device:
    """'cpu' / 'cuda' / 'cuda:N' / 'mps' (or 'meta' in tests) -> torch.device, present on this machine."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise error(f"--device {str(device)[:40]}: expected cpu or cuda[:N] (a torch device name)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise error(f"--device {device}: CUDA is not available on this machine")
    if d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise error(f"--device {device}: MPS is not available on this machine")
    return d


def resolve_dtype(name: str, *, error: type[SdportError] = SdportError) -> torch.dtype:
    if name not in DTYPES:
        raise error(f"--dtype {str(name)[:40]}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve(device, dtype: str, *, refuse_slow: bool = False,
            error: type[SdportError] = SdportError) -> tuple[torch.device, torch.dtype]:
    """(torch.device, torch.dtype) for the names; with `refuse_slow`, fp16 on a CPU is refused (a
    generation would take days), otherwise warned about where a model is loaded."""
    d, t = resolve_device(device, error=error), resolve_dtype(dtype, error=error)
    check_device_dtype(d, t, refuse=refuse_slow)
    return d, t
