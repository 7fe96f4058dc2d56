"""The UNet's attention precision in fp16 / bf16: q·kᵀ and the softmax in fp32 by default, as ldm computes
them (ATTN_PRECISION=fp32), or in the compute dtype on request (ldm's ATTN_PRECISION=fp16), where a large
q·kᵀ overflows fp16; `--attention-precision` reaches the UNet and the parity report records it."""
from __future__ import annotations

import json

import pytest
import torch

from sdport.models import unet
from sdport.parity.metrics import compare

from conftest import run_cli


def reference(q, k, v):
    """softmax(q kᵀ / sqrt(d)) v in fp32 on the (already rounded) low-precision inputs."""
    q, k, v = q.float(), k.float(), v.float()
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


def overflowing(seed=0):
    """fp16 q, k, v whose q·kᵀ passes fp16's range (65504) while every element of q and k is in range: each
    key carries a large common part, which the softmax cancels, so the attention itself is well conditioned."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 32, 64, generator=g)
    common = torch.randn(64, generator=g).sign() * 8000.0
    k = common + torch.randn(2, 4, 48, 64, generator=g)
    v = torch.randn(2, 4, 48, 64, generator=g)
    q, k, v = q.half(), k.half(), v.half()
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > 65504
    return q, k, v


@pytest.mark.parametrize("chunk", [None, 7])
def test_fp32_scores_survive_an_fp16_overflow_that_compute_dtype_scores_do_not(chunk):
    q, k, v = overflowing()
    ref = reference(q, k, v)
    fp32 = unet.attend(q, k, v, chunk, "fp32")
    assert fp32.dtype == torch.float16 and torch.isfinite(fp32).all()
    assert compare(ref, fp32.float())["rel_l2"] < 2e-3
    low = unet.attend(q, k, v, chunk, "compute")
    assert not torch.isfinite(low).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_both_precisions_agree_with_fp32_attention_where_nothing_overflows(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=g).to(dtype) * 3 for _ in range(3))
    ref = reference(q, k, v)
    fp32, low = unet.attend(q, k, v, None, "fp32"), unet.attend(q, k, v, None, "compute")
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert compare(ref, fp32.float())["rel_l2"] < tol and compare(ref, low.float())["rel_l2"] < 4 * tol
    assert not torch.equal(fp32, low)  # two computations, not one
    # in fp32 the option changes nothing
    q32, k32, v32 = q.float(), k.float(), v.float()
    assert torch.equal(unet.attend(q32, k32, v32, None, "compute"), unet.attend(q32, k32, v32, None, "fp32"))


def test_the_setting_reaches_every_attention_and_a_bad_one_is_refused(converted):
    from sdport.models.load import load_model
    from sdport.models.storage.layout import LayoutReader

    with LayoutReader(converted["lightning"]) as r:
        m = load_model(r, "unet", dtype=torch.float32)
    attns = [a for a in m.modules() if isinstance(a, (unet.SelfAttention, unet.CrossAttention))]
    assert attns and {a.precision for a in attns} == {"fp32"}
    m.set_attention_precision("compute")
    assert {a.precision for a in attns} == {"compute"}
    with pytest.raises(ValueError, match="attention precision"):
        m.set_attention_precision("fp8")


def test_parity_records_the_precision_and_refuses_it_off_the_unet(converted, variants, tmp_path):
    rows = {}
    for p in ("fp32", "compute"):
        out = tmp_path / f"{p}.json"
        rc, _, err = run_cli("parity", "unet", variants["lightning"], "--h5", converted["lightning"], "--dtype", "bf16",
                             "--mode", "accumulated", "--batch", "1", "--size", "16", "--attention-precision", p,
                             "--json", out)
        assert rc == 0, err
        rep = json.loads(out.read_text())
        assert rep["inputs"]["attention_precision"] == p
        rows[p] = {r["native"]: r["metrics"]["accumulated"]["rel_l2"] for r in rep["layers"]}
    attn = [n for n in rows["fp32"] if n.endswith((".attn1", ".attn2"))]
    assert attn and any(rows["fp32"][n] != rows["compute"][n] for n in attn)
    rc, _, err = run_cli("parity", "decoder", variants["lightning"], "--attention-precision", "compute")
    assert rc == 2 and err.count("\n") == 1 and "applies to the native UNet" in err, err
