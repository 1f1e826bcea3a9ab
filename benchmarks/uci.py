"""UCI regression benchmark: the published MC-dropout protocol, and every other method.

    .venv/bin/python benchmarks/uci.py                          # all five, 20 splits, MC dropout
    .venv/bin/python benchmarks/uci.py --quick yacht concrete   # 3 splits
    .venv/bin/python benchmarks/uci.py --methods mc_dropout,ensemble --data path/to/folder

`mc_dropout` is Gal & Ghahramani's 2018 grid-search protocol (see the data's README): per
split, 20% of the training rows are held out; every dropout rate x noise precision tau of
the folder's dropout_rates.txt and tau_values.txt is fit on the other 80% (one hidden layer
of n_hidden.txt ReLU units, dropout on the inputs and the hidden layer, fixed Gaussian noise
of precision tau, weight decay from the prior length-scale 1e-2, Adam, batches of 128, 100 x
n_epochs.txt epochs, no early stopping) and scored by validation log-likelihood; the best
pair is refit on the whole training split for the same 100 x n_epochs.txt epochs and scored
on the test rows. The data's README gives the grid 10 x n_epochs.txt epochs, but networks
that short are far from converged (energy, split 0: validation RMSE 1.36 after 400 epochs,
0.66 after 1,200), so validation picks a noise far too wide for the refit, and calibration
fitted on the grid network cannot see it (energy's conformal coverage was 0.999). Gal's own
code trains the grid networks for the full budget too. `--grid-epochs 400` gives the letter
of the README. Every configuration of every split trains together as one stacked model, and
so do the refits (training/grid.py): the per-step cost of this tiny network is overhead,
which stacking shares. Data sets and methods run in parallel processes (`--jobs`).

The other methods (`--methods`, any that `credence-train --method` knows) run with the
trainer's own defaults on the protocol's network (one hidden layer of n_hidden.txt units):
20% of the training rows held out for early stopping and the noise refit, learned
homoscedastic noise, except `ensemble`, which uses the heteroscedastic Gaussian heads of
Lakshminarayanan et al. They learn their noise, so they need no tau grid; a method that needs
something else tuned per data set has a grid in METHOD_GRIDS (SG-MCMC: its warm-up),
chosen per split by validation log-likelihood. `credence_defaults` is `credence-train --data
DIR --split K` itself (two hidden layers of 100 units).

Calibration (training/calibration.py: variance scaling, isotonic, conformal) is fitted on
the held-out 20% of the training rows, with draws of a model that was not fit on them, and
applied to that model's test predictions: what `credence-train` serves. For mc_dropout that
model is the chosen grid network (fit on the other 80%), not the refit, which has seen every
training row: a calibration fitted on one network and applied to another has no guarantee
(the refit is the better-trained of the two, and on yacht its conformal 95% intervals
covered 0.989). So mc_dropout's raw columns are the refit's, its calibrated ones the grid
network's.
Test metrics, in original units: RMSE of the predictive mean, log-likelihood of the
Monte-Carlo mixture, coverage and mean width of the central 95% interval, raw and
calibrated, and the coverage of central intervals at every level (the calibration plot);
mean and standard error (std / sqrt(splits)) over splits. Writes docs/results/uci.md, .json
and .png (the plot needs matplotlib: `pip install -e '.[bench]'`). Not run by CI.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from machine import machine_line, machine_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.calibration import (  # noqa: E402
    METHODS as CALIBRATIONS,
)
from training.calibration import (  # noqa: E402
    conformal_quantile,
    fit_calibration,
    isotonic_tails,
    parse_calibration,
    variance_scaled_draws,
)
from training.data import Dataset, LoadedData, load_data, uci_num_splits  # noqa: E402
from training.fit import FitOptions, holdout_split, standardization  # noqa: E402
from training.grid import DropoutGrid, GridConfig, GridMember, fit_grid  # noqa: E402
from training.methods import METHODS  # noqa: E402
from training.metrics import (  # noqa: E402
    pointwise_log_likelihood,
    regression_metrics,
    sample_draws,
)
from training.summaries import mixture_cdf, regression_summary  # noqa: E402
from training.train import sample_limits, train_model  # noqa: E402

UCI = ROOT.parent / "shared" / "data" / "uci"
DATASETS = ("bostonHousing", "concrete", "energy", "wine-quality-red", "yacht")
PUBLISHED = {  # published.json keys, in table order
    "mc_dropout_grid_2018": "MC dropout 2018 (grid)",
    "mc_dropout_2016": "MC dropout 2016",
    "pbp": "PBP",
    "vi": "VI (Graves)",
    "deep_ensembles": "deep ensembles",
}
EXTRA_METHODS = ("credence_defaults",)
VAL_FRACTION = 0.2
REFIT_EPOCHS_FACTOR = 100
LEVELS = [round(0.05 * i, 2) for i in range(1, 20)] + [0.99]  # central interval levels
OUT = ROOT / "docs" / "results" / "uci"


@dataclass
class Settings:
    """What the run does beyond the folder's own files."""

    seed: int
    test_samples: int
    val_samples: int
    grid_epochs: int | None  # None: the refit's
    refit_epochs: int | None  # None: REFIT_EPOCHS_FACTOR x n_epochs.txt
    threads: int


def read_number(folder: Path, name: str, default: float) -> float:
    path = folder / name
    return float(np.loadtxt(path, ndmin=1)[0]) if path.is_file() else default


def read_list(folder: Path, name: str) -> list[float]:
    return [float(v) for v in np.loadtxt(folder / name, ndmin=1)]


def parse_splits(text: str) -> list[int]:
    """Split numbers from "0-4" or "0,3,7"."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(part) for part in text.split(",")]


def split_validation(train: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """The inner (fit, validation) split of a training split: the one train_model makes."""
    fit_rows, val_rows = holdout_split(len(train), VAL_FRACTION, seed)
    return train.subset(fit_rows), train.subset(val_rows)


# ------------------------------------------------------------------------------- scoring


def coverage_curve(draws: torch.Tensor, y: torch.Tensor, calibration: dict | None) -> list[float]:
    """Observed coverage of the central interval at each of LEVELS, as served (raw or with
    `calibration`): y is inside the level-a interval iff its PIT value lies between the
    interval's tail probabilities, so one CDF evaluation scores every level at once."""
    cal = parse_calibration(calibration, num_targets=1) if calibration else None
    if cal is not None and cal.method == "conformal":
        summary = regression_summary(draws, [])  # the served mean and std
        score = ((y - summary["mean"][:, 0]).abs() / summary["std"][:, 0]).numpy()
        return [float((score <= conformal_quantile(cal, a)[0]).mean()) for a in LEVELS]
    if cal is not None and cal.method == "variance":
        draws = variance_scaled_draws(draws, cal)
    pit = mixture_cdf(draws[..., 0].double(), draws[..., 1].double(), y).numpy()
    curve = []
    for a in LEVELS:
        lo, hi = (1 - a) / 2, (1 + a) / 2
        if cal is not None and cal.method == "isotonic":
            lo, hi = isotonic_tails(cal, 0, [lo, hi])
        curve.append(float(((pit >= lo) & (pit <= hi)).mean()))
    return curve


def raw_score(draws: torch.Tensor, test: Dataset) -> dict[str, object]:
    """The model's own test metrics and coverage curve."""
    y = torch.as_tensor(test.y, dtype=torch.float64)
    return {
        "raw": regression_metrics(draws, y),
        "curves": {"raw": coverage_curve(draws, y.view(-1), None)},
    }


def calibrated_score(
    draws: torch.Tensor, test: Dataset, val_draws: torch.Tensor, val: Dataset
) -> dict[str, object]:
    """For each calibration fitted on the validation draws (of the same model, on rows it
    was not fit on), the calibrated 95% coverage and width on the test rows (and the
    log-likelihood, for variance scaling), and the coverage curve."""
    y = torch.as_tensor(test.y, dtype=torch.float64)
    out: dict[str, object] = {}
    curves = {}
    for method in CALIBRATIONS:
        fitted = fit_calibration(method, val_draws, val.y)
        metrics = regression_metrics(draws, y, calibration=fitted)
        out[method] = {
            "coverage_95": metrics["calibrated_coverage_95"],
            "interval_width_95": metrics["calibrated_interval_width_95"],
            **(
                {"log_likelihood": metrics["calibrated_log_likelihood"]}
                if "calibrated_log_likelihood" in metrics
                else {}
            ),
            "fitted": fitted if method == "variance" else {"rows": fitted["rows"]},
        }
        curves[method] = coverage_curve(draws, y.view(-1), fitted)
    out["curves"] = curves
    return out


def score(
    draws: torch.Tensor, test: Dataset, val_draws: torch.Tensor, val: Dataset
) -> dict[str, object]:
    """Raw and calibrated test metrics of one model (`raw_score`, `calibrated_score`)."""
    raw, calibrated = raw_score(draws, test), calibrated_score(draws, test, val_draws, val)
    return raw | calibrated | {"curves": raw["curves"] | calibrated["curves"]}


# --------------------------------------------------------------------------- MC dropout


def member_seed(seed: int, split: int, index: int) -> int:
    return seed * 1_000_000 + split * 1_000 + index


def by_size(sets: dict[int, Dataset]) -> list[list[int]]:
    """Split numbers grouped by their data set's row count: one stack per group (a stack's
    members see batches of the same size), usually one group for every split."""
    groups: dict[int, list[int]] = {}
    for split, data in sets.items():
        groups.setdefault(len(data), []).append(split)
    return list(groups.values())


def mc_dropout(
    folder: Path, loaded: dict[int, LoadedData], settings: Settings, log: Callable[[str], None]
) -> dict[int, dict]:
    """The grid-search protocol on every split of `loaded`; per-split results."""
    configs = [
        GridConfig(p, t)
        for p in read_list(folder, "dropout_rates.txt")
        for t in read_list(folder, "tau_values.txt")
    ]
    hidden = [int(read_number(folder, "n_hidden.txt", 50))]
    features = next(iter(loaded.values())).train.num_features
    base_epochs = int(read_number(folder, "n_epochs.txt", 40))
    refit_epochs = settings.refit_epochs or REFIT_EPOCHS_FACTOR * base_epochs
    grid_epochs = settings.grid_epochs or refit_epochs
    inner = {k: split_validation(data.train, settings.seed) for k, data in loaded.items()}
    results: dict[int, dict] = {}
    chosen: dict[int, GridConfig] = {}
    calibrated: dict[int, dict] = {}
    for splits in by_size({k: fit for k, (fit, _) in inner.items()}):
        members, sets = [], []
        for k in splits:
            stats = standardization(inner[k][0])
            for i, c in enumerate(configs):
                members.append(GridMember(c, stats, member_seed(settings.seed, k, i)))
                sets.append(inner[k][0])
        grid = DropoutGrid(features, hidden, members)
        fitted = fit_grid(grid, sets, grid_epochs, threads=settings.threads)
        log(
            f"  grid of {len(splits)} splits x {len(configs)} configurations x {grid_epochs} "
            f"epochs, stacked: {fitted.steps} steps, {fitted.seconds:.1f}s "
            f"({fitted.seconds / len(splits):.1f}s per split)"
        )
        for j, k in enumerate(splits):
            started = time.perf_counter()
            val_set = inner[k][1]
            y_val = torch.as_tensor(val_set.y)
            scores, draws = [], []
            for i in range(len(configs)):
                model = grid.member_model(j * len(configs) + i)
                d = sample_draws(model, val_set.x, settings.val_samples, settings.seed)
                scores.append(float(pointwise_log_likelihood("regression", d, y_val).mean()))
                draws.append(d)
            best = int(np.argmax(scores))
            chosen[k] = configs[best]
            # Calibration needs rows its model was not fit on; the refit has seen them all,
            # so the calibrated numbers are the chosen grid network's (fit on the other 80%).
            test = loaded[k].test
            model = grid.member_model(j * len(configs) + best)
            grid_draws = sample_draws(model, test.x, settings.test_samples, settings.seed)
            calibrated[k] = calibrated_score(grid_draws, test, draws[best], val_set)
            results[k] = {
                "dropout": configs[best].dropout,
                "tau": configs[best].tau,
                "validation_log_likelihood": scores[best],
                "grid": [
                    {"dropout": c.dropout, "tau": c.tau, "validation_log_likelihood": s}
                    for c, s in zip(configs, scores, strict=True)
                ],
                "seconds": {
                    "grid_fit_share": fitted.seconds / len(splits),
                    "grid_validation": time.perf_counter() - started,
                },
            }
            log(
                f"  split {k}: best dropout {configs[best].dropout:g} tau "
                f"{configs[best].tau:g} (validation LL {scores[best]:.3f})"
            )
    for splits in by_size({k: data.train for k, data in loaded.items()}):
        members = [
            GridMember(
                chosen[k],
                standardization(loaded[k].train),
                member_seed(settings.seed, k, 999),
            )
            for k in splits
        ]
        grid = DropoutGrid(features, hidden, members)
        sets = [loaded[k].train for k in splits]
        fitted = fit_grid(grid, sets, refit_epochs, threads=settings.threads)
        log(
            f"  refit of {len(splits)} splits x {refit_epochs} epochs, stacked: {fitted.steps} "
            f"steps, {fitted.seconds:.1f}s ({fitted.seconds / len(splits):.1f}s per split)"
        )
        for j, k in enumerate(splits):
            start = time.perf_counter()
            model = grid.member_model(j)
            test = loaded[k].test
            draws = sample_draws(model, test.x, settings.test_samples, settings.seed)
            raw = raw_score(draws, test)
            results[k] |= raw | calibrated[k]
            results[k]["curves"] = raw["curves"] | calibrated[k]["curves"]
            results[k]["seconds"] |= {
                "refit_share": fitted.seconds / len(splits),
                "test": time.perf_counter() - start,
            }
            log_split(log, k, results[k])
    return results


def log_split(log: Callable[[str], None], split: int, result: dict) -> None:
    raw = result["raw"]
    seconds = result["seconds"]
    total = sum(seconds.values())
    log(
        f"  split {split}: RMSE {raw['rmse']:.3f}  LL {raw['log_likelihood']:.3f}  95% coverage "
        f"{raw['coverage_95']:.3f} (variance {result['variance']['coverage_95']:.3f}, "
        f"isotonic {result['isotonic']['coverage_95']:.3f}, conformal "
        f"{result['conformal']['coverage_95']:.3f})  "
        + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items())
        + f", total {total:.1f}s"
    )


# ----------------------------------------------------------------------- trainer methods


# Hyper-parameters a method needs tuned per data set, chosen per split by validation
# log-likelihood. The others learn their noise and stop early on the validation rows. SG-MCMC
# starts each chain after `warmup_epochs` of Adam, and 100 epochs are 200 steps on yacht
# (split 0: test RMSE 7.16 after 100, 0.75 after 1,000).
METHOD_GRIDS: dict[str, dict[str, list]] = {
    "sgld": {"warmup_epochs": [100, 1000]},
    "sghmc": {"warmup_epochs": [100, 1000]},
}


def grid_points(method: str) -> list[dict]:
    grid = METHOD_GRIDS.get(method, {})
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def trainer_method(
    method: str,
    folder: Path,
    loaded: dict[int, LoadedData],
    settings: Settings,
    log: Callable[[str], None],
) -> dict[int, dict]:
    """`credence-train`'s own training of `method` (its defaults, and METHOD_GRIDS' values
    chosen by validation log-likelihood) on every split."""
    hidden = [int(read_number(folder, "n_hidden.txt", 50))]
    kwargs: dict = {"method": method, "hidden": hidden}
    if method == "credence_defaults":
        kwargs = {}
    elif method == "ensemble":
        kwargs["noise"] = "heteroscedastic"
    results: dict[int, dict] = {}
    for split, data in loaded.items():
        start = time.perf_counter()
        options = FitOptions(seed=settings.seed, progress=False, threads=settings.threads)
        _, val_set = split_validation(data.train, settings.seed)  # the rows train_model holds out
        y_val = torch.as_tensor(val_set.y)
        candidates = []
        for point in grid_points(method):
            extra = {"method_options": point} if point else {}
            trained = train_model(
                data.train, None, options=options, eval_samples=1, **kwargs, **extra
            )
            samples = min(settings.test_samples, sample_limits(trained.model)["max"])
            val_draws = sample_draws(
                trained.model, val_set.x, min(samples, settings.val_samples), settings.seed
            )
            val_ll = float(pointwise_log_likelihood("regression", val_draws, y_val).mean())
            candidates.append((val_ll, point, trained, val_draws, samples))
        val_ll, point, trained, val_draws, samples = max(candidates, key=lambda c: c[0])
        fitted = time.perf_counter()
        draws = sample_draws(trained.model, data.test.x, samples, settings.seed)
        results[split] = score(draws, data.test, val_draws, val_set)
        results[split]["epochs"] = trained.fit.epochs_run
        if point:
            results[split]["chosen"] = point
            results[split]["grid"] = [
                {**p, "validation_log_likelihood": ll} for ll, p, *_ in candidates
            ]
        results[split]["seconds"] = {"fit": fitted - start, "test": time.perf_counter() - fitted}
        log_split(log, split, results[split])
    return results


# ----------------------------------------------------------------------------- summary


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.mean(values), se


def aggregate(per_split: dict[int, dict]) -> dict:
    """Mean and standard error over splits of every reported number, and the mean curves."""
    runs = list(per_split.values())
    out: dict = {"splits": len(runs)}
    keys = [("raw", k) for k in ("rmse", "log_likelihood", "coverage_95", "interval_width_95")]
    keys += [(m, k) for m in CALIBRATIONS for k in ("coverage_95", "interval_width_95")]
    keys += [("variance", "log_likelihood")]
    for group, key in keys:
        out[f"{group}.{key}"] = mean_se([r[group][key] for r in runs])
    out["curves"] = {
        name: np.mean([r["curves"][name] for r in runs], axis=0).tolist()
        for name in runs[0]["curves"]
    }
    seconds = [sum(r["seconds"].values()) for r in runs]
    out["seconds_per_split"] = statistics.mean(seconds)
    if "dropout" in runs[0]:
        pairs = [f"{r['dropout']:g}/{r['tau']:g}" for r in runs]
    else:
        pairs = [
            " ".join(f"{k}={v:g}" for k, v in r["chosen"].items()) for r in runs if "chosen" in r
        ]
    if pairs:
        out["chosen"] = {p: pairs.count(p) for p in sorted(set(pairs))}
    return out


def fmt(pair: Sequence[float] | None, digits: int = 2) -> str:
    return "-" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def targets(results: dict, published: dict) -> list[str]:
    """Lines saying which of the benchmark's targets hold on this run."""
    lines = []
    for name, methods in results.items():
        pub = published.get(name, {}).get("mc_dropout_grid_2018")
        ours = methods.get("mc_dropout")
        if pub and ours:
            rmse, ll = ours["raw.rmse"][0], ours["raw.log_likelihood"][0]
            rmse_ok = rmse <= pub["rmse"][0] + pub["rmse"][1]
            ll_ok = ll >= pub["ll"][0] - pub["ll"][1]
            lines.append(
                f"- {name}: MC dropout RMSE {rmse:.3f} vs {pub['rmse'][0]} ± {pub['rmse'][1]} "
                f"({'holds' if rmse_ok else 'misses'}), LL {ll:.3f} vs {pub['ll'][0]} ± "
                f"{pub['ll'][1]} ({'holds' if ll_ok else 'misses'})"
            )
    wins = []
    for name, methods in results.items():
        pub = published.get(name, {}).get("mc_dropout_grid_2018")
        if not pub or not methods:
            continue
        best = max(methods, key=lambda m: methods[m]["raw.log_likelihood"][0])
        ll = methods[best]["raw.log_likelihood"][0]
        wins.append(ll > pub["ll"][0])
        lines.append(
            f"- {name}: best Credence LL {ll:.3f} ({best}) "
            f"{'beats' if ll > pub['ll'][0] else 'does not beat'} published MC dropout "
            f"{pub['ll'][0]}"
        )
    if wins:
        lines.append(f"- best method beats published MC-dropout LL on {sum(wins)} of {len(wins)}")
    for name, methods in results.items():
        for method, agg in methods.items():
            covs = {c: agg[f"{c}.coverage_95"][0] for c in CALIBRATIONS}
            held = [c for c, v in covs.items() if 0.93 <= v <= 0.97]
            lines.append(
                f"- {name} / {method}: calibrated 95% coverage "
                + ", ".join(f"{c} {v:.3f}" for c, v in covs.items())
                + f"; inside [0.93, 0.97]: {', '.join(held) or 'none'}"
            )
    return lines


def markdown(record: dict) -> str:
    results, published = record["results"], record["published"]
    rows = [
        "| data | method | splits | RMSE | LL | LL (variance-calibrated) | 95% coverage raw | "
        "variance | isotonic | conformal | 95% width raw | s / split |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, methods in results.items():
        for method, a in methods.items():
            rows.append(
                f"| {name} | {method} | {a['splits']} | {fmt(a['raw.rmse'])} | "
                f"{fmt(a['raw.log_likelihood'])} | {fmt(a['variance.log_likelihood'])} | "
                f"{fmt(a['raw.coverage_95'], 3)} | {fmt(a['variance.coverage_95'], 3)} | "
                f"{fmt(a['isotonic.coverage_95'], 3)} | {fmt(a['conformal.coverage_95'], 3)} | "
                f"{fmt(a['raw.interval_width_95'])} | {a['seconds_per_split']:.1f} |"
            )
    pub_rows = [
        "| data | " + " | ".join(PUBLISHED.values()) + " |",
        "|---|" + "---|" * len(PUBLISHED),
    ]
    for name in results:
        ref = published.get(name, {})
        cells = [
            f"{ref[k]['rmse'][0]} ± {ref[k]['rmse'][1]} / {ref[k]['ll'][0]} ± {ref[k]['ll'][1]}"
            if k in ref
            else "-"
            for k in PUBLISHED
        ]
        pub_rows.append(f"| {name} | " + " | ".join(cells) + " |")
    chosen = [
        f"- {name} / {method}: " + ", ".join(f"{p} x{n}" for p, n in a["chosen"].items())
        for name, m in results.items()
        for method, a in m.items()
        if "chosen" in a
    ]
    return "\n".join(
        [
            "# UCI regression benchmark",
            "",
            *[f"Command: `{c}`  " for c in record["commands"]],
            f"Machine: {machine_line(record['machine'], record['threads'])}; wall time "
            f"{record['seconds'] / 60:.1f} min"
            + (" (all commands)." if len(record["commands"]) > 1 else "."),
            "",
            "Test metrics, mean ± standard error over splits, original target units. LL is the "
            "log-likelihood of the Monte-Carlo mixture (higher is better); coverage is the share "
            "of test points inside the central 95% interval, raw and with each calibration "
            "fitted on the inner validation rows (for mc_dropout, that of the chosen grid "
            "network, fit on the other 80%: the refit has seen every training row); width is "
            "the raw interval's mean width. "
            f"Draws: {record['settings']['test_samples']} per test point (ensembles: one per "
            "member).",
            "",
            *rows,
            "",
            "Published (RMSE / LL, mean ± standard error; deep ensembles' ± is a standard "
            "deviation), from `published.json`:",
            "",
            *pub_rows,
            "",
            "Targets:",
            "",
            *targets(results, published),
            "",
            "Hyper-parameters chosen by validation log-likelihood (MC dropout: dropout rate / "
            "tau), and how many splits chose each:",
            "",
            *chosen,
            "",
            "Protocol: see the docstring of `benchmarks/uci.py`. The calibration plot is "
            "`uci.png` (observed vs expected coverage of central intervals, mean over splits).",
            "",
        ]
    )


def plot(record: dict, path: Path) -> bool:
    """Observed vs expected coverage per data set; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = record["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4), squeeze=False)
    styles = {"raw": "-", "variance": "--", "isotonic": ":", "conformal": "-."}
    for ax, (name, methods) in zip(axes[0], results.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="0.7", lw=1)
        for color, (method, agg) in enumerate(methods.items()):
            for curve, values in agg["curves"].items():
                ax.plot(
                    LEVELS,
                    values,
                    styles[curve],
                    color=f"C{color}",
                    label=f"{method} {curve}",
                    lw=1.2,
                )
        ax.set_title(name)
        ax.set_xlabel("expected coverage")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("observed coverage (test)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------- main


def write(record: dict, out: Path, final: bool) -> None:
    """Write OUT.md / .json / .png; called after every data set and method, so an
    interrupted run keeps what it finished."""
    text = markdown(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    plotted = plot(record, out.with_suffix(".png"))
    if final:
        print()
        print(text)
        if not plotted:
            print("matplotlib is not installed: no calibration plot (pip install -e '.[bench]')")


def task_cost(task: tuple[Path, str, list[int]]) -> tuple[bool, int]:
    """Rough order of a task's run time: the grid protocol first, then by data size."""
    folder, method, splits = task
    data = folder / "data.txt"
    return method == "mc_dropout", len(splits) * (data.stat().st_size if data.is_file() else 0)


def prefixed(prefix: str, message: str) -> None:
    print(f"{prefix}{message}", flush=True)


def run_task(
    folder: Path, method: str, splits: list[int], settings: Settings
) -> tuple[str, str, dict[int, dict], float]:
    """One method on one data set, in a worker process: (name, method, per split, seconds)."""
    torch.set_num_threads(settings.threads)
    began = time.perf_counter()
    log = partial(prefixed, f"[{folder.name} / {method}] ")
    log(f"{len(splits)} splits")
    loaded = {k: load_data(str(folder), split=k) for k in splits}
    run = mc_dropout if method == "mc_dropout" else partial(trainer_method, method)
    per = run(folder, loaded, settings, log)
    return folder.name, method, per, time.perf_counter() - began


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "datasets", nargs="*", help=f"names under --root (default: {' '.join(DATASETS)})"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        type=Path,
        default=[],
        metavar="DIR",
        help="folders in the UCI layout, anywhere",
    )
    parser.add_argument("--root", type=Path, default=UCI)
    parser.add_argument(
        "--methods",
        default="mc_dropout",
        help="comma-separated: mc_dropout (the grid protocol), any credence-train "
        f"method ({', '.join(m for m in METHODS if m != 'mc_dropout')}), "
        "credence_defaults",
    )
    parser.add_argument("--splits", type=parse_splits, help="e.g. 0-19 (default: all)")
    parser.add_argument("--quick", action="store_true", help="splits 0-2 only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-samples", type=int, default=10_000)
    parser.add_argument("--val-samples", type=int, default=1_000)
    parser.add_argument(
        "--grid-epochs", type=int, help="default: the refit's (the README's letter: 400)"
    )
    parser.add_argument("--refit-epochs", type=int, help="default: 100 x n_epochs.txt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (default: 1)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="data set x method runs in parallel processes (default: one per core)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add this run's methods to the results already in OUT.json (its other methods "
        "and data sets stay, and both commands are listed) instead of replacing them",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT,
        help="writes OUT.md, OUT.json, OUT.png (default: docs/results/uci)",
    )
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS) - set(EXTRA_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    folders = [args.root / name for name in args.datasets] + list(args.data)
    if not folders:
        folders = [args.root / name for name in DATASETS]
    published_path = args.root / "published.json"
    published = json.loads(published_path.read_text()) if published_path.is_file() else {}
    settings = Settings(
        args.seed,
        args.test_samples,
        args.val_samples,
        args.grid_epochs,
        args.refit_epochs,
        args.threads,
    )

    log = partial(print, flush=True)
    command = " ".join(
        [".venv/bin/python benchmarks/uci.py", *map(shlex.quote, argv or sys.argv[1:])]
    )
    results: dict[str, dict] = {}
    per_split: dict[str, dict] = {}
    record = {
        "commands": [command],
        "machine": machine_record(),
        "threads": args.threads,
        "settings": vars(settings),
        "seconds": 0.0,
        "levels": LEVELS,
        "published": published,
        "results": results,
        "per_split": per_split,
    }
    start = time.perf_counter()
    previous = args.out.with_suffix(".json")
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        record["commands"] = [*old.get("commands", [old.get("command")]), command]
        start -= old["seconds"]  # the wall time reported covers every run
        results.update(old["results"])
        per_split.update(old["per_split"])
    tasks = []
    for folder in folders:
        splits = args.splits or list(range(uci_num_splits(folder)))
        tasks += [(folder, method, splits[:3] if args.quick else splits) for method in methods]
    tasks.sort(key=task_cost, reverse=True)  # longest first: the last to finish starts first
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        runs = [pool.submit(run_task, *task, settings) for task in tasks]
        for future in as_completed(runs):
            name, method, per, seconds = future.result()
            a = results.setdefault(name, {})[method] = aggregate(per) | {"seconds": seconds}
            per_split.setdefault(name, {})[method] = {str(k): v for k, v in per.items()}
            log(
                f"{name} / {method}: RMSE {fmt(a['raw.rmse'], 3)}  LL "
                f"{fmt(a['raw.log_likelihood'], 3)}  95% coverage {fmt(a['raw.coverage_95'], 3)}"
                f"  in {a['seconds']:.0f}s"
            )
            record["seconds"] = time.perf_counter() - start
            write(record, args.out, final=False)
    record["seconds"] = time.perf_counter() - start
    write(record, args.out, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
