"""The requests of a batch: a request's draws are computed from its own rows alone.

A batch's rows are those of consecutive requests, `sizes` rows each. Matrix-product
libraries choose a kernel, and with it the order in which a product's terms are added, by the
shape of the matrices and the alignment of their memory: on x86 MKL one row multiplied alone
takes another path than the same row among three, or among a hundred. So a row's product is
the same bits in two batches only if it comes from the same call. When the caller gives the
sizes, every product a request's draws go through is therefore a call over that request's
rows only, with the same shape and the same alignment (ALIGN_BYTES) alone and in any batch:
a seeded request gets the same bits whatever it is batched with, on any device whose library
is deterministic for one call, without depending on which kernel the library picks. The
price is a call per request and layer, where the weights are packed again each time.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

# Every product's operands start at a multiple of this many bytes from an allocation (CPU
# allocations are 64-byte aligned, CUDA ones more): the widest vector a CPU loads at once.
ALIGN_BYTES = 64


def runs(seeds: torch.Tensor) -> list[int]:
    """Sizes of the runs of equal consecutive seeds: the requests when none are given."""
    values = seeds.detach().to("cpu", torch.int64).numpy()
    if values.size == 0:
        return []
    edges = np.flatnonzero(values[1:] != values[:-1]) + 1
    return np.diff(np.concatenate([[0], edges, [values.size]])).tolist()


def offsets(sizes: Sequence[int]) -> list[int]:
    """Where each request starts, and where the last one ends."""
    return [0, *itertools.accumulate(sizes)]


def row_multiple(widths: Sequence[int], element_size: int) -> int:
    """The fewest rows q such that q rows of any of `widths` fill whole ALIGN_BYTES blocks:
    blocks of a multiple of q rows keep every block's first row aligned."""
    q = 1
    for width in widths:
        q = math.lcm(q, ALIGN_BYTES // math.gcd(width * element_size, ALIGN_BYTES))
    return q


def check_sizes(sizes: Sequence[int], rows: int) -> None:
    if any(size < 1 for size in sizes) or sum(sizes) != rows:
        raise ValueError(f"request sizes {list(sizes)} must be positive and sum to {rows} rows")


class RequestRows:
    """A batch's requests in one tensor with every request's rows starting aligned: request i
    takes `padded[i]` rows (its own, then zero rows up to a multiple of `q`, so that its
    first row sits on an ALIGN_BYTES boundary at every width `q` was made for) from row
    `starts[i]`. A product over one request's rows then has the shape and alignment it has
    alone."""

    def __init__(self, sizes: tuple[int, ...], q: int, device: torch.device):
        def index(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values.astype(np.int64)).to(device)

        r = np.asarray(sizes)
        self.sizes = list(sizes)
        self.padded = (-(-r // q) * q).tolist()
        self.starts = offsets(self.padded)[:-1]
        self.request_starts = index(np.asarray(offsets(sizes)[:-1]))  # in the unpadded batch
        real = np.repeat(np.asarray(self.starts) - np.asarray(offsets(sizes)[:-1]), r)
        self.real = index(real + np.arange(r.sum()))  # each batch row's row here
        self._scatter = None if self.padded == self.sizes else self.real

    def pad(self, h: torch.Tensor) -> torch.Tensor:
        """Batch rows [B, ...] -> this layout [sum(padded), ...]."""
        if self._scatter is None:
            return h
        padded = h.new_zeros(sum(self.padded), *h.shape[1:])
        padded[self._scatter] = h
        return padded

    def linear(
        self,
        h: torch.Tensor,
        weight_t: torch.Tensor,
        bias: torch.Tensor | None,
        alpha: float = 1.0,
    ) -> torch.Tensor:
        """bias + alpha h @ weight_t in one call per request, into a fresh tensor."""
        out = h.new_empty(h.shape[0], weight_t.shape[1])
        for rows, into in zip(h.split(self.padded), out.split(self.padded), strict=True):
            if bias is None:
                torch.mm(rows, weight_t, out=into)
            else:
                torch.addmm(bias, rows, weight_t, alpha=alpha, out=into)
        return out


def aligned_blocks(
    like: torch.Tensor, shapes: Sequence[tuple[int, ...]]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One fresh flat tensor and, in it, a contiguous block of each shape, every block starting
    on an ALIGN_BYTES boundary (the gaps between them hold garbage that no block reads):
    elementwise work runs over the whole tensor at once, a product into each block."""
    unit = max(1, ALIGN_BYTES // like.element_size())
    sizes = [math.prod(shape) for shape in shapes]
    spans = [-(-size // unit) * unit for size in sizes]
    flat = like.new_empty(sum(spans))
    parts = flat.split(spans)
    return flat, [
        part[:size].view(shape) for part, size, shape in zip(parts, sizes, shapes, strict=True)
    ]


@functools.lru_cache(maxsize=256)
def request_rows(sizes: tuple[int, ...], q: int, device: torch.device) -> RequestRows:
    """Layouts are a function of the batch's shape alone, and a server sees few shapes."""
    return RequestRows(sizes, q, device)
