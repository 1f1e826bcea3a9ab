"""Counter-based random numbers: a draw is a pure function of (seed, sample index, stream).

Every posterior draw of a request depends only on the request's seed, never on what it was
batched with, on the device, or on the order of calls. That is what lets the server batch
requests that carry different seeds into one vectorized pass and still return, for a seeded
request, exactly the numbers it would get alone. The hash is a 32-bit integer mixer evaluated
in int64 arithmetic; its multipliers are below 2**31 so no product overflows.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x61C88647  # 2**32 / phi, below 2**31


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective avalanche mixer on values in [0, 2**32) held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def combine(key: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """Fold `value` into `key` so that different values give unrelated keys.

    `value` is mixed before it is broadcast against `key`, so a small counter vector costs
    one mix per element of the result, not two.
    """
    value = torch.as_tensor(value, dtype=torch.int64, device=key.device)
    return mix32(key ^ mix32((value + _GOLDEN) & _MASK32))


def bits(keys: torch.Tensor, size: int) -> torch.Tensor:
    """Uniform 32-bit integers, shape [*keys.shape, size]: element i of key k is hash(k, i)."""
    return combine(keys.unsqueeze(-1), torch.arange(size, dtype=torch.int64, device=keys.device))


def bernoulli(keys: torch.Tensor, size: int, p: float) -> torch.Tensor:
    """Booleans that are True with probability `p` (to within 2**-32), without floats."""
    return bits(keys, size) < round(p * 2**32)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Reduce 63-bit seeds to 32-bit keys using both halves of the seed."""
    seeds = seeds.to(torch.int64)
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    return combine(mix32(low), high)


def draw_keys(seeds: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """Keys [n, *seeds.shape] for draws 0..n-1 of each seed within a named stream."""
    draws = torch.arange(n, dtype=torch.int64, device=seeds.device)
    per_seed = combine(seed_keys(seeds), stream)
    return combine(per_seed.unsqueeze(0), draws.view(-1, *([1] * seeds.dim())))


def uniform(keys: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniforms in (0, 1), shape [*keys.shape, size]: element i of key k is hash(k, i)."""
    top = bits(keys, size) >> 8  # 24 bits: exact in float32
    return (top.to(dtype) + 0.5) * (1.0 / (1 << 24))


def normal(keys: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals, shape [*keys.shape, size], by Box-Muller on two uniform streams."""
    u1 = uniform(combine(keys, 1), size, dtype)
    u2 = uniform(combine(keys, 2), size, dtype)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
