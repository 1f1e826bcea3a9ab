"""Architecture and method are independent choices: every method trains and serves on every
architecture it supports, and the MLP fast paths equal the generic path they replace."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_settings, serve
from methods_support import METHOD_EXTRA
from torch import nn

from training.architectures import arch_config
from training.build import FAST_PATHS, MODEL_TYPES, build_model
from training.data import Dataset, load_data
from training.fit import FitOptions
from training.train import save_trained, train_model

SGMCMC = {
    "chains": 2,
    "warmup_epochs": 40,
    "cycles": 2,
    "burnin_cycles": 1,
    "epochs_per_cycle": 5,
    "samples_per_cycle": 2,
}
METHOD_OPTIONS = {
    "mc_dropout": {"dropout": 0.1},
    "ensemble": {"members": 3},
    "variational": {},
    "sgld": SGMCMC,
    "sghmc": SGMCMC,
    "laplace": {},
}
ARCH_OPTIONS = {"mlp": {}, "cnn": {"conv": [8]}, "lstm": {"recurrent": [16]}, "gru": {}}
HIDDEN = {"mlp": [32], "cnn": [32], "lstm": [], "gru": []}
BATCH = {"mlp": 32, "cnn": 128, "lstm": 32, "gru": 32}
PAIRS = [(method, arch) for arch in ARCH_OPTIONS for method in METHOD_OPTIONS]


@functools.cache
def data(arch: str) -> tuple[Dataset, Dataset]:
    """mlp: a 2-d regression; cnn: the 8x8 digits; lstm, gru: sums of noisy sequences."""
    rng = np.random.default_rng(0)
    if arch == "cnn":
        loaded = load_data("digits")
        return loaded.train.subset(range(600)), loaded.test
    if arch == "mlp":
        x = rng.uniform(-2, 2, (400, 2))
        y = np.sin(2 * x[:, :1]) + 0.5 * x[:, 1:] + 0.1 * rng.normal(size=(400, 1))
        full = Dataset(x, y, ["a", "b"], ["y"], "regression")
    else:
        x = rng.normal(size=(400, 8, 2))
        y = x[:, :, :1].sum(1) - 0.5 * x[:, -1, 1:] + 0.1 * rng.normal(size=(400, 1))
        full = Dataset(x, y, [], ["y"], "regression")
    return full.subset(range(300)), full.subset(range(300, 400))


def fit(method: str, arch: str):
    train, test = data(arch)
    return train_model(
        train,
        test,
        method=method,
        method_options=METHOD_OPTIONS[method],
        arch=arch,
        hidden=HIDDEN[arch],
        arch_options=ARCH_OPTIONS[arch],
        options=FitOptions(epochs=60, patience=None, seed=0, lr=3e-3, batch_size=BATCH[arch]),
        eval_samples=20,
        calibration=None,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root: Path = tmp_path_factory.mktemp("architectures")
    results = {}
    for method, arch in PAIRS:
        result = fit(method, arch)
        results[method, arch] = result
        save_trained(result, data(arch)[0], root, f"{method}-{arch}")
    with serve(make_settings(root, batch_invariant=True)) as client:
        yield client, results


@pytest.mark.parametrize(("method", "arch"), PAIRS)
def test_every_method_trains_and_serves_on_the_architecture(served, method, arch):
    client, results = served
    result = results[method, arch]
    assert type(result.model) is FAST_PATHS.get((method, arch), MODEL_TYPES[method])
    train, test = data(arch)
    metrics = result.metrics["test"]
    if train.task == "classification":  # ten classes: chance is 0.1
        assert metrics["accuracy"] > 0.6, metrics
    else:  # better than predicting the mean
        assert metrics["rmse"] < 0.7 * float(test.y.std()), metrics
    detail = client.get(f"/v1/models/{method}-{arch}").json()
    assert (detail["method"], detail["architecture"]) == (method, arch)
    url = f"/v1/models/{method}-{arch}:predict"
    instances = test.x[:3].tolist()
    body = {"instances": instances, "parameters": {"seed": 5, "num_samples": 8}}
    alone = client.post(url, json=body)
    assert alone.status_code == 200, alone.text
    other = {"instances": test.x[3:5].tolist(), "parameters": {"seed": 9, "num_samples": 8}}
    together = client.gather((url, other), (url, body))
    assert together[1].json() == alone.json()  # a seeded request is its own, batched or not
    predictions = alone.json()["predictions"]
    assert len(predictions) == 3
    if train.task == "classification":
        for p in predictions:
            assert sum(p["probabilities"]) == pytest.approx(1, abs=1e-5)
            assert p["mutual_information"] >= 0
    else:
        assert all(p["epistemic_variance"][0] >= 0 for p in predictions)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _copy_into_generic(method: str, fast, generic) -> None:
    """The fast path's parameters in the generic model's layout."""
    with torch.no_grad():
        if method == "mc_dropout":
            for a, b in zip(_linears(fast), _linears(generic), strict=True):
                b.load_state_dict(a.state_dict())
        elif method in ("ensemble", "sgld"):
            pairs = zip(fast.weights, fast.biases, strict=True)
            values = [v for w, b in pairs for v in (w.transpose(1, 2), b[:, 0])]
            generic.load_members(values)
        elif method == "variational":
            layers = [*fast.convs, *fast.layers]
            for i, layer in enumerate(layers):
                for j, kind in enumerate(("weight", "bias")):
                    rho = getattr(layer, f"{kind}_rho")
                    rho.copy_(torch.randn_like(rho) * 0.5 - 1)  # scales near 0.3
                    generic.mu[2 * i + j].copy_(getattr(layer, f"{kind}_mu"))
                    generic.rho[2 * i + j].copy_(rho)
        else:  # laplace: the MAP network and a random posterior over the last layer
            for a, b in zip(_linears(fast), _linears(generic), strict=True):
                b.load_state_dict(a.state_dict())
            for name in ("left", "right", "scale"):
                getattr(fast, name).copy_(torch.randn_like(getattr(fast, name)))
                getattr(generic, name).copy_(getattr(fast, name))
        generic.head.load_state_dict(fast.head.state_dict())


@pytest.mark.parametrize(("method", "arch"), sorted(FAST_PATHS))
def test_fast_paths_equal_the_generic_path(method, arch):
    """Same parameters, same seeds: the same draws (to float rounding), batched and per
    request."""
    if arch == "cnn":
        shape, likelihood = [1, 8, 8], {"kind": "categorical", "num_classes": 3}
        stats = {"x_mean": [[[0.1]]], "x_std": [[[0.5]]]}
        config = arch_config("cnn", shape, [6], conv=[4])
    else:
        shape = [3]
        likelihood = {"kind": "gaussian", "num_targets": 2, "noise": "heteroscedastic"}
        stats = {"x_mean": [0.1, 0.0, -0.2], "x_std": [1.0, 2.0, 0.5]}
        stats |= {"y_mean": [0.5, -1.0], "y_std": [2.0, 0.3]}
        config = arch_config("mlp", shape, [16, 8])
    extra = METHOD_EXTRA[method]
    torch.manual_seed(0)
    fast = build_model({"method": method, "arch": config | extra, "likelihood": likelihood}, stats)
    generic = MODEL_TYPES[method](config | extra, likelihood, stats)
    assert type(fast) is not type(generic)
    if method == "sghmc":
        method = "sgld"
    _copy_into_generic(method, fast, generic)
    x = torch.randn(5, *shape)
    seeds = torch.tensor([3, 3, 8, 1, 1])
    for sizes in (None, [2, 1, 2]):
        expected = fast.sample(x, 12, seeds, sizes)
        torch.testing.assert_close(generic.sample(x, 12, seeds, sizes), expected)
