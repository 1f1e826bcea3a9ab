"""Draws per call, PyTorch against ONNX Runtime, for the same MC-dropout models.

Times `model.sample(x, n, seeds)` (torch) and the exported graph run by an onnxruntime CPU
session (the CREDENCE_BACKEND=onnx path), both producing the full draws tensor [n, B, out]
with the same seeded dropout masks, for

    small: 13-50-1 regressor (homoscedastic Gaussian head), n = 100
    large: 784-1024-1024-10 classifier, n = 64

at batch sizes 1, 8 and 32 rows, with 1 and 2 intra-op threads, for one request (every row
shares a seed) and for a server batch of one-row requests (a seed per row). Models are
untrained: the timing does not depend on the weights.

    .venv/bin/python benchmarks/onnx_vs_torch.py [--budget-s 0.8]

Prints a markdown table and writes it to docs/results/onnx.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from machine import cpu_model, write_report

from training.build import build_model
from training.model import PosteriorModel
from training.onnx_export import build_graph, run_draws, session

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "onnx.md"
BATCHES = (1, 8, 32)
THREADS = (1, 2)
MODELS = {  # name: (in_features, hidden, likelihood, draws)
    "small 13-50-1 regression": (
        13,
        [50],
        {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"},
        100,
    ),
    "large 784-1024-1024-10 classifier": (
        784,
        [1024, 1024],
        {"kind": "categorical", "num_classes": 10},
        64,
    ),
}
DROPOUT = 0.1


def build(name: str) -> PosteriorModel:
    features, hidden, likelihood, _ = MODELS[name]
    torch.manual_seed(0)
    stats = {"x_mean": [0.0] * features, "x_std": [1.0] * features}
    if likelihood["kind"] == "gaussian":
        stats |= {"y_mean": [0.0], "y_std": [1.0]}
    arch = {"in_features": features, "hidden": hidden, "dropout": DROPOUT}
    return build_model({"method": "mc_dropout", "arch": arch, "likelihood": likelihood}, stats)


def paired_ms(
    first: Callable[[], object], second: Callable[[], object], budget_s: float
) -> tuple[float, float]:
    """Median wall times (ms) of two calls timed alternately, so that both see the same
    load on a shared machine: at least 5 calls each, more while `budget_s` lasts."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    deadline = time.perf_counter() + budget_s
    while len(times[0]) < 5 or (time.perf_counter() < deadline and len(times[0]) < 200):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def measure(budget_s: float) -> list[dict]:
    results = []
    for name in MODELS:
        model = build(name)
        n = MODELS[name][3]
        data = build_graph(model).SerializeToString()
        sessions = {t: session(data, threads=t) for t in THREADS}
        gen = torch.Generator().manual_seed(0)
        for rows in BATCHES:
            x = torch.randn(rows, model.arch["in_features"], generator=gen)
            x_np = x.numpy()
            for seeding in ("one", "per row"):
                seeds = (torch.full((rows,), 7) if seeding == "one" else torch.arange(rows) + 7).to(
                    torch.int64
                )
                seeds_np = seeds.numpy()
                got = run_draws(sessions[1], x_np, n, seeds_np)
                expected = model.sample(x, n, seeds).numpy()
                worst = float(np.abs(got - expected).max())
                for threads in THREADS:
                    torch.set_num_threads(threads)
                    sess = sessions[threads]
                    torch_ms, onnx_ms = paired_ms(
                        partial(model.sample, x, n, seeds),
                        partial(run_draws, sess, x_np, n, seeds_np),
                        budget_s,
                    )
                    row = {
                        "model": name,
                        "n": n,
                        "rows": rows,
                        "seeds": seeding,
                        "threads": threads,
                        "torch": torch_ms,
                        "onnx": onnx_ms,
                        "max_diff": worst,
                    }
                    print(
                        f"{name}, B={rows}, seeds {seeding}, {threads} thread(s): torch "
                        f"{torch_ms:.2f} ms, onnx {onnx_ms:.2f} ms",
                        file=sys.stderr,
                    )
                    results.append(row)
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| model | n | rows | seeds | threads | torch | onnx | torch / onnx "
        "| max abs draw difference |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['n']} | {r['rows']} | {r['seeds']} | {r['threads']} "
            f"| {r['torch']:.2f} ms | {r['onnx']:.2f} ms | {r['torch'] / r['onnx']:.2f}x "
            f"| {r['max_diff']:.1e} |"
        )
    return "\n".join(lines)


def machine() -> str:
    return (
        f"`uname -m` {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__} (CPU provider), "
        f"Python {platform.python_version()}; load average "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} (1, 5, 15 min) when it finished"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--budget-s", type=float, default=0.8, help="timing budget per cell (default: 0.8)"
    )
    parser.add_argument("--out", type=Path, default=OUTPUT, help="markdown file to write")
    args = parser.parse_args()
    started = time.perf_counter()
    body = table(measure(args.budget_s))
    command = "python benchmarks/onnx_vs_torch.py " + " ".join(sys.argv[1:])
    heading_and_body = (
        "# ONNX Runtime against PyTorch: posterior draws per call\n\n"
        "Median wall time (torch and onnx calls alternated) of one call that returns every "
        "draw [n, B, out] of an MC-dropout "
        "model: `model.sample(x, n, seeds)` in PyTorch, and the graph written by "
        "`credence-export` in an onnxruntime CPU session (what `CREDENCE_BACKEND=onnx` runs; "
        "the summaries after it are the same code for both). Seeds `one`: the rows of one "
        "request; `per row`: a server batch of one-row requests. Both runtimes draw the same "
        f"dropout masks (dropout {DROPOUT}); the last column is the largest difference "
        "between their draws (float rounding of the matrix products).\n\n"
        f"{body}\n\n"
        "The 1-thread rows measure the computation. With 2 threads on a shared 2-core VM, "
        "PyTorch's OpenMP threads wait for cores that other processes hold, and its times "
        "swing by an order of magnitude between rows and runs; onnxruntime's idle threads "
        "sleep (`training.onnx_export.session`).\n\n"
    )
    write_report(
        args.out,
        heading_and_body,
        table=body,
        command=command,
        machine=machine(),
        advice="compare the two columns of one row.",
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
