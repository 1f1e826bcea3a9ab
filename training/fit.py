"""The training loop shared by every gradient-trained posterior (MC dropout, variational, ...).

The default loss is the mean per-example NLL of a minibatch (standardized units) +
model.penalty(N), the per-example negative log prior, so the minimum is the MAP objective
divided by N; methods with other objectives (the ELBO, a sum over stacked ensemble members)
pass their own loss function, whose named terms are recorded per epoch. A seeded slice of
the training rows is held out: every so often the Monte-Carlo predictive log-likelihood on
it is measured with fixed draw seeds (so two evaluations differ only by the weights), and
the best weights seen are restored at the end. The step budget is a number of gradient
steps turned into epochs for the data size, so small and large data sets both get enough
updates without hand tuning.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from training.data import Dataset
from training.metrics import pointwise_log_likelihood, sample_draws
from training.model import PosteriorModel

Terms = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Terms]]
MIN_STD = 1e-8  # a constant column is centred but not scaled (std guarded to 1)


def standardization(data: Dataset) -> dict[str, list[float]]:
    """Normalizer statistics (model.Normalizer keys) from the rows the model is fit on: per
    input feature, or per channel (images) and per feature (sequences), shaped to broadcast."""

    def guarded_std(values: np.ndarray) -> np.ndarray:
        std = values.std(axis=0)
        return np.where(std > MIN_STD, std, 1.0)

    x = data.x.astype(np.float64)
    y = data.y.astype(np.float64) if data.task == "regression" else None
    relative = bool(data.forecast and data.forecast.get("relative"))
    if relative:  # a relative forecaster's units: changes from each window's last step
        levels = x[:, -1, data.forecast["targets"]]
        y = y - np.tile(levels, (1, y.shape[1] // levels.shape[1]))
        x = x - x[:, -1:, :]
    if x.ndim == 2:
        stats = {"x_mean": x.mean(axis=0).tolist(), "x_std": guarded_std(x).tolist()}
    else:  # per channel of an image [N, C, H, W], per feature of a sequence [N, T, F]
        feature_axis = 1 if x.ndim == 4 else x.ndim - 1
        axes = tuple(a for a in range(x.ndim) if a != feature_axis)
        mean = x.mean(axis=axes, keepdims=True)[0]
        std = np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True))[0]
        stats = {"x_mean": mean.tolist(), "x_std": np.where(std > MIN_STD, std, 1.0).tolist()}
    if y is not None:
        stats |= {"y_mean": y.mean(axis=0).tolist(), "y_std": guarded_std(y).tolist()}
    if relative:
        stats["level_features"] = list(data.forecast["targets"])
    return stats


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (fit rows, validation rows); at least 2 rows on each side when fraction > 0."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = 0 if fraction == 0 else min(max(2, round(fraction * n)), n - 2)
    if n_val < 0:
        raise ValueError(f"{n} rows are too few to hold out a validation split")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class FitOptions:
    """Optimizer, step budget and early-stopping settings; defaults suit small tabular data.

    With `epochs` unset, the run lasts `target_steps` gradient steps expressed in epochs and
    clipped to [min_epochs, max_epochs]; training stops early once the validation
    log-likelihood has not improved for `patience` of that budget (a fraction of it).
    Validation checks count only after `warmup` of the budget: on a small validation split
    a barely trained model with a wide noise can score best by chance (seen on Boston
    housing split 4: best at epoch 7, test RMSE 7.5 instead of 3.7).
    """

    lr: float = 1e-3
    batch_size: int = 128
    epochs: int | None = None
    target_steps: int = 4_000
    min_epochs: int = 20
    max_epochs: int = 4_000
    patience: float = 0.3
    warmup: float = 0.1  # fraction of the budget before validation checks count
    evaluations: int = 100  # validation checks over the budget (at most one per epoch)
    val_samples: int = 32
    seed: int = 0
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal
    threads: int | None = 1  # tiny models run fastest on one thread; None: by model size

    def budget(self, num_rows: int) -> int:
        """Epochs to run for `num_rows` training rows."""
        if self.epochs is not None:
            return self.epochs
        per_epoch = math.ceil(num_rows / self.batch_size)
        epochs = math.ceil(self.target_steps / per_epoch)
        return int(min(max(epochs, self.min_epochs), self.max_epochs))


@dataclass
class FitResult:
    """What happened during `fit`; `history` holds (epoch, validation log-likelihood)."""

    epochs_run: int
    steps: int
    best_epoch: int
    best_val_log_likelihood: float | None
    stopped_early: bool
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # per-epoch terms, tuned values

    def to_json(self) -> dict:
        out = asdict(self)
        out["history"] = [[e, round(v, 5)] for e, v in self.history]
        return out


SMALL_MODEL_PARAMETERS = 250_000


def is_small(model: torch.nn.Module) -> bool:
    """Small models' matmuls are too small to split: on a few cores extra threads cost more
    in synchronization than they save (measured: 4x slower steps with 2 threads than with 1
    for a 50-unit MLP on a 2-core machine)."""
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS


def auto_threads(model: PosteriorModel) -> int:
    return 1 if is_small(model) else torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with at most `threads` intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, min(threads, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam, fused where this build supports it: several times less per-step overhead on
    tiny models."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def standardized(model: PosteriorModel, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of `data` in the model's standardized units."""
    raw = torch.as_tensor(data.x, dtype=torch.float32)
    x = model.normalizer.inputs(raw)
    if data.task == "regression":
        return x, model.normalizer.targets(torch.as_tensor(data.y, dtype=torch.float32), raw)
    return x, torch.as_tensor(data.y, dtype=torch.int64)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of one shuffled epoch, `batch_size` at a time."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def nll_loss(model: PosteriorModel, num_train: int) -> LossFn:
    """Mean NLL + per-example negative log prior: the MAP objective over N."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        nll = model.head.nll(model(x), y).mean()
        return nll + model.penalty(num_train), {"nll": nll}

    return loss


def validation_log_likelihood(
    model: PosteriorModel, data: Dataset, num_samples: int, seed: int
) -> float:
    """Mean MC predictive log-likelihood per row (original units) under fixed draw seeds."""
    was_training = model.training
    model.eval()
    draws = sample_draws(model, data.x, num_samples, seed)
    model.train(was_training)
    return float(pointwise_log_likelihood(data.task, draws, torch.as_tensor(data.y)).mean())


def _epoch_sums(
    steps: list[tuple[int, Terms]], member_terms: Callable[[torch.Tensor], torch.Tensor] | None
) -> dict[str, float]:
    """Each term's sum over an epoch's steps of (step value x rows)."""
    sums: dict[str, float] = {}
    for name in steps[0][1] if steps else ():
        values = [terms[name] for _, terms in steps]
        if member_terms is not None:  # one row per step, every member's value
            values = [row.mean() for row in member_terms(torch.stack(values))]
        total = 0.0
        for (rows, _), value in zip(steps, values, strict=True):
            total += float(value) * rows
        sums[name] = total
    return sums


def fit(
    model: PosteriorModel,
    train: Dataset,
    val: Dataset | None,
    options: FitOptions,
    loss_fn: LossFn | None = None,
    val_samples: int | None = None,
    val_score: Callable[[], float] | None = None,
    member_terms: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FitResult:
    """Minimize `loss_fn(x, y) -> (loss, terms)` (default: `nll_loss`) with Adam; early-stop
    on `val` when given, restoring the best weights.

    The validation score is `val_score()` when given (a stacked posterior spread over
    processes scores all its members together), else the predictive log-likelihood of
    `val_samples` draws on `val`.

    The batch-size-weighted mean of every term over an epoch is recorded in
    `metrics["epochs"][term]`, one value per epoch. With `member_terms`, a term is a vector
    of per-member values (this process's members of a stacked posterior) whose step value is
    the mean over all members: `member_terms` turns an epoch's [steps, m] into [steps, M],
    gathering the other processes' blocks once per epoch rather than once per step.
    """
    loss_fn = loss_fn or nll_loss(model, len(train))
    epochs = options.budget(len(train))
    per_epoch = math.ceil(len(train) / options.batch_size)
    eval_every = max(1, epochs // max(1, options.evaluations))
    patience = math.ceil(options.patience * epochs) if options.patience else None
    warmup = math.ceil(options.warmup * epochs)
    progress = sys.stderr.isatty() if options.progress is None else options.progress
    val_samples = val_samples or options.val_samples
    start = time.perf_counter()
    records: dict[str, list[float]] = {}
    with torch_threads(options.threads or auto_threads(model)):
        x, y = standardized(model, train)
        shuffle = torch.Generator().manual_seed(options.seed)
        optimizer = adam(model.parameters(), options.lr)
        history: list[tuple[int, float]] = []
        best = (-math.inf, 0, copy.deepcopy(model.state_dict()))
        stopped_early, epoch = False, 0
        model.train()
        bar = tqdm(total=epochs, disable=not progress, unit="epoch", leave=False)
        for epoch in range(1, epochs + 1):
            steps: list[tuple[int, Terms]] = []
            for rows in minibatches(len(train), options.batch_size, shuffle):
                loss, terms = loss_fn(x[rows], y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps.append((len(rows), {k: v.detach() for k, v in terms.items()}))
            for name, total in _epoch_sums(steps, member_terms).items():
                records.setdefault(name, []).append(total / len(train))
            bar.update()
            if val is None or epoch < warmup or (epoch % eval_every and epoch != epochs):
                continue
            if val_score is not None:
                score = val_score()
            else:
                score = validation_log_likelihood(model, val, val_samples, options.seed)
            if not math.isfinite(score):
                score = -math.inf
            history.append((epoch, score))
            if score > best[0]:
                best = (score, epoch, copy.deepcopy(model.state_dict()))
            bar.set_postfix(val_ll=f"{score:.3f}", best=f"{best[0]:.3f}@{best[1]}")
            if patience is not None and epoch - max(best[1], warmup) >= patience:
                stopped_early = True
                break
        bar.close()
        if val is not None and best[1] > 0:
            model.load_state_dict(best[2])
        model.eval()
    return FitResult(
        epochs_run=epoch,
        steps=epoch * per_epoch,
        best_epoch=best[1] if val is not None else epoch,
        best_val_log_likelihood=best[0] if val is not None and best[1] > 0 else None,
        stopped_early=stopped_early,
        seconds=time.perf_counter() - start,
        history=history,
        metrics={"epochs": records},
    )


def refit_noise(
    model: PosteriorModel, val: Dataset, num_samples: int, seed: int
) -> list[float] | None:
    """Set a learned homoscedastic noise variance to the one that maximizes the held-out
    log-likelihood of the Monte-Carlo mixture; returns the new variances (original units).

    Two biases of the trained value are removed. The training loss scores one dropout draw
    at a time, so its noise absorbs the spread between draws, and the predictive mixture then
    adds that spread again (intervals too wide where the noise is small: yacht). And the
    noise is fitted to training residuals, which are smaller than held-out ones (intervals
    too narrow where the model overfits). Choosing it on the validation rows is the
    continuous version of the published protocol's grid search of the noise precision tau.
    Each target's noise is chosen on its own (targets are independent given a draw).
    """
    head = model.head
    if getattr(head, "noise", None) != "homoscedastic" or len(val) < 2:
        return None
    draws = sample_draws(model, val.x, num_samples, seed).double()
    k = head.num_targets
    sq = (torch.as_tensor(val.y, dtype=torch.float64).reshape(1, -1, k) - draws[..., :k]) ** 2
    current = draws[0, 0, k:]  # [k] homoscedastic: the same for every draw and row
    # log variances from 1/33 to 33 times the trained one, in steps of 2.5%
    grid = current.log() + torch.linspace(-3.5, 3.5, 281, dtype=torch.float64).view(-1, 1)
    ll = torch.empty_like(grid)
    for g in range(len(grid)):  # one grid point at a time: memory stays [n, B, k]
        var = grid[g].exp()
        log_density = -0.5 * (torch.log(2 * math.pi * var) + sq / var)
        ll[g] = (torch.logsumexp(log_density, dim=0) - math.log(draws.shape[0])).mean(0)
    best = grid[ll.argmax(0), torch.arange(k)]  # [k]
    y_std = torch.as_tensor(model.normalizer.stats["y_std"], dtype=torch.float64)
    with torch.no_grad():
        head.log_noise_variance.copy_((best - 2 * y_std.log()).to(head.log_noise_variance))
    return best.exp().tolist()
