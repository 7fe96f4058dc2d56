"""The checkpoint's own yaml: read safely, honoured beside the checkpoint or through --config, overridden by
--prediction, and every value no shape says recorded in the layout with its source."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli
from sdport.models.storage.layout import LayoutReader

V2_YAML = """\
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        num_head_channels: 8 # the tiny fixture is 32 wide; SD 2.x says 64
        use_linear_in_transformer: True
        context_dim: 16
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "last"
"""


@pytest.fixture()
def v2(variants, tmp_path):
    path = tmp_path / "m.ckpt"
    shutil.copy(variants["v2"], path)
    return path


def settings_of(h5):
    with LayoutReader(str(h5)) as r:
        return r.attrs["settings"], r.config("unet"), r.config("text_model")


def test_yaml_beside_the_checkpoint_is_honoured(v2, tmp_path):
    (tmp_path / "m.yaml").write_text(V2_YAML)
    rc, _, err = run_cli("convert", v2, "-o", tmp_path / "m.h5")
    assert rc == 0, err
    s, unet, text = settings_of(tmp_path / "m.h5")
    assert s["prediction"] == {"value": "v", "source": "yaml", "why": "m.yaml: model.params.parameterization"}
    assert s["unet.heads"]["value"] == {"num_head_channels": 8} and s["unet.heads"]["source"] == "yaml"
    assert unet["num_head_channels"] == 8 and text["layer"] == "last" and s["text_model.layer"]["source"] == "yaml"
    assert s["unet.context_dim"]["source"] == "shapes" and "m.yaml" in s["unet.context_dim"]["why"]
    rc, out, _ = run_cli("inspect", tmp_path / "m.h5")
    assert rc == 0 and '- prediction                      "v"  [yaml] m.yaml: model.params.parameterization' in out
    # the pipelines sample it as a v model; parity refuses ldm's PLMS as its reference (it treats v as eps)
    rc, _, err = run_cli("txt2img", tmp_path / "m.h5", "a cube", "-o", tmp_path / "o.png", "--steps", "2")
    assert rc == 0, err
    rc, _, err = run_cli("parity", "txt2img", v2, "--h5", tmp_path / "m.h5", "--prompt", "a cube", "--sampler", "plms",
                         "--steps", "2",
                         "--out", tmp_path / "rep")
    assert rc == 2 and "PLMSSampler" in err and "--sampler ddim" in err and len(err.strip().splitlines()) == 1


def test_config_option_and_prediction_flag(v2, tmp_path):
    other = tmp_path / "elsewhere.yaml"
    other.write_text(V2_YAML)
    rc, out, err = run_cli("inspect", "--json", v2, "--config", other)
    assert rc == 0, err
    assert json.loads(out)["settings"]["prediction"]["why"].startswith("elsewhere.yaml")
    rc, _, err = run_cli("convert", v2, "-o", tmp_path / "f.h5", "--config", other, "--prediction", "eps")
    assert rc == 0, err
    s, unet, _ = settings_of(tmp_path / "f.h5")
    assert s["prediction"] == {"value": "eps", "source": "flag", "why": "--prediction"}
    assert unet["num_head_channels"] == 8  # the rest of the yaml still counts


def test_without_a_yaml_each_assumption_says_why(v2, tmp_path):
    rc, out, err = run_cli("inspect", "--json", v2)
    s = json.loads(out)["settings"]
    assert rc == 0 and s["prediction"]["value"] == "eps" and s["prediction"]["source"] == "assumed"
    assert "--prediction v" in s["prediction"]["why"]
    assert s["unet.heads"] == {"value": {"num_head_channels": 16}, "source": "assumed",
                               "why": s["unet.heads"]["why"]} and "preset" in s["unet.heads"]["why"]
    assert s["text_model.layer"]["value"] == "penultimate" and s["scale_factor"]["source"] == "assumed"


def test_v1_yaml_settles_the_head_count(variants, tmp_path):
    path = tmp_path / "v1.ckpt"
    shutil.copy(variants["lightning"], path)
    (tmp_path / "v1.yaml").write_text("model:\n  params:\n    unet_config:\n      params:\n        num_heads: 4\n"
                                      "    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n")
    rc, _, err = run_cli("convert", path, "-o", tmp_path / "v1.h5")
    assert rc == 0, err
    s, unet, _ = settings_of(tmp_path / "v1.h5")
    assert unet["num_heads"] == 4 and unet["num_head_channels"] == 0 and s["unet.heads"]["source"] == "yaml"


@pytest.mark.parametrize("text,needle", [
    ('model: !!python/object/apply:os.system ["echo hi"]\n', "object tags"),
    ("model:\n  params: !custom {a: 1}\n", "object tags"),
    ("- a list\n", "expected a mapping"),
    ("model:\n  params:\n    parameterization: x0\n", "expected eps or v"),
    ("model:\n  params:\n    unet_config:\n      params:\n        context_dim: 1024\n", "shapes say 16"),
    ("model:\n  params:\n    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n",
     "openclip text encoder"),
])
def test_bad_yaml_is_refused_in_one_line(v2, tmp_path, text, needle):
    for where in ("beside", "config"):
        yaml_path = tmp_path / ("m.yaml" if where == "beside" else "given.yaml")
        yaml_path.write_text(text)
        extra = ["--config", yaml_path] if where == "config" else []
        rc, _, err = run_cli("convert", v2, "-o", tmp_path / "x.h5", *extra)
        assert rc == 2 and needle in err and yaml_path.name in err, (where, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "x.h5").exists()
        rc, out, err = run_cli("inspect", v2, *extra)
        # a yaml that cannot be read stops inspect; one that contradicts the weights is what inspect reports
        assert (rc == 2 and needle in err) or (rc == 0 and "unsupported: " in out and needle in out), (rc, out, err)
        yaml_path.unlink()


def test_yaml_bounds(v2, tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("model: {params: {}}\n" + "# padding\n" * 120_000)
    rc, _, err = run_cli("inspect", v2, "--config", big)
    assert rc == 2 and "larger than" in err
    rc, _, err = run_cli("inspect", v2, "--config", tmp_path / "missing.yaml")
    assert rc == 2 and "no such file" in err
