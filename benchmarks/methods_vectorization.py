"""How much the vectorized sampler saves, per posterior method.

For each method, times `model.sample(x, n, seeds)` with n = 1 and n = 100 draws, against a
Python loop of 100 single-draw calls (what a sampler without a sample axis would do), for one
request (all rows share a seed) and for a server batch of 8 requests with different seeds.
Models are untrained (timing does not depend on the weights) MLPs of the CLI's shape.

    .venv/bin/python benchmarks/methods_vectorization.py [--rows 64] [--repeats 5] [--threads 1]

Prints a markdown table and writes it to docs/results/vectorization.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
from machine import cpu_model, median_ms, write_report

from training.build import build_model
from training.model import PosteriorModel
from training.posteriors.laplace_fit import fit_last_layer

DRAWS = 100
IN_FEATURES = 8
HIDDEN = [50, 50]
LIKELIHOOD = {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"}
STATS = {
    "x_mean": [0.0] * IN_FEATURES,
    "x_std": [1.0] * IN_FEATURES,
    "y_mean": [0.0],
    "y_std": [1.0],
}
ARCH = {"in_features": IN_FEATURES, "hidden": HIDDEN}
METHODS: dict[str, dict] = {
    "mc_dropout": {**ARCH, "dropout": 0.1},
    "variational": ARCH,
    "ensemble": {**ARCH, "members": DRAWS},
    "sgld": {**ARCH, "members": DRAWS},
    "sghmc": {**ARCH, "members": DRAWS},
    "laplace": {**ARCH, "structure": "kron"},
}
OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "vectorization.md"


def build(method: str) -> PosteriorModel:
    torch.manual_seed(0)
    config = {"method": method, "arch": METHODS[method], "likelihood": LIKELIHOOD}
    model = build_model(config, STATS)
    if method == "laplace":  # a posterior to draw from
        fit_last_layer(model, torch.randn(256, IN_FEATURES), torch.randn(256, 1))
    return model.eval()


def measure(method: str, rows: int, repeats: int) -> dict[str, float]:
    model = build(method)
    x = torch.randn(rows, IN_FEATURES)
    one = torch.full((rows,), 7, dtype=torch.int64)
    eight = torch.arange(rows, dtype=torch.int64) % 8

    def loop() -> None:
        for _ in range(DRAWS):
            model.sample(x, 1, one)

    single = median_ms(lambda: model.sample(x, 1, one), repeats)
    vectorized = median_ms(lambda: model.sample(x, DRAWS, one), repeats)
    looped = median_ms(loop, max(1, repeats // 2))
    mixed = median_ms(lambda: model.sample(x, DRAWS, eight), repeats)
    return {"n1": single, "n100": vectorized, "loop": looped, "mixed": mixed}


def machine() -> str:
    return (
        f"`uname -m` {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}"
    )


def table(results: dict[str, dict[str, float]], rows: int) -> str:
    lines = [
        f"| method | n=1 | n={DRAWS} | {DRAWS} calls of n=1 | loop / vectorized "
        f"| n={DRAWS}, 8 seeds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, r in results.items():
        lines.append(
            f"| {method} | {r['n1']:.2f} ms | {r['n100']:.2f} ms | {r['loop']:.1f} ms "
            f"| {r['loop'] / r['n100']:.0f}x | {r['mixed']:.2f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="rows per call (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (default: 5)")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="markdown file to write")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default: 1; on a shared VM more threads make OpenMP "
        "barriers wait on stolen cores and the timings erratic)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {method: measure(method, args.rows, args.repeats) for method in METHODS}
    body = table(results, args.rows)
    command = "python benchmarks/methods_vectorization.py " + " ".join(sys.argv[1:])
    heading_and_body = (
        "# Vectorized sampling per posterior method\n\n"
        f"Median wall time of `model.sample(x, n, seeds)` for {args.rows} rows of "
        f"{IN_FEATURES} features through an MLP with hidden layers {HIDDEN} (Gaussian head): "
        f"one call with n=1, one with n={DRAWS}, a Python loop of {DRAWS} calls with n=1 "
        f"(what a sampler without a sample axis costs), and n={DRAWS} for a server batch whose "
        "rows come from 8 requests with different seeds (weights drawn per seed). Ensembles "
        f"and SG-MCMC sample sets hold {DRAWS} members here so that n={DRAWS} is allowed.\n\n"
        f"{body}\n\n"
    )
    write_report(
        args.out,
        heading_and_body,
        table=body,
        command=command,
        machine=machine(),
        advice="the ratios are what matter.",
    )


if __name__ == "__main__":
    main()
