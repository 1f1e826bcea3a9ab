"""The gap/data ratio's definition, which the method tests and benchmarks/gap.py share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.build import build_model
from training.data import SINE_GAP_GAP, load_toy
from training.gap import GAP_INPUTS, epistemic_std, gap_ratio
from training.metrics import sample_draws

STATS = {"x_mean": [0.0], "x_std": [2.0], "y_mean": [0.0], "y_std": [1.2]}
LIKELIHOOD = {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"}


def test_gap_inputs_are_inside_the_gap_and_away_from_every_training_input():
    lo, hi = SINE_GAP_GAP
    assert GAP_INPUTS.shape == (37, 1)
    assert GAP_INPUTS[0, 0] == pytest.approx(lo + 0.1)
    assert GAP_INPUTS[-1, 0] == pytest.approx(hi - 0.1)
    train_x = load_toy("sine-gap").train.x
    nearest = np.abs(train_x[:, 0][None, :] - GAP_INPUTS).min()
    assert nearest >= 0.1 - 1e-6


def test_epistemic_std_is_the_spread_of_the_draws_means():
    torch.manual_seed(0)
    model = build_model(
        {
            "method": "variational",
            "arch": {"in_features": 1, "hidden": [8]},
            "likelihood": LIKELIHOOD,
        },
        STATS,
    )
    x = np.linspace(-3, 3, 5, dtype=np.float32)[:, None]
    means = sample_draws(model, x, 50, seed=4)[..., 0].double()
    expected = means.std(0, unbiased=False)
    torch.testing.assert_close(epistemic_std(model, x, 50, seed=4).double(), expected)


def test_a_stored_set_of_draws_is_used_once_each():
    """Asking 200 draws of a 5-member ensemble measures the 5 members, each once."""
    torch.manual_seed(0)
    config = {
        "method": "ensemble",
        "arch": {"in_features": 1, "hidden": [8], "members": 5},
        "likelihood": LIKELIHOOD,
    }
    model = build_model(config, STATS)
    data_x = load_toy("sine-gap").test.x[:200]
    measured = gap_ratio(model, data_x)
    assert measured.draws == 5
    gap = float(epistemic_std(model, GAP_INPUTS, 5).mean())
    data = float(epistemic_std(model, data_x, 5).mean())
    assert measured.gap == pytest.approx(gap) and measured.data == pytest.approx(data)
    assert measured.ratio == pytest.approx(gap / data)
