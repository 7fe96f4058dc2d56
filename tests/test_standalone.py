"""Files that hold one component alone, with the CompVis prefix stripped: a standalone VAE (as the
fine-tuned SD VAEs ship), an extracted UNet, a transformers CLIPTextModel state dict (`text_model.*`)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdport.convert.checkpoint import open_checkpoint
from sdport.convert.convert import convert, export
from sdport.models.layout import LayoutReader, verify
from sdport.models.load import load_model
from sdport.parity.harness import run_parity

CASES = {
    # name: (CompVis prefix to strip, prefix it gets instead, components expected, variant recorded)
    "vae": ("first_stage_model.", "", ["encoder", "decoder"], "partial"),
    "unet": ("model.diffusion_model.", "", ["unet"], "txt2img"),  # the UNet alone says txt2img or inpainting
    "text": ("cond_stage_model.transformer.", "", ["text_model"], "partial"),
}


def _standalone(src: str, case: str, path: str) -> dict:
    strip, put = CASES[case][:2]
    with open_checkpoint(src) as ck:
        sd = {put + k[len(strip):]: ck.tensor(k).clone() for k in ck.keys() if k.startswith(strip)}
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
