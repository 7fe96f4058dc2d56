"""Files that hold one component alone, with the CompVis prefix stripped: a standalone VAE (as the
fine-tuned SD VAEs ship), an extracted UNet, a transformers CLIPTextModel state dict (`text_model.*`)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdport.convert.checkpoint import open_checkpoint
from sdport.convert.convert import convert, export
from sdport.models.storage.layout import LayoutReader, verify
from sdport.models.load import load_model
from sdport.parity.harness import run_parity

CASES = {
    # name: (CompVis prefix to strip, prefix it gets instead, components expected, variant recorded)
    "vae": ("first_stage_model.", "", ["encoder", "decoder"], "partial"),
    "unet": ("model.diffusion_model.", "", ["unet"], "txt2img"),  # the UNet alone says txt2img or inpainting
    "text": ("cond_stage_model.transformer.", "", ["text_model"], "partial"),
    # One half of the VAE, bare or still under the CompVis prefix.
    "vae_decoder": ("first_stage_model.", "", ["decoder"], "partial"),
    "vae_encoder": ("first_stage_model.", "first_stage_model.", ["encoder"], "partial"),
}
# Which keys (after the strip) each case keeps; the others keep everything under the prefix.
KEEP = {"vae_decoder": ("decoder.", "post_quant_conv."), "vae_encoder": ("encoder.", "quant_conv.")}


def _standalone(src: str, case: str, path: str) -> dict:
    strip, put = CASES[case][:2]
    keep = KEEP.get(case, ("",))
    with open_checkpoint(src) as ck:
        sd = {put + k[len(strip):]: ck.tensor(k).clone() for k in ck.keys()
              if k.startswith(strip) and k[len(strip):].startswith(keep)}
    if path.endswith(".safetensors"):
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    return sd


@pytest.mark.parametrize("ext", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("case", list(CASES))
def test_standalone_component_converts_and_round_trips(variants, tmp_path, case, ext):
    src = str(tmp_path / f"{case}{ext}")
    sd = _standalone(variants["lightning"], case, src)
    h5 = str(tmp_path / f"{case}.h5")
    summary = convert(src, h5)
    assert list(summary.plan.components) == CASES[case][2]
    assert summary.plan.unknown == []
    assert verify(h5) == []
    with LayoutReader(h5) as r:
        assert r.components() == CASES[case][2]
        assert r.attrs["variant"] == CASES[case][3]
    back = str(tmp_path / f"back{ext}")
    export(h5, back)
    with open_checkpoint(back) as out:
        ignored = set(summary.plan.ignored)
        assert set(out.keys()) == set(sd) - ignored
        for k in out.keys():
            assert torch.equal(out.tensor(k), sd[k]), k


def test_standalone_vae_parity_and_load(variants, tmp_path):
    src = str(tmp_path / "vae.safetensors")
    _standalone(variants["lightning"], "vae", src)
    h5 = str(tmp_path / "vae.h5")
    convert(src, h5)
    dec = load_model(h5, "decoder")
    with torch.inference_mode():
        img = dec(torch.randn(1, dec.config.z_channels, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert img.abs().mean() > 1e-3
    result = run_parity("decoder", src, h5=h5)
    assert result.report.passed and result.report.culprit is None
    assert len(result.report.layers) > 10


@pytest.mark.parametrize("case, component", [("vae_decoder", "decoder"), ("vae_encoder", "encoder")])
def test_one_vae_half_alone_loads_and_passes_parity(variants, tmp_path, case, component):
    src = str(tmp_path / f"{case}.safetensors")
    _standalone(variants["lightning"], case, src)
    h5, full = str(tmp_path / f"{case}.h5"), str(tmp_path / "full.h5")
    convert(src, h5)
    convert(variants["lightning"], full, components={component})
    with LayoutReader(h5) as a, LayoutReader(full) as b:
        assert a.config(component) == b.config(component)  # the half alone gives the same config
        for k in b.keys(component):
            assert torch.equal(a.tensor(component, k), b.tensor(component, k)), k
    result = run_parity(component, src, h5=h5)
    assert result.report.passed and result.report.culprit is None and len(result.report.layers) > 5


def test_vae_decoder_missing_a_key_is_named(variants, tmp_path):
    src = str(tmp_path / "dec.safetensors")
    sd = _standalone(variants["lightning"], "vae_decoder", src)
    del sd["decoder.up.0.block.1.conv2.weight"]
    save_file(sd, src)
    with pytest.raises(Exception, match="decoder.up.0.block.1.conv2.weight"):
        convert(src, str(tmp_path / "dec.h5"))
