"""The service serves every method's checkpoint unchanged, seeded answers batch-independent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_settings, serve

from training.build import build_model
from training.checkpoint import save_checkpoint
from training.posteriors.laplace_fit import fit_last_layer
from training.train import sample_limits

LIKELIHOOD = {"kind": "gaussian", "num_targets": 1, "noise": "heteroscedastic"}
STATS = {"x_mean": [0.0] * 3, "x_std": [1.0] * 3, "y_mean": [0.5], "y_std": [2.0]}
ARCH = {"in_features": 3, "hidden": [8]}
MODELS = {
    "variational": ARCH,
    "ensemble": {**ARCH, "members": 5},
    "sgld": {**ARCH, "members": 12},
    "sghmc": {**ARCH, "members": 12},
    "laplace": {**ARCH, "structure": "kron"},
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    root: Path = tmp_path_factory.mktemp("methods")
    for method, arch in MODELS.items():
        torch.manual_seed(0)
        model = build_model({"method": method, "arch": arch, "likelihood": LIKELIHOOD}, STATS)
        if method == "laplace":
            fit_last_layer(model, torch.randn(50, 3), torch.randn(50, 1))
        manifest = {
            "input": {"shape": [3], "dtype": "float32", "feature_names": ["a", "b", "c"]},
            "output": {"names": ["y"]},
            "num_samples": sample_limits(model, {"default": 50, "max": 500}),
            "calibration": None,
        }
        save_checkpoint(model, root, method, manifest)
        if method == "ensemble":  # as written before a set took requests above its size
            old = {**manifest, "num_samples": {"default": 5, "max": 5}}
            save_checkpoint(model, root, "ensemble-old", old)
    with serve(make_settings(root, batch_invariant=True)) as client:
        yield client


@pytest.mark.parametrize("method", sorted(MODELS))
def test_seeded_prediction_is_the_same_alone_and_batched(client, method):
    url = f"/v1/models/{method}:predict"
    body = {"instances": [[0.1, 0.2, 0.3], [1.0, -1.0, 0.0]], "parameters": {"seed": 7}}
    alone = client.post(url, json=body)
    assert alone.status_code == 200, alone.text
    others = [
        (url, {"instances": [[0.5, 0.5, 0.5]] * 3, "parameters": {"seed": seed}})
        for seed in (1, 2, 3)
    ]
    responses = client.gather(*others[:2], (url, body), *others[2:])
    assert all(r.status_code == 200 for r in responses)
    assert responses[2].json() == alone.json()
    expected = MODELS[method].get("members", 50)  # sample sets default to all their members
    assert alone.json()["num_samples"] == expected


@pytest.mark.parametrize("name", ["ensemble", "ensemble-old", "sgld", "sghmc"])
def test_a_request_above_a_sets_size_gets_the_whole_set(client, name):
    """One request suits every model: num_samples 200 from a set of M is its M draws, the
    same numbers as a request for M, and the response says M."""
    size = MODELS[name.removesuffix("-old")]["members"]
    url = f"/v1/models/{name}:predict"
    instances = [[0.1, 0.2, 0.3], [1.0, -1.0, 0.0]]
    answers = {}
    for n in (200, size, None):
        parameters = {"seed": 3} | ({} if n is None else {"num_samples": n})
        response = client.post(url, json={"instances": instances, "parameters": parameters})
        assert response.status_code == 200, response.text
        answers[n] = response.json()
        assert answers[n]["num_samples"] == size
    assert answers[200] == answers[size] == answers[None]
    fewer = client.post(url, json={"instances": instances, "parameters": {"num_samples": 2}})
    assert fewer.json()["num_samples"] == 2
    limits = client.get(f"/v1/models/{name}").json()["num_samples"]
    assert limits == {"default": size, "max": 500 if name != "ensemble-old" else 1000,
                      "set_size": size}  # fmt: skip


@pytest.mark.parametrize("name", ["ensemble", "ensemble-old", "variational"])
def test_the_servers_hard_cap_still_refuses(client, name):
    body = {"instances": [[0.0, 0.0, 0.0]], "parameters": {"num_samples": 1001}}
    response = client.post(f"/v1/models/{name}:predict", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["location"] == ["parameters", "num_samples"]
    assert "from 1 to" in error["message"]


def test_continuous_posteriors_take_200_draws(client):
    body = {"instances": [[0.0, 0.0, 0.0]], "parameters": {"num_samples": 200}}
    for name in ("variational", "laplace"):
        response = client.post(f"/v1/models/{name}:predict", json=body)
        assert response.json()["num_samples"] == 200
        assert client.get(f"/v1/models/{name}").json()["num_samples"]["set_size"] is None
