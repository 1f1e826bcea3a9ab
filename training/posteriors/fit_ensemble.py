"""Training a deep ensemble (and the MAP network under a Laplace approximation).

All members are stacked parameters, so the loss is the sum over members of each member's
mean NLL + negative log prior / N: members' gradients do not interact and one Adam step (an
elementwise optimizer) is exactly M independent Adam steps. Diversity comes from the
independent random initialization (Lakshminarayanan et al. 2017). What members share (a
learned homoscedastic noise, the early-stopping score) is computed from all of them in
member order, so the members can be spread over processes (training.distributed).
"""

from __future__ import annotations

import torch

from training.data import Dataset
from training.distributed import SINGLE, Spread
from training.fit import FitOptions, FitResult, Terms, fit
from training.metrics import CHUNK_ROWS, as_tensor, pointwise_log_likelihood
from training.model import PosteriorModel
from training.posteriors.stacked import Stacked


def fit_ensemble(
    model: Stacked,
    train: Dataset,
    val: Dataset | None,
    options: FitOptions,
    spread: Spread = SINGLE,
) -> FitResult:
    """Fit every member in place (this process's block of them, with `spread`, after which
    every process holds every member); early-stops on the ensemble's validation predictive."""
    n = len(train)
    block = spread.block(model.members)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        noise = model.member_noise(block, spread)
        nll = model.member_nll(model.run_block(x, block), y, noise)
        return nll.sum() + model.penalty(n, block), {"nll": nll}

    def every_member(values: torch.Tensor) -> torch.Tensor:  # [steps, m] -> [steps, M]
        return spread.gather(values.T.contiguous(), model.members).T.contiguous()

    score = None if val is None else lambda: members_log_likelihood(model, val, spread)
    result = fit(model, train, val, options, loss_fn, val_score=score, member_terms=every_member)
    model.gather_members(spread)
    return result


def members_log_likelihood(model: Stacked, data: Dataset, spread: Spread = SINGLE) -> float:
    """Mean log-likelihood per row of `data` under the mixture of every member's predictive
    (original units), each process drawing its own block; rank 0's value on every process."""
    block = spread.block(model.members)
    x = as_tensor(data.x, torch.float32)
    parts = [model.block_draws(x[i : i + CHUNK_ROWS], block) for i in range(0, len(x), CHUNK_ROWS)]
    draws = spread.gather(torch.cat(parts, dim=1), model.members)
    score = float(pointwise_log_likelihood(data.task, draws, torch.as_tensor(data.y)).mean())
    return spread.agree(score)


def fit_map(
    model: PosteriorModel, train: Dataset, val: Dataset | None, options: FitOptions
) -> FitResult:
    """MAP fit of a deterministic model: mean NLL + model.penalty(N)."""
    n = len(train)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        nll = model.head.nll(model(x), y).mean()
        return nll + model.penalty(n), {"nll": nll.detach()}

    return fit(model, train, val, options, loss_fn, val_samples=1)
