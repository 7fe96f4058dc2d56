"""Native UNet vs ldm's UNetModel: outputs, block outputs, mapping-table round trip, coverage, config inference."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from sdport.convert import table
from sdport.convert import unet as cu
from sdport.convert.table import UnsupportedCheckpoint
from sdport.parity.reference.unet import build_reference, ldm_kwargs
from sdport.models.config import from_dict, to_dict
from sdport.models.unet import UNet, UNetConfig

TOL = 1e-5
TINY = UNetConfig.tiny()
TINY9 = dataclasses.replace(TINY, in_channels=9)


def rel_l2(a: torch.Tensor, r: torch.Tensor) -> float:
    return ((a - r).norm() / r.norm()).item()


_CACHE: dict = {}


def pair(cfg: UNetConfig, seed: int = 0):
    """(reference, native loaded through the table), cached per config."""
    if (cfg, seed) not in _CACHE:
        ref = build_reference(cfg, seed)
        native = UNet(cfg).eval()
        native.load_state_dict(table.apply(cu.rows(cfg), ref.state_dict()))
        _CACHE[cfg, seed] = ref, native
    return _CACHE[cfg, seed]


def inputs(cfg: UNetConfig, batch: int = 2, size: int = 16, tokens: int = 77, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    c = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return x, c


def check_parity(ref, native, x, t, c):
    with torch.no_grad():
        r = ref(x, t, c)
        a = native(x, t, c)
    assert a.shape == r.shape == (x.shape[0], native.config.out_channels, *x.shape[2:])
    assert r.abs().mean() > 1e-2 and r.std() > 1e-2, "reference output is degenerate"
    assert rel_l2(a, r) <= TOL
    return a, r


def test_reference_has_no_zero_layers():
    ref, _ = pair(TINY)
    for k, v in ref.state_dict().items():
        assert v.abs().max() > 0, f"{k} is all zero"
        if re.search(r"(norm\d?|in_layers\.0|out_layers\.0|out\.0)\.weight$", k):
            assert not torch.all(v == 1), f"{k} not jittered"


def test_forward_matches_reference():
    ref, native = pair(TINY)
    x, c = inputs(TINY, batch=1)
    check_parity(ref, native, x, torch.tensor([500]), c)


def test_batch2_different_timesteps():
    ref, native = pair(TINY)
    x, c = inputs(TINY, batch=2)
    t = torch.tensor([3, 977])
    a, r = check_parity(ref, native, x, t, c)
    for i in range(2):
        assert rel_l2(a[i], r[i]) <= TOL
    # each sample equals its batch-1 run: no mixing across the batch
    with torch.no_grad():
        a1 = native(x[1:], t[1:], c[1:])
    assert rel_l2(a[1:], a1) <= TOL
    # float timesteps and a scalar timestep
    check_parity(ref, native, x, torch.tensor([12.5, 640.25]), c)
    with torch.no_grad():
        assert torch.equal(native(x, 250, c), native(x, torch.tensor([250, 250]), c))


def test_inpainting_9_channels():
    ref, native = pair(TINY9)
    x, c = inputs(TINY9)
    assert native.conv_in.weight.shape[1] == 9
    check_parity(ref, native, x, torch.tensor([10, 700]), c)


def test_attention_chunking():
    ref, native = pair(TINY)
    x, c = inputs(TINY, size=16)  # 256 tokens at level 0: chunks of 7 leave a remainder
    t = torch.tensor([100, 900])
    with torch.no_grad():
        whole = native(x, t, c)
    try:
        native.set_attention_chunk(7)
        a, _ = check_parity(ref, native, x, t, c)
    finally:
        native.set_attention_chunk(None)
    assert rel_l2(a, whole) <= 1e-6
    with pytest.raises(ValueError):
        native.set_attention_chunk(0)


def test_block_outputs_match(cfg=TINY):
    """Every table block's output on the native side matches the paired reference submodule's output."""
    ref, native = pair(cfg)
    got: dict[str, dict[str, torch.Tensor]] = {"n": {}, "r": {}}
    handles = []

    def hook(side, name):
        def f(module, args, out):
            got[side][name] = out.detach().clone()
        return f

    blocks = cu.blocks(cfg)
    for b in blocks:
        handles.append(native.get_submodule(b.native).register_forward_hook(hook("n", b.native)))
        handles.append(ref.get_submodule(b.source).register_forward_hook(hook("r", b.native)))
    try:
        x, c = inputs(cfg)
        check_parity(ref, native, x, torch.tensor([30, 600]), c)
    finally:
        for h in handles:
            h.remove()
    for b in blocks:
        a, r = got["n"][b.native], got["r"][b.native]
        assert a.shape == r.shape, b
        assert r.norm() > 0, b
        assert rel_l2(a, r) <= TOL, (b, rel_l2(a, r))


@pytest.mark.parametrize("cfg", [TINY, TINY9], ids=["tiny", "tiny9"])
def test_round_trip_bit_exact(cfg):
    ref, _ = pair(cfg)
    sd = ref.state_dict()
    rows = cu.rows(cfg)
    back = table.invert(rows, table.apply(rows, sd))
    assert set(back) == set(sd)
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    # fp16 too
    sd16 = {k: v.half() for k, v in sd.items()}
    back16 = table.invert(rows, table.apply(rows, sd16))
    assert all(back16[k].dtype == torch.float16 and torch.equal(back16[k], sd16[k]) for k in sd16)


@pytest.mark.parametrize("cfg", [TINY, UNetConfig.sd_v1()], ids=["tiny", "sd_v1"])
def test_key_coverage_and_blocks(cfg):
    with torch.device("meta"):
        ref = build_reference(cfg)
        native = UNet(cfg)
    src, nat = ref.state_dict(), native.state_dict()
    rows = cu.rows(cfg)
    mapped = [s for r in rows for s in r.sources]
    assert len(mapped) == len(set(mapped)), "a source key is mapped twice"
    for k in src:
        assert k in mapped or any(re.search(p, k) for p, _ in cu.IGNORED), f"unmapped source key {k}"
    assert set(mapped) <= set(src)
    assert sorted(r.native for r in rows) == sorted(nat)
    for r in rows:
        assert r.transform in table.TRANSFORMS
    converted = table.apply(rows, src)
    for k, v in converted.items():
        assert v.shape == nat[k].shape, k
    # blocks name real submodules on both sides; every row lies under some block
    for b in cu.blocks(cfg):
        native.get_submodule(b.native)
        ref.get_submodule(b.source)
        assert b.kind in cu.INNER
    prefixes = [b.native + "." for b in cu.blocks(cfg)]
    assert all(any(r.native.startswith(p) for p in prefixes) for r in rows)
    if cfg == UNetConfig.sd_v1():
        assert len(src) == 686  # the UNet's share of sd-v1-4.ckpt


def shapes_of(cfg):
    with torch.device("meta"):
        ref = build_reference(cfg)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize(
    "cfg",
    [TINY, TINY9, UNetConfig.sd_v1(), UNetConfig.sd_v1_inpainting()],
    ids=["tiny", "tiny9", "sd_v1", "sd_v1_inpainting"],
)
def test_infer_config(cfg):
    assert cu.infer_config(shapes_of(cfg)) == cfg


def test_infer_config_heads_rule():
    shapes = shapes_of(TINY)
    assert cu.infer_config(shapes, num_heads=4).num_heads == 4
    other = dataclasses.replace(TINY, model_channels=64, num_heads=8)
    assert cu.infer_config(shapes_of(other)) == other  # unknown width: SD v1's 8 heads
    with pytest.raises(UnsupportedCheckpoint):
        cu.infer_config(shapes, num_heads=3)  # 32 not divisible by 3


def _raises_naming(shapes, key):
    with pytest.raises(UnsupportedCheckpoint) as e:
        cu.infer_config(shapes)
    msg = str(e.value)
    assert key in msg and "\n" not in msg and "expected" in msg, msg
    return msg


@pytest.mark.parametrize("cfg", [TINY, UNetConfig.sd_v1()], ids=["tiny", "sd_v1"])
def test_infer_config_errors(cfg):
    good = shapes_of(cfg)

    key = "input_blocks.0.0.weight"  # 6 input channels: not txt2img, inpainting or depth
    s = dict(good, **{key: (cfg.model_channels, 6, 3, 3)})
    assert "6" in _raises_naming(s, key)

    key = "output_blocks.0.0.out_layers.3.weight"  # a corrupted inner shape
    w = good[key]
    msg = _raises_naming(dict(good, **{key: (w[0] + 1, *w[1:])}), key)
    assert str(list(w)) in msg

    key = "middle_block.1.proj_in.weight"  # SD 2.x-style linear projection
    w = good[key]
    _raises_naming(dict(good, **{key: w[:2]}), key)

    key = "middle_block.1.transformer_blocks.0.attn1.to_k.weight"
    _raises_naming({k: v for k, v in good.items() if k != key}, key)

    key = "label_emb.weight"  # class-conditional UNet: outside the family
    _raises_naming(dict(good, **{key: (10, 4 * cfg.model_channels)}), key)


def test_config_json_round_trip():
    for cfg in (TINY, TINY9, UNetConfig.sd_v1()):
        d = to_dict(cfg)
        assert isinstance(d["channel_mult"], list)
        assert from_dict(UNetConfig, d) == cfg


def test_ldm_kwargs_sd_v1():
    kw = ldm_kwargs(UNetConfig.sd_v1())
    assert kw["attention_resolutions"] == [1, 2, 4]
    assert kw["channel_mult"] == [1, 2, 4, 4] and kw["num_heads"] == 8 and kw["context_dim"] == 768


def test_native_names_are_readable():
    names = dict(UNet(TINY).named_modules())
    for n in ["time_embed.linear_1", "conv_in", "down.0.res.0", "down.0.attn.0.blocks.0.attn1.qkv",
              "down.0.attn.0.blocks.0.attn2.kv", "down.0.downsample", "mid.res.0", "mid.attn", "mid.res.1",
              "up.1.res.1", "up.1.upsample.conv", "up.0.attn.1.proj_out", "norm_out", "conv_out"]:
        assert n in names, n


# --------------------------------------------------------------------------------------- SD 2.x

TINY_V2 = UNetConfig.tiny_v2()
TINY_V2_9 = UNetConfig.tiny_v2(in_channels=9)
TINY_V2_DEPTH = UNetConfig.tiny_v2(in_channels=5)


@pytest.mark.parametrize("cfg", [TINY_V2, TINY_V2_9, TINY_V2_DEPTH], ids=["v2", "v2_inpaint", "v2_depth"])
def test_v2_forward_matches_reference(cfg):
    ref, native = pair(cfg)
    assert isinstance(ref.middle_block[1].proj_in, torch.nn.Linear)  # ldm built the 2.x transformer
    x, c = inputs(cfg)
    check_parity(ref, native, x, torch.tensor([10, 700]), c)


def test_v2_heads_per_level_match_ldm():
    """64-wide heads in SD 2.x (16-wide in the tiny preset): the head count follows each level's width."""
    ref, native = pair(TINY_V2)
    for b in cu.blocks(TINY_V2):
        if b.kind in ("self_attention", "cross_attention"):
            assert native.get_submodule(b.native).heads == ref.get_submodule(b.source).heads, b
    assert native.down[0].attn[0].blocks[0].attn1.heads == 2 and native.mid.attn.blocks[0].attn1.heads == 4
    assert UNetConfig.sd_v2().heads(1280) == 20 and UNetConfig.sd_v1().heads(1280) == 8


def test_v2_block_outputs_match():
    kinds = {b.kind for b in cu.blocks(TINY_V2)}
    assert "transformer_linear" in kinds and "transformer" not in kinds
    test_block_outputs_match(TINY_V2)


@pytest.mark.parametrize("cfg", [TINY_V2, TINY_V2_9], ids=["v2", "v2_inpaint"])
def test_v2_round_trip_bit_exact(cfg):
    test_round_trip_bit_exact(cfg)


@pytest.mark.parametrize("cfg", [TINY_V2, UNetConfig.sd_v2()], ids=["tiny_v2", "sd_v2"])
def test_v2_key_coverage(cfg):
    with torch.device("meta"):
        ref = build_reference(cfg)
    src = ref.state_dict()
    rows = cu.rows(cfg)
    assert sorted(s for r in rows for s in r.sources) == sorted(src)
    proj = [r for r in rows if r.native.endswith(("proj_in.weight", "proj_out.weight"))]
    assert proj and all(r.transform == "identity" and len(src[r.sources[0]].shape) == 2 for r in proj)
    if cfg == UNetConfig.sd_v2():
        assert len(src) == 686  # the UNet's share of a 2.x checkpoint (the same count as v1)


@pytest.mark.parametrize(
    "cfg",
    [TINY_V2, TINY_V2_9, TINY_V2_DEPTH, UNetConfig.sd_v2(), UNetConfig.sd_v2(9), UNetConfig.sd_v2(5)],
    ids=["tiny_v2", "tiny_v2_9", "tiny_v2_5", "sd_v2", "sd_v2_inpainting", "sd_v2_depth"],
)
def test_v2_infer_config(cfg):
    assert cu.infer_config(shapes_of(cfg)) == cfg
    assert cu.family(cfg) == "sd-v2"


def test_v2_head_layout_overrides():
    shapes = shapes_of(TINY_V2)
    fixed = cu.infer_config(shapes, num_heads=4)
    assert fixed.num_head_channels == 0 and fixed.heads(32) == 4 and fixed.heads(64) == 4
    assert cu.infer_config(shapes, num_head_channels=8).heads(64) == 8
    # an unknown width gets the 2.x convention: 64-wide heads
    other = dataclasses.replace(TINY_V2, model_channels=64, num_head_channels=64)
    assert cu.infer_config(shapes_of(other)) == other
    # and an SD v1 layout never gets a 2.x head layout
    assert cu.infer_config(shapes_of(TINY)).num_head_channels == 0


def test_v2_config_json_round_trip():
    for cfg in (TINY_V2, UNetConfig.sd_v2()):
        assert from_dict(UNetConfig, to_dict(cfg)) == cfg
    d = to_dict(UNetConfig.sd_v1())
    del d["num_head_channels"], d["use_linear_in_transformer"]  # a layout written before 2.x support
    assert from_dict(UNetConfig, d) == UNetConfig.sd_v1()
    with pytest.raises(ValueError, match="true or false"):
        from_dict(UNetConfig, dict(d, use_linear_in_transformer=1))
    with pytest.raises(ValueError, match="0.."):
        from_dict(UNetConfig, dict(d, num_head_channels=-64))


def test_x4_upscaler_refused_in_one_line():
    shapes = dict(shapes_of(TINY_V2), **{"label_emb.weight": (1000, 4 * TINY_V2.model_channels),
                                         "input_blocks.0.0.weight": (32, 7, 3, 3)})
    msg = _raises_naming(shapes, "label_emb.weight")
    assert "x4 upscaler" in msg and "different architecture" in msg


def test_ldm_kwargs_sd_v2():
    kw = ldm_kwargs(UNetConfig.sd_v2())
    assert kw["num_head_channels"] == 64 and kw["num_heads"] == -1 and kw["use_linear_in_transformer"]
    assert kw["context_dim"] == 1024
