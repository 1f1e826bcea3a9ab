"""What the Prometheus metrics cost the serving path, against the batch they describe.

For benchmarks/serve.py's small and large workloads (untrained checkpoints), a Batcher of
the real service (not started) computes batches of B one-row requests on this thread, as a
small model's batches are served, and the same Batcher's metric calls are timed on their own:

    per batch     queue waits and num_samples (BatchHistogram), samples drawn, rows,
                  requests and inference time (prometheus_client), the three uncertainty
                  histograms and the OOD counts
    per request   Metrics.observe_request (requests, latency, failures), times B

    .venv/bin/python benchmarks/metrics_overhead.py [--out docs/results/metrics-overhead.md]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model, write_report
from serve import WORKLOADS, build_checkpoint

from service.batcher import Batcher, Job
from service.metrics import Metrics
from service.protocol import predictions
from service.registry import Registry
from service.settings import Settings
from service.workers import summarize_batch

BATCHES = (1, 8, 32, 256)


def best_us(fn, number: int) -> float:
    """The least CPU time of this thread in 5 rounds of `number` calls, in microseconds per
    call: on a shared machine wall time mostly measures the other processes."""
    timer = timeit.Timer(fn, timer=time.thread_time)
    return min(timer.repeat(number=number, repeat=5)) / number * 1e6


async def measure(batcher: Batcher, metrics: Metrics, rows: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    spec = batcher.loaded.spec
    x = np.zeros((1, *spec.input_shape), np.float32)
    now = loop.time()
    batch = [
        Job(x, spec.default_num_samples, (0.9,), i, bytes, predictions, now + 10, now, None)
        for i in range(rows)
    ]
    tensors, seeds, groups, _ = batcher._plan(batch)
    summary = summarize_batch(batcher.loaded, tensors, seeds, groups)[0]
    start = time.perf_counter()

    def per_batch() -> None:
        batcher._observe_start(batch)
        batcher.samples_drawn.inc(sum(job.num_samples * job.rows for job in batch))
        batcher.batch_rows.observe(rows)
        batcher.batch_requests.observe(rows)
        batcher.inference_seconds.observe(time.perf_counter() - start)
        batcher._observe_uncertainty(summary)
        batcher._count_ood(summary)

    def per_request() -> None:
        metrics.observe_request(spec.name, "1", "native", 200, "", 0.004)

    calls = max(1, 20_000 // (rows * spec.default_num_samples))  # about as long for each B
    compute = best_us(lambda: summarize_batch(batcher.loaded, tensors, seeds, groups), calls)
    return {
        "compute": compute,
        "batch": best_us(per_batch, 2000),
        "requests": best_us(per_request, 20000) * rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/metrics-overhead.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "| workload | requests per batch | batch compute µs | metrics per batch µs "
        "| metrics per request µs (x B) | metrics / compute |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        settings = Settings(model_dir=Path(root), device="cpu")
        for name in ("small", "large"):
            build_checkpoint(WORKLOADS[name], Path(root))
        registry = Registry.load(Path(root), torch.device("cpu"), settings)
        for name in ("small", "large"):
            metrics = Metrics()
            batcher = Batcher(registry.resolve(name), settings, metrics, workers=0)
            for rows in BATCHES:
                got = asyncio.run(measure(batcher, metrics, rows))
                share = (got["batch"] + got["requests"]) / got["compute"]
                lines.append(
                    f"| {name} | {rows} | {got['compute']:.0f} | {got['batch']:.1f} "
                    f"| {got['requests']:.1f} | {share:.1%} |"
                )
    table = "\n".join(lines) + "\n"
    text = (
        "# Metrics overhead\n\n"
        "The service's metric calls per batch of B one-row requests, against computing that "
        "batch (sampling and summaries, one thread), for benchmarks/serve.py's small "
        "(13 -> 50 -> 1, num_samples 100) and large (784 -> 1024 -> 1024 -> 10, num_samples "
        "64) models: the least CPU time of this thread in 5 rounds each.\n\n" + table + "\n"
    )
    write_report(
        args.out,
        text,
        table=table,
        command="python benchmarks/metrics_overhead.py",
        machine=f"{cpu_model()}, 1 thread",
        advice="the ratio is the number to read.",
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
