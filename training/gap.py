"""In-between uncertainty on toy:sine-gap: how much more unsure a posterior is in the gap.

toy:sine-gap has no training inputs in (-1, 1). A posterior that knows what it has not seen
is more uncertain there than where the data are; mean-field approximations are known to
miss this (Foong et al. 2019, "In-between uncertainty in Bayesian neural networks"). The
measure is one number, the gap/data ratio: the mean epistemic std (original units) on
GAP_INPUTS, 37 inputs evenly spaced 0.1 inside the gap's edges, over its mean on the
held-out test points of toy:sine-gap (fresh draws from the training distribution). Tests and
`benchmarks/gap.py` share this definition, so the README's numbers and the tests' thresholds
are about the same quantity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.data import SINE_GAP_GAP
from training.metrics import sample_draws
from training.model import PosteriorModel, draws_used
from training.summaries import summarize

EDGE_MARGIN = 0.1  # distance of the outermost gap input from the nearest training input
GAP_INPUTS = np.linspace(
    SINE_GAP_GAP[0] + EDGE_MARGIN, SINE_GAP_GAP[1] - EDGE_MARGIN, 37, dtype=np.float32
)[:, None]
GAP_DRAWS = 200


def epistemic_std(
    model: PosteriorModel, x: np.ndarray, draws: int = GAP_DRAWS, seed: int = 0
) -> torch.Tensor:
    """Per-row epistemic std (original units, first target) from `draws` posterior draws."""
    summary = summarize("regression", sample_draws(model, x, draws, seed=seed), [])
    return summary["epistemic_variance"].sqrt()[:, 0]


@dataclass(frozen=True)
class GapRatio:
    """Mean epistemic std in the gap and where the data are, and the draws they used."""

    gap: float
    data: float
    draws: int

    @property
    def ratio(self) -> float:
        return self.gap / self.data


def gap_ratio(model: PosteriorModel, data_x: np.ndarray, draws: int = GAP_DRAWS) -> GapRatio:
    """The gap/data ratio of `model`, with `data_x` the held-out inputs of toy:sine-gap.

    A stored set of M draws (ensemble members, SG-MCMC samples) is used once each (draws
    capped at M, as a served request is): more would repeat some members more often than
    others and weight the variance unevenly.
    """
    draws = draws_used(draws, model.set_size)
    gap = float(epistemic_std(model, GAP_INPUTS, draws).mean())
    data = float(epistemic_std(model, data_x, draws).mean())
    return GapRatio(gap, data, draws)
