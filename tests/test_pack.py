"""Weights packed into oneDNN's layout (models/cpu/pack.py): same results, same state dict, no extra copy."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from sdport.models.cpu import pack
from sdport.models.load import load_model
from sdport.parity.metrics import DEFAULT_TOLERANCES, compare

pytestmark = pytest.mark.skipif(not pack.available(), reason="this torch build has no oneDNN")


def _inputs(cfg, dtype=torch.float32, side=16):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_channels, side, side, generator=g).to(dtype)
    c = torch.randn(2, 77, cfg.context_dim, generator=g).to(dtype)
    return x, torch.tensor([981, 7]), c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_unet_matches_plain(converted, dtype):
    if dtype not in pack.DTYPES:
        pytest.skip("oneDNN's bf16 weight reorder needs AVX512 or AVX-NE-CONVERT, which this CPU lacks")
    h5 = converted["lightning"]
    plain = load_model(h5, "unet", dtype=dtype, packed=False)
    packed = load_model(h5, "unet", dtype=dtype)  # packed by default on a CPU
    kinds = {type(m) for m in packed.modules()}
    assert pack.PackedConv2d in kinds and pack.PackedLinear in kinds
    assert not any(type(m) in (pack.PackedConv2d, pack.PackedLinear) for m in plain.modules())
    with torch.inference_mode():
        a, b = packed(*_inputs(packed.config, dtype)), plain(*_inputs(plain.config, dtype))
    assert a.dtype == b.dtype == dtype
    assert b.float().abs().mean() > 1e-2  # not a degenerate output
    # Two fp32 implementations (oneDNN's GEMMs sum in another order than addmm): the fp32 parity gate.
    # bf16: both round every layer's output to bf16, so they drift apart like two bf16 ports.
    key = "fp32" if dtype == torch.float32 else "bf16"
    assert compare(a.float(), b.float())["rel_l2"] <= DEFAULT_TOLERANCES[key].rel_l2


def test_packed_state_dict_is_the_plain_one(converted):
    h5 = converted["lightning"]
    plain = load_model(h5, "unet", packed=False).state_dict()
    packed = load_model(h5, "unet").state_dict()
    assert list(packed) == list(plain)
    for k in plain:
        assert torch.equal(packed[k], plain[k]), k


def test_packing_releases_each_plain_weight():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Linear(32, 64))
    refs = [weakref.ref(model[0].weight), weakref.ref(model[1].weight)]
    assert pack.pack(model) == 2
    gc.collect()
    assert all(r() is None for r in refs)


def test_conv_is_bit_identical_and_other_shapes_run():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, stride=2, padding=1).eval()
    model = nn.Sequential(conv)
    x = torch.randn(3, 32, 24, 40).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = conv(x)
        pack.pack(model)
        got = model(x)
    assert isinstance(model[0], pack.PackedConv2d)
    assert got.shape == want.shape == (3, 48, 12, 20)
    assert torch.equal(got, want)


def test_what_stays_plain():
    model = nn.Sequential(
        nn.Conv2d(4, 32, 3, padding=1),  # few channels: latent-facing, stays plain
        nn.Conv2d(32, 32, 3, padding=1, groups=2),  # grouped: not handled
        nn.Conv2d(32, 32, 3, padding=1).half(),  # fp16: no fast CPU kernels either way
        nn.Linear(32, 32),
    )
    assert pack.pack(model) == 1
    assert [type(m).__name__ for m in model] == ["Conv2d", "Conv2d", "Conv2d", "PackedLinear"]


def test_packed_module_refuses_other_devices():
    model = nn.Sequential(nn.Linear(32, 32))
    pack.pack(model)
    with pytest.raises(RuntimeError, match="CPU-packed"):
        model(torch.empty(2, 32, device="meta"))


def _packed_modules(model):
    return [m for m in model.modules() if isinstance(m, (pack.PackedConv2d, pack.PackedLinear))]


def test_load_packs_on_first_call_with_the_same_result(converted):
    h5 = converted["lightning"]
    lazy = load_model(h5, "unet")
    eager = load_model(h5, "unet")
    assert pack.pack_all(eager) == len(_packed_modules(eager)) > 0
    assert not any(m.is_packed for m in _packed_modules(lazy))  # loading only maps the file
    sd_before = lazy.state_dict()
    with torch.inference_mode():
        a, b = lazy(*_inputs(lazy.config)), eager(*_inputs(eager.config))
    assert all(m.is_packed for m in _packed_modules(lazy))
    assert torch.equal(a, b)  # the same packed weights, whenever they were packed
    sd_after = lazy.state_dict()
    assert list(sd_after) == list(sd_before)
    for k in sd_before:
        assert torch.equal(sd_after[k], sd_before[k]), k
    assert pack.pack_all(lazy) == 0


def test_lazy_packing_releases_each_plain_weight_on_first_call():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 8))
    assert pack.pack(model, lazy=True) == 2
    refs = [weakref.ref(m.packed_weight) for m in model]  # before the first call: the plain weights
    gc.collect()
    assert all(r() is not None and not r().is_mkldnn for r in refs)
    with torch.inference_mode():
        model(torch.randn(3, 32))
    gc.collect()
    assert all(r() is None for r in refs)
