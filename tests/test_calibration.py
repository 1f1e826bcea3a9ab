"""Post-hoc calibration: what each method recovers, the coverage it restores, how it is
stored, refused when malformed, and served."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    classification_manifest,
    classification_model,
    make_settings,
    regression_manifest,
    regression_model,
    serve,
)

from service.registry import FailedModel, Registry, parse_spec
from service.settings import Settings
from training import cli, evaluate
from training.calibration import (
    MAX_KNOTS,
    CalibrationError,
    calibrated_summary,
    conformal_quantile,
    fit_calibration,
    parse_calibration,
    variance_scaled_draws,
)
from training.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint, save_checkpoint
from training.data import load_data
from training.metrics import sample_draws
from training.summaries import mixture_quantile, regression_summary

LEVELS = (0.5, 0.8, 0.95)


def predictive(
    rows: int, draws: int, seed: int, narrow: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws [n, rows, 2] of a per-row mixture, and targets from the same mixture widened
    about its mean by `narrow` (its sd), so the model is `narrow` times too confident.

    Draw means spread about a row's centre and the per-draw noise sd differs by row, so the
    mixture is a genuine mixture, not one Gaussian.
    """
    g = torch.Generator().manual_seed(seed)
    centre = 3 * torch.randn(rows, generator=g, dtype=torch.float64)
    noise_sd = 0.5 + torch.rand(rows, generator=g, dtype=torch.float64)
    mu = centre + 0.7 * torch.randn(draws, rows, generator=g, dtype=torch.float64)
    var = (noise_sd**2).expand(draws, rows)
    pick = torch.randint(0, draws, (rows,), generator=g)
    component = mu[pick, torch.arange(rows)]
    truth = component + noise_sd * torch.randn(rows, generator=g, dtype=torch.float64)
    mean = mu.mean(0)
    y = mean + narrow * (truth - mean)
    return torch.stack([mu, var], dim=-1), y[:, None]


def coverage(summary: dict, y: torch.Tensor) -> torch.Tensor:
    """Fraction of y inside each level's interval, [L]."""
    return ((y >= summary["lower"]) & (y <= summary["upper"])).double().mean(dim=(1, 2))


# ------------------------------------------------------------------------- variance scaling


def test_variance_scaling_recovers_the_closed_form_factor_of_a_gaussian():
    """Every draw the same Gaussian: the mixture is N(mu, v), and the maximum-likelihood
    factor is mean((y - mu)^2 / v) exactly."""
    g = torch.Generator().manual_seed(0)
    m, factor = 4000, 4.0
    mu = torch.randn(m, generator=g, dtype=torch.float64)
    var = 0.1 + torch.rand(m, generator=g, dtype=torch.float64)
    y = mu + (factor * var).sqrt() * torch.randn(m, generator=g, dtype=torch.float64)
    draws = torch.stack([mu, var], -1).expand(3, m, 2)
    fitted = fit_calibration("variance", draws, y)
    closed_form = float(((y - mu) ** 2 / var).mean())
    assert fitted["scale"][0] == pytest.approx(closed_form, rel=1e-7)
    # the estimate's sd is factor * sqrt(2 / m) = 2.2% of it; 5 sd
    assert fitted["scale"][0] == pytest.approx(factor, rel=5 * math.sqrt(2 / m))


def test_variance_scaling_recovers_the_factor_of_a_mixture_and_scales_it_exactly():
    m, narrow = 4000, 2.0
    draws, y = predictive(m, 8, seed=1, narrow=narrow)
    fitted = fit_calibration("variance", draws, y)
    # the maximum-likelihood factor of a scale family has relative sd about sqrt(2 / m) = 2.2%
    assert fitted["scale"][0] == pytest.approx(narrow**2, rel=5 * math.sqrt(2 / m))
    raw = regression_summary(draws, LEVELS)
    calibrated = calibrated_summary(draws, LEVELS, fitted)
    s = fitted["scale"][0]
    assert torch.equal(calibrated["mean"], raw["mean"])
    for key in ("variance", "epistemic_variance", "aleatoric_variance"):
        torch.testing.assert_close(calibrated[key], s * raw[key], rtol=1e-14, atol=0)
    # the intervals are the quantiles of the scaled mixture itself
    scaled = variance_scaled_draws(draws, fitted)
    tails = [(1 - a) / 2 for a in LEVELS]
    direct = mixture_quantile(scaled[..., :1], scaled[..., 1:], tails)
    torch.testing.assert_close(calibrated["lower"], direct, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------- restoring the coverage


@pytest.mark.parametrize("method", ["isotonic", "conformal"])
def test_recalibration_restores_coverage_of_fresh_points(method):
    m, fresh = 3000, 10000
    val_draws, val_y = predictive(m, 8, seed=2, narrow=2.0)
    test_draws, test_y = predictive(fresh, 8, seed=3, narrow=2.0)
    fitted = fit_calibration(method, val_draws, val_y)
    raw = coverage(regression_summary(test_draws, LEVELS), test_y)
    calibrated = coverage(calibrated_summary(test_draws, LEVELS, fitted), test_y)
    target = torch.tensor(LEVELS, dtype=torch.float64)
    # the achieved coverage has sd sqrt(a (1 - a) (1/m + 1/fresh)) from the m calibration
    # rows and the fresh ones: at most 0.0104 here; 4 sd
    sd = (target * (1 - target) * (1 / m + 1 / fresh)).sqrt()
    assert ((calibrated - target).abs() <= 4 * sd).all(), (calibrated, target)
    assert ((target - raw) >= 0.15).all(), raw  # the raw model really was too narrow


def test_isotonic_fixes_a_skewed_misfit_that_a_scale_cannot():
    """Targets skewed to the right of a symmetric predictive: one variance factor leaves the
    tails wrong (too many points above, too few below), the isotonic map moves each tail."""
    m, fresh = 3000, 20000
    levels = [0.8]
    (val_draws, _), (test_draws, _) = predictive(m, 8, 4, 1.0), predictive(fresh, 8, 5, 1.0)

    def skewed(draws: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        e = torch.empty(draws.shape[1], dtype=torch.float64).exponential_(generator=g) - 1
        return (draws[..., 0].mean(0) + 2 * e)[:, None]  # e: mean 0, sd 1, skewed right

    val_y, test_y = skewed(val_draws, 6), skewed(test_draws, 7)
    summaries = {
        method: calibrated_summary(test_draws, levels, fit_calibration(method, val_draws, val_y))
        for method in ("variance", "isotonic")
    }
    below = {k: float((test_y < s["lower"][0]).double().mean()) for k, s in summaries.items()}
    above = {k: float((test_y > s["upper"][0]).double().mean()) for k, s in summaries.items()}
    # each tail should hold 0.1; its sd from m and fresh rows is 0.006, so 0.025 is 4 sd
    assert abs(below["isotonic"] - 0.1) < 0.025 and abs(above["isotonic"] - 0.1) < 0.025
    assert above["variance"] - below["variance"] > 0.05, (below, above)


def test_conformal_coverage_over_many_seeds_meets_its_guarantee():
    """Split conformal's guarantee: over calibration and test draws, coverage >= level; with
    continuous scores it is exactly ceil((m + 1) a) / (m + 1), here 0.9 and, at a level too
    high for m = 39 rows, the cap at the largest score, 39 / 40."""
    m, fresh, seeds = 39, 200, 200
    results = {0.9: [], 0.99: []}
    for seed in range(seeds):
        draws, y = predictive(m + fresh, 4, seed=100 + seed, narrow=1.5)
        fitted = parse_calibration(fit_calibration("conformal", draws[:, :m], y[:m]))
        summary = calibrated_summary(draws[:, m:], list(results), fitted)
        for level, value in zip(results, coverage(summary, y[m:]).tolist(), strict=True):
            results[level].append(value)
    # per seed, coverage has variance a(1-a)/(m+2) + a(1-a)/fresh (beta plus binomial):
    # sd 0.051 at 0.9, so 0.0036 over 200 seeds; 4 sd = 0.015 (0.0076 at 39/40)
    assert np.mean(results[0.9]) == pytest.approx(0.9, abs=0.015)
    assert np.mean(results[0.99]) == pytest.approx(39 / 40, abs=0.0076)


def test_conformal_takes_the_right_order_statistic():
    g = torch.Generator().manual_seed(8)
    m = 99
    draws = torch.stack([torch.zeros(1, m), torch.ones(1, m)], dim=-1)  # N(0, 1) every row
    y = torch.randn(m, generator=g, dtype=torch.float64)
    fitted = parse_calibration(fit_calibration("conformal", draws, y))
    scores = y.abs().sort().values.numpy()
    assert conformal_quantile(fitted, 0.9)[0] == scores[89]  # ceil(100 * 0.9) = 90th smallest
    assert conformal_quantile(fitted, 0.95)[0] == scores[94]
    assert conformal_quantile(fitted, 0.995)[0] == scores[98]  # rank 100 > m: the largest
    summary = calibrated_summary(draws, [0.9], fitted)
    assert torch.allclose(summary["upper"], torch.tensor(scores[89], dtype=torch.float64))


def test_large_calibration_sets_keep_a_small_manifest_and_the_guarantee():
    m = 5 * MAX_KNOTS + 3
    draws, y = predictive(m, 2, seed=9, narrow=1.0)
    conformal = fit_calibration("conformal", draws, y)
    isotonic = fit_calibration("isotonic", draws, y)
    assert len(conformal["ranks"]) <= MAX_KNOTS and conformal["ranks"][-1] == m
    assert len(isotonic["predicted"][0]) <= MAX_KNOTS
    summary = regression_summary(draws, [])
    scores = ((y - summary["mean"]).abs() / summary["std"]).flatten().sort().values
    fitted = parse_calibration(conformal)
    for level in (0.5, 0.9, 0.95, 0.99):
        rank = math.ceil((m + 1) * level)  # the exact rank; a stored one at or above it
        q = conformal_quantile(fitted, level)[0]
        assert scores[rank - 1] <= q <= scores[min(rank + m // MAX_KNOTS + 1, m) - 1]


def test_levels_beyond_what_the_rows_resolve_give_finite_nested_intervals():
    """m = 20 rows cannot resolve a 0.999999 level: isotonic extrapolates to the corner
    (0, 0) / (1, 1), conformal takes the largest score; both stay finite and wider."""
    draws, y = predictive(20, 6, seed=12, narrow=1.3)
    levels = [0.9, 0.999999]
    for method in ("isotonic", "conformal"):
        summary = calibrated_summary(draws, levels, fit_calibration(method, draws, y))
        lower, upper = summary["lower"], summary["upper"]
        assert torch.isfinite(lower).all() and torch.isfinite(upper).all(), method
        assert (lower[1] <= lower[0]).all() and (upper[1] >= upper[0]).all(), method


def test_a_row_gets_the_same_calibrated_numbers_whatever_it_is_batched_with():
    draws, y = predictive(300, 20, seed=10, narrow=1.7)
    for method in ("variance", "isotonic", "conformal"):
        fitted = parse_calibration(fit_calibration(method, draws, y))
        together = calibrated_summary(draws, LEVELS, fitted)
        alone = calibrated_summary(draws[:, 7:9], LEVELS, fitted)
        for key, value in alone.items():
            part = together[key][:, 7:9] if key in ("lower", "upper") else together[key][7:9]
            assert torch.equal(value, part), (method, key)


# ---------------------------------------------------------------- training, eval, serving

SEED = 3
METHODS = ("variance", "isotonic", "conformal")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """toy:sine-gap trained once per calibration method by credence-train."""
    root = tmp_path_factory.mktemp("calibrated")
    fit = ["--epochs", "8", "--hidden", "32", "32", "--seed", str(SEED), "--eval-samples", "50"]
    for method in METHODS:
        argv = ["--data", "toy:sine-gap", *fit, "--calibration", method, "--out", str(root)]
        assert cli.main([*argv, "--name", f"toy-{method}", "--quiet"]) == 0
    return root


@pytest.mark.parametrize("method", METHODS)
def test_training_stores_the_calibration_and_reports_both(trained, method):
    manifest = latest_checkpoint(trained, f"toy-{method}").manifest
    calibration = manifest["calibration"]
    assert calibration["method"] == method
    assert calibration["rows"] == manifest["training"]["validation_rows"]
    test = manifest["metrics"]["test"]
    assert {"coverage_95", "calibrated_coverage_95", "calibrated_interval_width_95"} <= set(test)
    # sd 0.016 from the 200 calibration rows and 0.005 from the 2000 test rows: 3 sd
    assert test["calibrated_coverage_95"] == pytest.approx(0.95, abs=0.049)


@pytest.mark.parametrize("method", METHODS)
def test_served_intervals_are_the_calibrated_ones_and_name_the_method(trained, method, tmp_path):
    name = f"toy-{method}"
    x = load_data("toy:sine-gap").test.x[:16]
    checkpoint = evaluate.load_model_path(trained / name / "1")
    draws = sample_draws(checkpoint.build(), x, 80, SEED)
    expected = calibrated_summary(draws, [0.9, 0.5], checkpoint.manifest["calibration"])
    raw = regression_summary(draws, [0.9, 0.5])
    body = {"instances": x.tolist(), "parameters": {"num_samples": 80, "seed": SEED}}
    body["parameters"]["credible_levels"] = [0.9, 0.5]
    with serve(make_settings(trained)) as client:
        response = client.post(f"/v1/models/{name}:predict", json=body)
        detail = client.get(f"/v1/models/{name}").json()
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    assert {p["calibration"] for p in served} == {method}
    rows = checkpoint.manifest["calibration"]["rows"]
    assert detail["calibration"] == {"method": method, "rows": rows}  # not the knots
    for key in ("mean", "std", "variance", "epistemic_variance", "aleatoric_variance"):
        got = torch.tensor([p[key] for p in served], dtype=torch.float64)
        torch.testing.assert_close(got, expected[key], rtol=0, atol=0)
    for j in range(2):
        for side in ("lower", "upper"):
            got = torch.tensor([p["intervals"][j][side] for p in served], dtype=torch.float64)
            torch.testing.assert_close(got, expected[side][j], rtol=0, atol=0)
            assert not torch.equal(got, raw[side][j])  # calibration changed what is served
    # credence-eval scores the same stored calibration, and reproduces training's numbers
    out = tmp_path / "report.json"
    argv = ["--model", str(trained / name), "--data", "toy:sine-gap", "--seed", str(SEED)]
    assert evaluate.main([*argv, "--num-samples", "50", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["calibration"] == method
    recorded = checkpoint.manifest["metrics"]["test"]
    assert report["metrics"] == pytest.approx(recorded, rel=1e-12)


def test_an_uncalibrated_prediction_says_null(model_dir):
    with serve(make_settings(model_dir)) as client:
        body = {"instances": [[0.0, 1.0, 2.0]], "parameters": {"seed": 1}}
        response = client.post("/v1/models/reg:predict", json=body)
    assert response.json()["predictions"][0]["calibration"] is None


# ------------------------------------------------------------------ malformed calibration

GOOD = {"method": "conformal", "rows": 3, "ranks": [1, 2, 3], "scores": [[0.1, 0.5, 2.0]]}
BAD = [
    ("isotonic", "must be null or an object"),
    ({"method": "platt", "rows": 3}, "calibration.method must be one of"),
    ({"method": "variance", "rows": 3}, "calibration.scale must be a list"),
    ({"method": "variance", "rows": 3, "scale": [-1.0]}, "positive"),
    ({"method": "variance", "rows": 3, "scale": [1.0, 2.0]}, "2 target(s); the model has 1"),
    ({"method": "variance", "rows": 3, "scale": [True]}, "not booleans"),
    ({"method": "variance", "rows": 1, "scale": [1.0]}, "calibration.rows"),
    ({"method": "variance", "rows": 3, "scale": [1.0], "shift": 2}, "unknown keys ['shift']"),
    ({**GOOD, "ranks": [1, 2]}, "calibration.ranks must increase from >= 1 to rows (3)"),
    ({**GOOD, "scores": [[0.5, 0.1, 2.0]]}, "ascending"),
    ({**GOOD, "scores": [[0.1, "x", 2.0]]}, "calibration.scores must be a list of lists"),
    ({**GOOD, "scores": [[0.1, 0.5]]}, "one score per rank"),
    (
        {"method": "isotonic", "rows": 3, "predicted": [[0.2, 0.1]], "observed": [[0.3, 0.6]]},
        "ascending levels in [0, 1]",
    ),
    (
        {"method": "isotonic", "rows": 3, "predicted": [[0.1, 0.2]], "observed": [[0.3, 1.0]]},
        "increasing frequencies in (0, 1)",
    ),
]


@pytest.mark.parametrize(("calibration", "message"), BAD)
def test_malformed_calibration_is_refused_at_load_with_its_reason(calibration, message, tmp_path):
    manifest = {**regression_manifest(), "calibration": calibration}
    spec_manifest = {**manifest, "name": "m", "version": 1, "task": "regression"}
    with pytest.raises(CheckpointError, match="manifest: ") as info:
        parse_spec(spec_manifest, Settings())
    assert message in str(info.value)
    with pytest.raises(ValueError, match="calibration"):  # never written by the trainer path
        save_checkpoint(regression_model(), tmp_path, "bad", manifest)
    good = save_checkpoint(regression_model(), tmp_path, "bad", regression_manifest())
    written = json.loads((good / "manifest.json").read_text())
    written["calibration"] = calibration
    (good / "manifest.json").write_text(json.dumps(written))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(good)
    assert message in str(info.value)


def test_a_bad_calibration_fails_its_version_at_load_and_never_at_request_time(tmp_path):
    save_checkpoint(
        regression_model(), tmp_path, "cal", {**regression_manifest(), "calibration": GOOD}
    )
    bad = save_checkpoint(regression_model(1), tmp_path, "cal", regression_manifest())
    written = json.loads((bad / "manifest.json").read_text())
    written["calibration"] = {"method": "variance", "rows": 3, "scale": [0.0]}
    (bad / "manifest.json").write_text(json.dumps(written))
    save_checkpoint(classification_model(), tmp_path, "clf", classification_manifest())
    clf = tmp_path / "clf" / "1"
    written = json.loads((clf / "manifest.json").read_text())
    written["calibration"] = GOOD
    (clf / "manifest.json").write_text(json.dumps(written))
    registry = Registry.load(tmp_path, torch.device("cpu"), Settings())
    failed = registry.entries["cal"].versions[2]
    assert isinstance(failed, FailedModel) and "calibration.scale" in failed.error
    assert "regression models, not classification" in registry.entries["clf"].versions[1].error
    assert registry.entries["cal"].default_version == 1
    with serve(make_settings(tmp_path)) as client:
        body = {"instances": [[0.0, 1.0, 2.0]], "parameters": {"seed": 1}}
        assert client.post("/v1/models/cal/versions/2:predict", json=body).status_code == 503
        served = client.post("/v1/models/cal:predict", json=body)
    assert served.status_code == 200, served.text
    assert served.json()["predictions"][0]["calibration"] == "conformal"


def test_fitting_refuses_what_it_cannot_fit():
    draws, y = predictive(10, 3, seed=11, narrow=1.0)
    with pytest.raises(CalibrationError, match="one of"):
        fit_calibration("platt", draws, y)
    with pytest.raises(CalibrationError, match="at least 2"):
        fit_calibration("isotonic", draws[:, :1], y[:1])
    with pytest.raises(CalibrationError, match="finite"):
        fit_calibration("conformal", draws, torch.full_like(y, math.nan))
