"""int8 weight-only quantization (models/quant.py, convert --quantize int8) and bf16 end to end.

Bounds, measured on the tiny fixtures (seed 0) and justified:
- Per-channel symmetric int8 rounds each weight by at most scale/2 = max|w_row| / 254. For weights
  spread evenly over [-a, a] that is a weight SQNR of 10 log10(4 * 127**2) = 48.1 dB. The tiny UNet's
  final output measured 48.9 dB PSNR (Apple's definition) against fp32, the text encoder 45.8, the
  VAE encoder 55.7 and decoder 50.0; we require 40 dB, above Apple's 35 dB gate. A wrong scale
  (x2), truncating instead of rounding, or a transposed scale axis all land far below it.
- bf16 keeps 8 significant bits (relative rounding <= 2**-9): measured 46.7-54.0 dB PSNR across the
  five components; we require 40 dB.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdport.convert.convert import convert
from sdport.models import quant
from sdport.models.errors import LayoutError
from sdport.models.storage.layout import LayoutReader, verify
from sdport.models.load import build, load_model
from sdport.parity.metrics import compare
from conftest import run_cli

PSNR_INT8_DB = 40.0
PSNR_BF16_DB = 40.0
SD_COMPONENTS = ("unet", "text_model", "encoder", "decoder")


def _inputs(component: str, cfg: dict, dtype=torch.float32):
    """Fixed inputs from a seeded CPU generator for one forward of `component`."""
    g = torch.Generator().manual_seed(0)
    if component == "unet":
        return (torch.randn(2, cfg["in_channels"], 16, 16, generator=g).to(dtype), torch.tensor([10, 500]),
                torch.randn(2, 77, cfg["context_dim"], generator=g).to(dtype))
    if component == "text_model":
        return (torch.randint(0, cfg["vocab_size"], (2, 77), generator=g),)
    if component == "encoder":
        return (torch.randn(2, cfg["in_channels"], 32, 32, generator=g).to(dtype),)
    if component == "decoder":
        return (torch.randn(2, cfg["embed_dim"], 8, 8, generator=g).to(dtype),)
    return (torch.randn(2, 3, cfg["image_size"], cfg["image_size"], generator=g).to(dtype),)  # vit


def _run(model, args):
    with torch.no_grad():
        out = model(*args)
    return out[0] if isinstance(out, tuple) else out  # the VAE encoder: (mean, logvar) -> mean


# --- the quantizer itself -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 48), (32, 16, 3, 3)])
def test_quantize_round_trip_bounds(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    w[3] = 0  # an all-zero output channel
    q, scale = quant.quantize(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == torch.float32 and scale.shape == (shape[0],)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    # The largest |w| of each non-zero channel lands exactly on +-127.
    rows = q.reshape(shape[0], -1).abs().amax(dim=1)
    assert torch.all(rows[torch.arange(shape[0]) != 3] == 127) and rows[3] == 0
    back = quant.dequantize(q, scale)
    bound = scale.view(-1, *[1] * (w.dim() - 1)) / 2 + 1e-7
    assert torch.all((back - w).abs() <= bound)
    assert torch.equal(back[3], w[3])
    assert compare(back, w)["sqnr_db"] > 35  # Gaussian rows: max ~3.5 sigma -> ~40 dB


def test_int8_modules_compute_with_the_dequantized_weight():
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.Flatten(2), nn.Identity())
    lin = nn.Linear(32, 24)
    x = torch.randn(2, 16, 8, 8)
    qconv = quant.quantize_model(nn.Sequential(*[m for m in float_model]).requires_grad_(False))[0]
    assert isinstance(qconv, quant.Int8Conv2d) and qconv.weight.dtype == torch.int8
    w = quant.dequantize(qconv.weight, qconv.weight_scale)
    assert torch.equal(qconv(x), F.conv2d(x, w, qconv.bias, 2, 1))
    holder = quant.quantize_model(nn.Sequential(lin).requires_grad_(False))
    ql = holder[0]
    y = torch.randn(5, 32)
    assert torch.equal(ql(y), F.linear(y, quant.dequantize(ql.weight, ql.weight_scale), ql.bias))
    assert not torch.equal(ql(y), lin(y))  # it is not the float layer
    qb = ql.to(torch.bfloat16)  # casts bias and scales; the int8 weight stays int8
    assert qb.weight.dtype == torch.int8 and qb(y.bfloat16()).dtype == torch.bfloat16


def test_quantizable_keeps_image_and_latent_convs_float():
    with torch.device("meta"):
        unet = build("unet", {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                              "attention_levels": [0], "num_heads": 2, "context_dim": 8})
    keys = quant.quantizable(unet)
    assert "conv_in.weight" not in keys and "conv_out.weight" not in keys
    assert "down.0.res.0.conv1.weight" in keys and "time_embed.linear_1.weight" in keys
    assert all(k.endswith(".weight") for k in keys)
    linears = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    assert all(f"{n}.weight" in keys for n in linears)
    with pytest.raises(KeyError, match="not the weight of a Linear or Conv2d"):
        quant.swap(unet, ["down.0.res.0.norm1.weight"])


# --- convert --quantize int8 -> verify -> load -> forward ------------------------------------------

@pytest.fixture(scope="module")
def int8_h5(variants, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "sd-int8.h5"
    rc, stdout, err = run_cli("convert", variants["lightning"], "-o", out, "--quantize", "int8",
                              "--quantize-components", ",".join(SD_COMPONENTS))
    assert rc == 0, err
    return str(out)


def test_quantized_layout(int8_h5):
    assert verify(int8_h5) == []
    with LayoutReader(int8_h5) as r:
        assert r.attrs["quantization"]["components"] == list(SD_COMPONENTS)
        qinfo = r.quantized("unet")
        assert qinfo and "conv_in.weight" not in qinfo
        key = "down.0.res.0.conv1.weight"
        a = r.dataset_attrs("unet", key)
        assert a["dtype"] == "int8" and r.f["unet"][key].dtype == np.int8
        assert a["quantization"] == {"scheme": "symmetric-per-channel", "bits": 8, "axis": 0, "qmin": -127,
                                     "qmax": 127, "scale": key + "_scale", "source_dtype": "float32"}
        s = r.dataset_attrs("unet", key + "_scale")
        assert s["dtype"] == "float32" and s["scale_of"] == key and s["sha256"]
        assert r.f["unet"][key + "_scale"].shape == (r.f["unet"][key].shape[0],)
        assert r.dataset_attrs("unet", "down.0.res.0.conv1.bias")["dtype"] == "float32"
    rc, out, err = run_cli("verify", int8_h5)
    assert rc == 0 and ": ok (layout version 1; /unet " in out, err


def test_verify_checks_scales_and_load_checks_scheme(int8_h5, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(open(int8_h5, "rb").read())
    with h5py.File(bad, "r+") as f:
        f["unet/down.0.res.0.conv1.weight_scale"][0] *= 2
    assert any("down.0.res.0.conv1.weight_scale: sha256 mismatch" in p for p in verify(str(bad)))
    with h5py.File(bad, "r+") as f:
        f["unet/down.0.res.0.conv1.weight"].attrs["quantization"] = '{"scheme": "asymmetric", "axis": 0}'
    with pytest.raises(LayoutError, match="down.0.res.0.conv1.weight: quantization scheme 'asymmetric'"):
        load_model(str(bad), "unet", device="meta")


def test_export_refuses_quantized(int8_h5, tmp_path):
    rc, _, err = run_cli("export", int8_h5, "-o", tmp_path / "back.safetensors")
    assert rc == 2 and "int8-quantized" in err and "bit for bit" in err
    assert not (tmp_path / "back.safetensors").exists()


@pytest.mark.parametrize("component", SD_COMPONENTS)
def test_int8_forward_error(int8_h5, converted, component):
    ref = load_model(converted["lightning"], component)
    m = load_model(int8_h5, component)
    n_int8 = sum(isinstance(x, (quant.Int8Linear, quant.Int8Conv2d)) for x in m.modules())
    assert n_int8 == len(LayoutReader(int8_h5).quantized(component)) > 0
    assert quant.weight_bytes(m) < quant.weight_bytes(ref)
    with LayoutReader(int8_h5) as r:
        args = _inputs(component, r.config(component))
    a, r_ = _run(m, args), _run(ref, args)
    assert not torch.equal(a, r_)  # quantization happened
    metrics = compare(a, r_)
    assert metrics["psnr_db"] > PSNR_INT8_DB, metrics


def test_int8_unet_weight_bytes_and_bf16_compute(int8_h5, converted):
    ref = load_model(converted["lightning"], "unet")
    m = load_model(int8_h5, "unet")
    q = {n: t for n, t in m.state_dict().items()}
    f32 = ref.state_dict()
    # int8 weights: 1 byte per element plus a float32 scale per output channel; the rest as before.
    expect = sum(t.numel() * (1 if q[k].dtype == torch.int8 else 4) for k, t in f32.items())
    expect += sum(t.numel() * 4 for k, t in q.items() if k.endswith(quant.SCALE_SUFFIX))
    assert quant.weight_bytes(m) == expect
    mb = load_model(int8_h5, "unet", dtype="bf16")
    assert mb.down[0].res[0].conv1.weight.dtype == torch.int8 and mb.down[0].res[0].conv1.bias.dtype == torch.bfloat16
    with LayoutReader(int8_h5) as r:
        args = _inputs("unet", r.config("unet"))
    out = _run(mb, args)
    assert out.dtype == torch.bfloat16 and compare(out, _run(ref, args))["psnr_db"] > PSNR_BF16_DB - 5


def test_quant_report_per_layer(int8_h5, converted):
    from sdport.parity.quant import quant_report

    ref = load_model(converted["lightning"], "unet")
    m = load_model(int8_h5, "unet")
    with LayoutReader(int8_h5) as r:
        args = _inputs("unet", r.config("unet"))
        n = len(r.quantized("unet"))
    rep = quant_report(ref, m, args, component="unet", input_info={"seed": 0})
    assert rep.dtype == "int8" and len(rep.layers) == n + 1 and rep.layers[-1].native == "output"
    for layer in rep.layers[:-1]:
        iso, acc = layer.metrics["isolated"], layer.metrics["accumulated"]
        assert 0 < iso["sqnr_db"] < 100 and iso["psnr_db"] > PSNR_INT8_DB  # each layer's own weight error
        assert acc["psnr_db"] < iso["psnr_db"] + 20
    assert rep.layers[-1].metrics["accumulated"]["psnr_db"] > PSNR_INT8_DB
    assert rep.passed


def test_quantize_default_components_and_dtype(variants, tmp_path):
    s = convert(variants["lightning"], str(tmp_path / "q.h5"), quantize="int8")
    with LayoutReader(s.out) as r:
        assert r.attrs["dtype_policy"] == "keep" and r.attrs["quantization"]["components"] == ["unet"]
        assert r.quantized("unet") and not r.quantized("text_model") and not r.quantized("decoder")
    with pytest.raises(Exception, match="--quantize int4"):
        convert(variants["lightning"], str(tmp_path / "x.h5"), quantize="int4")


# --- bf16 end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,components", [("lightning", SD_COMPONENTS), ("vit_openai", ("vit",))])
def test_bf16_convert_load_forward(variants, converted, tmp_path, variant, components):
    out = tmp_path / "bf16.h5"
    rc, _, err = run_cli("convert", variants[variant], "-o", out, "--dtype", "bf16")
    assert rc == 0, err
    rc, _, err = run_cli("verify", out)
    assert rc == 0, err
    with LayoutReader(str(out)) as r:
        assert r.attrs["dtype_policy"] == "bf16"
        for comp in components:
            key = r.keys(comp)[0]
            assert r.dataset_attrs(comp, key)["dtype"] == "bfloat16" and r.f[comp][key].dtype == np.uint16
    for comp in components:
        m = load_model(str(out), comp)
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
        ref = load_model(converted[variant], comp)
        with LayoutReader(str(out)) as r:
            cfg = r.config(comp)
        a = _run(m, _inputs(comp, cfg, torch.bfloat16))
        assert a.dtype == torch.bfloat16
        metrics = compare(a, _run(ref, _inputs(comp, cfg)))
        assert metrics["psnr_db"] > PSNR_BF16_DB, (comp, metrics)


def test_parity_unet_on_an_int8_layout_uses_the_int8_gate(int8_h5, variants, tmp_path):
    import json

    from click.testing import CliRunner

    from sdport.cli import main
    from sdport.parity.metrics import DEFAULT_TOLERANCES

    js = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["parity", "unet", variants["lightning"], "--h5", int8_h5, "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "gate: int8 defaults" in r.stdout and "PASS" in r.stdout
    d = json.loads(js.read_text())
    assert d["tolerance"]["rel_l2"] == DEFAULT_TOLERANCES["int8"].rel_l2 and d["passed"]
    # each layer's own error is within the int8 gate, and the worst is far outside the fp32 one
    iso = [l["metrics"]["isolated"]["rel_l2"] for l in d["layers"]]
    assert max(iso) <= DEFAULT_TOLERANCES["int8"].rel_l2 and max(iso) > DEFAULT_TOLERANCES["fp32"].rel_l2
    # asked for, the fp32 gate still fails it
    r = CliRunner().invoke(main, ["parity", "unet", variants["lightning"], "--h5", int8_h5, "--gate", "fp32"])
    assert r.exit_code == 1 and "gate: int8" not in r.stdout and "FAIL" in r.stdout
