"""Checking ports that sdport did not write: diffusers' models, a `torch:` port with planted faults, a
schema-2 dump written with h5py and numpy alone, sdport's own native model seen as a third-party port
(fused q/k/v, linear projections on tokens), an fp16 port. Pairing is derived from the weights."""
from __future__ import annotations

import json
import textwrap

import h5py
import numpy as np
import pytest
import torch

from sdport.parity import harness

from conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PORT_FILE = textwrap.dedent('''
    """A diffusers-based port with one fault per function (the fault tests of sdport)."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from sdport.parity.ports.diffusers import build as diffusers_build


    def clean(checkpoint, component):
        return diffusers_build(checkpoint, component)


    def _block(m):
        return m.down_blocks[0].attentions[0].transformer_blocks[0]


    def attention_scale(checkpoint, component):
        m = clean(checkpoint, component)
        a = _block(m).attn1
        a.set_processor(AttnProcessor())  # the processor that reads attn.scale
        a.scale = a.scale * 2
        return m


    def groupnorm_eps(checkpoint, component):
        m = clean(checkpoint, component)
        m.down_blocks[1].resnets[0].norm1.eps = 0.5
        return m


    def kv_swapped(checkpoint, component):
        m = clean(checkpoint, component)
        a = _block(m).attn2
        with torch.no_grad():
            k, v = a.to_k.weight.clone(), a.to_v.weight.clone()
            a.to_k.weight.copy_(v)
            a.to_v.weight.copy_(k)
        return m


    def transposed(checkpoint, component):
        m = clean(checkpoint, component)
        w = _block(m).attn1.to_q.weight
        with torch.no_grad():
            w.copy_(w.t().clone())
        return m


    def fp16(checkpoint, component):
        return clean(checkpoint, component).half()


    def native(checkpoint, component):
        """sdport's own native model, as anyone's PyTorch rewrite: fused q/k/v, linear proj_in."""
        import os, tempfile
        from sdport.convert.convert import convert
        from sdport.models.load import load_model
        out = convert(checkpoint, os.path.join(tempfile.mkdtemp(), "m.h5"), components={component}).out
        return load_model(out, component)


    def not_a_module(checkpoint, component):
        return "a string"


    def raises(checkpoint, component):
        raise RuntimeError("this port cannot load " + component)
''')


@pytest.fixture(scope="module")
def port_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("port") / "myport.py"
    p.write_text(PORT_FILE)
    return str(p)


def _rows(result):
    return {l.native: l for l in result.report.layers}


@pytest.mark.parametrize("component, variant", [("unet", "lightning"), ("text_model", "lightning"),
                                                ("encoder", "lightning"), ("decoder", "lightning"),
                                                ("vit", "vit_openai")])
def test_diffusers_port_passes_with_every_reference_layer_paired(variants, component, variant):
    r = harness.run_parity(component, variants[variant], port="diffusers", batch=1)
    rep = r.report
    assert rep.candidate == "port" and rep.passed, rep.culprit
    c = rep.inputs["pairing_counts"]
    assert c["reference_layers"] > 10 and c["reference_layers_paired"] == c["reference_layers"]
    assert c["port_parameters_matched"] == c["port_parameters"]
    rows = _rows(r)
    model = rows["(model)"]
    assert model.metrics["accumulated"]["rel_l2"] < 1e-5 and model.metrics["accumulated"]["max_abs"] > 0 or \
        model.metrics["accumulated"]["rel_l2"] == 0.0
    # The output is not trivially zero: the comparison means something.
    assert all("isolated" in l.metrics for l in rep.layers)
    expected = {"unet": "down_blocks.0.resnets.0.norm1", "text_model": "encoder.layers.0.self_attn.q_proj",
                "encoder": "encoder.down_blocks.0.resnets.0.conv1", "decoder": "decoder.up_blocks.0.resnets.0.norm1",
                "vit": "vision_model.encoder.layers.0.mlp.fc1"}[component]
    assert expected in rows  # the port's own module names


FAULTS = [
    ("attention_scale", "down_blocks.0.attentions.0.transformer_blocks.0.attn1", None),
    ("groupnorm_eps", "down_blocks.1.resnets.0.norm1", None),
    ("kv_swapped", "down_blocks.0.attentions.0.transformer_blocks.0.attn2", "port to_k holds the reference's to_v"),
    ("transposed", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "only through a transpose"),
]


@pytest.mark.parametrize("func, culprit, finding", FAULTS, ids=[f[0] for f in FAULTS])
def test_planted_fault_in_a_torch_port_is_named_by_the_ports_module(variants, port_file, func, culprit, finding):
    r = harness.run_parity("unet", variants["lightning"], port=f"torch:{port_file}:{func}", batch=1,
                           modes=("accumulated", "isolated"))
    c = r.report.culprit
    assert c is not None and c.mode == "isolated" and c.native == culprit, c
    assert not r.report.passed
    if finding:
        assert finding in c.note and finding in _rows(r)[culprit].note


def test_unmodified_torch_port_passes_and_reports_in_every_format(variants, port_file, tmp_path):
    code, out, err = run_cli("parity", "unet", variants["lightning"], "--port", f"torch:{port_file}:clean",
                             "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml", "--html", tmp_path / "r.html")
    assert code == 0, err
    assert "PASS" in out and "pairing from the weights: " in out and "(100%)" in out
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["candidate"] == "port" and d["passed"]
    assert any(l["native"] == "down_blocks.0.resnets.0.norm1" and l["reference"] == "input_blocks.1.0.in_layers.0"
               for l in d["layers"])
    assert "input_blocks.1.0.in_layers" in " ".join(d["unpaired"])  # a reference Sequential no port module mirrors
    assert "down_blocks.0.resnets.0.norm1" in (tmp_path / "r.xml").read_text()
    assert "<th>port</th>" in (tmp_path / "r.html").read_text()


def test_native_model_as_a_third_party_port_pairs_fused_and_token_layers(variants, port_file):
    r = harness.run_parity("unet", variants["lightning"], port=f"torch:{port_file}:native", batch=1)
    assert r.report.passed, r.report.culprit
    rows = _rows(r)
    qkv = rows["down.0.attn.0.blocks.0.attn1.qkv"]
    assert qkv.reference == "input_blocks.1.1.transformer_blocks.0.attn1.{to_q,to_k,to_v}"
    assert rows["down.0.attn.0.blocks.0.attn2.kv"].reference.endswith("attn2.{to_k,to_v}")
    # The native proj_in is a linear on tokens; the reference's a 1x1 conv on NCHW: compared in NCHW.
    p = rows["down.0.attn.0.proj_in"]
    assert p.reference == "input_blocks.1.1.proj_in" and len(p.shape) == 4
    assert p.metrics["isolated"]["rel_l2"] < 1e-5


def test_sd2_unet_and_openclip_text_ports(variants, port_file):
    """SD 2.x: diffusers' UNet with linear projections and 64-wide heads; the OpenCLIP text tower
    (which the reference runs sequence-first) through a torch: port, compared batch-first."""
    r = harness.run_parity("unet", variants["v2"], port="diffusers", batch=1)
    assert r.report.passed and "(100%)" in r.report.inputs["pairing"], r.report.culprit
    assert any(l.native.endswith("proj_in") and len(l.shape) == 3 for l in r.report.layers)  # a linear on tokens
    t = harness.run_parity("text_model", variants["v2"], port=f"torch:{port_file}:native", batch=1)
    assert t.report.passed and "(100%)" in t.report.inputs["pairing"], t.report.culprit
    code, out, err = run_cli("parity", "text_model", variants["v2"], "--port", "diffusers")
    assert code == 2 and "openclip text encoder is not built" in err


def test_fp16_diffusers_port_passes_the_fp16_gate(variants, port_file):
    r = harness.run_parity("unet", variants["lightning"], port=f"torch:{port_file}:fp16", batch=1, dtype="fp16")
    assert r.report.passed, r.report.culprit
    worst = max(l.metrics["accumulated"]["rel_l2"] for l in r.report.layers)
    assert 1e-5 < worst < 1e-2  # fp16 rounding is visible and within the fp16 gate


# --------------------------------------------------------------------------------------------- dumps

# diffusers module -> reference module, for the layers this dump holds (a partial dump).
DUMP_LAYERS = {
    "conv_in": "input_blocks.0.0",
    "down_blocks.0.resnets.0.norm1": "input_blocks.1.0.in_layers.0",
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1": "input_blocks.1.1.transformer_blocks.0.attn1",
    "down_blocks.0.attentions.0": "input_blocks.1.1",
    "mid_block.resnets.0": "middle_block.0",
    "up_blocks.1.resnets.0": "output_blocks.2.0",
    "conv_out": "out.2",
}


def _write_dump_from_the_doc(path, model, perturb=None):
    """A schema-2 dump as docs/golden.md describes it, written with h5py and numpy alone (the model is
    run with plain torch hooks; nothing of sdport is imported to write the file)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    t = np.array([321], dtype=np.int64)
    ctx = rng.standard_normal((1, 77, model.config.cross_attention_dim)).astype(np.float32)
    acts = []
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: acts.append((n, o)))
               for n in DUMP_LAYERS]
    with torch.no_grad():
        y = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx))
    for h in handles:
        h.remove()
    with h5py.File(path, "w", track_order=True) as f:
        f.attrs.update({"format": "sdport.activations", "format_version": 2, "mode": "full",
                        "component": "unet", "producer": "a test's own runtime", "dtype": "fp32"})
        inputs = f.create_group("inputs")
        for name, a in (("x", x), ("t", t), ("context", ctx)):
            inputs.create_dataset(name, data=a).attrs["dtype"] = str(a.dtype)
        layers = f.create_group("layers", track_order=True)
        for i, (port_name, out) in enumerate(acts + [("(model)", y)]):
            out = out[0] if isinstance(out, tuple) else out  # diffusers blocks return (hidden_states,)
            a = out.detach().numpy().astype(np.float32)
            if port_name == perturb:
                a = a * np.float32(1 + 1e-3)
            ds = layers.create_dataset(f"{i:05d}", data=a)
            ds.attrs.update({"name": DUMP_LAYERS.get(port_name, ""), "port_name": port_name,
                             "shape": list(a.shape)})


@pytest.mark.parametrize("perturb", [None, "down_blocks.0.resnets.0"])
def test_schema2_dump_written_with_h5py_alone(variants, tmp_path, perturb):
    from sdport.parity.ports.diffusers import build

    path = tmp_path / "dump.h5"
    _write_dump_from_the_doc(path, build(variants["lightning"], "unet"), perturb)
    code, out, err = run_cli("parity", "unet", variants["lightning"], "--port", f"dump:{path}", "--mode",
                             "accumulated", "--json", tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    assert len(d["layers"]) == len(DUMP_LAYERS) + 1
    assert d["inputs"]["reference_layers_missing_from_dump"] > 50  # a partial dump: listed, not an error
    if perturb is None:
        assert code == 0, out + err
    else:
        assert code == 1 and d["culprit"]["native"] == perturb
        assert d["culprit"]["reference"] == DUMP_LAYERS[perturb] and d["culprit"]["mode"] == "accumulated"


def test_schema1_dump_is_refused_as_a_port(variants, tmp_path):
    golden = tmp_path / "g.h5"
    harness.record("decoder", variants["lightning"], str(golden), batch=1)
    code, out, err = run_cli("parity", "decoder", variants["lightning"], "--port", f"dump:{golden}")
    assert code == 2 and "schema-1 dump" in err and "Traceback" not in err


@pytest.mark.parametrize("spec, message", [
    ("onnx-ish", "expected diffusers, torch:FILE.py:FUNC"),
    ("torch:/nonexistent/port.py:build", "no such file"),
    ("torch:{port}:missing", "has no function missing"),
    ("torch:{port}:not_a_module", "returned str, expected a torch.nn.Module"),
    ("torch:{port}:raises", "raised RuntimeError: this port cannot load decoder"),
    ("torch:no_such_package.mod:build", "cannot import no_such_package.mod"),
])
def test_bad_port_specs_get_one_line(variants, port_file, spec, message):
    code, out, err = run_cli("parity", "decoder", variants["lightning"], "--port", spec.format(port=port_file))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_h5_and_port_together_are_refused(variants, converted):
    code, out, err = run_cli("parity", "decoder", variants["lightning"], "--port", "diffusers", "--h5",
                             converted["lightning"])
    assert code == 2 and "--h5" in err and len(err.strip().splitlines()) == 1
