"""ONNX: `sdport export --onnx` and `--port onnx:FILE.onnx` on the tiny fixtures (docs/onnx.md).

Three graphs pass (sdport's own export, ldm's UNet and diffusers' UNet exported here with torch.onnx);
faults planted in a graph are each named by node; an fp16 graph shows its per-node error, and a weight
scaled past fp16's range names the first node that produces inf.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import run_cli  # noqa: E402

SMALL = {"unet": 8, "decoder": 4, "encoder": 32, "text_model": None, "vit": None}  # fast inputs per component


def _run(component, ckpt, graph, modes=("accumulated", "isolated"), **kw):
    from sdport.parity.harness import run_parity

    return run_parity(component, ckpt, port=f"onnx:{graph}", batch=1, size=SMALL[component], modes=modes, **kw)


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
    """The lightning layout's components and the ViT's, exported by the command line at fp32."""
    out = tmp_path_factory.mktemp("onnx")
    code, stdout, err = run_cli("export", converted["lightning"], "--onnx", out / "sd")
    assert code == 0, err
    code, _, err = run_cli("export", converted["vit_openai"], "--onnx", out / "vit")
    assert code == 0, err
    return out


def _plant(src, dst, change):
    m = onnx.load(str(src))
    change(m.graph)
    onnx.save(m, str(dst))
    return dst


def _scale(name, factor, dtype=np.float32):
    from onnx import numpy_helper

    def change(g):
        i = next(i for i, t in enumerate(g.initializer) if t.name == name)
        a = numpy_helper.to_array(g.initializer[i]).astype(np.float32) * np.float32(factor)
        g.initializer[i].CopyFrom(numpy_helper.from_array(a.astype(dtype), name))
    return change


# ---------------------------------------------------------------------------------------------
# Export


def test_export_writes_checked_graphs_with_native_names_and_a_manifest(exported, converted):
    from sdport.models.load import load_model
    from sdport.models.storage.layout import file_sha256

    m = json.loads((exported / "sd" / "manifest.json").read_text())
    assert m["source_sha256"] == file_sha256(converted["lightning"]) and m["opset"] == 17 and m["dtype"] == "fp32"
    assert set(m["components"]) == {"unet", "text_model", "encoder", "decoder"}
    assert {"torch", "onnx", "onnxruntime"} <= set(m["versions"])
    want = {"unet": ["x", "t", "context"], "text_model": ["ids"], "encoder": ["image"], "decoder": ["latent"]}
    for name, c in m["components"].items():
        path = exported / "sd" / c["file"]
        onnx.checker.check_model(str(path))
        g = onnx.load(str(path)).graph
        assert [i.name for i in g.input] == want[name]
        assert c["ort_check"]["rel_l2_vs_native"] < 1e-4 and c["layout_checksums"]["datasets"] > 0
        assert c["external_data"] is None  # tiny graphs stay in one file
    g = onnx.load(str(exported / "sd" / "unet.onnx")).graph
    # Nodes are named by the native module's full path (down.0.res.0's first conv), initializers by
    # the layout keys.
    assert any(n.name == "down.0.res.0.conv1/Conv" for n in g.node)
    assert "down.0.res.0.conv1.weight" in {t.name for t in g.initializer}
    # Dynamic batch and spatial size: batch 3 at 16x16, not the 4x4 it was traced at.
    unet = load_model(converted["lightning"], "unet", packed=False)
    x, t, ctx = torch.randn(3, 4, 16, 16), torch.tensor([1, 500, 999]), torch.randn(3, 77, unet.config.context_dim)
    sess = ort.InferenceSession(str(exported / "sd" / "unet.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "context": ctx.numpy()})[0]
    with torch.no_grad():
        want_y = unet(x, t, ctx)
    assert float((torch.from_numpy(got) - want_y).norm() / want_y.norm()) < 1e-5


def test_every_weighted_node_names_a_native_module(exported, converted):
    from sdport.models.load import load_model

    for name in ("unet", "text_model", "encoder", "decoder"):
        modules = dict(load_model(converted["lightning"], name, packed=False).named_modules())
        g = onnx.load(str(exported / "sd" / f"{name}.onnx")).graph
        weighted = [n for n in g.node if n.op_type in ("Conv", "MatMul", "Gemm")]
        assert weighted and len({n.name for n in g.node}) == len(g.node)
        for n in weighted:
            module, _, op = n.name.rpartition("/")
            assert module in modules and op.split("_")[0] == n.op_type, (name, n.name)
        # A node reading a weight by its layout key is named by the module that holds it.
        inits = {t.name for t in g.initializer}
        for n in weighted:
            for t in n.input:
                if t in inits and t.endswith(".weight"):
                    assert t.removesuffix(".weight") == n.name.rpartition("/")[0], (name, n.name, t)


def test_export_refuses_bad_requests_in_one_line(converted, tmp_path):
    h5 = converted["lightning"]
    for args, says in (((h5, "--onnx", tmp_path / "a", "-o", tmp_path / "b.safetensors"), "not both"),
                       ((h5, "--onnx", tmp_path / "a", "--flat"), "--flat"),
                       ((h5, "-o", tmp_path / "b.safetensors", "--opset", "17"), "apply to --onnx"),
                       ((h5, "--onnx", tmp_path / "a", "--opset", "9"), "opsets 14 to 21"),
                       ((h5, "--onnx", tmp_path / "a", "--components", "vit"), "no /vit group"),
                       ((h5, "--onnx", tmp_path / "nowhere" / "a"), "does not exist")):
        code, _, err = run_cli("export", *args)
        assert code == 2 and says in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------
# Three graphs pass


@pytest.mark.parametrize("component", ["unet", "text_model", "encoder", "decoder", "vit"])
def test_sdports_own_graphs_pass_node_by_node(exported, variants, component):
    vit = component == "vit"
    r = _run(component, variants["vit_openai" if vit else "lightning"], exported / ("vit" if vit else "sd") / f"{component}.onnx")
    rep = r.report
    assert rep.passed and rep.culprit is None and rep.candidate == "port"
    c = rep.inputs["pairing_counts"]
    assert c["port_parameters_matched"] == c["port_parameters"]
    # Known: the text position table is sliced, not looked up; the ViT's ln_post norms the pooled token only.
    assert c["reference_layers"] - c["reference_layers_paired"] == {"text_model": 1, "vit": 1}.get(component, 0)
    if component == "text_model":
        assert "without a lookup" in r.unpaired["reference embeddings.position_embedding"]
    # The causal mask's -inf (added to the scores) is no inf/NaN finding.
    assert "first_nonfinite" not in rep.inputs and "inf/NaN" not in " ".join(l.note for l in rep.layers)
    # Isolated everywhere, the text embeddings too (fed the reference's token ids).
    assert all("isolated" in l.metrics for l in rep.layers)
    assert rep.layers[-1].native == "(model)"
    nodes = {n.name for n in onnx.load(str(exported / ("vit" if vit else "sd") / f"{component}.onnx")).graph.node}
    assert all(l.native.split(" [")[0] in nodes for l in rep.layers[:-1])  # ONNX node names


def _export_torch(module, path, cfg):
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, cfg.context_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x, t, c), str(path), dynamo=False, opset_version=17,
                          input_names=["sample", "timestep", "encoder_hidden_states"],
                          dynamic_axes={"sample": {0: "b"}, "timestep": {0: "b"}, "encoder_hidden_states": {0: "b"}})
    return path


def test_graphs_no_sdport_code_wrote_pass_ldm_and_diffusers_unets(variants, tmp_path):
    from sdport.parity.ports.diffusers import build
    from sdport.parity.reference.load import load_reference

    ckpt = variants["lightning"]
    ref, cfg, _ = load_reference("unet", ckpt)
    for name, module in (("ldm", ref), ("diffusers", build(ckpt, "unet"))):
        path = _export_torch(module, tmp_path / f"{name}.onnx", cfg)
        rep = _run("unet", ckpt, path).report
        c = rep.inputs["pairing_counts"]
        assert rep.passed, (name, rep.culprit)
        assert c["reference_layers_paired"] == c["reference_layers"], name
        assert len(rep.layers) > 100, name


# ---------------------------------------------------------------------------------------------
# Planted faults, each named by node


def _residual_add(g):
    n = next(n for n in g.node if n.name == "down.0.res.0/Add_1")  # down.0.res.0's `h + x`
    n.op_type = "Sub"


def _softmax_axis(g):
    n = next(n for n in g.node if n.name == "down.0.attn.0.blocks.0.attn1/Softmax")
    next(a for a in n.attribute if a.name == "axis").i = -2  # over the queries: a square score matrix still runs


@pytest.mark.parametrize("fault, change, region, node", [
    ("weight x 1.01", _scale("down.1.res.0.conv1.weight", 1.01), "input_blocks.3.0.in_layers.2", "down.1.res.0.conv1/Conv"),
    ("Softmax axis", _softmax_axis, "input_blocks.1.1.transformer_blocks.0.attn1",
     "down.0.attn.0.blocks.0.attn1/Softmax"),
])
def test_planted_faults_are_named_by_node(exported, variants, tmp_path, fault, change, region, node):
    bad = _plant(exported / "sd" / "unet.onnx", tmp_path / "bad.onnx", change)
    rep = _run("unet", variants["lightning"], bad, modes=("isolated",)).report
    c = rep.culprit
    assert not rep.passed and c is not None and c.mode == "isolated"
    assert c.reference == region, c.line()
    assert f"first node off the reference: {node}" in c.note, c.line()


def test_a_changed_token_table_is_the_isolated_culprit_of_the_text_graph(exported, variants, tmp_path):
    bad = _plant(exported / "sd" / "text_model.onnx", tmp_path / "bad.onnx", _scale("embed.token.weight", 1.01))
    rep = _run("text_model", variants["lightning"], bad).report
    c = rep.culprit
    assert not rep.passed and c is not None and c.mode == "isolated", c and c.line()
    assert c.reference == "embeddings.token_embedding" and c.native.startswith("embed.token/Gather"), c.line()
    # The encoder layers, fed the reference's inputs, pass in isolation.
    assert not any(l.failed("isolated") for l in rep.layers if l.reference.startswith("encoder.layers."))


def test_a_residual_add_turned_sub_is_named_by_the_cli_which_exits_1(exported, variants, tmp_path):
    bad = _plant(exported / "sd" / "unet.onnx", tmp_path / "bad.onnx", _residual_add)
    # Observed in segments of at most 600 KiB held (the culprit's cut is kept from its isolated run).
    code, out, err = run_cli("parity", "unet", variants["lightning"], "--port", f"onnx:{bad}", "--batch", "1",
                             "--size", "8", "--mode", "isolated", "--json", tmp_path / "r.json", "--onnx-memory", "600K")
    assert code == 1, err
    assert "culprit: #" in out and "first node off the reference: down.0.res.0/Add_1 (Sub)" in out
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["candidate"] == "port" and d["culprit"]["reference"] == "input_blocks.1.0"
    assert d["culprit"]["mode"] == "isolated" and d["culprit"]["native"].startswith("down.0.res.0/Add_1")


# ---------------------------------------------------------------------------------------------
# Memory: the observation run within a byte budget


def _rows(r):
    return [(l.native, l.reference, l.metrics, l.note) for l in r.report.layers], r.unpaired


@pytest.mark.parametrize("component, share", [("unet", 8), ("encoder", 4)])
def test_the_observation_run_holds_no_more_than_its_byte_budget(exported, variants, component, share):
    graph, ckpt = exported / "sd" / f"{component}.onnx", variants["lightning"]
    whole = _run(component, ckpt, graph)  # the default budget holds the tiny graph's tensors in one run
    o = whole.report.inputs["onnx_observation"]
    assert o["segments"] == 1 and o["peak_bytes"] >= o["observed_bytes"] > 0
    budget = o["observed_bytes"] // share
    part = _run(component, ckpt, graph, onnx_memory=budget)
    p = part.report.inputs["onnx_observation"]
    assert p["least_peak_bytes"] <= budget, p  # the tiny graph allows that share of its tensors at once
    assert p["peak_bytes"] <= budget and p["segments"] > 1, p
    assert _rows(part) == _rows(whole)  # the same report, observed in segments


def test_onnx_memory_is_checked_in_one_line(variants, exported):
    ckpt = variants["lightning"]
    for args, says in ((("--port", f"onnx:{exported / 'sd' / 'unet.onnx'}", "--onnx-memory", "lots"), "positive size"),
                       (("--port", f"onnx:{exported / 'sd' / 'unet.onnx'}", "--onnx-memory", "0"), "positive size"),
                       (("--onnx-memory", "1G"), "applies to --port onnx")):
        code, _, err = run_cli("parity", "unet", ckpt, *args)
        assert code == 2 and says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)


# ---------------------------------------------------------------------------------------------
# fp16


def test_every_component_exports_at_fp16_and_runs_in_onnx_runtime(converted, variants, tmp_path):
    from sdport.convert.onnx_export import example_inputs
    from sdport.models.load import read_config
    from sdport.models.storage.layout import LayoutReader
    from sdport.parity.metrics import default_tolerance

    for h5, out in ((converted["lightning"], tmp_path / "sd"), (converted["vit_openai"], tmp_path / "vit")):
        code, _, err = run_cli("export", h5, "--onnx", out, "--dtype", "fp16")
        assert code == 0, err
        m = json.loads((out / "manifest.json").read_text())
        with LayoutReader(h5) as reader:
            for name, c in m["components"].items():
                assert c["ort_check"]["rel_l2_vs_native"] < 2e-2, name
                sess = ort.InferenceSession(str(out / c["file"]), providers=["CPUExecutionProvider"])
                inputs, _ = example_inputs(name, read_config(reader, name))
                feed = {k: v.numpy().astype(np.float16) if v.is_floating_point() else v.numpy() for k, v in inputs.items()}
                assert all(i.type in ("tensor(float16)", "tensor(int64)") for i in sess.get_inputs()), name
                y = sess.run(None, feed)[0]
                assert y.dtype == np.float16 and np.isfinite(y).all(), name
    assert set(json.loads((tmp_path / "sd" / "manifest.json").read_text())["components"]) == {
        "unet", "text_model", "encoder", "decoder"}
    # The fp16 text encoder against the fp32 reference, layer by layer, under the fp16 gate.
    rep = _run("text_model", variants["lightning"], tmp_path / "sd" / "text_model.onnx",
               tolerance=default_tolerance("fp16")).report
    assert rep.passed
    errors = [l.metrics["accumulated"]["rel_l2"] for l in rep.layers]
    assert all(np.isfinite(errors)) and max(errors) > 1e-5


def test_fp16_graph_against_the_fp32_reference_per_node(converted, variants, tmp_path):
    code, _, err = run_cli("export", converted["lightning"], "--onnx", tmp_path, "--dtype", "fp16",
                           "--components", "decoder")
    assert code == 0, err
    g = onnx.load(str(tmp_path / "decoder.onnx")).graph
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    from sdport.parity.metrics import default_tolerance

    rep = _run("decoder", variants["lightning"], tmp_path / "decoder.onnx", tolerance=default_tolerance("fp16")).report
    assert rep.passed
    errors = [l.metrics["accumulated"]["rel_l2"] for l in rep.layers]
    assert all(np.isfinite(errors)) and max(errors) > 1e-4  # fp16's own error, layer by layer, not fp32's
    # Scaled past fp16's range: the first node producing inf is named.
    bad = _plant(tmp_path / "decoder.onnx", tmp_path / "inf.onnx", _scale("mid.res1.conv1.weight", 2e5, np.float16))
    rep = _run("decoder", variants["lightning"], bad, tolerance=default_tolerance("fp16")).report
    assert rep.inputs["first_nonfinite"].startswith("mid.res1.conv1/Conv (Conv)")
    assert "first node producing inf/NaN: mid.res1.conv1/Conv" in rep.culprit.note


# ---------------------------------------------------------------------------------------------
# Optimization levels and bad input


def test_optimization_level_lists_what_it_fuses_away(exported, variants):
    r = _run("unet", variants["lightning"], f"{exported / 'sd' / 'unet.onnx'}:all", modes=("accumulated",))
    assert r.report.passed and r.report.inputs["onnx_optimization"] == "all"
    gone = {k: v for k, v in r.unpaired.items() if k.endswith("at 'all'")}
    assert gone and all("fuse it away" in v for v in gone.values())
    assert r.report.inputs["onnx_not_observable_at_level"] == len(gone)


def test_bad_onnx_ports_get_one_line_and_exit_2(exported, variants, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    ckpt = variants["lightning"]
    for spec, says in ((f"onnx:{tmp_path / 'missing.onnx'}", "no such file"),
                       (f"onnx:{tmp_path / 'junk.onnx'}", "not an ONNX model"),
                       (f"onnx:{exported / 'sd' / 'decoder.onnx'}", "the graph takes 1 input")):
        code, _, err = run_cli("parity", "unet", ckpt, "--port", spec)
        assert code == 2 and says in err and "Traceback" not in err, (spec, err)


def test_only_the_onnx_modules_import_onnx_and_lazily():
    import ast

    from test_layering import REPO, _files, imports

    allowed = {os.path.join("convert", "onnx_export.py"), os.path.join("parity", "ports", "onnx.py"),
               os.path.join("parity", "ports", "onnx_graph.py"), os.path.join("parity", "ports", "onnx_stream.py")}
    for top in ("models", "convert", "parity", "cli.py"):
        for f in _files(top):
            rel = os.path.relpath(f, REPO)
            names = imports(f)
            if rel not in allowed:
                assert not any(n == p or n.startswith(p + ".") for n in names for p in ("onnx", "onnxruntime")), rel
                continue
            tree = ast.parse(open(f, encoding="utf-8").read())
            top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not any(a.name.startswith("onnx") for n in top_level for a in n.names if isinstance(n, ast.Import)), rel
