"""A gradient training loop with a pluggable loss, on top of `training.fit`'s pieces.

`training.fit.fit` minimizes mean NLL + model.penalty(N); the methods here need other losses
(the ELBO with its terms recorded, a sum over stacked ensemble members) and per-epoch
records, so this loop takes the loss as a function and keeps everything else of `fit`:
FitOptions' step budget, seeded shuffling, early stopping on the validation Monte-Carlo
log-likelihood with the best weights restored, and the FitResult it reports.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from training.data import Dataset
from training.fit import FitOptions, FitResult, torch_threads, validation_log_likelihood
from training.model import PosteriorModel

Terms = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Terms]]


@dataclass
class MethodFitResult(FitResult):
    """FitResult plus what the method measured: per-epoch curves, tuned hyperparameters."""

    metrics: dict[str, Any] = field(default_factory=dict)


def standardized(model: PosteriorModel, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of `data` in the model's standardized units."""
    x = model.normalizer.inputs(torch.as_tensor(data.x, dtype=torch.float32))
    if data.task == "regression":
        return x, model.normalizer.targets(torch.as_tensor(data.y, dtype=torch.float32))
    return x, torch.as_tensor(data.y, dtype=torch.int64)


def adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam, fused (one kernel for all tensors: several times faster for small models)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of one shuffled epoch, `batch_size` at a time."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def train_loop(
    model: PosteriorModel,
    train: Dataset,
    val: Dataset | None,
    options: FitOptions,
    loss_fn: LossFn,
    val_samples: int | None = None,
) -> MethodFitResult:
    """Minimize `loss_fn(x_batch, y_batch) -> (loss, terms)` with Adam; early-stop on `val`.

    The batch-size-weighted mean of every term over an epoch is recorded in
    `metrics["epochs"][term]`, one value per epoch.
    """
    epochs = options.budget(len(train))
    per_epoch = math.ceil(len(train) / options.batch_size)
    eval_every = max(1, epochs // max(1, options.evaluations))
    patience = math.ceil(options.patience * epochs) if options.patience else None
    progress = sys.stderr.isatty() if options.progress is None else options.progress
    val_samples = val_samples or options.val_samples
    start = time.perf_counter()
    records: dict[str, list[float]] = {}
    with torch_threads(options.threads):
        x, y = standardized(model, train)
        shuffle = torch.Generator().manual_seed(options.seed)
        optimizer = adam(model.parameters(), options.lr)
        history: list[tuple[int, float]] = []
        best = (-math.inf, 0, copy.deepcopy(model.state_dict()))
        stopped_early, epoch = False, 0
        model.train()
        bar = tqdm(total=epochs, disable=not progress, unit="epoch", leave=False)
        for epoch in range(1, epochs + 1):
            sums: dict[str, float] = {}
            for rows in minibatches(len(train), options.batch_size, shuffle):
                loss, terms = loss_fn(x[rows], y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * len(rows)
            for name, total in sums.items():
                records.setdefault(name, []).append(total / len(train))
            bar.update()
            if val is None or (epoch % eval_every and epoch != epochs):
                continue
            score = validation_log_likelihood(model, val, val_samples, options.seed)
            if not math.isfinite(score):
                score = -math.inf
            history.append((epoch, score))
            if score > best[0]:
                best = (score, epoch, copy.deepcopy(model.state_dict()))
            bar.set_postfix(val_ll=f"{score:.3f}", best=f"{best[0]:.3f}@{best[1]}")
            if patience is not None and epoch - best[1] >= patience:
                stopped_early = True
                break
        bar.close()
        if val is not None and best[1] > 0:
            model.load_state_dict(best[2])
        model.eval()
    return MethodFitResult(
        epochs_run=epoch,
        steps=epoch * per_epoch,
        best_epoch=best[1] if val is not None else epoch,
        best_val_log_likelihood=best[0] if val is not None and best[1] > 0 else None,
        stopped_early=stopped_early,
        seconds=time.perf_counter() - start,
        history=history,
        metrics={"epochs": records},
    )
