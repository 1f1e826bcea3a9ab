"""Counter-based random numbers: a draw is a pure function of (seed, sample index, stream).

Every posterior draw of a request depends only on the request's seed, never on what it was
batched with, on the device, or on the order of calls. That is what lets the server batch
requests that carry different seeds into one vectorized pass and still return, for a seeded
request, exactly the numbers it would get alone.

The hash is a 32-bit integer mixer. Keys (a few per seed and draw) are held in int64 in
[0, 2**32), computed in numpy on the host (on an accelerator, on the device); the large
per-element tensors are computed in int32 with wrapping multiplication and masked (logical)
shifts, in place: int32 vectorizes where int64 multiplication does not, and this is the
serving hot path (dropout masks for every draw of every request).
"""

from __future__ import annotations

import functools
from typing import TypeVar

import numpy as np
import torch

Word = TypeVar("Word", torch.Tensor, np.ndarray, int)

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x61C88647  # 2**32 / phi
_M1, _M2 = 0x21F0AAAD, 0x735A2D97  # both below 2**31: exact in int64, valid int32 literals


def mix32(x: Word) -> Word:
    """Bijective avalanche mixer on values in [0, 2**32) held in int64 (a tensor or a numpy
    array), or in one Python integer, for constants that are mixed once."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 15)


@functools.lru_cache(maxsize=256)
def _mixed_counters(size: int, device: torch.device) -> torch.Tensor:
    """mix32(i + golden) for i in 0..size-1 (int64): what `combine` folds in for counter i,
    the same in every call, so it is computed once per size and device. Callers never write
    to it."""
    with torch.inference_mode(False):  # usable inside and outside inference mode
        counters = torch.arange(size, dtype=torch.int64, device=device)
        return mix32((counters + _GOLDEN) & _MASK32)


@functools.lru_cache(maxsize=256)
def _salt32(size: int, device: torch.device) -> torch.Tensor:
    """`_mixed_counters` as int32 bit patterns."""
    with torch.inference_mode(False):
        return _as_int32(_mixed_counters(size, device))


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """`mix32` in place on int32 bit patterns (same bits; >> is arithmetic, hence the masks).

    One scratch tensor serves the three shifts: fresh large tensors cost page faults.
    """
    shifted = torch.empty_like(x)
    for shift, multiplier in ((16, _M1), (15, _M2), (15, None)):
        torch.bitwise_right_shift(x, shift, out=shifted)
        x.bitwise_xor_(shifted.bitwise_and_((1 << (32 - shift)) - 1))
        if multiplier is not None:
            x.mul_(multiplier)
    return x


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 2**32) (int64) -> the same 32 bits as int32."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def combine(key: Word, value: Word) -> Word:
    """Fold `value` (of key's kind, or a Python integer) into `key` so that different values
    give unrelated keys.

    `value` is mixed before it is broadcast against `key`, so a small counter vector costs
    one mix per element of the result, not two.
    """
    return mix32(key ^ mix32((value + _GOLDEN) & _MASK32))


def _bits32(keys: torch.Tensor, size: int) -> torch.Tensor:
    """`bits` as int32 bit patterns, without the int64 round trip."""
    return _mix32_(_as_int32(keys).unsqueeze(-1) ^ _salt32(size, keys.device))


def bits(keys: torch.Tensor, size: int) -> torch.Tensor:
    """Uniform 32-bit integers, shape [*keys.shape, size]: element i of key k is hash(k, i)."""
    return _bits32(keys, size).to(torch.int64) & _MASK32


def bernoulli(keys: torch.Tensor, size: int, p: float) -> torch.Tensor:
    """Booleans that are True with probability `p` (to within 2**-17), two per hash.

    Element 2j compares the low 16 bits of hash(k, j) with round(p * 2**16), element 2j + 1
    the high 16 bits: the halves of a strong 32-bit hash are independent, and hashing is
    most of the cost of a dropout mask. (The 16-bit view relies on a little-endian device.)
    """
    return bernoulli_bits(keys, size, p) != 0


def bernoulli_bits(keys: torch.Tensor, size: int, p: float) -> torch.Tensor:
    """`bernoulli` as int32 words of all ones (True) or zeros (False).

    ANDed with the bits of float32 activations this applies a dropout mask in place, with
    no bool-to-float conversion or multiply: the serving hot path of MC dropout.
    """
    threshold = round(p * (1 << 16))
    halves = _halves(_bits32(keys, (size + 1) // 2), size, keys.device.type == "cpu")
    return halves.sub_(threshold).bitwise_right_shift_(31)  # u < t iff u - t < 0


def _halves(words: torch.Tensor, size: int, unsigned: bool) -> torch.Tensor:
    """The first `size` 16-bit halves of int32 words, each as an int32 in [0, 2**16).

    uint16 halves widen without sign extension, a pass fewer than int16 halves and a mask
    (31 rows x 100 draws x 50 units: 54 to 42 us on the CPU); unsigned 16-bit tensors have
    few kernels off the CPU, so other devices take the signed view. Both are the same bits."""
    if unsigned:
        return words.view(torch.uint16)[..., :size].to(torch.int32)
    return words.view(torch.int16)[..., :size].to(torch.int32).bitwise_and_(0xFFFF)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Reduce 63-bit seeds to 32-bit keys using both halves of the seed."""
    if seeds.device.type == "cpu":
        return torch.from_numpy(_seed_keys(seeds.detach().to(torch.int64).numpy()))
    return _seed_keys(seeds.to(torch.int64))


def draw_keys(seeds: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """Keys [n, *seeds.shape] for draws 0..n-1 of each seed within a named stream.

    On the CPU keys are computed in numpy: they are a few thousand numbers made by ~50 small
    ops, which cost less than half as much in numpy as in torch (31 seeds, 100 draws: 89 to
    38 us alone; the small serving benchmark model's 31-row batch, 0.506 to 0.486 ms). The
    server pays this for every batch and dropout layer. On an accelerator they are computed
    where the seeds are: a round trip through the host would wait for the device at every
    dropout layer. Both give the same bits.
    """
    counters = _mixed_counters(n, seeds.device)
    if seeds.device.type == "cpu":
        keys = _draw_keys(seeds.detach().to(torch.int64).numpy(), counters.numpy(), stream)
        return torch.from_numpy(keys)
    return _draw_keys(seeds.to(torch.int64), counters, stream)


def _draw_keys(seeds: Word, counters: Word, stream: int) -> Word:
    """`draw_keys` on int64 seeds and `_mixed_counters(n)`, both numpy or both torch."""
    per_seed = combine(_seed_keys(seeds), stream)
    return mix32(per_seed[None] ^ counters.reshape(-1, *([1] * seeds.ndim)))


def _seed_keys(seeds: Word) -> Word:
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    return combine(mix32(low), high)


def uniform(keys: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniforms in (0, 1), shape [*keys.shape, size]: element i of key k is hash(k, i)."""
    top = (_bits32(keys, size) >> 8).bitwise_and_(0xFFFFFF)  # 24 bits: exact in float32
    return (top.to(dtype) + 0.5) * (1.0 / (1 << 24))


def normal(keys: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals, shape [*keys.shape, size], by Box-Muller on two uniform streams."""
    u1 = uniform(combine(keys, 1), size, dtype)
    u2 = uniform(combine(keys, 2), size, dtype)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
