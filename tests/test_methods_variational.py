"""Bayes by Backprop: KL terms, the ELBO's training curve, layer draws, MOPED, sine-gap,
and what the trainer's defaults reach."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from methods_support import assert_gap_uncertainty_and_coverage, fit_sine_gap, sine_gap

from training import rng
from training.fit import FitOptions
from training.gap import gap_ratio
from training.posteriors.fit_variational import fit_variational
from training.posteriors.variational import VariationalConv2d, VariationalLinear, VariationalNet
from training.priors import parse_prior
from training.train import train_model


def _layer(prior: str) -> VariationalLinear:
    torch.manual_seed(0)
    layer = VariationalLinear(4, 3, parse_prior(prior), "local")
    with torch.no_grad():  # scales of order one, so the KL is not dominated by log sigma
        layer.weight_rho.uniform_(-1.5, 0.5)
        layer.bias_rho.uniform_(-1.5, 0.5)
    return layer


def _monte_carlo_kl(layer: VariationalLinear, draws: int) -> tuple[float, float]:
    """Mean and standard error of log q(w) - log p(w) over `draws` joint weight draws."""
    weight, bias = layer.draw(rng.draw_keys(torch.tensor([1]), draws, stream=0)[:, 0])
    total = torch.zeros(draws, dtype=torch.float64)
    for mu, sigma, w in (
        (layer.weight_mu, layer.weight_sigma, weight),
        (layer.bias_mu, layer.bias_sigma, bias),
    ):
        q = torch.distributions.Normal(mu.double(), sigma.double())
        log_ratio = q.log_prob(w.double()) - layer.prior.log_prob(w.double())
        total += log_ratio.flatten(1).sum(1)
    return float(total.mean()), float(total.std() / math.sqrt(draws))


@torch.no_grad()
def test_closed_form_kl_agrees_with_monte_carlo():
    layer = _layer("normal:0.7")
    estimate, se = _monte_carlo_kl(layer, 50_000)
    # 5 standard errors: a correct closed form fails this about once in 1.7 million runs.
    assert abs(float(layer.kl()) - estimate) < 5 * se


@torch.no_grad()
def test_scale_mixture_kl_estimate_is_unbiased():
    """No closed form: the layer's one-sample estimate, averaged, matches quadrature."""
    layer = _layer("mixture:0.5,1.0,0.05")
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)  # E over N(0, 1)
    exact = 0.0
    for mu, sigma in ((layer.weight_mu, layer.weight_sigma), (layer.bias_mu, layer.bias_sigma)):
        mu, sigma = mu.double().flatten(), sigma.double().flatten()
        w = mu[:, None] + sigma[:, None] * torch.tensor(nodes)[None, :]
        log_q = torch.distributions.Normal(mu[:, None], sigma[:, None]).log_prob(w)
        integrand = log_q - layer.prior.log_prob(w)
        exact += float((integrand * torch.tensor(weights)).sum() / math.sqrt(2 * math.pi))
    torch.manual_seed(1)
    estimates = torch.tensor([float(layer.kl()) for _ in range(4000)], dtype=torch.float64)
    se = float(estimates.std() / math.sqrt(len(estimates)))
    assert abs(float(estimates.mean()) - exact) < 5 * se


@pytest.mark.parametrize("estimator", ["local", "flipout"])
@torch.no_grad()
def test_training_passes_have_the_weight_posterior_moments(estimator):
    """A training pass gives each example the output distribution of a weight draw."""
    torch.manual_seed(0)
    layer = VariationalLinear(5, 2, parse_prior("normal:1"), estimator)
    layer.weight_rho.fill_(-1.0)
    h = torch.randn(1, 5).expand(5, 5)
    passes = 4000  # Flipout shares one perturbation within a pass, so pool many passes
    out = torch.cat([layer(h) for _ in range(passes)])
    weight, bias = layer.draw(rng.draw_keys(torch.tensor([3]), 20_000, stream=0)[:, 0])
    drawn = (weight @ h[0]) + bias
    # At least `passes` independent values: the sd of a mean is <= sd / sqrt(passes) and the
    # relative sd of a variance <= sqrt(2 / passes) ~ 2.2%; allow 5 sd and 10% (4.5 sd).
    sd = drawn.std(0)
    assert ((out.mean(0) - drawn.mean(0)).abs() < 5 * sd / math.sqrt(passes)).all()
    assert ((out.var(0) / drawn.var(0) - 1).abs() < 0.1).all()


@torch.no_grad()
def test_grouped_convolution_draws_equal_per_draw_convolutions():
    torch.manual_seed(0)
    conv = VariationalConv2d(2, 3, 3, parse_prior("normal:1"), "local")
    conv.weight_rho.fill_(-2.0)
    h = torch.randn(1, 2, 4, 2, 5, 5)  # [1, U, R, C, H, W]
    keys = rng.draw_keys(torch.tensor([5, 9]), 3, stream=0)  # [n=3, U=2]
    out = conv.draw_forward(h, keys)
    weight, bias = conv.draw(keys)
    for s in range(3):
        for u in range(2):
            expected = F.conv2d(h[0, u], weight[s, u], bias[s, u], padding=1)
            torch.testing.assert_close(out[s, u], expected, rtol=1e-5, atol=1e-5)


def test_moped_starts_from_the_deterministic_weights():
    layer = _layer("normal:1")
    w, b = torch.randn(3, 4), torch.randn(3)
    layer.set_posterior(w, b, delta=0.1)
    torch.testing.assert_close(layer.weight_mu.detach(), w)
    torch.testing.assert_close(layer.weight_sigma.detach(), 0.1 * w.abs(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.bias_sigma.detach(), 0.1 * b.abs(), rtol=1e-4, atol=1e-6)


def test_moped_training_runs_and_records_its_start():
    data = sine_gap().train
    stats = {"x_mean": [0.0], "x_std": [2.0], "y_mean": [0.0], "y_std": [0.5]}
    likelihood = {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"}
    torch.manual_seed(0)
    model = VariationalNet({"in_features": 1, "hidden": [8]}, likelihood, stats)
    options = FitOptions(epochs=5, batch_size=100, lr=1e-2, evaluations=5)
    result = fit_variational(model, data, data.subset(range(40)), options, moped_delta=0.05)
    assert result.metrics["moped"]["delta"] == 0.05
    assert len(result.metrics["epochs"]["elbo"]) == result.epochs_run


@pytest.fixture(scope="module")
def sine_gap_fit():
    # Mean-field VI's in-between uncertainty depends on depth (Foong et al. 2020: with one
    # hidden layer it cannot exceed the variance at the gap's edges), hence three layers.
    return fit_sine_gap(
        "variational",
        {"prior": "normal:1.0", "estimator": "local"},
        {"epochs": 1000, "batch_size": 400, "lr": 2e-2, "evaluations": 10, "patience": None},
        hidden=(20, 20, 20),
    )


def test_negative_elbo_falls_over_training(sine_gap_fit):
    curves = sine_gap_fit.fit.metrics["epochs"]
    elbo = torch.tensor(curves["elbo"])
    assert len(elbo) == sine_gap_fit.fit.epochs_run
    tenth = len(elbo) // 10
    assert elbo[-tenth:].mean() > elbo[:tenth].mean() + 1.0  # nats per example
    # both terms move the way the ELBO trades them: the fit improves, the KL shrinks from
    # its value at the initial (narrow, far from the prior) posterior
    assert (
        np.mean(curves["expected_log_likelihood"][-tenth:]) > curves["expected_log_likelihood"][0]
    )
    assert np.mean(curves["kl"][-tenth:]) < curves["kl"][0]
    torch.testing.assert_close(
        elbo,
        torch.tensor(curves["expected_log_likelihood"])
        - torch.tensor(curves["kl"]) / sine_gap_fit.config["fit_rows"],
        rtol=1e-4,
        atol=1e-4,
    )


def test_variational_on_sine_gap(sine_gap_fit):
    assert_gap_uncertainty_and_coverage(sine_gap_fit)


@pytest.mark.slow
def test_at_step_size_0_01_the_elbo_gets_near_its_optimum_and_the_gap_shows():
    """What the README says of variational: with every default but `--lr 0.01` (fit seed 0,
    the 100-100 network and 4,000-step budget), the ELBO gets near its optimum and the
    posterior is more unsure in toy:sine-gap's gap than on the data.

    At the default step size (1e-3) the posterior scales cannot leave their 0.01 start in
    the budget: the last epoch's ELBO was -8.1 to -8.4 nats per example over fit seeds 0-2
    (docs/results/gap.md) and the ratio 1.45-1.84. At 0.01 the ELBO was -0.25 to -0.58 (seeds 0-2)
    and the ratio 1.79-2.42 over seeds 0-4 (its Monte-Carlo error with 200 draws is a few
    percent). One seed cannot tell the two step sizes apart by the ratio alone, so the
    ELBO bound (-2: 3x the worst seed's distance from 0, a quarter of the default's) holds
    the fit to its objective, and the ratio bound (1.5, 16% under the lowest seed) says the
    gap shows.
    """
    data = sine_gap()
    result = train_model(data.train, data.test, method="variational", options=FitOptions(lr=1e-2))
    elbo = result.fit.metrics["epochs"]["elbo"]
    assert elbo[-1] > -2.0, elbo[-1]
    measured = gap_ratio(result.model, data.test.x)
    assert measured.ratio >= 1.5, measured
    assert 0.90 <= result.metrics["test"]["coverage_95"] <= 0.99
