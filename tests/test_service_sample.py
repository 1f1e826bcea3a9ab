""":sample: a request's joint posterior draws, through the same batcher as :predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import Client, make_settings, regression_model, reordering_tolerance, serve

from training.build import build_model
from training.checkpoint import save_checkpoint

REG, CLF = "/v1/models/reg:sample", "/v1/models/clf:sample"
NEAR = [[0.2, -0.4, 1.0], [0.25, -0.4, 1.0]]  # two inputs whose outputs are strongly correlated


def draws_of(client: Client, url: str, instances: list, **parameters: object) -> dict:
    response = client.post(url, json={"instances": instances, "parameters": parameters})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_request_gets_draws_joint_across_its_instances(client: Client) -> None:
    """Draw s applies one weight sample to every instance of a request: the per-draw
    difference of two nearby inputs varies like the difference of correlated outputs, far
    less than their variances' sum, which is what independent requests give.

    With n = 500 draws a sample variance has relative sd sqrt(2 / n) = 6.3%, and the ratio
    of two independent ones about 9%: the independent case's band is 4 sd wide each side,
    and the joint case (a ratio near 0 for such close inputs) sits far below it."""
    n = 500
    joint = np.asarray(draws_of(client, REG, NEAR, num_samples=n, seed=1)["draws"]["mean"])
    assert joint.shape == (n, 2, 1)
    a = np.asarray(draws_of(client, REG, NEAR[:1], num_samples=n, seed=2)["draws"]["mean"])
    b = np.asarray(draws_of(client, REG, NEAR[1:], num_samples=n, seed=3)["draws"]["mean"])
    total = joint[:, 0].var() + joint[:, 1].var()
    assert (joint[:, 0] - joint[:, 1]).var() < 0.2 * total
    apart = a[:, 0].var() + b[:, 0].var()
    assert abs((a[:, 0] - b[:, 0]).var() / apart - 1) < 0.36
    same = np.asarray(draws_of(client, REG, [NEAR[0]] * 2, num_samples=50, seed=4)["draws"]["mean"])
    assert np.array_equal(same[:, 0], same[:, 1])  # one input twice: the same draws


def test_the_first_k_draws_of_n_are_the_draws_of_k(client: Client) -> None:
    """Draw s depends on the seed and s alone; the products' shapes grow with n, so the
    draws agree to their float rounding."""
    many = draws_of(client, REG, NEAR, num_samples=64, seed=9)["draws"]
    few = draws_of(client, REG, NEAR, num_samples=20, seed=9)["draws"]
    model = regression_model()
    x = torch.tensor(NEAR)
    bound = reordering_tolerance(model, model.sample(x, 64, torch.full((2,), 9)))
    for key in ("mean", "variance"):
        got, want = torch.tensor(many[key][:20]), torch.tensor(few[key])
        torch.testing.assert_close(got, want, rtol=2 * bound["rtol"], atol=2 * bound["atol"])


def test_the_draws_are_what_the_summaries_summarize(client: Client) -> None:
    """:predict's mean is the draws' mean and its aleatoric variance their mean variance;
    for a classifier, its probabilities the draws' mean probabilities (each draw's sum to
    one). The same seed and n give the same draws (float64 in JSON round-trips exactly)."""
    body = {"num_samples": 300, "seed": 5}
    draws = draws_of(client, REG, NEAR, **body)
    predict = client.post("/v1/models/reg:predict", json={"instances": NEAR, "parameters": body})
    rows = predict.json()["predictions"]
    mean = np.asarray(draws["draws"]["mean"]).mean(axis=0)
    aleatoric = np.asarray(draws["draws"]["variance"]).mean(axis=0)
    np.testing.assert_allclose(mean, [r["mean"] for r in rows], rtol=1e-12)
    np.testing.assert_allclose(aleatoric, [r["aleatoric_variance"] for r in rows], rtol=1e-12)
    assert (draws["num_samples"], draws["seed"], draws["outputs"]) == (300, 5, ["y"])
    instances = [[0.1, 0.2, 0.3, 0.4], [2.0, -1.0, 0.0, 1.0]]
    clf = draws_of(client, CLF, instances, **body)
    p = np.asarray(clf["draws"]["probabilities"])
    assert p.shape == (300, 2, len(clf["outputs"]))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    predicted = client.post(
        "/v1/models/clf:predict", json={"instances": instances, "parameters": body}
    ).json()["predictions"]
    np.testing.assert_allclose(p.mean(0), [r["probabilities"] for r in predicted], rtol=1e-12)


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"credible_levels": [0.9]}, "unknown parameter 'credible_levels'; allowed: num_samples"),
        ({"num_samples": 10**6}, "num_samples must be an integer from 1 to"),
        ({"seed": -1}, "seed must be an integer from 0"),
    ],
)
def test_bad_sample_requests_are_422_naming_the_problem(
    client: Client, parameters: dict, words: str
) -> None:
    response = client.post(REG, json={"instances": NEAR, "parameters": parameters})
    assert response.status_code == 422
    assert words in response.text


def test_a_sample_set_returns_all_its_members_for_more(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = {"method": "ensemble", "arch": {"in_features": 3, "hidden": [8], "members": 4}}
    config["likelihood"] = {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"}
    stats = {"x_mean": [0.0] * 3, "x_std": [1.0] * 3, "y_mean": [0.0], "y_std": [1.0]}
    manifest = {
        "input": {"shape": [3], "dtype": "float32", "feature_names": None},
        "output": {"names": ["y"]},
        "num_samples": {"default": 4, "max": 1000},
        "calibration": None,
    }
    save_checkpoint(build_model(config, stats), tmp_path, "ens", manifest)
    with serve(make_settings(tmp_path)) as live:
        answer = draws_of(live, "/v1/models/ens:sample", NEAR, num_samples=200)
    assert answer["num_samples"] == 4
    assert np.asarray(answer["draws"]["mean"]).shape == (4, 2, 1)


def test_a_worker_process_returns_the_draws_the_event_loop_computes(
    client: Client, model_dir: Path
) -> None:
    """The draws cross the worker's socket as the summaries do."""
    expected = draws_of(client, REG, NEAR, num_samples=30, seed=6)
    with serve(make_settings(model_dir, batch_workers=1)) as live:
        assert draws_of(live, REG, NEAR, num_samples=30, seed=6) == expected


def test_binary_draws_are_the_json_draws_as_safetensors(client: Client) -> None:
    """Accept: application/octet-stream: the same draws as float64 tensors [n, B, outputs],
    the response's other keys as the file's metadata."""
    body = {"instances": NEAR, "parameters": {"num_samples": 40, "seed": 12}}
    expected = client.post(REG, json=body).json()
    response = client.post(REG, json=body, headers={"accept": "application/octet-stream"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["credence-format"] == "safetensors"
    tensors = safetensors.numpy.load(response.content)
    assert sorted(tensors) == ["mean", "variance"]
    for key, value in tensors.items():
        assert value.dtype == np.float64 and value.shape == (40, 2, 1)
        assert np.array_equal(value, np.asarray(expected["draws"][key]))
    length = int.from_bytes(response.content[:8], "little")  # the format's JSON header
    metadata = json.loads(response.content[8 : 8 + length])["__metadata__"]
    assert metadata == {
        "model_name": "reg",
        "model_version": "1",
        "num_samples": "40",
        "seed": "12",
        "outputs": '["y"]',
    }
