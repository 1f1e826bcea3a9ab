"""The stacked dropout grid: each member is the MC-dropout network it would be alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.data import Dataset
from training.fit import standardization
from training.grid import DropoutGrid, GridConfig, GridMember, fit_grid
from training.metrics import pointwise_log_likelihood, sample_draws

CONFIGS = [GridConfig(0.0, 1.0), GridConfig(0.1, 0.5), GridConfig(0.3, 2.0)]
HIDDEN = [16]


def regression_data(n: int, seed: int, noise_sd: float = 0.5) -> Dataset:
    """y = 10 + 2 x1 + x2 + N(0, noise_sd^2): original units far from standardized ones."""
    gen = np.random.default_rng(seed)
    x = gen.uniform(-3, 3, size=(n, 2))
    y = 10 + 2 * x[:, 0] + x[:, 1] + noise_sd * gen.standard_normal(n)
    return Dataset(x, y, ["x1", "x2"], ["y"], "regression")


def make_grid(data: Dataset, configs: list[GridConfig], seeds: list[int]) -> DropoutGrid:
    stats = standardization(data)
    members = [GridMember(c, stats, s) for c, s in zip(configs, seeds, strict=True)]
    return DropoutGrid(data.num_features, HIDDEN, members)


def test_penalty_and_nll_of_each_member_equal_the_unstacked_models():
    data = regression_data(50, 0)
    grid = make_grid(data, CONFIGS, [1, 2, 3])
    mean = torch.randn(len(CONFIGS), 8, 1)
    y = torch.randn(8, 1)
    nll = grid.member_nll(mean, y.expand(len(CONFIGS), 8, 1))
    penalty = grid.penalty(len(data))
    for m in range(len(CONFIGS)):
        model = grid.member_model(m)
        torch.testing.assert_close(penalty[m], model.penalty(len(data)))
        torch.testing.assert_close(nll[m], model.head.nll(mean[m], y).mean())


def test_forward_of_each_member_equals_the_unstacked_forward():
    data = regression_data(50, 0)
    grid = make_grid(data, CONFIGS, [1, 2, 3])
    z = torch.randn(8, 2)
    ones = [torch.ones(len(CONFIGS), 8, w) for w in grid.mask_widths]
    out = grid(z.expand(len(CONFIGS), 8, 2), ones)
    for m in range(len(CONFIGS)):
        model = grid.member_model(m)
        model.p = 0.0  # no dropout: the deterministic pass that all-ones masks give the stack
        torch.testing.assert_close(out[m], model(z))


def test_dropout_masks_drop_each_members_rate_and_rescale():
    data = regression_data(50, 0)
    grid = make_grid(data, CONFIGS, [1, 2, 3])
    rows = 4000
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    scales = torch.cat(grid.epoch_masks(generators, rows), dim=-1)  # [M, rows, 2 + 16]
    for m, config in enumerate(CONFIGS):
        kept = scales[m] != 0
        count = kept.numel()
        dropped = 1 - kept.double().mean().item()
        se = math.sqrt(config.dropout * (1 - config.dropout) / count)
        assert abs(dropped - config.dropout) <= 5 * se + 1e-12
        torch.testing.assert_close(
            scales[m][kept], torch.full_like(scales[m][kept], 1 / (1 - config.dropout))
        )


def test_a_member_trains_exactly_as_it_would_alone():
    """Summed losses, elementwise Adam and per-member seeds: stacking changes nothing."""
    data = regression_data(100, 0)
    stacked = make_grid(data, CONFIGS, [11, 12, 13])
    fit_grid(stacked, data, 3, batch_size=32)
    alone = make_grid(data, CONFIGS[1:2], [12])
    fit_grid(alone, data, 3, batch_size=32)
    for a, b in zip(stacked.parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(a[1], b[0])
    assert not torch.allclose(stacked.weights[0][0], stacked.weights[0][1])


def test_members_fit_on_different_rows_train_as_they_would_alone():
    sets = [regression_data(64, 1), regression_data(64, 2)]
    members = [GridMember(CONFIGS[1], standardization(s), 5 + i) for i, s in enumerate(sets)]
    stacked = DropoutGrid(2, HIDDEN, members)
    fit_grid(stacked, sets, 3, batch_size=16)
    alone = DropoutGrid(2, HIDDEN, members[1:])
    fit_grid(alone, sets[1], 3, batch_size=16)
    for a, b in zip(stacked.parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(a[1], b[0])
    with pytest.raises(ValueError, match="same number of rows"):
        fit_grid(stacked, [sets[0], regression_data(63, 3)], 1)


def test_exported_member_carries_its_fixed_noise_in_original_units():
    data = regression_data(50, 0)
    grid = make_grid(data, CONFIGS, [1, 2, 3])
    model = grid.member_model(2)
    assert model.config()["likelihood"]["noise"] == "fixed"
    assert model.p == CONFIGS[2].dropout and model.input_dropout
    draws = sample_draws(model, data.x[:5], 20, seed=0)
    torch.testing.assert_close(draws[..., 1], torch.full((20, 5), 1 / CONFIGS[2].tau))


def test_validation_log_likelihood_picks_the_true_noise_precision():
    """Noise sd 0.5 (tau 4): of taus 0.25, 4 and 64 the validation LL prefers 4."""
    train, val = regression_data(400, 0), regression_data(400, 1)
    taus = [0.25, 4.0, 64.0]
    grid = make_grid(train, [GridConfig(0.05, t) for t in taus], [1, 2, 3])
    fit_grid(grid, train, 150)
    y = torch.as_tensor(val.y)
    scores = [
        float(
            pointwise_log_likelihood(
                "regression", sample_draws(grid.member_model(m), val.x, 100, 0), y
            ).mean()
        )
        for m in range(len(taus))
    ]
    assert int(np.argmax(scores)) == 1, scores
