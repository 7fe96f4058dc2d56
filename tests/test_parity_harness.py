"""The per-layer parity harness on the tiny fixtures: every component passes at fp32 with every layer
of the map reported, layers come in execution order, inputs are device-independent, fp16 passes its
own gate and not the fp32 one, and the `sdport parity` command writes its reports and exit codes."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import run_cli
from sdport.parity import harness
from sdport.parity.layers import layer_map
from sdport.parity.metrics import check, default_tolerance
from sdport.parity.report import ISOLATED

# component -> fixture variant it runs on
CASES = {"unet": "lightning", "text_model": "lightning", "encoder": "lightning", "decoder": "lightning",
         "vit_openai": "vit_openai", "vit_hf": "vit_hf", "unet_v2": "v2", "text_model_v2": "v2"}
# Pairs the map makes that no hook can observe, and why (anything else unobserved is a bug).
EXPECTED_UNPAIRED = {
    "text_model": {"embed.position"},  # native indexes position.weight; never calls the Embedding
    "vit_openai": {"layers.0.attn.out", "layers.1.attn.out"},  # nn.MultiheadAttention uses out_proj functionally
    "vit_hf": {"embed.position"},
    "text_model_v2": {"layers.0.attn.out", "layers.1.attn.out"},  # OpenCLIP's blocks are nn.MultiheadAttention
}


def _component(case: str) -> str:
    return "vit" if case.startswith("vit") else case.removesuffix("_v2")


@pytest.fixture(scope="module")
def fp32_results(variants, converted):
    out = {}
    for case, variant in CASES.items():
        component = _component(case)
        out[case] = harness.run_parity(component, variants[variant], h5=converted[variant])
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_every_component_passes_fp32_and_lists_every_layer(fp32_results, converted, case):
    result = fp32_results[case]
    rep = result.report
    assert rep.passed and rep.culprit is None, [l.failures for l in rep.layers if l.status == "fail"]
    assert set(rep.modes) == {"accumulated", "isolated"}
    # Both modes everywhere, except where the native model never calls the module (isolated only).
    partial = {l.native for l in rep.layers if set(l.metrics) != {"accumulated", "isolated"}}
    assert partial <= set(result.unpaired)
    assert all(set(l.metrics) == {"isolated"} for l in rep.layers if l.native in partial)

    component = _component(case)
    native, cfg, fmt = harness.load_native(converted[CASES[case]], component, "cpu", torch.float32)
    specs, covered = layer_map(component, cfg, fmt)
    reported = {l.native for l in rep.layers}
    # Every pair of the map is either reported or unobservable for a stated reason.
    assert reported | set(result.unpaired) == {harness.display(s.native) for s in specs}
    assert set(result.unpaired) == EXPECTED_UNPAIRED.get(case, set()), result.unpaired
    # Every native module that owns parameters is a layer, or an unobservable pair, or a block's tensor.
    for name, m in native.named_modules():
        own = [p for p, _ in m.named_parameters(recurse=False)]
        if own:
            keys = {f"{name}.{p}" if name else p for p in own}
            assert (harness.display(name) in reported or name in result.unpaired
                    or keys <= set(covered)), name


def test_unet_layer_map_comes_from_the_table(fp32_results):
    from sdport.convert import unet as cu
    from sdport.models.unet import UNetConfig

    cfg = UNetConfig.tiny()
    specs, covered = layer_map("unet", cfg)
    natives = {s.native for s in specs}
    assert {b.native for b in cu.blocks(cfg)} <= natives
    assert {r.native.rpartition(".")[0] for r in cu.rows(cfg)} <= natives
    assert covered == {}  # every UNet row pairs a module
    fused = {s.native: s.reference for s in specs if len(s.reference) > 1}
    assert fused["down.0.attn.0.blocks.0.attn1.qkv"] == tuple(
        f"input_blocks.1.1.transformer_blocks.0.attn1.to_{x}" for x in "qkv")
    assert fused["down.0.attn.0.blocks.0.attn2.kv"] == tuple(
        f"input_blocks.1.1.transformer_blocks.0.attn2.to_{x}" for x in "kv")
    # The fused layers are compared, not skipped: concatenated reference outputs, isolated exact.
    rep = fp32_results["unet"].report
    by_name = {l.native: l for l in rep.layers}
    assert by_name["down.0.attn.0.blocks.0.attn1.qkv"].shape == (2, 256, 96)
    assert by_name["down.0.attn.0.proj_in"].reference == "input_blocks.1.1.proj_in"
    assert by_name["down.0.attn.0.blocks.0.attn1.qkv"].reference == \
        "input_blocks.1.1.transformer_blocks.0.attn1.{to_q,to_k,to_v}"


def test_execution_order_children_before_parents(fp32_results):
    rep = fp32_results["unet"].report
    idx = {l.native: l.index for l in rep.layers}
    assert [l.index for l in rep.layers] == sorted(idx.values())
    assert idx["time_embed.linear_1"] < idx["time_embed"] < idx["conv_in"] < idx["down.0.res.0.norm1"]
    assert idx["down.0.res.0.conv2"] < idx["down.0.res.0"] < idx["down.0.attn.0.norm"]
    assert idx["down.0.attn.0.blocks.0.attn1"] < idx["down.0.attn.0.blocks.0"] < idx["down.0.attn.0"]
    assert idx["mid.res.1"] < idx["up.1.res.0"] < idx["up.0.res.0"] < idx["conv_out"]
    assert max(idx, key=idx.get) == "conv_out"


def test_report_records_inputs(fp32_results):
    d = fp32_results["unet"].to_dict()
    assert d["inputs"]["seed"] == 0
    assert "torch.Generator('cpu')" in d["inputs"]["generator"]
    assert [x["name"] for x in d["inputs"]["draws"]] == ["x", "t", "context"]
    assert d["inputs"]["draws"][0]["shape"] == [2, 4, 16, 16]
    assert d["device"] == "cpu" and d["dtype"] == "fp32" and "torch" in d["versions"]


# ------------------------------------------------------------------------------------- devices


def test_inputs_are_drawn_on_cpu_then_moved():
    from sdport.models.unet import UNetConfig

    a, desc = harness.draw_inputs("unet", UNetConfig.tiny(), seed=7)
    b, _ = harness.draw_inputs("unet", UNetConfig.tiny(), seed=7)
    c, _ = harness.draw_inputs("unet", UNetConfig.tiny(), seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["x"], c["x"])
    assert all(v.device.type == "cpu" for v in a.values())
    moved = harness.to_device(a, "meta")  # stands in for cuda: the same call moves them
    assert all(v.device.type == "meta" for v in moved.values())
    assert moved["t"].dtype == torch.int64 and moved["x"].dtype == torch.float32
    assert desc["timesteps"] == a["t"].tolist()


def test_native_loads_where_asked(converted):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU-like device warns about speed
        model, _, _ = harness.load_native(converted["lightning"], "unet", "meta", torch.float16)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float16)}


def test_cuda_refused_without_cuda_and_tf32_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(harness.ParityError, match="CUDA is not available"):
        harness.resolve_device("cuda")
    with pytest.raises(harness.ParityError, match="expected cpu or cuda"):
        harness.resolve_device("gpu0")
    torch.backends.cuda.matmul.allow_tf32 = True
    harness.deterministic()
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False


# ------------------------------------------------------------------------------------- dtypes


def test_fp16_native_passes_fp16_gate_and_fails_fp32_gate(variants, converted):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = harness.run_parity("unet", variants["lightning"], h5=converted["lightning"], dtype="fp16")
    rep = result.report
    assert rep.tolerance == default_tolerance("fp16")
    assert rep.passed, [(l.native, l.failures) for l in rep.layers if l.status == "fail"][:3]
    fp32 = default_tolerance("fp32")
    failing = [l.native for l in rep.layers if not check(l.metrics[ISOLATED], fp32)[0]]
    assert len(failing) > len(rep.layers) // 2  # fp16 rounding is visible almost everywhere
    # The error really is fp16-sized: far above fp32's, far below the fp16 bound.
    worst = max(l.metrics["accumulated"]["rel_l2"] for l in rep.layers)
    assert 1e-4 < worst < default_tolerance("fp16").rel_l2


# ------------------------------------------------------------------------------------- CLI


def test_cli_reports_and_exit_codes(variants, converted, tmp_path):
    ck, h5 = variants["lightning"], converted["lightning"]
    j, x, h = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.html"
    rc, out, err = run_cli("parity", "text_model", ck, "--h5", h5, "--json", j, "--junit", x, "--html", h)
    assert rc == 0, err
    assert "PASS" in out and "culprit: none" in out
    d = json.loads(j.read_text())
    assert d["culprit"] is None and d["component"] == "text_model"
    assert d["layers"][0]["native"] == "embed.token"
    assert {"index", "native", "reference", "shape", "metrics", "status"} <= set(d["layers"][0])
    assert set(d["layers"][0]["metrics"]["isolated"]) >= {"max_abs", "mean_abs", "rel_l2", "cosine",
                                                          "psnr_db", "sqnr_db"}
    assert list(d["unpaired"]) == ["embed.position"]
    assert d["unpaired"]["embed.position"].startswith("native module is not called as a module")
    assert x.read_text().count("<testcase") == len(d["layers"])
    assert "<svg" in h.read_text()

    # A tighter gate than fp32 noise fails: exit 1, culprit named.
    rc, out, _ = run_cli("parity", "text_model", ck, "--h5", h5, "--tol", "rel_l2=1e-12", "--mode", "accumulated")
    assert rc == 1 and "FAIL" in out and "culprit: #" in out
    # Bad input: exit 2 with one line.
    rc, _, err = run_cli("parity", "text_model", ck, "--h5", h5, "--tol", "bogus=1")
    assert rc == 2 and "unknown tolerance metric 'bogus'" in err
    rc, _, err = run_cli("parity", "unet", variants["vit_openai"])
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_demo_runs_from_another_directory(tmp_path):
    rc, out, err = run_cli("demo", "--out", tmp_path / "demo", cwd=tmp_path)
    assert rc == 0, err
    assert "PASS" in out and "culprit: none" in out
    for name in ("parity-unet.json", "parity-unet.html", "parity-unet.xml", "sd-tiny.h5"):
        assert (tmp_path / "demo" / name).exists()
        assert str(tmp_path / "demo" / name) in out or name == "sd-tiny.h5"


def test_every_compared_layer_carries_its_wall_time(fp32_results, tmp_path):
    """Each layer record holds the seconds its forward and comparisons took, and JUnit cases carry them."""
    import xml.etree.ElementTree as ET

    result = next(iter(fp32_results.values()))
    seconds = [layer.seconds for layer in result.report.layers]
    assert all(s is not None and s >= 0 for s in seconds) and sum(seconds) > 0
    path = tmp_path / "r.xml"
    result.report.to_junit(str(path))
    times = [float(c.get("time")) for c in ET.parse(path).iter("testcase") if c.get("time") is not None]
    assert len(times) == len(seconds) and sum(times) > 0
