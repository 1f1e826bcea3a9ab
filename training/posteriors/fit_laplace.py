"""Training a last-layer Laplace model: a MAP fit, then the Gaussian over the last layer."""

from __future__ import annotations

from training.data import Dataset
from training.fit import FitOptions, FitResult, standardized, torch_threads
from training.posteriors.fit_ensemble import fit_map
from training.posteriors.laplace import LastLayerLaplace
from training.posteriors.laplace_fit import fit_last_layer


def fit_laplace(
    model: LastLayerLaplace,
    train: Dataset,
    val: Dataset | None,
    options: FitOptions,
    prior_precision: float | None = None,
) -> FitResult:
    """MAP-train `model` under its prior, then fit the last-layer posterior on the training
    rows; `prior_precision` None tunes it by the Laplace evidence."""
    result = fit_map(model, train, val, options)
    with torch_threads(options.threads):
        laplace = fit_last_layer(model, *standardized(model, train), prior_precision)
    result.metrics["laplace"] = {
        "structure": model.structure,
        "prior_precision": laplace.prior_precision,
        "log_evidence": laplace.log_evidence,
        "tuned": prior_precision is None,
    }
    return result
