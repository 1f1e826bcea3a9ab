"""Posteriors stored as a finite set of weight draws: deep ensembles and SG-MCMC samples.

The M weight sets are stacked tensors, so all members run as one call, for training (one
optimizer step updates every ensemble member or every parallel chain) and for serving: for
an MLP one batched matmul per layer ([M, in, out], `StackedMLP`, the fast path), for any body
of the architecture registry one `torch.func.vmap` of the body over its stacked parameters
(`StackedNet`). Draw s is member s mod M: a fixed set of draws needs no randomness, so every
seed gets the same, joint, draws and seed-purity holds trivially. A request for more than M
draws gets the M (`training.model.draws_used`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from training import segments
from training.architectures import build_body
from training.distributed import SINGLE, Spread, shared
from training.model import NoFeatures, PosteriorModel
from training.pointwise import ACTIVATIONS, IN_PLACE_ACTIVATIONS
from training.priors import DEFAULT_PRIOR, parse_prior


class Stacked(PosteriorModel):
    """M members' parameters as stacked tensors (`body_parameters`, each [M, ...]).

    arch: an architecture config, members (M), prior (for training penalties)."""

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__(arch, likelihood, normalization)
        self.members = int(arch["members"])
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {self.members}")
        self.prior = parse_prior(arch.get("prior", DEFAULT_PRIOR))
        self.arch["prior"] = self.prior.spec

    @property
    def set_size(self) -> int:
        return self.members

    def body_parameters(self) -> list[nn.Parameter]:
        """The stacked parameters (the head's, if any, are not stacked)."""
        raise NotImplementedError

    def run(self, h: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Inputs [B, ...] -> raw outputs [n, B, out] of draws 0..n-1 (every member when n is
        None)."""
        raise NotImplementedError

    def run_block(self, h: torch.Tensor, block: slice) -> torch.Tensor:
        """Inputs [B, ...] -> raw outputs [m, B, out] of the members in `block` (the ones this
        process trains: training.distributed), each computed as it is among all M."""
        raise NotImplementedError

    @torch.inference_mode()
    def block_draws(self, x: torch.Tensor, block: slice) -> torch.Tensor:
        """Draws [m, B, out] (original units) of the members in `block`."""
        return self._draws(self.run_block(self.normalizer.inputs(x), block), x)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Every member on the same rows: [M, B, raw_features] (the loss sums members)."""
        return self.run(z)

    def batch_draws(self, x: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        return self.run(self.normalizer.inputs(x), n)

    def raw_draws(self, z: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        return self.run(z, n)

    def raw_draws_at(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return self.run_at(z)

    def run_at(self, h: torch.Tensor) -> torch.Tensor:
        """Draw s (member s mod M) on its own inputs h[s]: [n, B, ...] -> [n, B, out]."""
        raise NotImplementedError

    def draw_members(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Which member each of draws 0..n-1 is (s mod M); None when they are the first n."""
        return None if n <= self.members else torch.arange(n, device=device) % self.members

    def member_log_prior(self, block: slice | None = None) -> torch.Tensor:
        """log p(theta_m) of each member's weights and biases: [M] (or the block's [m])."""
        params = [p[block or slice(None)] for p in self.body_parameters()]
        return sum(
            (self.prior.log_prob(p).flatten(1).sum(1) for p in params), params[0].new_zeros(())
        )

    def penalty(self, num_train: int, block: slice | None = None) -> torch.Tensor:
        """Negative log prior per example, summed over members (each member is a MAP fit),
        or over the members of `block`."""
        return -self.member_log_prior(block).sum() / num_train

    def member_noise(self, block: slice, spread: Spread = SINGLE) -> torch.Tensor | None:
        """A learned homoscedastic noise as one copy per member of `block` [m, k], whose
        gradient sums every member's in member order (training.distributed.shared); None when
        the head learns no noise."""
        if getattr(self.head, "noise", None) != "homoscedastic":
            return None
        return shared(self.head.log_noise_variance, block, self.members, spread)

    def gather_members(self, spread: Spread) -> None:
        """Copy every process's block of members into its place here, on every process."""
        if spread.world_size == 1:
            return
        block = spread.block(self.members)
        with torch.no_grad():
            for p in self.body_parameters():
                p.copy_(spread.gather(p[block].detach(), self.members))

    def member_nll(
        self, raw: torch.Tensor, y: torch.Tensor, log_noise_variance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean NLL of each member: raw [M, B, F], y [B, ...] -> [M]; `log_noise_variance`
        [M, k] (`member_noise`) stands in for the head's learned noise."""
        m, b = raw.shape[:2]
        if log_noise_variance is not None:
            return self.head.nll(raw, y, log_noise_variance.unsqueeze(1)).mean(1)
        targets = y.unsqueeze(0).expand(m, *y.shape).reshape(m * b, *y.shape[1:])
        return self.head.nll(raw.reshape(m * b, -1), targets).view(m, b).mean(1)

    def load_members(self, values: list[torch.Tensor]) -> None:
        """Replace the stacked tensors, in `body_parameters` order (e.g. with collected
        SG-MCMC samples)."""
        with torch.no_grad():
            for param, value in zip(self.body_parameters(), values, strict=True):
                param.copy_(value)


class StackedNet(Stacked):
    """Any body of the architecture registry, its members' parameters stacked by
    `torch.func.stack_module_state`. Few rows run as one vmap of the body over the members
    (a grouped convolution); many rows as a loop over members, whose per-member kernels are
    faster there (benchmarks/stacked_bodies.py). The choice depends on the rows alone, so a
    request's draws are still its own."""

    VMAP_ROWS = 32  # below: one vmapped call; from here on: a loop over members

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__(arch, likelihood, normalization)
        bodies = [build_body(arch, self.head.raw_features) for _ in range(self.members)]
        stacked, _ = torch.func.stack_module_state(bodies)
        self.names = list(stacked)
        self.stack = nn.ParameterList(nn.Parameter(stacked[k]) for k in self.names)
        # the parameters' shapes and the computation, never its own values: not a submodule
        self._template = [bodies[0].to("meta")]

    def body_parameters(self) -> list[nn.Parameter]:
        return list(self.stack)

    def _member(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self._template[0], weights, (x,))

    def run(self, h: torch.Tensor, n: int | None = None, vmap: bool | None = None) -> torch.Tensor:
        n = self.members if n is None else n
        members = self.draw_members(n, h.device)
        if members is None:
            members = torch.arange(n, device=h.device)
        return self._run_members(h, members, vmap)

    def run_block(self, h: torch.Tensor, block: slice) -> torch.Tensor:
        return self._run_members(h, torch.arange(block.start, block.stop, device=h.device))

    def _run_members(
        self, h: torch.Tensor, members: torch.Tensor, vmap: bool | None = None
    ) -> torch.Tensor:
        if vmap if vmap is not None else h.shape[0] < self.VMAP_ROWS:
            params = {name: p[members] for name, p in zip(self.names, self.stack, strict=True)}
            return torch.func.vmap(self._member, in_dims=(0, None))(params, h)
        outputs = {}  # member -> its output, each member computed once
        for m in members.tolist():
            if m not in outputs:
                weights = {name: p[m] for name, p in zip(self.names, self.stack, strict=True)}
                outputs[m] = self._member(weights, h)
        return torch.stack([outputs[m] for m in members.tolist()])

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """Each member's body features: [M, B, D]; few rows as one vmap over the members,
        many one member at a time, as `run` chooses (by the rows alone)."""
        template = self._template[0]
        template.check_features()
        params = {
            name.removeprefix("features."): p
            for name, p in zip(self.names, self.stack, strict=True)
            if name.startswith("features.")
        }

        def member(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(template.features, weights, (x,))

        if z.shape[0] < self.VMAP_ROWS:
            return torch.func.vmap(member, in_dims=(0, None))(params, z)
        return torch.stack(
            [member({k: p[m] for k, p in params.items()}, z) for m in range(self.members)]
        )

    def run_at(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        members = self.draw_members(n, h.device)
        if members is None:
            members = torch.arange(n, device=h.device)
        params = {name: p[members] for name, p in zip(self.names, self.stack, strict=True)}
        return torch.func.vmap(self._member)(params, h)


class StackedMLP(Stacked):
    """The MLP's fast path: [M, in, out] weights, one baddbmm per layer.

    arch: in_features, hidden, activation, members (M), prior."""

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__(arch, likelihood, normalization)
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

    def body_parameters(self) -> list[nn.Parameter]:
        return [*self.weights, *self.biases]

    def run(self, h: torch.Tensor, n: int | None = None) -> torch.Tensor:
        return self._layers(h, *self._draw_weights(self.members if n is None else n, h.device))

    def run_block(self, h: torch.Tensor, block: slice) -> torch.Tensor:
        # baddbmm over one matrix takes other kernels than over several, which round
        # differently: a lone member runs beside a neighbour, whose output is dropped
        start, stop = block.start, block.stop
        if stop - start == 1 < self.members:
            start = min(start, self.members - 2)
            stop = start + 2
        out = self._layers(
            h, [w[start:stop] for w in self.weights], [b[start:stop] for b in self.biases]
        )
        return out[block.start - start : block.stop - start]

    def _layers(
        self, h: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]
    ) -> torch.Tensor:
        m = weights[0].shape[0]
        if h.dim() == 2:
            h = h.unsqueeze(0).expand(m, *h.shape)
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if i < len(weights) - 1:
                h = self.activation(h)
        return h

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """Each member's last hidden activations: [M, B, D]."""
        if len(self.weights) < 2:
            raise NoFeatures("a network without hidden layers has no feature layer to embed")
        weights, biases = list(self.weights[:-1]), list(self.biases[:-1])
        h = z.unsqueeze(0).expand(self.members, *z.shape)
        for w, b in zip(weights, biases, strict=True):
            h = self.activation(torch.baddbmm(b, h, w))
        return h

    def run_at(self, h: torch.Tensor) -> torch.Tensor:
        return self.run(h, h.shape[0])  # [n, B, D] is one batched matmul per layer as it is

    def _draw_weights(
        self, n: int, device: torch.device
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's weights and biases of draws 0..n-1 (draw s is member s mod M)."""
        members = self.draw_members(n, device)
        if members is None:
            return [w[:n] for w in self.weights], [b[:n] for b in self.biases]
        return [w[members] for w in self.weights], [b[members] for b in self.biases]

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


class EnsembleNet(StackedNet):
    method = "ensemble"


class SGLDNet(StackedNet):
    method = "sgld"


class SGHMCNet(StackedNet):
    method = "sghmc"
