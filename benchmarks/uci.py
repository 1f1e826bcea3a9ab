"""UCI regression benchmark: credence-train's defaults against the published MC-dropout results.

    .venv/bin/python benchmarks/uci.py bostonHousing concrete yacht --splits 0-4

Each split trains exactly as `credence-train --data DIR --split K` does (every default,
seed 0: 20% of the training rows held out for early stopping and the noise), then reports
test RMSE and test log-likelihood in original units, mean +- standard error over the splits,
next to the numbers in published.json. Not run by CI: about 5-15 s per split on one core.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from training.data import load_data
from training.fit import FitOptions
from training.train import train_model

UCI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uci"


def parse_splits(text: str) -> list[int]:
    """Split numbers from "0-4" or "0,3,7"."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(part) for part in text.split(",")]


def mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {se:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--splits", type=parse_splits, default=parse_splits("0-4"))
    parser.add_argument("--root", type=Path, default=UCI)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    published = json.loads((args.root / "published.json").read_text())
    rows = []
    for name in args.datasets:
        rmse, ll, coverage = [], [], []
        for split in args.splits:
            loaded = load_data(str(args.root / name), split=split)
            start = time.perf_counter()
            result = train_model(
                loaded.train, loaded.test, options=FitOptions(seed=args.seed, progress=False)
            )
            test = result.metrics["test"]
            rmse.append(test["rmse"])
            ll.append(test["log_likelihood"])
            coverage.append(test["coverage_95"])
            print(
                f"{name} split {split}: RMSE {test['rmse']:.3f}  LL {test['log_likelihood']:.3f}"
                f"  95% coverage {test['coverage_95']:.2f}  epochs {result.fit.epochs_run}"
                f" (best {result.fit.best_epoch})  {time.perf_counter() - start:.1f}s",
                flush=True,
            )
        ref = published.get(name, {}).get("mc_dropout_2016", {})
        rows.append((name, len(args.splits), mean_se(rmse), mean_se(ll), mean_se(coverage), ref))
    print()
    print("| data | splits | RMSE | LL | 95% coverage | MC dropout 2016 RMSE / LL |")
    print("|---|---|---|---|---|---|")
    for name, n, r, lk, c, ref in rows:
        paper = f"{ref['rmse'][0]} / {ref['ll'][0]}" if ref else "-"
        print(f"| {name} | {n} | {r} | {lk} | {c} | {paper} |")


if __name__ == "__main__":
    main()
