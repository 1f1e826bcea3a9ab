"""Dynamic batching: fewer model calls than requests, seeded answers independent of the batch,
bounded queues (503 + Retry-After) and deadlines (504)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    Client,
    classification_model,
    make_settings,
    metric_value,
    regression_model,
    reordering_tolerance,
    serve,
)

from service import cpus
from service.app import batch_workers
from service.batcher import Batcher, Job
from service.cpus import available_cores
from service.errors import ApiError
from service.metrics import Metrics
from service.protocol import predictions
from service.registry import Registry
from service.workers import WorkerProcess
from training.checkpoint import WEIGHTS, latest_checkpoint
from training.summaries import summarize

REG, CLF = "/v1/models/reg:predict", "/v1/models/clf:predict"


def rows(n: int, width: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.uniform(-2, 2) for _ in range(width)] for _ in range(n)]


def model_calls(client: Client, model: str) -> float:
    text = client.get("/metrics").text
    return metric_value(text, "credence_batch_rows_count", model=model, version="1")


def slow_down(client: Client, model: str, seconds: float) -> None:
    loaded = client.app.state.registry.resolve(model)
    real = loaded.model.sample

    def slow(*args: object, **kwargs: object) -> torch.Tensor:
        time.sleep(seconds)
        return real(*args, **kwargs)

    loaded.model.sample = slow


@contextlib.contextmanager
def paused(*processes: WorkerProcess) -> Iterator[None]:
    """Hold batch worker processes (SIGSTOP), so that their batches stay in flight."""
    pids = [process.pid for process in processes]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # killed meanwhile
                os.kill(pid, signal.SIGCONT)


def worker_processes(client: Client, model: str) -> list[WorkerProcess]:
    return client.app.state.batchers[(model, 1)].processes


def wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    """Poll until the condition holds (a loaded CI machine may take its time)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_concurrent_requests_share_model_calls(model_dir: Path) -> None:
    settings = make_settings(model_dir, max_batch_delay_ms=20, max_batch_rows=512)
    with serve(settings) as live:
        calls = [(REG, {"instances": rows(1 + i % 3, 3, i)}) for i in range(64)]
        responses = live.gather(*calls)
        assert all(r.status_code == 200 for r in responses)
        used = model_calls(live, "reg")
        text = live.get("/metrics").text
    assert 1 <= used < 64
    served = metric_value(text, "credence_batch_rows_sum", model="reg", version="1")
    assert served == sum(len(body["instances"]) for _, body in calls)
    assert len({r.json()["seed"] for r in responses}) == 64  # each unseeded request got its own


def numbers(answer: object) -> list[float]:
    """Every number in a response body, in order (labels and names left out)."""
    if isinstance(answer, dict):
        return [v for key in sorted(answer) for v in numbers(answer[key])]
    if isinstance(answer, list):
        return [v for item in answer for v in numbers(item)]
    return [float(answer)] if isinstance(answer, int | float) else []


@pytest.mark.parametrize("invariant", [True, False], ids=["batch-invariant", "default"])
@pytest.mark.parametrize(("name", "width"), [("reg", 3), ("clf", 4)])
def test_seeded_request_gets_the_same_numbers_alone_and_in_any_batch(
    model_dir: Path, name: str, width: int, invariant: bool
) -> None:
    """With batch_invariant, to the bit; by default the batch's products add their terms in
    another order than a request's alone, and the numbers agree to that rounding: the
    draws' bound (conftest.reordering_tolerance) for the fixture's models, whose
    summaries here (means, variances, quantiles, probabilities, entropies) move by at most a
    few times what their draws move."""
    url = f"/v1/models/{name}:predict"
    target = {
        "instances": rows(3, width, 0),
        "parameters": {"seed": 7, "num_samples": 40, "credible_levels": [0.9]},
    }
    single = {"instances": rows(1, width, 1), "parameters": {"seed": 8, "num_samples": 33}}
    others = []
    for i in range(24):
        parameters: dict = {"num_samples": [5, 40, 300][i % 3]}
        parameters["credible_levels"] = [[0.9], [0.5], [0.9, 0.99]][i // 3 % 3]
        if i % 4:
            parameters["seed"] = 1000 + i
        others.append({"instances": rows(1 + i % 5, width, 100 + i), "parameters": parameters})
    settings = make_settings(
        model_dir, max_batch_delay_ms=50, max_batch_rows=1024, batch_invariant=invariant
    )
    with serve(settings) as live:
        alone = live.post(url, json=target).json()
        alone_single = live.post(url, json=single).json()
        calls_before = model_calls(live, name)
        # the target twice in a row: two requests with one seed side by side in a batch
        batch = [*others[:12], target, target, *others[12:], single, target]
        responses = live.gather(*((url, body) for body in batch))
        calls = model_calls(live, name) - calls_before
    assert all(r.status_code == 200 for r in responses)
    assert calls < len(batch) / 2  # the requests really were batched together
    pairs = [(12, alone), (13, alone), (-1, alone), (-2, alone_single)]
    if invariant:
        assert all(responses[i].json() == expected for i, expected in pairs)
        return
    model = latest_checkpoint(model_dir, name).build()
    x = torch.tensor(target["instances"], dtype=torch.float32)
    draws = model.sample(x, 300, torch.full((3,), 7), [3])
    bound = reordering_tolerance(model, draws)
    for i, expected in pairs:
        got = responses[i].json()
        assert got["num_samples"] == expected["num_samples"]
        torch.testing.assert_close(
            torch.tensor(numbers(got), dtype=torch.float64),
            torch.tensor(numbers(expected), dtype=torch.float64),
            rtol=4 * bound["rtol"],
            atol=4 * bound["atol"],
        )


def test_draws_and_summaries_do_not_depend_on_the_batch() -> None:
    """The two guarantees the batcher relies on, checked bit for bit on the core: a
    request's draws depend only on its rows and seed, and a row's summaries depend only on
    its draws."""
    generator = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (41,), generator=generator)
    for model in (regression_model(), classification_model()):
        x = torch.randn(41, model.arch["in_features"], generator=generator)
        batch = model.sample(x, 120, seeds, [1] * 41)  # 41 one-row requests
        summary = summarize(model.task, batch, [0.9, 0.5])
        for lo, hi in ((0, 1), (5, 6), (10, 17), (40, 41)):
            alone = model.sample(x[lo:hi], 120, seeds[lo:hi], [1] * (hi - lo))
            assert torch.equal(alone, batch[:, lo:hi])
            for key, value in summarize(model.task, alone, [0.9, 0.5]).items():
                mine = (slice(None), slice(lo, hi)) if key in ("lower", "upper") else slice(lo, hi)
                assert torch.equal(value, summary[key][mine]), key


def test_full_queue_is_503_with_retry_after(model_dir: Path) -> None:
    settings = make_settings(model_dir, max_queue=1, max_batch_rows=1, max_batch_delay_ms=0)
    with serve(settings) as live:
        slow_down(live, "reg", 0.3)
        responses = live.gather(*[(REG, {"instances": [[0.0, 0.0, 0.0]]})] * 6)
        metrics = live.get("/metrics").text
    labels = {"model": "reg", "version": "1", "protocol": "native", "reason": "overloaded"}
    shed = metric_value(metrics, "credence_request_failures_total", **labels)
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1
    assert set(statuses) <= {200, 503}
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "overloaded"
    assert shed == statuses.count(503)


@pytest.mark.parametrize("workers", [0, 1])
def test_deadline_is_504_and_the_server_recovers(model_dir: Path, workers: int) -> None:
    settings = make_settings(model_dir, request_timeout_s=0.2, batch_workers=workers)
    body = {"instances": [[0.0, 0.0, 0.0]]}
    with serve(settings) as live:
        if workers:  # the batch is held in its process for as long as it is paused
            with paused(*worker_processes(live, "reg")):
                started = time.monotonic()
                late = live.post(REG, json=body)
                waited = time.monotonic() - started
        else:  # on the event loop: the batch takes 0.5 s, and the loop with it
            loaded = live.app.state.registry.resolve("reg")
            real = loaded.model.sample
            slow_down(live, "reg", 0.5)
            late = live.post(REG, json=body)
            loaded.model.sample = real
        time.sleep(0.3)  # let the late batch finish
        after = live.post(REG, json=body)
    assert late.status_code == 504
    assert late.json()["error"]["code"] == "deadline_exceeded"
    if workers:  # the paused batch never finished: the deadline answered, in time
        assert waited < 2
    assert after.status_code == 200


def test_request_larger_than_the_row_budget_is_served_alone(model_dir: Path) -> None:
    with serve(make_settings(model_dir, max_batch_rows=4, max_batch_delay_ms=10)) as live:
        responses = live.gather(
            (REG, {"instances": rows(10, 3, 0), "parameters": {"seed": 1}}),
            (REG, {"instances": rows(3, 3, 1), "parameters": {"seed": 2}}),
            (REG, {"instances": rows(2, 3, 2), "parameters": {"seed": 3}}),
        )
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert [len(r.json()["predictions"]) for r in responses] == [10, 3, 2]
        assert model_calls(live, "reg") == 3


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batch_workers_compute_batches_side_by_side_with_the_same_answers(
    model_dir: Path, workers: int
) -> None:
    bodies = [
        {"instances": rows(2, 3, i), "parameters": {"seed": 50 + i, "num_samples": 30}}
        for i in range(4)
    ]
    with serve(make_settings(model_dir)) as reference:
        expected = [reference.post(REG, json=body).json() for body in bodies]
    settings = make_settings(model_dir, max_batch_rows=2, batch_workers=workers)
    with serve(settings) as live:
        responses = live.gather(*((REG, body) for body in bodies))
        assert [r.json() for r in responses] == expected
        # the server keeps its own weights only when it computes the batches itself
        parameters = list(live.app.state.registry.resolve("reg").model.parameters())
        assert all(p.is_meta == bool(workers) for p in parameters)
        if not workers:
            return
        batcher = live.app.state.batchers[("reg", 1)]
        with paused(*batcher.processes):  # one request per batch (2 rows)
            pending = [
                live.portal.start_task_soon(partial(live.client.post, REG, json=body))
                for body in bodies[:2]
            ]
            # each worker holds one batch; a second batch waits only when there is no
            # second worker to take it
            wait_until(lambda: batcher.in_flight + batcher.depth == 2)
            time.sleep(0.2)  # time enough for a second worker to take the queued one
            assert (batcher.in_flight, batcher.depth) == (workers, 2 - workers)
        assert [p.result(timeout=30).json() for p in pending] == expected[:2]


def test_a_worker_process_that_dies_fails_its_batch_and_is_replaced(model_dir: Path) -> None:
    body = {"instances": [[0.0, 0.0, 0.0]], "parameters": {"seed": 3}}
    with serve(make_settings(model_dir, batch_workers=1)) as live:
        expected = live.post(REG, json=body).json()
        (process,) = worker_processes(live, "reg")
        batcher = live.app.state.batchers[("reg", 1)]
        with paused(process):
            pending = live.portal.start_task_soon(partial(live.client.post, REG, json=body))
            wait_until(lambda: batcher.in_flight == 1)  # the batch is in the process
            os.kill(process.pid, signal.SIGKILL)
            failed = pending.result(timeout=30)
        again = live.post(REG, json=body)
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["code"] == "inference_failed" and "killed by signal 9" in error["message"], error
    assert again.status_code == 200 and again.json() == expected


def test_large_torch_models_get_a_batch_per_core_small_ones_the_loop_and_cuda_one_process(
    tmp_path: Path,
) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    small, large = SimpleNamespace(small=True, device=cpu), SimpleNamespace(small=False, device=cpu)
    cores = available_cores()
    auto, onnx = make_settings(tmp_path), make_settings(tmp_path, backend="onnx")
    assert batch_workers(small, auto) == batch_workers(small, onnx) == 0
    assert batch_workers(large, auto) == cores
    assert batch_workers(large, onnx) == 1  # onnxruntime threads itself
    assert batch_workers(large, make_settings(tmp_path, batch_workers=0)) == 0
    assert batch_workers(small, make_settings(tmp_path, batch_workers="3")) == 3
    for size in (True, False):  # one process drives the GPU, and the loop never waits for it
        on_gpu = SimpleNamespace(small=size, device=cuda)
        assert batch_workers(on_gpu, auto) == 1
        assert batch_workers(on_gpu, make_settings(tmp_path, batch_workers=2)) == 2


def test_stopping_answers_a_batch_in_flight_and_the_queue_with_503(model_dir: Path) -> None:
    settings = make_settings(model_dir, max_batch_rows=1)
    loaded = Registry.load(model_dir, torch.device("cpu"), settings).resolve("reg")

    async def scenario() -> list[BaseException | bytes]:
        batcher = Batcher(loaded, settings, Metrics(), 1)
        batcher.start()
        await batcher.ready()
        x = np.zeros((1, 3), np.float32)
        with paused(*batcher.processes):
            requests = [  # the first is computed; the second waits in the queue (1-row batches)
                asyncio.create_task(batcher.submit(x, 10, (0.9,), seed, lambda _: b"", predictions))
                for seed in (1, 2)
            ]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await batcher.stop()
        outcomes = await asyncio.gather(*requests, return_exceptions=True)
        assert time.monotonic() - started < 5  # answered at once, not at the 30 s deadline
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, ApiError) and o.status == 503 for o in outcomes), outcomes
    assert {o.problems[0].code for o in outcomes} == {"shutting_down"}


def test_a_worker_that_cannot_load_the_model_fails_its_batches_saying_why(
    model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(model_dir)
    loaded = Registry.load(model_dir, torch.device("cpu"), settings).resolve("reg")
    gone = shutil.copytree(loaded.path, tmp_path / "reg" / "1")
    loaded = dataclasses.replace(loaded, path=gone)
    (gone / WEIGHTS).unlink()  # after the server loaded it, before its worker could

    async def scenario() -> BaseException | bytes:
        batcher = Batcher(loaded, settings, Metrics(), 1)
        batcher.start()
        await batcher.ready()  # logs the failure and serves on
        try:
            return await batcher.submit(
                np.zeros((1, 3), np.float32), 10, (0.9,), 1, lambda _: b"", predictions
            )
        except ApiError as error:
            return error
        finally:
            await batcher.stop()

    outcome = asyncio.run(scenario())
    assert isinstance(outcome, ApiError) and outcome.status == 500, outcome
    assert outcome.problems[0].code == "inference_failed"
    assert "loading" in outcome.problems[0].message and WEIGHTS in outcome.problems[0].message


@pytest.mark.parametrize(("workers", "joined"), [(0, True), (1, False)])
def test_a_batch_on_the_loop_waits_a_turn_for_requests_being_read(
    model_dir: Path, workers: int, joined: bool
) -> None:
    """A request parsed in the loop turn after the batch opened joins it when batches are
    computed on the loop (it was waiting in its socket while the last batch computed); with
    worker processes the loop has read it already, so the batch does not wait for it."""
    settings = make_settings(model_dir, max_batch_delay_ms=0)
    loaded = Registry.load(model_dir, torch.device("cpu"), settings).resolve("reg")

    async def scenario() -> list[Job]:
        loop = asyncio.get_running_loop()
        batcher = Batcher(loaded, settings, Metrics(), workers)
        first, second = (
            Job(
                np.zeros((1, 3), np.float32),
                10,
                (0.9,),
                seed,
                lambda _: b"",
                predictions,
                0.0,  # deadline
                0.0,  # queued
                loop.create_future(),
            )
            for seed in (1, 2)
        )
        batcher.queue.put_nowait(first)
        loop.call_soon(batcher.queue.put_nowait, second)  # read in the next turn
        return await batcher._collect()

    batch = asyncio.run(scenario())
    assert [job.seed for job in batch] == ([1, 2] if joined else [1])


@pytest.mark.parametrize(
    ("v2", "v1", "limit"),
    [
        ("200000 100000\n", None, 2),  # a pod limited to 2 CPUs
        ("150000 100000\n", None, 2),  # 1.5 CPUs: two threads, one of them part-time
        ("max 100000\n", None, None),  # no limit
        (None, ("100000", "100000"), 1),  # cgroup v1
        (None, ("-1", "100000"), None),
        (None, None, None),  # no cgroup files
        ("garbage\n", ("", "100000"), None),  # unreadable: ignored
    ],
)
def test_available_cores_follow_the_container_cpu_limit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    v2: str | None,
    v1: tuple | None,
    limit: int | None,
) -> None:
    files = {name: tmp_path / name for name in ("cpu.max", "quota", "period")}
    if v2 is not None:
        files["cpu.max"].write_text(v2)
    if v1 is not None:
        files["quota"].write_text(v1[0])
        files["period"].write_text(v1[1])
    limits = ((files["cpu.max"], None), (files["quota"], files["period"]))
    monkeypatch.setattr(cpus, "CPU_LIMIT_FILES", limits)
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert available_cores() == (limit or 64)


def test_overload_is_refused_at_once_and_the_queue_never_passes_its_bound(model_dir: Path):
    """Twenty requests at once on a queue of three behind a slow batch: the ones that do not
    fit get their 503 before any prediction is computed, and at no loop turn does the
    queue hold more than three."""
    settings = make_settings(model_dir, max_queue=3, max_batch_rows=1, max_batch_delay_ms=0)
    with serve(settings) as live:
        slow_down(live, "reg", 0.2)
        batcher = live.app.state.batchers["reg", 1]
        depths: list[int] = []

        async def timed() -> tuple[int, float, str | None]:
            started = time.perf_counter()
            response = await live.client.post(REG, json={"instances": [[0.0, 0.0, 0.0]]})
            return (
                response.status_code,
                time.perf_counter() - started,
                response.headers.get("retry-after"),
            )

        async def scenario() -> list[tuple[int, float, str | None]]:
            done = False

            async def watch() -> None:
                while not done:
                    depths.append(batcher.depth)
                    await asyncio.sleep(0)

            watcher = asyncio.ensure_future(watch())
            answers = await asyncio.gather(*(timed() for _ in range(20)))
            done = True
            await watcher
            return answers

        answers = live.portal.call(scenario)
    served = [seconds for status, seconds, _ in answers if status == 200]
    refused = [(seconds, retry) for status, seconds, retry in answers if status == 503]
    assert len(served) + len(refused) == 20
    assert 1 <= len(served) <= 1 + settings.max_queue  # the batch being computed, the queue
    assert max(depths) <= settings.max_queue and len(depths) > 4
    assert all(retry == "1" for _, retry in refused)
    assert max(seconds for seconds, _ in refused) < min(served)  # no wait for the model
