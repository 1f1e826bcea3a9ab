"""The continuous ranked probability score of Gaussians and of Monte-Carlo Gaussian mixtures.

CRPS(F, y) = E|X - y| - E|X - X'| / 2 with X, X' independent draws of F: a proper score in
the units of y that rewards sharpness and calibration together, and for a point forecast is
its absolute error. For a mixture sum_i w_i N(mu_i, s2_i) it has a closed form (Grimit et
al. 2006), since X - y and X_i - X_j are Gaussian and E|N(m, v)| = A(m, v) is known:

    CRPS = sum_i w_i A(mu_i - y, s2_i) - 1/2 sum_ij w_i w_j A(mu_i - mu_j, s2_i + s2_j)
    A(m, v) = m (2 Phi(m / sqrt v) - 1) + 2 sqrt(v) phi(m / sqrt v)

A network's predictive is the equal-weight mixture of its n draws' Gaussians, so its exact
CRPS costs O(n^2) per point: cheap for the hundreds of draws a forecast uses.
"""

from __future__ import annotations

import math

import torch

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _abs_moment(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """E|Z| for Z ~ N(m, v)."""
    s = v.sqrt()
    z = m / s
    return m * torch.erf(z / _SQRT2) + 2 * s * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def crps_gaussian(mean: torch.Tensor, variance: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CRPS of N(mean, variance) at y, elementwise (Gneiting et al. 2005)."""
    mean, variance, y = (torch.as_tensor(t, dtype=torch.float64) for t in (mean, variance, y))
    s = variance.sqrt()
    z = (y - mean) / s
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
    cdf = 0.5 * (1 + torch.erf(z / _SQRT2))
    return s * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def crps_mixture(mean: torch.Tensor, variance: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CRPS at y [*shape] of the equal-weight mixture of Gaussians mean, variance [n, *shape]
    (the draws' per-draw Gaussians, as a regression model's `sample` returns them)."""
    mu, var, y = (torch.as_tensor(t, dtype=torch.float64) for t in (mean, variance, y))
    if mu.shape != var.shape or mu.shape[1:] != y.shape:
        raise ValueError(f"mean, variance [n, *shape] and y [*shape]: got {mu.shape}, {y.shape}")
    spread = _abs_moment(mu - y, var).mean(0)
    pair = torch.stack(  # one row of the n x n pair matrix at a time: memory stays [n, *shape]
        [_abs_moment(mu[i] - mu, var[i] + var).mean(0) for i in range(len(mu))]
    ).mean(0)
    return spread - 0.5 * pair
