"""CUDA graphs for MC-dropout draws (CREDENCE_CUDA_GRAPHS).

A batch's draws are dozens of small kernels per layer (the dropout masks' hash alone is a
dozen); launched one at a time, a small model's batch costs the host more than the GPU. A
CUDA graph records them once and replays them in one launch. A graph replays fixed shapes
at fixed addresses, so a batch is copied into static buffers sized for a bucket of rows
(the next power of two) and draws (the next power of two too: draw i of a seed depends only
on the seed and i, so a request takes the first n draws of a larger bucket and gets exactly
the draws it would get alone), and the graph of each (rows, draws) bucket is recorded the
first time it is needed. The padding rows compute draws nobody reads; rows never mix (each
has its own seed and its own row of every product).

A graph's products span the whole bucket, so their kernels (and the order in which they add
a product's terms) depend on the bucket, not on the request: a request's draws equal those of
the eager path, and of itself in another batch, to float rounding rather than to the bit.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from training.posteriors.mc_dropout import MCDropoutMLP

MIN_BUCKET = 8
MAX_GRAPHS = 16  # least recently used first out: each holds its activations' memory

# records `fn(*args)` and returns (replay, output): after replay(), output holds fn's result
# for what the args hold then
Capture = Callable[..., tuple[Callable[[], None], torch.Tensor]]


def bucket(size: int) -> int:
    """The next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (size - 1).bit_length())


def capture_cuda(
    fn: Callable[..., torch.Tensor], *args: object
) -> tuple[Callable[[], None], torch.Tensor]:
    """Record `fn(*args)` in a CUDA graph, after warm-up runs on a side stream (the
    documented recipe: lazily made state, such as cuBLAS workspaces and the generator's
    counter tables, must exist before the recording)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(*args)
    return graph.replay, output


@dataclass
class _Graph:
    x: torch.Tensor  # [rows bucket, *input shape]
    seeds: torch.Tensor  # [rows bucket]
    replay: Callable[[], None]
    draws: torch.Tensor  # [draws bucket, rows bucket, *out]


class GraphedSampler:
    """`MCDropoutMLP.sample` replayed from one recorded graph per (rows, draws) bucket."""

    def __init__(self, model: MCDropoutMLP, max_rows: int, capture: Capture = capture_cuda):
        self.model, self.max_rows, self.capture = model, max_rows, capture
        self._graphs: collections.OrderedDict[tuple[int, int], _Graph] = collections.OrderedDict()

    @property
    def task(self) -> str:
        return self.model.task

    @torch.inference_mode()
    def sample(
        self,
        x: torch.Tensor,
        n: int,
        seeds: torch.Tensor,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The bucket's graph replayed (the requests' `sizes` do not change a graph)."""
        rows = x.shape[0]
        if bucket(rows) > bucket(self.max_rows):  # one request larger than any batch
            return self.model.sample(x, n, seeds, sizes)
        graph = self._graph(bucket(rows), bucket(n), x)
        graph.x[:rows].copy_(x)
        graph.seeds[:rows].copy_(seeds)
        graph.replay()
        # the next replay overwrites the static output
        return graph.draws[:n, :rows].clone()

    def _graph(self, rows: int, n: int, like: torch.Tensor) -> _Graph:
        key = (rows, n)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        x = torch.zeros((rows, *like.shape[1:]), dtype=like.dtype, device=like.device)
        seeds = torch.zeros(rows, dtype=torch.int64, device=like.device)
        replay, draws = self.capture(self.model.sample, x, n, seeds)
        self._graphs[key] = _Graph(x, seeds, replay, draws)
        return self._graphs[key]

    def release(self) -> None:
        """Drop the graphs and the weights (service.workers.release_weights)."""
        self._graphs.clear()
        self.model.to(torch.device("meta"))
