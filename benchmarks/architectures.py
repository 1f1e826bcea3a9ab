"""Every (method, architecture) pair the tests serve, with its held-out score.

The fits are tests/test_architectures.py's own (its data, settings and seeds): an MLP on a
2-d regression, a CNN on the 8x8 digits, LSTM and GRU bodies on sums of noisy sequences.
Classification cells are test accuracy; regression cells are test RMSE over the targets'
standard deviation (1 is predicting the mean). Each cell also gives the seconds its
`train_model` call took.

    .venv/bin/python benchmarks/architectures.py

Prints a markdown table and writes it to docs/results/architectures.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from machine import machine_line, machine_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_architectures import METHOD_OPTIONS, PAIRS, data, fit

DATA = {
    "mlp": "2-d regression, 300 rows",
    "cnn": "digits 8x8, 600 images",
    "lstm": "sequences 8x2, 300",
    "gru": "sequences 8x2, 300",
}


def main() -> None:
    torch.set_num_threads(1)
    cells: dict[tuple[str, str], str] = {}
    for method, arch in PAIRS:
        start = time.perf_counter()
        result = fit(method, arch)
        seconds = time.perf_counter() - start
        test = data(arch)[1]
        metrics = result.metrics["test"]
        if test.task == "classification":
            score = f"accuracy {metrics['accuracy']:.3f}"
        else:
            score = f"RMSE/sd {metrics['rmse'] / float(test.y.std()):.3f}"
        cells[method, arch] = f"{score} ({seconds:.1f} s)"
        print(f"{method:11s} {arch:5s} {cells[method, arch]}", flush=True)
    archs = list(dict.fromkeys(arch for _, arch in PAIRS))
    lines = [
        "| architecture (data) | " + " | ".join(f"`{m}`" for m in METHOD_OPTIONS) + " |",
        "|---|" + "---|" * len(METHOD_OPTIONS),
    ]
    for arch in archs:
        row = [cells[m, arch] for m in METHOD_OPTIONS]
        lines.append(f"| `{arch}` ({DATA[arch]}) | " + " | ".join(row) + " |")
    body = "\n".join(lines)
    command = "python benchmarks/architectures.py"
    text = (
        "# Methods x architectures\n\n"
        "Every pair tests/test_architectures.py trains and serves through the HTTP API, "
        "fitted the same way here on one thread: held-out accuracy (classification) or RMSE "
        "over the targets' standard deviation (regression), and the seconds of the fit and "
        "its evaluation. These are small problems that check the pairs work, not tuned "
        "results; Fashion-MNIST is in images.md.\n\n"
        f"{body}\n\n"
        f"Command: `{command}`  \nMachine: {machine_line(machine_record(), 1)}\n"
    )
    out = Path("docs/results/architectures.md")
    out.write_text(text)
    print(body)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
