"""`sdport inspect` in plain text says the config it inferred (or the layout stores) for each component."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from sdport.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "fixtures", "tiny", "sd-tiny-fp16.ckpt")
VIT = os.path.join(REPO, "fixtures", "tiny", "vit-tiny-openai.pt")


def config_lines(stdout):
    return {line.split()[0]: line for line in stdout.splitlines() if line.startswith("    ")}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_checkpoint_and_layout_show_each_components_config(tmp_path):
    r = CliRunner().invoke(main, ["inspect", TINY])
    assert r.exit_code == 0, r.output
    cfg = config_lines(r.stdout)
    assert set(cfg) == {"unet", "text_model", "encoder", "decoder"}, r.stdout
    assert "num_heads=2" in cfg["unet"] and "model_channels=32" in cfg["unet"] and "context_dim=8" in cfg["unet"]
    assert "channel_mult=[1,2]" in cfg["unet"]
    assert "heads=2" in cfg["text_model"] and "hidden=8" in cfg["text_model"]
    assert "ch=32" in cfg["decoder"] and "z_channels=4" in cfg["decoder"]
    h5 = tmp_path / "t.h5"
    assert CliRunner().invoke(main, ["convert", TINY, "-o", str(h5)]).exit_code == 0
    r2 = CliRunner().invoke(main, ["inspect", str(h5)])
    assert r2.exit_code == 0, r2.output
    assert config_lines(r2.stdout) == cfg  # what the layout stores is what was inferred
    r3 = CliRunner().invoke(main, ["inspect", VIT])
    assert "patch_size=8" in config_lines(r3.stdout)["vit"] and "heads=2" in config_lines(r3.stdout)["vit"]
