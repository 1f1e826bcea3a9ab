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

Draws are keyed by (unique seed, draw index) through the counter-based generator and
applied with one batched matmul over [n, U] weight perturbations (see posteriors.seeding).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from training import rng
from training.likelihoods import GaussianHead
from training.model import ACTIVATIONS, MODEL_TYPES, PosteriorModel
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
        self.activation = ACTIVATIONS[arch.get("activation", "relu")]
        widths = [arch["in_features"], *arch.get("hidden", [])]
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.last = nn.Linear(widths[-1], self.head.raw_features)
        # Outputs under the Laplace posterior: Gaussian means (not a heteroscedastic head's
        # variance outputs, which stay at their MAP values) or the class logits.
        self.outputs = (
            self.head.num_targets if isinstance(self.head, GaussianHead) else self.head.raw_features
        )
        k, p = self.outputs, widths[-1] + 1
        if self.structure == "full":
            self.register_buffer("factor", torch.zeros(k * p, k * p))
        else:
            self.register_buffer("left", torch.eye(p))
            self.register_buffer("right", torch.eye(k))
            self.register_buffer("scale", torch.zeros(k, p))
        self.register_buffer("prior_precision", torch.tensor(1.0))

    @property
    def num_features(self) -> int:
        return self.last.in_features + 1

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """phi(z) [B, P]: the last hidden layer's activations with a 1 appended."""
        h = z
        for layer in self.body:
            h = self.activation(layer(h))
        return torch.cat([h, torch.ones_like(h[:, :1])], dim=1)

    def last_weight(self) -> torch.Tensor:
        """The MAP (posterior mean) last layer as [raw_features, P]."""
        return torch.cat([self.last.weight, self.last.bias.unsqueeze(1)], dim=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The MAP network (what the MAP fit trains)."""
        return F.linear(self.features(z), self.last_weight())

    def penalty(self, num_train: int) -> torch.Tensor:
        params = [p for m in (*self.body, self.last) for p in m.parameters()]
        return -sum((self.prior.log_prob(p).sum() for p in params), torch.zeros(())) / num_train

    def weight_perturbation(self, eps: torch.Tensor) -> torch.Tensor:
        """Standard normals [..., K P] -> draws of W - W* [..., K, P] with covariance Sigma."""
        k, p = self.outputs, self.num_features
        if self.structure == "full":
            return (eps @ self.factor.T).unflatten(-1, (k, p))
        return self.right @ (self.scale * eps.unflatten(-1, (k, p))) @ self.left.T

    def weight_covariance(self) -> torch.Tensor:
        """Sigma [K P, K P] in vec order (output, feature)."""
        if self.structure == "full":
            return self.factor @ self.factor.T
        basis = torch.kron(self.right, self.left)
        return basis @ torch.diag(self.scale.flatten() ** 2) @ basis.T

    def raw_draws(self, z: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        phi = self.features(z)
        mean = F.linear(phi, self.last_weight())  # [B, raw]
        groups = SeedGroups.of(seeds)
        keys = rng.draw_keys(groups.unique, n, stream=0)
        delta = self.weight_perturbation(rng.normal(keys, self.outputs * self.num_features))
        shift = groups.gather(groups.spread(phi).unsqueeze(0) @ delta.transpose(-1, -2))
        return torch.cat(
            [mean[:, : self.outputs] + shift, mean[:, self.outputs :].expand(n, -1, -1)], -1
        )

    def set_posterior(self, structure_factors: dict[str, torch.Tensor], precision: float) -> None:
        """Store the covariance factors computed by `posteriors.laplace_fit`."""
        with torch.no_grad():
            for name, value in structure_factors.items():
                getattr(self, name).copy_(value)
            self.prior_precision.fill_(precision)


MODEL_TYPES[LastLayerLaplace.method] = LastLayerLaplace
