"""Stacked members of a CNN: one vmap over the members, or a loop over them?

Times a 5-member CNN ensemble (the Fashion-MNIST shape: 1x28x28 inputs, conv blocks of 16
and 32 channels, 64 dense units) run both ways by `StackedNet.run`: a training step
(forward + backward of the summed member NLLs) on a minibatch of 128, and inference on 1 to
128 rows. The crossover sets `StackedNet.VMAP_ROWS`.

    .venv/bin/python benchmarks/stacked_bodies.py [--repeats 20] [--threads 2]

Prints a markdown table and writes it to docs/results/stacked-bodies.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from machine import machine_line, machine_record, median_ms, write_report

from training.architectures import arch_config
from training.build import MODEL_TYPES

ROWS = (1, 4, 16, 32, 64, 128)
MEMBERS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/results/stacked-bodies.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = arch_config("cnn", [1, 28, 28], [64], conv=[16, 32])
    model = MODEL_TYPES["ensemble"](
        arch | {"members": MEMBERS},
        {"kind": "categorical", "num_classes": 10},
        {"x_mean": [[[0.0]]], "x_std": [[[1.0]]]},
    )
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step(vmap: bool) -> None:
        model.member_nll(model.run(x, vmap=vmap), y).sum().backward()

    lines = ["| work | vmap (ms) | loop (ms) | loop / vmap |", "|---|---:|---:|---:|"]
    train = [median_ms(lambda v=v: step(v), max(3, args.repeats // 4)) for v in (True, False)]
    lines.append(f"| training step, 128 rows | {train[0]:.1f} | {train[1]:.1f} | "
                 f"{train[1] / train[0]:.2f} |")  # fmt: skip
    with torch.inference_mode():
        for rows in ROWS:
            h = torch.randn(rows, 1, 28, 28)
            t = [
                median_ms(lambda v=v, h=h: model.run(h, vmap=v), args.repeats)
                for v in (True, False)
            ]
            lines.append(f"| inference, {rows} rows | {t[0]:.2f} | {t[1]:.2f} | "
                         f"{t[1] / t[0]:.2f} |")  # fmt: skip
    body = "\n".join(lines)
    text = (
        "# Stacked CNN members: vmap or loop\n\n"
        f"A {MEMBERS}-member CNN ensemble ({arch['conv']} channels, {arch['hidden']} dense "
        "units, 1x28x28 inputs), median wall time per call of `StackedNet.run` with one "
        "vmap of the body over the stacked parameters (a grouped convolution) and with a "
        "loop over members. The server takes the vmap below `StackedNet.VMAP_ROWS` rows.\n\n"
        f"{body}\n\n"
    )
    write_report(
        args.out,
        text,
        table=body,
        command="python benchmarks/stacked_bodies.py " + " ".join(sys.argv[1:]),
        machine=machine_line(machine_record(), args.threads),
        advice="compare the two columns of one row.",
    )


if __name__ == "__main__":
    main()
