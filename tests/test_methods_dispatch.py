"""Every method through credence-train's dispatch table: options, fit, checkpoint, reload."""

from __future__ import annotations

import argparse

import pytest
import torch
from methods_support import sine_gap

from training import cli
from training.checkpoint import read_checkpoint
from training.data import load_toy
from training.fit import FitOptions
from training.methods import METHODS, get_method
from training.train import save_trained, train_model

TINY = {
    "variational": {"estimator": "flipout", "prior": "mixture:0.5,1,0.01"},
    "ensemble": {"members": 3},
    "sgld": {"chains": 2, "warmup_epochs": 2, "cycles": 2, "epochs_per_cycle": 6},
    "sghmc": {"chains": 2, "warmup_epochs": 2, "cycles": 2, "epochs_per_cycle": 6},
    "laplace": {"structure": "full"},
}


def test_each_method_declares_its_options_once_and_parses():
    parser = argparse.ArgumentParser()
    for name, method in METHODS.items():
        method.add_arguments(parser.add_argument_group(name))
    args = parser.parse_args(["--prior", "normal:0.5", "--members", "7", "--chains", "3"])
    for name, method in METHODS.items():
        options = {key: getattr(args, key) for key in method.defaults}
        chosen = get_method(name, **options)
        if "prior" in chosen.options:
            assert chosen.options["prior"] == "normal:0.5"
    assert get_method("ensemble", members=None).options["members"] == 5  # None = default
    assert get_method("sgld", chains=3).settings.num_samples == 3 * 3 * 5


@pytest.mark.parametrize("toy", ["sine-gap", "moons"])
@pytest.mark.parametrize("method", sorted(TINY))
def test_train_save_reload_sample(method, toy, tmp_path):
    data = sine_gap() if toy == "sine-gap" else load_toy(toy)
    train = data.train.subset(range(0, len(data.train), 4))
    options = FitOptions(epochs=3, batch_size=50, lr=1e-2, evaluations=3)
    result = train_model(
        train, None, method=method, method_options=TINY[method], hidden=(8,), options=options
    )
    assert result.model.method == method
    path = save_trained(result, train, tmp_path, f"{toy}-{method}")
    loaded = read_checkpoint(path)
    assert loaded.manifest["method"] == method
    x = torch.as_tensor(train.x[:6])
    seeds = torch.tensor([1, 1, 2, 3, 3, 3])
    torch.testing.assert_close(loaded.build().sample(x, 4, seeds), result.model.sample(x, 4, seeds))


def test_cli_defaults_a_sets_num_samples_to_its_draws(tmp_path):
    """An ensemble of M members has M distinct draws: all M by default, and a request for
    more gets the M (service.registry), so the maximum is any model's."""
    method = ["--method", "ensemble", "--members", "3", "--epochs", "2", "--hidden", "8"]
    output = ["--out", str(tmp_path), "--name", "ens", "--quiet"]
    cli.main(["--data", "toy:sine-gap", *method, *output])
    manifest = read_checkpoint(tmp_path / "ens" / "1").manifest
    assert manifest["num_samples"] == {"default": 3, "max": 1000}
    assert manifest["training"]["eval_samples"] == 3
    assert "method_metrics" in manifest["training"]
