"""OOD flags: a prediction's epistemic score against the training data's, end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_settings, metric_value, serve

from service.registry import Registry
from service.settings import Settings
from training import cli, ood
from training.checkpoint import read_checkpoint
from training.data import load_data


def test_scores_are_levels_among_the_reference_rows_and_flags_pass_its_quantile():
    """Reference scores 0.00 .. 0.99: a score's ood_score is the share below it, and the
    flag is set past the 95% quantile (0.9405), not at it."""
    scores = torch.arange(100, dtype=torch.float64) / 100
    top = 0.5 + scores / 2  # the max probability of two classes
    summary = {
        "mutual_information": scores,
        "entropy": 2 * scores,
        "probabilities": torch.stack([top, 1 - top], -1),
    }
    entry = ood.reference("classification", summary, num_samples=10)
    assert entry["threshold"] == pytest.approx(0.9405)
    others = entry["others"]  # the alternatives' distributions on the same rows
    assert others["entropy"]["threshold"] == pytest.approx(2 * 0.9405)
    assert others["max_softmax"]["threshold"] == pytest.approx(-(0.5 + 0.0495 / 2))
    assert others["max_softmax"]["quantiles"][0] == pytest.approx(-0.995)
    assert (entry["rows"], entry["num_samples"], entry["fpr"]) == (100, 10, 0.05)
    reference = ood.OodReference.parse(entry, "classification")
    probe = {"mutual_information": torch.tensor([0.0, 0.495, 0.94, 0.95, 5.0])}
    fields = reference.fields(probe)
    np.testing.assert_allclose(fields["ood_score"], [0.0, 0.5, 0.9495, 0.9596, 1.0], atol=1e-3)
    assert fields["ood"].tolist() == [False, False, False, True, True]


def test_a_regressors_score_is_its_epistemic_std_averaged_over_targets():
    summary = {"epistemic_variance": torch.tensor([[1.0, 9.0], [4.0, 4.0]])}
    torch.testing.assert_close(ood.epistemic_score("regression", summary), torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"score": "entropy"}, "ood.score must be 'epistemic_std'"),
        ({"levels": [0.0, 1.0]}, "same length"),
        ({"quantiles": list(range(101))[::-1]}, "must not decrease"),
        ({"fpr": 1.5}, "fpr in (0, 1)"),
        ({"threshold": "high"}, "numeric"),
    ],
)
def test_a_malformed_reference_is_refused_saying_why(
    trained: Path, change: dict, words: str
) -> None:
    manifest = read_checkpoint(trained / "sg" / "1").manifest
    entry = {**manifest["ood"], **change}
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ood.OodReference.parse(entry, "regression")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """toy:sine-gap with the trainer's defaults: its gap (-1, 1) has no training inputs."""
    root = tmp_path_factory.mktemp("ood")
    cli.main(["--data", "toy:sine-gap", "--out", str(root), "--name", "sg", "--quiet"])
    return root


def test_held_out_points_are_rarely_flagged_and_the_gap_and_far_points_always(trained: Path):
    """Each held-out point is a request of its own, as the reference rows were. The
    threshold is the 95% quantile of 200 validation rows' scores: the share of fresh
    in-distribution points above it has sd about sqrt(0.05 * 0.95 / 200) = 0.015 (and 0.005
    more from the 2,000 test points), so 12% is over 4 sd above the 5% it aims at. Inputs in
    the middle of the gap and far outside the data are all flagged, and counted in the
    metrics (near the gap's edges the epistemic std has not risen enough yet: at x = 0.6,
    0.4 from the data, the score was at the 93rd percentile)."""
    test = load_data("toy:sine-gap").test
    assert len(test) == 2000
    far = [[-0.3], [0.0], [0.3], [-8.0], [8.0]]  # the middle of the gap, and far out
    url = "/v1/models/sg:predict"
    labels = {"model": "sg", "version": "1"}
    count = "credence_ood_predictions_total"
    with serve(make_settings(trained, max_queue=len(test))) as live:  # all at once
        calls = [
            (url, {"instances": [row], "parameters": {"seed": i}})
            for i, row in enumerate(test.x.tolist())
        ]
        held = [r.json()["predictions"][0] for r in live.gather(*calls)]
        page = live.get("/metrics").text
        before = metric_value(page, count, **labels)
        assert metric_value(page, "credence_predictions_total", **labels) == len(test)
        out = live.post(url, json={"instances": far, "parameters": {"seed": 1}})
        after = metric_value(live.get("/metrics").text, count, **labels)
    held_flags = [p["ood"] for p in held]
    assert sum(held_flags) / len(held_flags) <= 0.12
    assert before == sum(held_flags)
    rows = out.json()["predictions"]
    assert all(p["ood"] for p in rows), [p["ood_score"] for p in rows]
    assert all(p["ood_score"] > 0.95 for p in rows)
    assert after - before == len(far)


def test_a_checkpoint_without_a_reference_serves_null_flags(client) -> None:
    body = {"instances": [[0.0, 1.0, 2.0]]}
    prediction = client.post("/v1/models/reg:predict", json=body).json()["predictions"][0]
    assert prediction["ood"] is None and prediction["ood_score"] is None


def test_the_registry_refuses_a_checkpoint_whose_reference_is_malformed(trained: Path, tmp_path):
    shutil.copytree(trained / "sg", tmp_path / "sg")
    manifest_path = tmp_path / "sg" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["ood"]["fpr"] = 2.0
    manifest_path.write_text(json.dumps(manifest))
    registry = Registry.load(tmp_path, torch.device("cpu"), Settings(model_dir=tmp_path))
    failed = registry.entries["sg"].versions[1]
    assert "fpr in (0, 1)" in failed.error
