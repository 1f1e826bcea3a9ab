"""The wheel bandit example: its environment against closed forms, and a short game in which
Thompson sampling through the served model (credence-train refits, credence-serve answers
`:sample`) leaves less regret than playing uniformly."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bandit.py"


@pytest.fixture(scope="module")
def bandit():
    spec = importlib.util.spec_from_file_location("bandit", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bandit"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_contexts_fill_the_disk_and_the_outer_share_is_one_minus_delta_squared(bandit):
    n, delta = 40_000, 0.7
    contexts = bandit.wheel_contexts(n, np.random.default_rng(0))
    radius = np.hypot(contexts[:, 0], contexts[:, 1])
    assert radius.max() <= 1
    share, expected = (radius > delta).mean(), 1 - delta**2
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    # uniform in the disk: each quadrant holds a quarter
    quadrants = np.bincount((contexts[:, 0] > 0) * 2 + (contexts[:, 1] > 0), minlength=4) / n
    assert np.all(np.abs(quadrants - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n))


def test_the_quadrant_arm_pays_50_past_delta_and_arm_0_pays_1_2_inside(bandit):
    contexts = np.array([[0.1, 0.1], [0.9, 0.1], [0.9, -0.1], [-0.9, 0.1], [-0.1, -0.9]])
    means = bandit.wheel_means(contexts, 0.5)
    assert means[0].tolist() == [1.2, 1.0, 1.0, 1.0, 1.0]
    assert [int(np.argmax(m)) for m in means[1:]] == [1, 2, 3, 4]
    assert means[1:].max(axis=1).tolist() == [50.0] * 4


def test_refits_come_after_the_warm_up_at_doubling_counts_then_at_a_fixed_gap(bandit):
    assert bandit.refit_steps(2000, 20, 500) == [20, 40, 80, 160, 320, 640, 1140, 1640]


def test_thompson_sampling_through_the_server_beats_uniform_play(bandit, tmp_path: Path):
    runs = bandit.play(
        0.5,
        240,
        0,
        tmp_path,
        policies=("thompson", "uniform"),
        method="mc_dropout",
        warmup=20,
        refit_every=80,
        epochs=None,
        threads=1,
    )
    assert runs["thompson"].refits == 4  # at 20, 40, 80 and 160 contexts
    assert runs["uniform"].refits == 0
    # a uniform arm's regret per context: inside delta 0 or 0.2 (arm 0 or another), outside
    # 0, 48.8 or 49 (the quadrant's arm, arm 0, the other three)
    inner, outer = (
        np.array([[0, 1 / 5], [0.2, 4 / 5]]),
        np.array([[0, 0.2], [48.8, 0.2], [49, 0.6]]),
    )
    moments = [
        0.25 * (inner[:, 1] * inner[:, 0] ** k).sum()
        + 0.75 * (outer[:, 1] * outer[:, 0] ** k).sum()
        for k in (1, 2)
    ]
    mean, sd = 240 * moments[0], math.sqrt(240 * (moments[1] - moments[0] ** 2))
    assert abs(runs["uniform"].regret - mean) < 4 * sd
    assert runs["thompson"].regret < mean - 4 * sd  # past uniform play's Monte-Carlo range
