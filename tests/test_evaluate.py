"""credence-eval: the metrics training reported, and the numbers the server serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_settings, serve

from training import cli, evaluate
from training.build import build_model
from training.calibration import summarize
from training.checkpoint import latest_checkpoint, save_checkpoint
from training.data import load_data
from training.metrics import sample_draws

SEED = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    fit = ["--epochs", "30", "--hidden", "32", "32", "--seed", str(SEED), "--eval-samples", "50"]
    cli.main(["--data", "toy:sine-gap", *fit, "--out", str(root), "--name", "toy", "--quiet"])
    return root


def test_reproduces_the_test_metrics_recorded_at_training(model_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["--model", str(model_dir / "toy"), "--data", "toy:sine-gap", "--seed", str(SEED)]
    assert evaluate.main([*argv, "--num-samples", "50", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert (report["model"], report["version"], report["rows"]) == ("toy", 1, "test")
    recorded = latest_checkpoint(model_dir, "toy").manifest["metrics"]["test"]
    assert report["metrics"] == pytest.approx(recorded, rel=1e-12)


def test_served_mean_and_intervals_equal_the_evaluated_ones(model_dir):
    x = load_data("toy:sine-gap").test.x[:16]
    checkpoint = evaluate.load_model_path(model_dir / "toy" / "1")
    draws = sample_draws(checkpoint.build(), x, 80, SEED)
    calibration = checkpoint.manifest["calibration"]
    assert calibration["method"] == "conformal"  # what the server applies, as credence-eval does
    expected = summarize("regression", draws, [0.9], calibration)
    body = {"instances": x.tolist(), "parameters": {"num_samples": 80, "seed": SEED}}
    body["parameters"]["credible_levels"] = [0.9]
    with serve(make_settings(model_dir)) as client:
        response = client.post("/v1/models/toy:predict", json=body)
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    mean = torch.tensor([p["mean"] for p in served], dtype=torch.float64)
    lower = torch.tensor([p["intervals"][0]["lower"] for p in served], dtype=torch.float64)
    upper = torch.tensor([p["intervals"][0]["upper"] for p in served], dtype=torch.float64)
    torch.testing.assert_close(mean, expected["mean"], rtol=0, atol=0)
    torch.testing.assert_close(lower, expected["lower"][0], rtol=0, atol=0)
    torch.testing.assert_close(upper, expected["upper"][0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "toy:moons"], "is a regression model; the data is classification"),
        (["--data", "toy:sine-gap", "--num-samples", "5000"], r"--num-samples must be in \[1, "),
    ],
)
def test_incompatible_requests_are_refused_with_a_reason(model_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(model_dir / "toy"), *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("stored_max", [3, 1000])  # as older checkpoints wrote it, and now
def test_a_sample_set_is_scored_on_all_its_draws_when_more_are_asked(tmp_path, capsys, stored_max):
    """As the server serves it: more draws than a set of M has is its M."""
    torch.manual_seed(0)
    config = {"method": "ensemble", "arch": {"in_features": 1, "hidden": [8], "members": 3}}
    config["likelihood"] = {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"}
    stats = {"x_mean": [0.0], "x_std": [1.0], "y_mean": [0.0], "y_std": [1.0]}
    manifest = {
        "input": {"shape": [1], "dtype": "float32", "feature_names": ["x"]},
        "output": {"names": ["y"]},
        "num_samples": {"default": 3, "max": stored_max},
        "calibration": None,
    }
    save_checkpoint(build_model(config, stats), tmp_path, "ens", manifest)
    reports = {}
    for n in ("200", "3"):
        argv = ["--model", str(tmp_path / "ens"), "--data", "toy:sine-gap", "--num-samples", n]
        assert evaluate.main(argv) == 0
        reports[n] = json.loads(capsys.readouterr().out)
    assert reports["200"]["num_samples"] == 3
    assert reports["200"] == reports["3"]


def test_an_image_classifier_reports_ood_detection_and_a_reliability_diagram(tmp_path, capsys):
    """credence-train --arch cnn on the 8x8 digits, then credence-eval with noise images as
    OOD rows: each score's AUROC / AUPR / FPR at 95% TPR (the stored feature density's
    too), and the diagram's PNG."""
    fit = ["--arch", "cnn", "--conv", "8", "--hidden", "32", "--epochs", "30", "--seed", "0"]
    argv = ["--data", "digits", *fit, "--out", str(tmp_path), "--name", "digits", "--quiet"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    png = tmp_path / "reliability.png"
    model = ["--model", str(tmp_path / "digits"), "--data", "digits", "--num-samples", "16"]
    ood = ["--ood-data", "noise:uniform", "--reliability", str(png)]
    assert evaluate.main([*model, *ood]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["accuracy"] > 0.8
    bins = report["reliability"]
    assert sum(bins["rows"]) == report["metrics"]["rows"]
    points = zip(bins["rows"], bins["accuracy"], bins["confidence"], strict=True)
    ece = sum(r * abs(a - c) for r, a, c in points)
    assert ece / sum(bins["rows"]) == pytest.approx(report["metrics"]["ece"], abs=1e-9)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = report["ood"]["noise:uniform"]
    assert set(scores) == {"mutual_information", "entropy", "max_softmax", "feature_density"}
    assert all(0 <= s["auroc"] <= 1 and 0 <= s["fpr_at_95_tpr"] <= 1 for s in scores.values())
    assert scores["feature_density"]["auroc"] > 0.95, scores  # the score its flag reads
    with pytest.raises(SystemExit):  # 28x28 images for an 8x8 model
        evaluate.main([*model, "--ood-data", "mnist-5k"])
    assert "rows of shape [1, 28, 28], the model's [1, 8, 8]" in capsys.readouterr().err
