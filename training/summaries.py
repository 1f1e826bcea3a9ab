"""Predictive summaries of posterior draws, shared by evaluation and the server.

Regression: the predictive is the Monte-Carlo mixture 1/n sum_s N(mu_s, sigma2_s); its mean,
its variance split into epistemic (var_s mu_s) and aleatoric (avg_s sigma2_s) parts, and
central credible intervals from the mixture's own quantiles (not mean +- z std, which is
wrong for skewed or multimodal predictives).
Classification: the mean of the per-draw softmax, its entropy, the expected per-draw
entropy (aleatoric) and their difference, the mutual information (epistemic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Summary = dict[str, torch.Tensor]

_TAIL_SDS = 40.0  # bracket far enough out that the mixture CDF underflows float64 to 0 / 1
_MAX_ITERATIONS = 100


def mixture_quantile(
    mean: torch.Tensor, variance: torch.Tensor, probs: Sequence[float], tol: float = 1e-12
) -> torch.Tensor:
    """Quantiles [Q, ...] of the mixtures 1/n sum_s N(mean[s], variance[s]) over axis 0.

    Safeguarded Newton: a Newton step when it stays inside the bracket that the CDF values
    keep shrinking, a bisection step otherwise; in float64, vectorized over every quantile
    and every mixture at once.
    """
    mu, sd = mean.double(), variance.double().clamp_min(1e-300).sqrt()
    q = torch.tensor(list(probs), dtype=torch.float64, device=mu.device)
    q = q.view(-1, *([1] * (mu.dim() - 1)))
    shape = (q.shape[0], *mu.shape[1:])
    lo = (mu - _TAIL_SDS * sd).amin(0).expand(shape).clone()
    hi = (mu + _TAIL_SDS * sd).amax(0).expand(shape).clone()
    moment_sd = (variance.double().mean(0) + mu.var(0, unbiased=False)).sqrt()
    x = (mu.mean(0) + moment_sd * torch.special.ndtri(q)).clamp(lo, hi)
    mu, sd = mu.unsqueeze(1), sd.unsqueeze(1)  # [n, 1, ...] against x [Q, ...]
    for _ in range(_MAX_ITERATIONS):
        z = (x - mu) / sd
        excess = torch.special.ndtr(z).mean(0) - q
        density = (torch.exp(-0.5 * z * z) / sd).mean(0) / math.sqrt(2 * math.pi)
        lo = torch.where(excess < 0, x, lo)
        hi = torch.where(excess > 0, x, hi)
        newton = x - excess / density
        inside = (newton > lo) & (newton < hi)
        step = torch.where(inside, newton, 0.5 * (lo + hi))
        done = (step - x).abs() <= tol * (1 + x.abs())
        x = step
        if bool(done.all()):
            break
    return x


def regression_summary(draws: torch.Tensor, levels: Sequence[float]) -> Summary:
    """Draws [n, B, 2k] of per-draw (mean | variance) -> mixture summaries per row and target."""
    k = draws.shape[-1] // 2
    mu, var = draws[..., :k].double(), draws[..., k:].double()
    mean = mu.mean(0)
    epistemic = mu.var(0, unbiased=False)
    aleatoric = var.mean(0)
    variance = epistemic + aleatoric
    tails = [(1 - level) / 2 for level in levels]
    bounds = mixture_quantile(mu, var, [*tails, *(1 - t for t in tails)])
    return {
        "mean": mean,
        "std": variance.sqrt(),
        "variance": variance,
        "epistemic_variance": epistemic,
        "aleatoric_variance": aleatoric,
        "lower": bounds[: len(levels)],
        "upper": bounds[len(levels) :],
    }


def classification_summary(logits: torch.Tensor, levels: Sequence[float]) -> Summary:
    """Draws [n, B, C] of logits -> predictive probabilities and entropy decomposition."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    p = log_p.exp()
    p_mean = p.mean(0)
    entropy = -torch.special.xlogy(p_mean, p_mean).sum(-1)
    expected_entropy = -(p * log_p).sum(-1).mean(0)
    confidence, predicted = p_mean.max(-1)
    tails = torch.tensor([(1 - level) / 2 for level in levels], dtype=torch.float64)
    return {
        "probabilities": p_mean,
        "predicted_class": predicted,
        "confidence": confidence,
        "entropy": entropy,
        "expected_entropy": expected_entropy,
        "mutual_information": (entropy - expected_entropy).clamp_min(0),
        "lower": torch.quantile(p, tails.to(p.device), dim=0),
        "upper": torch.quantile(p, (1 - tails).to(p.device), dim=0),
    }


def summarize(task: str, draws: torch.Tensor, levels: Sequence[float]) -> Summary:
    if task == "regression":
        return regression_summary(draws, levels)
    if task == "classification":
        return classification_summary(draws, levels)
    raise ValueError(f"unknown task {task!r}")
