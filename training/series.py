"""Time series for forecasting: loading a series, cutting it into windows, splitting in time.

A forecaster's instance is a window of the last W steps of every series feature, [W, F];
its outputs are the next H values of each target feature, step-major
(`t+1..t+H` for one target, `NAME@t+1, OTHER@t+1, ..., NAME@t+H, ...` for several): one
Gaussian per step and target, predicted directly (no recursion), so a window gets all H
steps in one pass and every method and summary of a regression model applies unchanged.

Splits are chronological and leak nothing: the test rows are the windows whose targets all
lie in the held-out tail, every training window ends before the tail, and the validation
windows (for early stopping and calibration) are the last training windows, kept
`horizon - 1` windows clear of those the model is fitted on, so that no validation target
was ever a fitted target or input.

Series: a CSV file whose first column is the time (or `time_column`), one row per step in
increasing time, numeric values in every other column; or a bundled series, offline:
`series:co2` (Mauna Loa CO2, statsmodels: weekly, as monthly means with the gaps
interpolated), `series:sunspots` (yearly sunspot numbers, statsmodels) and `series:airline`
(monthly airline passengers, sktime, where it is installed).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.dataset import DataError, Dataset, LoadedData, read_text

SERIES_PREFIX = "series:"
MIN_FIT_WINDOWS = 4


@dataclass
class Series:
    """Values [T, F] in time order, their feature names and time stamps (as text)."""

    values: np.ndarray
    names: list[str]
    times: list[str]


def _statsmodels():
    try:
        import statsmodels.api as sm
    except ImportError as exc:  # an optional extra: say how to get it
        raise DataError(
            "the bundled series need statsmodels: pip install 'credence-serve[series]'"
        ) from exc
    return sm


def _co2() -> Series:
    """Weekly CO2 (ppm, 1958-2001) as monthly means, as is customary; months with no
    measurement are interpolated linearly in time."""
    frame = _statsmodels().datasets.co2.load_pandas().data
    monthly = frame["co2"].resample("MS").mean().interpolate("time")
    return Series(
        monthly.to_numpy()[:, None], ["co2"], [t.strftime("%Y-%m") for t in monthly.index]
    )


def _sunspots() -> Series:
    frame = _statsmodels().datasets.sunspots.load_pandas().data
    return Series(
        frame["SUNACTIVITY"].to_numpy()[:, None],
        ["sunactivity"],
        [str(int(y)) for y in frame["YEAR"]],
    )


def _airline() -> Series:
    try:
        from sktime.datasets import load_airline
    except ImportError as exc:
        raise DataError("series:airline needs sktime (pip install sktime)") from exc
    y = load_airline()
    return Series(y.to_numpy(dtype=np.float64)[:, None], ["passengers"], [str(t) for t in y.index])


BUNDLED = {"co2": _co2, "sunspots": _sunspots, "airline": _airline}


def _parse_time(cell: str) -> float | np.datetime64 | None:
    try:
        return float(cell)
    except ValueError:
        pass
    try:
        return np.datetime64(cell)
    except ValueError:
        return None


def load_series_csv(path: str | Path, time_column: str | None = None) -> Series:
    """A CSV with a header row: the time column (default: the first), then numeric columns."""
    path = Path(path)
    text = read_text(path)
    rows = [row for row in csv.reader(text.splitlines()) if any(c.strip() for c in row)]
    if len(rows) < 2:
        raise DataError(f"{path}: need a header row and data rows")
    header = [name.strip() for name in rows[0]]
    if len(header) < 2:
        raise DataError(f"{path}: need a time column and at least one value column")
    time_column = header[0] if time_column is None else time_column
    if time_column not in header:
        raise DataError(f"{path}: no time column {time_column!r}; columns: {', '.join(header)}")
    t = header.index(time_column)
    names = [name for j, name in enumerate(header) if j != t]
    values = np.empty((len(rows) - 1, len(names)))
    times: list[str] = []
    previous = None
    for i, row in enumerate(rows[1:]):
        where = f"{path}: data row {i + 1} (line {i + 2})"
        if len(row) != len(header):
            raise DataError(f"{where} has {len(row)} fields, the header has {len(header)}")
        stamp = _parse_time(row[t].strip())
        if stamp is None:
            raise DataError(f"{where}: time {row[t]!r} is neither a number nor an ISO date")
        if previous is not None and (type(stamp) is not type(previous) or stamp <= previous):
            raise DataError(f"{where}: time {row[t]!r} does not follow the row before it")
        previous = stamp
        times.append(row[t].strip())
        for j, cell in enumerate(c.strip() for k, c in enumerate(row) if k != t):
            try:
                number = float(cell)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise DataError(f"{where}: column {names[j]!r} is not a finite number: {cell!r}")
            values[i, j] = number
    return Series(values, names, times)


def load_series(spec: str, time_column: str | None = None) -> Series:
    """`series:NAME` (bundled) or a CSV file with a time column."""
    if spec.startswith(SERIES_PREFIX):
        name = spec[len(SERIES_PREFIX) :]
        if name not in BUNDLED:
            known = ", ".join(SERIES_PREFIX + n for n in BUNDLED)
            raise DataError(f"unknown series {spec!r}; known: {known}")
        if time_column is not None:
            raise DataError("--time-column applies to CSV files, not bundled series")
        return BUNDLED[name]()
    return load_series_csv(spec, time_column)


def output_names(targets: list[str], horizon: int) -> list[str]:
    """`t+1..t+H` for one target; `NAME@t+h`, step-major, for several."""
    if len(targets) == 1:
        return [f"t+{h}" for h in range(1, horizon + 1)]
    return [f"{name}@t+{h}" for h in range(1, horizon + 1) for name in targets]


def window_inputs(values: np.ndarray, window: int, origins: np.ndarray) -> np.ndarray:
    """Windows [len(origins), W, F]: the W steps ending at each origin (its last observed
    step), for serving and rolling-origin evaluation."""
    origins = np.asarray(origins, dtype=np.int64)
    if len(origins) and (origins.min() < window - 1 or origins.max() >= len(values)):
        raise ValueError(f"origins must lie in [{window - 1}, {len(values) - 1}]")
    steps = origins[:, None] + np.arange(1 - window, 1)[None, :]
    return values[steps].astype(np.float32)


def window_targets(values: np.ndarray, horizon: int, origins: np.ndarray) -> np.ndarray:
    """The next H values after each origin, [len(origins), H * k], step-major."""
    steps = np.asarray(origins, dtype=np.int64)[:, None] + np.arange(1, horizon + 1)[None, :]
    return values[steps].reshape(len(steps), -1).astype(np.float32)


def chronological_split(n: int, fraction: float, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit windows, validation windows) of `n` windows in time order: validation is the
    last `fraction` of them, and the `horizon - 1` windows before it are dropped, so no
    fitted window (its inputs and its H targets) reaches a validation target."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return np.arange(n), np.arange(0)
    n_val = max(2, round(fraction * n))
    n_fit = n - n_val - (horizon - 1)
    if n_fit < MIN_FIT_WINDOWS:
        raise ValueError(
            f"{n} windows are too few to hold out {n_val} for validation with a gap of "
            f"{horizon - 1} and fit on {MIN_FIT_WINDOWS} (shorten --window or --horizon)"
        )
    return np.arange(n_fit), np.arange(n - n_val, n)


def forecast_dataset(
    series: Series,
    window: int,
    horizon: int,
    origins: np.ndarray,
    targets: list[int],
    relative: bool,
) -> Dataset:
    """The windows ending at `origins` and their next H target values, as regression rows
    that carry their forecast spec (the normalizer makes them relative, train_model splits
    them in time)."""
    values = series.values
    return Dataset(
        window_inputs(values, window, origins),
        window_targets(values[:, targets], horizon, origins),
        [],
        output_names([series.names[j] for j in targets], horizon),
        "regression",
        forecast={
            "window": window,
            "horizon": horizon,
            "features": list(series.names),
            "targets": list(targets),
            "relative": relative,
        },
    )


def target_indices(series: Series, target: str | None) -> list[int]:
    """Feature indices of the comma-separated target names (default: every feature)."""
    if target is None:
        return list(range(len(series.names)))
    wanted = [name.strip() for name in target.split(",")]
    missing = [name for name in wanted if name not in series.names]
    if missing:
        raise DataError(f"no series column {missing[0]!r}; columns: {', '.join(series.names)}")
    return [series.names.index(name) for name in wanted]


def split_windows(
    series: Series,
    window: int,
    horizon: int,
    targets: list[int],
    test_steps: int,
    relative: bool = True,
) -> tuple[Dataset, Dataset | None]:
    """(training windows, test windows) with the last `test_steps` steps held out: no
    training window reaches into them, and the test rows are the windows whose H targets
    all lie in them (None when nothing is held out)."""
    if window < 1 or horizon < 1:
        raise DataError("--window and --horizon must be positive")
    if test_steps and test_steps < horizon:
        raise DataError(
            f"--test-steps {test_steps} is shorter than --horizon {horizon}: a test window's "
            "targets must all lie in the held-out tail"
        )
    length = len(series.values)
    tail = length - test_steps  # the first held-out step
    train_origins = np.arange(window - 1, tail - horizon)  # last target at tail - 1
    if len(train_origins) < MIN_FIT_WINDOWS:
        raise DataError(
            f"{length} steps give {max(len(train_origins), 0)} training windows of {window} + "
            f"{horizon} steps before the {test_steps} held-out ones; need at least "
            f"{MIN_FIT_WINDOWS}"
        )
    train = forecast_dataset(series, window, horizon, train_origins, targets, relative)
    if not test_steps:
        return train, None
    test_origins = np.arange(max(tail - 1, window - 1), length - horizon)
    return train, forecast_dataset(series, window, horizon, test_origins, targets, relative)


def load_forecast(
    spec: str,
    window: int,
    horizon: int,
    target: str | None = None,
    test_steps: int | None = None,
    relative: bool = True,
    time_column: str | None = None,
) -> LoadedData:
    """Training windows of a series and test windows on its held-out tail.

    `target` names the features to forecast (comma-separated; default: every feature); the
    others are inputs only. The last `test_steps` (default H) steps are held out.
    """
    series = load_series(spec, time_column)
    try:
        targets = target_indices(series, target)
    except DataError as exc:
        raise DataError(f"{spec}: {exc}") from None
    test_steps = horizon if test_steps is None else test_steps
    try:
        train, test = split_windows(series, window, horizon, targets, test_steps, relative)
    except DataError as exc:
        raise DataError(f"{spec}: {exc}") from None
    tail = len(series.values) - test_steps
    info = {
        "kind": "series",
        "spec": spec,
        "steps": len(series.values),
        "first": series.times[0],
        "last": series.times[-1],
        "test_steps": test_steps,
        "test_from": series.times[tail] if test_steps else None,
    }
    return LoadedData(train, test, info)
