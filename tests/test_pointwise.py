"""Elementwise functions on the sampling path give an element the same bits wherever it sits.

A request's draws pass through activations and the likelihood head as part of a batch
tensor; an element's value must not depend on the tensor's length or on its position in it
(vectorized bodies against scalar tails), or the draws would depend on the batch.
"""

from __future__ import annotations

import pytest
import torch

from training import pointwise

POSITION_FREE = {
    "softplus": pointwise.softplus,
    "gelu": pointwise.gelu,
    "relu": pointwise.relu,
    "tanh": pointwise.tanh,
    "exp": torch.exp,
    "erfc": torch.special.erfc,
    "log": lambda t: torch.log(t.abs() + 1e-3),
}


def positions(fn, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fn over one long tensor, and over each of its first elements alone and in runs of 7."""
    x = torch.linspace(-30, 30, 4099, dtype=dtype)[torch.randperm(4099, generator=GEN)]
    whole = fn(x)[:700]
    alone = torch.cat([fn(x[i : i + 1]) for i in range(700)])
    runs = torch.cat([fn(x[i : i + 7]) for i in range(0, 700, 7)])
    return whole, torch.stack([alone, runs])


GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(POSITION_FREE))
def test_an_element_gets_the_same_bits_in_any_tensor(name: str, dtype: torch.dtype) -> None:
    whole, parts = positions(POSITION_FREE[name], dtype)
    assert torch.equal(parts[0], whole) and torch.equal(parts[1], whole)


def test_the_replacements_compute_the_functions_they_replace() -> None:
    """To float64 rounding: a few ulps (torch's softplus returns x itself above 20, which is
    off by e^-20, so log(1 + e^x) is compared with logaddexp instead)."""
    x = torch.linspace(-30, 30, 4099, dtype=torch.float64)
    expected = torch.logaddexp(x, torch.zeros_like(x))
    torch.testing.assert_close(pointwise.softplus(x), expected, rtol=1e-15, atol=1e-300)
    gelu = torch.nn.functional.gelu(x)
    torch.testing.assert_close(pointwise.gelu(x), gelu, rtol=1e-13, atol=1e-16)


def test_softplus_does_not_overflow() -> None:
    x = torch.tensor([-1e4, 0.0, 1e4])
    torch.testing.assert_close(pointwise.softplus(x), torch.tensor([0.0, 0.6931472, 1e4]))
