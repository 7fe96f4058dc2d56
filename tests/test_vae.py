import re

import pytest
import torch

from sdport.convert import table
from sdport.convert import vae as vt
from sdport.convert.table import UnsupportedCheckpoint
from sdport.parity.reference.vae import build_reference, ddconfig
from sdport.models.config import from_dict, to_dict
from sdport.models.vae import VAEConfig, VAEDecoder, VAEEncoder

TINY = VAEConfig.tiny()


def rel_l2(a, r):
    return ((a - r).norm() / r.norm()).item()


@pytest.fixture(scope="module")
def ref():
    return build_reference(TINY, seed=0)


@pytest.fixture(scope="module")
def native(ref):
    sd = ref.state_dict()
    enc, dec = VAEEncoder(TINY).eval(), VAEDecoder(TINY).eval()
    enc.load_state_dict(table.apply(vt.encoder_rows(TINY), sd), strict=True)
    dec.load_state_dict(table.apply(vt.decoder_rows(TINY), sd), strict=True)
    return enc, dec


def _assert_close(a, r):
    assert a.shape == r.shape
    assert r.norm() > 1e-3 * r.numel() ** 0.5, "reference output is degenerate"
    assert r.std() > 1e-3, "reference output is constant"
    assert rel_l2(a, r) <= 1e-5


# --- config --------------------------------------------------------------------------------------


def test_config_roundtrip_and_presets():
    for cfg in (VAEConfig.tiny(), VAEConfig.sd_v1()):
        assert from_dict(VAEConfig, to_dict(cfg)) == cfg
    assert VAEConfig.sd_v1().downscale == 8 and TINY.downscale == 2
    with pytest.raises(ValueError):
        VAEConfig(ch=48, ch_mult=(1,))


# --- outputs against ldm -------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(32, 32), (32, 48)])
def test_encoder_matches_reference(ref, native, hw):
    enc, _ = native
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean_r, logvar_r = ref.encode(x)
        mean, logvar = enc(x)
    f = TINY.downscale
    assert mean.shape == (2, TINY.embed_dim, hw[0] // f, hw[1] // f)
    _assert_close(mean, mean_r)
    _assert_close(logvar, logvar_r)


@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
def test_decoder_matches_reference(ref, native, hw):
    _, dec = native
    z = torch.randn(2, TINY.embed_dim, *hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        img_r = ref.decode(z)
        img = dec(z)
    assert img.shape == (2, 3, hw[0] * TINY.downscale, hw[1] * TINY.downscale)
    _assert_close(img, img_r)


def test_logvar_clamp_matches_reference():
    # Blow up quant_conv so logvar leaves [-30, 20] on both sides; both sides must clamp alike.
    ref = build_reference(TINY, seed=3)
    with torch.no_grad():
        ref.quant_conv.weight.mul_(1e4)
    enc = VAEEncoder(TINY).eval()
    enc.load_state_dict(table.apply(vt.encoder_rows(TINY), ref.state_dict()))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, lv_r = ref.encode(x)
        _, lv = enc(x)
    assert (lv_r == 20.0).any() and (lv_r == -30.0).any()
    assert rel_l2(lv, lv_r) <= 1e-5


def test_reference_seed_is_deterministic_and_jittered():
    a, b = build_reference(TINY, seed=5).state_dict(), build_reference(TINY, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_reference(TINY, seed=6).state_dict()
    assert not torch.equal(a["encoder.conv_in.weight"], c["encoder.conv_in.weight"])
    w = a["decoder.norm_out.weight"]
    assert not torch.allclose(w, torch.ones_like(w))


# --- table ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)])
def test_roundtrip_bit_exact(cfg):
    sd = build_reference(cfg).state_dict()
    back = {}
    for rows in (vt.encoder_rows(cfg), vt.decoder_rows(cfg)):
        back.update(table.invert(rows, table.apply(rows, sd)))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # fp16 stays fp16 and bit-exact too
    sd16 = {k: v.half() for k, v in sd.items()}
    for rows in (vt.encoder_rows(cfg), vt.decoder_rows(cfg)):
        back = table.invert(rows, table.apply(rows, sd16))
        for k, v in back.items():
            assert v.dtype == torch.float16 and torch.equal(v, sd16[k]), k


@pytest.mark.parametrize("cfg", [TINY, VAEConfig.sd_v1()])
def test_key_coverage(cfg):
    with torch.device("meta"):
        ref = build_reference(cfg)
    keys = set(ref.state_dict())
    enc_src = {s for r in vt.encoder_rows(cfg) for s in r.sources}
    dec_src = {s for r in vt.decoder_rows(cfg) for s in r.sources}
    assert not enc_src & dec_src
    assert all(k.startswith(("encoder.", "quant_conv.")) for k in enc_src)
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in dec_src)
    assert enc_src | dec_src == keys, (keys - enc_src - dec_src, enc_src | dec_src - keys)
    # every native parameter is produced by exactly one row
    with torch.device("meta"):
        enc, dec = VAEEncoder(cfg), VAEDecoder(cfg)
    assert sorted(r.native for r in vt.encoder_rows(cfg)) == sorted(enc.state_dict())
    assert sorted(r.native for r in vt.decoder_rows(cfg)) == sorted(dec.state_dict())
    assert vt.is_ignored("loss.discriminator.main.0.weight")
    if cfg == VAEConfig.sd_v1():
        assert len(keys) == 248  # as in sd-v1-4.ckpt


@pytest.mark.parametrize("cfg", [TINY, VAEConfig.sd_v1()])
def test_blocks_are_real_submodules(cfg):
    with torch.device("meta"):
        ref = build_reference(cfg)
        enc, dec = VAEEncoder(cfg), VAEDecoder(cfg)
    ref_names = dict(ref.named_modules())
    for blocks, model in ((vt.encoder_blocks(cfg), enc), (vt.decoder_blocks(cfg), dec)):
        names = dict(model.named_modules())
        for b in blocks:
            assert b.native in names, b
            assert b.source in ref_names, b
            # paired modules hold the same number of parameters
            n_native = sum(p.numel() for p in names[b.native].parameters())
            n_source = sum(p.numel() for p in ref_names[b.source].parameters())
            assert n_native == n_source, b


def test_decoder_levels_in_execution_order():
    cfg = VAEConfig.sd_v1()
    b = {x.native: x.source for x in vt.decoder_blocks(cfg)}
    assert b["up.0.res.0"] == "decoder.up.3.block.0"
    assert b["up.3.res.2"] == "decoder.up.0.block.2"
    assert "up.3.upsample" not in b and b["up.0.upsample"] == "decoder.up.3.upsample"


# --- infer_config --------------------------------------------------------------------------------


def _shapes(cfg):
    with torch.device("meta"):
        ref = build_reference(cfg)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("cfg", [TINY, VAEConfig.sd_v1(), VAEConfig(ch=64, ch_mult=(1, 1, 2), num_res_blocks=3,
                                                                      z_channels=8, embed_dim=6)])
def test_infer_config(cfg):
    shapes = _shapes(cfg)
    assert vt.infer_config(shapes) == cfg
    shapes["loss.logvar"] = ()
    assert vt.infer_config(shapes) == cfg
    assert vt.source_shapes(cfg) == _shapes(cfg)


def _raises(shapes, *needles):
    with pytest.raises(UnsupportedCheckpoint) as e:
        vt.infer_config(shapes)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_infer_config_errors():
    good = _shapes(VAEConfig.sd_v1())

    s = dict(good, **{"decoder.up.2.block.1.conv2.weight": (512, 512, 3, 1)})
    _raises(s, "decoder.up.2.block.1.conv2.weight", "(512, 512, 3, 1)", "(512, 512, 3, 3)")

    s = dict(good, **{"encoder.conv_in.weight": (100, 3, 3, 3)})
    _raises(s, "encoder.conv_in.weight", "(100, 3, 3, 3)")

    s = dict(good, **{"quant_conv.weight": (7, 8, 1, 1)})
    _raises(s, "quant_conv.weight", "(7, 8, 1, 1)", "even")

    s = dict(good)
    del s["decoder.mid.attn_1.q.bias"]
    _raises(s, "decoder.mid.attn_1.q.bias", "missing", "(512,)")

    s = dict(good, **{"encoder.down.3.attn.0.q.weight": (512, 512, 1, 1)})
    _raises(s, "encoder.down.3.attn.0.q.weight", "(512, 512, 1, 1)", "unexpected")

    # Anchor keys (the shared shape_of of the mapping tables): key, shape found, shape expected.
    _raises({"model.diffusion_model.out.0.weight": (320,)}, "VAE: missing key 'encoder.conv_in.weight'",
            "expected shape [ch, in_channels, 3, 3]")
    _raises(dict(good, **{"encoder.conv_in.weight": (128, 3, 3)}),
            "VAE: key 'encoder.conv_in.weight' has shape [128, 3, 3], expected [ch, in_channels, 3, 3]")
    _raises(dict(good, **{"quant_conv.weight": (8, 8)}), "key 'quant_conv.weight' has shape [8, 8]",
            "expected [2 * embed_dim, 2 * z_channels, 1, 1]")
    s = dict(good)
    del s["decoder.conv_out.weight"]
    _raises(s, "missing key 'decoder.conv_out.weight'", "[out_channels, 128, 3, 3]")


def test_ddconfig_matches_sd_v1_yaml():
    assert ddconfig(VAEConfig.sd_v1()) == {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }


def test_models_import_nothing_from_reference():
    import sdport.models.vae as m

    src = open(m.__file__).read()
    assert not re.search(r"^\s*(from|import)\s+(ldm|diffusers|transformers|sdport\.(convert|parity))", src, re.M)
    assert "from ..convert" not in src and "from ..parity" not in src


@pytest.mark.slow
def test_sd_v1_size_matches_reference():
    cfg = VAEConfig.sd_v1()
    ref = build_reference(cfg, seed=7)
    enc, dec = VAEEncoder(cfg).eval(), VAEDecoder(cfg).eval()
    enc.load_state_dict(table.apply(vt.encoder_rows(cfg), ref.state_dict()))
    dec.load_state_dict(table.apply(vt.decoder_rows(cfg), ref.state_dict()))
    g = torch.Generator().manual_seed(8)
    x, z = torch.randn(1, 3, 64, 96, generator=g), torch.randn(1, 4, 8, 12, generator=g)
    with torch.no_grad():
        for a, r in zip(enc(x), ref.encode(x)):
            _assert_close(a, r)
        _assert_close(dec(z), ref.decode(z))
