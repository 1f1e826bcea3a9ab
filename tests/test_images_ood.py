"""Out-of-distribution detection on images, through the API: an MC-dropout CNN trained on
the 8x8 digits 0-4 is less sure (mutual information) of digits 5-9, and its `ood` flag fires
on held-out 0-4 at the false-positive rate the checkpoint stores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_settings, serve

from training.data import Dataset, load_data
from training.fit import FitOptions
from training.ood import detection
from training.train import save_trained, train_model

DRAWS = 50  # per request, as many as the stored reference was made with


def _digits(data: Dataset, first: int) -> Dataset:
    rows = np.flatnonzero((data.y >= first) & (data.y < first + 5))
    part = data.subset(rows)
    return Dataset(part.x, part.y - first, [], [str(first + i) for i in range(5)], part.task)


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory):
    loaded = load_data("digits")
    train = _digits(loaded.train, 0)
    held_in, held_out = _digits(loaded.test, 0), _digits(loaded.test, 5)
    result = train_model(
        train,
        held_in,
        method="mc_dropout",
        method_options={"dropout": 0.25},
        arch="cnn",
        hidden=[64],
        arch_options={"conv": [16, 32]},
        options=FitOptions(seed=0, epochs=300),
        eval_samples=DRAWS,
    )
    root = tmp_path_factory.mktemp("ood")
    save_trained(result, train, root, "digits04")
    out = {}
    with serve(make_settings(root)) as client:
        for name, data in (("in", held_in), ("out", held_out)):
            calls = [  # each image a request of its own, as the reference rows were
                (
                    "/v1/models/digits04:predict",
                    {"instances": [image], "parameters": {"seed": i, "num_samples": DRAWS}},
                )
                for i, image in enumerate(data.x.tolist())
            ]
            responses = client.gather(*calls)
            assert all(r.status_code == 200 for r in responses)
            out[name] = [r.json()["predictions"][0] for r in responses]
    return result, out


def test_mutual_information_separates_unseen_digits(answers):
    result, out = answers
    assert result.metrics["test"]["accuracy"] > 0.95
    scores = {k: np.array([p["mutual_information"] for p in v]) for k, v in out.items()}
    assert detection(scores["in"], scores["out"])["auroc"] >= 0.8


def test_the_ood_flag_fires_at_the_stored_rate_on_held_out_digits(answers):
    """The threshold is the (1 - FPR) quantile of m validation rows' scores; on k new
    in-distribution rows the flagged share has variance about FPR (1 - FPR) (1/k + 1/m)."""
    result, out = answers
    fpr, m = result.ood["fpr"], result.ood["rows"]
    flags = np.array([p["ood"] for p in out["in"]])
    sd = math.sqrt(fpr * (1 - fpr) * (1 / len(flags) + 1 / m))
    assert abs(flags.mean() - fpr) < 3 * sd, (flags.mean(), fpr, sd)
    assert np.mean([p["ood"] for p in out["out"]]) > 3 * fpr  # and far more often on 5-9
