"""Out-of-distribution detection on images, through the API: an MC-dropout CNN and a CNN
ensemble trained on the 8x8 digits 0-4 are less sure (mutual information) of digits 5-9,
the density of their features (training.density) tells 5-9 and uniform noise from 0-4, and
the served `ood` flag, which reads that density, fires on held-out 0-4 at the
false-positive rate the checkpoint stores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_settings, serve

from training.checkpoint import latest_checkpoint
from training.data import Dataset, load_data
from training.density import density_scores
from training.evaluate import stored_density
from training.fit import FitOptions
from training.images import noise_images
from training.ood import detection
from training.train import save_trained, train_model

DRAWS = 50  # per request, as many as the stored reference was made with
MODELS = {  # name: (method, options, epochs)
    "dropout": ("mc_dropout", {"dropout": 0.25}, 300),
    "ensemble": ("ensemble", {"members": 3}, 150),
}


def _digits(data: Dataset, first: int) -> Dataset:
    rows = np.flatnonzero((data.y >= first) & (data.y < first + 5))
    part = data.subset(rows)
    return Dataset(part.x, part.y - first, [], [str(first + i) for i in range(5)], part.task)


@pytest.fixture(scope="module", params=sorted(MODELS))
def answers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    method, options, epochs = MODELS[request.param]
    loaded = load_data("digits")
    train = _digits(loaded.train, 0)
    held_in, held_out = _digits(loaded.test, 0), _digits(loaded.test, 5)
    noise = noise_images("uniform", 200, train.input_shape, 4)
    result = train_model(
        train,
        held_in,
        method=method,
        method_options=options,
        arch="cnn",
        hidden=[64],
        arch_options={"conv": [16, 32]},
        options=FitOptions(seed=0, epochs=epochs),
        eval_samples=DRAWS,
    )
    root = tmp_path_factory.mktemp("ood")
    save_trained(result, train, root, "digits04")
    out = {}
    with serve(make_settings(root)) as client:
        for name, x in (("in", held_in.x), ("out", held_out.x), ("noise", noise)):
            calls = [  # each image a request of its own, as the reference rows were
                (
                    "/v1/models/digits04:predict",
                    {"instances": [image], "parameters": {"seed": i, "num_samples": DRAWS}},
                )
                for i, image in enumerate(x.tolist())
            ]
            responses = client.gather(*calls)
            assert all(r.status_code == 200 for r in responses)
            out[name] = [r.json()["predictions"][0] for r in responses]
        body = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [3, 1, 8, 8],
                    "data": noise[:3].tolist(),
                }
            ],
            "parameters": {"seed": 1},
        }
        v2 = client.post("/v2/models/digits04/infer", json=body)
    inputs = {"in": held_in.x, "out": held_out.x, "noise": noise}
    return result, out, inputs, root, v2


def test_mutual_information_separates_unseen_digits(answers):
    result, out, _, _, _ = answers
    assert result.metrics["test"]["accuracy"] > 0.95
    scores = {k: np.array([p["mutual_information"] for p in v]) for k, v in out.items()}
    assert detection(scores["in"], scores["out"])["auroc"] >= 0.8


def test_the_feature_density_separates_unseen_digits_and_noise(answers):
    result, _, inputs, _, _ = answers
    assert result.ood["score"] == "feature_density"
    scores = {k: density_scores(result.model, result.density, x) for k, x in inputs.items()}
    assert detection(scores["in"], scores["out"])["auroc"] >= 0.8
    assert detection(scores["in"], scores["noise"])["auroc"] >= 0.8


def test_the_served_ood_score_is_the_stored_densitys(answers):
    """What the server answers is the checkpoint's density on the model's features, placed
    among the validation rows' scores; V2 answers the same per row."""
    result, out, inputs, root, v2 = answers
    checkpoint = latest_checkpoint(root, "digits04")
    density = stored_density(checkpoint)
    model = checkpoint.build()
    entry = checkpoint.manifest["ood"]
    for name, x in inputs.items():
        scores = density_scores(model, density, x)
        served = np.array([p["ood_score"] for p in out[name]])
        np.testing.assert_allclose(served, np.interp(scores, entry["quantiles"], entry["levels"]))
        assert [p["ood"] for p in out[name]] == (scores > entry["threshold"]).tolist()
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    np.testing.assert_allclose(outputs["ood_score"], [p["ood_score"] for p in out["noise"][:3]])
    assert outputs["ood"] == [p["ood"] for p in out["noise"][:3]]
    torch.testing.assert_close(
        torch.from_numpy(density_scores(model, density, inputs["in"])),
        torch.from_numpy(density_scores(result.model, result.density, inputs["in"])),
    )


def test_the_ood_flag_fires_at_the_stored_rate_on_held_out_digits(answers):
    """The threshold is the (1 - FPR) quantile of m validation rows' scores; on k new
    in-distribution rows the flagged share has variance about FPR (1 - FPR) (1/k + 1/m)."""
    result, out, _, _, _ = answers
    fpr, m = result.ood["fpr"], result.ood["rows"]
    flags = np.array([p["ood"] for p in out["in"]])
    sd = math.sqrt(fpr * (1 - fpr) * (1 / len(flags) + 1 / m))
    assert abs(flags.mean() - fpr) < 3 * sd, (flags.mean(), fpr, sd)
    assert np.mean([p["ood"] for p in out["out"]]) > 3 * fpr  # and far more often on 5-9
    assert np.mean([p["ood"] for p in out["noise"]]) > 3 * fpr  # and on noise
