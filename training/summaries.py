"""Predictive summaries of posterior draws, shared by evaluation and the server.

Regression: the predictive is the Monte-Carlo mixture 1/n sum_s N(mu_s, sigma2_s); its mean,
its variance split into epistemic (var_s mu_s) and aleatoric (avg_s sigma2_s) parts, and
central credible intervals from the mixture's own quantiles (not mean +- z std, which is
wrong for skewed or multimodal predictives).
Classification: the mean of the per-draw softmax, its entropy, the expected per-draw
entropy (aleatoric) and their difference, the mutual information (epistemic).

Every reduction over the draws adds them in an order fixed by n alone (a scan along axis 0,
or a sum along a contiguous last axis), and the quantile solver freezes each element once it
has converged, so a row's summary is the same bits whatever rows it is computed with: the
server batches requests and promises a seeded request the numbers it gets alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch
import torch.nn.functional as F

Summary = dict[str, torch.Tensor]

_TAIL_SDS = 40.0  # bracket far enough out that the mixture CDF underflows float64 to 0 / 1
_MAX_ITERATIONS = 100


def sample_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the sample axis 0 in sample order, as the last entry of a running sum.

    A scan along axis 0 adds each element's draws one after another whatever the other
    dimensions hold, so a row's result does not depend on the rows it is batched with
    (torch's sum over a leading axis picks its order from the whole tensor's layout; over a
    contiguous last axis it does not, which `mixture_quantile` uses). One op, where
    a pairwise tree of slices took two dozen for n = 100: summaries are many small ops, and
    each costs the serving thread a round trip for the GIL.
    """
    return t.cumsum(0)[-1]


def sample_mean(t: torch.Tensor) -> torch.Tensor:
    return sample_sum(t) / t.shape[0]


def sample_var(t: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Population variance over axis 0 around its `sample_mean` (two-pass, batch-invariant)."""
    return sample_mean((t - mean) ** 2)


def mixture_cdf(mean: torch.Tensor, variance: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F(y) under the mixtures 1/n sum_s N(mean[s], variance[s]) over axis 0: PIT values."""
    return sample_mean(torch.special.ndtr((y - mean) / variance.clamp_min(1e-300).sqrt()))


def mixture_quantile(
    mean: torch.Tensor,
    variance: torch.Tensor,
    probs: Sequence[float],
    tol: float = 1e-12,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Quantiles [Q, ...] of the mixtures 1/n sum_s N(mean[s], variance[s]) over axis 0.

    Safeguarded Newton: a Newton step when it stays inside the bracket that the CDF values
    keep shrinking, a bisection step otherwise; in float64, vectorized over every quantile
    and every mixture at once. It starts from the normal quantile with the mixtures' mean and
    variance (the caller passes them when it has them), corrected for their skewness
    (Cornish-Fisher): on the serving benchmark's model, 16-row batches took 3 iterations
    instead of 4 in 29 of 40 trials.
    The server runs this for every batch, and its cost is mostly the number of torch calls.
    """
    mu, var = mean.double(), variance.double()
    if not probs:
        return mu.new_empty((0, *mu.shape[1:]))
    n = mu.shape[0]
    sd = var.clamp_min(1e-300).sqrt()
    lo = (mu - _TAIL_SDS * sd).amin(0)  # broadcast against x [Q, ...] at the first update
    hi = (mu + _TAIL_SDS * sd).amax(0)
    if moments is None:
        center = sample_mean(mu)
        moments = center, sample_mean(var) + sample_var(mu, center)
    unit = [1] * (mu.dim() - 1)
    center, spread = moments[0], moments[1].sqrt()
    zs = [NormalDist().inv_cdf(p) for p in probs]
    z = torch.tensor(zs, dtype=torch.float64, device=mu.device).view(-1, *unit)
    bend = torch.tensor([(z * z - 1) / 6 for z in zs], dtype=torch.float64, device=mu.device)
    offset = mu - center
    skew = sample_mean(offset * (offset * offset + 3 * var)) / (moments[1] * spread)
    x = (center + spread * (z + bend.view(-1, *unit) * skew)).clamp(lo, hi)
    # In w = (mean - x) / (sd sqrt 2) a draw's CDF is erfc(w) / 2 and its density
    # exp(-w^2) / (sd sqrt(2 pi)): erfc is one op and exact in the lower tail, where
    # torch's ndtr computes 1 + erf and cancels. Everything is doubled: the sum of erfc
    # over draws is compared with 2 n q, and its slope is twice the density sum.
    twice = torch.tensor([2 * p * n for p in probs], dtype=torch.float64, device=mu.device)
    twice = twice.view(-1, *unit)
    # The iterations hold the draws on a contiguous last axis, [..., n] against x[..., None]:
    # torch's CPU kernel sums such an axis in an order fixed by its length (as the tests
    # check; on CUDA this is unverified), at a fifth of a scan's cost.
    inv_sd = (sd.reciprocal() * (1 / math.sqrt(2))).movedim(0, -1).contiguous()
    log_slope_scale = (inv_sd * (2 / math.sqrt(math.pi))).log()
    mu = mu.movedim(0, -1).contiguous()
    done = torch.zeros_like(x, dtype=torch.bool)
    for _ in range(_MAX_ITERATIONS):
        w = (mu - x.unsqueeze(-1)) * inv_sd
        excess = torch.special.erfc(w).sum(-1) - twice
        slope = torch.addcmul(log_slope_scale, w, w, value=-1).exp_().sum(-1)
        below = excess < 0
        lo = torch.where(below, x, lo)
        hi = torch.where(below, hi, x)  # an exact root (excess 0) closes the bracket on x
        delta = excess / slope
        newton = x - delta
        # A rounding-level Newton step can land on a bracket end; it means x has converged,
        # and bisecting there would throw the converged value away.
        converged = delta.abs() <= x.abs().add_(1).mul_(tol)
        inside = (newton > lo) & (newton < hi)
        step = torch.where(inside, newton, torch.where(converged, x, 0.5 * (lo + hi)))
        x = torch.where(done, x, step)  # a converged element stays put: its value
        done = done | converged  # cannot depend on how long the others take
        if bool(done.all()):
            break
    return x


def regression_summary(draws: torch.Tensor, levels: Sequence[float]) -> Summary:
    """Draws [n, B, 2k] of per-draw (mean | variance) -> mixture summaries per row and target."""
    k = draws.shape[-1] // 2
    draws = draws.double()
    mu, var = draws[..., :k], draws[..., k:]
    mean = sample_mean(mu)
    epistemic = sample_var(mu, mean)
    aleatoric = sample_mean(var)
    variance = epistemic + aleatoric
    tails = [(1 - level) / 2 for level in levels]
    probs = [*tails, *(1 - t for t in tails)]
    bounds = mixture_quantile(mu, var, probs, moments=(mean, variance))
    return {
        "mean": mean,
        "std": variance.sqrt(),
        "variance": variance,
        "epistemic_variance": epistemic,
        "aleatoric_variance": aleatoric,
        "lower": bounds[: len(levels)],
        "upper": bounds[len(levels) :],
    }


def classification_summary(logits: torch.Tensor, levels: Sequence[float]) -> Summary:
    """Draws [n, B, C] of logits -> predictive probabilities and entropy decomposition."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    p = log_p.exp()
    p_mean = sample_mean(p)
    entropy = -torch.special.xlogy(p_mean, p_mean).sum(-1)
    expected_entropy = sample_mean(-(p * log_p).sum(-1))
    confidence, predicted = p_mean.max(-1)
    # the share of draws whose own argmax is not the modal class (Freeman 1965); counts are
    # exact, so their order of addition does not matter
    votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)
    variation_ratio = 1 - votes.max(-1).values.double() / logits.shape[0]
    tails = torch.tensor([(1 - level) / 2 for level in levels], dtype=torch.float64)
    return {
        "probabilities": p_mean,
        "predicted_class": predicted,
        "confidence": confidence,
        "entropy": entropy,
        "expected_entropy": expected_entropy,
        "mutual_information": (entropy - expected_entropy).clamp_min(0),
        "variation_ratio": variation_ratio,
        "lower": torch.quantile(p, tails.to(p.device), dim=0),
        "upper": torch.quantile(p, (1 - tails).to(p.device), dim=0),
    }


def per_draw(task: str, draws: torch.Tensor) -> Summary:
    """Draws [n, B, ...] -> what each draw predicts, rows first ([B, n, ...]: a batch's rows
    are split among its requests along axis 0): per-draw mean and variance (regression) or
    probabilities (classification). Joint draws are what a decision needs: P(f(a) > f(b)),
    or a Thompson sample's argmax, is a statement about one draw at a time."""
    draws = draws.double().transpose(0, 1)
    if task == "regression":
        k = draws.shape[-1] // 2
        return {"mean": draws[..., :k], "variance": draws[..., k:]}
    if task == "classification":
        return {"probabilities": torch.softmax(draws, dim=-1)}
    raise ValueError(f"unknown task {task!r}")


def summarize(task: str, draws: torch.Tensor, levels: Sequence[float]) -> Summary:
    if task == "regression":
        return regression_summary(draws, levels)
    if task == "classification":
        return classification_summary(draws, levels)
    raise ValueError(f"unknown task {task!r}")
