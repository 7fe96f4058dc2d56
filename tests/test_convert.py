"""Conversion end to end on every fixture variant: inspect, convert, verify, export bit-exact, and the
native models loaded from the .h5 alone computing what the reference computes from the checkpoint."""
from __future__ import annotations

import json
import os
import warnings

import h5py
import pytest
import torch

from sdport.convert.checkpoint import open_checkpoint
from sdport.convert.convert import convert, export
from sdport.fixtures import malicious
from sdport.models.storage.layout import LayoutReader, verify
from sdport.models.load import load_model
from conftest import REPO, run_cli

SD = ["lightning", "flat", "safetensors", "fp16", "ema", "position_ids", "inpaint", "callback",
      "v2", "v2_inpaint", "v2_depth"]

EXPECT = {  # variant -> (container, wrapper, dtype, in_channels, ema)
    "lightning": ("torch-zip", "lightning", "float32", 4, False),
    "flat": ("torch-zip", "flat", "float32", 4, False),
    "safetensors": ("safetensors", "safetensors", "float32", 4, False),
    "fp16": ("torch-zip", "lightning", "float16", 4, False),
    "ema": ("torch-zip", "lightning", "float32", 4, True),
    "position_ids": ("torch-zip", "lightning", "float32", 4, False),
    "inpaint": ("torch-zip", "lightning", "float32", 9, False),
    "callback": ("torch-zip", "lightning", "float32", 4, False),
    "v2": ("torch-zip", "lightning", "float32", 4, False),
    "v2_inpaint": ("torch-zip", "lightning", "float32", 9, False),
    "v2_depth": ("torch-zip", "lightning", "float32", 5, False),
}


@pytest.mark.parametrize("variant", SD)
def test_inspect_json(variants, variant):
    rc, out, err = run_cli("inspect", "--json", variants[variant])
    assert rc == 0, err
    info = json.loads(out)
    container, wrapper, dtype, in_ch, ema = EXPECT[variant]
    assert info["container"] == container and info["wrapper"] == wrapper
    assert max(info["dtypes"], key=info["dtypes"].get) == dtype
    assert info["unet_in_channels"] == in_ch
    assert info["variant"] == {9: "inpainting", 5: "depth"}.get(in_ch, "txt2img")
    assert info["family"] == ("sd-v2" if variant.startswith("v2") else "sd-v1")
    assert info["ema"] is ema
    assert set(info["components"]) >= {"unet", "text_model", "encoder", "decoder", "schedule"}
    assert info["unknown_keys"] == []
    if variant == "position_ids":
        assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in info["ignored"]
    if variant.startswith("v2"):  # the OpenCLIP text tower; its contrastive head is listed, not converted
        assert info["configs"]["text_model"]["layer"] == "penultimate" and info["configs"]["text_model"]["pad_id"] == 0
        assert info["configs"]["unet"]["num_head_channels"] == 16 and info["configs"]["unet"]["use_linear_in_transformer"]
        assert {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} <= set(info["ignored"])
    depth = {k: r for k, r in info["ignored"].items() if k.startswith("depth_model.")}
    assert (len(depth) == 4 and all("MiDaS" in r for r in depth.values())) if variant == "v2_depth" else not depth


@pytest.mark.parametrize("variant", ["vit_openai", "vit_hf", "vit_compvis", "vit_torchscript"])
def test_inspect_vit(variants, variant):
    rc, out, _ = run_cli("inspect", "--json", variants[variant])
    info = json.loads(out)
    assert rc == 0 and info["family"] == "clip-vit" and list(info["configs"]) == ["vit"]


def _closed_early(args, read_lines=0):
    """Run the CLI with stdout a pipe whose reader reads `read_lines` lines, then closes it (as `| head`)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "sdport.cli", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    lines = [p.stdout.readline() for _ in range(read_lines)]
    p.stdout.close()
    err = p.stderr.read().decode()
    return p.wait(timeout=120), lines, err


def test_closed_stdout_ends_quietly(tmp_path):
    """`sdport inspect F | head -1`: no "Broken pipe" message, no traceback; exit 141 (128 + SIGPIPE)."""
    tiny = os.path.join(REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")
    for args in (["inspect", tiny], ["inspect", "--json", tiny]):
        rc, _, err = _closed_early(args)  # reader gone before the first write
        assert (rc, err) == (141, ""), (args, err)
    # Reader gone after one line, while the command still writes (far more than a pipe holds).
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photograph of an astronaut riding a horse\n" * 400)
    rc, lines, err = _closed_early(["tokenize", "--file", prompts], read_lines=1)
    assert json.loads(lines[0])["line"] == 1
    assert (rc, err) == (141, "")
    # Unharmed: the same command with its reader present.
    rc, out, err = run_cli("inspect", tiny)
    assert rc == 0 and out.startswith(tiny) and not err


def test_inspect_layout(converted):
    rc, out, _ = run_cli("inspect", "--json", converted["lightning"])
    info = json.loads(out)
    assert rc == 0 and info["kind"] == "sdport-layout" and info["layout_version"] == 1
    assert set(info["components"]) == {"unet", "text_model", "encoder", "decoder", "schedule"}


@pytest.mark.parametrize("variant", SD + ["vit_openai", "vit_hf", "vit_compvis", "vit_torchscript"])
def test_round_trip_bit_exact(variants, converted, tmp_path, variant):
    h5 = converted[variant]
    assert verify(h5) == []
    for ext in (".safetensors", ".ckpt"):
        back = str(tmp_path / f"back{ext}")
        export(h5, back)
        with open_checkpoint(variants[variant]) as src, open_checkpoint(back) as out, LayoutReader(h5) as r:
            ignored = set(r.attrs.get("ignored", {})) | set(r.attrs.get("unknown_keys", []))  # never converted
            assert set(out.keys()) == set(src.keys()) - ignored
            for k in out.keys():
                a, b = src.tensor(k), out.tensor(k)
                assert a.dtype == b.dtype and torch.equal(a, b), k


def test_export_format_follows_a_known_suffix(converted, tmp_path):
    from click.testing import CliRunner

    from sdport.cli import main

    h5 = converted["lightning"]
    for name in ("back.txt", "back", "back.SAFETENSORS"):
        r = CliRunner().invoke(main, ["export", h5, "-o", str(tmp_path / name)])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "unknown output suffix" in r.stderr, r.stderr
        assert ".safetensors" in r.stderr and ".ckpt" in r.stderr
        assert not (tmp_path / name).exists()
    for name, container in (("b.safetensors", "safetensors"), ("b.pt", "torch-zip"), ("b.bin", "torch-zip")):
        r = CliRunner().invoke(main, ["export", h5, "-o", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        with open_checkpoint(str(tmp_path / name)) as back:
            assert back.container == container


def _renamed_checkpoint(src, out, rename):
    """A copy of checkpoint `src` whose keys pass through rename(key) -> new key (None: dropped)."""
    sd = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
    sd = {rename(k): v for k, v in sd.items() if rename(k) is not None}
    torch.save({"state_dict": sd}, out)
    return sd


def test_text_encoder_with_transformers_5_6_names(variants, converted, tmp_path):
    # transformers >= 5.6 drops CLIPTextModel's text_model level: cond_stage_model.transformer.encoder.layers.*
    old = "cond_stage_model.transformer.text_model."
    src = str(tmp_path / "new-names.ckpt")
    sd = _renamed_checkpoint(variants["lightning"], src, lambda k: k.replace(old, "cond_stage_model.transformer."))
    assert "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight" in sd
    from click.testing import CliRunner

    from sdport.cli import main

    h5 = tmp_path / "new.h5"
    r = CliRunner().invoke(main, ["convert", src, "-o", str(h5), "--strict"])
    assert r.exit_code == 0, r.output
    assert "/text_model" in r.stdout and "unknown" not in r.stdout and "warning" not in r.stderr
    with LayoutReader(str(h5)) as a, LayoutReader(converted["lightning"]) as b:
        assert a.keys("text_model") == b.keys("text_model")
        assert all(torch.equal(a.tensor("text_model", k), b.tensor("text_model", k)) for k in a.keys("text_model"))
    # export gives back the names the file came with, bit for bit
    back = str(tmp_path / "back.safetensors")
    export(str(h5), back)
    with open_checkpoint(back) as out:
        assert set(out.keys()) == set(sd)
        assert all(torch.equal(out.tensor(k), sd[k]) and out.tensor(k).dtype == sd[k].dtype for k in sd)
    info = json.loads(CliRunner().invoke(main, ["inspect", src, "--json"]).stdout)
    assert info["components"]["text_model"] == sum(k.startswith("cond_stage_model.") for k in sd)
    assert info["unknown_keys"] == [] and info["warnings"] == []


@pytest.mark.parametrize("rename,detail", [
    (lambda k: None if k.startswith("cond_stage_model.") else k, None),
    (lambda k: k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.clip."), "cond_stage_model.clip."),
], ids=["absent", "other-layout"])
def test_no_text_encoder_next_to_unet_and_vae_is_a_warning(variants, tmp_path, rename, detail):
    from click.testing import CliRunner

    from sdport.cli import main

    src = str(tmp_path / "no-text.ckpt")
    _renamed_checkpoint(variants["lightning"], src, rename)
    r = CliRunner().invoke(main, ["convert", src, "-o", str(tmp_path / "o.h5")])
    assert r.exit_code == 0, r.output
    warn = [line.strip() for line in r.stderr.splitlines() if "warning:" in line]
    assert len(warn) == 1 and warn[0].startswith("warning: no CLIP text encoder found next to the UNet and VAE")
    assert "txt2img, img2img and inpaint need one" in warn[0]
    assert (detail is None) == ("cond_stage_model" not in warn[0])
    if detail:
        assert detail in warn[0]
    assert "/text_model" not in r.stdout
    # a VAE alone, or a UNet alone, is a component file: no warning there
    vae_only = str(tmp_path / "vae.ckpt")
    _renamed_checkpoint(variants["lightning"], vae_only, lambda k: k if k.startswith("first_stage_model.") else None)
    r = CliRunner().invoke(main, ["convert", vae_only, "-o", str(tmp_path / "v.h5")])
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output


def test_layout_attributes(converted, variants):
    with h5py.File(converted["lightning"], "r") as f:
        assert f.attrs["format"] == "sdport" and f.attrs["layout_version"] == 1
        assert f.attrs["source_format"] == "torch-zip" and f.attrs["variant"] == "txt2img"
        assert json.loads(f["unet"].attrs["config"])["model_channels"] == 32
        ds = f["unet"][next(iter(f["unet"]))]
        assert ds.chunks is None and ds.compression is None  # contiguous: memory-mappable
        assert json.loads(ds.attrs["sources"])[0].startswith("model.diffusion_model.")
        assert len(ds.attrs["sha256"]) == 64
        assert f["schedule"].attrs["latent_scale"] == pytest.approx(0.18215)


def test_ema_policies(variants, tmp_path):
    from sdport.convert.detect import ema_key

    src = variants["ema"]
    auto = convert(src, str(tmp_path / "auto.h5"))
    use = convert(src, str(tmp_path / "use.h5"), ema="use")
    ign = convert(src, str(tmp_path / "ign.h5"), ema="ignore")
    assert auto.plan.ema == {"present": True, "policy": "auto", "used": False, "differs": True}
    assert use.plan.ema["used"] is True and use.plan.unknown == [] and auto.plan.unknown == []
    assert use.plan.ignored["model.diffusion_model.input_blocks.0.0.weight"].startswith("non-EMA")
    assert ign.plan.ema["used"] is False and ign.plan.ema["differs"] is None
    with LayoutReader(use.out) as r, open_checkpoint(src) as ck:
        ds = r.dataset_attrs("unet", "conv_in.weight")
        assert ds["sources"] == [ema_key("input_blocks.0.0.weight")]
        assert torch.equal(r.tensor("unet", "conv_in.weight"), ck.tensor(ds["sources"][0]))
        assert r.attrs["ema"]["used"] is True
    with pytest.raises(Exception, match="no model_ema"):
        convert(variants["lightning"], str(tmp_path / "x.h5"), ema="use")


def test_dtype_cast_and_components(variants, tmp_path):
    s = convert(variants["lightning"], str(tmp_path / "h.h5"), dtype="fp16", components={"unet", "decoder"})
    with LayoutReader(s.out) as r:
        assert r.components() == ["unet", "decoder"]
        assert r.tensor("unet", "conv_in.weight").dtype == torch.float16
        assert r.tensor("schedule", "alphas_cumprod").dtype == torch.float32  # schedule stays exact
    s = convert(variants["lightning"], str(tmp_path / "b.h5"), dtype="bf16", components={"text_model"})
    with LayoutReader(s.out) as r:
        assert r.tensor("text_model", next(iter(r.keys("text_model")))).dtype == torch.bfloat16
    assert verify(s.out) == []


def test_refuses_overwrite_and_missing_dir(variants, converted, tmp_path):
    rc, _, err = run_cli("convert", variants["fp16"], "-o", converted["fp16"])
    assert rc == 2 and "already exists" in err and "--force" in err
    rc, _, err = run_cli("convert", variants["fp16"], "-o", tmp_path / "no" / "such" / "x.h5")
    assert rc == 2 and "does not exist" in err


def test_strict_unknown_keys(variants, tmp_path):
    sd = torch.load(variants["flat"], weights_only=True)
    sd["some_adapter.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.ckpt")
    s = convert(str(tmp_path / "extra.ckpt"), str(tmp_path / "ok.h5"))
    assert s.plan.unknown == ["some_adapter.weight"]
    rc, _, err = run_cli("convert", tmp_path / "extra.ckpt", "-o", tmp_path / "strict.h5", "--strict")
    assert rc == 2 and "some_adapter.weight" in err and not (tmp_path / "strict.h5").exists()


def test_shape_outside_supported_family(variants, tmp_path):
    sd = torch.load(variants["flat"], weights_only=True)
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1])  # a linear proj_in (SD 2.x style) beside a 1x1-conv proj_out
    torch.save(sd, tmp_path / "odd.ckpt")
    rc, _, err = run_cli("convert", tmp_path / "odd.ckpt", "-o", tmp_path / "odd.h5")
    assert rc == 2 and "proj_out.weight" in err and "linear projections" in err and len(err.strip().splitlines()) == 1


def test_x4_upscaler_refused_in_one_line(variants, tmp_path):
    sd = torch.load(variants["v2"], weights_only=True)["state_dict"]
    k = "model.diffusion_model.input_blocks.0.0.weight"
    sd[k] = torch.zeros(sd[k].shape[0], 7, 3, 3)  # latent + low-resolution RGB image
    sd["model.diffusion_model.label_emb.weight"] = torch.zeros(1000, 4 * sd[k].shape[0])  # noise-level classes
    torch.save({"state_dict": sd}, tmp_path / "x4.ckpt")
    for cmd in (["convert", tmp_path / "x4.ckpt", "-o", tmp_path / "x4.h5"], ["inspect", tmp_path / "x4.ckpt"]):
        rc, out, err = run_cli(*cmd)
        text = err if cmd[0] == "convert" else out
        assert "x4 upscaler" in text and "different architecture" in text and "label_emb.weight" in text, text
    assert rc == 0 and "unsupported:" in out  # inspect says what it is and still exits 0
    rc, _, err = run_cli("convert", tmp_path / "x4.ckpt", "-o", tmp_path / "x4.h5")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "x4.h5").exists()


def test_depth_unet_converts_but_does_not_generate(converted, tmp_path):
    rc, _, err = run_cli("txt2img", converted["v2_depth"], "a cube", "-o", tmp_path / "d.png", "--steps", "2")
    assert rc == 2 and "depth" in err and "MiDaS" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d.png").exists()


def _flip_byte(path, group, key):
    with h5py.File(path, "r") as f:
        off = f[group][key].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(off + 3)
        b = fh.read(1)
        fh.seek(off + 3)
        fh.write(bytes([b[0] ^ 0x40]))


def test_verify_names_corrupted_dataset(converted, tmp_path):
    import shutil

    p = str(tmp_path / "c.h5")
    shutil.copy(converted["lightning"], p)
    _flip_byte(p, "unet", "mid.res.0.conv1.weight")
    rc, out, err = run_cli("verify", p)
    assert rc == 1 and "/unet/mid.res.0.conv1.weight" in err.splitlines()[0]


def test_newer_layout_version_refused(converted, tmp_path):
    import shutil

    p = str(tmp_path / "new.h5")
    shutil.copy(converted["fp16"], p)
    with h5py.File(p, "r+") as f:
        f.attrs["layout_version"] = 99
    for cmd in ("verify", "inspect", "export"):
        args = [cmd, p] + (["-o", str(tmp_path / "b.safetensors")] if cmd == "export" else [])
        rc, _, err = run_cli(*args)
        assert rc == 2 and "layout version 99" in err, (cmd, err)


# ---------------------------------------------------------------- native from .h5 vs reference from checkpoint


def _reference_sd(path, prefix):
    with open_checkpoint(path) as ck:
        return {k[len(prefix):]: ck.tensor(k).float() for k in ck.keys() if k.startswith(prefix)}


def _rel_l2(a, r):
    return float((a.double() - r.double()).norm() / r.double().norm())


@pytest.mark.parametrize("variant", ["lightning", "inpaint", "safetensors", "v2", "v2_inpaint", "v2_depth"])
def test_unet_from_h5_matches_ldm(variants, converted, variant):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from sdport.parity.reference.unet import ldm_kwargs

    native = load_model(converted[variant], "unet")
    ref = UNetModel(**ldm_kwargs(native.config)).eval()
    ref.load_state_dict(_reference_sd(variants[variant], "model.diffusion_model."))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, native.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 77, native.config.context_dim, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        r, a = ref(x, t, context=ctx), native(x, t, ctx)
    assert r.abs().mean() > 1e-2 and _rel_l2(a, r) <= 1e-5


def test_openclip_text_from_h5_matches_ldm_encode(variants, converted):
    """The SD 2.x text encoder from the .h5 against FrozenOpenCLIPEmbedder's computation (parity/reference/openclip.py)
    on the checkpoint's weights, with open_clip.tokenize's framing (pad 0)."""
    from sdport.models.tokenizer import default_tokenizer
    from sdport.parity.reference import openclip as reference_openclip

    text = load_model(converted["v2"], "text_model")
    assert text.config.layer == "penultimate" and text.config.pad_id == 0
    ref = reference_openclip.build_text_reference(text.config)
    missing, unexpected = ref.load_state_dict(_reference_sd(variants["v2"], "cond_stage_model.model."), strict=False)
    assert not missing and set(unexpected) == {"text_projection", "logit_scale"}
    tok = default_tokenizer()
    ids = torch.tensor([tok("", 0), tok("a photograph of an astronaut riding a horse", 0)])
    assert ids[1, -1] == 0 and ids[0, 1] == 49407 and ids[0, 2] == 0
    with torch.no_grad():
        r, a = ref(ids), text(ids)
    assert r.std() > 0.1 and _rel_l2(a, r) <= 1e-5
    # the last block is in the layout and unused: changing it changes nothing, while the block before it matters
    with torch.no_grad():
        text.layers[-1].mlp.fc1.weight.add_(1.0)
        assert torch.equal(text(ids), a)
        text.layers[-2].mlp.fc1.weight.add_(1.0)
        assert _rel_l2(text(ids), r) > 1e-2


def test_text_vae_vit_from_h5_match_references(variants, converted):
    from sdport.parity.reference import clip as reference_clip, vae as reference_vae
    from sdport.models.clip import TextConfig, VisionConfig
    from sdport.models.vae import VAEConfig

    g = torch.Generator().manual_seed(1)
    # text encoder vs transformers CLIPTextModel
    text = load_model(converted["lightning"], "text_model")
    ref = reference_clip.build_text_reference(TextConfig.tiny())
    ref.load_state_dict(_reference_sd(variants["lightning"], "cond_stage_model.transformer.text_model."), strict=False)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        r, a = ref(input_ids=ids).last_hidden_state, text(ids)
    assert _rel_l2(a, r) <= 1e-5
    # VAE encoder (+quant_conv) and decoder (post_quant_conv+) vs ldm
    vref = reference_vae.build_reference(VAEConfig.tiny())
    vref.load_state_dict(_reference_sd(variants["lightning"], "first_stage_model."))
    enc, dec = load_model(converted["lightning"], "encoder"), load_model(converted["lightning"], "decoder")
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        (rm, rlv), (am, alv) = vref.encode(img), enc(img)
        z = torch.randn(1, 4, 16, 16, generator=g)
        rd, ad = vref.decode(z), dec(z)
    assert _rel_l2(am, rm) <= 1e-5 and _rel_l2(alv, rlv) <= 1e-5 and _rel_l2(ad, rd) <= 1e-5
    # ViT from each source format vs transformers CLIPVisionModelWithProjection
    pix = torch.randn(2, 3, 32, 32, generator=g)
    hf = reference_clip.build_vision_reference(VisionConfig.tiny())
    hf.load_state_dict(_reference_sd(variants["vit_hf"], ""), strict=False)
    with torch.no_grad():
        assert _rel_l2(load_model(converted["vit_hf"], "vit")(pix), hf(pixel_values=pix).image_embeds) <= 1e-5
        oa = reference_clip.build_openai_vision_reference(VisionConfig.tiny())
        oa.load_state_dict(_reference_sd(variants["vit_openai"], "visual."))
        assert _rel_l2(load_model(converted["vit_openai"], "vit")(pix), oa(pix)) <= 1e-5


@pytest.mark.parametrize("component,variant", [("unet", "lightning"), ("text_model", "lightning"),
                                               ("encoder", "lightning"), ("decoder", "lightning"),
                                               ("vit", "vit_openai")])
def test_every_native_model_names_its_config_config(converted, component, variant):
    model = load_model(converted[variant], component, device="meta")
    with LayoutReader(converted[variant]) as r:
        stored = r.config(component)
    assert type(model.config).__name__.endswith("Config") and not hasattr(model, "cfg")
    assert {k: getattr(model.config, k) for k in stored} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}


def test_torchscript_archive_reads_like_its_state_dict(variants, converted):
    """OpenAI ships CLIP as `torch.jit.save` archives: read as data (code never run), same weights."""
    with open_checkpoint(variants["vit_torchscript"]) as ts, open_checkpoint(variants["vit_openai"]) as sd:
        assert ts.wrapper == "torchscript"
        assert set(ts.keys()) == set(sd.keys()) | {"logit_scale"}
        for k in sd.keys():
            assert torch.equal(ts.tensor(k), sd.tensor(k)), k
    with LayoutReader(converted["vit_torchscript"]) as a, LayoutReader(converted["vit_openai"]) as b:
        assert a.keys("vit") == b.keys("vit")
        for k in b.keys("vit"):
            assert torch.equal(a.tensor("vit", k), b.tensor("vit", k)), k
    # What torch.jit.load runs (the reference only) against the native model from the converted file.
    pix = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's; the format is what ships
        jit = torch.jit.load(variants["vit_torchscript"]).eval()
    with torch.no_grad():
        want = jit(pix) / jit.logit_scale.exp()
        assert _rel_l2(load_model(converted["vit_torchscript"], "vit")(pix), want) <= 1e-5


def test_torchscript_module_tree_that_loops_is_refused(tmp_path):
    # A `__torch__` object whose attribute is itself, built by hand (no torch.jit.save makes one).
    body = (b"\x80\x02c__torch__\nM\nq\x00)\x81q\x01}q\x02X\x04\x00\x00\x00selfq\x03h\x01sb.")
    p = tmp_path / "loop.pt"
    p.write_bytes(malicious.torch_zip(body))
    rc, _, err = run_cli("inspect", str(p))
    assert rc == 2 and "loops or nests" in err and "Traceback" not in err
