"""Last-layer Laplace approximation: a Gaussian over the output layer of a MAP network.

The hidden layers stay at their MAP values and define features phi(x) (with a 1 appended
for the bias); the last layer's mean outputs get the Gaussian N(W*, (H + lambda I)^-1), H the
(generalized Gauss-Newton) Hessian of the NLL in those weights. Because the outputs are
linear in the last layer, a draw of those weights is exactly a draw of the linearized (GLM)
predictive. The covariance is stored factored for its structure:

    full   Sigma = F F^T, F [K P, K P]                  (vec order: output k, feature j)
    kron   Sigma = (Q_G x Q_A) diag(s^2) (Q_G x Q_A)^T  from H ~ G x A (exact for Gaussian
                                                        homoscedastic noise)
    diag   Sigma = diag(s^2)

Draws are keyed by (request seed, draw index) through the counter-based generator; the
standard normals of every request are made at once, the products per request
(training.segments).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training import rng, segments
from training.architectures import build_body
from training.likelihoods import GaussianHead
from training.model import NoFeatures, PosteriorModel
from training.pointwise import ACTIVATIONS, IN_PLACE_ACTIVATIONS
from training.posteriors.seeding import SeedGroups
from training.priors import DEFAULT_PRIOR, parse_prior

STRUCTURES = ("diag", "kron", "full")


class LastLayerLaplace(PosteriorModel):
    """arch: in_features, hidden, activation, structure, prior (the MAP fit's prior)."""

    method = "laplace"

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__(arch, likelihood, normalization)
        self.structure = arch.get("structure", "kron")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        self.prior = parse_prior(arch.get("prior", DEFAULT_PRIOR))
        self.arch["prior"] = self.prior.spec
        self.activation_name = arch.get("activation", "relu")
        self.activation = ACTIVATIONS[self.activation_name]
        width = self._network(arch)
        # Outputs under the Laplace posterior: Gaussian means (not a heteroscedastic head's
        # variance outputs, which stay at their MAP values) or the class logits.
        self.outputs = (
            self.head.num_targets if isinstance(self.head, GaussianHead) else self.head.raw_features
        )
        k, p = self.outputs, width + 1
        if self.structure == "full":
            self.register_buffer("factor", torch.zeros(k * p, k * p))
        else:
            self.register_buffer("left", torch.eye(p))
            self.register_buffer("right", torch.eye(k))
            self.register_buffer("scale", torch.zeros(k, p))
        self.register_buffer("prior_precision", torch.tensor(1.0))

    def _network(self, arch: dict) -> int:
        """Build the MAP network (`self.last` its output layer); returns the feature width."""
        widths = [arch["in_features"], *arch.get("hidden", [])]
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.last = nn.Linear(widths[-1], self.head.raw_features)
        return widths[-1]

    @property
    def num_features(self) -> int:
        return self.last.in_features + 1

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """phi(z) [B, P]: the last hidden layer's activations with a 1 appended."""
        h = z
        for layer in self.body:
            h = self.activation(layer(h))
        return torch.cat([h, torch.ones_like(h[:, :1])], dim=1)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """The MAP network's last hidden activations (`features` without the 1): [1, B, D]."""
        if not self._hidden():
            raise NoFeatures("a network without hidden layers has no feature layer to embed")
        return self.features(z)[:, :-1].unsqueeze(0)

    def _hidden(self) -> bool:
        return len(self.body) > 0

    def last_weight(self) -> torch.Tensor:
        """The MAP (posterior mean) last layer as [raw_features, P]."""
        return torch.cat([self.last.weight, self.last.bias.unsqueeze(1)], dim=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The MAP network (what the MAP fit trains)."""
        return F.linear(self.features(z), self.last_weight())

    def penalty(self, num_train: int) -> torch.Tensor:
        params = [p for name, p in self.named_parameters() if not name.startswith("head.")]
        return -sum((self.prior.log_prob(p).sum() for p in params), torch.zeros(())) / num_train

    def weight_covariance(self) -> torch.Tensor:
        """Sigma [K P, K P] in vec order (output, feature)."""
        if self.structure == "full":
            return self.factor @ self.factor.T
        basis = torch.kron(self.right, self.left)
        return basis @ torch.diag(self.scale.flatten() ** 2) @ basis.T

    def request_draws(
        self, x: torch.Tensor, n: int, seeds: torch.Tensor, sizes: Sequence[int]
    ) -> torch.Tensor:
        """Draws of the GLM predictive for every request, each product a call over one
        request's rows (or its own weight draws) and the elementwise work over the batch.
        Request i computes its draws rounded up so that its block of standard normals starts
        aligned (the extra draws are dropped: the first n are the draws)."""
        k, p = self.outputs, self.num_features
        rows = segments.request_rows(
            tuple(sizes),
            segments.row_multiple([*(layer.in_features for layer in self.body), p], 4),
            x.device,
        )
        h = rows.pad(self.normalizer.inputs(x))
        for layer in self.body:
            h = IN_PLACE_ACTIVATIONS[self.activation_name](
                rows.linear(h, layer.weight.t(), layer.bias)
            )
        phi = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
        mean = rows.linear(phi, self.last_weight().t(), None)[rows.real]  # [B, raw]
        drawn = -(-n // segments.row_multiple([k * p], 4)) * segments.row_multiple([k * p], 4)
        keys = rng.draw_keys(seeds[rows.request_starts], drawn, stream=0).t().contiguous()
        eps = rng.normal(keys, k * p)  # [requests, drawn, K P]: request i's block is aligned
        if self.structure != "full":
            eps = self.scale * eps.unflatten(-1, (k, p))
        shifts = [
            phi[a : a + r] @ self._perturbation(e).transpose(-1, -2)[:n]
            for a, r, e in zip(rows.starts, sizes, eps, strict=True)
        ]
        shift = shifts[0] if len(shifts) == 1 else torch.cat(shifts, dim=1)  # [n, B, K]
        return torch.cat([mean[:, :k] + shift, mean[:, k:].expand(n, -1, -1)], -1)

    def raw_draws_at(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Draw s on its own inputs z[s] ([n, B, ...]): the features of every copy, then each
        seed's weight draws (the ones `glm_draws` makes) on its rows."""
        n, rows = z.shape[:2]
        k, p = self.outputs, self.num_features
        phi = self.features(z.flatten(0, 1)).unflatten(0, (n, rows))  # [n, B, P]
        mean = phi @ self.last_weight().t()  # [n, B, raw]
        groups = SeedGroups.of(seeds)
        eps = rng.normal(rng.draw_keys(groups.unique, n, stream=0), k * p)  # [n, U, K P]
        if self.structure != "full":
            eps = self.scale * eps.unflatten(-1, (k, p))
        shift = phi[:, groups.rows] @ self._perturbation(eps).transpose(-1, -2)  # [n, U, R, K]
        return torch.cat([mean[..., :k] + groups.gather(shift), mean[..., k:]], -1)

    def _perturbation(self, eps: torch.Tensor) -> torch.Tensor:
        """Draws of W - W* [..., K, P] with covariance Sigma, from standard normals [..., K P]
        (full) or from normals already scaled by `scale` [..., K, P] (kron, diag)."""
        if self.structure == "full":
            return (eps @ self.factor.T).unflatten(-1, (self.outputs, self.num_features))
        return self.right @ eps @ self.left.T

    def set_posterior(self, structure_factors: dict[str, torch.Tensor], precision: float) -> None:
        """Store the covariance factors computed by `posteriors.laplace_fit`."""
        with torch.no_grad():
            for name, value in structure_factors.items():
                getattr(self, name).copy_(value)
            self.prior_precision.fill_(precision)

    def glm_draws(self, phi: torch.Tensor, n: int, seed: torch.Tensor) -> torch.Tensor:
        """One request's draws from its features phi [B, P] and its seed (a 1-tensor)."""
        k, p = self.outputs, self.num_features
        mean = phi @ self.last_weight().t()
        eps = rng.normal(rng.draw_keys(seed, n, stream=0)[:, 0], k * p)  # [n, K P]
        if self.structure != "full":
            eps = self.scale * eps.unflatten(-1, (k, p))
        shift = phi @ self._perturbation(eps).transpose(-1, -2)  # [n, B, K]
        return torch.cat([mean[:, :k] + shift, mean[:, k:].expand(n, -1, -1)], -1)


class LaplaceNet(LastLayerLaplace):
    """Last-layer Laplace on any body of the architecture registry: its `features` are the
    body's up to the output layer `last`. Each request's draws are computed on its own.

    arch: an architecture config, structure, prior."""

    def _network(self, arch: dict) -> int:
        body = build_body(arch, self.head.raw_features)
        self.net, self.last = body.features, body.last
        return self.last.in_features

    def _hidden(self) -> bool:
        return any(True for _ in self.net.parameters())

    def features(self, z: torch.Tensor) -> torch.Tensor:
        h = self.net(z)
        return torch.cat([h, torch.ones_like(h[:, :1])], dim=1)

    def request_draws(
        self, x: torch.Tensor, n: int, seeds: torch.Tensor, sizes: Sequence[int]
    ) -> torch.Tensor:
        return PosteriorModel.request_draws(self, x, n, seeds, sizes)

    def raw_draws(self, z: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        return self.glm_draws(self.features(z), n, seeds[:1])
