"""Batch workers: processes that each compute one model version's batches, one at a time.

A batch computed on a thread of the server's process pays for the GIL at every torch op:
each op releases it and takes it back, against the event loop's thread parsing requests.
Measured on 2 cores (784-1024-1024-10 at 64 draws, 16-row batches, one thread per batch):
the model's own CPU time per batch went from 20.6 to 28.3 ms while another thread of the
process held the GIL 30% of the time. A process has a GIL of its own, and a batch crosses a
socket as a few kilobytes: its inputs one way, its summaries the other.

A message is its length (8 bytes), its JSON header's length (4 bytes), the header, then
safetensors bytes: nothing is pickled. The server's end is an asyncio stream, so a large
batch never blocks the event loop on a full socket buffer.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import signal
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

import orjson
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from service.cuda_graphs import GraphedSampler
from service.onnx_backend import OnnxSampler
from service.registry import LoadedModel, load_version
from service.settings import Settings
from training import segments
from training.attributions import Explain, attribute, summarize_attributions
from training.calibration import summarize
from training.summaries import Summary, per_draw

# (num_samples, credible levels or None for the draws themselves (:sample), the batch rows
# of the group's requests or None for all, the rows of each of its requests or None: see
# the sampler contract, training.model; what to attribute, for :explain, or None)
Group = tuple[int, tuple[float, ...] | None, list[int] | None, list[int] | None, Explain | None]


@torch.inference_mode()
def summarize_batch(
    loaded: LoadedModel, x: torch.Tensor, seeds: torch.Tensor, groups: Sequence[Group]
) -> list[Summary]:
    """One model call per group of requests that share (num_samples, levels), usually the
    whole batch, then the group's summaries. With its requests' sizes the model computes
    each request's draws as it would alone (training.segments). In inference mode the
    summaries' many small ops skip autograd's bookkeeping."""
    device, spec = loaded.device, loaded.spec
    x, seeds = to_device(x, device), to_device(seeds, device)
    summaries, features = [], []
    embeds = spec.ood is not None and spec.ood.needs_features
    for n, levels, rows, sizes, explain in groups:
        if rows is not None:
            index = torch.tensor(rows, device=device)
            group_x, group_seeds = x[index], seeds[index]
        else:
            group_x, group_seeds = x, seeds
        if explain is not None:
            summaries.append(explain_group(loaded, group_x, n, group_seeds, levels, explain))
            features.append(None)
            continue
        draws = loaded.model.sample(group_x, n, group_seeds, sizes)
        if levels is None:  # the model's own draws: a calibration shapes summaries only
            summaries.append(per_draw(spec.task, draws))
        else:  # the spec's calibration (if any) is applied here
            summaries.append(summarize(spec.task, draws, levels, spec.calibration))
        # a feature-density OOD score: one deterministic pass of the torch module (whatever
        # backend draws), each request's rows on their own as its draws are
        wanted = embeds and levels is not None
        features.append(loaded.module.embed_inputs(group_x, sizes) if wanted else None)
    summaries = to_host(summaries, device)
    if spec.ood is not None:  # once per group, for the metrics and every protocol
        for (_, levels, _, _, explain), summary, rows_features in zip(
            groups, summaries, features, strict=True
        ):
            if levels is not None and explain is None:
                summary.update(spec.ood.fields(summary, rows_features))
    return summaries


def explain_group(
    loaded: LoadedModel,
    x: torch.Tensor,
    n: int,
    seeds: torch.Tensor,
    levels: tuple[float, ...],
    explain: Explain,
) -> Summary:
    """A group's attributions summarized across draws (training.attributions), and for a
    variational model its first layer's posterior signal-to-noise per input, on every row
    (a request's rows are sliced like any summary's). Each request's per-draw attributions
    are made and summarized on their own: a request's fit the cap protocol.MAX_ATTRIBUTIONS
    sets, a group's need not."""
    module = loaded.module
    parts = [
        summarize_attributions(attribute(module, x[a:b], n, seeds[a:b], explain), levels, explain)
        for a, b in itertools.pairwise(segments.offsets(segments.runs(seeds)))
    ]
    summary = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    if hasattr(module, "input_snr"):
        snr = module.input_snr().double()
        summary["posterior_snr"] = snr.unsqueeze(0).expand(x.shape[0], -1).contiguous()
    return summary


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To CUDA it is copied from page-locked memory without
    waiting: a copy from pageable memory goes through a staging buffer and holds the host
    until the device has it, and the model's kernels can queue behind the copy instead."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_host(summaries: list[Summary], device: torch.device) -> list[Summary]:
    """Summaries computed on `device`, on the CPU. From CUDA every field is copied without
    waiting (into page-locked memory), then the host waits once for all of them, where a
    plain copy per field would wait for each."""
    if device.type != "cuda":
        return summaries
    host = [{k: v.to("cpu", non_blocking=True) for k, v in s.items()} for s in summaries]
    torch.cuda.synchronize(device)
    return host


def release_weights(model: object) -> None:
    """Drop the server's copy of a model whose batches its worker processes compute.

    Each worker loads its own from the checkpoint (again when it is restarted), so the
    server's would only hold the weights once more: a multi-gigabyte model would take its
    size times the workers plus one. A torch module moves to the meta device, where it keeps
    its shapes; an onnxruntime sampler drops its session, a graphed one its graphs and module.
    Computing with any of them fails loudly.
    """
    if isinstance(model, torch.nn.Module):
        model.to(torch.device("meta"))
    elif isinstance(model, OnnxSampler | GraphedSampler):
        model.release()


class WorkerError(RuntimeError):
    """A worker process failed to load its model, failed on a batch, or died."""


class WorkerProcess:
    """One process computing a model version's batches, one at a time, over a socket."""

    def __init__(self, loaded: LoadedModel, settings: Settings, name: str):
        self.loaded, self.settings, self.name = loaded, settings, name
        self._process: multiprocessing.process.BaseProcess | None = None
        self._socket: socket.socket | None = None
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def start(self) -> None:
        """Spawn the process (a fresh interpreter: forking a process that runs threads and
        torch is unsafe); it loads the model from its checkpoint, as the server did."""
        self.stop()  # a predecessor that died or could not load
        context = multiprocessing.get_context("spawn")
        self._socket, child = socket.socketpair()
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
        if self._stream is None:
            self._stream = await asyncio.open_connection(sock=self._socket)
            try:
                await self._receive()
            except WorkerError:
                self.stop()
                raise

    async def compute(
        self, x: torch.Tensor, seeds: torch.Tensor, groups: Sequence[Group]
    ) -> list[Summary]:
        """`summarize_batch` in the process (restarted first if it had died)."""
        await self.ready()
        header = {
            "groups": [
                [*group[:4], None if group[4] is None else group[4].to_json()] for group in groups
            ]
        }
        try:
            writer = self._stream[1]
            writer.write(_encode(header, {"x": x.contiguous(), "seeds": seeds}))
            await writer.drain()
            tensors = await self._receive()
        except asyncio.CancelledError:  # its answer would be read as the next batch's
            self.stop()
            raise
        except (ConnectionError, asyncio.IncompleteReadError):
            raise self._died() from None
        summaries: list[Summary] = [{} for _ in groups]
        for key, value in tensors.items():  # "{group}.{field}"
            index, name = key.split(".", 1)
            summaries[int(index)][name] = value
        return summaries

    async def _receive(self) -> dict[str, torch.Tensor]:
        reader = self._stream[0]
        try:
            (size,) = struct.unpack("<Q", await reader.readexactly(8))
            header, tensors = _decode(await reader.readexactly(size))
        except (ConnectionError, asyncio.IncompleteReadError):
            raise self._died() from None
        if "error" in header:
            raise WorkerError(header["error"])
        return tensors

    def _died(self) -> WorkerError:
        code = self.stop()
        how = f"was killed by signal {-code}" if code and code < 0 else f"exited with code {code}"
        return WorkerError(f"{self.name} {how}; it restarts for the next batch")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self) -> int | None:
        """Kill the process and return its exit code: it holds nothing to flush, and a batch
        it is computing (or a process stopped by a signal) must not hold up a shutdown."""
        if self._stream is not None:
            self._stream[1].close()
        elif self._socket is not None:
            self._socket.close()
        self._stream = self._socket = None
        code, process, self._process = None, self._process, None
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join()
            code = process.exitcode
        return code


def _encode(header: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    head = orjson.dumps(header)
    body = save_tensors(tensors) if tensors else b""
    return struct.pack("<QI", 4 + len(head) + len(body), len(head)) + head + body


def _decode(message: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """A message after its 8-byte length."""
    (size,) = struct.unpack_from("<I", message)
    header = orjson.loads(message[4 : 4 + size])
    body = message[4 + size :]
    return header, (load_tensors(body) if body else {})


def _serve(sock: socket.socket, path: str, device: torch.device, settings: Settings) -> None:
    """The worker process: load the model, then answer batches until the server is gone."""
    # Ctrl-C, or a SIGTERM sent to the whole process group, stops the server, which answers
    # what is in flight and then stops its workers; a worker whose server is gone sees its
    # socket close and exits.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    torch.set_num_threads(settings.torch_threads or 1)
    try:
        loaded = load_version(Path(path), device, settings)
    except Exception as exc:
        sock.sendall(_encode({"error": f"loading {path}: {type(exc).__name__}: {exc}"}))
        return
    sock.sendall(_encode({}))
    while (message := _receive_blocking(sock)) is not None:
        header, tensors = _decode(message)
        groups = [
            (
                n,
                None if levels is None else tuple(levels),
                rows,
                sizes,
                None if explain is None else Explain.from_json(explain),
            )
            for n, levels, rows, sizes, explain in header["groups"]
        ]
        try:
            summaries = summarize_batch(loaded, tensors["x"], tensors["seeds"], groups)
            fields = {
                f"{i}.{name}": value.contiguous()
                for i, summary in enumerate(summaries)
                for name, value in summary.items()
            }
            reply = _encode({}, fields)
        except Exception as exc:
            reply = _encode({"error": f"{type(exc).__name__}: {exc}"})
        try:
            sock.sendall(reply)
        except OSError:  # the server is gone
            return


def _receive_blocking(sock: socket.socket) -> bytes | None:
    """One message, or None when the server closed its end or exited."""
    head = _read_exactly(sock, 8)
    return None if head is None else _read_exactly(sock, struct.unpack("<Q", head)[0])


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        try:
            n = sock.recv_into(view[got:])
        except OSError:
            return None
        if n == 0:
            return None
        got += n
    return bytes(buffer)
