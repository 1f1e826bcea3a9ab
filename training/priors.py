"""Weight priors as configuration strings, parsed in this one place.

    normal:SIGMA                  w ~ N(0, SIGMA^2)
    mixture:PI,SIGMA1,SIGMA2      w ~ PI N(0, SIGMA1^2) + (1 - PI) N(0, SIGMA2^2)   (Blundell 2015)

Every method uses the same object: variational inference for its KL term (closed form for the
Gaussian, Monte Carlo for the mixture), SG-MCMC for the log prior in its potential, and MAP
training (ensembles, Laplace) for the penalty, which for `normal` is weight decay. Densities are
on standardized inputs and targets, which is where the networks live.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _normal_log_prob(w: torch.Tensor, sigma: float) -> torch.Tensor:
    return -0.5 * (w / sigma) ** 2 - math.log(sigma) - _LOG_SQRT_2PI


@dataclass(frozen=True)
class GaussianPrior:
    """Isotropic Gaussian; its MAP penalty is weight decay with precision 1 / sigma^2."""

    sigma: float

    @property
    def spec(self) -> str:
        return f"normal:{self.sigma:g}"

    @property
    def precision(self) -> float:
        return 1.0 / self.sigma**2

    def log_prob(self, w: torch.Tensor) -> torch.Tensor:
        """Elementwise log density."""
        return _normal_log_prob(w, self.sigma)

    def kl(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        """Elementwise KL(N(mu, sigma^2) || prior) in closed form."""
        ratio = (sigma / self.sigma) ** 2
        return 0.5 * (ratio + (mu / self.sigma) ** 2 - 1.0 - torch.log(ratio))


@dataclass(frozen=True)
class ScaleMixturePrior:
    """Two zero-mean Gaussians: a wide one and a narrow one that pulls weights to zero.

    The KL from a Gaussian has no closed form, so `kl` returns None and variational inference
    estimates it by Monte Carlo.
    """

    pi: float
    sigma1: float
    sigma2: float

    @property
    def spec(self) -> str:
        return f"mixture:{self.pi:g},{self.sigma1:g},{self.sigma2:g}"

    @property
    def precision(self) -> float:
        """Precision of the moment-matched Gaussian (for Laplace's initial guess)."""
        return 1.0 / (self.pi * self.sigma1**2 + (1 - self.pi) * self.sigma2**2)

    def log_prob(self, w: torch.Tensor) -> torch.Tensor:
        a = math.log(self.pi) + _normal_log_prob(w, self.sigma1)
        b = math.log1p(-self.pi) + _normal_log_prob(w, self.sigma2)
        return torch.logaddexp(a, b)

    def kl(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        return None


Prior = GaussianPrior | ScaleMixturePrior
DEFAULT_PRIOR = "normal:1.0"


def _floats(text: str, count: int, spec: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ValueError(f"prior {spec!r}: expected {count} comma-separated numbers after ':'")
    return values


def parse_prior(spec: str | Prior) -> Prior:
    """`normal:1.0` or `mixture:0.5,1.0,0.0025` -> a prior object (objects pass through)."""
    if isinstance(spec, GaussianPrior | ScaleMixturePrior):
        return spec
    kind, _, params = spec.strip().partition(":")
    if kind == "normal":
        (sigma,) = _floats(params, 1, spec)
        if sigma <= 0:
            raise ValueError(f"prior {spec!r}: the scale must be positive")
        return GaussianPrior(sigma)
    if kind == "mixture":
        pi, sigma1, sigma2 = _floats(params, 3, spec)
        if not 0 < pi < 1 or sigma1 <= 0 or sigma2 <= 0:
            raise ValueError(f"prior {spec!r}: need 0 < pi < 1 and positive scales")
        return ScaleMixturePrior(pi, sigma1, sigma2)
    raise ValueError(f"unknown prior {spec!r}; use normal:SIGMA or mixture:PI,SIGMA1,SIGMA2")


def log_prior(prior: Prior, params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of the log density over every element of `params`."""
    return sum((prior.log_prob(p).sum() for p in params), torch.zeros(()))
