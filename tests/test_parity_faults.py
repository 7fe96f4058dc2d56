"""Planted faults are caught and localised: in isolated mode the culprit is exactly the planted layer
and the gate fails. Faults go into a copy of the converted file (weights) or into the loaded native
model (a module's epsilon, an attention without its scale), across four components."""
from __future__ import annotations

import shutil
import types

import h5py
import pytest
import torch.nn.functional as F

from sdport.parity import harness


def _scale(key, factor=1.01):
    def edit(g):
        g[key][...] = g[key][...] * factor
    return edit


def _swap(a, b):
    def edit(g):
        x, y = g[a][...], g[b][...]
        g[a][...], g[b][...] = y, x
    return edit


def _transpose(key):
    def edit(g):
        g[key][...] = g[key][...].T
    return edit


def _eps(name, eps):
    def patch(model):
        model.get_submodule(name).eps = eps
    return patch


def _no_attention_scale(name):
    """The UNet self-attention with softmax(q k^T) instead of softmax(q k^T / sqrt(d))."""
    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.out(o.transpose(1, 2).reshape(b, n, c))

    def patch(model):
        m = model.get_submodule(name)
        m.forward = types.MethodType(forward, m)
    return patch


# (component, variant, h5 edit, native patch, the planted layer; a swap also breaks its partner)
FAULTS = {
    "unet-weight-scaled-1.01": ("unet", "lightning", _scale("down.0.res.0.conv1.weight"), None,
                                "down.0.res.0.conv1"),
    "unet-attention-scale-dropped": ("unet", "lightning", None,
                                     _no_attention_scale("up.0.attn.1.blocks.0.attn1"),
                                     "up.0.attn.1.blocks.0.attn1"),
    "text-norms-swapped": ("text_model", "lightning", _swap("layers.1.norm1.weight", "layers.1.norm2.weight"),
                           None, "layers.1.norm1"),
    "decoder-groupnorm-eps": ("decoder", "lightning", None, _eps("up.1.res.0.norm2", 1e-3), "up.1.res.0.norm2"),
    "encoder-shortcut-scaled-1.01": ("encoder", "lightning", _scale("down.1.res.0.shortcut.weight"), None,
                                     "down.1.res.0.shortcut"),
    "vit-projection-transposed": ("vit", "vit_hf", _transpose("layers.1.attn.out.weight"), None,
                                  "layers.1.attn.out"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_planted_fault_is_the_culprit(variants, converted, tmp_path, fault):
    component, variant, edit, patch, planted = FAULTS[fault]
    h5 = converted[variant]
    if edit is not None:
        h5 = str(tmp_path / "planted.h5")
        shutil.copy(converted[variant], h5)
        with h5py.File(h5, "r+") as f:
            edit(f[component])
    result = harness.run_parity(component, variants[variant], h5=h5, modes=("isolated",), patch_native=patch)
    rep = result.report
    assert not rep.passed
    assert rep.culprit is not None and rep.culprit.mode == "isolated"
    assert rep.culprit.native == planted, rep.culprit.line()
    assert rep.culprit.reference  # the reference module is named too
    # Only the planted layers and the blocks that contain them fail in isolation.
    touched = {planted} | ({"layers.1.norm2"} if fault == "text-norms-swapped" else set())
    failing = [l.native for l in rep.layers if l.failed("isolated")]
    assert all(any(t == f or t.startswith(f + ".") for t in touched) for f in failing), failing


def test_unplanted_copy_passes(variants, converted, tmp_path):
    """The copy-and-edit path itself changes nothing: the same edit with factor 1 passes."""
    h5 = str(tmp_path / "copy.h5")
    shutil.copy(converted["lightning"], h5)
    with h5py.File(h5, "r+") as f:
        _scale("layers.0.norm1.weight", 1.0)(f["text_model"])
    result = harness.run_parity("text_model", variants["lightning"], h5=h5, modes=("isolated",))
    assert result.report.passed and result.report.culprit is None
