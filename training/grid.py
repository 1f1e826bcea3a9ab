"""MC-dropout networks with different settings trained together as one stacked model.

The published UCI protocol (Gal & Ghahramani, 2018 grid-search version) fits one network
per (dropout rate, noise precision tau) pair on every split, then refits the best pair on
the whole training split. Trained one after another that is hundreds of short runs whose
per-step cost is almost all Python and kernel-launch overhead, since a 50-unit network is
tiny; stacked ([M, in, out] weights, `torch.baddbmm`), M networks take one optimizer step
together for a few times the cost of one (measured on 2 cores, concrete's 927 rows: one
network alone 1.0 ms per step, 12 members 2.4 ms, 20 members 3.1 ms, 240 members 28 ms; past
a few dozen members the cost is the elementwise work, a third of it the dropout masks).

Each member m is exactly an `MCDropoutMLP` with its own dropout rate p_m and fixed Gaussian
noise of precision tau_m (original target units), with its own normalizer statistics and
its own training rows (the refits of several splits share one stack), trained on the same
loss: the mean Gaussian NLL of a minibatch (standardized units) + the per-example negative
log prior l^2 (1 - p_m) / (2 N) sum ||W||^2 (`MCDropoutMLP.penalty`). The members' losses
are summed, so their gradients do not interact, and Adam is elementwise, so a member's
trajectory is the one it would follow alone: its initial weights, shuffles and dropout masks
come from its own seed, and a member trained in a stack ends with the weights it gets in a
stack of one (tests/test_grid.py). `member_model(m)` turns a member into a servable
`MCDropoutMLP`, whose draws are the server's draws.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.data import Dataset
from training.fit import adam, torch_threads
from training.pointwise import ACTIVATIONS
from training.posteriors.mc_dropout import MCDropoutMLP
from training.train import likelihood_config

DEFAULT_LENGTHSCALE = 1e-2


@dataclass(frozen=True)
class GridConfig:
    """One grid point: dropout rate and noise precision tau (original target units)."""

    dropout: float
    tau: float


@dataclass(frozen=True)
class GridMember:
    """One network of a stack: its configuration, the normalizer statistics of the rows it
    is fit on (training.fit.standardization), and the seed of its init, masks and shuffles.
    Members may be fit on different rows (the refits of several splits share one stack)."""

    config: GridConfig
    stats: dict
    seed: int


def _stacked(stats: Sequence[dict], key: str) -> torch.Tensor:
    return torch.tensor([s[key] for s in stats], dtype=torch.float32).unsqueeze(1)


class DropoutGrid(nn.Module):
    """M MC-dropout MLPs, each with its own dropout rate, fixed noise, normalizer and seed."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        members: Sequence[GridMember],
        *,
        activation: str = "relu",
        input_dropout: bool = True,
        prior_lengthscale: float = DEFAULT_LENGTHSCALE,
    ):
        super().__init__()
        if not members:
            raise ValueError("need at least one member")
        for member in members:
            c = member.config
            if not 0 <= c.dropout < 1 or c.tau <= 0:
                raise ValueError(f"bad configuration {c}: need 0 <= dropout < 1 and tau > 0")
            if len(member.stats["y_std"]) != 1:
                raise ValueError("the dropout grid supports a single regression target")
        self.member_specs = list(members)
        self.in_features, self.hidden = in_features, list(hidden)
        self.activation_name, self.input_dropout = activation, input_dropout
        self.activation = ACTIVATIONS[activation]
        self.lengthscale = float(prior_lengthscale)
        m = len(members)
        stats = [member.stats for member in members]
        for key in ("x_mean", "x_std", "y_mean", "y_std"):  # [M, 1, features]
            self.register_buffer(key, _stacked(stats, key))
        keep = torch.tensor([1 - member.config.dropout for member in members]).view(m, 1, 1)
        self.register_buffer("keep", keep)
        tau = torch.tensor([member.config.tau for member in members]).view(m, 1, 1)
        self.register_buffer("noise_variance", 1.0 / (tau * self.y_std**2))
        widths = [in_features, *self.hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in itertools.pairwise(widths):
            self.weights.append(nn.Parameter(torch.empty(m, a, b)))
            self.biases.append(nn.Parameter(torch.empty(m, 1, b)))
        with torch.no_grad():
            for i, member in enumerate(members):
                # nn.Linear's default initialization, from the member's own generator
                gen = torch.Generator().manual_seed(member.seed)
                for w, b in zip(self.weights, self.biases, strict=True):
                    bound = 1.0 / math.sqrt(w.shape[1])
                    w[i].uniform_(-bound, bound, generator=gen)
                    b[i].uniform_(-bound, bound, generator=gen)

    @property
    def members(self) -> int:
        return len(self.member_specs)

    def dropped(self, layer: int) -> bool:
        """Whether the input of `layer` is dropped (as `MCDropoutMLP._dropped`)."""
        return layer > 0 or self.input_dropout

    @property
    def mask_widths(self) -> list[int]:
        """Widths of the inputs of the dropped layers, in order."""
        widths = [self.in_features, *self.hidden]
        return [w for i, w in enumerate(widths) if self.dropped(i)]

    def forward(self, z: torch.Tensor, masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Standardized inputs [M, B, D] -> per-member means [M, B, 1] (standardized).

        `masks[i]` scales layer i's input by {0, 1/keep}, shape [M, B, width], or is None
        for a layer that is not dropped.
        """
        h = z
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if masks[i] is not None:
                h = h * masks[i]
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = self.activation(h)
        return h

    def member_nll(self, mean: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean Gaussian NLL of each member: means and targets [M, B, 1] -> [M]."""
        var = self.noise_variance
        return (0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)).mean(dim=(1, 2))

    def penalty(self, num_train: int) -> torch.Tensor:
        """Each member's negative log prior per example (`MCDropoutMLP.penalty`): [M]."""
        keep = self.keep.view(-1)
        total = torch.zeros_like(keep)
        for i, w in enumerate(self.weights):
            scale = keep if self.dropped(i) else torch.ones_like(keep)
            total = total + self.lengthscale**2 * scale / (2 * num_train) * w.pow(2).sum((1, 2))
        return total

    def epoch_masks(
        self, generators: list[torch.Generator], rows: int, out: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Dropout scales for one epoch, [M, rows, width] per dropped layer; member m's come
        from its own generator alone, so they do not depend on the other members. `out`
        ([M, rows, sum of widths]) is reused in place: a stack of a few hundred members
        draws tens of millions of masks an epoch, and fresh tensors of that size cost more
        in page faults than the comparison itself."""
        widths = self.mask_widths
        if out is None:
            out = torch.empty(self.members, rows, sum(widths))
        for m, gen in enumerate(generators):
            torch.rand(rows, sum(widths), generator=gen, out=out[m])
        out.lt_(self.keep).div_(self.keep)  # {0, 1/keep}, as torch.where would give
        return list(torch.split(out, widths, dim=-1))

    def member_model(self, m: int) -> MCDropoutMLP:
        """Member m as a servable `MCDropoutMLP` (its fixed noise in the likelihood)."""
        spec = self.member_specs[m]
        arch = {
            "in_features": self.in_features,
            "hidden": list(self.hidden),
            "activation": self.activation_name,
            "dropout": spec.config.dropout,
            "input_dropout": self.input_dropout,
            "prior_lengthscale": self.lengthscale,
        }
        shape = Dataset(
            np.zeros((0, self.in_features)),
            np.zeros((0, 1)),
            [""] * self.in_features,
            ["y"],
            "regression",
        )
        likelihood = likelihood_config(shape, spec.stats, "fixed", spec.config.tau)
        model = MCDropoutMLP(arch, likelihood, spec.stats)
        with torch.no_grad():
            for layer, w, b in zip(model.layers, self.weights, self.biases, strict=True):
                layer.weight.copy_(w[m].T)
                layer.bias.copy_(b[m, 0])
        return model.eval()


@dataclass
class GridFitResult:
    """What `fit_grid` did: epochs, gradient steps (each updates every member), seconds,
    and each member's mean training NLL over the last epoch (standardized units)."""

    epochs: int
    steps: int
    seconds: float
    final_nll: list[float]


def fit_grid(
    grid: DropoutGrid,
    data: Dataset | Sequence[Dataset],
    epochs: int,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    threads: int | None = 1,
) -> GridFitResult:
    """Adam on the summed member losses for a fixed number of epochs (no early stopping:
    the budget is part of the protocol). `data` is one data set for every member or one per
    member, all of the same size; each member shuffles its rows with its own generator."""
    start = time.perf_counter()
    sets = [data] * grid.members if isinstance(data, Dataset) else list(data)
    if len(sets) != grid.members:
        raise ValueError(f"{len(sets)} data sets for {grid.members} members")
    n = len(sets[0])
    if any(len(s) != n for s in sets):
        raise ValueError("every member's data set must have the same number of rows")
    x = torch.stack([torch.as_tensor(s.x, dtype=torch.float32) for s in sets])
    y = torch.stack([torch.as_tensor(s.y, dtype=torch.float32) for s in sets])
    x, y = (x - grid.x_mean) / grid.x_std, (y - grid.y_mean) / grid.y_std
    shuffles = [torch.Generator().manual_seed(spec.seed + 1) for spec in grid.member_specs]
    mask_gens = [torch.Generator().manual_seed(spec.seed + 2) for spec in grid.member_specs]
    members = torch.arange(grid.members).unsqueeze(1)
    optimizer = adam(grid.parameters(), lr)
    dropped = [grid.dropped(i) for i in range(len(grid.weights))]
    steps, sums = 0, torch.zeros(grid.members)
    buffer = torch.empty(grid.members, n, sum(grid.mask_widths))
    grid.train()
    with torch_threads(threads):
        for _ in range(epochs):
            order = torch.stack([torch.randperm(n, generator=g) for g in shuffles])
            x_epoch, y_epoch = x[members, order], y[members, order]  # one gather an epoch
            scales = iter(grid.epoch_masks(mask_gens, n, buffer))
            layer_scales = [next(scales) if d else None for d in dropped]
            sums = torch.zeros(grid.members)
            for i in range(0, n, batch_size):
                batch = slice(i, i + batch_size)
                masks = [s[:, batch] if s is not None else None for s in layer_scales]
                nll = grid.member_nll(grid(x_epoch[:, batch], masks), y_epoch[:, batch])
                loss = (nll + grid.penalty(n)).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums += nll.detach() * min(batch_size, n - i)
                steps += 1
    grid.eval()
    return GridFitResult(epochs, steps, time.perf_counter() - start, (sums / n).tolist())


__all__ = ["DropoutGrid", "GridConfig", "GridFitResult", "GridMember", "fit_grid"]
