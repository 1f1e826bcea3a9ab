"""Last-layer Laplace: exact on Bayesian linear regression, evidence-tuned, and on sine-gap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from methods_support import assert_gap_uncertainty_and_coverage, fit_sine_gap
from scipy import stats

from training.build import build_model
from training.posteriors.laplace import LastLayerLaplace
from training.posteriors.laplace_fit import PRIOR_PRECISION_GRID, fit_last_layer

NOISE_VARIANCE = 0.04
IDENTITY = {"x_mean": [0.0] * 3, "x_std": [1.0] * 3, "y_mean": [0.0], "y_std": [1.0]}


def _regression(hidden: list[int], structure: str) -> tuple[LastLayerLaplace, torch.Tensor, ...]:
    """A model whose outputs are linear in the last layer given fixed features, and data."""
    torch.manual_seed(0)
    likelihood = {"kind": "gaussian", "num_targets": 1, "noise": "fixed"}
    likelihood["noise_variance"] = NOISE_VARIANCE
    arch = {"in_features": 3, "hidden": hidden, "structure": structure}
    model = build_model({"method": "laplace", "arch": arch, "likelihood": likelihood}, IDENTITY)
    z = torch.randn(60, 3)
    y = z @ torch.tensor([[1.0], [-0.5], [0.3]]) + 0.2 * torch.randn(60, 1) + 0.7
    return model, z, y


def _blr(phi: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form Bayesian linear regression posterior N(mean, cov) for prior N(0, I/lam)."""
    phi, y = phi.double(), y.double()
    precision = phi.T @ phi / NOISE_VARIANCE + lam * torch.eye(phi.shape[1], dtype=phi.dtype)
    cov = torch.linalg.inv(precision)
    return (cov @ phi.T @ y / NOISE_VARIANCE).squeeze(1), cov


@pytest.mark.parametrize("structure", ["full", "kron"])
@pytest.mark.parametrize("hidden", [[], [16]], ids=["identity-features", "fixed-relu-features"])
def test_gaussian_last_layer_laplace_is_bayesian_linear_regression(hidden, structure):
    model, z, y = _regression(hidden, structure)
    fit_last_layer(model, z, y, prior_precision=2.5)
    with torch.no_grad():
        phi = model.features(z)
    mean, cov = _blr(phi, y, 2.5)
    torch.testing.assert_close(model.last_weight()[0].double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.weight_covariance().double(), cov, rtol=1e-4, atol=1e-7)

    # The served predictive: draws of the mean are N(phi m, phi S phi^T) plus the noise.
    x = torch.randn(4, 3)
    with torch.no_grad():
        phi_x = model.features(x).double()
    n = 20_000
    draws = model.sample(x, n, torch.zeros(4, dtype=torch.int64)).double()
    mu, aleatoric = draws[..., 0], draws[..., 1]
    exact_mean = phi_x @ mean
    exact_var = ((phi_x @ cov) * phi_x).sum(1)
    # Monte-Carlo error: the sample mean has sd sqrt(var / n); a sample variance of normals
    # has relative sd sqrt(2 / n) ~ 1%; both are allowed 5 sd.
    assert ((mu.mean(0) - exact_mean).abs() < 5 * (exact_var / n).sqrt()).all()
    assert ((mu.var(0) / exact_var - 1).abs() < 5 * math.sqrt(2 / n)).all()
    torch.testing.assert_close(aleatoric, torch.full_like(aleatoric, NOISE_VARIANCE))


def test_diagonal_structure_keeps_the_hessian_diagonal():
    model, z, y = _regression([], "diag")
    fit_last_layer(model, z, y, prior_precision=2.5)
    phi = model.features(z).double()
    expected = 1.0 / ((phi**2).sum(0) / NOISE_VARIANCE + 2.5)
    cov = model.weight_covariance().double()
    torch.testing.assert_close(torch.diag(cov), expected, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(cov, torch.diag(torch.diag(cov)))


def test_prior_precision_maximizes_the_exact_evidence():
    model, z, y = _regression([], "full")
    fit = fit_last_layer(model, z, y)
    phi = model.features(z).double().numpy()
    yn = y.double().numpy()[:, 0]

    def log_evidence(lam: float) -> float:  # y ~ N(0, Phi Phi^T / lam + noise I)
        cov = phi @ phi.T / lam + NOISE_VARIANCE * np.eye(len(yn))
        return stats.multivariate_normal(np.zeros(len(yn)), cov).logpdf(yn)

    exact = np.array([log_evidence(lam) for lam in PRIOR_PRECISION_GRID.tolist()])
    assert fit.prior_precision == pytest.approx(float(PRIOR_PRECISION_GRID[exact.argmax()]))
    np.testing.assert_allclose(fit.evidence_curve, exact, rtol=1e-6)
    mean, _ = _blr(model.features(z), y, fit.prior_precision)  # and W* re-solved at lambda*
    torch.testing.assert_close(model.last_weight()[0].double(), mean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_categorical_covariance_is_the_inverse_ggn_of_its_structure(structure):
    torch.manual_seed(0)
    arch = {"in_features": 3, "hidden": [4], "structure": structure}
    config = {"method": "laplace", "arch": arch, "likelihood": {"kind": "categorical"}}
    config["likelihood"]["num_classes"] = 3
    model = build_model(config, {"x_mean": [0.0] * 3, "x_std": [1.0] * 3})
    z, y = torch.randn(30, 3), torch.randint(0, 3, (30,))
    fit_last_layer(model, z, y, prior_precision=0.7)
    with torch.no_grad():
        phi = model.features(z).double()
        p = torch.softmax(model(z).double(), -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    per_example = torch.stack([torch.kron(lam[i], torch.outer(phi[i], phi[i])) for i in range(30)])
    if structure == "full":
        ggn = per_example.sum(0)
    elif structure == "kron":  # K-FAC: E[Lambda] x sum phi phi^T
        ggn = torch.kron(lam.mean(0), phi.T @ phi)
    else:
        ggn = torch.diag(torch.diagonal(per_example.sum(0)))
    expected = torch.linalg.inv(ggn + 0.7 * torch.eye(len(ggn), dtype=ggn.dtype))
    torch.testing.assert_close(model.weight_covariance().double(), expected, rtol=2e-4, atol=1e-6)


@pytest.fixture(scope="module")
def sine_gap_fit():
    return fit_sine_gap(
        "laplace",
        {"structure": "kron"},
        {"epochs": 600, "batch_size": 120, "lr": 1e-2, "evaluations": 20},
    )


def test_laplace_on_sine_gap(sine_gap_fit):
    assert_gap_uncertainty_and_coverage(sine_gap_fit)
    laplace = sine_gap_fit.fit.metrics["laplace"]
    assert laplace["tuned"] and laplace["prior_precision"] > 0
