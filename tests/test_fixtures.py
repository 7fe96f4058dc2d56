"""The committed tiny checkpoints are intact and are what the fixture script builds."""
from __future__ import annotations

import json
import os

import torch

from sdport.convert.checkpoint import open_checkpoint
from sdport.fixtures import build
from sdport.models.storage.layout import file_sha256
from conftest import COMMITTED_DIR


def test_manifest_matches_committed_files():
    manifest = json.load(open(os.path.join(COMMITTED_DIR, "manifest.json")))
    assert set(manifest) == {build.FILENAMES[v] for v in build.COMMITTED}
    for name, entry in manifest.items():
        path = os.path.join(COMMITTED_DIR, name)
        assert os.path.getsize(path) == entry["bytes"]
        assert file_sha256(path) == entry["sha256"], name


def test_committed_files_are_rebuilt_by_the_script(variants):
    for v in build.COMMITTED:
        with open_checkpoint(os.path.join(COMMITTED_DIR, build.FILENAMES[v])) as a, open_checkpoint(variants[v]) as b:
            assert a.keys() == b.keys()
            for k in a.keys():
                assert torch.equal(a.tensor(k), b.tensor(k)), (v, k)


def test_fixtures_are_not_degenerate(variants):
    """Zero-initialised layers were re-initialised and norms jittered."""
    with open_checkpoint(variants["lightning"]) as ck:
        for k in ck.keys():
            t = ck.tensor(k)
            if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) and t.numel() > 1:
                assert t.float().std() > 0, f"{k} is constant"
        norm = ck.tensor("model.diffusion_model.out.0.weight")
        assert not torch.allclose(norm, torch.ones_like(norm))
