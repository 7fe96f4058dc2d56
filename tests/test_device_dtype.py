"""fp16 on a CPU: load_model warns with the reason, check_device_dtype(refuse=True) refuses."""
import warnings

import pytest
import torch

from sdport.models.errors import SdportError
from sdport.models.load import SlowDtypeWarning, check_device_dtype, load_model


def test_fp16_on_cpu_is_refused_with_the_reason():
    with pytest.raises(SdportError, match="100x slower"):
        check_device_dtype("cpu", "fp16", refuse=True)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", torch.float32, torch.bfloat16])
def test_fast_cpu_dtypes_pass_silently(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_device_dtype("cpu", dtype, refuse=True)
        check_device_dtype("cpu", dtype)


def test_fp16_elsewhere_passes():
    check_device_dtype("cuda", "fp16", refuse=True)
    check_device_dtype(torch.device("cuda:0"), torch.float16, refuse=True)


def test_load_model_warns_for_fp16_on_cpu(converted):
    with pytest.warns(SlowDtypeWarning, match="fp16"):
        m = load_model(converted["lightning"], "decoder", dtype="fp16")
    assert next(m.parameters()).dtype == torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowDtypeWarning)
        load_model(converted["lightning"], "decoder", dtype="bf16")
