"""The pytest configuration silences the reference side's own deprecation warnings (ldm's schedules under
NumPy 2), so a run's summary shows the warnings sdport's code causes."""
from __future__ import annotations

import warnings

import pytest
import torch


def test_ldm_numpy2_deprecations_are_silenced_by_the_configuration():
    util = pytest.importorskip("ldm.modules.diffusionmodules.util")
    alphas = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as seen:  # keeps the filters pytest applied from pyproject.toml
        util.make_ddim_sampling_parameters(alphas, util.make_ddim_timesteps("uniform", 10, 1000, verbose=False),
                                           eta=0.5, verbose=False)
    assert [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)] == []
