"""Deep ensembles: stacked members train independently in one step, and sine-gap."""

from __future__ import annotations

import torch
from methods_support import assert_gap_uncertainty_and_coverage, fit_sine_gap

from training.posteriors.stacked import DeepEnsemble
from training.train import sample_limits

LIKELIHOOD = {"kind": "gaussian", "num_targets": 1, "noise": "heteroscedastic"}
STATS = {"x_mean": [0.0], "x_std": [1.0], "y_mean": [0.0], "y_std": [1.0]}


def _ensemble(members: int) -> DeepEnsemble:
    torch.manual_seed(0)
    return DeepEnsemble({"in_features": 1, "hidden": [6], "members": members}, LIKELIHOOD, STATS)


def _member_gradients(model: DeepEnsemble, x: torch.Tensor, y: torch.Tensor) -> list:
    model.zero_grad()
    (model.member_nll(model(x), y).sum() + model.penalty(len(x))).backward()
    return [p.grad.clone() for p in model.body_parameters()]


def test_stacked_members_do_not_interact():
    """Member 0's gradient is the gradient of a one-member ensemble holding its weights,
    whatever the other members hold: one optimizer step is M independent MAP steps."""
    x, y = torch.randn(16, 1), torch.randn(16, 1)
    model = _ensemble(3)
    grads = _member_gradients(model, x, y)
    alone = _ensemble(1)
    alone.load_members([p[:1].detach() for p in model.body_parameters()])
    for full, single in zip(grads, _member_gradients(alone, x, y), strict=True):
        torch.testing.assert_close(full[:1], single)
    with torch.no_grad():
        for p in model.body_parameters():
            p[1:].mul_(3.0)
    for before, after in zip(grads, _member_gradients(model, x, y), strict=True):
        torch.testing.assert_close(before[:1], after[:1])


def test_draw_s_is_member_s():
    model = _ensemble(4)
    x = torch.randn(3, 1)
    draws = model.sample(x, 6, torch.zeros(3, dtype=torch.int64))
    members = model.run(x)
    for s in range(6):
        torch.testing.assert_close(draws[s], model.head.per_draw(members[s % 4]))
    assert model.set_size == 4
    assert sample_limits(model) == {"default": 4, "max": 1000}  # more than 4 asks for the 4


def test_ensemble_on_sine_gap():
    result = fit_sine_gap(
        "ensemble",
        {"members": 5, "prior": "normal:1.0"},
        {"target_steps": 2000, "batch_size": 64, "lr": 1e-2, "evaluations": 20},
        noise="heteroscedastic",
        eval_samples=5,
    )
    assert result.fit.metrics["epochs"]["nll"][-1] < result.fit.metrics["epochs"]["nll"][0]
    assert_gap_uncertainty_and_coverage(result, draws=5)
