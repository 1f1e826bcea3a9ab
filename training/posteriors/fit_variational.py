"""Training a variational posterior: maximize the ELBO, optionally from a MOPED start.

Per example, ELBO / N = E_q[log p(y | x, w)] - KL(q || prior) / N, the first term estimated
by one local-reparameterization (or Flipout) pass per minibatch and the second in closed
form for a Gaussian prior (Monte Carlo for the scale mixture). Both terms and their sum are
recorded per epoch (means over the epoch's minibatches).
"""

from __future__ import annotations

import torch

from training.data import Dataset
from training.fit import FitOptions, FitResult, Terms, fit
from training.posteriors.stacked import DeepEnsemble
from training.posteriors.variational import VariationalNet


def elbo_terms(model: VariationalNet, x: torch.Tensor, y: torch.Tensor, num_train: int) -> Terms:
    """One-sample estimates, per example: expected log-likelihood, KL (whole net), ELBO."""
    expected_ll = -model.head.nll(model(x), y).mean()
    kl = model.kl()
    return {"expected_log_likelihood": expected_ll, "kl": kl, "elbo": expected_ll - kl / num_train}


def moped_init(
    model: VariationalNet, train: Dataset, val: Dataset | None, options: FitOptions, delta: float
) -> FitResult:
    """MOPED (Krishnan et al. 2020): fit the deterministic network (MAP under the same prior),
    then start q at means = its weights and scales = delta |w|."""
    if len(model.convs):
        raise ValueError("MOPED initialization is implemented for MLPs (no conv layers)")
    arch = {**model.arch, "members": 1}
    deterministic = DeepEnsemble(arch, model.head.config(), model.normalizer.stats)
    deterministic.head.load_state_dict(model.head.state_dict())
    n = len(train)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        nll = deterministic.member_nll(deterministic(x), y).sum()
        return nll + deterministic.penalty(n), {"nll": nll.detach()}

    result = fit(deterministic, train, val, options, loss_fn, val_samples=1)
    for layer, w, b in zip(model.layers, deterministic.weights, deterministic.biases, strict=True):
        layer.set_posterior(w[0].T.detach(), b[0, 0].detach(), delta)
    model.head.load_state_dict(deterministic.head.state_dict())
    return result


def fit_variational(
    model: VariationalNet,
    train: Dataset,
    val: Dataset | None,
    options: FitOptions,
    moped_delta: float | None = None,
) -> FitResult:
    """Maximize the ELBO of `model` in place; early-stops on the validation predictive."""
    n = len(train)
    start = moped_init(model, train, val, options, moped_delta) if moped_delta else None

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        terms = elbo_terms(model, x, y, n)
        return -terms["elbo"], {name: value.detach() for name, value in terms.items()}

    result = fit(model, train, val, options, loss_fn)
    if start is not None:
        result.metrics["moped"] = {
            "delta": moped_delta,
            "deterministic_epochs": start.epochs_run,
            "deterministic_val_log_likelihood": start.best_val_log_likelihood,
        }
    return result
