"""The service serves every method's checkpoint unchanged, seeded answers batch-independent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_settings, serve

from training.checkpoint import save_checkpoint
from training.model import build_model
from training.posteriors.laplace_fit import fit_last_layer

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
        limits = getattr(model, "sample_limits", {"default": 50, "max": 500})
        manifest = {
            "input": {"shape": [3], "dtype": "float32", "feature_names": ["a", "b", "c"]},
            "output": {"names": ["y"]},
            "num_samples": limits,
            "calibration": None,
        }
        save_checkpoint(model, root, method, manifest)
    with serve(make_settings(root)) as client:
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
