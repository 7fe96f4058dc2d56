"""The SD 2.x text encoder: OpenCLIP's text tower (FrozenOpenCLIPEmbedder's keys and computation) <-> TextEncoder."""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from sdport.convert import openclip_text as ct
from sdport.convert import table
from sdport.convert.table import UnsupportedCheckpoint
from sdport.models.clip import TextConfig, TextEncoder
from sdport.models.config import from_dict, to_dict
from sdport.models.tokenizer import default_tokenizer
from sdport.parity.reference import openclip as ro

if importlib.util.find_spec("open_clip") is None:  # its transformer.py is loaded by path (no torchvision)
    pytest.skip("open_clip is not installed", allow_module_level=True)

TINY = TextConfig.tiny_v2()
PREFIX = "cond_stage_model.model."
TOL = 1e-5


def rel(sd):
    return {k[len(PREFIX):]: v for k, v in sd.items()}


def ids():
    tok = default_tokenizer()
    return torch.tensor([tok("", 0), tok("a photograph of an astronaut riding a horse", 0)])  # [2, 77]


def pair(cfg):
    ref = ro.build_text_reference(cfg, seed=3)
    native = TextEncoder(cfg).eval()
    native.load_state_dict(table.apply(ct.rows(cfg), ref.state_dict()))
    return ref, native


def rel_l2(a, r):
    return float((a - r).norm() / r.norm())


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_matches_frozen_openclip_encode(layer):
    cfg = dataclasses.replace(TINY, layer=layer)
    ref, native = pair(cfg)
    with torch.no_grad():
        r, a = ref(ids()), native(ids())
    assert r.shape == (2, 77, cfg.hidden) and r.std() > 0.1
    assert rel_l2(a, r) <= TOL


def test_reference_is_what_ldm_computes():
    """Sequence-first blocks (open_clip 2.0), the causal mask, and the layer choice all show in its output."""
    ref = ro.build_text_reference(TINY, seed=3)
    assert ref.transformer.resblocks[0].attn.batch_first is False
    x = ids()
    with torch.no_grad():
        r = ref(x)
        later = x.clone()
        later[:, 12] = 1234
        r2 = ref(later)
        assert torch.equal(r2[:, :12], r[:, :12]) and not torch.equal(r2[:, 12:], r[:, 12:])  # causal
        last = ro.FrozenOpenCLIPText(ref, "last")  # the same weights, all blocks
        assert rel_l2(last(x), r) > 1e-2


def test_checkpoint_keys_and_config_inference():
    sd = ro.checkpoint_state_dict(TINY, seed=3)
    assert list(sd)[:3] == [PREFIX + "positional_embedding", PREFIX + "text_projection", PREFIX + "logit_scale"]
    shapes = {k: tuple(v.shape) for k, v in rel(sd).items()}
    assert ct.infer_config(shapes) == TINY
    mapped = [s for r in ct.rows(TINY) for s in r.sources]
    assert sorted(mapped + ["text_projection", "logit_scale"]) == sorted(shapes)  # the last block too
    assert all(r.transform == "identity" for r in ct.rows(TINY))  # in_proj is fused already, as the native qkv
    with pytest.raises(UnsupportedCheckpoint, match="transformer.resblocks.1.mlp.c_fc.weight"):
        bad = dict(shapes, **{"transformer.resblocks.1.mlp.c_fc.weight": (31, 16)})
        ct.infer_config(bad)


def test_full_size_vit_h14_text_tower():
    with torch.device("meta"):
        ref = ro.build_text_reference(TextConfig.sd_v2())
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = ct.infer_config(shapes)
    assert cfg == TextConfig.sd_v2()
    assert (cfg.hidden, cfg.heads, cfg.layers, cfg.layers_run, cfg.intermediate) == (1024, 16, 24, 23, 4096)
    assert len(shapes) == 2 + 24 * 12 + 2  # embeddings, 24 blocks, ln_final


def test_round_trip_bit_exact():
    sd = rel(ro.checkpoint_state_dict(TINY, seed=3))
    rows = ct.rows(TINY)
    back = table.invert(rows, table.apply(rows, sd))
    assert set(back) == set(sd) - {"text_projection", "logit_scale"}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_config_json_and_checks():
    assert from_dict(TextConfig, to_dict(TextConfig.sd_v2())) == TextConfig.sd_v2()
    old = {k: v for k, v in to_dict(TextConfig.sd_v1()).items() if k not in ("layer", "pad_id")}
    assert from_dict(TextConfig, old) == TextConfig.sd_v1()  # a layout written before these fields
    with pytest.raises(ValueError, match="layer"):
        TextConfig(layer="pooled")
    with pytest.raises(ValueError, match="pad_id"):
        TextConfig(pad_id=49408)
