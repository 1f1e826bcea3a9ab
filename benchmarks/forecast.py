"""Forecasting the Mauna Loa CO2 series with intervals: a Bayesian LSTM against SARIMA and ETS.

The series is statsmodels' weekly co2 (1958-2001) as monthly means, gaps interpolated
(training.series, `series:co2`). The network is what `credence-train --arch lstm --task
forecast --data series:co2 --window W --horizon H` fits (through `train_model`, in-process):
windows of the last W months, 12 Gaussians out (one per step ahead), each step a change from
the window's last value. SARIMA(1,1,1)(1,1,1,12) and additive ETS (additive trend and
seasonality, statsmodels) are fitted in the same run on the same training months.

Protocol (rolling origin). A block of the last B months is held out: nothing fitted, tuned
or calibrated sees it. Every month o with a target in the block is a forecast origin, o from
(block start - H) to (block end - 2), and its window is the W months ending at o, so every
window ends before its targets; a (origin, step h) pair counts when o + h lies in the block.
Each step h then has B (origin, target) pairs, and every held-out month is scored at every
step. SARIMA and ETS keep the parameters fitted on the training months and filter the
months up to each origin, as the network reads its window. With `--folds F` the protocol
runs on the last F blocks in turn (an expanding-window backtest: each fold's models are
fitted on the months before its block), so each step has F * B pairs: the last fold alone
is the "last 2 years held out" evaluation, the pooled folds resolve per-step coverage.

Per step: PICP (share of targets inside the 95% interval), mean 95% width, CRPS (the
network's of its Monte-Carlo Gaussian mixture, in closed form, training.crps; the baselines'
of their Gaussian predictive) and RMSE of the predictive mean.

    .venv/bin/python benchmarks/forecast.py            # writes docs/results/forecast.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from machine import machine_line, machine_record, write_report

from training.calibration import summarize, variance_scaled_draws
from training.crps import crps_gaussian, crps_mixture
from training.fit import FitOptions
from training.metrics import sample_draws
from training.series import Series, load_series, split_windows, window_inputs
from training.train import train_model

LEVEL = 0.95
Z95 = 1.959963984540054
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Forecasts:
    """One method's forecasts from each origin: mean, variance-free 95% bounds and CRPS per
    (origin, step), [origins, H]."""

    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    crps: np.ndarray


def targets_of(values: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
    """Truth [origins, H] (NaN past the series' end)."""
    steps = origins[:, None] + np.arange(1, horizon + 1)[None, :]
    padded = np.concatenate([values, np.full(horizon, np.nan)])
    return padded[steps]


def network_forecasts(
    series: Series, start: int, end: int, origins: np.ndarray, args: argparse.Namespace
) -> tuple[Forecasts, dict, dict]:
    """Fit the forecaster on the months before `start`; forecast from every origin."""
    past = Series(series.values[:end], series.names, series.times[:end])
    train, _ = split_windows(past, args.window, args.horizon, [0], end - start)
    began = time.perf_counter()
    result = train_model(
        train,
        method=args.method,
        arch=args.arch,
        arch_options={"recurrent": [args.units]},
        val_fraction=args.val_fraction,
        options=FitOptions(
            lr=args.lr,
            batch_size=args.batch_size,
            epochs=args.epochs,
            seed=args.seed,
            progress=False,
            patience=args.patience,
        ),
        eval_samples=args.samples,
        calibration=None if args.calibration == "none" else args.calibration,
    )
    seconds = time.perf_counter() - began
    x = window_inputs(series.values[:end], args.window, origins)
    draws = sample_draws(result.model, x, args.samples, args.seed + 1).double()
    summary = summarize("regression", draws, [LEVEL], result.calibration)
    scored = draws
    if result.calibration is not None and result.calibration["method"] == "variance":
        scored = variance_scaled_draws(draws, result.calibration)  # the served predictive
    truth = torch.as_tensor(targets_of(series.values[:end, 0], origins, args.horizon))
    h = args.horizon
    crps = crps_mixture(scored[..., :h], scored[..., h:], torch.nan_to_num(truth))
    forecasts = Forecasts(
        summary["mean"].numpy(),
        summary["lower"][0].numpy(),
        summary["upper"][0].numpy(),
        crps.numpy(),
    )
    fit = result.fit
    info = {
        "seconds": round(seconds, 1),
        "epochs_run": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "fit_rows": result.config["fit_rows"],
        "validation_rows": result.config["validation_rows"],
    }
    return forecasts, info, {"model": result.model, "calibration": result.calibration}


def gaussian_forecasts(mean: np.ndarray, variance: np.ndarray, truth: np.ndarray) -> Forecasts:
    sd = np.sqrt(variance)
    crps = crps_gaussian(
        torch.as_tensor(mean), torch.as_tensor(variance), torch.as_tensor(np.nan_to_num(truth))
    )
    return Forecasts(mean, mean - Z95 * sd, mean + Z95 * sd, crps.numpy())


def sarima_forecasts(y: np.ndarray, start: int, origins: np.ndarray, horizon: int) -> Forecasts:
    """SARIMA(1,1,1)(1,1,1,12) fitted on y[:start], filtered up to each origin."""
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    fitted = SARIMAX(y[:start], order=(1, 1, 1), seasonal_order=(1, 1, 1, 12)).fit(disp=False)
    mean, var = np.empty((len(origins), horizon)), np.empty((len(origins), horizon))
    for i, o in enumerate(origins):
        forecast = fitted.apply(y[: o + 1]).get_forecast(horizon)
        mean[i], var[i] = forecast.predicted_mean, forecast.var_pred_mean
    return gaussian_forecasts(mean, var, targets_of(y, origins, horizon))


def ets_forecasts(y: np.ndarray, start: int, origins: np.ndarray, horizon: int) -> Forecasts:
    """ETS(A,A,A) with period 12 fitted on y[:start], smoothed up to each origin."""
    import pandas as pd
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    spec = {"error": "add", "trend": "add", "seasonal": "add", "seasonal_periods": 12}
    fitted = ETSModel(pd.Series(y[:start]), **spec).fit(disp=False)
    mean, var = np.empty((len(origins), horizon)), np.empty((len(origins), horizon))
    for i, o in enumerate(origins):
        smoothed = ETSModel(pd.Series(y[: o + 1]), **spec).smooth(fitted.params)
        prediction = smoothed.get_prediction(start=o + 1, end=o + horizon)
        mean[i], var[i] = prediction.predicted_mean, prediction.var_pred_mean
    return gaussian_forecasts(mean, var, targets_of(y, origins, horizon))


def step_metrics(f: Forecasts, truth: np.ndarray, valid: np.ndarray) -> dict[str, list[float]]:
    """PICP, mean 95% width, CRPS and RMSE per step over the valid (origin, step) pairs."""
    out: dict[str, list[float]] = {"picp": [], "width": [], "crps": [], "rmse": [], "pairs": []}
    for h in range(truth.shape[1]):
        m = valid[:, h]
        t = truth[m, h]
        inside = (f.lower[m, h] <= t) & (t <= f.upper[m, h])
        out["picp"].append(float(inside.mean()))
        out["width"].append(float((f.upper[m, h] - f.lower[m, h]).mean()))
        out["crps"].append(float(f.crps[m, h].mean()))
        out["rmse"].append(float(np.sqrt(((f.mean[m, h] - t) ** 2).mean())))
        out["pairs"].append(int(m.sum()))
    return out


def table(results: dict[str, dict], names: dict[str, str]) -> str:
    """Markdown: one row per step, PICP / width / CRPS / RMSE for each method."""
    head = "| step | " + " | ".join(
        f"{names[k]} {c}" for k in results for c in ("PICP", "width", "CRPS", "RMSE")
    )
    lines = [head + " | pairs |", "|---" * (1 + 4 * len(results)) + "|---|"]
    horizon = len(next(iter(results.values()))["picp"])
    for h in range(horizon):
        cells = []
        for r in results.values():
            cells += [f"{r['picp'][h]:.3f}", f"{r['width'][h]:.2f}"]
            cells += [f"{r['crps'][h]:.3f}", f"{r['rmse'][h]:.3f}"]
        pairs = next(iter(results.values()))["pairs"][h]
        lines.append(f"| t+{h + 1} | " + " | ".join(cells) + f" | {pairs} |")
    lines.append(
        "| mean | "
        + " | ".join(
            f"{np.mean(r[c]):.3f}" if c != "width" else f"{np.mean(r[c]):.2f}"
            for r in results.values()
            for c in ("picp", "width", "crps", "rmse")
        )
        + " | |"
    )
    return "\n".join(lines)


def fan_chart(
    path: Path,
    series: Series,
    start: int,
    end: int,
    network: dict,
    sarima: Forecasts,
    origins: np.ndarray,
    args: argparse.Namespace,
) -> None:
    """The last block: history, held-out truth, the network's 50/80/95% fans from the origin
    before each year, and SARIMA's 95% band from the same origins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = series.values[:, 0]
    months = np.arange(len(y))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    first = max(start - 48, 0)
    ax.plot(months[first:start], y[first:start], color="black", lw=1.2, label="observed")
    ax.plot(months[start:end], y[start:end], "o", color="black", ms=3, label="held out")
    levels = [0.5, 0.8, 0.95]
    for n, o in enumerate(range(start - 1, end - 1, args.horizon)):
        x = window_inputs(series.values[:end], args.window, np.array([o]))
        draws = sample_draws(network["model"], x, 1000, args.seed + 2).double()
        s = summarize("regression", draws, levels, network["calibration"])
        steps = o + np.arange(1, args.horizon + 1)
        for j, level in enumerate(levels):
            ax.fill_between(
                steps,
                s["lower"][j, 0],
                s["upper"][j, 0],
                color="tab:blue",
                alpha=0.18 + 0.12 * (len(levels) - j - 1),
                lw=0,
                label=f"LSTM {int(level * 100)}%" if n == 0 else None,
            )
        ax.plot(
            steps, s["mean"][0], color="tab:blue", lw=1.2, label="LSTM mean" if n == 0 else None
        )
        i = int(np.flatnonzero(origins == o)[0])
        for j, bound in enumerate((sarima.lower[i], sarima.upper[i])):
            label = "SARIMA 95%" if n == 0 and j == 0 else None
            ax.plot(steps, bound, "--", color="tab:red", lw=1, label=label)
    ticks = [m for m in range(first, end) if series.times[m].endswith("-01")]
    ax.set_xticks(ticks, [series.times[m][:4] for m in ticks])
    ax.set_ylabel("CO2 (ppm)")
    ax.set_title(
        f"Mauna Loa CO2, last {end - start} months held out: 12-month forecasts from "
        f"{series.times[start - 1]} and {series.times[start + args.horizon - 1]}"
    )
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=24)
    parser.add_argument("--horizon", type=int, default=12)
    parser.add_argument("--block", type=int, default=24, help="held-out months per fold")
    parser.add_argument("--folds", type=int, default=3, help="the last F blocks, in turn")
    parser.add_argument("--arch", default="lstm", choices=("lstm", "gru"))
    parser.add_argument("--method", default="mc_dropout")
    parser.add_argument("--units", type=int, default=32, help="recurrent state size")
    parser.add_argument("--epochs", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--patience", type=float, default=0.3)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--calibration", default="variance")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite forecast.md from the forecast.json of an earlier run (no fitting)",
    )
    args = parser.parse_args()
    if args.report_only:
        record = json.loads((args.out / "forecast.json").read_text())
        return write(argparse.Namespace(**{**record["args"], "out": args.out}), record)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # statsmodels' convergence chatter
    began = time.perf_counter()
    series = load_series("series:co2")
    y = series.values[:, 0]
    length, h = len(y), args.horizon
    names = {"network": args.arch.upper(), "sarima": "SARIMA", "ets": "ETS"}
    folds, pooled = [], {k: [] for k in names}
    for f in range(args.folds):
        end = length - (args.folds - 1 - f) * args.block
        start = end - args.block
        origins = np.arange(start - h, end - 1)
        truth = targets_of(y[:end], origins, h)
        steps = origins[:, None] + np.arange(1, h + 1)[None, :]
        valid = (steps >= start) & (steps < end)
        network, info, fitted = network_forecasts(series, start, end, origins, args)
        forecasts = {
            "network": network,
            "sarima": sarima_forecasts(y[:end], start, origins, h),
            "ets": ets_forecasts(y[:end], start, origins, h),
        }
        metrics = {k: step_metrics(v, truth, valid) for k, v in forecasts.items()}
        for k, v in forecasts.items():
            pooled[k].append((v, truth, valid))
        block = f"{series.times[start]}..{series.times[end - 1]}"
        folds.append({"block": block, "network_fit": info, "metrics": metrics})
        print(
            f"fold {block}: "
            + ", ".join(
                f"{names[k]} PICP {np.mean(m['picp']):.3f} CRPS {np.mean(m['crps']):.3f}"
                for k, m in metrics.items()
            )
            + f" ({info['seconds']} s fit, best epoch {info['best_epoch']})",
            flush=True,
        )
        if f == args.folds - 1:
            args.out.mkdir(parents=True, exist_ok=True)
            fan_chart(
                args.out / "forecast.png",
                series,
                start,
                end,
                fitted,
                forecasts["sarima"],
                origins,
                args,
            )
    overall = {}
    for k, parts in pooled.items():
        stacked = Forecasts(
            *(
                np.concatenate([getattr(p[0], a) for p in parts])
                for a in ("mean", "lower", "upper", "crps")
            )
        )
        overall[k] = step_metrics(
            stacked, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
        )
    seconds = time.perf_counter() - began
    machine = machine_record()
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "folds": folds,
        "pooled": overall,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time(), 1),  # its own, whatever else shares the cores
        "machine": machine,
    }
    (args.out / "forecast.json").write_text(json.dumps(record, indent=1) + "\n")
    write(args, record)


def write(args: argparse.Namespace, record: dict) -> None:
    """forecast.md from a run's record (its folds, pooled metrics, time and machine)."""
    names = {"network": args.arch.upper(), "sarima": "SARIMA", "ets": "ETS"}
    folds, overall, seconds = record["folds"], record["pooled"], record["seconds"]
    text = report_text(args, names, folds[-1], overall, folds, seconds, record)
    flags = [] if args.folds == 3 else [f"--folds {args.folds}"]
    write_report(
        args.out / "forecast.md",
        text,
        table=table(overall, names),
        command=" ".join(["python benchmarks/forecast.py", *flags]),
        machine=machine_line(record["machine"], 1),
        advice="the scores do not depend on the machine (seeded).",
        seconds=seconds,
    )


def verdict(metrics: dict[str, dict], names: dict[str, str]) -> str:
    """What a table shows against the targets, computed from it: per method, the steps whose
    95% PICP lies in [0.90, 0.99], and the network's mean CRPS against SARIMA's."""
    lines = []
    for key, m in metrics.items():
        inside = sum(0.90 <= p <= 0.99 for p in m["picp"])
        lines.append(
            f"- {names[key]}: 95% PICP in [0.90, 0.99] at {inside} of {len(m['picp'])} steps "
            f"(from {min(m['picp']):.3f} to {max(m['picp']):.3f}), mean CRPS "
            f"{np.mean(m['crps']):.3f}, mean RMSE {np.mean(m['rmse']):.3f}"
        )
    network, sarima = np.mean(metrics["network"]["crps"]), np.mean(metrics["sarima"]["crps"])
    steps = sum(
        a <= b for a, b in zip(metrics["network"]["crps"], metrics["sarima"]["crps"], strict=True)
    )
    relation = "no worse than" if network <= sarima else "worse than"
    lines.append(
        f"- {names['network']}'s mean CRPS is {relation} SARIMA's ({network:.3f} against "
        f"{sarima:.3f}; no worse at {steps} of {len(metrics['sarima']['crps'])} steps)"
    )
    pairs = metrics["network"]["pairs"][0]
    lines.append(
        f"- {pairs} pairs per step: PICP moves in steps of 1/{pairs} = {1 / pairs:.3f}, and a "
        f"calibrated 95% interval misses about {0.05 * pairs:.1f} of them"
    )
    return "\n".join(lines)


def fold_table(folds: list[dict], names: dict[str, str]) -> str:
    """One row per fold: each method's 95% PICP and CRPS averaged over the steps."""
    keys = list(folds[0]["metrics"])
    lines = [
        "| held-out block | " + " | ".join(f"{names[k]} PICP | {names[k]} CRPS" for k in keys),
        "|---" * (1 + 2 * len(keys)) + "|",
    ]
    for fold in folds:
        cells = [
            f"{np.mean(fold['metrics'][k]['picp']):.3f} | {np.mean(fold['metrics'][k]['crps']):.3f}"
            for k in keys
        ]
        lines.append(f"| {fold['block']} | " + " | ".join(cells) + " |")
    lines[0] += " |"
    return "\n".join(lines)


def report_text(args, names, last, overall, folds, seconds, record) -> str:
    fits = ", ".join(f"{f['network_fit']['seconds']:.0f}" for f in folds)
    cpu = record.get("cpu_seconds")
    took = f"The run took {seconds:.0f} s of wall time and {cpu or 0:.0f} s of CPU time.\n\n"
    return (
        "# Forecasting CO2 with intervals\n\n"
        f"`benchmarks/forecast.py`: a Bayesian {names['network']} ({args.method}, "
        f"{args.units} units, window {args.window} months, horizon {args.horizon}, each step "
        "a change from the window's last value) against SARIMA(1,1,1)(1,1,1,12) and ETS "
        "(additive error, trend and seasonality), all fitted in the same run on the same "
        "months of statsmodels' co2 series (weekly, as monthly means).\n\n"
        "![fan chart](forecast.png)\n\n"
        "## Protocol\n\n"
        + __doc__.split("Protocol (rolling origin). ")[1].split("\n\n")[0].replace("\n", " ")
        + "\n\n"
        + __doc__.split("\n\n")[3].replace("\n", " ")
        + "\n\n"
        f"Here B = {args.block} months and F = {args.folds} folds ({folds[0]['block'][:7]} to "
        f"{folds[-1]['block'][-7:]}). The network's intervals are central quantiles of its "
        f"{args.samples}-draw mixture with the `{args.calibration}` calibration fitted on its "
        f"validation windows (the last {args.val_fraction:.0%} of the training windows, kept "
        f"clear of the fitted ones); its fits took {fits} s. Widths and RMSE are in ppm.\n\n"
        + (took if cpu is not None else "")
        + f"## The last {args.block} months held out ({last['block']})\n\n"
        + table(last["metrics"], names)
        + "\n\n"
        + verdict(last["metrics"], names)
        + f"\n\n## Backtest: {args.folds} folds pooled\n\n"
        + fold_table(folds, names)
        + "\n\nEvery step over the folds together:\n\n"
        + table(overall, names)
        + "\n\n"
        + verdict(overall, names)
        + "\n\n"
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
