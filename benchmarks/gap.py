"""In-between uncertainty per method: the gap/data epistemic-std ratio on toy:sine-gap.

    .venv/bin/python benchmarks/gap.py                       # every method, seeds 0-2
    .venv/bin/python benchmarks/gap.py --runs variational 'variational --lr 0.01' --seeds 0-4

Each run is `credence-train --data toy:sine-gap --method M --seed S` with every other option at
its default, or with the flags a run names after its method (the checkpoint goes to a
temporary folder and is read back, so the model measured is the one the server would load).
By default every method runs, and `variational --lr 0.01` too: the step size at which its
ELBO gets near its optimum within the step budget (the README says why it is not the
default). The ratio is training.gap's: the mean epistemic std on 37 inputs inside the gap
(-0.9 to 0.9) over its mean on the 2000 held-out test points, from 200 draws (a stored set of
M draws: each member once). The tests use the same definition. Near 1, the posterior is as
sure in the gap as on the data, which Foong et al. (2019) found of mean-field variational
inference; well above 1, it knows the gap is unobserved. Writes docs/results/gap.md and
.json. Not run by CI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from machine import machine_line, machine_record
from uci import parse_splits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import cli  # noqa: E402
from training.checkpoint import latest_checkpoint  # noqa: E402
from training.data import load_toy  # noqa: E402
from training.gap import GAP_DRAWS, GAP_INPUTS, gap_ratio  # noqa: E402
from training.methods import METHODS  # noqa: E402

DATA = "toy:sine-gap"
OUT = ROOT / "docs" / "results" / "gap"
# Beyond each method with its defaults: variational at the step size at which its ELBO
# gets near its optimum in the step budget, to show what the default's shortfall costs.
EXTRA_RUNS = ("variational --lr 0.01",)


def train_args(run: str, seed: int, out: str, threads: int) -> list[str]:
    """credence-train's arguments for `run` ("METHOD [FLAGS]") under `seed`: the defaults
    but for the run's flags, the seed and the threads."""
    method, *flags = shlex.split(run)
    common = ["--data", DATA, "--method", method, "--seed", str(seed), "--threads", str(threads)]
    return [*common, "--out", out, "--name", "gap", "--quiet", *flags]


def measure(run: str, seed: int, threads: int) -> dict:
    """Train one checkpoint with credence-train and measure its ratio."""
    test_x = load_toy(DATA.removeprefix("toy:")).test.x
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's one closing line
            cli.main(train_args(run, seed, out, threads))
        seconds = time.perf_counter() - start
        checkpoint = latest_checkpoint(out, "gap")
        measured = gap_ratio(checkpoint.build(), test_x)
    test = checkpoint.manifest["metrics"]["test"]
    training = checkpoint.manifest["training"]
    return {
        "seed": seed,
        "ratio": measured.ratio,
        "gap_epistemic_std": measured.gap,
        "data_epistemic_std": measured.data,
        "draws": measured.draws,
        "test_rmse": test["rmse"],
        "test_log_likelihood": test["log_likelihood"],
        "test_coverage_95": test["coverage_95"],
        "train_seconds": seconds,
        "epochs_run": training["epochs_run"],
        "best_epoch": training["best_epoch"],
        # the training loss's terms over the last epoch (variational: the ELBO, nats per
        # example), which tell an optimizer that stopped short from a fit near the optimum
        "last_epoch_terms": {
            name: values[-1] for name, values in training["method_metrics"]["epochs"].items()
        },
    }


def summary(runs: list[dict]) -> dict:
    """Means over seeds of the ratio, the test metrics, the ELBO (if any) and the run time."""
    keys = ("ratio", "test_rmse", "test_log_likelihood", "test_coverage_95", "train_seconds")
    out = {key: statistics.mean(r[key] for r in runs) for key in keys}
    if all("elbo" in r["last_epoch_terms"] for r in runs):
        out["last_epoch_elbo"] = statistics.mean(r["last_epoch_terms"]["elbo"] for r in runs)
    return out


def table(record: dict) -> str:
    seeds = record["seeds"]
    lines = [
        "| run | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean ratio | test RMSE | test LL | last-epoch ELBO | s / run |",
        "|---|" + "---:|" * (len(seeds) + 5),
    ]
    for run, result in record["results"].items():
        ratios = " | ".join(f"{r['ratio']:.2f}" for r in result["runs"])
        mean = result["mean"]
        elbo = f"{mean['last_epoch_elbo']:.2f}" if "last_epoch_elbo" in mean else "-"
        lines.append(
            f"| `{run}` | {ratios} | **{mean['ratio']:.2f}** | {mean['test_rmse']:.3f} | "
            f"{mean['test_log_likelihood']:.2f} | {elbo} | {mean['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def markdown(record: dict) -> str:
    return "\n".join(
        [
            "# In-between uncertainty on toy:sine-gap",
            "",
            f"Command: `{record['command']}`  ",
            f"Machine: {machine_line(record['machine'], record['threads'])}; wall time "
            f"{record['seconds'] / 60:.1f} min.",
            "",
            "Gap/data ratio: the mean epistemic std (original units) on "
            f"{len(GAP_INPUTS)} inputs evenly spaced from {GAP_INPUTS[0, 0]:g} to "
            f"{GAP_INPUTS[-1, 0]:g} (no training inputs lie in (-1, 1)) over its mean on the "
            f"2000 held-out test points, from {GAP_DRAWS} posterior draws under seed 0 (a "
            "stored set of M draws: each once). Each run is `credence-train --data "
            "toy:sine-gap --method M --seed S` with every other option at its default, or "
            "with the flags the run names. Near 1: the posterior is as sure in the gap as on "
            "the data. The other columns are means over seeds: the test RMSE and "
            "log-likelihood (raw, before calibration) say whether the fit itself is good, and "
            "the last epoch's ELBO (nats per example, training rows) whether a variational fit "
            "got near its objective's optimum.",
            "",
            table(record),
            "",
            "Definition: `training/gap.py` (shared with the tests); protocol: the docstring of "
            "`benchmarks/gap.py`.",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=[*METHODS, *EXTRA_RUNS],
        metavar="RUN",
        help="credence-train methods, each optionally with flags, e.g. 'variational --lr 0.01' "
        f"(default: every method, and {', '.join(EXTRA_RUNS)})",
    )
    parser.add_argument("--seeds", type=parse_splits, default=[0, 1, 2], help="e.g. 0-2, 0,5")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT,
        help="writes OUT.md and OUT.json (default: docs/results/gap)",
    )
    args = parser.parse_args(argv)
    unknown = {shlex.split(run)[0] for run in args.runs} - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    command = " ".join(
        [".venv/bin/python benchmarks/gap.py", *map(shlex.quote, argv or sys.argv[1:])]
    )
    results: dict[str, dict] = {}
    record = {
        "command": command,
        "machine": machine_record(),
        "threads": args.threads,
        "data": DATA,
        "seeds": args.seeds,
        "draws": GAP_DRAWS,
        "seconds": 0.0,
        "results": results,
    }
    start = time.perf_counter()
    for run in args.runs:
        runs = []
        for seed in args.seeds:
            runs.append(measure(run, seed, args.threads))
            print(
                f"{run} seed {seed}: ratio {runs[-1]['ratio']:.2f} (test RMSE "
                f"{runs[-1]['test_rmse']:.3f}) in {runs[-1]['train_seconds']:.0f}s",
                flush=True,
            )
        results[run] = {"runs": runs, "mean": summary(runs)}
    record["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print()
    print(table(record))
    print(f"\nwrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
