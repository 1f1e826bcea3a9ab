"""Predictive summaries against closed forms and high-precision numerical inversions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from training.summaries import classification_summary, mixture_quantile, regression_summary


def _mixture_cdf(x: float, means: np.ndarray, sds: np.ndarray) -> float:
    return float(np.mean(stats.norm.cdf(x, loc=means, scale=sds)))


def _reference_quantile(q: float, means: np.ndarray, sds: np.ndarray) -> float:
    lo, hi = float((means - 50 * sds).min()), float((means + 50 * sds).max())
    excess = lambda x: _mixture_cdf(x, means, sds) - q  # noqa: E731
    return optimize.brentq(excess, lo, hi, xtol=1e-14, rtol=1e-15)


@pytest.mark.parametrize(
    ("means", "sds"),
    [
        ([-3.0, 3.0], [1.0, 1.0]),  # bimodal: mean +- z std would put mass in the trough
        ([0.0, 4.0], [0.2, 2.5]),  # skewed
        ([1e3, 1e3 + 1e-3], [1e-4, 1e-4]),  # narrow, far from zero
    ],
)
@pytest.mark.parametrize("q", [0.0005, 0.025, 0.3, 0.5, 0.975, 0.9995])
def test_two_component_mixture_quantile_matches_numerical_inversion(means, sds, q):
    means, sds = np.array(means), np.array(sds)
    ours = mixture_quantile(
        torch.tensor(means).view(2, 1), torch.tensor(sds**2).view(2, 1), [q]
    ).item()
    reference = _reference_quantile(q, means, sds)
    assert ours == pytest.approx(reference, abs=1e-9 * (1 + abs(reference)))
    assert _mixture_cdf(ours, means, sds) == pytest.approx(q, abs=1e-10)


def test_single_gaussian_quantiles_are_normal_quantiles():
    mean, var = torch.tensor([[2.0, -1.0]]), torch.tensor([[4.0, 0.25]])
    probs = [0.05, 0.5, 0.95]
    got = mixture_quantile(mean, var, probs)
    z = torch.special.ndtri(torch.tensor(probs, dtype=torch.float64)).view(-1, 1)
    expected = mean.double() + var.double().sqrt() * z
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_regression_summary_decomposes_the_mixture_variance():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(500, 7, 2, generator=gen, dtype=torch.float64)
    var = torch.rand(500, 7, 2, generator=gen, dtype=torch.float64) + 0.1
    s = regression_summary(torch.cat([mu, var], -1), [0.9])
    # Law of total variance of the equally weighted mixture, computed directly.
    second_moment = (var + mu**2).mean(0)
    torch.testing.assert_close(s["variance"], second_moment - mu.mean(0) ** 2)
    torch.testing.assert_close(s["epistemic_variance"] + s["aleatoric_variance"], s["variance"])
    torch.testing.assert_close(s["std"] ** 2, s["variance"])
    assert s["lower"].shape == s["upper"].shape == (1, 7, 2)
    assert bool((s["lower"] < s["mean"]).all() and (s["mean"] < s["upper"]).all())


def test_classification_summary_entropy_decomposition():
    # Two confident draws that disagree: maximal epistemic uncertainty for two classes.
    logits = torch.tensor([[[20.0, -20.0]], [[-20.0, 20.0]]])
    s = classification_summary(logits, [0.9])
    torch.testing.assert_close(s["probabilities"], torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert s["entropy"].item() == pytest.approx(math.log(2))
    assert s["expected_entropy"].item() == pytest.approx(0.0, abs=1e-12)
    assert s["mutual_information"].item() == pytest.approx(math.log(2))
    # Draws that agree on a 50/50 split: all aleatoric, no mutual information.
    same = classification_summary(torch.zeros(5, 1, 2), [0.9])
    assert same["mutual_information"].item() == pytest.approx(0.0, abs=1e-12)
    assert same["expected_entropy"].item() == pytest.approx(math.log(2))


def test_classification_intervals_are_quantiles_of_draw_probabilities():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(400, 3, 4, generator=gen)
    s = classification_summary(logits, [0.8])
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(s["lower"][0], torch.quantile(p, 0.1, dim=0))
    torch.testing.assert_close(s["upper"][0], torch.quantile(p, 0.9, dim=0))
    assert s["predicted_class"].tolist() == s["probabilities"].argmax(-1).tolist()


@pytest.mark.parametrize("n", [1, 7, 100])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_summary_is_the_same_bits_alone_or_in_any_batch(n, threads):
    """The server's promise to a seeded request: its numbers do not depend on its batch."""
    generator = torch.Generator().manual_seed(n)
    mu = torch.randn(n, 37, 2, generator=generator, dtype=torch.float64)
    var = torch.rand(n, 37, 2, generator=generator, dtype=torch.float64) + 0.01
    draws = torch.cat([mu, var], dim=-1)
    levels = [0.9, 0.5]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = regression_summary(draws, levels)
        for row in (0, 17, 36):
            # the row alone, first of a shorter batch, and last of a shorter batch
            for part, at in (
                (slice(row, row + 1), 0),
                (slice(row, None), 0),
                (slice(0, row + 1), row),
            ):
                summary = regression_summary(draws[:, part], levels)
                for key, value in summary.items():
                    mine, theirs = (
                        (value[:, at], full[key][:, row])
                        if key in ("lower", "upper")
                        else (value[at], full[key][row])
                    )
                    assert torch.equal(mine, theirs), (key, row, part)
    finally:
        torch.set_num_threads(before)


def test_variation_ratio_is_the_share_of_draws_off_the_modal_class():
    # 3 of 4 draws pick class 0, 1 picks class 2; a second row where all agree
    logits = torch.tensor(
        [[[5.0, 0.0, 0.0], [0.0, 3.0, 0.0]],
         [[4.0, 1.0, 0.0], [0.0, 2.0, 1.0]],
         [[2.0, 0.0, 1.0], [1.0, 4.0, 0.0]],
         [[0.0, 0.0, 9.0], [0.0, 1.0, 0.0]]]
    )  # fmt: skip
    s = classification_summary(logits, [0.9])
    torch.testing.assert_close(s["variation_ratio"], torch.tensor([0.25, 0.0], dtype=torch.float64))
