"""Loading checkpoints: tampered or inconsistent ones are refused with a reason, others serve."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import Client, make_settings, regression_manifest, regression_model, serve

from service.registry import FailedModel, LoadedModel, Registry, parse_spec
from service.settings import Settings
from training.build import build_model
from training.checkpoint import CheckpointError, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def manifest_with(num_samples: dict) -> dict:
    return {**regression_manifest(), "name": "m", "version": 1, "task": "regression",
            "method": "mc_dropout", "num_samples": num_samples}  # fmt: skip


@pytest.mark.parametrize(
    ("manifest_samples", "server", "expected"),
    [
        ({"default": 50, "max": 500}, {}, (50, 500)),  # the manifest's own
        ({"default": 50, "max": 500}, {"max_num_samples": 200}, (50, 200)),  # server cap wins
        ({"default": 300, "max": 500}, {"max_num_samples": 200}, (200, 200)),  # default capped
        ({"default": None, "max": None}, {"default_num_samples": 64}, (64, 1000)),  # settings
        ({}, {}, (100, 1000)),
    ],
)
def test_num_samples_precedence(manifest_samples: dict, server: dict, expected: tuple) -> None:
    spec = parse_spec(manifest_with(manifest_samples), Settings(**server))
    assert (spec.default_num_samples, spec.max_num_samples) == expected


@pytest.mark.parametrize(
    ("manifest_samples", "expected"),
    [
        ({"default": 5, "max": 5}, (5, 1000)),  # written before sets took any num_samples
        ({"default": 5, "max": 1000}, (5, 1000)),  # written now
        ({"default": 100, "max": 300}, (5, 300)),  # a cap of the model's own stays
        ({"default": 2, "max": 3}, (2, 3)),  # even one below the set's size
        ({}, (5, 1000)),
    ],
)
def test_a_sample_sets_limits(manifest_samples: dict, expected: tuple) -> None:
    spec = parse_spec(manifest_with(manifest_samples), Settings(), set_size=5)
    assert (spec.default_num_samples, spec.max_num_samples) == expected
    assert [spec.draws(n) for n in (1, 5, 6, 200)] == [1, 5, 5, 5]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"task": "ranking"}, "task"),
        ({"input": {"shape": [0]}}, "input.shape"),
        ({"input": {"shape": [3], "dtype": "int8"}}, "input.dtype"),
        ({"input": {"shape": [3], "feature_names": ["a", "b"]}}, "feature_names"),
        ({"output": {"names": []}}, "output.names"),
        ({"num_samples": {"default": -1}}, "num_samples.default"),
    ],
)
def test_malformed_manifest_is_refused_with_its_reason(change: dict, words: str) -> None:
    with pytest.raises(CheckpointError, match=words.replace(".", r"\.")):
        parse_spec({**manifest_with({}), **change}, Settings())


def test_tampered_checkpoint_is_refused_while_others_load(model_dir: Path) -> None:
    registry = Registry.load(model_dir, torch.device("cpu"), Settings())
    twin = registry.entries["twin"]
    assert twin.default_version == 1
    assert isinstance(twin.versions[1], LoadedModel)
    failed = twin.versions[2]
    assert isinstance(failed, FailedModel) and "sha256 of weights.safetensors" in failed.error
    assert registry.entries["broken"].default_version is None
    assert {m.spec.name for m in registry.loaded()} == {"reg", "clf", "twin"}


def test_tampering_is_visible_in_the_api(client: Client) -> None:
    detail = client.get("/v1/models/twin").json()
    assert detail["default_version"] == 1
    failed = [v for v in detail["versions"] if v["state"] == "failed"]
    assert [v["version"] for v in failed] == [2] and "sha256" in failed[0]["error"]
    broken = client.get("/v1/models/broken").json()
    assert broken["state"] == "unavailable" and "does not match" in broken["versions"][0]["error"]
    assert "reg/1" in client.get("/readyz").json()["loaded"]


def test_inconsistent_checkpoints_are_refused_at_load(tmp_path: Path) -> None:
    wrong_outputs = {**regression_manifest(), "output": {"names": ["y", "z"]}}
    save_checkpoint(regression_model(), tmp_path, "outputs", wrong_outputs)
    moved = save_checkpoint(regression_model(), tmp_path, "moved", regression_manifest())
    shutil.copytree(moved, moved.parent / "5")  # manifest still says version 1
    save_checkpoint(regression_model(), tmp_path, "fine", regression_manifest())
    (tmp_path / "notes").mkdir()  # not a model: ignored
    registry = Registry.load(tmp_path, torch.device("cpu"), make_settings(tmp_path))
    assert "(2, 2, 4)" in registry.entries["outputs"].versions[1].error
    assert "version 1" in registry.entries["moved"].versions[5].error
    assert registry.entries["moved"].default_version == 1
    assert [m.spec.name for m in registry.loaded()] == ["fine", "moved"]
    assert "notes" not in registry.entries


def test_unreadable_manifest_does_not_stop_the_others(tmp_path: Path) -> None:
    path = save_checkpoint(regression_model(), tmp_path, "bad", regression_manifest())
    (path / "manifest.json").write_text("{not json")
    save_checkpoint(regression_model(), tmp_path, "good", regression_manifest())
    registry = Registry.load(tmp_path, torch.device("cpu"), Settings())
    assert "not valid JSON" in registry.entries["bad"].versions[1].error
    assert [m.spec.name for m in registry.loaded()] == ["good"]
    assert json.loads((tmp_path / "good" / "1" / "manifest.json").read_text())["version"] == 1


def test_training_never_imports_service() -> None:
    found = subprocess.run(
        ["grep", "-rlE", r"^\s*(from|import) service", str(ROOT / "training")],
        capture_output=True,
        text=True,
    )
    assert found.stdout == "", found.stdout


def test_a_loaded_model_knows_whether_it_is_small(tmp_path: Path) -> None:
    """batch_workers computes a small model's batches on the event loop (service.app)."""
    config = {"method": "mc_dropout", "likelihood": {"kind": "gaussian", "num_targets": 1}}
    normalization = {"x_mean": [0.0] * 3, "x_std": [1.0] * 3, "y_mean": [0.0], "y_std": [1.0]}
    for name, hidden in (("narrow", [50]), ("wide", [600, 600])):
        arch = {"in_features": 3, "hidden": hidden, "dropout": 0.1}
        model = build_model({**config, "arch": arch}, normalization)
        save_checkpoint(model, tmp_path, name, regression_manifest())
    registry = Registry.load(tmp_path, torch.device("cpu"), make_settings(tmp_path))
    assert {m.spec.name: m.small for m in registry.loaded()} == {"narrow": True, "wide": False}


@pytest.mark.parametrize(
    ("spelled", "precision"), [("BFloat16", "bfloat16"), ("float16", "float16")]
)
def test_16_bit_precision_serves_mc_dropout_in_16_bits_and_other_methods_in_float32(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spelled: str, precision: str
) -> None:
    save_checkpoint(regression_model(), tmp_path, "dropout", regression_manifest())
    torch.manual_seed(0)
    variational = build_model(
        {
            "method": "variational",
            "arch": {"in_features": 3, "hidden": [8]},
            "likelihood": {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"},
        },
        {"x_mean": [0.0] * 3, "x_std": [1.0] * 3, "y_mean": [0.5], "y_std": [2.0]},
    )
    save_checkpoint(variational, tmp_path, "bayes", regression_manifest())
    settings = make_settings(tmp_path, precision=spelled)
    registry = Registry.load(tmp_path, torch.device("cpu"), settings)
    dropout, bayes = registry.resolve("dropout"), registry.resolve("bayes")
    assert dropout.precision == precision
    assert dropout.model.layers[0].weight.dtype == getattr(torch, precision)
    assert bayes.precision == "float32"
    assert f"bayes v1: precision {precision} applies to MC-dropout MLPs" in caplog.text
    float32 = Registry.load(tmp_path, torch.device("cpu"), make_settings(tmp_path))
    x, seeds = torch.randn(5, 3), torch.arange(5)
    full = float32.resolve("dropout").model.sample(x, 30, seeds)
    half = dropout.model.sample(x, 30, seeds)
    torch.testing.assert_close(half, full, rtol=0.02, atol=0.02 * full.abs().max().item())
    settings_with_workers = make_settings(tmp_path, precision=precision, batch_workers=1)
    with serve(settings_with_workers) as live:  # the worker process loads it the same way
        versions = live.get("/v1/models/dropout").json()["versions"]
        body = {"instances": [[0.1, -0.2, 0.3]], "parameters": {"seed": 5}}
        answer = live.post("/v1/models/dropout:predict", json=body)
    assert versions[0]["precision"] == precision
    assert answer.status_code == 200, answer.text
