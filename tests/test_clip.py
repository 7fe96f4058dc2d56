"""CLIP text encoder and ViT image encoder: native vs reference, tables, config inference."""
from __future__ import annotations

import re

import pytest
import torch

from sdport.convert import clip_text, table, vit
from sdport.convert.table import UnsupportedCheckpoint
from sdport.parity.reference.clip import (build_openai_vision_reference, build_text_reference,
                                            build_vision_reference, openai_visual_state_dict)
from sdport.models.clip import TextConfig, TextEncoder, VisionConfig, VisionEncoder
from sdport.models.config import from_dict, to_dict

TOL = 1e-5
VIT_SOURCES = ["openai", "hf", "compvis"]


def rel_l2(a: torch.Tensor, r: torch.Tensor) -> float:
    return ((a - r).norm() / r.norm()).item()


def assert_close(a: torch.Tensor, r: torch.Tensor, what: str) -> None:
    assert a.shape == r.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(r.shape)}"
    rms = r.float().pow(2).mean().sqrt().item()
    assert rms > 1e-2, f"{what}: reference output is near zero (rms {rms:.2e})"
    err = rel_l2(a, r)
    assert err <= TOL, f"{what}: rel_l2 {err:.3e} > {TOL}"


def ignored(key: str, ignored_list) -> bool:
    return any(re.search(pattern, key) for pattern, _ in ignored_list)


def first(out):
    """A module output -> its main tensor (transformers and nn.MultiheadAttention return tuples/objects)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out[0] if hasattr(out, "__getitem__") else out


def capture(model: torch.nn.Module, prefixes, call) -> dict[str, torch.Tensor]:
    """Run `call()` and return the output of each named submodule in `prefixes`."""
    mods = dict(model.named_modules())
    outs, hooks = {}, []
    for p in prefixes:
        hooks.append(mods[p].register_forward_hook(lambda m, i, o, p=p: outs.__setitem__(p, first(o).detach())))
    try:
        call()
    finally:
        for h in hooks:
            h.remove()
    return outs


# ----------------------------------------------------------------------------- text


def text_ids(batch: int = 2, length: int = 77) -> torch.Tensor:
    """Tokenizer-like ids: start token, a few words, end token, padded with the end token (as SD v1 does)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((batch, length), 49407, dtype=torch.long)
    for b in range(batch):
        n = min(5 + 7 * b, length - 2)
        ids[b, 0] = 49406
        ids[b, 1:1 + n] = torch.randint(256, 49406, (n,), generator=g)
    return ids


@pytest.fixture(scope="module")
def text_pair():
    cfg = TextConfig.tiny()
    ref = build_text_reference(cfg, seed=0)
    native = TextEncoder(cfg).eval()
    native.load_state_dict(table.apply(clip_text.rows(cfg), ref.state_dict()), strict=True)
    return cfg, ref, native


def test_text_presets_and_json():
    assert TextConfig.sd_v1() == TextConfig(49408, 77, 768, 12, 12, 3072, "quick_gelu", 1e-5)
    for cfg in (TextConfig.tiny(), TextConfig.sd_v1()):
        assert from_dict(TextConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("length", [77, 10])
def test_text_matches_reference(text_pair, length):
    cfg, ref, native = text_pair
    ids = text_ids(length=length)
    with torch.no_grad():
        r = ref(input_ids=ids).last_hidden_state
        a = native(ids)
    assert r.shape == (2, length, cfg.hidden)
    assert_close(a, r, "text last_hidden_state")
    assert (r[0] - r[1]).abs().max() > 1e-2  # different prompts give different states


def test_text_is_causal(text_pair):
    _, _, native = text_pair
    ids = text_ids()
    changed = ids.clone()
    changed[:, 40] = 1234
    with torch.no_grad():
        a, b = native(ids), native(changed)
    assert torch.equal(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


def test_text_blocks_pair_real_modules(text_pair):
    cfg, ref, native = text_pair
    bl = clip_text.blocks(cfg)
    native_mods, ref_mods = dict(native.named_modules()), dict(ref.named_modules())
    for b in bl:
        assert b.native in native_mods and b.source in ref_mods, b
    ids = text_ids()
    with torch.no_grad():
        ro = capture(ref, [b.source for b in bl], lambda: ref(input_ids=ids))
        ao = capture(native, [b.native for b in bl], lambda: native(ids))
    for b in bl:
        assert_close(ao[b.native], ro[b.source], f"block {b.native}")


def test_text_round_trip_bit_exact(text_pair):
    cfg, ref, _ = text_pair
    rows = clip_text.rows(cfg)
    for dtype in (torch.float32, torch.float16):
        sd = {k: v.to(dtype) for k, v in ref.state_dict().items()}
        back = table.invert(rows, table.apply(rows, sd))
        assert set(back) == {s for r in rows for s in r.sources}
        for k, v in back.items():
            assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k


def test_text_key_coverage(text_pair):
    cfg, ref, native = text_pair
    rows = clip_text.rows(cfg)
    mapped = [s for r in rows for s in r.sources]
    assert len(mapped) == len(set(mapped)), "a source key is mapped twice"
    keys = set(ref.state_dict()) | {"embeddings.position_ids"}  # the legacy buffer CompVis checkpoints hold
    unhandled = [k for k in keys if k not in set(mapped) and not ignored(k, clip_text.IGNORED)]
    assert unhandled == []
    assert set(mapped) <= keys
    assert [r.native for r in rows] and {r.native for r in rows} == set(native.state_dict())


def test_text_infer_config_tiny_and_sd_v1():
    for cfg in (TextConfig.tiny(), TextConfig.sd_v1()):
        with torch.device("meta"):
            ref = build_text_reference(cfg)
        shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        shapes["embeddings.position_ids"] = (1, cfg.max_positions)
        assert clip_text.infer_config(shapes) == cfg


def test_text_infer_config_errors():
    with torch.device("meta"):
        ref = build_text_reference(TextConfig.tiny())
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    bad = dict(shapes, **{"encoder.layers.1.self_attn.k_proj.weight": (8, 7)})
    with pytest.raises(UnsupportedCheckpoint) as e:
        clip_text.infer_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and "encoder.layers.1.self_attn.k_proj.weight" in msg
    assert "[8, 7]" in msg and "[8, 8]" in msg
    missing = {k: v for k, v in shapes.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(UnsupportedCheckpoint, match=r"missing key 'encoder\.layers\.1\.mlp\.fc2\.bias'"):
        clip_text.infer_config(missing)
    with pytest.raises(UnsupportedCheckpoint, match="embeddings.token_embedding.weight"):
        clip_text.infer_config({k: v for k, v in shapes.items() if not k.startswith("embeddings.token")})
    with pytest.raises(UnsupportedCheckpoint, match=r"\[49408, 100\]"):
        clip_text.infer_config(dict(shapes, **{"embeddings.token_embedding.weight": (49408, 100)}))


# ----------------------------------------------------------------------------- vision


def vit_reference(cfg: VisionConfig, source: str, seed: int = 0):
    """The reference module whose submodule names the `source` rows/blocks refer to."""
    return build_vision_reference(cfg, seed) if source == "hf" else build_openai_vision_reference(cfg, seed)


def vit_ref_forward(ref, source: str, pixels: torch.Tensor) -> torch.Tensor:
    return ref(pixel_values=pixels).image_embeds if source == "hf" else ref(pixels)


def pixels(cfg: VisionConfig, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2))


def native_from(cfg: VisionConfig, source: str, sd: dict) -> VisionEncoder:
    native = VisionEncoder(cfg).eval()
    native.load_state_dict(table.apply(vit.rows(cfg, source), sd), strict=True)
    return native


@pytest.fixture(scope="module", params=VIT_SOURCES)
def vit_pair(request):
    source = request.param
    cfg = VisionConfig.tiny()
    ref = vit_reference(cfg, source)
    return cfg, source, ref, native_from(cfg, source, ref.state_dict())


def test_vision_presets_and_json():
    big = VisionConfig.sd_v1()
    assert (big.image_size, big.patch_size, big.hidden, big.heads, big.layers, big.intermediate,
            big.projection_dim) == (224, 14, 1024, 16, 24, 4096, 768)
    assert big.positions == 257
    for cfg in (VisionConfig.tiny(), big):
        assert from_dict(VisionConfig, to_dict(cfg)) == cfg


def test_vision_matches_reference(vit_pair):
    cfg, source, ref, native = vit_pair
    x = pixels(cfg)
    with torch.no_grad():
        r = vit_ref_forward(ref, source, x)
        a = native(x)
    assert r.shape == (2, cfg.projection_dim)
    assert_close(a, r, f"image_embeds ({source})")
    assert (r[0] - r[1]).abs().max() > 1e-2


def test_openai_and_hf_layouts_correspond():
    """open_clip (OpenAI layout) and transformers compute the same embedding from the same weights.

    The weights travel openai -> native -> hf through the two tables, so this checks the tables against
    two independent implementations, not against our own model.
    """
    cfg = VisionConfig.tiny()
    oc = build_openai_vision_reference(cfg, seed=3)
    native_sd = table.apply(vit.rows(cfg, "openai"), oc.state_dict())
    hf = build_vision_reference(cfg, seed=4)  # different weights until loaded
    hf.load_state_dict(table.invert(vit.rows(cfg, "hf"), native_sd), strict=True)
    x = pixels(cfg)
    with torch.no_grad():
        r_oc, r_hf = oc(x), hf(pixel_values=x).image_embeds
    assert_close(r_hf, r_oc, "transformers vs open_clip")


def test_vision_blocks_pair_real_modules(vit_pair):
    cfg, source, ref, native = vit_pair
    bl = vit.blocks(cfg, source)
    native_mods, ref_mods = dict(native.named_modules()), dict(ref.named_modules())
    for b in bl:
        assert b.native in native_mods and b.source in ref_mods, b
    x = pixels(cfg)
    with torch.no_grad():
        ro = capture(ref, [b.source for b in bl], lambda: vit_ref_forward(ref, source, x))
        ao = capture(native, [b.native for b in bl], lambda: native(x))
    for b in bl:
        r = ro[b.source]
        if b.kind == "pool_norm":
            r = r[:, 0]  # the reference normalises every token, the native model only the class token
        assert_close(ao[b.native], r, f"block {b.native!r} ({source})")


def test_vision_round_trip_bit_exact(vit_pair):
    cfg, source, ref, _ = vit_pair
    rows = vit.rows(cfg, source)
    for dtype in (torch.float32, torch.float16):
        sd = {k: v.to(dtype) for k, v in ref.state_dict().items()}
        back = table.invert(rows, table.apply(rows, sd))
        assert set(back) == {s for r in rows for s in r.sources}
        for k, v in back.items():
            assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k


def test_vision_key_coverage(vit_pair):
    cfg, source, ref, native = vit_pair
    rows = vit.rows(cfg, source)
    mapped = [s for r in rows for s in r.sources]
    assert len(mapped) == len(set(mapped)), "a source key is mapped twice"
    keys = set(ref.state_dict())
    if source == "hf":
        keys.add("vision_model.embeddings.position_ids")  # older transformers saved it
    unhandled = [k for k in keys if k not in set(mapped) and not ignored(k, vit.IGNORED)]
    assert unhandled == []
    assert set(mapped) <= keys
    assert {r.native for r in rows} == set(native.state_dict())


def test_vision_detect_source():
    cfg = VisionConfig.tiny()
    openai = openai_visual_state_dict(cfg)
    assert all(k.startswith("visual.") for k in openai)
    assert vit.detect_source(list(openai) + ["transformer.resblocks.0.ln_1.weight", "logit_scale"]) == "openai"
    compvis = openai_visual_state_dict(cfg, prefix=vit.SOURCES["compvis"])
    extra = ["cond_stage_model.mean", "cond_stage_model.std", "model.diffusion_model.out.2.bias"]
    assert vit.detect_source(list(compvis) + extra) == "compvis"
    assert vit.detect_source(build_vision_reference(cfg).state_dict().keys()) == "hf"
    with pytest.raises(UnsupportedCheckpoint):
        vit.detect_source(["model.diffusion_model.out.2.bias"])


def test_vision_compvis_checkpoint_converts():
    """A CompVis-style dict (prefixed, with unrelated keys) converts through SOURCES + rows."""
    cfg = VisionConfig.tiny()
    full = openai_visual_state_dict(cfg, seed=5, prefix=vit.SOURCES["compvis"])
    full["cond_stage_model.mean"] = torch.zeros(3)
    source = vit.detect_source(full)
    prefix = vit.SOURCES[source]
    stripped = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    assert vit.infer_config({k: tuple(v.shape) for k, v in stripped.items()}, source) == cfg
    native = native_from(cfg, source, stripped)
    ref = build_openai_vision_reference(cfg, seed=5)
    x = pixels(cfg)
    with torch.no_grad():
        assert_close(native(x), ref(x), "compvis checkpoint")


@pytest.mark.parametrize("source", VIT_SOURCES)
def test_vision_infer_config_tiny_and_sd_v1(source):
    for cfg in (VisionConfig.tiny(), VisionConfig.sd_v1()):
        with torch.device("meta"):
            ref = vit_reference(cfg, source)
        shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert vit.infer_config(shapes, source) == cfg


@pytest.mark.parametrize("source", VIT_SOURCES)
def test_vision_infer_config_errors(source):
    cfg = VisionConfig.tiny()
    with torch.device("meta"):
        ref = vit_reference(cfg, source)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    key = ("vision_model.encoder.layers.1.mlp.fc2.weight" if source == "hf"
           else "transformer.resblocks.1.mlp.c_proj.weight")
    with pytest.raises(UnsupportedCheckpoint) as e:
        vit.infer_config(dict(shapes, **{key: (16, 31)}), source)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "[16, 31]" in msg and "[16, 32]" in msg
    pos = "vision_model.embeddings.position_embedding.weight" if source == "hf" else "positional_embedding"
    with pytest.raises(UnsupportedCheckpoint, match=r"\[18, 16\]"):
        vit.infer_config(dict(shapes, **{pos: (18, 16)}), source)  # 17 patches: not a square grid
    if source == "hf":
        no_proj = {k: v for k, v in shapes.items() if k != "visual_projection.weight"}
        with pytest.raises(UnsupportedCheckpoint, match="visual_projection.weight"):
            vit.infer_config(no_proj, source)


def test_native_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="positions"):
        TextEncoder(TextConfig.tiny())(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="32x32"):
        VisionEncoder(VisionConfig.tiny())(torch.zeros(1, 3, 24, 24))
