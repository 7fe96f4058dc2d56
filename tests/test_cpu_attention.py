"""models/cpu/attention.py: the AVX512-BF16 attention kernel against fp32 attention, and its fallbacks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdport.models.cpu import attention as cpu_attention

native = pytest.mark.skipif(not cpu_attention.available(), reason=f"native kernel: {cpu_attention.reason()}")


def _qkv(n, m, d, scale=1.0, b=2, h=3, seed=0):
    """q [B, h, N, d] and k, v [B, h, M, d] as the UNet makes them: strided views of fused projections."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, n, h, d, generator=g) * scale).bfloat16().permute(0, 2, 1, 3)
    kv = (torch.randn(b, m, 2, h, d, generator=g) * scale).bfloat16()
    k, v = kv.permute(2, 0, 3, 1, 4)  # [B, M, 2, h, d] -> 2 x [B, h, M, d]
    return q, k, v


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernel lookup that starts over (environment read again, nothing cached), undone afterwards."""
    monkeypatch.setenv("SDPORT_CACHE", str(tmp_path / "cache"))
    cpu_attention._kernel.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    cpu_attention._kernel.cache_clear()


@native
@pytest.mark.parametrize("n,m,d,scale", [(1024, 1024, 40, 1.0), (1024, 1024, 40, 3.0), (300, 77, 80, 1.0),
                                         (33, 45, 41, 2.0), (64, 7, 160, 1.0), (1, 1, 1, 1.0), (17, 129, 64, 0.5)])
def test_error_against_fp32_is_sdpas(n, m, d, scale):
    """Same error against fp32 attention as torch's bf16 SDPA (both round p to bf16), at every shape:
    odd head dims, one key, more keys than queries and fewer, a peaky softmax."""
    q, k, v = _qkv(n, m, d, scale)
    with torch.inference_mode():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        ours = cpu_attention.attention(q, k, v)
        sdpa = F.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    assert _rel(ours, ref) <= 1.1 * _rel(sdpa, ref) + 1e-4, (_rel(ours, ref), _rel(sdpa, ref))
    if m > 1:  # one key: the output is v itself, exact in bf16
        assert _rel(ours, ref) > 0  # a bf16 result, not the fp32 path by mistake


@native
def test_layouts_and_threads_give_the_same_bits():
    """Strided views or contiguous copies, one thread or two: every head is computed the same way."""
    q, k, v = _qkv(200, 150, 40)
    with torch.inference_mode():
        a = cpu_attention.attention(q, k, v)
        b = cpu_attention.attention(q.contiguous(), k.contiguous(), v.contiguous())
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            c = cpu_attention.attention(q, k, v)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(a, b) and torch.equal(a, c)


@native
@pytest.mark.parametrize("b,h,n", [(1, 1, 301), (1, 1, 1), (2, 1, 57), (1, 3, 40)])
def test_few_heads_split_rows(b, h, n):
    """Fewer heads than threads (batch 1 on a many-core machine): rows are split between threads, same
    bits as one thread, same error as SDPA."""
    q, k, v = _qkv(n, 90, 48, b=b, h=h)
    with torch.inference_mode():
        threads = torch.get_num_threads()
        torch.set_num_threads(4)
        try:
            split = cpu_attention.attention(q, k, v)
            torch.set_num_threads(1)
            one = cpu_attention.attention(q, k, v)
        finally:
            torch.set_num_threads(threads)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        sdpa = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(split, one)
    assert _rel(split, ref) <= 1.1 * _rel(sdpa, ref) + 1e-4


@native
def test_rows_are_independent():
    """Each query row's output depends on that row alone (the UNet's query chunking relies on it)."""
    q, k, v = _qkv(100, 60, 40)
    with torch.inference_mode():
        whole = cpu_attention.attention(q, k, v)
        part = cpu_attention.attention(q[:, :, 37:71], k, v)
    assert torch.equal(whole[:, :, 37:71], part)


def test_other_inputs_take_sdpa():
    """fp32, a last dimension that is not contiguous, or inputs that need gradients: torch's SDPA, exactly."""
    q, k, v = _qkv(50, 40, 16)
    cases = [(q.float(), k.float(), v.float()), (q.transpose(2, 3).contiguous().transpose(2, 3), k, v)]
    for args in cases:
        with torch.inference_mode():
            assert torch.equal(cpu_attention.attention(*args), F.scaled_dot_product_attention(*args))
    qg = q.detach().clone().requires_grad_(True)
    out = cpu_attention.attention(qg, k, v)
    assert out.requires_grad and torch.equal(out.detach(), F.scaled_dot_product_attention(q, k, v))


def test_switched_off(fresh):
    fresh.setenv(cpu_attention.ENV, "sdpa")
    q, k, v = _qkv(50, 40, 16)
    assert not cpu_attention.available() and "sdpa" in cpu_attention.reason()
    with torch.inference_mode():
        assert torch.equal(cpu_attention.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_failed_build_falls_back(fresh, tmp_path):
    """A compiler that fails: no kernel, a reason that says so, SDPA's result, nothing left in the cache."""
    if not cpu_attention._cpu_has_bf16():
        pytest.skip("this CPU never builds the kernel")
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: cannot compile' >&2\nexit 1\n")
    bad.chmod(0o755)
    fresh.setenv("CC", str(bad))
    assert not cpu_attention.available()
    assert "failed" in cpu_attention.reason() and "cannot compile" in cpu_attention.reason()
    assert not any(p.suffix == ".so" for p in (tmp_path / "cache").iterdir())
    q, k, v = _qkv(20, 30, 8)
    with torch.inference_mode():
        assert torch.equal(cpu_attention.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@native
def test_builds_into_its_cache(fresh, tmp_path):
    """A fresh cache directory gets one library named by the source's hash, and it is used."""
    assert cpu_attention.available() and cpu_attention.reason() == "native"
    built = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(built) == 1 and built[0].startswith("attention_bf16-") and built[0].endswith(".so")


@native
def test_forked_child_runs_it():
    """A process forked after the kernel ran (a DataLoader worker, multiprocessing) runs it too."""
    import multiprocessing as mp

    q, k, v = _qkv(64, 64, 40)
    with torch.inference_mode():
        want = cpu_attention.attention(q, k, v)  # the parent's pool exists now
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_attend, (q, k, v)).get(timeout=60)
    assert torch.equal(got, want)


def _attend(q, k, v):
    torch.set_num_threads(2)
    with torch.inference_mode():
        return cpu_attention.attention(q, k, v).clone()


def test_traced_graphs_record_sdpa():
    """torch.jit.trace records torch ops only: a traced call must hold SDPA, not an empty tensor the C
    call filled once."""
    import warnings

    q, k, v = _qkv(40, 30, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; tracing is what users may still do
        traced = torch.jit.trace(cpu_attention.attention, (q, k, v), check_trace=False)
    q2, k2, v2 = _qkv(40, 30, 16, seed=1)
    with torch.inference_mode():
        assert torch.equal(traced(q2, k2, v2), F.scaled_dot_product_attention(q2, k2, v2))
