"""Stacked posteriors trained by several processes: `torchrun --nproc-per-node K -m training.cli`.

A deep ensemble's members and an SG-MCMC run's chains only meet in a few places, so each of
the K processes of a torchrun job trains a contiguous block of them, and the checkpoint is the
one a single process would write with the same seed, to the bit:

- Every process builds the whole stacked model from the same seed, so member m starts from
  the same weights whichever process trains it; an SG-MCMC chain's noise comes from its own
  generator, seeded by (seed, chain) (`unit_seed`). The minibatch order is the seed's.
- A process runs forward and backward on its own members' slices of the stacked tensors,
  and the optimizer over the whole tensors: every element then takes the same arithmetic
  path as in one process (the fused Adam kernel treats a tensor's vectorized body and its
  tail differently, so a tensor of fewer members would round differently).
- What members share is computed from every member's part in member order: a learned
  homoscedastic noise gets one copy per member whose gradients are gathered and summed
  (`shared`), the recorded loss is the mean over all members, and the early-stopping score
  is the log-likelihood of every member's validation draws, with rank 0's score deciding.
- At the end every process holds every member (`Spread.gather`); rank 0 evaluates and
  writes the checkpoint, the others write nothing.

One process is the same code with a spread of one, where a gather is the identity. Methods
that fit one network (mc_dropout, variational, laplace) have nothing to split: asked to run
on more than one process they stop with an error before training.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of processes torchrun started (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend() -> str:
    """Collectives on CPU tensors go over gloo (training runs on the CPU); CUDA tensors, where a
    build has NCCL, over NCCL."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


@dataclass(frozen=True)
class Spread:
    """This process's place in the job: `rank` of `world_size` processes."""

    rank: int = 0
    world_size: int = 1

    def block(self, units: int) -> slice:
        """This process's contiguous block of `units` members (or chains); the first
        `units % world_size` processes take one more."""
        base, extra = divmod(units, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def gather(self, local: torch.Tensor, units: int) -> torch.Tensor:
        """Every process's block [m_r, ...] -> all `units` [units, ...] in member order, on
        every process."""
        if self.world_size == 1:
            return local
        size = math.ceil(units / self.world_size)
        padded = local.new_zeros(size, *local.shape[1:])
        padded[: len(local)] = local
        blocks = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(blocks, padded.contiguous())
        parts = [
            blocks[r][: _length(Spread(r, self.world_size).block(units))]
            for r in range(self.world_size)
        ]
        return torch.cat(parts)

    def agree(self, value: float) -> float:
        """Rank 0's `value` on every process: for decisions all must take alike (early
        stopping), even if a score differed in its last bit."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(tensor, src=0)
        return float(tensor[0])


SINGLE = Spread()


def _length(block: slice) -> int:
    return block.stop - block.start


def unit_seed(seed: int, unit: int) -> int:
    """The seed of member or chain `unit`'s own generator: a function of (seed, unit) alone,
    so it is the same whichever process runs the unit."""
    entropy = [seed % 2**64, unit]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


class _Shared(torch.autograd.Function):
    """`param` repeated for each member of a block; backward sums every member's gradient."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, count: int, units: int, spread: Spread) -> torch.Tensor:
        ctx.units, ctx.spread = units, spread
        return param.detach().expand(count, *param.shape).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.spread.gather(grad.contiguous(), ctx.units).sum(0), None, None, None


def shared(param: torch.Tensor, block: slice, units: int, spread: Spread) -> torch.Tensor:
    """A parameter all `units` members share, one copy per member of `block` ([m, ...]).

    Its gradient is the sum of every member's, taken over the gathered [units, ...] per-member
    gradients in member order, so it has the same bits however the members are spread."""
    return _Shared.apply(param, _length(block), units, spread)


@contextlib.contextmanager
def from_environment() -> Iterator[Spread]:
    """The job torchrun describes in the environment (its process group joined for the
    block), or a spread of one outside torchrun."""
    size = world_size()
    if size == 1:
        yield SINGLE
        return
    dist.init_process_group(backend())
    try:
        yield Spread(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()
