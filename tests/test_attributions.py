"""Attributions per posterior draw need each draw's own gradient: every method's draws at
per-draw inputs (`path_draws`) are its sampled draws, and draw s depends on its copy alone."""

from __future__ import annotations

import pytest
import torch
from methods_support import METHOD_EXTRA

from training.architectures import arch_config
from training.attributions import Explain, attribute, quantiles, summarize_attributions
from training.build import FAST_PATHS, MODEL_TYPES, build_model
from training.model import PosteriorModel

CLASSES = {"kind": "categorical", "num_classes": 3}
SETUPS = {  # input shape, likelihood, normalization, architecture
    "mlp": (
        [3],
        {"kind": "gaussian", "num_targets": 2, "noise": "heteroscedastic"},
        {"x_mean": [0.1, 0.0, -0.2], "x_std": [1.0, 2.0, 0.5], "y_mean": [0.5, -1.0],
         "y_std": [2.0, 0.3]},
        arch_config("mlp", [3], [16, 8]),
    ),
    "cnn": ([1, 8, 8], CLASSES, {"x_mean": [[[0.1]]], "x_std": [[[0.5]]]},
            arch_config("cnn", [1, 8, 8], [6], conv=[4])),
    "lstm": ([5, 2], CLASSES, {"x_mean": [[0.1, 0.0]], "x_std": [[1.0, 2.0]]},
             arch_config("lstm", [5, 2], [], recurrent=[8])),
}  # fmt: skip
CASES = [
    (method, arch, fast)
    for arch in SETUPS
    for method in MODEL_TYPES
    for fast in (False, True)
    if not fast or (method, arch) in FAST_PATHS
]


def model_of(method: str, arch: str, fast: bool) -> PosteriorModel:
    _, likelihood, stats, config = SETUPS[arch]
    torch.manual_seed(0)
    config = config | METHOD_EXTRA[method]
    if fast:
        model = build_model({"method": method, "arch": config, "likelihood": likelihood}, stats)
    else:
        model = MODEL_TYPES[method](config, likelihood, stats)
    if method == "laplace":  # a fitted posterior's covariance, not the zeros of a new one
        with torch.no_grad():
            for name in ("left", "right", "scale"):
                getattr(model, name).copy_(torch.randn_like(getattr(model, name)))
    return model


@pytest.mark.parametrize(("method", "arch", "fast"), CASES)
def test_path_draws_are_the_sampled_draws_each_on_its_own_copy(method, arch, fast) -> None:
    model = model_of(method, arch, fast)
    assert type(model) is (FAST_PATHS[method, arch] if fast else MODEL_TYPES[method])
    x = torch.randn(5, *SETUPS[arch][0])
    seeds = torch.tensor([3, 3, 8, 1, 1])
    n = 4 if model.set_size else 6
    z = model.normalizer.inputs(x)
    leaf = z.unsqueeze(0).expand(n, *z.shape).clone().requires_grad_()
    draws = model.path_draws(leaf, seeds)
    torch.testing.assert_close(draws, model.sample(x, n, seeds), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(draws[1].sum(), leaf)
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0 and grad[2:].abs().sum() == 0
    if hasattr(model, "raw_draws") and type(model).raw_draws is not PosteriorModel.raw_draws:
        fallback = model._draws(PosteriorModel.raw_draws_at(model, leaf, seeds))
        torch.testing.assert_close(fallback, draws, rtol=1e-5, atol=1e-5)


def test_gradient_x_input_averages_to_the_gradient_of_the_predictive_mean() -> None:
    """Expectation and gradient commute: the mean over draws of z * dF_s/dz is z times the
    gradient of the mean of the draws, taken here by autograd through `sample`'s draws."""
    model = model_of("variational", "mlp", True)
    x = torch.randn(4, 3)
    seeds = torch.full((4,), 9)
    explain = Explain("gradient_x_input", 1, "mean", (0, 1))
    per_draw = attribute(model, x, 64, seeds, explain)
    z = model.normalizer.inputs(x).requires_grad_()
    leaf = z.unsqueeze(0).expand(64, *z.shape)
    mean = model.path_draws(leaf, seeds)[..., :2].mean(0)  # [B, 2]
    for o in range(2):
        (grad,) = torch.autograd.grad(mean[:, o].sum(), z, retain_graph=True)
        torch.testing.assert_close(per_draw["attributions"][:, :, o].mean(0), z * grad)


def test_summaries_are_the_draws_mean_spread_and_quantiles() -> None:
    model = model_of("mc_dropout", "cnn", False)
    x = torch.randn(2, 1, 8, 8)
    explain = Explain("integrated_gradients", 4, "log_probability", (2, 0))
    per_draw = attribute(model, x, 30, torch.tensor([1, 2]), explain)
    assert per_draw["attributions"].shape == (30, 2, 2, 1, 8, 8)
    summary = summarize_attributions(per_draw, (0.5, 0.9), explain)
    a = per_draw["attributions"].double()
    torch.testing.assert_close(summary["std"], a.std(0, correction=0))
    expected = torch.quantile(a, torch.tensor([0.25, 0.05], dtype=torch.float64), dim=0)
    torch.testing.assert_close(summary["lower"], expected.transpose(0, 1))
    torch.testing.assert_close(quantiles(a, [0.95]), torch.quantile(a, 0.95, dim=0)[None])
    assert summary["convergence_delta"].shape == (2, 2)
