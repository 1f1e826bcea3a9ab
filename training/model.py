"""Posterior models and the one sampler contract every method implements.

    sample(x: Tensor[B, *input_shape], n, seeds: Tensor[B], sizes=None) -> Tensor[n, B, *out]

Every row carries its request's seed. Draw `s` is one posterior draw of all weights applied
to every row of a request, so a request's draws are joint across its rows; requests with
different seeds get independent draws. With `sizes` (the rows of consecutive requests,
`sizes[i]` each) a request's draws are a function of the request alone (its rows, seed and
n), to the bit: its products are calls of its own (training.segments), so what else shares
the batch changes nothing. Without, a model may run its products over the whole batch, each
row's randomness still from its own seed: BLAS then picks kernels by the batch's shape, so a
request's draws agree with its draws alone to float rounding, and cost less to compute.
Inputs go in, and draws come out, in original units: the model carries its normalization.
Regression draws hold the per-draw Gaussian mean and variance side by side on the last axis
([..., :k] and [..., k:]); classification draws are logits.

For attributions a model also gives its draws at per-draw inputs, with autograd on:

    path_draws(z: Tensor[n, B, *input_shape] (standardized), seeds: Tensor[B]) -> [n, B, *out]

draw s on z[s] alone, the same draw `sample` makes for index s of each row's seed.

For a density of the network's features (training.density) a model gives the deterministic
activations its output layer reads:

    embed(z: Tensor[B, *input_shape] (standardized)) -> Tensor[K, B, D]

K = 1 for one network (MC dropout with dropout off, variational weights at their means,
Laplace at its MAP); K = M for a stored set, each member's own features.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from training import segments
from training.likelihoods import GaussianHead, build_head


class Normalizer(nn.Module):
    """Standardization with training statistics; stored in the manifest, not in the weights.

    A relative forecaster (stats["level_features"], training.series) sees each window
    [B, T, F] as changes from its last step, and predicts each output as a change from the
    last value of its target feature, which `gaussian_draws` adds back: a trending series'
    inputs and outputs then stay in the range the network was trained on.
    """

    def __init__(self, stats: dict):
        super().__init__()
        for key in ("x_mean", "x_std", "y_mean", "y_std"):
            if key in stats:
                self.register_buffer(key, torch.tensor(stats[key]), persistent=False)
        self.level_features: list[int] | None = stats.get("level_features")
        self.stats = stats

    def relative_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Original-unit inputs, as changes from each window's last step when relative."""
        return x if self.level_features is None else x - x[:, -1:, :]

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """[B, outputs]: the last observed value of each output's target feature."""
        last = x[:, -1, self.level_features]
        return last.repeat(1, self.y_mean.numel() // last.shape[-1])

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return (self.relative_inputs(x) - self.x_mean) / self.x_std

    def targets(self, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Standardized targets; a relative forecaster needs the rows' inputs `x`."""
        if self.level_features is not None:
            if x is None:
                raise ValueError("a relative forecaster's targets need their input windows")
            y = y - self.levels(x)
        return (y - self.y_mean) / self.y_std

    def gaussian_draws(self, draws: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Standardized [mean | variance] draws -> original units (of the rows `x`)."""
        k = self.y_mean.numel()
        mean = draws[..., :k] * self.y_std + self.y_mean
        if self.level_features is not None:
            if x is None:
                raise ValueError("a relative forecaster's draws need their input windows")
            mean = mean + self.levels(x).to(mean.dtype)
        return torch.cat([mean, draws[..., k:] * self.y_std**2], dim=-1)


class NoFeatures(ValueError):
    """A model whose structure has no penultimate feature layer to embed rows with."""


class PosteriorModel(nn.Module):
    """Base class: normalization + likelihood head around a method-specific body."""

    method: ClassVar[str]
    # A posterior stored as M weight draws (ensembles, SG-MCMC samples) has M distinct
    # draws; a continuous one (None) has as many as are asked for.
    set_size: int | None = None

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__()
        self.arch = dict(arch)
        self.normalizer = Normalizer(normalization)
        self.head = build_head(likelihood)

    @property
    def task(self) -> str:
        return self.head.task

    def config(self) -> dict:
        return {"method": self.method, "arch": self.arch, "likelihood": self.head.config()}

    def raw_draws(self, z: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        """One request's standardized inputs [B, D] (fresh: aligned as an allocation is) ->
        raw head outputs [n, B, raw_features]."""
        raise NotImplementedError

    def batch_draws(self, x: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        """Raw head outputs [n, B, raw_features] with products over the whole batch; a
        method without such a path computes per request (one per run of equal seeds)."""
        return self.request_draws(x, n, seeds, segments.runs(seeds))

    def request_draws(
        self, x: torch.Tensor, n: int, seeds: torch.Tensor, sizes: Sequence[int]
    ) -> torch.Tensor:
        """Raw head outputs [n, B, raw_features] of every request in the batch, each computed
        from its own rows alone (the normalization is elementwise, so its output for a
        request is the same fresh tensor alone and here)."""
        bounds = segments.offsets(sizes)
        parts = [
            self.raw_draws(self.normalizer.inputs(x[a:b]), n, seeds[a:b])
            for a, b in itertools.pairwise(bounds)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def raw_draws_at(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Draw s at its own standardized inputs z[s]: z [n, B, *input_shape], a seed per
        row -> raw head outputs [n, B, raw_features], differentiable in z.

        Draw s is the draw `raw_draws` makes for index s of each row's seed; what changes is
        that every draw reads a copy of the inputs of its own, so that the gradient of draw
        s's outputs with respect to z[s] is that draw's alone (attributions per posterior
        draw, training.attributions). This fallback runs every draw on every copy and keeps
        the diagonal (per run of equal seeds: `raw_draws` takes one request's rows): n times
        the work, for a method without a path of its own."""
        n, index = z.shape[0], torch.arange(z.shape[0], device=z.device)
        parts = []
        for a, b in itertools.pairwise(segments.offsets(segments.runs(seeds))):
            rows = b - a
            out = self.raw_draws(z[:, a:b].flatten(0, 1), n, seeds[a:b].repeat(n))
            parts.append(out.view(n, n, rows, -1)[index, index])  # [n, rows, raw]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def path_draws(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """`raw_draws_at` in original output units (as `sample` gives them), with autograd
        on: standardized inputs [n, B, *input_shape] -> draws [n, B, *out]. Not for a
        relative forecaster, whose outputs add the level of inputs it is not given."""
        return self._draws(self.raw_draws_at(z, seeds))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Training pass on standardized inputs: one stochastic draw per row."""
        raise NotImplementedError

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """Standardized inputs [B, *input_shape] -> the deterministic activations the output
        layer reads, [K, B, D] float32 (K networks: 1, or a stored set's M). NoFeatures when
        the model has none (a network with no hidden layer reads its inputs)."""
        raise NoFeatures(f"{type(self).__name__} ({self.method}) gives no feature embedding")

    @torch.inference_mode()
    def embed_inputs(
        self, x: torch.Tensor, sizes: Sequence[int] | None = None, rows: int = 1024
    ) -> torch.Tensor:
        """`embed` of original-unit inputs [B, ...] -> [K, B, D] float32, at most `rows` rows
        per pass (a CNN's activations on a whole data set would not fit in memory). With
        `sizes` (consecutive requests' rows, as `sample` takes them) each request's rows are
        embedded on their own, from a fresh copy: its features, and a density score made of
        them, are the same bits alone and in any batch."""
        bounds = [(0, x.shape[0])] if sizes is None else itertools.pairwise(segments.offsets(sizes))
        parts = []
        for start, end in bounds:
            for a in range(start, max(end, start + 1), rows):
                part = x[a : min(a + rows, end)]
                part = part if sizes is None else part.clone()
                parts.append(self.embed(self.normalizer.inputs(part)).float())
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def penalty(self, num_train: int) -> torch.Tensor:
        """Negative log prior per training example (regularization is the prior)."""
        return torch.zeros(())

    @torch.inference_mode()
    def sample(
        self,
        x: torch.Tensor,
        n: int,
        seeds: torch.Tensor,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        if sizes is None:
            return self._draws(self.batch_draws(x, n, seeds), x)
        segments.check_sizes(sizes, x.shape[0])
        return self._draws(self.request_draws(x, n, seeds, sizes), x)

    def _draws(self, raw: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Raw head outputs -> draws in original units (`x`: the rows' inputs)."""
        # a body in 16 bits (MCDropoutMLP.to_precision) hands the head float32
        draws = self.head.per_draw(raw.to(torch.promote_types(raw.dtype, torch.float32)))
        if isinstance(self.head, GaussianHead):
            return self.normalizer.gaussian_draws(draws, x)
        return draws


def draws_used(n: int, set_size: int | None) -> int:
    """The draws a request for n takes: from a set of M draws, more than M is the whole set
    (its exact mixture), so that a client's num_samples suits every model."""
    return n if set_size is None else min(n, set_size)
