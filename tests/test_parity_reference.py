"""The parity reference is built with its parameters on the meta device and takes the checkpoint's
tensors as they are: it must equal a reference built normally (random init) and then loaded by copy,
buffers computed in __init__ (transformers' position_ids) included."""
from __future__ import annotations

import pytest
import torch

from sdport.convert.checkpoint import open_checkpoint
from sdport.convert.detect import plan
from sdport.parity import harness
from sdport.parity.components import entry

# (component, fixture variant): every reference builder, and checkpoints that carry position_ids / EMA.
CASES = [("unet", "lightning"), ("text_model", "lightning"), ("encoder", "lightning"), ("decoder", "lightning"),
         ("text_model", "position_ids"), ("unet", "ema"), ("vit", "vit_openai"), ("vit", "vit_hf"),
         ("unet", "v2"), ("text_model", "v2")]


def _copied_reference(component, path):
    """The reference built with its own (random) init, then loaded by copy: what assign=True replaces."""
    with open_checkpoint(path) as ckpt:
        cp = plan(ckpt, components={component}).components[component]
        sd = {s: ckpt.tensor(cp.key_of[s]).float() for r in cp.rows for s in r.sources}
    model = entry(component).reference_builder(cp.source_format)(cp.config)
    model.load_state_dict(sd, strict=False)
    return model.float().eval()


@pytest.mark.parametrize("component,variant", CASES)
def test_reference_on_meta_equals_reference_loaded_by_copy(variants, component, variant):
    ref, _, _ = harness.load_reference(component, variants[variant])
    tensors = dict(ref.state_dict(keep_vars=True))
    tensors.update(dict(ref.named_buffers()))  # non-persistent buffers too
    assert not [n for n, t in tensors.items() if t.is_meta]
    assert not any(p.requires_grad for p in ref.parameters())

    want = _copied_reference(component, variants[variant])
    want_tensors = dict(want.state_dict())
    want_tensors.update(dict(want.named_buffers()))
    for name, t in tensors.items():
        assert torch.equal(t, want_tensors[name]), name
    if component in ("encoder", "decoder"):
        other = "decoder" if component == "encoder" else "encoder"
        assert getattr(ref, other) is None  # the unloaded half is dropped, not left on meta
    else:
        assert set(tensors) == set(want_tensors)
    if variant == "v2" and component == "text_model":  # FrozenOpenCLIPText's causal mask is built, not loaded
        assert torch.equal(tensors["attn_mask"], torch.full((77, 77), float("-inf")).triu(1))
    ids = [t for n, t in tensors.items() if n.endswith("position_ids")]
    if (component == "text_model" and variant != "v2") or variant == "vit_hf":
        assert len(ids) == 1 and torch.equal(ids[0][0], torch.arange(ids[0].shape[1]))


def test_parameters_on_meta_keeps_buffers_and_restores_modules():
    register = torch.nn.Module.register_parameter
    with harness.parameters_on_meta():
        lin = torch.nn.Linear(3, 4)
        bn = torch.nn.BatchNorm1d(4)
    assert torch.nn.Module.register_parameter is register
    assert lin.weight.is_meta and lin.bias.is_meta and isinstance(lin.weight, torch.nn.Parameter)
    assert not bn.running_var.is_meta and torch.equal(bn.running_var, torch.ones(4))
    assert not torch.nn.Linear(3, 4).weight.is_meta


def test_missing_weights_are_refused(variants, monkeypatch):
    """A reference tensor the checkpoint does not fill would stay on meta: refused by name."""
    decoder = entry("decoder")
    real = decoder.reference_builder

    def with_extra(fmt):
        def build(cfg):
            m = real(fmt)(cfg)
            m.extra = torch.nn.Linear(2, 2)  # built under parameters_on_meta: meta, in no checkpoint
            return m
        return build

    monkeypatch.setattr(decoder, "reference_builder", with_extra)
    with pytest.raises(harness.ParityError, match=r"missing \['extra.weight'"):
        harness.load_reference("decoder", variants["lightning"])
