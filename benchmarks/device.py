"""A batch worker's computation on one device, against the device's matmul rate.

Times `service.workers.summarize_batch`, everything a batch worker does with a batch (the
inputs to the device, the draws, the summaries, the summaries back to the host), for the
serving benchmark's large model (784 -> 1024 -> 1024 -> 10 MC-dropout classifier, 64 draws;
benchmarks/serve.py) loaded the way the server loads it, in each precision, for batches of
1 to 128 one-row requests. In the same process it times the device's matmul in each dtype.
No HTTP and no client: what the model's own path reaches, the bound that the serving
benchmark's large workload is held against.

    .venv/bin/python benchmarks/device.py [--device auto|cpu|cuda] [--budget-s 1]

Prints a markdown table and writes docs/results/device-<cpu|cuda>.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import cpu_model, write_report
from serve import WORKLOADS, build_checkpoint, matmul_rate

from service.registry import load_version
from service.settings import Settings, resolve_device
from service.workers import summarize_batch

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("float32", "bfloat16", "float16")
ROWS = (1, 8, 32, 128)
LEVELS = (0.95,)


def batch_ms(call: Callable[[], object], budget_s: float) -> float:
    """Median wall time of `call()` in ms: two warm-up calls, then at least 5 timed ones and
    more while the budget lasts (summarize_batch returns host tensors: the device is done)."""
    call(), call()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 500):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(device: torch.device, budget_s: float) -> list[dict]:
    """On a CPU, at one intra-op thread (a server's batch worker, one per core, uses one) and
    at torch's default; each against the matmul rate at the same threads."""
    workload = WORKLOADS["large"]
    threads = [1, torch.get_num_threads()] if device.type == "cpu" else [torch.get_num_threads()]
    results = []
    with tempfile.TemporaryDirectory(prefix="credence-device-") as tmp:
        path = build_checkpoint(workload, Path(tmp))
        gen = torch.Generator().manual_seed(0)
        for n_threads, precision in itertools.product(sorted(set(threads)), PRECISIONS):
            torch.set_num_threads(n_threads)
            rate = matmul_rate(precision, device=str(device))["gflops"]
            settings = Settings(model_dir=Path(tmp), precision=precision)
            loaded = load_version(path, device, settings)
            for rows in ROWS:
                x = torch.randn(rows, workload.in_features, generator=gen)
                seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 1  # one-row requests
                groups = [(workload.num_samples, LEVELS, None, None)]  # as the default serves
                call = functools.partial(summarize_batch, loaded, x, seeds, groups)
                ms = batch_ms(call, budget_s)
                gflops = rows * workload.flops_per_request / (ms / 1e3) / 1e9
                results.append(
                    {
                        "threads": n_threads,
                        "precision": precision,
                        "matmul_gflops": rate,
                        "rows": rows,
                        "ms": ms,
                        "rows_per_s": rows / (ms / 1e3),
                        "gflops": gflops,
                        "of_matmul": gflops / rate,
                    }
                )
                print(
                    f"{n_threads} thread(s) {precision} {rows:4d} rows: {ms:8.2f} ms, "
                    f"{gflops:8.1f} GFLOP/s ({gflops / rate:.1%} of {rate:.0f})"
                )
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| threads | precision | matmul GFLOP/s | rows (requests) | ms per batch | rows/s "
        "| model GFLOP/s | of the matmul rate |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['threads']} | {r['precision']} | {r['matmul_gflops']:.0f} | {r['rows']} "
            f"| {r['ms']:.2f} | {r['rows_per_s']:.0f} | {r['gflops']:.1f} "
            f"| {r['of_matmul']:.1%} |"
        )
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    where = f"{cpu_model()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {where}"
    return (
        f"`uname -m` {platform.machine()}, {where}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:<i>")
    parser.add_argument(
        "--budget-s", type=float, default=1.0, help="timing budget per cell (default: 1)"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    started = time.perf_counter()
    body = table(measure(device, args.budget_s))
    workload = WORKLOADS["large"]
    text = (
        f"# A batch's computation on {device.type.upper()}\n\n"
        "Median wall time of `service.workers.summarize_batch`, everything a batch worker "
        "does with a batch (inputs to the device, the draws, the summaries, the summaries "
        f"back to the host), for the serving benchmark's large model ({workload.description}, "
        f"{workload.num_samples} draws, untrained), loaded as the server loads it with "
        "`CREDENCE_PRECISION` set to each precision; a batch of one-row requests, each with "
        "its own seed. Model GFLOP/s counts "
        f"{workload.flops_per_request / 1e6:.1f} MFLOP per row (the count "
        "`benchmarks/serve.py` uses); the matmul rate is the best of 20 "
        "[2048, 1024] x [1024, 1024] products in that dtype on the same device at the same "
        "intra-op threads, timed in the same process just before. No HTTP and no client: "
        "the most the served model's own path reaches on this device.\n\n"
        f"{body}\n\n"
    )
    write_report(
        ROOT / "docs" / "results" / f"device-{device.type}.md",
        text,
        table=body,
        command="python benchmarks/device.py " + " ".join(sys.argv[1:]),
        machine=machine(device),
        advice="compare rows of one run.",
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
