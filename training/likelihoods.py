"""Likelihood heads: how a network's raw output becomes one predictive distribution per draw.

Heads work in standardized units. `per_draw` turns raw outputs into the tensor the sampler
contract returns (Gaussian: mean and variance side by side on the last axis; categorical:
logits); `nll` is the per-example training loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.pointwise import softplus

MIN_VARIANCE = 1e-6
NOISE_KINDS = ("homoscedastic", "heteroscedastic", "fixed")


class GaussianHead(nn.Module):
    """Gaussian likelihood: homoscedastic noise (learned or fixed) or a heteroscedastic head."""

    task = "regression"

    def __init__(self, num_targets: int, noise: str = "homoscedastic", noise_variance: float = 0.1):
        super().__init__()
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
        self.num_targets, self.noise = num_targets, noise
        log_var = torch.full((num_targets,), math.log(noise_variance))
        if noise == "homoscedastic":
            self.log_noise_variance = nn.Parameter(log_var)
        elif noise == "fixed":
            self.register_buffer("log_noise_variance", log_var, persistent=False)

    @property
    def raw_features(self) -> int:
        return 2 * self.num_targets if self.noise == "heteroscedastic" else self.num_targets

    def config(self) -> dict:
        cfg = {"kind": "gaussian", "num_targets": self.num_targets, "noise": self.noise}
        if self.noise == "fixed":
            cfg["noise_variance"] = float(self.log_noise_variance.exp()[0])
        return cfg

    def per_draw(
        self, raw: torch.Tensor, log_noise_variance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`log_noise_variance` (broadcast against `raw`) replaces the homoscedastic noise's
        own parameter, e.g. with one copy per stacked member."""
        k = self.num_targets
        if self.noise == "heteroscedastic":
            mean, variance = raw[..., :k], softplus(raw[..., k:]) + MIN_VARIANCE
        else:
            log_var = self.log_noise_variance if log_noise_variance is None else log_noise_variance
            mean, variance = raw, log_var.exp().expand_as(raw)
        return torch.cat([mean, variance], dim=-1)

    def nll(
        self, raw: torch.Tensor, y: torch.Tensor, log_noise_variance: torch.Tensor | None = None
    ) -> torch.Tensor:
        k = self.num_targets
        out = self.per_draw(raw, log_noise_variance)
        mean, variance = out[..., :k], out[..., k:]
        return (0.5 * (torch.log(2 * math.pi * variance) + (y - mean) ** 2 / variance)).sum(-1)


class CategoricalHead(nn.Module):
    """Softmax likelihood over `num_classes` labels; draws are logits."""

    task = "classification"

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    @property
    def raw_features(self) -> int:
        return self.num_classes

    def config(self) -> dict:
        return {"kind": "categorical", "num_classes": self.num_classes}

    def per_draw(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def nll(self, raw: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(raw, y.long(), reduction="none")


def build_head(config: dict) -> GaussianHead | CategoricalHead:
    kind = config.get("kind")
    if kind == "gaussian":
        return GaussianHead(
            config["num_targets"],
            config.get("noise", "homoscedastic"),
            config.get("noise_variance", 0.1),
        )
    if kind == "categorical":
        return CategoricalHead(config["num_classes"])
    raise ValueError(f"unknown likelihood kind {kind!r}")
