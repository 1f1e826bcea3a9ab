"""Training a deep ensemble (and the MAP network under a Laplace approximation).

All members are stacked parameters, so the loss is the sum over members of each member's
mean NLL + negative log prior / N: members' gradients do not interact and one Adam step (an
elementwise optimizer) is exactly M independent Adam steps. Diversity comes from the
independent random initialization (Lakshminarayanan et al. 2017).
"""

from __future__ import annotations

import torch

from training.data import Dataset
from training.fit import FitOptions, FitResult, Terms, fit
from training.model import PosteriorModel
from training.posteriors.stacked import Stacked


def fit_ensemble(
    model: Stacked, train: Dataset, val: Dataset | None, options: FitOptions
) -> FitResult:
    """Fit every member in place; early-stops on the ensemble's validation predictive."""
    n = len(train)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        nll = model.member_nll(model(x), y)
        return nll.sum() + model.penalty(n), {"nll": nll.detach().mean()}

    return fit(model, train, val, options, loss_fn, val_samples=model.members)


def fit_map(
    model: PosteriorModel, train: Dataset, val: Dataset | None, options: FitOptions
) -> FitResult:
    """MAP fit of a deterministic model: mean NLL + model.penalty(N)."""
    n = len(train)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        nll = model.head.nll(model(x), y).mean()
        return nll + model.penalty(n), {"nll": nll.detach()}

    return fit(model, train, val, options, loss_fn, val_samples=1)
