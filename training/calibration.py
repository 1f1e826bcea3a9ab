"""Post-hoc calibration of regression predictives: fitted on held-out rows, applied when served.

A Bayesian network's predictive is often too narrow or too wide. Each method here is fitted
on validation draws [m, ...] (per-draw mean | variance in original units, as
`PosteriorModel.sample` returns them) and the validation targets, and is stored as a small
JSON dict in `manifest["calibration"]`; the server applies it to every prediction:

    {"method": "variance",  "rows": m, "scale": [s_1, ..., s_k]}
    {"method": "isotonic",  "rows": m, "predicted": [[p, ...], ...], "observed": [[f, ...], ...]}
    {"method": "conformal", "rows": m, "ranks": [r, ...], "scores": [[q, ...], ...]}

with one entry (or one list) per target. `null` means uncalibrated.

- variance: one factor s per target multiplies the mixture's variance; s maximizes the
  validation log-likelihood of the scaled mixture. The mixture is scaled as a whole (draw
  means spread around the mean by sqrt(s), draw variances times s), so the mean stays, both
  variance parts and the variance are s times larger, and every quantile moves to
  mean + sqrt(s) (q - mean).
- isotonic (Kuleshov et al. 2018): the map R from the predicted CDF level p to the observed
  frequency of validation targets at or below it, from the PIT values F(y_i) of the
  validation targets under the mixture CDF. A central level a is served as the mixture
  quantiles at the raw tail probabilities R^-1((1 - a) / 2) and R^-1((1 + a) / 2). R's knots
  are (p_(j), j / (m + 1)) for the sorted PIT values p_(j), joined linearly: the isotonic
  least-squares fit to Kuleshov's points is those points themselves (they are already
  monotone), and counting over m + 1 rather than m makes R^-1(t) the order statistic that
  a fresh exchangeable PIT value falls below with probability t (j / m would be a rank
  too narrow in the upper tail).
- conformal: split conformal with normalized scores |y - mean| / std; level a takes the
  ceil((m + 1) a)-th smallest of the m scores as q and serves mean +- q std, which covers a
  fresh exchangeable point with probability >= a.

Isotonic and conformal change only the intervals; the mean and variances stay the model's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from training.summaries import (
    Summary,
    mixture_cdf,
    mixture_quantile,
    regression_summary,
    sample_mean,
)
from training.summaries import summarize as summarize_uncalibrated

METHODS = ("variance", "isotonic", "conformal")
CHOICES = ("none", *METHODS)  # the --calibration values; "none" stores null
MIN_ROWS = 2
MAX_KNOTS = 1000  # order statistics stored per target: a small manifest whatever m is
TAIL_FLOOR = 1e-12  # raw tail probabilities are kept inside [TAIL_FLOOR, 1 - TAIL_FLOOR]
_LOG_SCALE_GRID = np.arange(-5.0, 5.0 + 1e-9, 0.25)  # about the Gaussian estimate: e^-5..e^5
_RANK_SLACK = 1e-9  # (m + 1) a that is an integer up to rounding is that integer


class CalibrationError(ValueError):
    """A calibration that cannot be fitted or applied: bad method, data or stored field."""


@dataclass(frozen=True, eq=False)
class Calibration:
    """A validated calibration, its arrays ready to apply (parsed once, at load)."""

    method: str
    rows: int
    scale: np.ndarray | None = None  # variance: [k]
    predicted: tuple[np.ndarray, ...] = ()  # isotonic: per target, PIT levels, ascending
    observed: tuple[np.ndarray, ...] = ()  # isotonic: per target, frequencies, increasing
    ranks: np.ndarray | None = None  # conformal: [K] increasing ranks in 1..m, ending at m
    scores: np.ndarray | None = None  # conformal: [k, K] sorted scores at those ranks

    @property
    def num_targets(self) -> int:
        if self.scale is not None:
            return len(self.scale)
        if self.scores is not None:
            return len(self.scores)
        return len(self.predicted)


# ------------------------------------------------------------------------------- fitting


def fit_calibration(
    method: str, draws: torch.Tensor, y: np.ndarray | torch.Tensor
) -> dict[str, object]:
    """The manifest dict of `method` fitted on validation draws [n, m, 2k] and targets [m, k].

    The rows must be held out from the fit; in `train_model` they also chose the epoch and
    the noise, so the fitted calibration is a little optimistic about them.
    """
    if method not in METHODS:
        raise CalibrationError(f"calibration method must be one of {METHODS}, got {method!r}")
    k = draws.shape[-1] // 2
    mu, var = draws[..., :k].double().cpu(), draws[..., k:].double().cpu()
    y = torch.as_tensor(y).detach().to("cpu", torch.float64).reshape(-1, k)
    m = y.shape[0]
    if m != mu.shape[1]:
        raise CalibrationError(f"{m} targets for {mu.shape[1]} rows of draws")
    if m < MIN_ROWS:
        raise CalibrationError(f"calibration needs at least {MIN_ROWS} held-out rows, got {m}")
    if not bool(torch.isfinite(y).all()):
        raise CalibrationError("calibration targets must be finite")
    if method == "variance":
        scale = [_fit_scale(mu[..., j], var[..., j], y[:, j]) for j in range(k)]
        return {"method": "variance", "rows": m, "scale": scale}
    ranks = _knot_ranks(m)
    if method == "isotonic":
        pit = mixture_cdf(mu, var, y).sort(dim=0).values  # [m, k]
        observed = (ranks / (m + 1)).tolist()
        predicted = pit[torch.as_tensor(ranks - 1)].T.tolist()
        return {"method": "isotonic", "rows": m, "predicted": predicted, "observed": [observed] * k}
    summary = regression_summary(torch.cat([mu, var], dim=-1), [])  # the served mean and std
    scores = ((y - summary["mean"]).abs() / summary["std"].clamp_min(1e-300)).sort(dim=0).values
    chosen = scores[torch.as_tensor(ranks - 1)].T.tolist()
    return {"method": "conformal", "rows": m, "ranks": ranks.tolist(), "scores": chosen}


def _knot_ranks(m: int) -> np.ndarray:
    """Ranks 1..m of the order statistics to store: all of them, or MAX_KNOTS evenly spaced
    ones that keep the first and the last."""
    if m <= MAX_KNOTS:
        return np.arange(1, m + 1)
    return np.unique(np.round(np.linspace(1, m, MAX_KNOTS)).astype(np.int64))


def _fit_scale(mu: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> float:
    """The variance factor s (one target) that maximizes the mean validation log-likelihood
    of the mixture scaled by s: a grid over log s about the estimate that treats the
    mixture as one Gaussian (mean z^2), then Brent's method in the best cell."""
    from scipy.optimize import minimize_scalar  # fitting only: the serving path needs no scipy

    mean = sample_mean(mu)
    spread, residual = mu - mean, y - mean  # [n, m], [m]
    log_var, log_n = var.clamp_min(1e-300).log(), math.log(mu.shape[0])
    variance = sample_mean(var) + sample_mean(spread**2)
    center = math.log(float((residual**2 / variance.clamp_min(1e-300)).mean().clamp_min(1e-300)))

    def loss(u: float) -> float:
        z2 = (residual - math.exp(u / 2) * spread) ** 2 / (math.exp(u) * var)
        log_density = -0.5 * (math.log(2 * math.pi) + u + log_var + z2)
        return -float((torch.logsumexp(log_density, dim=0) - log_n).mean())

    grid = center + _LOG_SCALE_GRID
    losses = [loss(u) for u in grid]
    best = float(grid[int(np.argmin(losses))])
    step = float(grid[1] - grid[0])
    bounds = (best - step, best + step)
    found = minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": 1e-10})
    u = float(found.x) if found.fun <= min(losses) else float(best)
    return math.exp(u)


# ----------------------------------------------------------------------- reading a manifest


def parse_calibration(
    value: object, task: str | None = "regression", num_targets: int | None = None
) -> Calibration | None:
    """A manifest's `calibration` field, checked; None for null. Raises CalibrationError
    saying what is wrong, so a bad field fails at load and never at request time."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CalibrationError(f"calibration must be null or an object, got {value!r:.80}")
    method = value.get("method")
    if method not in METHODS:
        raise CalibrationError(f"calibration.method must be one of {METHODS}, got {method!r:.80}")
    if task is not None and task != "regression":
        raise CalibrationError(f"calibration applies to regression models, not {task}")
    expected = {"variance": {"scale"}, "isotonic": {"predicted", "observed"}}.get(
        method, {"ranks", "scores"}
    )
    unknown = set(value) - {"method", "rows", *expected}
    if unknown:
        raise CalibrationError(f"calibration ({method}) has unknown keys {sorted(unknown)}")
    rows = value.get("rows")
    if type(rows) is not int or rows < MIN_ROWS:
        raise CalibrationError(f"calibration.rows must be an integer >= {MIN_ROWS}, got {rows!r}")
    if method == "variance":
        scale = _floats(value.get("scale"), "scale", 1)
        if not (scale > 0).all():
            raise CalibrationError("calibration.scale must hold positive numbers")
        result = Calibration(method, rows, scale=scale)
    elif method == "isotonic":
        result = _parse_isotonic(value, rows)
    else:
        result = _parse_conformal(value, rows)
    if num_targets is not None and result.num_targets != num_targets:
        raise CalibrationError(
            f"calibration has {result.num_targets} target(s); the model has {num_targets}"
        )
    return result


def _floats(value: object, name: str, dims: int) -> np.ndarray:
    """A non-empty list (dims=1) or list of equal non-empty lists (dims=2) of finite numbers."""
    shape_text = "a list of numbers" if dims == 1 else "a list of lists of numbers"
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CalibrationError(f"calibration.{name} must be {shape_text}") from None
    if value is None or array.ndim != dims or 0 in array.shape or isinstance(value, str):
        raise CalibrationError(f"calibration.{name} must be {shape_text} (non-empty)")
    if any(isinstance(v, bool) for v in np.asarray(value, dtype=object).ravel()):
        raise CalibrationError(f"calibration.{name} must hold numbers, not booleans")
    if not np.isfinite(array).all():
        raise CalibrationError(f"calibration.{name} must hold finite numbers")
    return array


def _parse_isotonic(value: dict, rows: int) -> Calibration:
    predicted = _floats(value.get("predicted"), "predicted", 2)
    observed = _floats(value.get("observed"), "observed", 2)
    if predicted.shape != observed.shape:
        raise CalibrationError("calibration.predicted and .observed must have the same shape")
    if not ((predicted >= 0) & (predicted <= 1)).all() or (np.diff(predicted) < 0).any():
        raise CalibrationError("calibration.predicted must be ascending levels in [0, 1]")
    if not ((observed > 0) & (observed < 1)).all() or (np.diff(observed) <= 0).any():
        raise CalibrationError("calibration.observed must be increasing frequencies in (0, 1)")
    return Calibration("isotonic", rows, predicted=tuple(predicted), observed=tuple(observed))


def _parse_conformal(value: dict, rows: int) -> Calibration:
    raw_ranks = value.get("ranks")
    if not isinstance(raw_ranks, list) or not all(type(r) is int for r in raw_ranks):
        raise CalibrationError("calibration.ranks must be a list of integers")
    ranks = np.asarray(raw_ranks, dtype=np.int64)
    if not len(ranks) or ranks[0] < 1 or ranks[-1] != rows or (np.diff(ranks) <= 0).any():
        raise CalibrationError(f"calibration.ranks must increase from >= 1 to rows ({rows})")
    scores = _floats(value.get("scores"), "scores", 2)
    if scores.shape[1] != len(ranks):
        raise CalibrationError("calibration.scores must hold one score per rank for each target")
    if (scores < 0).any() or (np.diff(scores) < 0).any():
        raise CalibrationError("calibration.scores must be ascending non-negative numbers")
    return Calibration("conformal", rows, ranks=ranks, scores=scores)


def method_name(calibration: Calibration | dict | None) -> str | None:
    """What a response calls the calibration: its method, or None for uncalibrated."""
    if calibration is None:
        return None
    return calibration.method if isinstance(calibration, Calibration) else calibration["method"]


# ------------------------------------------------------------------------------ applying


def conformal_quantile(calibration: Calibration, level: float) -> np.ndarray:
    """The score q [k] that level `level` takes: the ceil((m + 1) level)-th smallest score.

    When ceil((m + 1) level) > m, no finite q has the guarantee (the exact answer is an
    infinite interval); the largest score is used instead, which still covers with
    probability >= m / (m + 1): the most m rows can certify, and a finite number JSON and
    clients can use. With stored knots (m > MAX_KNOTS) the next stored rank up is taken,
    which keeps the guarantee.
    """
    assert calibration.ranks is not None and calibration.scores is not None
    rank = math.ceil((calibration.rows + 1) * level - _RANK_SLACK)
    index = min(int(np.searchsorted(calibration.ranks, rank)), len(calibration.ranks) - 1)
    return calibration.scores[:, index]


def isotonic_tails(calibration: Calibration, target: int, probs: Sequence[float]) -> list[float]:
    """Raw (model) CDF levels whose observed frequency is `probs`: R^-1, by linear
    interpolation between the stored knots and the corners (0, 0) and (1, 1)."""
    observed = np.concatenate([[0.0], calibration.observed[target], [1.0]])
    predicted = np.concatenate([[0.0], calibration.predicted[target], [1.0]])
    raw = np.interp(np.asarray(probs, dtype=np.float64), observed, predicted)
    return np.clip(raw, TAIL_FLOOR, 1 - TAIL_FLOOR).tolist()


def calibrated_summary(
    draws: torch.Tensor, levels: Sequence[float], calibration: Calibration | dict | None
) -> Summary:
    """`training.summaries.regression_summary` of draws [n, B, 2k], with `calibration` applied
    (a manifest dict is parsed first; None gives the uncalibrated summary unchanged).

    variance scaling multiplies variance, epistemic_variance and aleatoric_variance by s and
    std by sqrt(s), and widens the intervals about the mean by sqrt(s); isotonic and
    conformal change only `lower` and `upper`. The mean is never changed.
    """
    if isinstance(calibration, dict):
        calibration = parse_calibration(calibration, num_targets=draws.shape[-1] // 2)
    if calibration is None:
        return regression_summary(draws, levels)
    k = draws.shape[-1] // 2
    if calibration.num_targets != k:
        raise CalibrationError(f"calibration has {calibration.num_targets} targets; draws {k}")
    if calibration.method == "variance":
        summary = regression_summary(draws, levels)
        assert calibration.scale is not None
        scale = torch.as_tensor(calibration.scale, dtype=torch.float64, device=draws.device)
        mean = summary["mean"]
        for key in ("variance", "epistemic_variance", "aleatoric_variance"):
            summary[key] = summary[key] * scale
        summary["std"] = summary["variance"].sqrt()
        for key in ("lower", "upper"):
            summary[key] = mean + scale.sqrt() * (summary[key] - mean)
        return summary
    summary = regression_summary(draws, [])  # mean and variances; the intervals follow
    if calibration.method == "conformal":
        q = [conformal_quantile(calibration, level) for level in levels]
        half = torch.as_tensor(np.asarray(q).reshape(len(levels), 1, k), device=draws.device)
        half = half.to(torch.float64) * summary["std"]
        summary["lower"], summary["upper"] = summary["mean"] - half, summary["mean"] + half
        return summary
    mu, var = draws[..., :k].double(), draws[..., k:].double()
    tails = [(1 - level) / 2 for level in levels]
    wanted = [*tails, *(1 - t for t in tails)]
    bounds = torch.stack(
        [
            mixture_quantile(mu[..., j], var[..., j], isotonic_tails(calibration, j, wanted))
            for j in range(k)
        ],
        dim=-1,
    )  # [2L, B, k]
    summary["lower"], summary["upper"] = bounds[: len(levels)], bounds[len(levels) :]
    return summary


def variance_scaled_draws(draws: torch.Tensor, calibration: Calibration | dict) -> torch.Tensor:
    """Draws [n, B, 2k] of the variance-scaled mixture (for its log-likelihood): draw means
    spread sqrt(s) times wider about the mean, draw variances times s."""
    k = draws.shape[-1] // 2
    if isinstance(calibration, dict):
        calibration = parse_calibration(calibration, num_targets=k)
    if calibration is None or calibration.scale is None:
        raise CalibrationError("variance_scaled_draws needs a variance-scaling calibration")
    scale = torch.as_tensor(calibration.scale, dtype=torch.float64, device=draws.device)
    mu, var = draws[..., :k].double(), draws[..., k:].double()
    mean = sample_mean(mu)
    return torch.cat([mean + scale.sqrt() * (mu - mean), var * scale], dim=-1)


def summarize(
    task: str,
    draws: torch.Tensor,
    levels: Sequence[float],
    calibration: Calibration | dict | None = None,
) -> Summary:
    """`training.summaries.summarize` with a regression model's calibration applied."""
    if task == "regression":
        return calibrated_summary(draws, levels, calibration)
    if calibration is not None:
        raise CalibrationError(f"calibration applies to regression models, not {task}")
    return summarize_uncalibrated(task, draws, levels)
