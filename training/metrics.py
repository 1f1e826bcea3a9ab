"""Evaluation from posterior draws, in original units.

Regression: RMSE of the predictive mean, the test log-likelihood of the Monte-Carlo mixture
(log 1/n sum_s N(y | mu_s, sigma2_s), averaged over points: the number the MC-dropout papers
report), and the coverage (PICP) and mean width of the central predictive intervals, raw and,
for a calibrated model, calibrated (`training.calibration`).
Classification: accuracy, NLL of the averaged probabilities, expected calibration error.
The predictive summaries themselves come from `training.summaries.summarize`, the code the
server uses, so what is measured here is what is served.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from training.calibration import (
    Calibration,
    calibrated_summary,
    method_name,
    variance_scaled_draws,
)
from training.data import Dataset
from training.model import PosteriorModel
from training.summaries import summarize

INTERVAL_LEVEL = 0.95
ECE_BINS = 15
UNCERTAINTY_QUANTILES = (0.5, 0.9, 0.99)
CHUNK_ROWS = 4096


def as_tensor(values: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(values).to(dtype)


def sample_draws(
    model: PosteriorModel,
    x: np.ndarray | torch.Tensor,
    n: int,
    seed: int,
    per_row: bool = False,
) -> torch.Tensor:
    """Draws [n, B, out] for every row of `x` (original units), all rows under one seed (one
    request), or with `per_row` each under its own (seed + row: independent requests).

    Rows go through in chunks to bound memory; a draw depends only on (seed, draw index), so
    chunking changes the numbers by float rounding at most.
    """
    x = as_tensor(x, torch.float32)
    if per_row:
        seeds = seed + torch.arange(len(x), dtype=torch.int64)
    else:
        seeds = torch.full((len(x),), seed, dtype=torch.int64)
    parts = [
        model.sample(x[i : i + CHUNK_ROWS], n, seeds[i : i + CHUNK_ROWS])
        for i in range(0, len(x), CHUNK_ROWS)
    ]
    return torch.cat(parts, dim=1)


def pointwise_log_likelihood(task: str, draws: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y_i | x_i) under the Monte-Carlo predictive, per row [B], in float64."""
    n = draws.shape[0]
    draws = draws.double()
    if task == "regression":
        k = draws.shape[-1] // 2
        mu, var = draws[..., :k], draws[..., k:]
        y = y.double().reshape(1, -1, k)
        log_density = -0.5 * (torch.log(2 * math.pi * var) + (y - mu) ** 2 / var)
        per_draw = log_density.sum(-1)  # targets are independent given a draw
    else:
        log_p = torch.log_softmax(draws, dim=-1)
        per_draw = log_p.gather(-1, y.long().view(1, -1, 1).expand(n, -1, 1)).squeeze(-1)
    return torch.logsumexp(per_draw, dim=0) - math.log(n)


def regression_metrics(
    draws: torch.Tensor,
    y: torch.Tensor,
    level: float = INTERVAL_LEVEL,
    calibration: Calibration | dict | None = None,
) -> dict[str, float]:
    """RMSE, mixture log-likelihood and interval coverage / width (averaged over targets).

    `coverage_95` and `interval_width_95` are the raw model's; with a `calibration` the
    served (calibrated) ones are added as `calibrated_coverage_95` and
    `calibrated_interval_width_95`, and for variance scaling, which changes the predictive
    density, `calibrated_log_likelihood`.
    """
    y = as_tensor(y, torch.float64)
    y = y.reshape(len(y), -1)
    summary = summarize("regression", draws, [level])
    lower, upper = summary["lower"][0], summary["upper"][0]
    tag = f"{round(100 * level)}"
    metrics: dict = {
        "rmse": float((summary["mean"] - y).pow(2).mean().sqrt()),
        "log_likelihood": float(pointwise_log_likelihood("regression", draws, y).mean()),
        f"coverage_{tag}": float(((y >= lower) & (y <= upper)).double().mean()),
        f"interval_width_{tag}": float((upper - lower).mean()),
        "rows": len(y),
        "num_samples": draws.shape[0],
    }
    if calibration is not None:
        calibrated = calibrated_summary(draws, [level], calibration)
        lower, upper = calibrated["lower"][0], calibrated["upper"][0]
        metrics[f"calibrated_coverage_{tag}"] = float(((y >= lower) & (y <= upper)).double().mean())
        metrics[f"calibrated_interval_width_{tag}"] = float((upper - lower).mean())
        if method_name(calibration) == "variance":
            scaled = variance_scaled_draws(draws, calibration)
            ll = pointwise_log_likelihood("regression", scaled, y).mean()
            metrics["calibrated_log_likelihood"] = float(ll)
    return metrics


def expected_calibration_error(
    probabilities: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """Weighted mean |accuracy - confidence| over equal-width confidence bins."""
    confidence, predicted = probabilities.max(-1)
    correct = (predicted == y).double()
    which = torch.clamp((confidence * bins).long(), max=bins - 1)
    total = torch.zeros(bins, dtype=torch.float64)
    count = torch.bincount(which, minlength=bins).double()
    gap = total.index_add(0, which, correct - confidence.double())
    return float(gap.abs().sum() / count.sum())


def reliability_bins(
    probabilities: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS
) -> dict[str, list[float]]:
    """A reliability diagram's points: per equal-width confidence bin, its rows, their mean
    confidence and their accuracy (bins with no rows are left out)."""
    confidence, predicted = probabilities.double().max(-1)
    correct = (predicted == as_tensor(y, torch.int64).reshape(-1)).double()
    which = torch.clamp((confidence * bins).long(), max=bins - 1)
    count = torch.bincount(which, minlength=bins).double()
    kept = count > 0
    mean_confidence = torch.zeros(bins, dtype=torch.float64).index_add(0, which, confidence)
    accuracy = torch.zeros(bins, dtype=torch.float64).index_add(0, which, correct)
    return {
        "rows": count[kept].tolist(),
        "confidence": (mean_confidence[kept] / count[kept]).tolist(),
        "accuracy": (accuracy[kept] / count[kept]).tolist(),
    }


def classification_metrics(
    draws: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS
) -> dict[str, float]:
    """Accuracy, NLL of the averaged probabilities, Brier score (the squared error of the
    probability vector, summed over classes) and expected calibration error."""
    y = as_tensor(y, torch.int64).reshape(-1)
    summary = summarize("classification", draws, [])
    p = summary["probabilities"].double()
    brier = (p - torch.nn.functional.one_hot(y, p.shape[-1]).double()).pow(2).sum(-1).mean()
    return {
        "accuracy": float((summary["predicted_class"] == y).double().mean()),
        "nll": float(-pointwise_log_likelihood("classification", draws, y).mean()),
        "brier": float(brier),
        "ece": expected_calibration_error(summary["probabilities"], y, bins),
        "rows": len(y),
        "num_samples": draws.shape[0],
    }


def fit_temperature(draws: torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """The temperature T (logits / T in every draw) that minimizes the NLL of the averaged
    probabilities on held-out rows (Guo et al. 2017, on a Monte-Carlo predictive)."""
    from scipy.optimize import minimize_scalar

    y = as_tensor(y, torch.int64).reshape(-1)
    logits = draws.double()

    def nll(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        return float(-pointwise_log_likelihood("classification", scaled, y).mean())

    return math.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x)


def metrics_from_draws(
    task: str,
    draws: torch.Tensor,
    y: np.ndarray | torch.Tensor,
    calibration: Calibration | dict | None = None,
) -> dict:
    if task == "regression":
        return regression_metrics(draws, as_tensor(y, torch.float64), calibration=calibration)
    return classification_metrics(draws, as_tensor(y, torch.int64))


def evaluate(
    model: PosteriorModel,
    data: Dataset,
    num_samples: int = 100,
    seed: int = 0,
    calibration: Calibration | dict | None = None,
) -> dict:
    """Metrics of `model` on `data`, from `num_samples` posterior draws under `seed`, raw and
    (regression with a `calibration`) calibrated."""
    draws = sample_draws(model, data.x, num_samples, seed)
    return metrics_from_draws(data.task, draws, data.y, calibration)


def _quantiles(values: torch.Tensor, probs: Sequence[float]) -> dict[str, list[float] | float]:
    """{"p50": ..., "p90": ...} over rows (axis 0); a list per output when values are [B, k]."""
    q = torch.quantile(values.double(), torch.tensor(list(probs), dtype=torch.float64), dim=0)
    return {f"p{100 * p:g}": q[i].tolist() for i, p in enumerate(probs)}


def uncertainty_stats(
    task: str,
    draws: torch.Tensor,
    probs: Sequence[float] = UNCERTAINTY_QUANTILES,
    split: str = "validation",
) -> dict:
    """Quantiles of the uncertainty scores on in-distribution rows, for OOD / drift flags.

    Regression: the epistemic std (original units, a list per target) and the total
    predictive std; classification: the mutual information and the predictive entropy (nats).
    A request whose score exceeds, say, the stored p99 is unusual for the training data.
    """
    summary = summarize(task, draws, [])
    if task == "regression":
        scores = {
            "epistemic_std": summary["epistemic_variance"].sqrt(),
            "std": summary["std"],
        }
    else:
        scores = {
            "mutual_information": summary["mutual_information"],
            "entropy": summary["entropy"],
        }
    return {
        "split": split,
        "rows": draws.shape[1],
        "num_samples": draws.shape[0],
        "quantiles": list(probs),
        **{name: _quantiles(values, probs) for name, values in scores.items()},
    }
