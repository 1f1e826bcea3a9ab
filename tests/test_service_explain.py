""":explain: per-feature attributions per posterior draw, with their spread across draws.

Trained models, served on loopback: a regression in which only 2 of 10 features matter
(MC dropout and variational), the two moons (MC dropout, tanh, for the completeness of
integrated gradients) and the 8x8 digits (an MC-dropout CNN: a map per class)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Client, make_settings, metric_value, serve

from service import schemas
from training.checkpoint import read_checkpoint
from training.data import Dataset, load_data, load_toy
from training.fit import FitOptions
from training.train import save_trained, train_model

FEATURES = [f"x{i}" for i in range(10)]
INSTANCES = np.random.default_rng(1).normal(size=(8, 10)).round(3).tolist()


def synthetic() -> Dataset:
    """y = 3 x0 - 2 x1 + N(0, 0.5^2), x ~ N(0, I_10): features 2 to 9 do not matter."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 10))
    y = 3 * x[:, :1] - 2 * x[:, 1:2] + 0.5 * rng.normal(size=(2000, 1))
    return Dataset(x, y, FEATURES, ["y"], "regression")


def fit(data: Dataset, method: str, options: dict, epochs: int, **kwargs: object):
    return train_model(
        data,
        method=method,
        method_options=options,
        options=FitOptions(epochs=epochs, patience=None, seed=0, lr=3e-3),
        eval_samples=20,
        **kwargs,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explain")
    data = synthetic()
    for name, method, options in (
        ("synth-mcd", "mc_dropout", {"dropout": 0.3}),
        ("synth-vi", "variational", {}),
    ):
        save_trained(fit(data, method, options, 60, hidden=[32]), data, root, name)
    moons = load_toy("moons").train
    result = fit(moons, "mc_dropout", {"dropout": 0.1}, 60, hidden=[32], activation="tanh")
    save_trained(result, moons, root, "moons")
    digits = load_data("digits").train.subset(range(600))
    result = fit(digits, "mc_dropout", {"dropout": 0.1}, 8, arch="cnn", hidden=[32],
                 arch_options={"conv": [8]})  # fmt: skip
    save_trained(result, digits, root, "digits")
    return root


@pytest.fixture(scope="module")
def served(models: Path) -> Iterator[Client]:
    with serve(make_settings(models, batch_workers=0)) as client:
        yield client


def explain(client: Client, name: str, instances: list, **parameters: object) -> dict:
    body = {"instances": instances, "parameters": {"seed": 3, **parameters}}
    response = client.post(f"/v1/models/{name}:explain", json=body)
    assert response.status_code == 200, response.text
    return schemas.ExplainAnswer.model_validate(response.json()).model_dump()


@pytest.mark.parametrize("name", ["synth-mcd", "synth-vi"])
def test_only_the_two_features_that_matter_get_attributions(served: Client, name: str) -> None:
    """x0 and x1 have the largest mean |attribution| over the instances, and 99% intervals
    that exclude 0 wherever the instance is not near the baseline there (an attribution
    scales with x - baseline); every other feature's 99% interval covers 0, and its 95%
    interval on at least 90% of the (instance, feature) pairs. (A calibrated posterior
    covers a feature with no effect at about the interval's level: of 64 pairs a few 95%
    intervals may miss by chance, each by about the spurious effect the fit picks up from
    the noise, 0.5 / sqrt(2000).)"""
    answer = explain(served, name, INSTANCES, num_samples=200, credible_levels=[0.95, 0.99])
    assert (answer["method"], answer["quantity"], answer["outputs"]) == (
        "integrated_gradients",
        "mean",
        ["y"],
    )
    assert answer["feature_names"] == FEATURES and len(answer["baseline"]) == 10
    rows = answer["explanations"]
    mean = np.array([row["attributions"]["mean"][0] for row in rows])  # [instances, features]
    assert set(np.argsort(np.abs(mean).mean(0))[-2:]) == {0, 1}, np.abs(mean).mean(0)
    bounds = {
        level: np.array([[row["attributions"]["intervals"][j][side][0] for row in rows]
                         for side in ("lower", "upper")])
        for j, level in enumerate((0.95, 0.99))
    }  # fmt: skip
    covers = {level: (b[0] <= 0) & (b[1] >= 0) for level, b in bounds.items()}
    away = np.abs(np.array(INSTANCES) - np.array(answer["baseline"]))[:, :2] > 0.2
    assert not covers[0.99][:, :2][away].any(), bounds[0.99][:, :, :2]
    assert covers[0.99][:, 2:].all(), bounds[0.99][:, :, 2:]
    assert covers[0.95][:, 2:].mean() >= 0.9, covers[0.95]


def test_a_variational_posterior_is_surest_of_the_weights_of_the_features_that_matter(
    served: Client,
) -> None:
    snr = explain(served, "synth-vi", INSTANCES[:1], num_samples=8)["posterior_snr"]
    assert len(snr) == 10
    assert set(np.argsort(snr)[-2:]) == {0, 1}, snr
    assert explain(served, "synth-mcd", INSTANCES[:1], num_samples=8)["posterior_snr"] is None


def total_variation(name: str, models: Path, x: np.ndarray, n: int, seed: int) -> float:
    """The largest total variation over the draws of g(alpha) = dp(baseline + alpha (x -
    baseline))/d alpha on [0, 1], from `sample`'s draws on a fine grid (in float64), for
    every class: what bounds the midpoint rule's error."""
    model = read_checkpoint(models / name / "1").build().double()
    base = model.normalizer.x_mean.double()
    alpha = torch.linspace(0, 1, 1025, dtype=torch.float64)[:, None]
    path = base + alpha * (torch.as_tensor(x, dtype=torch.float64) - base)
    p = torch.softmax(model.sample(path, n, torch.full((len(path),), seed)), -1)  # [n, G, C]
    g = p.diff(dim=1) * (len(alpha) - 1)
    return g.diff(dim=1).abs().sum(1).max().item()


def test_integrated_gradients_sum_to_the_change_in_probability(served: Client, models: Path):
    """Per draw, the attributions sum to p(x) - p(baseline) within TV / steps (the midpoint
    rule's bound, TV the integrand's total variation); so does their mean, against the
    probabilities :predict gives with the same seed at x and at the baseline."""
    x, steps, n = [1.2, -0.4], 64, 50
    answer = explain(served, "moons", [x], num_samples=n, steps=steps)
    (row,) = answer["explanations"]
    mean = np.array(row["attributions"]["mean"])  # [classes, features]
    assert mean.shape == (2, 2) and answer["outputs"] == ["0", "1"]
    body = {"instances": [x, answer["baseline"]], "parameters": {"seed": 3, "num_samples": n}}
    predicted = served.post("/v1/models/moons:predict", json=body).json()["predictions"]
    p_x, p_base = (np.array(p["probabilities"]) for p in predicted)
    np.testing.assert_allclose(row["prediction"], p_x, atol=1e-6)
    np.testing.assert_allclose(row["baseline_prediction"], p_base, atol=1e-6)
    tolerance = total_variation("moons", models, np.array(x), n, 3) / steps
    assert 0 < tolerance < 0.1 * np.abs(p_x - p_base).max()
    assert max(row["convergence_delta"]) <= tolerance
    np.testing.assert_array_less(np.abs(mean.sum(1) - (p_x - p_base)), tolerance)


def test_an_image_classifier_gets_an_attribution_map_per_class(served: Client) -> None:
    """[classes][C][H][W] per instance; the classes' probabilities sum to 1 in every draw, so
    their attributions cancel pixel by pixel."""
    images = load_data("digits").test.x[:2].tolist()
    answer = explain(served, "digits", images, num_samples=16, steps=8)
    assert answer["outputs"] == [str(c) for c in range(10)]
    assert np.array(answer["baseline"]).shape == (1, 8, 8)
    for row in answer["explanations"]:
        maps = np.array(row["attributions"]["mean"])
        assert maps.shape == (10, 1, 8, 8)
        assert np.array(row["attributions"]["std"]).shape == (10, 1, 8, 8)
        assert np.array(row["attributions"]["intervals"][0]["upper"]).shape == (10, 1, 8, 8)
        np.testing.assert_allclose(maps.sum(0), 0, atol=1e-5)
        assert np.abs(maps).max() > 1e-3
    one = explain(served, "digits", images[:1], num_samples=16, steps=8, outputs=["7", 2])
    assert one["outputs"] == ["7", "2"]
    np.testing.assert_allclose(
        one["explanations"][0]["attributions"]["mean"],
        np.array(answer["explanations"][0]["attributions"]["mean"])[[7, 2]],
        atol=1e-9,
    )


def test_gradient_x_input_is_the_input_times_the_gradient_of_the_predictive_mean(
    client: Client,
) -> None:
    """The mean over draws of (x - mean) * dF_s/dx is (x - mean) * d(mean of F_s)/dx: checked
    against central differences of :predict's mean with the same seed (the same draws)."""
    x, h = np.array([0.3, -1.0, 2.0]), 1e-3
    body = {"instances": [x.tolist()], "parameters": {"seed": 4, "method": "gradient_x_input"}}
    answer = client.post("/v1/models/reg:explain", json=body).json()
    assert answer["steps"] == 1 and answer["explanations"][0]["convergence_delta"] is None
    shifted = [(x + s * h * np.eye(3)[i]).tolist() for i in range(3) for s in (1, -1)]
    rows = client.post(
        "/v1/models/reg:predict", json={"instances": shifted, "parameters": {"seed": 4}}
    ).json()["predictions"]
    means = np.array([r["mean"][0] for r in rows]).reshape(3, 2)
    gradient = (means[:, 0] - means[:, 1]) / (2 * h)
    baseline = np.array(answer["baseline"])
    np.testing.assert_allclose(
        answer["explanations"][0]["attributions"]["mean"][0], (x - baseline) * gradient, atol=2e-3
    )


@pytest.mark.parametrize(
    ("name", "parameters", "location", "words"),
    [
        ("reg", {"method": "shap"}, ["parameters", "method"], "integrated_gradients, gradient_x"),
        ("reg", {"steps": 0}, ["parameters", "steps"], "from 1 to 256"),
        ("reg", {"steps": 257}, ["parameters", "steps"], "from 1 to 256"),
        ("reg", {"method": "gradient_x_input", "steps": 4}, ["parameters", "steps"],
         "steps applies to integrated_gradients"),
        ("reg", {"quantity": "probability"}, ["parameters", "quantity"],
         "one of mean for a regression model"),
        ("clf", {"quantity": "mean"}, ["parameters", "quantity"], "probability, log_probability"),
        ("clf", {"outputs": ["daisy"]}, ["parameters", "outputs", 0], "'setosa', 'versicolor'"),
        ("clf", {"outputs": [0, 3]}, ["parameters", "outputs", 1], "index from 0 to 2"),
        ("clf", {"outputs": ["setosa", 0]}, ["parameters", "outputs", 1], "'setosa' again"),
        ("clf", {"outputs": "setosa"}, ["parameters", "outputs"], "non-empty list"),
        ("clf", {"outputs": []}, ["parameters", "outputs"], "non-empty list"),
        ("clf", {"num_samples": 401}, ["parameters", "num_samples"], "from 1 to 400"),
        ("clf", {"k": 3}, ["parameters", "k"], "unknown parameter 'k'"),
    ],
)  # fmt: skip
def test_bad_explain_requests_are_422_with_where(
    client: Client, name: str, parameters: dict, location: list, words: str
) -> None:
    row = [0.1, 0.2, 0.3] + ([0.4] if name == "clf" else [])
    response = client.post(
        f"/v1/models/{name}:explain", json={"instances": [row], "parameters": parameters}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["location"] == location, error
    assert words in error["message"], error["message"]


def test_attributions_past_the_cap_are_refused_before_any_work(served: Client) -> None:
    images = load_data("digits").test.x[:30].tolist()
    body = {"instances": images, "parameters": {"num_samples": 1000}}
    response = served.post("/v1/models/digits:explain", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["location"] == ["instances"]
    assert "1000 draws x 30 instances x 10 outputs x 64 input elements" in response.text


def test_explain_is_counted_and_answers_alike_from_a_worker_process(
    client: Client, model_dir: Path
) -> None:
    """The same attributions whether the batch ran on a thread of the server or in a batch
    worker process; requests are counted like predict's."""
    body = {"instances": [[0.3, -1.0, 2.0], [1.0, 1.0, 1.0]], "parameters": {"seed": 5}}
    labels = {"model": "reg", "version": "1", "protocol": "native", "code": "200"}
    before = metric_value(client.get("/metrics").text, "credence_requests_total", **labels)
    here = client.post("/v1/models/reg/versions/1:explain", json=body).json()
    after = metric_value(client.get("/metrics").text, "credence_requests_total", **labels)
    assert after == before + 1
    with serve(make_settings(model_dir, batch_workers=1)) as other:
        there = other.post("/v1/models/reg:explain", json=body).json()
    assert there == here


def test_an_explanation_past_its_deadline_is_a_504(served: Client) -> None:
    """Attributions take a pass per output and path point: the client's deadline holds."""
    images = load_data("digits").test.x[:1].tolist()
    body = {"instances": images, "parameters": {"steps": 64, "num_samples": 50,
                                                 "timeout_ms": 1}}  # fmt: skip
    response = served.post("/v1/models/digits:explain", json=body)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
