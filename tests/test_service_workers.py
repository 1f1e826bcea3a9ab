"""Batch worker processes: what crosses the socket comes back as the server would compute it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path

import numpy as np
import pytest
import torch
import uvloop
from conftest import (
    CLASSIFICATION,
    classification_manifest,
    classification_model,
    make_settings,
    serve,
)

from service.registry import Registry
from service.workers import WorkerProcess, summarize_batch, to_device, to_host
from training.build import build_model
from training.checkpoint import save_checkpoint

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
        (40, (0.9,), list(range(0, 256, 2)), [1] * 128, None),
        (10, (0.5, 0.9), list(range(1, 256, 2)), [1] * 128, None),
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


def test_summaries_come_back_to_the_host_untouched_on_the_cpu() -> None:
    summaries = [{"mean": torch.ones(2)}, {"std": torch.zeros(3)}]
    assert to_host(summaries, torch.device("cpu")) is summaries
    x = torch.arange(3.0)
    assert to_device(x, torch.device("cpu")) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_on_cuda_summarizes_what_the_cpu_does_and_returns_host_tensors(
    tmp_path: Path,
) -> None:
    """Pinned, non-blocking copies both ways: the answers must still be the finished ones.
    cuBLAS rounds differently from MKL, hence a tolerance rather than the same bits."""
    save_checkpoint(classification_model(), tmp_path, "clf", classification_manifest())
    settings = make_settings(tmp_path)
    on_cpu = Registry.load(tmp_path, torch.device("cpu"), settings).resolve("clf")
    on_gpu = Registry.load(tmp_path, torch.device("cuda"), settings).resolve("clf")
    x = torch.randn(64, CLASSIFICATION["arch"]["in_features"])
    seeds = torch.arange(64) * 3 + 1
    groups = [(200, (0.9,), None, None, None)]
    expected = summarize_batch(on_cpu, x, seeds, groups)
    for _ in range(3):  # later batches reuse the cached pinned blocks
        got = summarize_batch(on_gpu, x, seeds, groups)
        for key, value in expected[0].items():
            assert got[0][key].device.type == "cpu", key
            torch.testing.assert_close(got[0][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "overrides",
    [{}, {"cuda_graphs": True}, {"precision": "float16", "cuda_graphs": True}],
    ids=["eager", "cuda-graphs", "float16-cuda-graphs"],
)
def test_the_server_on_cuda_answers_what_it_answers_on_the_cpu(
    model_dir: Path, overrides: dict
) -> None:
    """End to end on a GPU: a worker process of its own (the default there), pinned copies,
    and the options, against the CPU's answer to the same seeded request."""
    body = {"instances": [[0.1, -0.2, 0.3], [1.0, 0.5, -1.5]], "parameters": {"seed": 11}}
    with serve(make_settings(model_dir)) as live:
        expected = live.post("/v1/models/reg:predict", json=body).json()["predictions"]
    with serve(make_settings(model_dir, device="cuda", **overrides)) as live:
        version = live.get("/v1/models/reg").json()["versions"][0]
        got = live.post("/v1/models/reg:predict", json=body)
    assert version["device"].startswith("cuda")
    assert version["cuda_graphs"] is overrides.get("cuda_graphs", False)
    assert got.status_code == 200, got.text
    tolerance = 1e-2 if "precision" in overrides else 1e-4  # float16 rounds at 2^-11
    for mine, theirs in zip(got.json()["predictions"], expected, strict=True):
        for key in ("mean", "std"):
            np.testing.assert_allclose(mine[key], theirs[key], rtol=tolerance, atol=tolerance)
