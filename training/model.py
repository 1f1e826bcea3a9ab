"""Posterior models and the one sampler contract every method implements.

    sample(x: Tensor[B, *input_shape], n, seeds: Tensor[B]) -> Tensor[n, B, *out]

Draw `s` is one posterior draw of all weights applied to every row that shares a seed, so
the draws of one request are joint across its rows; rows with different seeds (different
requests in one server batch) get independent draws that depend only on their own seed.
Inputs go in, and draws come out, in original units: the model carries its normalization.
Regression draws hold the per-draw Gaussian mean and variance side by side on the last axis
([..., :k] and [..., k:]); classification draws are logits.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training import rng
from training.likelihoods import CategoricalHead, GaussianHead, build_head

ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu}
# Inference on fresh tensors: no autograd, so no need for a new output per activation
# (gelu has no in-place form)
IN_PLACE_ACTIVATIONS = {"relu": torch.relu_, "tanh": torch.tanh_, "gelu": F.gelu}
_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
CHUNK_BYTES = 1 << 20  # per activation tensor, half a core's L2 on the benchmark machine


class Normalizer(nn.Module):
    """Standardization with training statistics; stored in the manifest, not in the weights."""

    def __init__(self, stats: dict):
        super().__init__()
        for key in ("x_mean", "x_std", "y_mean", "y_std"):
            if key in stats:
                self.register_buffer(key, torch.tensor(stats[key]), persistent=False)
        self.stats = stats

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_std

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.y_mean) / self.y_std

    def gaussian_draws(self, draws: torch.Tensor) -> torch.Tensor:
        """Standardized [mean | variance] draws -> original units."""
        k = self.y_mean.numel()
        mean = draws[..., :k] * self.y_std + self.y_mean
        return torch.cat([mean, draws[..., k:] * self.y_std**2], dim=-1)


class PosteriorModel(nn.Module):
    """Base class: normalization + likelihood head around a method-specific body."""

    method: ClassVar[str]

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
        """Standardized inputs [B, D] -> raw head outputs [n, B, raw_features]."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Training pass on standardized inputs: one stochastic draw per row."""
        raise NotImplementedError

    def penalty(self, num_train: int) -> torch.Tensor:
        """Negative log prior per training example (regularization is the prior)."""
        return torch.zeros(())

    @torch.inference_mode()
    def sample(self, x: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        return self._draws(self.raw_draws(self.normalizer.inputs(x), n, seeds))

    def _draws(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw head outputs -> draws in original units."""
        # a body in 16 bits (MCDropoutMLP.to_precision) hands the head float32
        draws = self.head.per_draw(raw.to(torch.promote_types(raw.dtype, torch.float32)))
        if isinstance(self.head, GaussianHead):
            return self.normalizer.gaussian_draws(draws)
        return draws


class MCDropoutMLP(PosteriorModel):
    """MLP with dropout kept on at prediction time (Gal & Ghahramani 2016).

    The prior length-scale l gives the weight decay l^2 (1 - p) / (2 N) per weight matrix on
    a per-example negative log-likelihood, which is Gal's l^2 (1 - p) / (2 N tau) on the
    squared-error scale.
    """

    method = "mc_dropout"

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__(arch, likelihood, normalization)
        widths = [arch["in_features"], *arch["hidden"], self.head.raw_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.p = float(arch["dropout"])
        self.input_dropout = bool(arch.get("input_dropout", False))
        self.lengthscale = float(arch.get("prior_lengthscale", 1e-2))
        self.activation_name = arch.get("activation", "relu")
        self.activation = ACTIVATIONS[self.activation_name]

    def _dropped(self, i: int) -> bool:
        return self.p > 0 and (i > 0 or self.input_dropout)

    def to_precision(self, dtype: torch.dtype) -> MCDropoutMLP:
        """Serve the layers' weights and activations in bfloat16 or float16 (products
        accumulate in float32 on AMX and tensor cores), not the normalization or the
        likelihood head, so inputs are standardized and draws rescaled in float32. Masks
        are the same bits."""
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(
                f"MC-dropout layers serve in float32, bfloat16 or float16, not {dtype}"
            )
        self.layers.to(dtype)
        return self

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            if self._dropped(i):
                h = F.dropout(h, self.p, training=True)
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h

    @torch.inference_mode()
    def sample_per_row(self, x: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        """`sample`'s draws, with every row's masks made from its own seed, repeated seeds
        too. No step's size depends on the seeds' values (as torch.unique's does), so nothing
        waits for the device: this is what a CUDA graph can capture (service.cuda_graphs)."""
        return self._draws(self._raw_draws(self.normalizer.inputs(x), n, seeds, None))

    def raw_draws(self, z: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        unique, row_of = torch.unique(seeds, return_inverse=True)
        if unique.numel() == seeds.numel():  # one seed per row: masks per row, no gather
            return self._raw_draws(z, n, seeds, None)
        return self._raw_draws(z, n, unique, row_of)

    def _raw_draws(
        self, z: torch.Tensor, n: int, unique: torch.Tensor, row_of: torch.Tensor | None
    ) -> torch.Tensor:
        """Draws with the masks of seeds `unique`, row i taking those of unique[row_of[i]]
        (row_of None: unique[i]).

        Layers before the first dropout run once for all draws; the rest run on chunks of
        draws small enough that each layer's activations stay in a core's L2 cache (a
        large model's masks and activations are several passes over megabytes each)."""
        keep, activation = 1 - self.p, self.activation_name
        plan = [  # (layer, keys of its input's dropout masks or None)
            (layer, rng.draw_keys(unique, n, stream=i) if self._dropped(i) else None)
            for i, layer in enumerate(self.layers)
        ]
        h = z.to(self.layers[0].weight.dtype)
        while plan and plan[0][1] is None:  # before the first dropout: the same for every draw
            layer, _ = plan.pop(0)
            h = _linear(h, layer, 1.0, activation if plan else None)
        if not plan:  # no dropout at all
            return h.unsqueeze(0).expand(n, *h.shape)
        widest = max(layer.in_features for layer, _ in plan)
        step = max(1, CHUNK_BYTES // (z.shape[0] * widest * h.element_size()))
        chunks = []
        for start in range(0, n, step):
            g = h.unsqueeze(0)  # [1, B, width]: broadcast to [draws, B, width] by the mask
            for j, (layer, keys) in enumerate(plan):
                scale = 1.0
                if keys is not None:
                    g = _dropout(g, keys[start : start + step], row_of, keep)
                    scale = 1 / keep
                g = _linear(g, layer, scale, activation if j < len(plan) - 1 else None)
            chunks.append(g)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def penalty(self, num_train: int) -> torch.Tensor:
        total = torch.zeros(())
        for i, layer in enumerate(self.layers):
            keep = 1 - self.p if self._dropped(i) else 1.0
            total = total + self.lengthscale**2 * keep / (2 * num_train) * layer.weight.pow(2).sum()
        return total


def _linear(
    h: torch.Tensor, layer: nn.Linear, scale: float, activation: str | None
) -> torch.Tensor:
    """`layer` at inference on [..., in] with its product scaled (addmm's alpha: free, where
    scaling the weights is one more pass over them), then the activation (if any) in place:
    the output is fresh."""
    flat = h if h.dim() == 2 else h.reshape(-1, h.shape[-1])
    y = torch.addmm(layer.bias, flat, layer.weight.t(), alpha=scale)
    y = IN_PLACE_ACTIVATIONS[activation](y) if activation else y
    return y if h.dim() == 2 else y.view(*h.shape[:-1], -1)


def _dropout(
    h: torch.Tensor, keys: torch.Tensor, row_of: torch.Tensor | None, keep: float
) -> torch.Tensor:
    """h [1 or n, B, W] times the keep masks [n, U, W] of the keys (rows map to keys by row_of).

    The masks' words (all ones or zeros) AND the activations' bits: one pass, no multiply.
    """
    bits = rng.bernoulli_bits(keys, h.shape[-1], keep)
    if row_of is not None:
        bits = bits[:, row_of]
    word = _SAME_SIZE_INT[h.element_size()]
    return bits.to(word).bitwise_and_(h.view(word)).view(h.dtype)


MODEL_TYPES: dict[str, type[PosteriorModel]] = {MCDropoutMLP.method: MCDropoutMLP}


def build_model(config: dict, normalization: dict) -> PosteriorModel:
    """Rebuild a model from its manifest config alone (no code from the training run)."""
    method = config.get("method")
    if method not in MODEL_TYPES:
        raise ValueError(f"unknown method {method!r}; known: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[method](config["arch"], config["likelihood"], normalization)


__all__ = ["MODEL_TYPES", "CategoricalHead", "GaussianHead", "PosteriorModel", "build_model"]

# The other methods' model classes subclass PosteriorModel and add themselves to MODEL_TYPES
# when imported, so they are imported last.
import training.posteriors.laplace  # noqa: E402
import training.posteriors.stacked  # noqa: E402
import training.posteriors.variational  # noqa: E402, F401
