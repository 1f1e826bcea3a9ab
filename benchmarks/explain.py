"""What :explain costs: integrated gradients per posterior draw, per method and body.

Times `training.attributions.attribute` plus its summary (what a worker does for one
:explain request) on random-weight models of the serving shapes, and, beside it, the same
attributions through the generic fallback `PosteriorModel.raw_draws_at` (every draw run on
every draw's copy of the inputs, keeping the diagonal), which a method without a per-draw
path of its own would take: the per-draw paths do 1/n of its work.

    .venv/bin/python benchmarks/explain.py [--repeats 5] [--threads 1]

Prints a markdown table and writes it to docs/results/explain.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch
from machine import machine_line, machine_record, median_ms, write_report

from training.architectures import arch_config
from training.attributions import Explain, attribute, summarize_attributions
from training.build import build_model
from training.model import PosteriorModel

REGRESSION = {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"}
CLASSES = {"kind": "categorical", "num_classes": 10}
TABULAR = {"x_mean": [0.0] * 10, "x_std": [1.0] * 10, "y_mean": [0.0], "y_std": [1.0]}
IMAGES = {"x_mean": [[[0.0]]], "x_std": [[[1.0]]]}
# (label, method, arch config, likelihood, stats, input shape, instances, draws, steps)
CASES = [
    ("MC dropout MLP 10-50-50-1", "mc_dropout", arch_config("mlp", [10], [50, 50]) | {
        "dropout": 0.1}, REGRESSION, TABULAR, [10], 8, 100, 32),
    ("variational MLP 10-50-50-1", "variational", arch_config("mlp", [10], [50, 50]),
     REGRESSION, TABULAR, [10], 8, 100, 32),
    ("ensemble (5) MLP 10-50-50-1", "ensemble", arch_config("mlp", [10], [50, 50]) | {
        "members": 5}, REGRESSION, TABULAR, [10], 8, 5, 32),
    ("last-layer Laplace MLP 10-50-50-1", "laplace", arch_config("mlp", [10], [50, 50]),
     REGRESSION, TABULAR, [10], 8, 100, 32),
    ("MC dropout CNN [8] 1x8x8, 10 classes", "mc_dropout", arch_config(
        "cnn", [1, 8, 8], [32], conv=[8]) | {"dropout": 0.1}, CLASSES, IMAGES, [1, 8, 8], 1,
     32, 16),
    ("MC dropout CNN [16, 32] 1x28x28, 10 classes", "mc_dropout", arch_config(
        "cnn", [1, 28, 28], [64], conv=[16, 32]) | {"dropout": 0.1}, CLASSES, IMAGES,
     [1, 28, 28], 1, 16, 16),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/results/explain.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lines = [
        "| model | instances | draws | steps | outputs | per-draw path (ms) | fallback (ms) "
        "| fallback / path |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, method, arch, likelihood, stats, shape, rows, n, steps in CASES:
        torch.manual_seed(0)
        model = build_model({"method": method, "arch": arch, "likelihood": likelihood}, stats)
        if method == "laplace":  # a fitted posterior's covariance, not a new one's zeros
            with torch.no_grad():
                model.scale.copy_(0.1 * torch.rand_like(model.scale))
        outputs = tuple(range(10 if likelihood is CLASSES else 1))
        quantity = "probability" if likelihood is CLASSES else "mean"
        explain = Explain("integrated_gradients", steps, quantity, outputs)
        x, seeds = torch.randn(rows, *shape), torch.full((rows,), 7)

        def run(model=model, x=x, seeds=seeds, n=n, explain=explain) -> None:
            summarize_attributions(attribute(model, x, n, seeds, explain), (0.95,), explain)

        path = median_ms(run, args.repeats)
        fallback = None
        if type(model).raw_draws is not PosteriorModel.raw_draws:  # it has a raw_draws
            model.raw_draws_at = types.MethodType(PosteriorModel.raw_draws_at, model)
            fallback = median_ms(run, max(1, args.repeats // 2))
        shown = f"{fallback:.0f} | {fallback / path:.1f}" if fallback else "- | -"
        lines.append(
            f"| {label} | {rows} | {n} | {steps} | {len(outputs)} | {path:.0f} | {shown} |"
        )
    table = "\n".join(lines)
    text = (
        "# :explain: integrated gradients per posterior draw\n\n"
        "Median wall time of one :explain request's computation (`attribute` and its "
        "summary across draws, as a batch worker runs it) on random-weight models: every "
        "draw and path point in passes over [draws x points] rows with each draw on a copy "
        "of the inputs of its own, then one backward pass per output. The fallback column "
        "is the generic `PosteriorModel.raw_draws_at` (every draw on every copy, the "
        "diagonal kept) that a method without a per-draw path would take; the last-layer "
        "Laplace MLP has no `raw_draws` to fall back on.\n\n"
        f"{table}\n\n"
    )
    write_report(
        args.out,
        text,
        table=table,
        command="python " + " ".join(sys.argv),
        machine=machine_line(machine_record(), args.threads),
        advice="compare the columns of one row.",
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
