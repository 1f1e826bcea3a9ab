"""Forecasting: windows of a series in, H Gaussians out, served by :predict.

A small GRU forecaster is trained through credence-train on a synthetic CSV series and
served through the HTTP API; the CRPS is checked against its closed forms and a numerical
integral; the chronological split is checked to leak nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_settings, serve

from training import cli
from training.build import build_model
from training.crps import crps_gaussian, crps_mixture
from training.dataset import DataError
from training.fit import standardization
from training.series import (
    Series,
    chronological_split,
    load_forecast,
    load_series,
    output_names,
    split_windows,
    window_inputs,
)

WINDOW, HORIZON, STEPS = 12, 4, 240


def trend_series(steps: int = STEPS, seed: int = 0) -> np.ndarray:
    """A rising line with a 12-step season and a little noise: far outside [0, 1] in level."""
    t = np.arange(steps)
    noise = np.random.default_rng(seed).normal(0, 0.05, steps)
    return 100 + 0.5 * t + np.sin(2 * np.pi * t / 12) + noise


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> Path:
    names = list(columns)
    steps = len(columns[names[0]])
    lines = ["month," + ",".join(names)]
    for i in range(steps):
        stamp = f"{2000 + i // 12}-{i % 12 + 1:02d}"
        lines.append(stamp + "," + ",".join(f"{columns[n][i]:.6f}" for n in names))
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- CRPS


def numeric_crps(cdf, y: float, low: float, high: float, points: int = 200_001) -> float:
    """CRPS as its definition, the integral of (F(x) - 1[x >= y])^2, by the trapezoid rule
    on each side of the step at y."""
    below = torch.linspace(low, y, points, dtype=torch.float64)
    above = torch.linspace(y, high, points, dtype=torch.float64)
    return float(
        torch.trapezoid(cdf(below) ** 2, below) + torch.trapezoid((1 - cdf(above)) ** 2, above)
    )


def normal_cdf(mean: float, sd: float):
    return lambda x: 0.5 * (1 + torch.erf((x - mean) / (sd * math.sqrt(2))))


@pytest.mark.parametrize(("mean", "sd", "y"), [(0.0, 1.0, 0.0), (1.5, 0.3, 0.2), (-2, 4, 3)])
def test_gaussian_crps_is_its_integral(mean, sd, y):
    closed = float(crps_gaussian(*(torch.tensor(v, dtype=torch.float64) for v in (mean, sd**2, y))))
    assert closed == pytest.approx(numeric_crps(normal_cdf(mean, sd), y, -60, 60), rel=1e-5)


def test_mixture_crps_of_one_gaussian_is_the_gaussian_closed_form():
    gen = torch.Generator().manual_seed(0)
    mean, var = torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.1
    y = torch.randn(5, generator=gen) * 2
    single = crps_gaussian(mean, var, y)
    for n in (1, 7):  # n identical draws are one Gaussian
        mixture = crps_mixture(mean.expand(n, 5), var.expand(n, 5), y)
        torch.testing.assert_close(mixture, single, rtol=1e-12, atol=1e-12)


def test_mixture_crps_is_its_integral_and_beats_a_wrong_single_gaussian():
    mu, var = torch.tensor([[-1.0], [2.0], [2.5]]), torch.tensor([[0.25], [1.0], [0.04]])
    y = torch.tensor([1.0])

    def cdf(x: torch.Tensor) -> torch.Tensor:
        parts = [normal_cdf(float(m), math.sqrt(float(v)))(x) for m, v in zip(mu, var, strict=True)]
        return sum(parts) / len(parts)

    closed = float(crps_mixture(mu, var, y)[0])
    assert closed == pytest.approx(numeric_crps(cdf, 1.0, -40, 40), rel=1e-5)
    # the moment-matched Gaussian is another forecast, with another score
    mean = mu.mean(0)
    moment = float(crps_gaussian(mean, (var + (mu - mean) ** 2).mean(0), y)[0])
    assert abs(moment - closed) > 1e-3


def test_mixture_crps_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="mean, variance"):
        crps_mixture(torch.zeros(3, 2), torch.ones(3, 2), torch.zeros(3))


# --------------------------------------------------------------------------- windows and splits


def test_windows_split_in_time_leak_nothing():
    """Values are their own time index, so every window says which steps it holds."""
    steps, test_steps = 200, 24
    series = Series(
        np.arange(steps, dtype=np.float64)[:, None], ["v"], [str(i) for i in range(steps)]
    )
    train, test = split_windows(series, WINDOW, HORIZON, [0], test_steps)
    tail = steps - test_steps
    assert train.x.shape[1:] == (WINDOW, 1) and train.y.shape[1] == HORIZON
    # inputs are the W steps up to the origin, targets the H after it, in order
    np.testing.assert_array_equal(
        train.y - train.x[:, -1:, 0], np.tile(np.arange(1, 5), (len(train), 1))
    )
    assert train.y.max() == tail - 1  # the last training target is the step before the tail
    assert test.x.min() >= 0 and test.y.min() == tail and test.y.max() == steps - 1
    assert (
        test.x.max(axis=(1, 2)) < test.y.min(axis=1)
    ).all()  # every window ends before its targets
    fit_rows, val_rows = chronological_split(len(train), 0.2, HORIZON)
    fitted_steps = max(train.x[fit_rows].max(), train.y[fit_rows].max())
    assert train.y[val_rows].min() > fitted_steps  # no validation target was seen in fitting
    assert fit_rows.max() < val_rows.min()  # no shuffling across the boundary
    # the rows the normalizer's statistics come from are the fitted ones only
    stats = standardization(train.subset(fit_rows))
    assert stats["level_features"] == [0] and stats["y_mean"] == pytest.approx([1, 2, 3, 4])


def test_window_inputs_are_the_steps_up_to_each_origin():
    values = np.arange(30, dtype=np.float64).reshape(15, 2)
    x = window_inputs(values, 3, np.array([2, 14]))
    np.testing.assert_array_equal(x[1], values[12:15])
    with pytest.raises(ValueError, match="origins"):
        window_inputs(values, 3, np.array([1]))


def test_output_names_are_steps_ahead():
    assert output_names(["co2"], 3) == ["t+1", "t+2", "t+3"]
    assert output_names(["a", "b"], 2) == ["a@t+1", "b@t+1", "a@t+2", "b@t+2"]


def test_bundled_co2_is_monthly_without_gaps():
    co2 = load_series("series:co2")
    assert co2.times[0] == "1958-03" and co2.times[-1] == "2001-12" and len(co2.values) == 526
    assert np.isfinite(co2.values).all() and 310 < co2.values.min() < co2.values.max() < 375


def test_bundled_sunspots_and_airline_load_offline():
    sunspots = load_series("series:sunspots")
    assert (sunspots.times[0], sunspots.times[-1], len(sunspots.values)) == ("1700", "2008", 309)
    airline = load_series("series:airline")  # sktime's copy of Box & Jenkins' series
    assert airline.times[:2] == ["1949-01", "1949-02"] and len(airline.values) == 144
    assert airline.values[:3, 0].tolist() == [112, 118, 132]


def test_a_relative_forecaster_moves_with_the_level_of_its_window():
    """Shifting a window by c shifts every predicted mean by c and leaves the variances."""
    torch.manual_seed(0)
    config = {
        "method": "mc_dropout",
        "arch": {
            "name": "lstm",
            "input_shape": [6, 2],
            "recurrent": [8],
            "hidden": [],
            "dropout": 0.1,
        },
        "likelihood": {"kind": "gaussian", "num_targets": 6, "noise": "homoscedastic"},
    }
    stats = {
        "x_mean": [[0.0, 0.0]],
        "x_std": [[1.0, 2.0]],
        "y_mean": [0.1] * 6,
        "y_std": [2.0] * 6,
        "level_features": [1, 0],
    }
    model = build_model(config, stats)
    x = torch.randn(3, 6, 2)
    shift = torch.tensor([5.0, 300.0])
    seeds = torch.full((3,), 7)
    base = model.sample(x, 16, seeds)
    moved = model.sample(x + shift, 16, seeds)
    # outputs are step-major over the targets [feature 1, feature 0]
    expected = shift[[1, 0]].repeat(3)
    torch.testing.assert_close(
        moved[..., :6] - base[..., :6], expected.expand(16, 3, 6), atol=2e-4, rtol=0
    )
    torch.testing.assert_close(moved[..., 6:], base[..., 6:])


# --------------------------------------------------------------------------- CLI and serving


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("forecast")
    data = write_csv(root / "trend.csv", {"level": trend_series()})
    argv = ["--arch", "gru", "--task", "forecast", "--data", str(data), "--window", str(WINDOW)]
    argv += ["--horizon", str(HORIZON), "--test-steps", "24", "--recurrent", "16"]
    argv += ["--epochs", "150", "--lr", "0.01", "--out", str(root / "models"), "--quiet"]
    assert cli.main(argv) == 0
    return root / "models", data


def test_a_forecaster_trains_through_the_cli_and_serves_windows(forecaster):
    models, _ = forecaster
    values = trend_series()
    with serve(make_settings(models, batch_invariant=True)) as client:
        detail = client.get("/v1/models/trend").json()
        assert detail["architecture"] == "gru" and detail["task"] == "regression"
        assert detail["input"]["shape"] == [WINDOW, 1]
        assert detail["output"]["names"] == ["t+1", "t+2", "t+3", "t+4"]
        assert detail["forecast"] == {
            "window": WINDOW,
            "horizon": HORIZON,
            "features": ["level"],
            "targets": [0],
            "relative": True,
        }
        origins = np.array([STEPS - 20, STEPS - 1 - HORIZON])  # in the held-out tail
        windows = window_inputs(values[:, None], WINDOW, origins)
        body = {"instances": windows.tolist(), "parameters": {"seed": 3, "num_samples": 50}}
        answer = client.post("/v1/models/trend:predict", json=body)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert len(predictions) == 2
        for origin, p in zip(origins, predictions, strict=True):
            assert len(p["mean"]) == len(p["variance"]) == HORIZON
            truth = values[origin + 1 : origin + 1 + HORIZON]
            # in the series' units (about 220 here), from the window's level: within a few
            # noise-free seasonal amplitudes of the truth
            assert np.abs(np.array(p["mean"]) - truth).max() < 1.5, (p["mean"], truth)
            (interval,) = p["intervals"]
            assert all(
                lo < m < hi
                for lo, m, hi in zip(interval["lower"], p["mean"], interval["upper"], strict=True)
            )
            assert all(v > 0 for v in p["epistemic_variance"])
        short = {"instances": [windows[0, 1:].tolist()]}
        refused = client.post("/v1/models/trend:predict", json=short)
        assert refused.status_code == 422, refused.text
        # its outputs add each window's last value, which attributions would not see
        unexplained = client.post("/v1/models/trend:explain", json=body)
        assert unexplained.status_code == 422, unexplained.text
        assert "--no-relative" in unexplained.json()["error"]["message"]


def test_forecast_metrics_are_on_the_held_out_tail(forecaster):
    models, _ = forecaster
    import json

    manifest = json.loads((models / "trend" / "1" / "manifest.json").read_text())
    # the test windows: every origin whose 4 targets lie in the last 24 steps
    assert manifest["metrics"]["test"]["rows"] == 24 - HORIZON + 1
    assert manifest["training"]["data"]["test_from"] == "2018-01"
    assert manifest["normalization"]["level_features"] == [0]


def test_a_multivariate_series_forecasts_the_named_targets(tmp_path):
    t = np.arange(120)
    data = write_csv(tmp_path / "two.csv", {"a": np.sin(t / 5), "b": np.cos(t / 7), "c": t * 0.1})
    loaded = load_forecast(str(data), 8, 3, target="c,a")
    assert loaded.train.x.shape[1:] == (8, 3)
    assert loaded.train.output_names == ["c@t+1", "a@t+1", "c@t+2", "a@t+2", "c@t+3", "a@t+3"]
    np.testing.assert_allclose(loaded.train.y[0, :2], [t[8] * 0.1, np.sin(8 / 5)], rtol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--horizon", "4"], "apply to --task forecast only"),
        (["--task", "forecast", "--window", "4"], "needs --window W and --horizon H"),
        (["--task", "forecast", "--window", "4", "--horizon", "8", "--test-steps", "3"], "shorter"),
        (["--task", "forecast", "--window", "400", "--horizon", "4"], "training windows"),
    ],
)
def test_the_cli_refuses_bad_forecast_flags(forecaster, tmp_path, capsys, extra, message):
    _, data = forecaster
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data", str(data), "--arch", "gru", "--out", str(tmp_path), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_series_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="known: series:co2"):
        load_series("series:nope")
    bad = tmp_path / "bad.csv"
    bad.write_text("t,v\n2000-01,1\n1999-12,2\n")
    with pytest.raises(DataError, match="does not follow"):
        load_series(str(bad))
    bad.write_text("t,v\n1,1\n2,\n")
    with pytest.raises(DataError, match=r"line 3.*not a finite number"):
        load_series(str(bad))
    bad.write_text("t,v\n" + "".join(f"{i},{i}\n" for i in range(20)))
    with pytest.raises(DataError, match="no series column 'x'"):
        load_forecast(str(bad), 2, 1, target="x")
