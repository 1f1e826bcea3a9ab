"""Batch workers: processes that each compute one model version's batches, one at a time.

A batch computed on a thread of the server's process pays for the GIL at every torch op:
each op releases it and takes it back, against the event loop's thread parsing requests.
Measured on 2 cores (784-1024-1024-10 at 64 draws, 16-row batches, one thread per batch):
the model's own CPU time per batch went from 20.6 to 28.3 ms while another thread of the
process held the GIL 30% of the time. A process has a GIL of its own, and a batch crosses
the pipe as a few kilobytes: its inputs one way, its summaries the other.

Messages are length-prefixed JSON headers followed by safetensors bytes: nothing is pickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import struct
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import orjson
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from service.registry import LoadedModel, load_version
from service.settings import Settings
from training.calibration import summarize
from training.summaries import Summary

log = logging.getLogger("credence.workers")

# (num_samples, credible levels, the batch rows of the group's requests or None for all)
Group = tuple[int, tuple[float, ...], list[int] | None]


def summarize_batch(
    loaded: LoadedModel, x: torch.Tensor, seeds: torch.Tensor, groups: Sequence[Group]
) -> list[Summary]:
    """One model call for the batch, then the summaries of each group of its rows.

    A group that asked for fewer samples than the batch's largest takes the first draws,
    which are the draws it would get alone."""
    device, spec = loaded.device, loaded.spec
    n_max = max(n for n, _, _ in groups)
    draws = loaded.model.sample(x.to(device), n_max, seeds.to(device))
    summaries = []
    for n, levels, rows in groups:
        selected = draws if n == n_max else draws[:n]
        if rows is not None:
            selected = selected[:, torch.tensor(rows, device=device)]
        # the spec's calibration (if any) is applied here
        summary = summarize(spec.task, selected, levels, spec.calibration)
        if device.type != "cpu":
            summary = {key: value.cpu() for key, value in summary.items()}
        summaries.append(summary)
    return summaries


class WorkerError(RuntimeError):
    """A worker process failed to load its model, failed on a batch, or died."""


class WorkerProcess:
    """One process computing a model version's batches, one at a time, over a pipe."""

    def __init__(self, loaded: LoadedModel, settings: Settings, name: str):
        self.loaded, self.settings, self.name = loaded, settings, name
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._ready = False

    def start(self) -> None:
        """Spawn the process (a fresh interpreter: forking a process that runs threads and
        torch is unsafe); it loads the model from its checkpoint, as the server did."""
        self.stop()  # a predecessor that died or could not load
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        args = (child, str(self.loaded.path), self.loaded.device, self.settings)
        self._process = context.Process(target=_serve, args=args, name=self.name, daemon=True)
        self._process.start()
        child.close()

    async def ready(self) -> None:
        """Wait until the process has loaded its model (WorkerError if it could not, and the
        next call starts another); one that died since is started again."""
        if self._process is not None and not self._process.is_alive():
            self.stop()
        if self._process is None:
            self.start()
        if not self._ready:
            try:
                await self._receive()
            except WorkerError:
                self.stop()
                raise
            self._ready = True

    async def compute(
        self, x: torch.Tensor, seeds: torch.Tensor, groups: Sequence[Group]
    ) -> list[Summary]:
        """`summarize_batch` in the process (restarted first if it had died)."""
        await self.ready()
        header = {"groups": [[n, list(levels), rows] for n, levels, rows in groups]}
        try:
            self._conn.send_bytes(_frame(header, {"x": x.contiguous(), "seeds": seeds}))
        except OSError:  # it died since it was last seen alive
            raise self._died() from None
        try:
            tensors = await self._receive()
        except asyncio.CancelledError:  # its answer would be read as the next batch's
            self.stop()
            raise
        summaries: list[Summary] = [{} for _ in groups]
        for key, value in tensors.items():  # "{group}.{field}"
            index, name = key.split(".", 1)
            summaries[int(index)][name] = value
        return summaries

    async def _receive(self) -> dict[str, torch.Tensor]:
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = self._conn.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            header, tensors = _unframe(self._conn.recv_bytes())
        except (EOFError, OSError):
            raise self._died() from None
        if "error" in header:
            raise WorkerError(header["error"])
        return tensors

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _died(self) -> WorkerError:
        code = self.stop()
        how = f"was killed by signal {-code}" if code and code < 0 else f"exited with code {code}"
        return WorkerError(f"{self.name} {how}; it restarts for the next batch")

    def stop(self) -> int | None:
        """Kill the process and return its exit code: it holds nothing to flush, and a batch
        it is computing (or a process stopped by a signal) must not hold up a shutdown."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        code, process, self._process, self._ready = None, self._process, None, False
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join()
            code = process.exitcode
        return code


def _frame(header: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    head = orjson.dumps(header)
    return struct.pack("<I", len(head)) + head + (save_tensors(tensors) if tensors else b"")


def _unframe(message: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    (size,) = struct.unpack_from("<I", message)
    header = orjson.loads(message[4 : 4 + size])
    body = message[4 + size :]
    return header, (load_tensors(body) if body else {})


def _serve(conn: Connection, path: str, device: torch.device, settings: Settings) -> None:
    """The worker process: load the model, then answer batches until the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops us
    torch.set_num_threads(settings.torch_threads or 1)
    try:
        loaded = load_version(Path(path), device, settings)
    except Exception as exc:
        conn.send_bytes(_frame({"error": f"loading {path}: {type(exc).__name__}: {exc}"}))
        return
    conn.send_bytes(_frame({}))
    with torch.inference_mode():
        while True:
            try:
                header, tensors = _unframe(conn.recv_bytes())
            except (EOFError, OSError):  # the server closed the pipe or exited
                return
            groups = [(n, tuple(levels), rows) for n, levels, rows in header["groups"]]
            try:
                summaries = summarize_batch(loaded, tensors["x"], tensors["seeds"], groups)
                fields = {
                    f"{i}.{name}": value.contiguous()
                    for i, summary in enumerate(summaries)
                    for name, value in summary.items()
                }
                reply = _frame({}, fields)
            except Exception as exc:
                reply = _frame({"error": f"{type(exc).__name__}: {exc}"})
            with contextlib.suppress(OSError):
                conn.send_bytes(reply)
