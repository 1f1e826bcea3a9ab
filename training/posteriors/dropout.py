"""MC dropout on any body of the architecture registry (Gal & Ghahramani 2016, 2016b).

A draw is one set of dropout masks: site i's mask for row b in draw s comes from the
counter-based generator keyed by (b's seed, s, stream i), so rows that share a seed share
masks, and a request's draws are its own whatever it is batched with. Dense sites drop
features, convolutional sites whole channels, recurrent sites one mask per sequence on the
inputs and on the state. The draws of a batch run as one pass over [draws x rows].
(`MCDropoutMLP` is the MLP's fast path: the same masks, its own kernels.)
"""

from __future__ import annotations

import torch
from torch import nn

from training import rng
from training.architectures import Recurrent, Site, build_body, keyed
from training.model import PosteriorModel

ROWS_PER_PASS = 512  # rows of [draws x rows] per pass: bounds a CNN's activations (and is faster)


class DropoutNet(PosteriorModel):
    """arch: an architecture config (training.architectures) + dropout, prior_lengthscale."""

    method = "mc_dropout"

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__(arch, likelihood, normalization)
        self.p = float(arch["dropout"])
        self.lengthscale = float(arch.get("prior_lengthscale", 1e-2))
        self.body = build_body(arch, self.head.raw_features, self.p)
        self.sites = self.body.sites()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """The body's features with every site off (no keys, eval mode): [1, B, D]."""
        self.body.check_features()
        was = self.body.training
        self.body.eval()
        try:
            with keyed(self.sites, [None] * len(self.sites)):
                return self.body.features(z).unsqueeze(0)
        finally:
            self.body.train(was)

    def batch_draws(self, x: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        return self.raw_draws(self.normalizer.inputs(x), n, seeds)

    def raw_draws(self, z: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        return self._keyed_draws(z.unsqueeze(0).expand(n, *z.shape), seeds)

    def raw_draws_at(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return self._keyed_draws(z, seeds)

    def _keyed_draws(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Draw s of every row on its inputs z[s] ([n, rows, ...]; `raw_draws` passes one
        copy expanded, `raw_draws_at` one per draw): the body runs on [draws x rows]."""
        n, rows = z.shape[:2]
        keys = [
            rng.draw_keys(seeds, n, stream=i) if site.p > 0 else None
            for i, site in enumerate(self.sites)
        ]
        step = max(1, ROWS_PER_PASS // rows)
        chunks = []
        for start in range(0, n, step):
            m = min(step, n - start)
            h = z[start : start + m].reshape(m * rows, *z.shape[2:])
            with keyed(
                self.sites, [k if k is None else k[start : start + m].reshape(-1) for k in keys]
            ):
                chunks.append(self.body(h).view(m, rows, -1))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def penalty(self, num_train: int) -> torch.Tensor:
        """Gal's l^2 (1 - p) / (2 N) ||W||^2 for each weight, p the rate of its input's site."""
        total, rate = torch.zeros(()), 0.0
        for module in self.body.modules():
            if isinstance(module, Site):
                rate = module.p
            elif isinstance(module, nn.Linear | nn.Conv2d):
                total = total + (1 - rate) * module.weight.pow(2).sum()
            elif isinstance(module, Recurrent):
                total = total + (1 - module.input_site.p) * module.weight_ih.pow(2).sum()
                total = total + (1 - module.state_site.p) * module.weight_hh.pow(2).sum()
        return self.lengthscale**2 / (2 * num_train) * total
