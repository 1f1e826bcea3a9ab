"""What the feature-density OOD flag costs a served batch: the draws against the extra
deterministic pass that embeds the rows (`PosteriorModel.embed_inputs`, each request's rows
on their own, as the worker runs it) and the density's score of them (training.density).

    .venv/bin/python benchmarks/density_overhead.py [--models models-images]

Reads the checkpoints benchmarks/images.py trains (--models) and writes
docs/results/density-overhead.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from machine import machine_line, machine_record, median_ms, write_report

from training.checkpoint import latest_checkpoint
from training.density import GaussianDensity
from training.evaluate import stored_density
from training.images import load_fashion_mnist
from training.model import PosteriorModel

MODELS = ("mc-dropout-cnn", "ensemble-cnn")
DRAWS = 32
SHAPES = ((16, 1), (1, 16))  # (requests, rows each)


def measure(
    model: PosteriorModel, density: GaussianDensity, x: torch.Tensor, sizes: list[int], repeats: int
) -> tuple[float, float, float]:
    """Median ms of the draws, the embedding and the density's score of one batch."""
    seeds = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    features = model.embed_inputs(x, sizes)
    return (
        median_ms(lambda: model.sample(x, DRAWS, seeds, sizes), repeats),
        median_ms(lambda: model.embed_inputs(x, sizes), repeats),
        median_ms(lambda: density.score(features), repeats),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models-images"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("docs/results/density-overhead.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    images = torch.from_numpy(load_fashion_mnist().test.x[:16])
    rows = [
        "| model | batch | draws (ms) | embedding (ms) | density score (ms) | overhead |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in MODELS:
        checkpoint = latest_checkpoint(args.models, name)
        model, density = checkpoint.build(), stored_density(checkpoint)
        if density is None:
            raise SystemExit(f"{name}: its OOD flag reads no feature density; retrain it")
        for requests, size in SHAPES:
            x = images[: requests * size]
            sizes = [size] * requests
            draws, embed, score = measure(model, density, x, sizes, args.repeats)
            rows.append(
                f"| {name} | {requests} request(s) of {size} row(s) | {draws:.1f} | {embed:.1f} "
                f"| {score:.2f} | {(embed + score) / draws:.0%} |"
            )
    table = "\n".join(rows)
    text = (
        "# The feature-density OOD flag's cost per batch\n\n"
        f"A batch of Fashion-MNIST test images, {DRAWS} draws per request, each request's "
        "draws and embedding computed on its own rows (as the server computes them); the "
        "overhead is the embedding and the score over the draws. Checkpoints from "
        "`benchmarks/images.py`.\n\n"
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
