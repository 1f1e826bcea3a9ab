"""Dynamic batching: one bounded queue and one collecting task per loaded model version.

Whenever one of the version's batch workers is free, the task takes what is queued, up to
`max_batch_rows` rows or until `max_batch_delay_ms` has passed since the first request (by
default no wait: it takes what queued while the previous batch ran, so a lone request is not
held back and a busy server still fills its batches), and the worker makes one
`model.sample` call per group of the batch's requests that share (num_samples,
credible_levels), usually one for the whole batch, in a process of its own (service.workers).
With no workers (`batch_workers` 0, a small model's default) batches are computed one at a
time on the event loop's thread.

Every row carries its request's seed, so a seeded request's draws do not depend on what it
is batched with beyond float rounding; with `batch_invariant` the model is also told which
rows are which request's, and a seeded request gets the bits it gets alone
(training.segments).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.errors import ApiError
from service.metrics import Metrics
from service.registry import LoadedModel, ModelSpec
from service.settings import Settings
from service.workers import Group, WorkerProcess, release_weights, summarize_batch
from training.attributions import Explain
from training.summaries import Summary

log = logging.getLogger("credence.batcher")

RETRY_AFTER_S = 1
EXPIRY_TICK_S = 0.05
LOOP_TURNS = 2  # see Batcher._collect
# A protocol's view of a group's summaries, made once per group (one `tolist` or array
# per field, not one per request): it slices by rows, and each request renders its slice.
# Levels None: a :sample request's group, whose summary holds the draws themselves.
Columns = Callable[[ModelSpec, Summary, tuple[float, ...] | None], Any]
Render = Callable[[Any], Any]  # the request's slice of its Columns -> the response
# the summary fields behind service.metrics.UNCERTAINTY's histograms, in its order:
# variances (their square roots are observed) for regression, entropies for classification
UNCERTAINTY_FIELDS = {
    "regression": ("epistemic_variance", "aleatoric_variance", "variance"),
    "classification": ("mutual_information", "expected_entropy", "entropy"),
}


@dataclass(eq=False)
class Job:
    """One validated request waiting for its batch."""

    x: np.ndarray  # protocol.PredictRequest.x
    num_samples: int
    levels: tuple[float, ...] | None  # None: the draws themselves
    seed: int
    render: Render
    columns: Columns
    deadline: float  # event-loop time
    queued: float  # event-loop time
    future: asyncio.Future = field(repr=False)
    explain: Explain | None = None  # :explain: attributions instead of summaries

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class Batcher:
    """Queue, collecting task and batch worker processes of one model version."""

    def __init__(self, loaded: LoadedModel, settings: Settings, metrics: Metrics, workers: int):
        self.loaded = loaded
        self.max_rows = settings.max_batch_rows
        self.delay_s = settings.max_batch_delay_ms / 1000
        self.timeout_s = settings.request_timeout_s
        self.batch_invariant = settings.batch_invariant
        self.max_queue = settings.max_queue
        self.queue: asyncio.Queue[Job] = asyncio.Queue()  # bounded by `depth`, in submit
        self.labels = (loaded.spec.name, str(loaded.spec.version))
        # labelled once: labels() takes a lock and validates on every call
        self.depth_gauge = metrics.queue_depth.labels(*self.labels)
        self.batch_rows = metrics.batch_rows.labels(*self.labels)
        self.batch_requests = metrics.batch_requests.labels(*self.labels)
        self.inference_seconds = metrics.inference.labels(*self.labels)
        self.samples_drawn = metrics.samples_drawn.labels(*self.labels)
        self.queue_wait = metrics.queue_wait
        self.request_samples = metrics.request_samples
        self.uncertainty = metrics.uncertainty
        self.ood_predictions = metrics.ood.labels(*self.labels)
        self.predictions = metrics.predictions.labels(*self.labels)
        self._carry: Job | None = None  # took it, but it did not fit in the last batch
        self._task: asyncio.Task | None = None
        self._expiry: asyncio.Task | None = None
        # Every request gets the same timeout from when it is queued, so queue order is
        # deadline order: the expiry task fails what is overdue from the front (no timer
        # per request). A client's shorter deadline gets a timer of its own; it is never
        # later than its server deadline, so the front stays the earliest of those.
        self._by_deadline: collections.deque[Job] = collections.deque()
        self._running: set[asyncio.Task] = set()  # batches being computed
        name = f"credence-{loaded.spec.name}-v{loaded.spec.version}"
        # none: batches are computed on the event loop's thread
        self.processes = [WorkerProcess(loaded, settings, f"{name}-{i}") for i in range(workers)]
        # the free workers; None stands for the event loop's thread
        self._idle: asyncio.Queue[WorkerProcess | None] = asyncio.Queue()
        self._pending = 0  # submitted and not yet answered
        self._drained: asyncio.Event | None = None  # set by retire: wake it at 0 pending
        self.closed = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for process in self.processes:
            process.start()
            self._idle.put_nowait(process)
        if self.processes:
            release_weights(self.loaded.model)
            if self.loaded.module is not self.loaded.model:
                release_weights(self.loaded.module)
        else:
            self._idle.put_nowait(None)
        self._task = loop.create_task(self._run(), name=self.labels[0])
        self._expiry = loop.create_task(self._expire(), name=f"{self.labels[0]} deadlines")

    async def ready(self) -> list[str]:
        """Wait for the worker processes to load the model (they start in parallel), and
        say why each one that could not did not. One that cannot is logged; it tries again
        on its first batch, which fails if it fails."""
        outcomes = await asyncio.gather(
            *(process.ready() for process in self.processes), return_exceptions=True
        )
        errors = []
        for process, outcome in zip(self.processes, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error("%s could not start: %s", process.name, outcome)
                errors.append(f"{process.name}: {outcome}")
        return errors

    async def retire(self, grace_s: float) -> None:
        """Take no more requests, let every queued and in-flight one finish on this version
        (each within its own deadline, `grace_s` at most in all), then stop and free the
        model's memory: the worker processes exit, and a model computed on the loop moves
        to the meta device, whoever still holds a reference to it."""
        self.closed = True
        if self._pending:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._drained.wait()
        await self.stop()
        if not self.processes:  # with processes the server's copy was released at start
            release_weights(self.loaded.model)

    async def stop(self) -> None:
        for task in [self._task, self._expiry, *self._running]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        shutting = ApiError.single(503, "shutting_down", "the server is shutting down")
        pending = [self._carry] if self._carry else []
        while not self.queue.empty():
            pending.append(self.queue.get_nowait())
        # and those a cancelled collection had taken from the queue: nothing else would
        # answer them once the deadline task has stopped
        pending += self._by_deadline
        for job in pending:
            if not job.future.done():
                job.future.set_exception(shutting)
        for process in self.processes:
            process.stop()

    @property
    def depth(self) -> int:
        return self.queue.qsize() + (self._carry is not None)

    @property
    def in_flight(self) -> int:
        """Batches being computed."""
        return len(self._running)

    async def submit(
        self,
        x: np.ndarray,
        num_samples: int,
        levels: tuple[float, ...] | None,
        seed: int,
        render: Render,
        columns: Columns,
        timeout_s: float | None = None,
        explain: Explain | None = None,
    ) -> Any:
        """Queue one request and wait for its rendered response, `request_timeout_s` at most,
        or the client's `timeout_s` where that is shorter. The batcher knows no protocol:
        `columns` and `render` are the request's codec's. With `explain` the request's
        summary is its attributions (training.attributions)."""
        loop = asyncio.get_running_loop()
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        now = loop.time()
        deadline = now + timeout
        if self.depth >= self.max_queue or self.closed:
            why = "is being replaced" if self.closed else f"is full ({self.max_queue} requests)"
            raise ApiError.single(
                503,
                "overloaded",
                f"the queue of {self.labels[0]!r} v{self.labels[1]} {why}; "
                f"retry after {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        future = loop.create_future()
        job = Job(x, num_samples, levels, seed, render, columns, deadline, now, future, explain)
        self.queue.put_nowait(job)
        self._by_deadline.append(job)
        if timeout < self.timeout_s:  # out of the queue's deadline order: a timer of its own
            loop.call_at(deadline, self._expire_one, job, timeout)
        self.depth_gauge.set(self.depth)
        # _expire fails the future at the deadline (a batch skips the futures that are done);
        # a batch computed on the loop cannot be interrupted, so an answer that comes after
        # the deadline is refused the same way
        self._pending += 1
        try:
            payload = await job.future
        finally:
            self._pending -= 1
            if self._drained is not None and not self._pending:
                self._drained.set()
        if loop.time() > deadline:
            raise self._deadline_exceeded(timeout)
        return payload

    def _deadline_exceeded(self, timeout: float | None = None) -> ApiError:
        timeout = self.timeout_s if timeout is None else timeout
        return ApiError.single(
            504,
            "deadline_exceeded",
            f"no prediction within the request deadline of {timeout:g} s",
        )

    def _expire_one(self, job: Job, timeout: float) -> None:
        """A client's shorter deadline has passed (its batch, if any, skips it)."""
        if not job.future.done():
            job.future.set_exception(self._deadline_exceeded(timeout))

    async def _expire(self) -> None:
        """Answer requests past their deadline with 504, and forget answered ones, every
        50 ms (or a quarter of the deadline, when that is shorter)."""
        loop = asyncio.get_running_loop()
        waiting = self._by_deadline
        while True:
            await asyncio.sleep(min(EXPIRY_TICK_S, self.timeout_s / 4))
            now = loop.time()
            while waiting and (waiting[0].future.done() or waiting[0].deadline <= now):
                job = waiting.popleft()
                if not job.future.done():
                    job.future.set_exception(self._deadline_exceeded())

    async def _run(self) -> None:
        """Collect a batch whenever one of the `workers` is free, and compute it there; the
        queue fills while every worker is busy (or, with none, while the loop computes and
        the requests wait in the sockets), so a loaded server makes large batches."""
        while True:
            worker = await self._idle.get()
            batch = [job for job in await self._collect() if not job.future.done()]
            self.depth_gauge.set(self.depth)
            if not batch:
                self._idle.put_nowait(worker)
                continue
            self._observe_start(batch)
            task = asyncio.get_running_loop().create_task(self._complete(batch, worker))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(lambda _, free=worker: self._idle.put_nowait(free))

    async def _complete(self, batch: list[Job], worker: WorkerProcess | None) -> None:
        """Compute one batch (in a worker process, if any) and hand each request its outcome."""
        start = time.perf_counter()
        try:
            x, seeds, groups, members = self._plan(batch)
            if worker is None and any(group[4] is not None for group in groups):
                # attributions take a gradient pass per output: a thread keeps the loop free
                summaries = await asyncio.to_thread(summarize_batch, self.loaded, x, seeds, groups)
            elif worker is None:
                summaries = summarize_batch(self.loaded, x, seeds, groups)
            else:
                summaries = await worker.compute(x, seeds, groups)
            self.samples_drawn.inc(sum(job.num_samples * job.rows for job in batch))
            outcomes = self._render(batch, groups, members, summaries)
            self.batch_rows.observe(len(seeds))
            self.batch_requests.observe(len(batch))
            self.inference_seconds.observe(time.perf_counter() - start)
        except asyncio.CancelledError:  # stopping: answer now rather than at the deadline
            shutting = ApiError.single(503, "shutting_down", "the server is shutting down")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(shutting)
            raise
        except Exception as exc:
            log.exception("batch of %d request(s) failed on %s", len(batch), self.labels)
            message = (
                f"the model failed on the batch this request was in "
                f"({type(exc).__name__}: {exc}); the request itself was valid"
            )
            outcomes = [ApiError.single(500, "inference_failed", message) for _ in batch]
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    async def _collect(self) -> list[Job]:
        """Wait for a first request, then take more until the row budget or the delay.

        When batches are computed on the event loop, the requests that arrived during the
        last one wait unread in the sockets: before the batch closes, the loop gets
        LOOP_TURNS turns to read and parse them, so they join this batch instead of waiting
        for the next (with worker processes the loop reads them while batches compute): at
        concurrency 32 the small model's batches grew from 16 to 31 rows and it served 21%
        more requests per second (benchmarks/serve.py's server and client, 2 cores; one turn
        gave 28 rows, three 31.5). Idle, the turns cost microseconds.
        """
        loop = asyncio.get_running_loop()
        first, self._carry = self._carry or await self.queue.get(), None
        batch, rows = [first], first.rows
        deadline = loop.time() + self.delay_s
        turned = bool(self.processes)  # worker processes: the loop has read them already
        while rows < self.max_rows:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                if not turned:
                    turned = True
                    for _ in range(LOOP_TURNS):
                        await asyncio.sleep(0)
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        job = await self.queue.get()
                except TimeoutError:
                    break
            if rows + job.rows > self.max_rows:
                self._carry = job
                break
            batch.append(job)
            rows += job.rows
        return batch

    def _plan(
        self, batch: list[Job]
    ) -> tuple[torch.Tensor, torch.Tensor, list[Group], list[list[int]]]:
        """The batch's inputs and seeds (a row each), and its requests grouped by
        (num_samples, levels, explain): each group's rows (None: all of them), its requests'
        sizes (None: the model may multiply over the whole group) and its members.

        Per request it makes no torch call: on a small model each one is a measurable share
        of the batch (a seed tensor and a row index per request were a sixth of it)."""
        x = torch.from_numpy(np.concatenate([job.x for job in batch]))
        seeds = torch.tensor([job.seed for job in batch for _ in range(job.rows)])
        offsets = [0]
        by_key: dict[tuple[int, tuple[float, ...] | None, Explain | None], list[int]] = {}
        for i, job in enumerate(batch):
            offsets.append(offsets[-1] + job.rows)
            by_key.setdefault((job.num_samples, job.levels, job.explain), []).append(i)
        groups: list[Group] = []
        for (n, levels, explain), members in by_key.items():
            rows = None
            if len(members) < len(batch):  # this group's rows only
                rows = [row for i in members for row in range(offsets[i], offsets[i + 1])]
            sizes = [batch[i].rows for i in members] if self.batch_invariant else None
            groups.append((n, levels, rows, sizes, explain))
        return x, seeds, groups, list(by_key.values())

    def _render(
        self,
        batch: list[Job],
        groups: list[Group],
        members: list[list[int]],
        summaries: list[Summary],
    ) -> list[Any]:
        """Each request's response from its group's summaries (a failure fails it alone);
        the group's columns are made once per protocol among its requests."""
        spec = self.loaded.spec
        outcomes: list[Any] = [None] * len(batch)
        for (_, levels, _, _, explain), indices, summary in zip(
            groups, members, summaries, strict=True
        ):
            if levels is not None and explain is None:  # :sample's are draws, :explain's not
                self._observe_uncertainty(summary)
                self._count_ood(summary)
            made: dict[Columns, Any] = {}
            start_row = 0
            for i in indices:
                part = slice(start_row, start_row + batch[i].rows)
                start_row = part.stop
                job = batch[i]
                try:
                    rendered = made.get(job.columns)
                    if rendered is None:
                        rendered = made[job.columns] = job.columns(spec, summary, levels)
                    outcomes[i] = job.render(rendered[part])
                except Exception as exc:  # one response that cannot be rendered fails alone
                    log.exception("rendering a response failed")
                    outcomes[i] = ApiError.single(
                        500, "render_failed", f"{type(exc).__name__}: {exc}"
                    )
        return outcomes

    def _observe_start(self, batch: list[Job]) -> None:
        """Each request's wait in the queue, and its num_samples, as its batch starts: one
        lock per histogram per batch (service.metrics.BatchHistogram)."""
        now = asyncio.get_running_loop().time()
        self.queue_wait.observe(self.labels, [now - job.queued for job in batch])
        self.request_samples.observe(self.labels, [job.num_samples for job in batch])

    def _count_ood(self, summary: Summary) -> None:
        """Count the group's predictions and OOD flags (service.workers.summarize_batch made
        them), whichever protocols answer its requests."""
        self.predictions.inc(len(next(iter(summary.values()))))
        if "ood" in summary and (flagged := int(summary["ood"].sum())):
            self.ood_predictions.inc(flagged)

    def _observe_uncertainty(self, summary: Summary) -> None:
        """The group's epistemic, aleatoric and predictive uncertainty, one value per
        prediction and output, bucketed together: standard deviations for regression,
        entropies (nats) for classification."""
        regression = "epistemic_variance" in summary
        names = UNCERTAINTY_FIELDS["regression" if regression else "classification"]
        values = torch.stack([summary[name] for name in names]).numpy(force=True)
        if regression:
            np.sqrt(np.maximum(values, 0, out=values), out=values)
        self.uncertainty.observe(self.labels, values)
