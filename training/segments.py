"""The requests of a batch: a request's draws are computed from its own rows alone.

A batch's rows are those of consecutive requests, `sizes` rows each. Matrix-product
libraries choose a kernel, and with it the order in which a product's terms are added, by the
shape of the matrices and the alignment of their memory: on x86 MKL one row multiplied alone
takes another path than the same row among three, or among a hundred. So a row's product is
the same bits in two batches only if it comes from the same call. Every product a request's
draws go through is therefore a call over that request's rows only, with the same shape and
the same alignment (ALIGN_BYTES) alone and in any batch: a seeded request gets the same bits
whatever it is batched with, on any device whose library is deterministic for one call,
without depending on which kernel the library picks.
"""

from __future__ import annotations

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
