"""Checkpoint round trip and refusal of anything that does not verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.build import build_model
from training.checkpoint import (
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    latest_checkpoint,
    list_versions,
    read_checkpoint,
    save_checkpoint,
)

CONFIG = {
    "method": "mc_dropout",
    "arch": {"in_features": 2, "hidden": [8, 8], "dropout": 0.2},
    "likelihood": {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"},
}
NORMALIZATION = {"x_mean": [1.0, -1.0], "x_std": [2.0, 0.5], "y_mean": [10.0], "y_std": [3.0]}
MANIFEST_FIELDS = {
    "input": {"shape": [2], "dtype": "float32", "feature_names": ["a", "b"]},
    "output": {"names": ["y"]},
    "num_samples": {"default": 50, "max": 500},
    "calibration": None,
}


def _saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model(CONFIG, NORMALIZATION)
    return model, save_checkpoint(model, tmp_path, "toy", MANIFEST_FIELDS)


def test_round_trip_gives_identical_draws(tmp_path):
    model, path = _saved(tmp_path)
    loaded = read_checkpoint(path)
    assert loaded.manifest["input"] == MANIFEST_FIELDS["input"]
    assert loaded.manifest["normalization"] == NORMALIZATION
    assert loaded.manifest["files"][WEIGHTS]["sha256"]
    x, seeds = torch.randn(5, 2), torch.arange(5)
    torch.testing.assert_close(loaded.build().sample(x, 20, seeds), model.sample(x, 20, seeds))


def test_version_folders_get_the_umask_mode_not_owner_only(tmp_path):
    """A server running as another user (the Docker image's) must be able to read them."""
    _, path = _saved(tmp_path)
    sibling = tmp_path / "made-by-mkdir"
    sibling.mkdir()
    assert path.stat().st_mode & 0o777 == sibling.stat().st_mode & 0o777


def test_versions_increase_and_latest_is_highest(tmp_path):
    _, first = _saved(tmp_path)
    _, second = _saved(tmp_path)
    assert (first.name, second.name) == ("1", "2")
    assert list_versions(tmp_path / "toy") == [1, 2]
    assert latest_checkpoint(tmp_path, "toy").version == 2
    assert not [p for p in (tmp_path / "toy").iterdir() if p.name.startswith(".")]


def test_one_changed_byte_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    weights = path / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"sha256 of weights\.safetensors does not match"):
        read_checkpoint(path)


def test_weights_are_safetensors_not_pickle(tmp_path):
    _, path = _saved(tmp_path)
    header_length = int.from_bytes((path / WEIGHTS).read_bytes()[:8], "little")
    header = json.loads((path / WEIGHTS).read_bytes()[8 : 8 + header_length])
    assert "layers.0.weight" in header


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m["files"].update({"../escape": {"sha256": "0"}}), "is not plain"),
        (lambda m: m["files"].update({"extra.bin": {"sha256": "0"}}), "extra.bin listed"),
        (lambda m: m["files"].pop(WEIGHTS), "lists no weights"),
    ],
)
def test_malformed_manifests_are_refused_with_a_reason(tmp_path, edit, message):
    _, path = _saved(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["model"]["arch"]["hidden"] = [8, 9]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        read_checkpoint(path).build()


def test_unknown_method_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["model"]["method"] = "alchemy"
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unknown method 'alchemy'"):
        read_checkpoint(path).build()


def test_bad_names_and_missing_fields_are_rejected_at_save(tmp_path):
    model = build_model(CONFIG, NORMALIZATION)
    with pytest.raises(ValueError, match="model name"):
        save_checkpoint(model, tmp_path, "../up", MANIFEST_FIELDS)
    with pytest.raises(ValueError, match="manifest lacks"):
        save_checkpoint(model, tmp_path, "ok", {"input": {}})
