"""Batch worker processes: what crosses the socket comes back as the server would compute it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path

import pytest
import torch
import uvloop
from conftest import CLASSIFICATION, classification_manifest, make_settings

from service.registry import Registry
from service.workers import WorkerProcess, summarize_batch
from training.checkpoint import save_checkpoint
from training.model import build_model

WIDTH = 3000  # 256 rows of it are 3 MB: more than a socket buffer holds, both ways


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_worker_process_computes_what_the_server_would_for_batches_of_megabytes(
    tmp_path: Path, run: Callable[[Coroutine], object]
) -> None:
    """uvloop, which the server runs on, makes the descriptors it watches non-blocking."""
    torch.manual_seed(0)
    arch = {**CLASSIFICATION["arch"], "in_features": WIDTH}
    stats = {"x_mean": [0.0] * WIDTH, "x_std": [1.0] * WIDTH}
    model = build_model({**CLASSIFICATION, "arch": arch}, stats)
    manifest = classification_manifest()
    manifest["input"] = {**manifest["input"], "shape": [WIDTH]}
    save_checkpoint(model, tmp_path, "wide", manifest)
    settings = make_settings(tmp_path)
    loaded = Registry.load(tmp_path, torch.device("cpu"), settings).resolve("wide")
    x, seeds = torch.randn(256, WIDTH), torch.arange(256) * 7 + 1
    groups = [  # two groups of requests, different num_samples and levels
        (40, (0.9,), list(range(0, 256, 2))),
        (10, (0.5, 0.9), list(range(1, 256, 2))),
    ]
    expected = summarize_batch(loaded, x, seeds, groups)

    async def scenario() -> list[dict[str, torch.Tensor]]:
        worker = WorkerProcess(loaded, settings, "wide-worker")
        worker.start()
        try:
            return [await worker.compute(x, seeds, groups) for _ in range(2)][-1]
        finally:
            worker.stop()

    got = run(scenario())
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(mine[key], value), key
