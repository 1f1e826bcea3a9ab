"""Elementwise functions whose value for an element does not depend on where it sits.

PyTorch's CPU kernels compute the body of a tensor with vector instructions and its last few
elements with scalar code. For some functions the two disagree in the last bit (torch's gelu
and softplus among them, on the x86 CPUs these were checked on), so an element's value would
change with the length of the tensor it is in, and a request's draws with the batch it was
served in. The functions here are written with operations whose vector and scalar paths
agree (exp, log1p, erf, max); `tests/test_pointwise.py` checks each one on the machine it
runs on.
"""

from __future__ import annotations

import math

import torch

_SQRT_HALF = 1 / math.sqrt(2)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x), without overflow for large x."""
    return torch.log1p(torch.exp(-x.abs())) + x.clamp_min(0)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """x Phi(x), the exact (erf) form of torch's default gelu."""
    return x * (0.5 + 0.5 * torch.erf(x * _SQRT_HALF))


def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


def tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


ACTIVATIONS = {"relu": relu, "tanh": tanh, "gelu": gelu}
# Inference on fresh tensors: no autograd, so no need for a new output per activation
# (gelu has no in-place form)
IN_PLACE_ACTIVATIONS = {"relu": torch.relu_, "tanh": torch.tanh_, "gelu": gelu}
