"""Shared by the posterior-method tests: fitting toy:sine-gap and checking its uncertainty.

toy:sine-gap has no training inputs in (-1, 1), and its noise sd (0.1) is known, so a
posterior should be more uncertain in the gap than where the data are, and its 95% intervals
should cover about 95% of 2000 fresh points from the training distribution.
"""

from __future__ import annotations

import functools
from typing import Any

import training.posteriors.methods  # noqa: F401  (adds the methods to credence-train's table)
from training.data import LoadedData, load_toy
from training.fit import FitOptions
from training.gap import GAP_DRAWS as DRAWS
from training.gap import gap_ratio
from training.train import TrainResult, train_model

# each method's options beyond the architecture, small enough for fast model-level tests
METHOD_EXTRA: dict[str, dict[str, Any]] = {
    "mc_dropout": {"dropout": 0.2, "input_dropout": True},
    "ensemble": {"members": 4},
    "sgld": {"members": 4},
    "sghmc": {"members": 4},
    "variational": {"prior": "normal:1"},
    "laplace": {"structure": "kron"},
}


@functools.cache
def sine_gap() -> LoadedData:
    return load_toy("sine-gap")


def fit_sine_gap(
    method: str,
    method_options: dict[str, Any],
    options: dict[str, Any],
    hidden: tuple[int, ...] = (50, 50),
    noise: str = "homoscedastic",
    eval_samples: int = DRAWS,
) -> TrainResult:
    data = sine_gap()
    return train_model(
        data.train,
        data.test,
        method=method,
        method_options=method_options,
        hidden=hidden,
        noise=noise,
        options=FitOptions(**options),
        eval_samples=eval_samples,
        noise_refit=False,  # test the method's own noise estimate, not a post-hoc refit
    )


def assert_gap_uncertainty_and_coverage(result: TrainResult, draws: int = DRAWS) -> None:
    """Mean epistemic std in the gap >= 2x its mean over the held-out points; and the 95%
    predictive intervals cover a fraction of the 2000 held-out points in [0.90, 0.99].

    The coverage band is wide on purpose: its Monte-Carlo error is small (the sd of a
    binomial fraction at 0.95 over 2000 points is 0.005, so the band is 8-10 sd from 0.95),
    and what it allows for is the approximation's own miscalibration.
    """
    measured = gap_ratio(result.model, sine_gap().test.x, draws)
    assert measured.ratio >= 2, measured
    coverage = result.metrics["test"]["coverage_95"]
    assert result.metrics["test"]["rows"] >= 2000
    assert 0.90 <= coverage <= 0.99, coverage
