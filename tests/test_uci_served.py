"""A UCI model made by the benchmark's protocol code serves the numbers credence-eval reports.

benchmarks/uci.py trains with the stacked grid (training.grid), exports the chosen member as
an MCDropoutMLP and scores it with the draws and summaries of training.metrics. This checks
that such a model, saved with a calibration fitted on held-out rows, is served with exactly
the mean and (calibrated) intervals that `credence-eval` scores on the split's test rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_settings, serve

from training import evaluate
from training.calibration import calibrated_summary, fit_calibration
from training.checkpoint import save_checkpoint
from training.data import load_data
from training.fit import holdout_split, standardization
from training.grid import DropoutGrid, GridConfig, GridMember, fit_grid
from training.metrics import sample_draws

UCI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uci"
pytestmark = pytest.mark.skipif(
    not (UCI / "yacht").is_dir(), reason=f"UCI benchmark data not found at {UCI}"
)

SPLIT, SEED, SAMPLES = 0, 7, 400


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """yacht split 0: one grid member fit briefly on 80% of the training rows, calibrated
    (variance scaling) on the other 20%, saved as a checkpoint."""
    train = load_data(str(UCI / "yacht"), split=SPLIT).train
    fit_rows, val_rows = holdout_split(len(train), 0.2, 0)
    fit_set, val = train.subset(fit_rows), train.subset(val_rows)
    member = GridMember(GridConfig(0.05, 0.5), standardization(fit_set), seed=0)
    grid = DropoutGrid(train.num_features, [50], [member])
    fit_grid(grid, fit_set, 100)
    model = grid.member_model(0)
    calibration = fit_calibration("variance", sample_draws(model, val.x, 200, SEED), val.y)
    assert calibration["scale"][0] != pytest.approx(1.0, abs=1e-3)  # it changes the intervals
    manifest = {
        "input": {"shape": [train.num_features], "dtype": "float32", "feature_names": None},
        "output": {"names": list(train.output_names)},
        "num_samples": {"default": 100, "max": 1000},
        "calibration": calibration,
    }
    root = tmp_path_factory.mktemp("uci")
    save_checkpoint(model, root, "yacht", manifest)
    return root


def test_served_mean_and_intervals_are_what_credence_eval_scores(model_dir, tmp_path):
    out = tmp_path / "report.json"
    argv = ["--model", str(model_dir / "yacht"), "--data", str(UCI / "yacht")]
    argv += ["--split", str(SPLIT), "--seed", str(SEED), "--num-samples", str(SAMPLES)]
    assert evaluate.main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())["metrics"]

    test = load_data(str(UCI / "yacht"), split=SPLIT).test
    body = {
        "instances": test.x.tolist(),
        "parameters": {"num_samples": SAMPLES, "seed": SEED, "credible_levels": [0.95]},
    }
    with serve(make_settings(model_dir)) as client:
        response = client.post("/v1/models/yacht:predict", json=body)
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    assert {p["calibration"] for p in served} == {"variance"}
    mean = torch.tensor([p["mean"][0] for p in served], dtype=torch.float64)
    lower = torch.tensor([p["intervals"][0]["lower"][0] for p in served], dtype=torch.float64)
    upper = torch.tensor([p["intervals"][0]["upper"][0] for p in served], dtype=torch.float64)
    y = torch.as_tensor(test.y[:, 0], dtype=torch.float64)

    assert float((mean - y).pow(2).mean().sqrt()) == pytest.approx(report["rmse"], rel=1e-12)
    covered = float(((y >= lower) & (y <= upper)).double().mean())
    assert covered == report["calibrated_coverage_95"]
    width = float((upper - lower).mean())
    assert width == pytest.approx(report["calibrated_interval_width_95"], rel=1e-12)
    # and the served intervals are the calibrated ones, not the raw model's
    assert width != pytest.approx(report["interval_width_95"], rel=1e-3)

    checkpoint = evaluate.load_model_path(model_dir / "yacht")
    draws = sample_draws(checkpoint.build(), test.x, SAMPLES, SEED)
    expected = calibrated_summary(draws, [0.95], checkpoint.manifest["calibration"])
    torch.testing.assert_close(mean, expected["mean"][:, 0], rtol=0, atol=0)
    torch.testing.assert_close(lower, expected["lower"][0, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(upper, expected["upper"][0, :, 0], rtol=0, atol=0)
