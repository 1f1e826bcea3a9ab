"""Posteriors stored as a finite set of weight draws: deep ensembles and SG-MCMC samples.

The M weight sets of an MLP are stacked tensors ([M, in, out] per layer), so all members
run in one batched matmul, for training (one optimizer step updates every ensemble member or
every parallel chain) and for serving. Draw s is member s mod M: a fixed set of draws needs
no randomness, so every seed gets the same, joint, draws and seed-purity holds trivially.
A request for more than M draws gets the M (`training.model.draws_used`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from training import segments
from training.model import MODEL_TYPES, PosteriorModel
from training.pointwise import ACTIVATIONS, IN_PLACE_ACTIVATIONS
from training.priors import DEFAULT_PRIOR, parse_prior


class StackedMLP(PosteriorModel):
    """arch: in_features, hidden, activation, members (M), prior (for training penalties)."""

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__(arch, likelihood, normalization)
        self.members = int(arch["members"])
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {self.members}")
        self.prior = parse_prior(arch.get("prior", DEFAULT_PRIOR))
        self.arch["prior"] = self.prior.spec
        self.activation_name = arch.get("activation", "relu")
        self.activation = ACTIVATIONS[self.activation_name]
        widths = [arch["in_features"], *arch.get("hidden", []), self.head.raw_features]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in itertools.pairwise(widths):
            bound = 1.0 / math.sqrt(a)  # nn.Linear's default initialization, per member
            self.weights.append(
                nn.Parameter(torch.empty(self.members, a, b).uniform_(-bound, bound))
            )
            self.biases.append(
                nn.Parameter(torch.empty(self.members, 1, b).uniform_(-bound, bound))
            )

    @property
    def set_size(self) -> int:
        return self.members

    def body_parameters(self) -> list[nn.Parameter]:
        """The stacked weights and biases (the head's parameters, if any, are not stacked)."""
        return [*self.weights, *self.biases]

    def run(self, h: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Inputs [B, D] or per-member [n, B, D] -> raw outputs [n, B, out] of draws 0..n-1
        (every member when n is None)."""
        weights, biases = self._draw_weights(self.members if n is None else n, h.device)
        m = weights[0].shape[0]
        if h.dim() == 2:
            h = h.unsqueeze(0).expand(m, *h.shape)
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if i < len(weights) - 1:
                h = self.activation(h)
        return h

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Every member on the same rows: [M, B, raw_features] (the loss sums members)."""
        return self.run(z)

    def _draw_weights(
        self, n: int, device: torch.device
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's weights and biases of draws 0..n-1 (draw s is member s mod M)."""
        if n <= self.members:
            return [w[:n] for w in self.weights], [b[:n] for b in self.biases]
        members = torch.arange(n, device=device) % self.members
        return [w[members] for w in self.weights], [b[members] for b in self.biases]

    def batch_draws(self, x: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        return self.run(self.normalizer.inputs(x), n)

    def request_draws(
        self, x: torch.Tensor, n: int, seeds: torch.Tensor, sizes: Sequence[int]
    ) -> torch.Tensor:
        """`run` for every request, with each member's product a call over one request's rows
        (one baddbmm per request and layer) and the activations over the whole batch: a
        request's draws are its own whatever it shares the batch with. Request i's
        activations are a block [n, r_i, width] that starts aligned, as it does alone."""
        weights, biases = self._draw_weights(n, x.device)
        d = weights[0].shape[1]
        rows = segments.request_rows(tuple(sizes), segments.row_multiple([d], 4), x.device)
        z = rows.pad(self.normalizer.inputs(x))
        h = [z[a : a + r].expand(n, r, d) for a, r in zip(rows.starts, sizes, strict=True)]
        for w, b in zip(weights[:-1], biases[:-1], strict=True):
            out, parts = segments.aligned_blocks(z, [(n, r, w.shape[2]) for r in sizes])
            for g, part in zip(h, parts, strict=True):
                torch.baddbmm(b, g, w, out=part)
            IN_PLACE_ACTIVATIONS[self.activation_name](out)
            h = parts
        w, b = weights[-1], biases[-1]  # fresh outputs: only the draws read them
        return torch.cat([torch.baddbmm(b, g, w) for g in h], dim=1)

    def member_log_prior(self) -> torch.Tensor:
        """log p(theta_m) of each member's weights and biases: [M]."""
        return sum(
            (self.prior.log_prob(p).flatten(1).sum(1) for p in self.body_parameters()),
            self.weights[0].new_zeros(self.members),
        )

    def penalty(self, num_train: int) -> torch.Tensor:
        """Negative log prior per example, summed over members (each member is a MAP fit)."""
        return -self.member_log_prior().sum() / num_train

    def member_nll(self, raw: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean NLL of each member: raw [M, B, F], y [B, ...] -> [M]."""
        m, b = raw.shape[:2]
        targets = y.unsqueeze(0).expand(m, *y.shape).reshape(m * b, *y.shape[1:])
        return self.head.nll(raw.reshape(m * b, -1), targets).view(m, b).mean(1)

    def load_members(self, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> None:
        """Replace the stacked tensors (e.g. with collected SG-MCMC samples)."""
        with torch.no_grad():
            for param, value in zip(self.body_parameters(), [*weights, *biases], strict=True):
                param.copy_(value)


class DeepEnsemble(StackedMLP):
    """Lakshminarayanan et al. 2017: independently initialized MAP members (use a
    heteroscedastic Gaussian or softmax head), trained together as stacked parameters."""

    method = "ensemble"


class SGLDSamples(StackedMLP):
    """Weight samples collected by stochastic-gradient Langevin dynamics."""

    method = "sgld"


class SGHMCSamples(StackedMLP):
    """Weight samples collected by stochastic-gradient Hamiltonian Monte Carlo."""

    method = "sghmc"


for _cls in (DeepEnsemble, SGLDSamples, SGHMCSamples):
    MODEL_TYPES[_cls.method] = _cls
