"""Prior strings: parsing, densities against scipy, and the Gaussian KL against Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from training.priors import GaussianPrior, ScaleMixturePrior, log_prior, parse_prior


def test_parse_round_trips_and_normalizes():
    assert parse_prior("normal:1.0") == GaussianPrior(1.0)
    assert parse_prior(" mixture:0.5,1,0.0025 ") == ScaleMixturePrior(0.5, 1.0, 0.0025)
    for spec in ("normal:0.3", "mixture:0.25,2,0.01"):
        assert parse_prior(parse_prior(spec).spec) == parse_prior(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("laplace:1", "unknown prior"),
        ("normal:", "expected 1"),
        ("normal:-1", "positive"),
        ("normal:nan", "expected 1"),
        ("mixture:0.5,1", "expected 3"),
        ("mixture:1.5,1,0.1", "0 < pi < 1"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_prior(spec)


def test_log_densities_match_scipy():
    w = torch.linspace(-3, 3, 13, dtype=torch.float64)
    gauss = parse_prior("normal:0.7").log_prob(w).numpy()
    np.testing.assert_allclose(gauss, stats.norm(0, 0.7).logpdf(w.numpy()), rtol=1e-12)
    mix = parse_prior("mixture:0.3,1.5,0.05").log_prob(w).numpy()
    density = 0.3 * stats.norm(0, 1.5).pdf(w.numpy()) + 0.7 * stats.norm(0, 0.05).pdf(w.numpy())
    np.testing.assert_allclose(mix, np.log(density), rtol=1e-10)
    params = [w[:5], w[5:]]
    assert float(log_prior(parse_prior("normal:0.7"), params)) == pytest.approx(gauss.sum())


def test_gaussian_kl_closed_form_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(20, generator=gen, dtype=torch.float64)
    sigma = 0.1 + torch.rand(20, generator=gen, dtype=torch.float64)
    prior = GaussianPrior(0.8)
    closed = prior.kl(mu, sigma)
    eps = torch.randn(100_000, 20, generator=gen, dtype=torch.float64)
    w = mu + sigma * eps
    log_q = -0.5 * eps**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    per_sample = log_q - prior.log_prob(w)
    estimate, se = per_sample.mean(0), per_sample.std(0) / math.sqrt(len(eps))
    # Each element's Monte-Carlo estimate is within 5 standard errors (a 1-in-1.7-million
    # event per element under the CLT) of the closed form.
    assert ((estimate - closed).abs() < 5 * se).all()


def test_mixture_has_no_closed_form_kl():
    assert parse_prior("mixture:0.5,1,0.01").kl(torch.zeros(1), torch.ones(1)) is None
